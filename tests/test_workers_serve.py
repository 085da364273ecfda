"""The serving layer: metrics, plan, routing, OpenAI format, engine, and the servers on real
sockets in one process (prefill -> KV transfer -> decode, attention <-> FFN, router).

The multi-process acceptance (each worker its own process, the openai client, Prometheus, a
killed worker) is in e2e/test_e2e_workers.py. Waits have generous limits only so that a
regression fails instead of hanging; nothing here asserts a speed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

import aiohttp
from aiohttp import web

from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.operator.serving_plan import build_plan
from kleave.workers.config import MODEL_PRESETS
from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.model import MoEDecoder, generate_greedy
from kleave.workers.serve import engine as engine_module
from kleave.workers.serve.decode_server import DecodeServer
from kleave.workers.serve.engine import (
    Engine,
    ErrorEvent,
    FinishEvent,
    RejectedRequestError,
    TokenEvent,
)
from kleave.workers.serve.ffn_server import FFNWorker
from kleave.workers.serve.forward import LocalForward, ModelThread, RemoteFFNForward
from kleave.workers.serve.http import bind_socket
from kleave.workers.serve.metrics import WorkerMetrics, token_buckets
from kleave.workers.serve.openai_api import StopMatcher, parse_chat, parse_completion
from kleave.workers.serve.plan import PlanError, ServingPlan, local_plan, parse_plan
from kleave.workers.serve.prefill_server import PrefillServer
from kleave.workers.serve.prefix_index import reusable_keys
from kleave.workers.serve.router import Router, RouterOptions
from kleave.workers.serve.routing import (
    WorkerState,
    choose_by_prefix,
    least_loaded,
    prefix_key,
    rendezvous_order,
)
from kleave.workers.serve.runtime import WorkerOptions
from kleave.workers.serve.sampling import SamplingParams, sample
from kleave.workers.tokenizer import BOS, EOS, ByteTokenizer
from kleave.workers.transport.kv_transfer import Backend, KVReceiver

pytest_plugins = ("workers_fixtures",)  # the `model` and `reference` fixtures
HANG_GUARD = 120.0  # seconds; reached only when something is broken
CONFIG = MODEL_PRESETS["tiny"]
PROMPTS = [
    [BOS, *b"hello world"],
    [BOS, *b"abc"],
    [BOS, *b"The quick brown fox jumps over the lazy dog"],
    list(range(40)),
]


def run(coro: Awaitable[Any]) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(HANG_GUARD):
            return await coro

    return asyncio.run(guarded())


# ----- metrics ------------------------------------------------------------------------------
def test_worker_metrics_use_vllm_names_and_labels() -> None:
    metrics = WorkerMetrics("tiny", max_model_len=4096)
    metrics.generation_tokens.inc(3)
    metrics.request_finished(reason="stop", prompt_tokens=5, generation_tokens=3, e2e_s=0.2)
    text = metrics.render().decode()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_prompt_tokens_bucket",
        "vllm:request_generation_tokens_bucket",
        "kleave:kv_transfer_bytes_total",
        "kleave:kv_transfer_seconds_bucket",
        "kleave:af_exchange_seconds_bucket",
    ):
        assert f"\n{name}{{" in text, name
    assert 'vllm:generation_tokens_total{engine="0",model_name="tiny"} 3.0' in text
    assert metrics.success_count("stop") == 1.0
    assert token_buckets(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def test_planner_reads_every_name_the_workers_export() -> None:
    from kleave.planner.metrics import ENGINES

    text = WorkerMetrics("m", max_model_len=64).render().decode()
    names = ENGINES["vllm"]
    for name in (names.requests, names.prompt_tokens, names.generation_tokens, names.ttft):
        assert name.removesuffix("_total") in text
    for alternatives in (names.tpot, names.kv_usage, (names.waiting,), (names.running,)):
        assert any(f"\n{n}" in text for n in alternatives), alternatives


# ----- plan ---------------------------------------------------------------------------------
def operator_plan(topology: str = "PD") -> dict[str, Any]:
    roles = {"Colocated": ["decode"], "PD": ["prefill", "decode"]}
    roles["PDAF"] = ["prefill", "attention", "ffn"]
    doc = {
        "model": "tiny",
        "engine": "builtin",
        "topology": topology,
        "pools": {role: {"gpuType": "H100-SXM"} for role in roles[topology]},
    }
    _, plan = build_plan(InferenceDeploymentSpec.model_validate(doc), name="llm", namespace="ns")
    return plan


def test_plan_reads_what_the_operator_writes() -> None:
    plan = parse_plan(operator_plan("PD"), source="plan.json")
    assert plan.topology == "PD" and plan.preset == "tiny" and plan.config == CONFIG
    assert plan.pool("decode").url.startswith("http://llm-decode-r")
    assert plan.pool("decode").url.endswith(".ns.svc:8000")
    assert plan.server_role("prefill") == "prefill"
    assert plan.decode_role == "decode"
    with pytest.raises(PlanError, match="--role attention is not a pool"):
        plan.server_role("attention")
    colocated = parse_plan(operator_plan("Colocated"))
    assert colocated.server_role("decode") == "colocated"
    pdaf = parse_plan(operator_plan("PDAF"))
    assert pdaf.decode_role == "attention" and set(pdaf.pools) == {"prefill", "attention", "ffn"}


def test_plan_errors_name_what_to_change() -> None:
    document = operator_plan("PD") | {"model": "deepseek-ai/DeepSeek-V3"}
    with pytest.raises(PlanError, match="modelPreset"):
        parse_plan(document)
    assert parse_plan(document, preset="tiny-dense").preset == "tiny-dense"
    assert parse_plan(document | {"modelPreset": "tiny"}).preset == "tiny"
    with pytest.raises(PlanError, match="engine builtin"):
        parse_plan(operator_plan("PD") | {"engine": "vllm"})
    broken = operator_plan("PD")
    del broken["pools"]["decode"]
    with pytest.raises(PlanError, match=r"needs pools\.decode"):
        parse_plan(broken)


def test_local_plan_lists_every_worker_and_resolves_to_them() -> None:
    urls = {
        "prefill": ["http://127.0.0.1:1"],
        "decode": ["http://127.0.0.1:2", "http://127.0.0.1:3"],
    }
    document = local_plan(topology="PD", model="tiny", pools=urls, router_url="http://r", seed=7)
    plan = parse_plan(json.loads(json.dumps(document)))
    assert plan.seed == 7
    assert run(plan.pool("decode").resolve()) == urls["decode"]
    with pytest.raises(PlanError, match="needs workers for prefill"):
        local_plan(topology="PD", model="tiny", pools={"decode": ["http://x"]}, router_url="r")


def test_a_service_url_resolves_through_dns() -> None:
    plan = parse_plan(
        local_plan(
            topology="Colocated",
            model="tiny",
            pools={"decode": ["http://localhost:9"]},
            router_url="r",
        )
    )
    service = replace(plan.pool("decode"), urls=())
    assert run(service.resolve()) == ["http://127.0.0.1:9"]


# ----- routing ------------------------------------------------------------------------------
def test_rendezvous_moves_only_the_keys_of_a_removed_worker() -> None:
    urls = [f"http://10.0.0.{i}:8000" for i in range(5)]
    keys = [prefix_key([BOS, i, i * 7 % 256], 16) for i in range(200)]
    before = {key: rendezvous_order(urls, key)[0] for key in keys}
    assert len(set(before.values())) == 5  # every worker gets some prefixes
    gone = urls[2]
    after = {key: rendezvous_order([u for u in urls if u != gone], key)[0] for key in keys}
    for key in keys:
        if before[key] != gone:
            assert after[key] == before[key]
    # Only the first block decides: prompts that share it go to the same worker.
    shared = list(range(16))
    assert prefix_key([*shared, 1, 2], 16) == prefix_key([*shared, 9], 16)


def test_prefill_choice_keeps_locality_until_the_worker_is_much_busier() -> None:
    workers = [WorkerState(f"http://w{i}", "prefill", ready=True) for i in range(3)]
    prompt = [BOS, *b"system prompt shared by many requests"]
    first = choose_by_prefix(workers, prompt, block_size=16, imbalance=2)
    assert first.affinity
    first.worker.outstanding = 2
    assert choose_by_prefix(workers, prompt, block_size=16, imbalance=2).worker is first.worker
    first.worker.outstanding = 3
    moved = choose_by_prefix(workers, prompt, block_size=16, imbalance=2)
    assert not moved.affinity and moved.worker is not first.worker
    assert moved.worker.outstanding == 0


def test_least_loaded_breaks_ties_by_requests_served() -> None:
    a, b = WorkerState("http://a", "decode"), WorkerState("http://b", "decode")
    a.served = 3
    assert least_loaded([a, b]) is b
    b.outstanding = 1
    assert least_loaded([a, b]) is a


# ----- OpenAI format ------------------------------------------------------------------------
TOKENIZER = ByteTokenizer(CONFIG.vocab_size)


def completion(**body: Any) -> Any:
    return parse_completion({"model": "tiny", **body}, served_model="tiny", tokenizer=TOKENIZER)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "logprobs": 3}, "logprobs"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": [1, 400]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_completion_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    from kleave.workers.serve.http import ApiError

    with pytest.raises(ApiError) as caught:
        completion(**body)
    assert caught.value.status == 400 and caught.value.param == param


def test_completion_and_chat_parsing() -> None:
    from kleave.workers.serve.http import ApiError

    parsed = completion(prompt="hi", max_tokens=3, temperature=0, seed=4, ignore_eos=True)
    assert parsed.prompt_tokens == [BOS, *b"hi"]
    assert parsed.params == SamplingParams(max_tokens=3, temperature=0.0, seed=4, stop_token_ids=())
    assert completion(prompt=[[5, 6]]).prompt_tokens == [5, 6]
    assert completion(prompt="x").params.stop_token_ids == (EOS,)
    with pytest.raises(ApiError) as caught:
        parse_completion(
            {"model": "other", "prompt": "x"}, served_model="tiny", tokenizer=TOKENIZER
        )
    assert caught.value.status == 404 and caught.value.param == "model"
    chat = parse_chat(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        served_model="tiny",
        tokenizer=TOKENIZER,
        default_max_tokens=9,
    )
    assert chat.params.max_tokens == 9
    assert TOKENIZER.decode(chat.prompt_tokens) == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    with pytest.raises(ApiError) as caught:
        parse_chat(
            {"model": "tiny", "messages": [{"role": "x"}]},
            served_model="tiny",
            tokenizer=TOKENIZER,
            default_max_tokens=1,
        )
    assert caught.value.param == "messages" and "messages[0].role" in caught.value.message


def test_stop_matcher_cuts_at_a_stop_string_split_over_pieces() -> None:
    matcher = StopMatcher(("END",))
    pieces = [matcher.push(p) for p in ["ab", "cE", "N", "Dxyz"]]
    assert "".join(pieces) == "abc" and matcher.stopped
    assert pieces[1] == "c"  # "E" held back: it may start "END"
    free = StopMatcher(("END",))
    assert free.push("aE") == "a" and free.push("x") == "Ex" and free.flush() == ""
    held = StopMatcher(("END",))
    assert held.push("EN") == "" and held.flush() == "EN"


def test_sampling_is_greedy_at_zero_and_reproducible_with_a_seed() -> None:
    logits = torch.randn(CONFIG.vocab_size, generator=torch.Generator().manual_seed(1))
    assert sample(logits, SamplingParams(temperature=0.0), 0) == int(logits.argmax())
    seeded = SamplingParams(temperature=1.0, seed=11)
    draws = [sample(logits, seeded, i) for i in range(20)]
    assert draws == [sample(logits, seeded, i) for i in range(20)]
    assert len(set(draws)) > 1  # different indices draw differently
    nucleus = SamplingParams(temperature=1.0, top_p=1e-6, seed=3)
    assert sample(logits, nucleus, 5) == int(logits.argmax())


# ----- engine -------------------------------------------------------------------------------
async def generate_all(
    engine: Engine, prompts: list[list[int]], params: SamplingParams
) -> list[Any]:
    async def one(index: int, prompt: list[int]) -> Any:
        tokens: list[int] = []
        async for event in engine.submit(f"r{index}", prompt, params):
            if isinstance(event, TokenEvent):
                tokens.append(event.token)
            else:
                return tokens, event
        raise AssertionError("no finish event")

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def make_engine(
    model: MoEDecoder, blocks: int, *, max_prefill_tokens: int = 2048, prefix_caching: bool = True
) -> tuple[Engine, WorkerMetrics]:
    thread = ModelThread()
    metrics = WorkerMetrics("tiny", max_model_len=CONFIG.max_position)
    cache = PagedKVCache(CONFIG, num_blocks=blocks)
    forward = LocalForward(model, thread)
    engine = Engine(
        forward,
        cache,
        thread,
        metrics,
        max_model_len=CONFIG.max_position,
        max_prefill_tokens=max_prefill_tokens,
        prefix_caching=prefix_caching,
    )
    return engine, metrics


@pytest.mark.parametrize(("blocks", "chunk"), [(64, 2048), (6, 2048), (64, 8), (6, 5)])
def test_engine_batches_concurrent_requests_exactly(
    model: MoEDecoder, reference: list[list[int]], blocks: int, chunk: int
) -> None:
    """Four requests batched together give generate_greedy's tokens; with 6 blocks they do
    not all fit and the youngest are preempted and recomputed, still exactly; with a prefill
    budget of 8 or 5 tokens per iteration every prompt is prefilled in chunks (and the
    preempted ones recomputed in chunks), still exactly."""

    async def scenario() -> tuple[list[Any], WorkerMetrics, Engine]:
        engine, metrics = make_engine(model, blocks, max_prefill_tokens=chunk)
        engine.start()
        try:
            params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=())
            return await generate_all(engine, PROMPTS, params), metrics, engine
        finally:
            await engine.stop()

    results, metrics, engine = run(scenario())
    assert [tokens for tokens, _ in results] == reference
    assert all(isinstance(e, FinishEvent) and e.reason == "length" for _, e in results)
    preempted = metrics.registry.get_sample_value(
        "vllm:num_preemptions_total", {"model_name": "tiny", "engine": "0"}
    )
    assert (preempted or 0) > 0 if blocks == 6 else preempted == 0
    assert engine.cache.free_blocks == blocks  # everything freed
    assert metrics.success_count("length") == len(PROMPTS)


def test_engine_stops_at_eos_and_refuses_what_never_fits(
    model: MoEDecoder, reference: list[list[int]]
) -> None:
    # A stop token the reference emits (random weights need not emit EOS within 24 tokens).
    prompt, ref = PROMPTS[0], reference[0]
    stop = ref[5]

    async def scenario() -> tuple[Any, Engine]:
        engine, _ = make_engine(model, 8)
        engine.start()
        try:
            with pytest.raises(RejectedRequestError) as caught:
                engine.submit("big", [BOS] * 40, SamplingParams(max_tokens=100))
            assert caught.value.field == "max_tokens" and "8 in all" in str(caught.value)
            params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop,))
            return await generate_all(engine, [prompt], params), engine
        finally:
            await engine.stop()

    ((tokens, event),) = run(scenario())[0]
    expected = ref[: ref.index(stop) + 1]
    assert tokens == expected and isinstance(event, FinishEvent) and event.reason == "stop"


def test_an_abandoned_stream_aborts_and_frees_its_blocks(model: MoEDecoder) -> None:
    async def scenario() -> Engine:
        engine, metrics = make_engine(model, 64)
        engine.start()
        try:
            stream = engine.submit(
                "a", PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0, stop_token_ids=())
            )
            seen = 0
            async for event in stream:
                seen += isinstance(event, TokenEvent)
                if seen == 3:
                    break
            for _ in range(100):
                if engine.cache.free_blocks == 64:
                    break
                await asyncio.sleep(0.01)
            assert metrics.success_count("abort") == 1
            return engine
        finally:
            await engine.stop()

    assert run(scenario()).cache.free_blocks == 64


# ----- servers on real sockets, one process -------------------------------------------------
@asynccontextmanager
async def serving(app: web.Application, port: int) -> AsyncIterator[web.AppRunner]:
    """Serve `app` on 127.0.0.1:`port`; a test may clean the runner up early (a dead worker)."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.SockSite(runner, bind_socket("127.0.0.1", port))
    await site.start()
    try:
        yield runner
    finally:
        if runner.server is not None:  # not already stopped by the test
            await runner.cleanup()


