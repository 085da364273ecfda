"""The processes one worker spreads over: rank 0 is the worker, ranks 1..N-1 are its children.

Expert parallelism (``ep_ffn``) and tensor parallelism (``tensor_parallel``) both run one
process per rank (one GPU each on a GPU pod), started by the worker with the same arguments
but their rank, and joined through a ``TCPStore`` rank 0 hosts on the loopback. Children die
with the worker: their next collective fails once its sockets close.

A rank that waits for rank 0's next call waits on a *control* group whose timeout is a week:
an idle worker is not a stalled one, and a dead rank 0 fails the wait at once anyway (its
sockets close). The collectives of a call (``op_timeout_s``) keep a short timeout, so a rank
that stalls mid-call fails it instead of hanging the worker.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = datetime.timedelta(days=7)
FORM_TIMEOUT = datetime.timedelta(minutes=10)  # the ranks import torch and load their shards
OP_TIMEOUT_S = 120.0  # any one collective of a call


@dataclass(frozen=True)
class RankArgs:
    """What a rank process needs: the world and the model (JSON on its command line)."""

    rank: int
    world: int
    port: int
    config: dict[str, Any]
    seed: int
    weights: str | None
    device: str
    torch_threads: int | None
    part: str = "all"  # the model part the worker runs (tensor parallelism shards it)
    cache_blocks: int = 0  # tensor parallelism: the paged cache's blocks (0: no cache)
    block_size: int = 16
    op_timeout_s: float = OP_TIMEOUT_S

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RankArgs:
        return cls(**json.loads(text))

    def for_rank(self, rank: int) -> RankArgs:
        return replace(self, rank=rank)

    @property
    def op_timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.op_timeout_s)


def backend_for(device: str) -> str:
    """The collectives' backend: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: the r-th GPU when the worker's device is ``cuda`` (a pod with N GPUs)."""
    if device == "cuda":
        return f"cuda:{rank}"
    return device


def start_ranks(module: str, args: RankArgs) -> list[subprocess.Popen[bytes]]:
    """Rank 0 starts ranks 1..N-1 as ``python -m module ARGS`` (their logs go to its own)."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", module, args.for_rank(rank).to_json()],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for rank in range(1, args.world)
    ]


def run_rank(argv: list[str] | None, kind: str, body: Callable[[RankArgs], None]) -> int:
    """A child rank's ``main``: its arguments, logs prefixed with ``kind rank r``, its torch
    threads, then ``body`` until rank 0 stops it (0) or its group breaks (1, said why)."""
    parser = argparse.ArgumentParser(description=f"one {kind} rank of a kleave worker")
    parser.add_argument("args", help="RankArgs as JSON")
    args = RankArgs.from_json(parser.parse_args(argv).args)
    logging.basicConfig(level=logging.INFO, format=f"{kind} rank {args.rank}: %(message)s")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    started = time.monotonic()
    try:
        body(args)
    except Exception as error:  # rank 0 went away, or a collective failed
        message = str(error).splitlines()[0] if str(error) else repr(error)
        log.error("stopping after %.0f s: %s", time.monotonic() - started, message)
        return 1
    return 0


def exited(children: list[subprocess.Popen[bytes]]) -> str | None:
    """Why the group is broken when a child rank exited, else None."""
    for rank, child in enumerate(children, start=1):
        code = child.poll()
        if code is not None:
            return f"rank {rank} (pid {child.pid}) exited with code {code}"
    return None


def reap(children: list[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    """Wait for the child ranks to stop (told to, or their group closed), all of them within
    one ``timeout_s``; kill the stragglers."""
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
