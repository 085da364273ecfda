"""A decode worker's prefix cache in PD: received prompts are cached, and a prefix the decode
worker holds is not sent again (the router asks it to hold the prefix, the prefill worker
sends the K/V after it). Every scenario checks generate_greedy's exact tokens and that no
block stays pinned afterwards.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from kleave.workers.config import MODEL_PRESETS
from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.model import MoEDecoder, generate_greedy
from kleave.workers.serve.decode_server import DecodeServer
from kleave.workers.serve.engine import Engine, RejectedRequestError, TokenEvent
from kleave.workers.serve.http import ApiError
from kleave.workers.serve.prefill_server import PrefillServer
from kleave.workers.serve.prefix_holds import PrefixHolds
from kleave.workers.serve.sampling import SamplingParams
from kleave.workers.tokenizer import BOS
from test_workers_serve import completion_tokens, make_engine, plane, post, run

CONFIG = MODEL_PRESETS["tiny"]
SYSTEM = [BOS, *b"You are kleave's test assistant; answer briefly."]  # 50 tokens: 3 full blocks
QUESTIONS = [SYSTEM + list(b"What is PD?"), SYSTEM + list(b"And PDAF?"), SYSTEM + list(b"PD?")]
LABELS = {"model_name": "tiny", "engine": "0"}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=())


@pytest.fixture(scope="module")
def tiny() -> MoEDecoder:
    return MoEDecoder(CONFIG, seed=0)


def whole_kv(model: MoEDecoder, prompt: list[int]) -> tuple[int, list[tuple[Any, Any]]]:
    """What a prefill worker computes: (first greedy token, every layer's K/V)."""
    logits, kv = model.prefill(torch.tensor(prompt, dtype=torch.long))
    return int(logits.argmax()), kv


async def settled(engine: Engine) -> None:
    """Wait for the loop to free what finished (it reaps at its next iteration)."""
    for _ in range(200):
        if engine.cache.free_blocks == engine.cache.num_blocks and not engine.holds.work:
            return
        await asyncio.sleep(0.01)


async def tokens_of(stream: Any) -> list[int]:
    return [event.token async for event in stream if isinstance(event, TokenEvent)]


# ----- the bookkeeping, on a cache alone ----------------------------------------------------
def test_a_hold_pins_its_blocks_until_released_or_expired() -> None:
    async def scenario() -> None:
        cache = PagedKVCache(CONFIG, num_blocks=4, block_size=16)
        cache.allocate(0, 40)
        zeros = torch.zeros(40, CONFIG.num_kv_heads, CONFIG.head_dim)
        for layer in range(CONFIG.num_layers):
            cache.write(0, layer, 0, zeros, zeros)
        cache.register(0, QUESTIONS[0][:40])  # two full blocks reusable
        cache.free(0)
        ids = iter(range(1, 100))
        holds = PrefixHolds()
        first = holds.ask("a", QUESTIONS[0], ttl_s=10.0)
        second = holds.ask("b", QUESTIONS[1], ttl_s=1.0)
        nothing = holds.ask("c", [BOS, *b"unrelated prompt, nothing cached"], ttl_s=10.0)
        early = holds.ask("d", QUESTIONS[2], ttl_s=10.0)
        assert holds.release("d")  # released before the loop made it: never pinned
        holds.apply(cache, lambda: next(ids), now=0.0)
        assert (first.result(), second.result(), nothing.result(), early.result()) == (32, 32, 0, 0)
        assert len(holds) == 2 and "a" in holds and "c" not in holds
        # pinned: a sequence that needs every block cannot have the held ones
        assert not cache.can_allocate(4 * 16)
        holds.apply(cache, lambda: next(ids), now=5.0)  # "b" expired
        assert "b" not in holds and not cache.can_allocate(4 * 16)
        assert holds.release("a") and not holds.release("a")
        holds.apply(cache, lambda: next(ids), now=5.0)
        assert len(holds) == 0 and cache.free_blocks == 4 and cache.cached_blocks == 2

    asyncio.run(scenario())


# ----- the engine -----------------------------------------------------------------------------
def test_received_kv_is_cached_and_a_held_prefix_is_not_received_again(
    tiny: MoEDecoder,
) -> None:
    """The first request arrives with its whole K/V; the next ones hold the 48 tokens of the
    system prompt's blocks and arrive with the K/V after them; all decode exactly."""
    expected = [generate_greedy(tiny, prompt, 10) for prompt in QUESTIONS]

    async def scenario() -> tuple[list[list[int]], list[int], Engine, float]:
        engine, metrics = make_engine(tiny, 32)
        engine.start()
        try:
            outputs, held = [], []
            for index, prompt in enumerate(QUESTIONS):
                cached = await engine.hold_prefix(f"r{index}", prompt, ttl_s=30.0)
                hold = engine.holds.take(f"r{index}")
                first, kv = whole_kv(tiny, prompt)
                tail = [(k[cached:], v[cached:]) for k, v in kv]
                stream = engine.submit(
                    f"r{index}",
                    prompt,
                    GREEDY,
                    first_token=first,
                    kv=tail,
                    kv_start=cached,
                    hold=hold,
                )
                outputs.append(await tokens_of(stream))
                held.append(cached)
            hits = metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", LABELS)
            await settled(engine)
            return outputs, held, engine, hits or 0.0
        finally:
            await engine.stop()

    outputs, held, engine, hits = run(scenario())
    assert outputs == expected
    assert held == [0, 48, 48] and hits == 96.0
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_kv_that_does_not_start_where_the_hold_ends_is_refused_and_unpins(
    tiny: MoEDecoder,
) -> None:
    async def scenario() -> Engine:
        engine, _ = make_engine(tiny, 32)
        engine.start()
        try:
            first, kv = whole_kv(tiny, QUESTIONS[0])
            await tokens_of(engine.submit("a", QUESTIONS[0], GREEDY, first_token=first, kv=kv))
            assert await engine.hold_prefix("b", QUESTIONS[1], ttl_s=30.0) == 48
            with pytest.raises(RejectedRequestError, match=r"start at token 0, but .* holds 48"):
                engine.submit(
                    "b", QUESTIONS[1], GREEDY, first_token=first, kv=kv, hold=engine.holds.take("b")
                )
            assert await engine.hold_prefix("c", QUESTIONS[1], ttl_s=30.0) == 48
            with pytest.raises(RejectedRequestError, match="already running or held"):
                await engine.hold_prefix("c", QUESTIONS[1], ttl_s=30.0)
            assert engine.release_hold("c")
            await settled(engine)
            return engine
        finally:
            await engine.stop()

    engine = run(scenario())
    assert engine.cache.free_blocks == engine.cache.num_blocks and len(engine.holds) == 0


def test_a_hold_nobody_takes_ends_at_its_ttl(tiny: MoEDecoder) -> None:
    async def scenario() -> tuple[int, Engine]:
        engine, _ = make_engine(tiny, 32)
        engine.start()
        try:
            first, kv = whole_kv(tiny, QUESTIONS[0])
            await tokens_of(engine.submit("a", QUESTIONS[0], GREEDY, first_token=first, kv=kv))
            held = await engine.hold_prefix("b", QUESTIONS[1], ttl_s=0.2)
            assert len(engine.holds) == 1
            await asyncio.sleep(0.3)
            await engine.hold_prefix("wake", [BOS, *b"any other prompt at all"], ttl_s=1.0)
            await settled(engine)
            return held, engine
        finally:
            await engine.stop()

    held, engine = run(scenario())
    assert held == 48 and len(engine.holds) == 0
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_blocks_needed_now_unpin_holds_and_their_requests_recompute_exactly(
    tiny: MoEDecoder,
) -> None:
    """8 blocks: "b" holds 3 of them, then "c" needs all 8 with nothing running. "c" runs
    (the hold is dropped, not waited out), and "b"'s K/V tail, arriving after, no longer
    has its prefix: "b" is recomputed and still gets generate_greedy's tokens."""
    long_prompt = [BOS, *range(1, 100)]
    expected = generate_greedy(tiny, QUESTIONS[1], 10)

    async def scenario() -> tuple[list[int], int, Engine]:
        engine, _ = make_engine(tiny, 8)
        engine.start()
        try:
            first, kv = whole_kv(tiny, QUESTIONS[0])
            await tokens_of(engine.submit("a", QUESTIONS[0], GREEDY, first_token=first, kv=kv))
            held = await engine.hold_prefix("b", QUESTIONS[1], ttl_s=3600.0)
            params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=())
            out = await asyncio.wait_for(
                tokens_of(engine.submit("c", long_prompt, params)), timeout=30.0
            )
            assert len(out) == 20 and len(engine.holds) == 0
            first, kv = whole_kv(tiny, QUESTIONS[1])
            tail = [(k[held:], v[held:]) for k, v in kv]
            hold = engine.holds.take("b")
            stream = engine.submit(
                "b", QUESTIONS[1], GREEDY, first_token=first, kv=tail, kv_start=held, hold=hold
            )
            tokens = await tokens_of(stream)
            await settled(engine)
            return tokens, held, engine
        finally:
            await engine.stop()

    tokens, held, engine = run(scenario())
    assert held == 48 and tokens == expected
    assert engine.cache.free_blocks == engine.cache.num_blocks