def free_port() -> int:
    sock = bind_socket("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@dataclass
class Plane:
    plan: ServingPlan
    router: str
    workers: dict[str, list[str]]
    session: aiohttp.ClientSession
    routing: Router
    servers: dict[str, PrefillServer | DecodeServer | FFNWorker]  # by URL
    runners: dict[str, web.AppRunner]  # by URL: `await runners[url].cleanup()` kills one


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(600):
        async with session.get(f"{url}/readyz") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never became ready")


@asynccontextmanager
async def plane(
    topology: str,
    *,
    kv_blocks: int = 256,
    with_prefill: bool = True,
    counts: Mapping[str, int] | None = None,
    refresh_s: float = 0.2,
    kv_backend: Backend = "tcp",
    ffn_expert_parallel: int = 1,
    tensor_parallel: Mapping[str, int] | None = None,
) -> AsyncIterator[Plane]:
    """Every server of `topology` (`counts` per role, default one) plus the router, in this
    event loop on real sockets (`tensor_parallel` per role: ranks beyond this process)."""
    roles = {
        "Colocated": ["decode"],
        "PD": ["prefill", "decode"],
        "PDAF": ["prefill", "attention", "ffn"],
    }[topology]
    ports = {role: [free_port() for _ in range((counts or {}).get(role, 1))] for role in roles}
    urls = {role: [f"http://127.0.0.1:{port}" for port in ports[role]] for role in roles}
    router_port = free_port()
    plan = parse_plan(local_plan(topology=topology, model="tiny", pools=urls, router_url="r"))
    servers: dict[str, PrefillServer | DecodeServer | FFNWorker] = {}
    runners: dict[str, web.AppRunner] = {}
    async with AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        for role in roles:  # ffn last: the attention worker connects to it once it loads
            if role == "prefill" and not with_prefill:
                continue
            for port, url in zip(ports[role], urls[role], strict=True):
                options = WorkerOptions(
                    role=plan.server_role(role),
                    host="127.0.0.1",
                    port=port,
                    kv_blocks=kv_blocks,
                    kv_backend=kv_backend,
                    expert_parallel=ffn_expert_parallel if role == "ffn" else 1,
                    tensor_parallel=(tensor_parallel or {}).get(role, 1),
                )
                server: PrefillServer | DecodeServer | FFNWorker
                if role == "prefill":
                    server = PrefillServer(plan, options)
                elif role == "ffn":
                    server = FFNWorker(plan, options)
                else:
                    server = DecodeServer(plan, options, options.role)
                servers[url] = server
                runners[url] = await stack.enter_async_context(serving(server.app(), port))
        for url in servers:
            await wait_ready(session, url)
        router = Router(
            plan, RouterOptions(host="127.0.0.1", port=router_port, refresh_s=refresh_s)
        )
        await stack.enter_async_context(serving(router.app(), router_port))
        yield Plane(
            plan, f"http://127.0.0.1:{router_port}", urls, session, router, servers, runners
        )


async def post(
    session: aiohttp.ClientSession, url: str, body: Mapping[str, Any]
) -> tuple[int, Any]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json()


async def completion_tokens(p: Plane, prompt: list[int], max_tokens: int) -> list[int]:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    status, answer = await post(p.session, f"{p.router}/v1/completions", body)
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == max_tokens
    tokens: list[int] = answer["choices"][0]["token_ids"]
    return tokens


@pytest.mark.parametrize(
    ("topology", "kv_backend"),
    [
        ("Colocated", "tcp"),
        ("PD", "tcp"),
        ("PD", "shm"),
        ("PD", "gloo"),
        ("PDAF", "tcp"),
        ("PDAF", "shm"),
    ],
)
def test_router_generates_generate_greedys_tokens(
    topology: str, kv_backend: Backend, reference: list[list[int]]
) -> None:
    async def scenario() -> list[list[int]]:
        async with plane(topology, kv_backend=kv_backend) as p:
            return list(
                await asyncio.gather(*(completion_tokens(p, prompt, 24) for prompt in PROMPTS))
            )

    assert run(scenario()) == reference


def test_streaming_chunks_carry_every_token_and_finish(reference: list[list[int]]) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with plane("PD") as p:
            body = {
                "model": "tiny",
                "prompt": PROMPTS[0],
                "max_tokens": 24,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "return_token_ids": True,
                "stream_options": {"include_usage": True},
            }
            async with p.session.post(f"{p.router}/v1/completions", json=body) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                raw = (await response.read()).decode()
        events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    chunks = run(scenario())
    tokens = [t for c in chunks for choice in c["choices"] for t in choice.get("token_ids", [])]
    assert tokens == reference[0]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 24 and chunks[-1]["choices"] == []
    text = "".join(choice["text"] for c in chunks for choice in c["choices"])
    assert text == TOKENIZER.decode(reference[0])


def test_bad_requests_and_missing_workers_get_openai_errors() -> None:
    async def scenario() -> None:
        async with plane("PD", kv_blocks=4, with_prefill=False) as p:
            url = f"{p.router}/v1/completions"
            status, body = await post(
                p.session, url, {"model": "tiny", "prompt": "x", "max_tokens": -1}
            )
            assert status == 400 and body["error"]["param"] == "max_tokens"
            status, body = await post(
                p.session, f"{p.router}/v1/chat/completions", {"model": "tiny"}
            )
            assert status == 400 and body["error"]["param"] == "messages"
            async with p.session.post(url, data=b"{not json") as response:
                assert response.status == 400
                assert "not valid JSON" in (await response.json())["error"]["message"]
            status, body = await post(p.session, url, {"model": "tiny", "prompt": "x"})
            assert status == 503 and "no prefill worker is ready" in body["error"]["message"]
            too_big = {"model": "tiny", "prompt": [1] * 40, "max_tokens": 40}
            status, body = await post(p.session, url, too_big)
            assert status == 400 and body["error"]["param"] == "max_tokens"
            assert p.workers["decode"][0] in body["error"]["message"]  # the worker's cache
            decode = p.workers["decode"][0]
            status, body = await post(
                p.session,
                f"{decode}/v1/generate",
                {"request_id": "r", "prompt_tokens": [1] * 50, "sampling": {"max_tokens": 30}},
            )
            assert status == 400 and body["error"]["param"] == "max_tokens"
            status, body = await post(
                p.session, f"{decode}/v1/generate", {"request_id": "r", "prompt_tokens": [1, 999]}
            )
            assert status == 400 and body["error"]["param"] == "prompt_tokens"
            status, body = await post(
                p.session,
                f"{decode}/v1/generate",
                {"request_id": "r", "prompt_tokens": [1], "first_token": 5, "kv_timeout_s": 0.2},
            )
            assert status == 502 and "no KV transfer began" in body["error"]["message"]

    run(scenario())


def test_a_dead_decode_peer_fails_the_prefill_naming_it() -> None:
    async def scenario() -> None:
        async with plane("PD") as p:
            prefill = p.workers["prefill"][0]
            body = {
                "request_id": "r",
                "prompt_tokens": [1, 2, 3],
                "decode": f"127.0.0.1:{free_port()}",
            }
            status, answer = await post(p.session, f"{prefill}/v1/prefill", body)
            assert status == 502 and "KV receiver 127.0.0.1:" in answer["error"]["message"]
            status, answer = await post(
                p.session, f"{prefill}/v1/prefill", body | {"decode": "nowhere"}
            )
            assert status == 400 and answer["error"]["param"] == "decode"

    run(scenario())


def test_a_decode_worker_restarted_on_the_same_port_gets_the_next_request() -> None:
    """The prefill's pooled connection to the old process is dead; it dials the new one."""

    async def scenario() -> None:
        async with plane("PD", with_prefill=True) as p:
            prefill = p.workers["prefill"][0]
            first = KVReceiver()
            port = await first.start()
            body = {"request_id": "a", "prompt_tokens": [1, 2, 3], "decode": f"127.0.0.1:{port}"}
            status, answer = await post(p.session, f"{prefill}/v1/prefill", body)
            assert status == 200, answer
            assert len((await first.receive("a", timeout=10)).layers) == p.plan.config.num_layers
            await first.close()  # the decode worker restarts on the same address
            second = KVReceiver()
            assert await second.start(port=port) == port
            try:
                for request_id in ("b", "c"):
                    status, answer = await post(
                        p.session, f"{prefill}/v1/prefill", body | {"request_id": request_id}
                    )
                    assert status == 200, answer
                    received = await second.receive(request_id, timeout=10)
                    assert len(received.layers) == p.plan.config.num_layers
            finally:
                await second.close()

    run(scenario())


def retries(p: Plane, role: str) -> float:
    value = p.routing.metrics.registry.get_sample_value(
        "kleave:router_retries_total", {"model_name": "tiny", "role": role}
    )
    return value or 0.0


def test_a_worker_failure_before_the_first_token_is_retried_on_another_worker(
    reference: list[list[int]],
) -> None:
    """A dead prefill worker, then a decode worker whose KV receiver is gone: each request
    still gets generate_greedy's tokens from the other worker; with every decode worker
    broken the error names both. The router never re-probes (refresh 60 s), so it sends the
    first attempt to the broken worker every time."""

    async def scenario() -> None:
        counts = {"prefill": 2, "decode": 2}
        async with plane("PD", counts=counts, refresh_s=60) as p:
            prompt = PROMPTS[0]
            preferred = rendezvous_order(p.workers["prefill"], prefix_key(prompt, 16))[0]
            await p.runners[preferred].cleanup()  # the prompt's prefill worker dies
            assert await completion_tokens(p, prompt, 24) == reference[0]
            assert retries(p, "prefill") == 1 and retries(p, "decode") == 0

            keys = reusable_keys(prompt, 16)
            broken = p.routing.choose("decode", prompt, keys).worker  # the next one's first choice
            server = p.servers[broken.url]
            assert isinstance(server, DecodeServer) and server.receiver is not None
            await server.receiver.close()  # its HTTP still answers; its KV port does not
            assert await completion_tokens(p, prompt, 24) == reference[0]
            assert retries(p, "decode") == 1

            other = next(url for url in p.workers["decode"] if url != broken.url)
            other_server = p.servers[other]
            assert isinstance(other_server, DecodeServer) and other_server.receiver is not None
            await other_server.receiver.close()
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 4}
            status, answer = await post(p.session, f"{p.router}/v1/completions", body)
            assert status == 502, answer
            message = answer["error"]["message"]
            assert broken.url in message and other in message and "after retrying" in message

    run(scenario())


