"""One worker process's settings and the model, cache and thread it builds from them.

Every process of a plan must hold the same weights, or a prefill worker's K/V would mean
nothing to its decode worker: weights come from the plan's seed (drawn deterministically on the
CPU, see MoEDecoder) or from one safetensors file every process loads, whose embedded config
must equal the plan's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.model import ModelPart, MoEDecoder
from kleave.workers.serve.plan import PlanError, ServingPlan
from kleave.workers.transport.kv_transfer import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    """`kleave workers serve` flags (see workers/cli.py for each one's help)."""

    role: str
    host: str = "0.0.0.0"
    port: int = 8000
    kv_port: int = 0  # decode/attention: the KV receiver (0: any free port, see /v1/info)
    af_port: int = 0  # ffn: the activation server
    advertise_host: str | None = None  # how peers reach this worker (default: its URL's host)
    kv_blocks: int | None = None
    kv_cache_mb: float = 64.0
    block_size: int = 16
    max_num_seqs: int = 64
    max_prefill_tokens: int = 2048
    kv_timeout_s: float = 30.0
    kv_backend: Backend = "tcp"  # prefill: how KV reaches decode (the receiver takes what comes)
    kv_arena_mb: float = 32.0  # shm/cuda_ipc: the shared ring per decode peer
    prefix_cache_mb: float = 64.0  # prefill: K/V of recent prompts' full blocks (0: off)
    prefix_caching: bool = True  # colocated/decode: reuse cached prompt blocks in the paged cache
    expert_parallel: int = 1  # ffn: ranks (processes, GPUs) the experts are split over
    weights: Path | None = None
    torch_threads: int | None = None
    device: str = "cpu"


def configure_torch(threads: int | None) -> None:
    """Intra-op threads: several workers share a host in `kleave workers up`, and one thread
    each avoids them oversubscribing its cores (tiny models gain nothing from more)."""
    if threads is None:
        env = os.environ.get("KLEAVE_TORCH_THREADS")
        threads = int(env) if env else None
    if threads is not None:
        torch.set_num_threads(threads)


def model_part(role: str) -> ModelPart:
    """The weights a server role runs: PDAF's attention and FFN workers each hold half."""
    if role == "attention":
        return "attention"
    if role == "ffn":
        return "ffn"
    return "all"


def build_model(plan: ServingPlan, options: WorkerOptions) -> MoEDecoder:
    """The part of the plan's model `options.role` runs: from `options.weights`, else random
    from the plan's seed."""
    part = model_part(options.role)
    if options.weights is None:
        return MoEDecoder(plan.config, seed=plan.seed, device=options.device, part=part)
    model = MoEDecoder.from_safetensors(options.weights, device=options.device, part=part)
    if model.config != plan.config:
        raise PlanError(
            f"--weights {options.weights} holds model config {model.config.to_dict()}, but "
            f"{plan.source} serves {plan.preset} {plan.config.to_dict()}"
        )
    return model


def plan_info(plan: ServingPlan, model: MoEDecoder | None) -> dict[str, Any]:
    """What every worker's /v1/info says about its model, and which weights it holds."""
    info: dict[str, Any] = {
        "model": plan.model,
        "preset": plan.preset,
        "revision": plan.revision,
        "config": plan.config.to_dict(),
        "weights": None,
    }
    if model is not None:
        tensors = list(model.parameters())
        info["weights"] = {
            "part": model.part,
            "parameters": sum(t.numel() for t in tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
        }
    return info


def cache_blocks(plan: ServingPlan, options: WorkerOptions) -> int:
    """`--kv-blocks`, else as many blocks as `--kv-cache-mb` holds."""
    if options.kv_blocks is not None:
        return options.kv_blocks
    per_block = plan.config.kv_bytes_per_token * options.block_size
    return max(1, int(options.kv_cache_mb * 2**20) // per_block)


def build_cache(plan: ServingPlan, options: WorkerOptions, model: MoEDecoder) -> PagedKVCache:
    blocks = cache_blocks(plan, options)
    log.info(
        "KV cache: %d blocks of %d tokens (%.1f MiB)",
        blocks,
        options.block_size,
        blocks * options.block_size * plan.config.kv_bytes_per_token / 2**20,
    )
    return PagedKVCache(
        plan.config, blocks, options.block_size, device=model.device, dtype=model.dtype
    )
