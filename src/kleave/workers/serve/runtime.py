"""One worker process's settings and the model, cache and thread it builds from them.

Every process of a plan must hold the same weights, or a prefill worker's K/V would mean
nothing to its decode worker: weights come from the plan's seed (drawn deterministically on the
CPU, see MoEDecoder) or from one safetensors file every process loads, whose embedded config
must equal the plan's. With ``--tensor-parallel N`` the model and the cache are rank 0's of
a group of N processes (``tensor_parallel``), which the servers use as they use one model.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.model import Decoder, ModelPart, WeightsConfigError, load_decoder
from kleave.workers.serve.plan import PlanError, ServingPlan
from kleave.workers.serve.ranks import RankArgs
from kleave.workers.serve.tensor_parallel import TensorParallelDecoder, start_tensor_parallel
from kleave.workers.tensor_parallel import check_tensor_parallel
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
    tensor_parallel: int = 1  # ranks (processes, GPUs) every layer's heads and width are split over
    weights: Path | None = None
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


INSTANCE = uuid.uuid4().hex  # this process: a router seeing it change knows the caches are empty
CACHE_ROLES = ("colocated", "decode", "attention")  # the servers that hold a paged KV cache


def build_model(plan: ServingPlan, options: WorkerOptions) -> Decoder:
    """The part of the plan's model `options.role` runs: from `options.weights`, else random
    from the plan's seed; with `--tensor-parallel N`, over N ranks (this process rank 0)."""
    part = model_part(options.role)
    if options.tensor_parallel > 1:
        return _start_tensor_parallel(plan, options, part)
    try:
        return load_decoder(
            plan.config,
            seed=plan.seed,
            weights=options.weights,
            device=options.device,
            part=part,
            serves=f"{plan.source} serves {plan.preset}",
        )
    except WeightsConfigError as error:
        raise PlanError(str(error)) from None


def _start_tensor_parallel(
    plan: ServingPlan, options: WorkerOptions, part: ModelPart
) -> TensorParallelDecoder:
    try:
        check_tensor_parallel(plan.config, options.tensor_parallel)
    except ValueError as error:
        raise PlanError(f"{plan.preset}: {error}") from None
    args = rank_args(
        plan,
        options,
        world=options.tensor_parallel,
        port=0,  # rank 0 hosts the rendezvous on a port it picks
        part=part,
        cache_blocks=cache_blocks(plan, options) if options.role in CACHE_ROLES else 0,
        block_size=options.block_size,
    )
    return start_tensor_parallel(args)


def rank_args(
    plan: ServingPlan, options: WorkerOptions, *, world: int, port: int, **more: Any
) -> RankArgs:
    """Rank 0's arguments for a group of ``world`` processes holding the plan's model."""
    return RankArgs(
        rank=0,
        world=world,
        port=port,
        config=plan.config.to_dict(),
        seed=plan.seed,
        weights=str(options.weights) if options.weights is not None else None,
        device=options.device,
        torch_threads=torch.get_num_threads(),  # what configure_torch gave this process
        **more,
    )


def model_failure(model: Decoder | None) -> str | None:
    """Why a loaded model cannot compute any more (a tensor-parallel rank died), or None."""
    return model.failure if isinstance(model, TensorParallelDecoder) else None


def close_model(model: Decoder | None) -> None:
    """Stop what the model runs on besides this process (tensor-parallel ranks)."""
    if isinstance(model, TensorParallelDecoder):
        model.close()


def plan_info(plan: ServingPlan, model: Decoder | None) -> dict[str, Any]:
    """What every worker's /v1/info says about its model, and which weights it holds."""
    info: dict[str, Any] = {
        "model": plan.model,
        "preset": plan.preset,
        "revision": plan.revision,
        "config": plan.config.to_dict(),
        "weights": None,
        "tensor_parallel": {"size": 1, "rank_pids": [os.getpid()]},
        "instance": INSTANCE,
    }
    if isinstance(model, TensorParallelDecoder):
        pids = [os.getpid(), *(child.pid for child in model.children)]
        info["tensor_parallel"] = {"size": model.world, "rank_pids": pids}
    if model is not None:
        tensors = list(model.parameters())
        info["weights"] = {
            "part": model.part,
            "parameters": sum(t.numel() for t in tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
        }
    return info


def cache_blocks(plan: ServingPlan, options: WorkerOptions) -> int:
    """`--kv-blocks`, else as many blocks as `--kv-cache-mb` holds (per rank: a rank of a
    tensor-parallel group holds 1/N of each block's heads, so N ranks hold N times the
    blocks)."""
    if options.kv_blocks is not None:
        return options.kv_blocks
    per_block = plan.config.kv_bytes_per_token * options.block_size // options.tensor_parallel
    return max(1, int(options.kv_cache_mb * 2**20) // per_block)


def build_cache(plan: ServingPlan, options: WorkerOptions, model: Decoder) -> PagedKVCache:
    blocks = cache_blocks(plan, options)
    per_rank = plan.config.kv_bytes_per_token / options.tensor_parallel
    log.info(
        "KV cache: %d blocks of %d tokens (%.1f MiB%s)",
        blocks,
        options.block_size,
        blocks * options.block_size * per_rank / 2**20,
        f" on each of {options.tensor_parallel} ranks" if options.tensor_parallel > 1 else "",
    )
    if isinstance(model, TensorParallelDecoder):
        if model.cache is None or model.cache.num_blocks != blocks:
            raise RuntimeError("the tensor-parallel ranks were started without this cache")
        return model.cache
    return PagedKVCache(
        plan.config, blocks, options.block_size, device=model.device, dtype=model.dtype
    )