# ----- PD servers on real sockets -------------------------------------------------------------
def kv_bytes(server: PrefillServer | DecodeServer) -> float:
    value = server.metrics.registry.get_sample_value("kleave:kv_transfer_bytes_total", LABELS)
    return value or 0.0


@pytest.mark.parametrize("decode_prefix_caching", [True, False])
def test_pd_sends_only_what_the_decode_worker_lacks(
    tiny: MoEDecoder, decode_prefix_caching: bool
) -> None:
    """Three prompts sharing a system prompt through the router: the decode worker holds the
    system prompt's 3 blocks after the first, so the next two send the K/V of their own
    tokens only; without prefix caching on the decode worker every token is sent."""
    expected = [generate_greedy(tiny, prompt, 12) for prompt in QUESTIONS]
    per_token = 2 * CONFIG.num_layers * CONFIG.num_kv_heads * CONFIG.head_dim * 4  # float32

    async def scenario() -> tuple[list[list[int]], list[float], float]:
        async with plane("PD") as p:
            (decode_url,) = p.workers["decode"]
            decode = p.servers[decode_url]
            assert isinstance(decode, DecodeServer) and decode.engine is not None
            decode.engine.prefix_caching = decode_prefix_caching
            await p.routing.refresh()  # the router learns whether it caches prefixes
            sent: list[float] = []
            tokens: list[list[int]] = []
            for prompt in QUESTIONS:
                before = kv_bytes(decode)
                tokens.append(await completion_tokens(p, prompt, 12))
                sent.append((kv_bytes(decode) - before) / per_token)
            hits = decode.metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", LABELS)
            assert len(decode.engine.holds) == 0
            return tokens, sent, hits or 0.0

    tokens, sent, hits = run(scenario())
    assert tokens == expected
    lengths = [len(prompt) for prompt in QUESTIONS]
    if decode_prefix_caching:
        assert sent == [lengths[0], lengths[1] - 48, lengths[2] - 48]
        assert hits == 96.0
    else:
        assert sent == lengths and hits == 0.0


