"""Process groups built directly from a store (not through ``init_process_group``).

A worker may hold several groups at once (one per P/D connection for KV transfer, the
control and data groups of tensor parallelism), so none of them can be the global default
group; these build the backend objects themselves, whose collectives take a timeout each.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def gloo_group(store: Any, rank: int, world: int, *, timeout: timedelta, host: str) -> Any:
    """A gloo group over ``host``'s interface; it must form within ``timeout``, which is also
    the default of every collective that passes none."""
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, world, options)


def nccl_group(
    store: Any, rank: int, world: int, *, timeout: timedelta, device: torch.device
) -> Any:
    """An NCCL group of ``device`` (its communicator forms lazily, at the first collective);
    ``timeout`` is how long NCCL's watchdog lets a collective run."""
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    with torch.cuda.device(device):
        return dist.ProcessGroupNCCL(store, rank, world, options)