async def info(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/v1/info") as response:
        result: dict[str, Any] = await response.json()
        return result


def test_a_client_that_goes_away_aborts_its_request_on_the_decode_worker() -> None:
    async def scenario() -> dict[str, Any]:
        async with plane("PD") as p:
            body = {"model": "tiny", "prompt": "go on", "max_tokens": 3000, "temperature": 0}
            body |= {"ignore_eos": True, "stream": True}
            async with p.session.post(f"{p.router}/v1/completions", json=body) as response:
                for _ in range(3):
                    await response.content.readline()
            decode = p.workers["decode"][0]
            for _ in range(500):
                state = await info(p.session, decode)
                if state["running"] == 0 and state["free_blocks"] == state["num_blocks"]:
                    async with p.session.get(f"{decode}/metrics") as metrics:
                        state["metrics"] = await metrics.text()
                    return state
                await asyncio.sleep(0.02)
            raise AssertionError(f"the decode worker still runs the request: {state}")

    state = run(scenario())
    assert (
        'vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny"} 1.0'
        in state["metrics"]
    )


def test_an_attention_worker_waits_for_its_ffn_worker() -> None:
    async def scenario() -> None:
        ports = {role: free_port() for role in ("attention", "ffn")}
        urls = {role: [f"http://127.0.0.1:{port}"] for role, port in ports.items()}
        urls["prefill"] = ["http://127.0.0.1:9"]
        plan = parse_plan(local_plan(topology="PDAF", model="tiny", pools=urls, router_url="r"))
        options = WorkerOptions(
            role="attention", host="127.0.0.1", port=ports["attention"], kv_blocks=64
        )
        async with AsyncExitStack() as stack:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            attention = DecodeServer(plan, options, "attention")
            await stack.enter_async_context(serving(attention.app(), ports["attention"]))
            url = urls["attention"][0]
            for _ in range(200):
                async with session.get(f"{url}/readyz") as response:
                    reason = (await response.json()).get("error", {}).get("message", "")
                if "no FFN worker connected" in reason:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"attention readiness never named the FFN: {reason}")
            ffn = FFNWorker(plan, replace(options, role="ffn", port=ports["ffn"]))
            await stack.enter_async_context(serving(ffn.app(), ports["ffn"]))
            await wait_ready(session, url)
            generate = {"request_id": "r", "prompt_tokens": PROMPTS[1], "stream": False}
            generate["sampling"] = {"max_tokens": 5, "stop_token_ids": []}
            status, body = await post(session, f"{url}/v1/generate", generate)
            assert status == 200 and len(body["tokens"]) == 5
            # Each holds its half of the weights: together exactly the model.
            held = {
                role: (await info(session, urls[role][0]))["weights"]
                for role in ("attention", "ffn")
            }
            assert (held["attention"]["part"], held["ffn"]["part"]) == ("attention", "ffn")
            total = held["attention"]["parameters"] + held["ffn"]["parameters"]
            assert total == plan.config.num_parameters()

    run(scenario())