def test_a_failed_prefill_releases_the_hold_it_made() -> None:
    """The prefill worker refuses the request after the decode worker held its prefix: the
    router releases the hold at once instead of leaving the blocks pinned for its ttl."""

    async def scenario() -> DecodeServer:
        async with plane("PD") as p:
            (decode_url,) = p.workers["decode"]
            decode = p.servers[decode_url]
            assert isinstance(decode, DecodeServer) and decode.engine is not None
            await completion_tokens(p, QUESTIONS[0], 4)
            (prefill_url,) = p.workers["prefill"]
            prefill = p.servers[prefill_url]
            assert isinstance(prefill, PrefillServer)

            async def broken(*_: Any, **__: Any) -> Any:
                raise ApiError(500, "the prefill broke")

            prefill._run = broken  # type: ignore[method-assign]
            queries = decode.metrics.registry.get_sample_value(
                "vllm:prefix_cache_queries_total", LABELS
            )
            body = {"model": "tiny", "prompt": QUESTIONS[1], "max_tokens": 4}
            status, answer = await post(p.session, f"{p.router}/v1/completions", body)
            assert status == 502 and "the prefill broke" in answer["error"]["message"], answer
            after = decode.metrics.registry.get_sample_value(
                "vllm:prefix_cache_queries_total", LABELS
            )
            assert after == (queries or 0.0) + len(QUESTIONS[1])  # the hold was made
            for _ in range(100):
                if len(decode.engine.holds) == 0:
                    break
                await asyncio.sleep(0.02)
            return decode

    decode = run(scenario())
    assert decode.engine is not None and len(decode.engine.holds) == 0


def test_hold_requests_with_bad_fields_are_refused_naming_them() -> None:
    async def scenario() -> list[tuple[int, Any]]:
        async with plane("PD") as p:
            (decode_url,) = p.workers["decode"]
            bodies: list[dict[str, Any]] = [
                {"prompt_tokens": QUESTIONS[0]},
                {"request_id": "x", "prompt_tokens": []},
                {"request_id": "x", "prompt_tokens": QUESTIONS[0], "ttl_s": 0},
                {"request_id": "x", "prompt_tokens": QUESTIONS[0], "ttl_s": 1e9},
            ]
            answers = [await post(p.session, f"{decode_url}/v1/kv/hold", b) for b in bodies]
            (prefill_url,) = p.workers["prefill"]
            body = {
                "request_id": "y",
                "prompt_tokens": QUESTIONS[0],
                "decode": "127.0.0.1:1",
                "decode_cached_tokens": len(QUESTIONS[0]),
            }
            answers.append(await post(p.session, f"{prefill_url}/v1/prefill", body))
            return answers

    answers = run(scenario())
    params = [answer["error"]["param"] for _, answer in answers]
    assert [status for status, _ in answers] == [400] * 5
    assert params == ["request_id", "prompt_tokens", "ttl_s", "ttl_s", "decode_cached_tokens"]


def test_a_tensor_parallel_decode_worker_holds_prefixes_exactly(tiny: MoEDecoder) -> None:
    """The decode worker over two ranks: the held blocks are rank 0's tables, which its
    follower adopts with the request; the tail lands after them on every rank."""
    expected = [generate_greedy(tiny, prompt, 12) for prompt in QUESTIONS]

    async def scenario() -> tuple[list[list[int]], float]:
        async with plane("PD", tensor_parallel={"decode": 2}) as p:
            (decode_url,) = p.workers["decode"]
            decode = p.servers[decode_url]
            assert isinstance(decode, DecodeServer)
            tokens = [await completion_tokens(p, prompt, 12) for prompt in QUESTIONS]
            hits = decode.metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", LABELS)
            return tokens, hits or 0.0

    tokens, hits = run(scenario())
    assert tokens == expected and hits == 96.0
