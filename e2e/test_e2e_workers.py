"""The data plane as separate processes: `kleave workers serve` per worker, the router, the real
`openai` client, a real Prometheus, and a worker killed mid-request.

Needs torch (the workers extra), the openai package and the prometheus binary (`make
prometheus`), not the Kubernetes cluster. Waits carry generous limits only so a regression
fails instead of hanging; no assertion is about speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import openai
    import torch
else:
    torch = pytest.importorskip("torch")
    openai = pytest.importorskip("openai")

from conftest import wait_for
from kleave.devcluster.prometheus import PrometheusServer, ScrapeTarget
from kleave.planner.metrics import PrometheusReader
from kleave.workers.config import MODEL_PRESETS
from kleave.workers.model import MoEDecoder, generate_greedy
from kleave.workers.serve.local import LocalDataPlane
from kleave.workers.tokenizer import BOS, ByteTokenizer

pytestmark = pytest.mark.e2e

PROMPTS = [
    [BOS, *b"Disaggregated serving"],
    [BOS, *b"ab"],
    [BOS, *b"A prompt longer than one KV block of sixteen tokens"],
]
MAX_TOKENS = 20
TOKENIZER = ByteTokenizer(MODEL_PRESETS["tiny"].vocab_size)


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    model = MoEDecoder(MODEL_PRESETS["tiny"], seed=0)
    return [generate_greedy(model, prompt, MAX_TOKENS) for prompt in PROMPTS]


def start_plane(
    tmp: Path,
    topology: str,
    counts: dict[str, int],
    kv_backend: str = "auto",
    role_args: dict[str, list[str]] | None = None,
) -> LocalDataPlane:
    plane = LocalDataPlane(
        topology=topology,
        state_dir=tmp,
        counts=counts,
        kv_backend=kv_backend,
        role_args=role_args or {},
    )
    plane.start()
    return plane


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDataPlane]:
    plane = start_plane(tmp_path_factory.mktemp("pd"), "PD", {"prefill": 1, "decode": 2})
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def pdaf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDataPlane]:
    counts = {"prefill": 1, "attention": 1, "ffn": 2}
    # PD runs the default (the shared-memory ring on one host), PDAF the socket: both
    # backends between real processes. Each FFN worker splits its experts over two ranks.
    plane = start_plane(
        tmp_path_factory.mktemp("pdaf"),
        "PDAF",
        counts,
        kv_backend="tcp",
        role_args={"ffn": ["--expert-parallel", "2"]},
    )
    yield plane
    plane.stop()


def client(plane: LocalDataPlane) -> Any:
    # No retries: a retried 502 would hide the failure the tests look for.
    return openai.OpenAI(base_url=f"{plane.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_tokens(plane: LocalDataPlane, prompt: list[int]) -> list[int]:
    answer = client(plane).completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert answer.usage.completion_tokens == MAX_TOKENS
    tokens: list[int] = answer.choices[0].model_extra["token_ids"]
    return tokens


def test_pd_processes_generate_exactly_generate_greedys_tokens(
    pd: LocalDataPlane, reference: list[list[int]]
) -> None:
    assert [greedy_tokens(pd, prompt) for prompt in PROMPTS] == reference
    prefill = next(p for p in pd.processes if p.name.startswith("prefill"))
    with urllib.request.urlopen(f"{prefill.url}/v1/info", timeout=10) as response:
        assert json.load(response)["kv_backend"] == "shm"


def counter_total(plane: LocalDataPlane, role: str, name: str) -> float:
    """`name` summed over the role's workers' /metrics."""
    total = 0.0
    for worker in plane.workers(role):
        text = urllib.request.urlopen(f"{worker.url}/metrics", timeout=5).read().decode()
        total += sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))
    return total


def test_a_chats_next_turn_sends_only_the_kv_its_decode_worker_lacks(
    pd: LocalDataPlane, reference: list[list[int]]
) -> None:
    """Turn 2 is turn 1's prompt, its answer and a new question: the router sends it to the
    decode worker that served turn 1, which holds 4 full blocks of it (64 tokens, the answer's
    included), and the prefill worker sends the K/V of the rest only."""
    first = PROMPTS[2]
    assert greedy_tokens(pd, first) == reference[2]
    second = first + reference[2] + list(b" and then?")
    expected = generate_greedy(MoEDecoder(MODEL_PRESETS["tiny"], seed=0), second, MAX_TOKENS)
    hits = counter_total(pd, "decode", "vllm:prefix_cache_hits_total")
    sent = counter_total(pd, "decode", "kleave:kv_transfer_bytes_total")
    assert greedy_tokens(pd, second) == expected
    held = counter_total(pd, "decode", "vllm:prefix_cache_hits_total") - hits
    per_token = MODEL_PRESETS["tiny"].kv_bytes_per_token
    tokens_sent = (counter_total(pd, "decode", "kleave:kv_transfer_bytes_total") - sent) / per_token
    assert held == 64
    assert tokens_sent == len(second) - 64


def test_pdaf_processes_generate_exactly_generate_greedys_tokens(
    pdaf: LocalDataPlane, reference: list[list[int]]
) -> None:
    assert [greedy_tokens(pdaf, prompt) for prompt in PROMPTS] == reference
    prefill = next(p for p in pdaf.processes if p.name.startswith("prefill"))
    with urllib.request.urlopen(f"{prefill.url}/v1/info", timeout=10) as response:
        assert json.load(response)["kv_backend"] == "tcp"
    for ffn in (p for p in pdaf.processes if p.name.startswith("ffn")):
        with urllib.request.urlopen(f"{ffn.url}/v1/info", timeout=10) as response:
            info = json.load(response)
        assert info["expert_parallel"] == 2
        assert info["weights"]["parameters"] == 98_944  # of 148,096: half the routed experts
    attention = pdaf.workers("attention")[0]
    metrics = urllib.request.urlopen(f"{attention.url}/metrics", timeout=5).read().decode()
    exchanges = next(
        line for line in metrics.splitlines() if line.startswith("kleave:af_exchange_seconds_count")
    )
    layers = MODEL_PRESETS["tiny"].num_layers
    assert float(exchanges.split()[-1]) >= layers * (MAX_TOKENS - 1) * len(PROMPTS)


def test_openai_client_streams_a_completion_and_a_chat_completion(
    pd: LocalDataPlane, reference: list[list[int]]
) -> None:
    openai_client = client(pd)
    stream = openai_client.completions.create(
        model="tiny",
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    chunks = list(stream)
    tokens = [t for c in chunks for t in c.choices[0].model_extra.get("token_ids", [])]
    assert tokens == reference[0]
    assert "".join(c.choices[0].text for c in chunks) == TOKENIZER.decode(reference[0])
    assert chunks[-1].choices[0].finish_reason == "length"

    chat = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    parts = list(chat)
    assert parts[0].choices[0].delta.role == "assistant"
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 12
    finished = [c for c in parts if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finished] == ["length"]
    whole = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert whole.choices[0].message.content == text  # greedy: the same answer either way
    models = openai_client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def error_param(error: Any) -> Any:
    body = error.body
    assert isinstance(body, dict), body
    return body.get("param")


def test_bad_requests_get_400_naming_the_field(pd: LocalDataPlane) -> None:
    openai_client = client(pd)
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert error_param(caught.value) == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model="tiny", prompt="x", temperature=7)
    assert error_param(caught.value) == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="tiny", messages=[{"role": "bot"}])
    assert error_param(caught.value) == "messages"
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="gpt-4", prompt="x")


def query(prometheus: PrometheusServer, promql: str) -> list[dict[str, Any]]:
    url = f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        result: list[dict[str, Any]] = json.load(response)["data"]["result"]
        return result


def test_prometheus_scrapes_the_workers_and_the_planner_reads_them(tmp_path: Path) -> None:
    plane = start_plane(tmp_path / "plane", "PD", {"prefill": 1, "decode": 1})
    try:
        targets = [
            ScrapeTarget(
                p.url.removeprefix("http://"),
                job="kleave-workers",
                labels={"kleave_dev_role": p.role, "kleave_dev_inference_deployment": "local"},
            )
            for p in plane.processes
            if p.role != "router"
        ]
        with PrometheusServer(tmp_path / "prometheus", targets, scrape_interval_s=0.5) as prom:
            selector = '{kleave_dev_inference_deployment="local"}'
            promql = f"sum by (kleave_dev_role) (vllm:generation_tokens_total{selector})"

            def by_role(expected: dict[str, float]) -> dict[str, float] | None:
                found = {
                    r["metric"]["kleave_dev_role"]: float(r["value"][1])
                    for r in query(prom, promql)
                }
                return found if found == expected else None

            # The idle workers' zeros first, so the traffic below is an increase to rate().
            wait_for(lambda: by_role({"prefill": 0.0, "decode": 0.0}), 30, "both roles at 0")
            lengths = (5, 9, 13)
            prompt = "count me"
            openai_client = client(plane)
            for max_tokens in lengths:
                openai_client.completions.create(
                    model="tiny",
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
            # The decode worker streams every output token; the prefill worker made each first.
            expected = {"decode": float(sum(lengths)), "prefill": float(len(lengths))}
            wait_for(lambda: by_role(expected), 30, f"generation tokens {expected}")
            success = query(prom, 'sum(vllm:request_success_total{kleave_dev_role="decode"})')
            assert float(success[0]["value"][1]) == len(lengths)

            # The planner's own reader: its means divide rates of different roles' counters,
            # and each target's rate() extrapolates from its own scrape times over a burst of
            # a few seconds, so they are near the truth, not equal to it (the totals above are).
            reader = PrometheusReader(prom.url, 'kleave_dev_inference_deployment="local"')
            load = reader.observe(window_s=60)
            assert load.rate_rps > 0
            assert load.mean_osl == pytest.approx(sum(lengths) / len(lengths), rel=0.5)
            assert load.mean_isl == pytest.approx(len(TOKENIZER.encode(prompt)), rel=0.5)
            assert set(load.running) == {"prefill", "decode"}
            assert load.ttft_mean_s is not None and load.tpot_mean_s is not None
    finally:
        plane.stop()


def test_a_killed_decode_worker_fails_the_request_in_flight(tmp_path: Path) -> None:
    plane = start_plane(tmp_path, "PD", {"prefill": 1, "decode": 1})
    try:
        openai_client = client(plane)
        stream = openai_client.completions.create(
            model="tiny",
            prompt="a long answer",
            max_tokens=3000,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        decode = plane.workers("decode")[0]
        received = 0
        with pytest.raises(openai.APIError) as caught:
            for _ in stream:
                received += 1
                if received == 3:
                    assert decode.pid is not None
                    os.kill(decode.pid, signal.SIGKILL)
        assert received < 3000
        assert decode.url in str(caught.value.message)
        with pytest.raises(openai.APIStatusError) as again:
            openai_client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert again.value.status_code in (502, 503)
        assert decode.url in again.value.message
    finally:
        plane.stop()


def test_kleave_workers_up_serves_and_stops_everything_on_sigterm(
    tmp_path: Path, reference: list[list[int]]
) -> None:
    """PD with every worker's layers split over two processes (tensor parallelism): exact
    tokens, and SIGTERM stops the workers and the ranks they started."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kleave",
            "workers",
            "up",
            "--topology",
            "PD",
            "--tensor-parallel",
            "2",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("router: http://"), line
        url = line.split()[1]
        answer = openai.OpenAI(base_url=url, api_key="unused", max_retries=0).completions.create(
            model="tiny",
            prompt=PROMPTS[2],
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        extra = answer.choices[0].model_extra
        assert extra is not None and extra["token_ids"] == reference[2]
        plan = json.loads((tmp_path / "plan.json").read_text())
        workers = [plan["pools"][role]["urls"][0] for role in ("prefill", "decode")]
        pids = []
        for worker in workers:
            with urllib.request.urlopen(f"{worker}/v1/info", timeout=10) as response:
                ranks = json.load(response)["tensor_parallel"]
            assert ranks["size"] == len(ranks["rank_pids"]) == 2
            pids += ranks["rank_pids"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    for worker in workers:
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{worker}/healthz", timeout=2)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # every rank stopped