def test_the_commands_accept_the_arguments_the_operator_gives_its_pods() -> None:
    from kleave.operator.engines import RouterSpec, WorkerSpec, router_preset, worker_preset
    from kleave.workers.cli import router, serve

    worker = worker_preset(
        WorkerSpec(
            engine="builtin",
            topology="PDAF",
            role="attention",
            model="tiny",
            tensor=1,
            expert=1,
            gpus=1,
            kv_backend="auto",
        )
    )
    assert worker.command == ("kleave",) and worker.args[:2] == ("workers", "serve")
    assert (worker.readiness_path, worker.liveness_path) == ("/readyz", "/healthz")
    context = serve.make_context("serve", list(worker.args[2:]))
    assert context.params["role"] == "attention" and context.params["port"] == 8000
    assert str(context.params["plan_path"]) == "/etc/kleave/plan/plan.json"
    spec = RouterSpec(
        engine="builtin",
        topology="PD",
        model="tiny",
        kv_backend="auto",
        prefill_urls=("http://p",),
        decode_urls=("http://d",),
    )
    preset = router_preset(spec)
    assert preset.args[:2] == ("workers", "router")
    assert router.make_context("router", list(preset.args[2:])).params["port"] == 8000


def test_a_seeded_sampled_request_gets_the_same_tokens_in_every_topology() -> None:
    async def sampled(topology: str) -> list[list[int]]:
        async with plane(topology) as p:
            answers = []
            for seed in (1, 2):
                body = {"model": "tiny", "prompt": "sample", "max_tokens": 16, "temperature": 1.0}
                body |= {"top_p": 0.9, "seed": seed, "ignore_eos": True, "return_token_ids": True}
                status, answer = await post(p.session, f"{p.router}/v1/completions", body)
                assert status == 200, answer
                answers.append(answer["choices"][0]["token_ids"])
            return answers

    colocated, pd, pdaf = (run(sampled(t)) for t in ("Colocated", "PD", "PDAF"))
    assert colocated == pd == pdaf
    assert colocated[0] != colocated[1]  # the seed matters


