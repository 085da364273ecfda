"""The bundled workers on this machine's CPUs: Colocated vs PD vs PDAF (and Colocated with its
layers split over two processes by tensor parallelism), tiny model.

Each topology runs as `kleave workers up` would (one process per worker, plus the router) and
gets the same load through the router's OpenAI streaming API: `concurrency` clients, each
sending requests of `ISL` prompt tokens and exactly `OSL` output tokens (greedy, EOS ignored).
Measured at the client: output tokens/s over the whole run, TTFT (request sent -> first token
chunk) and TPOT ((last - first token time) / (tokens - 1)). Ratios are to Colocated at the
same concurrency, measured in the same run.

What it shows on a small CPU box: disaggregation pays off where prefill and decode contend for
one GPU; here every process shares a few cores and the tiny model's compute is microseconds,
so the extra hops (KV transfer, one activation round trip per layer in PDAF, two all-reduces
per layer in TP2) are the cost.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch

from kleave.workers.serve.local import LocalDataPlane

# name -> (topology, workers per pool, every worker's extra arguments)
SETUPS: dict[str, tuple[str, dict[str, int], tuple[str, ...]]] = {
    "Colocated": ("Colocated", {"decode": 1}, ()),
    "PD": ("PD", {"prefill": 1, "decode": 1}, ()),
    "PDAF": ("PDAF", {"prefill": 1, "attention": 1, "ffn": 1}, ()),
    "Colocated TP2": ("Colocated", {"decode": 1}, ("--tensor-parallel", "2")),
}
ISL = int(os.environ.get("KLEAVE_BENCH_ISL", "64"))
OSL = int(os.environ.get("KLEAVE_BENCH_OSL", "64"))
CONCURRENCY = tuple(int(c) for c in os.environ.get("KLEAVE_BENCH_CONCURRENCY", "1,8").split(","))
REQUESTS_PER_CLIENT = int(os.environ.get("KLEAVE_BENCH_REQUESTS", "4"))
# The same load on a GPU (bench/gpu.sh): KLEAVE_BENCH_MODEL=small KLEAVE_BENCH_DEVICE=cuda.
MODEL = os.environ.get("KLEAVE_BENCH_MODEL", "tiny")
DEVICE = os.environ.get("KLEAVE_BENCH_DEVICE", "cpu")
KV_BACKEND = os.environ.get("KLEAVE_BENCH_KV_BACKEND", "auto")
ONLY = [t for t in os.environ.get("KLEAVE_BENCH_TOPOLOGIES", "").split(",") if t]


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    tpot_s: float
    tokens: int


@dataclass(frozen=True)
class Run:
    topology: str
    concurrency: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p90: float
    tpot_p50: float
    tpot_p90: float
    requests: int


def _prompt(client: int, index: int) -> list[int]:
    # Different prompts per request, so no two requests share a prefix by accident.
    return [(7 * client + 13 * index + 31 * i) % 256 for i in range(ISL)]


async def stream_completion(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int
) -> tuple[list[int], float, float]:
    """Exactly `max_tokens` greedy tokens streamed through the router's completions API;
    -> (tokens, seconds to the first, seconds to the last), from the request's sending."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    sent = time.perf_counter()
    first = last = 0.0
    tokens: list[int] = []
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            got = [t for c in chunk["choices"] for t in c.get("token_ids", [])]
            if got:
                last = time.perf_counter()
                first = first or last
                tokens += got
    if len(tokens) != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, streamed {len(tokens)}")
    return tokens, first - sent, last - sent


async def _request(session: aiohttp.ClientSession, url: str, prompt: list[int]) -> Sample:
    tokens, first, last = await stream_completion(session, url, MODEL, prompt, OSL)
    return Sample(first, (last - first) / max(1, len(tokens) - 1), len(tokens))


async def _load(url: str, concurrency: int) -> tuple[list[Sample], float]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _request(session, url, _prompt(999, 0))  # warm-up: connections, first step

        async def client(index: int) -> list[Sample]:
            return [
                await _request(session, url, _prompt(index, r)) for r in range(REQUESTS_PER_CLIENT)
            ]

        started = time.perf_counter()
        results = await asyncio.gather(*(client(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return [s for samples in results for s in samples], elapsed


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _run(topology: str, concurrency: int, url: str) -> Run:
    samples, elapsed = asyncio.run(_load(url, concurrency))
    ttft = [s.ttft_s for s in samples]
    tpot = [s.tpot_s for s in samples]
    return Run(
        topology,
        concurrency,
        sum(s.tokens for s in samples) / elapsed,
        statistics.median(ttft),
        _quantile(ttft, 0.9),
        statistics.median(tpot),
        _quantile(tpot, 0.9),
        len(samples),
    )


def _table(runs: list[Run]) -> str:
    base = {r.concurrency: r for r in runs if r.topology == "Colocated"}
    where = (
        f"{os.cpu_count()} CPUs ({platform.machine()})"
        if DEVICE == "cpu"
        else f"{torch.cuda.get_device_name()} shared by every worker"
    )
    lines = [
        f"Model `{MODEL}` ({ISL} prompt + {OSL} output tokens, greedy), {where}, torch "
        f"{torch.__version__}, one thread per process, KV backend {KV_BACKEND}; "
        f"{REQUESTS_PER_CLIENT} requests per client.",
        "",
        "| topology | clients | output tok/s | vs Colocated | TTFT p50 | TTFT p90 | TPOT p50 "
        "| TPOT p90 | TPOT vs Colocated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        b = base.get(r.concurrency)  # absent when KLEAVE_BENCH_TOPOLOGIES leaves it out
        tokens_ratio = f"{r.tokens_per_s / b.tokens_per_s:.2f}" if b else "-"
        tpot_ratio = f"{r.tpot_p50 / b.tpot_p50:.2f}" if b else "-"
        lines.append(
            f"| {r.topology} | {r.concurrency} | {r.tokens_per_s:.0f} | {tokens_ratio} | "
            f"{r.ttft_p50 * 1e3:.1f} ms | {r.ttft_p90 * 1e3:.1f} ms | "
            f"{r.tpot_p50 * 1e3:.2f} ms | {r.tpot_p90 * 1e3:.2f} ms | {tpot_ratio} |"
        )
    return "\n".join(lines)


def main() -> str:
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="kleave-bench-workers-") as tmp:
        for name, (topology, counts, worker_args) in SETUPS.items():
            if ONLY and name not in ONLY:
                continue
            plane = LocalDataPlane(
                topology=topology,
                state_dir=Path(tmp) / name.replace(" ", "-"),
                model=MODEL,
                counts=counts,
                kv_backend=KV_BACKEND,
                device=DEVICE,
                worker_args=worker_args,
            )
            plane.start()
            try:
                runs += [_run(name, c, plane.url) for c in CONCURRENCY]
            finally:
                plane.stop()
    runs.sort(key=lambda r: (r.concurrency, list(SETUPS).index(r.topology)))
    return _table(runs)


if __name__ == "__main__":
    print(main())
