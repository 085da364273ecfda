"""Prefill of several prompts one by one vs in one batched pass (`prefill_jobs`).

The prefill worker's compute alone, in this process with one torch thread (as a worker
runs), its KV senders replaced by ones that drop the bytes (the transfer is `bench kv`):
`BATCH` prompts of `PROMPT` tokens each, prefilled one after the other and then together,
median of `REPEATS` runs each, same run. On a GPU the gain is larger: there one short prompt
leaves the device mostly idle.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from bench.prefix_cache import DroppingSender
from kleave.workers.config import MODEL_PRESETS
from kleave.workers.model import MoEDecoder
from kleave.workers.serve.prefill_batch import PrefillJob, prefill_jobs

PRESETS = os.environ.get("KLEAVE_BENCH_BATCH_MODELS", "tiny,small").split(",")
PROMPT = int(os.environ.get("KLEAVE_BENCH_BATCH_PROMPT", "64"))
BATCHES = tuple(int(b) for b in os.environ.get("KLEAVE_BENCH_BATCH_SIZES", "4,16").split(","))
REPEATS = int(os.environ.get("KLEAVE_BENCH_BATCH_REPEATS", "3"))


def _jobs(batch: int, vocab: int) -> list[PrefillJob]:
    g = torch.Generator().manual_seed(batch)
    return [
        PrefillJob(
            f"r{i}", torch.randint(1, vocab, (PROMPT,), generator=g).tolist(), DroppingSender()
        )
        for i in range(batch)
    ]


def _seconds(model: MoEDecoder, batch: int, together: bool) -> float:
    times = []
    for _ in range(REPEATS):
        jobs = _jobs(batch, model.config.vocab_size)
        start = time.perf_counter()
        if together:
            prefill_jobs(model, jobs, None)
        else:
            for job in jobs:
                prefill_jobs(model, [job], None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> str:
    torch.set_num_threads(1)
    lines = [
        f"Prefill of `{PROMPT}`-token prompts, one torch thread, {os.cpu_count()} CPUs "
        f"({platform.machine()}), torch {torch.__version__}; median of {REPEATS} runs.",
        "",
        "| model | prompts | one by one | batched | speedup | batched prompt tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for preset in PRESETS:
        model = MoEDecoder(MODEL_PRESETS[preset], seed=0)
        _seconds(model, 2, together=True)  # warm-up
        for batch in BATCHES:
            alone, together = _seconds(model, batch, False), _seconds(model, batch, True)
            lines.append(
                f"| {preset} | {batch} | {alone * 1e3:.1f} ms | {together * 1e3:.1f} ms | "
                f"{alone / together:.2f}x | {batch * PROMPT / together:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