def test_prompts_sharing_a_prefix_reuse_its_kv_on_the_prefill_worker(model: MoEDecoder) -> None:
    """A system prompt's full blocks are computed once: the next prompts that start with it
    prefill only their own tokens, and still decode exactly generate_greedy's tokens."""
    system = [BOS, *b"You are kleave's test assistant; answer briefly."]  # 50 tokens
    prompts = [system + list(b"What is PD?"), system + list(b"And PDAF?"), system + list(b"PD?")]
    expected = [generate_greedy(model, prompt, 12) for prompt in prompts]

    async def scenario() -> tuple[list[list[int]], list[float]]:
        async with plane("PD") as p:
            (url,) = p.workers["prefill"]
            prefill = p.servers[url]
            assert isinstance(prefill, PrefillServer)
            labels = {"model_name": "tiny", "engine": "0"}
            hits: list[float] = []
            tokens: list[list[int]] = []
            for prompt in prompts:
                tokens.append(await completion_tokens(p, prompt, 12))
                value = prefill.metrics.registry.get_sample_value(
                    "vllm:prefix_cache_hits_total", labels
                )
                hits.append(value or 0.0)
            queries = prefill.metrics.registry.get_sample_value(
                "vllm:prefix_cache_queries_total", labels
            )
            assert queries == sum(len(prompt) for prompt in prompts)
            async with p.session.get(f"{url}/v1/info") as response:
                info = (await response.json())["prefix_cache"]
            assert info["blocks"] > 0 and 0 < info["bytes"] <= info["capacity_bytes"]
            return tokens, hits

    tokens, hits = run(scenario())
    assert tokens == expected
    # the first prompt finds nothing; each later one reuses the 48 tokens of 3 full blocks
    assert hits == [0.0, 48.0, 96.0]


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(model: MoEDecoder) -> None:
    """With 16 prefill tokens per iteration, a 120-token prompt takes 8 iterations, and the
    request already decoding gets a token after each one instead of waiting for the whole
    prefill (vLLM's chunked prefill); the long prompt's tokens are still generate_greedy's."""
    short, long_prompt = PROMPTS[0], [BOS, *range(1, 120)]
    expected = generate_greedy(model, long_prompt, 8)

    async def scenario() -> tuple[list[int], int]:
        engine, _ = make_engine(model, 64, max_prefill_tokens=16)
        engine.start()
        try:
            params = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=())
            times: list[float] = []
            started = asyncio.Event()

            async def decoding() -> None:
                async for event in engine.submit("short", short, params):
                    if isinstance(event, TokenEvent):
                        times.append(time.perf_counter())
                        started.set()

            task = asyncio.create_task(decoding())
            await started.wait()
            submitted = time.perf_counter()
            tokens: list[int] = []
            first = 0.0
            long_params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=())
            async for event in engine.submit("long", long_prompt, long_params):
                if isinstance(event, TokenEvent):
                    first = first or time.perf_counter()
                    tokens.append(event.token)
            await task
            return tokens, sum(submitted < t < first for t in times)
        finally:
            await engine.stop()

    tokens, interleaved = run(scenario())
    assert tokens == expected
    assert interleaved >= 6  # one decode step after each of (about) 8 chunks; unchunked: 0-1


