"""Multi-turn chat through PD with and without decode-side prefix reuse.

`CONVERSATIONS` chat sessions run at once through a real PD data plane (one process per
worker, as `kleave workers up`): every conversation starts with the same `SYSTEM`-token system
prompt, and each of its `TURNS` turns appends the previous answer and `USER` new tokens, so a
turn's prompt is the last turn's prompt plus a little. With reuse on, a decode worker holds
what its paged cache has of each prompt and the prefill worker sends the K/V of the rest
only; off (`--no-prefix-caching` on the decode workers), every prompt's whole K/V crosses.
Measured: KV bytes the decode workers received (their `kleave:kv_transfer_bytes`), TTFT and
output tokens/s at the client, in one run; both runs must give the same tokens (greedy), or
the benchmark fails.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.workers_cpu import stream_completion
from kleave.workers.serve.local import LocalDataPlane

MODEL = os.environ.get("KLEAVE_BENCH_MODEL", "tiny")
DEVICE = os.environ.get("KLEAVE_BENCH_DEVICE", "cpu")
CONVERSATIONS = int(os.environ.get("KLEAVE_BENCH_CONVERSATIONS", "8"))
TURNS = int(os.environ.get("KLEAVE_BENCH_TURNS", "4"))
SYSTEM = int(os.environ.get("KLEAVE_BENCH_SYSTEM", "256"))
USER = int(os.environ.get("KLEAVE_BENCH_USER", "32"))
OSL = int(os.environ.get("KLEAVE_BENCH_OSL", "32"))
DECODE_WORKERS = int(os.environ.get("KLEAVE_BENCH_DECODE_WORKERS", "2"))
SETTINGS = {"reuse on": (), "reuse off": ("--no-prefix-caching",)}


@dataclass(frozen=True)
class Outcome:
    setting: str
    requests: int
    kv_bytes: float
    ttft: list[float]
    tokens_per_s: float
    answers: list[list[list[int]]]  # per conversation, per turn


def _tokens(seed: int, count: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 250, (count,), generator=g).tolist()


async def _turn(
    session: aiohttp.ClientSession, url: str, prompt: list[int]
) -> tuple[list[int], float]:
    answer, ttft, _ = await stream_completion(session, url, MODEL, prompt, OSL)
    return answer, ttft


async def _conversation(
    session: aiohttp.ClientSession, url: str, index: int, system: list[int]
) -> tuple[list[list[int]], list[float]]:
    prompt = list(system)
    answers, ttfts = [], []
    for turn in range(TURNS):
        prompt += _tokens(1000 * index + turn + 1, USER)
        answer, ttft = await _turn(session, url, prompt)
        answers.append(answer)
        ttfts.append(ttft)
        prompt += answer
    return answers, ttfts


async def _kv_bytes(session: aiohttp.ClientSession, urls: list[str]) -> float:
    total = 0.0
    for url in urls:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "kleave:kv_transfer_bytes_total":
                    total += sample.value
    return total


async def _load(url: str, decode_urls: list[str], setting: str) -> Outcome:
    system = _tokens(0, SYSTEM)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _turn(session, url, _tokens(99, SYSTEM))  # warm-up: connections, first steps
        before = await _kv_bytes(session, decode_urls)
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_conversation(session, url, i, system) for i in range(CONVERSATIONS))
        )
        elapsed = time.perf_counter() - started
        sent = await _kv_bytes(session, decode_urls) - before
    ttft = [t for _, ttfts in results for t in ttfts]
    answers = [answers for answers, _ in results]
    return Outcome(setting, len(ttft), sent, ttft, CONVERSATIONS * TURNS * OSL / elapsed, answers)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _table(outcomes: list[Outcome]) -> str:
    off = next(o for o in outcomes if o.setting == "reuse off")
    lines = [
        f"Model `{MODEL}` on {DEVICE} ({os.cpu_count()} CPUs, {platform.machine()}), torch "
        f"{torch.__version__}; PD with 1 prefill and {DECODE_WORKERS} decode workers; "
        f"{CONVERSATIONS} conversations at once, {TURNS} turns each: a {SYSTEM}-token shared "
        f"system prompt, {USER} new tokens and {OSL} output tokens per turn (greedy). Both "
        "settings gave the same tokens.",
        "",
        "| decode prefix reuse | requests | KV received | per request | vs off | TTFT p50 "
        "| TTFT p90 | output tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.setting.removeprefix('reuse ')} | {o.requests} | {o.kv_bytes / 1e6:.2f} MB | "
            f"{o.kv_bytes / o.requests / 1e3:.1f} KB | {o.kv_bytes / off.kv_bytes:.2f} | "
            f"{statistics.median(o.ttft) * 1e3:.1f} ms | {_quantile(o.ttft, 0.9) * 1e3:.1f} ms | "
            f"{o.tokens_per_s:.0f} |"
        )
    return "\n".join(lines)


def main() -> str:
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="kleave-bench-decode-prefix-") as tmp:
        for setting, decode_args in SETTINGS.items():
            plane = LocalDataPlane(
                topology="PD",
                state_dir=Path(tmp) / setting.replace(" ", "-"),
                model=MODEL,
                counts={"prefill": 1, "decode": DECODE_WORKERS},
                device=DEVICE,
                role_args={"decode": decode_args},
            )
            plane.start()
            try:
                decode_urls = [worker.url for worker in plane.workers("decode")]
                outcomes.append(asyncio.run(_load(plane.url, decode_urls, setting)))
            finally:
                plane.stop()
    if outcomes[0].answers != outcomes[1].answers:
        raise RuntimeError("decode prefix reuse changed the generated tokens")
    return _table(outcomes)


if __name__ == "__main__":
    print(main())
