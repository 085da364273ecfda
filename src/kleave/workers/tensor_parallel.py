"""Tensor parallelism's arithmetic: which slice of each weight a rank holds (Megatron-LM's).

A layer's attention is split by heads: rank r of N holds query heads ``r*H/N ..`` and the
key/value heads they read (``r*Hkv/N ..``; contiguous slices keep each query head with its
group's K/V head), the matching rows of ``wq``/``wk``/``wv`` (column-parallel) and columns of
``wo`` (row-parallel). Its output is a partial sum: the ranks' outputs added together (an
all-reduce) are the whole layer's. The FFN is split the same way along its intermediate width:
rows of ``gate_up`` (the gate's and the up projection's slices, kept as one gate-over-up
tensor) and columns of ``down``, for the dense SwiGLU, each MoE expert and the shared experts.
The router, the norms, the embedding and the lm head are replicated: every rank routes the
same tokens the same way, and the logits need no gather.

Everything here is pure (no process group): the model draws or loads each full parameter and
keeps its slice (``shard_tensor``), and K/V move between the whole-model layout the rest of
the data plane speaks (``[T, Hkv, D]``) and a rank's heads with ``split_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kleave.workers.config import ModelConfig

# Parameter leaf name -> (dimension split, whether it stacks a gate over an up projection).
_SPLITS: dict[str, tuple[int, bool]] = {
    "wq": (0, False),
    "wk": (0, False),
    "wv": (0, False),
    "wo": (-1, False),
    "gate_up": (0, True),
    "shared_gate_up": (0, True),
    "experts_gate_up": (1, True),
    "down": (-1, False),
    "shared_down": (-1, False),
    "experts_down": (-1, False),
}


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of a tensor-parallel group of ``world`` ranks."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a group of {self.world}")


WHOLE = Shard(0, 1)


def check_tensor_parallel(config: ModelConfig, world: int) -> None:
    """Refuse a tensor-parallel size that does not split the model evenly, naming what."""
    if world < 1:
        raise ValueError(f"--tensor-parallel must be at least 1, not {world}")
    sizes = {
        "num_kv_heads": config.num_kv_heads,
        "num_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
    }
    if config.is_moe:
        sizes["moe_intermediate_size"] = config.moe_intermediate_size
    uneven = [f"{name} ({size})" for name, size in sizes.items() if size % world]
    if uneven:
        raise ValueError(
            f"--tensor-parallel {world} must divide the model's {', '.join(uneven)}: every "
            "rank holds an equal share of the heads and of the FFN width"
        )


@dataclass(frozen=True)
class LocalSizes:
    """The widths one rank holds."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    moe_intermediate_size: int


def local_sizes(config: ModelConfig, shard: Shard) -> LocalSizes:
    check_tensor_parallel(config, shard.world)
    n = shard.world
    return LocalSizes(
        num_heads=config.num_heads // n,
        num_kv_heads=config.num_kv_heads // n,
        intermediate_size=config.intermediate_size // n,
        moe_intermediate_size=config.moe_intermediate_size // n,
    )


def _split(name: str) -> tuple[int, bool] | None:
    return _SPLITS.get(name.rsplit(".", 1)[-1])


def full_shape(name: str, local: tuple[int, ...], shard: Shard) -> tuple[int, ...]:
    """The whole model's shape of parameter ``name`` whose slice has shape ``local``."""
    split = _split(name)
    if split is None or shard.world == 1:
        return local
    dim = split[0] % len(local)
    return tuple(size * shard.world if axis == dim else size for axis, size in enumerate(local))


def shard_tensor(name: str, full: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Rank ``shard.rank``'s slice of the whole parameter ``full`` (itself if replicated)."""
    split = _split(name)
    if split is None or shard.world == 1:
        return full
    dim, gate_up = split
    if not gate_up:  # a copy: a view would keep the whole parameter alive while loading
        part = full.chunk(shard.world, dim=dim)[shard.rank]
        return part.clone(memory_format=torch.contiguous_format)
    gate, up = full.chunk(2, dim=dim)
    return torch.cat(
        (gate.chunk(shard.world, dim=dim)[shard.rank], up.chunk(shard.world, dim=dim)[shard.rank]),
        dim=dim,
    )


def split_heads(kv: torch.Tensor, world: int) -> list[torch.Tensor]:
    """K or V ``[..., Hkv, D]`` of the whole model -> each rank's ``[..., Hkv/N, D]``."""
    return [part.contiguous() for part in kv.chunk(world, dim=-2)]


def join_heads(parts: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of ``split_heads``."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