def test_the_pdaf_forward_prefills_after_a_past_like_the_local_one(model: MoEDecoder) -> None:
    """RemoteFFNForward (attention here, FFN elsewhere) with its FFN calls answered by the
    same model: a chunk after a past gives the local forward's logits and K/V exactly."""
    thread = ModelThread()

    async def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        return await thread.run(model.ffn, layer, h)

    async def scenario() -> None:
        prompt = [BOS, *range(1, 40)]
        local, remote = LocalForward(model, thread), RemoteFFNForward(model, thread, ffn)
        _, past = await local.prefill(prompt[:24])
        want_logits, want_kv = await local.prefill(prompt[24:], past)
        logits, kv = await remote.prefill(prompt[24:], past)
        assert torch.equal(logits, want_logits)
        for (k, v), (k_want, v_want) in zip(kv, want_kv, strict=True):
            assert torch.equal(k, k_want) and torch.equal(v, v_want)
        assert kv[0][0].shape[0] == len(prompt)

    try:
        run(scenario())
    finally:
        thread.close()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_the_engine_shares_cached_prompt_blocks_between_requests(
    model: MoEDecoder, prefix_caching: bool
) -> None:
    """A colocated worker's paged cache keeps a system prompt's blocks: the next requests
    share them instead of computing them, and still decode generate_greedy's tokens."""
    system = [BOS, *b"You are kleave's test assistant; answer briefly."]
    prompts = [system + list(b"What is PD?"), system + list(b"And PDAF?")]
    expected = [generate_greedy(model, prompt, 10) for prompt in prompts]

    async def scenario() -> tuple[list[list[int]], float, Engine]:
        engine, metrics = make_engine(model, 32, prefix_caching=prefix_caching)
        engine.start()
        try:
            params = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=())
            tokens = []
            for prompt in prompts:  # one after the other: the first registers its blocks
                ((out, _),) = await generate_all(engine, [prompt], params)
                tokens.append(out)
            labels = {"model_name": "tiny", "engine": "0"}
            hits = metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", labels)
            return tokens, hits or 0.0, engine
        finally:
            await engine.stop()

    tokens, hits, engine = run(scenario())
    assert tokens == expected
    assert hits == (48.0 if prefix_caching else 0.0)  # the system prompt's 3 full blocks
    assert engine.cache.free_blocks == engine.cache.num_blocks
    assert (engine.cache.cached_blocks > 0) is prefix_caching


