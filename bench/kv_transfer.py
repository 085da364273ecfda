"""KV transfer between two processes on this host: tcp, the shared-memory ring (shm), gloo.

Each row is one request's whole prefill -> decode transfer (8 layers of K and V adding up to
the size), median of 5, with and without the per-tensor SHA-256 the workers send by default.
Ratios: to one host memcpy of the same bytes and to tcp with the same checksum setting, all
measured in this run (kleave.workers.bench_kv says how); one torch thread per process.
"""

from __future__ import annotations

import os
import platform

import torch

from kleave.workers.bench_kv import KVRun, copy_gbps, measure
from kleave.workers.transport.kv_transfer import DEFAULT_ARENA_BYTES

SIZES_MB = tuple(int(s) for s in os.environ.get("KLEAVE_BENCH_KV_MB", "1,16,64,256").split(","))
BACKENDS = ("tcp", "shm", "gloo")


def _table(runs: list[KVRun]) -> str:
    tcp = {(r.size_bytes, r.checksum): r for r in runs if r.backend == "tcp"}
    lines = [
        f"KV transfer between two processes, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"torch {torch.__version__}; shm ring {DEFAULT_ARENA_BYTES >> 20} MiB per connection "
        "(the default).",
        "",
        "| size | backend | SHA-256 | ms | GB/s | vs memcpy | vs tcp |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        base = tcp[(r.size_bytes, r.checksum)]
        lines.append(
            f"| {r.size_bytes >> 20} MiB | {r.backend} | {'on' if r.checksum else 'off'} | "
            f"{r.seconds * 1e3:.1f} | {r.gbps:.2f} | {r.vs_copy:.2f} | "
            f"{base.seconds / r.seconds:.2f}x |"
        )
    return "\n".join(lines)


def main() -> str:
    torch.set_num_threads(1)  # the receiver, as a decode worker of `kleave workers up` runs
    runs: list[KVRun] = []
    for size_mb in SIZES_MB:
        size = size_mb << 20
        baseline = copy_gbps(size, "cpu", repeats=5)
        for checksum in (True, False):
            for backend in BACKENDS:
                runs.append(measure(backend, size, checksum=checksum, baseline_gbps=baseline))
    return _table(runs)


if __name__ == "__main__":
    print(main())
