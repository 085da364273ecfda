"""Prefill with and without the prefix cache: a shared system prompt, then new questions.

One `small` (about 1B parameters) or `tiny` model in this process, one torch thread (as a
worker runs). Each request is a `SYSTEM`-token shared prefix plus `QUESTION` tokens of its
own; we time `prefill_jobs` as the prefill worker runs it (with a KV sender that drops
the bytes, so only the model and the cache are measured), median over the requests after
the first, cache on vs off, in the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import torch

from kleave.workers.config import MODEL_PRESETS
from kleave.workers.model import MoEDecoder
from kleave.workers.prefix_cache import PrefixCache
from kleave.workers.serve.prefill_batch import PrefillJob, prefill_jobs

PRESET = os.environ.get("KLEAVE_BENCH_PREFIX_MODEL", "small")
SYSTEM = int(os.environ.get("KLEAVE_BENCH_PREFIX_SYSTEM", "448"))
QUESTION = int(os.environ.get("KLEAVE_BENCH_PREFIX_QUESTION", "64"))
REQUESTS = int(os.environ.get("KLEAVE_BENCH_PREFIX_REQUESTS", "5"))


class DroppingSender:
    """Stands in for KVSender.send_layer: the transfer is measured in bench kv."""

    def send_layer(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        del request_id, layer, k, v


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    system = torch.randint(0, vocab, (SYSTEM,), generator=g).tolist()
    return [
        system + torch.randint(0, vocab, (QUESTION,), generator=g).tolist()
        for _ in range(REQUESTS + 1)
    ]


def _run(model: MoEDecoder, prompts: list[list[int]], cache: PrefixCache | None) -> dict[str, Any]:
    times, cached = [], []
    sender: Any = DroppingSender()
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        job = PrefillJob(f"r{i}", prompt, sender)
        prefill_jobs(model, [job], cache)
        hit = job.cached
        if i:
            times.append(time.perf_counter() - start)
            cached.append(hit)
    return {"ms": statistics.median(times) * 1e3, "cached": statistics.median(cached)}


def main() -> str:
    torch.set_num_threads(1)
    config = MODEL_PRESETS[PRESET]
    model = MoEDecoder(config, seed=0)
    prompts = _prompts(config.vocab_size)
    off = _run(model, prompts, None)
    on = _run(model, prompts, PrefixCache(block_size=16, capacity_bytes=64 << 20))
    lines = [
        f"Prefill of `{PRESET}` ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
        f"parameters), {SYSTEM} shared + {QUESTION} own tokens per prompt, one torch thread, "
        f"{os.cpu_count()} CPUs ({platform.machine()}); median of {REQUESTS} requests after "
        "the first.",
        "",
        "| prefix cache | tokens reused | prefill ms | speedup |",
        "|---|---:|---:|---:|",
        f"| off | 0 | {off['ms']:.1f} | 1.00x |",
        f"| on (64 MiB) | {on['cached']:.0f} | {on['ms']:.1f} | {off['ms'] / on['ms']:.2f}x |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