def test_an_ffn_worker_splits_its_experts_over_two_ranks_exactly(
    model: MoEDecoder, reference: list[list[int]]
) -> None:
    """PDAF with the FFN worker's experts on two gloo ranks (this process and one it starts):
    each layer's output is the whole model's to float32 rounding (the expert GEMMs see other
    batches of rows), and the tokens are generate_greedy's; the other rank stops with the
    worker."""

    async def scenario() -> tuple[list[list[int]], Any]:
        async with plane("PDAF", ffn_expert_parallel=2) as p:
            (url,) = p.workers["ffn"]
            ffn = p.servers[url]
            assert isinstance(ffn, FFNWorker) and ffn.ep is not None
            experts = ffn.ep.model._ffn(0).experts_gate_up
            assert isinstance(experts, torch.Tensor)
            held = experts.shape[0]
            assert held == CONFIG.num_experts // 2  # its half of the experts only
            h = torch.randn(7, CONFIG.hidden_size, generator=torch.Generator().manual_seed(5))
            loop = asyncio.get_running_loop()
            for layer in range(CONFIG.num_layers):
                split = await loop.run_in_executor(None, ffn.ep.ffn, layer, h)
                torch.testing.assert_close(split, model.ffn(layer, h), rtol=0, atol=1e-5)
            tokens = list(
                await asyncio.gather(*(completion_tokens(p, prompt, 24) for prompt in PROMPTS))
            )
            return tokens, ffn._ranks

    tokens, ranks = run(scenario())
    assert tokens == reference
    assert [rank.returncode for rank in ranks] == [0]  # told to stop, not killed


def test_expert_parallel_ranks_wait_out_an_idle_worker(model: MoEDecoder) -> None:
    """The layer numbers go over a control group that waits a week, so an FFN worker idle
    for longer than a collective's timeout (1 s here) keeps its other rank."""
    import torch.distributed as dist

    from kleave.devcluster.processes import free_ports
    from kleave.workers.serve.ep_ffn import build_rank, start_expert_ranks
    from kleave.workers.serve.ranks import RankArgs, reap

    args = RankArgs(
        rank=0,
        world=2,
        port=free_ports(1)[0],
        config=CONFIG.to_dict(),
        seed=0,
        weights=None,
        device="cpu",
        torch_threads=1,
        op_timeout_s=1.0,
    )
    children = start_expert_ranks(args)
    try:
        ep = build_rank(args)
        h = torch.randn(5, CONFIG.hidden_size, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ep.ffn(0, h), model.ffn(0, h), rtol=0, atol=1e-5)
        time.sleep(2.5)
        assert [child.poll() for child in children] == [None]
        torch.testing.assert_close(ep.ffn(1, h), model.ffn(1, h), rtol=0, atol=1e-5)
        ep.stop()
        reap(children)
        assert [child.returncode for child in children] == [0]
    finally:
        for child in children:
            child.kill()
        reap(children)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_sampling_error_fails_its_request_and_not_the_engine(
    model: MoEDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first token is sampled after the last prefill chunk; if sampling raises (NaN
    logits, say), that request gets a 502 and the engine serves the next one."""

    def failing_sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
        if params.seed == 13:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample(logits, params, index)

    monkeypatch.setattr(engine_module, "sample", failing_sample)

    async def scenario() -> tuple[Any, Any, Engine]:
        engine, _ = make_engine(model, 64)
        engine.start()
        try:

            async def last_event(request_id: str, seed: int) -> Any:
                params = SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=(), seed=seed)
                async for event in engine.submit(request_id, PROMPTS[1], params):
                    if not isinstance(event, TokenEvent):
                        return event
                raise AssertionError("no final event")

            bad = await last_event("bad", 13)
            assert engine.cache.free_blocks == engine.cache.num_blocks  # its block is back
            return bad, await last_event("good", 1), engine
        finally:
            await engine.stop()

    bad, good, engine = run(scenario())
    assert isinstance(bad, ErrorEvent) and bad.status == 502 and "inf, nan" in bad.message
    assert isinstance(good, FinishEvent) and engine.failure is None
