"""The decoder's shape, as one frozen value.

Every worker of a deployment (prefill, decode, attention, FFN) must build the same model, so
the shape travels with the serving plan and inside each safetensors file (`to_dict`) rather
than being re-derived per process. This module does not import torch: the operator and the
planner read configs too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer with grouped-query attention and an optional MoE FFN.

    `num_experts == 0` is the dense case: every layer's FFN is one SwiGLU of width
    `intermediate_size`. With experts, each layer routes every token to `num_experts_per_tok`
    of `num_experts` SwiGLU experts (width `moe_intermediate_size`) and adds
    `num_shared_experts` always-on SwiGLU experts of width `intermediate_size`.
    """

    vocab_size: int = 320  # the byte tokenizer's 256 bytes + specials fit
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention
    head_dim: int = 16
    intermediate_size: int = 128  # dense FFN (num_experts == 0) and each shared expert
    num_experts: int = 0  # 0: dense FFN (the degenerate case)
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    num_shared_experts: int = 1
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position: int = 4096
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts < 0 or self.num_shared_experts < 0:
            raise ValueError("num_experts and num_shared_experts must not be negative")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )
        if self.is_moe and self.moe_intermediate_size <= 0:
            raise ValueError("moe_intermediate_size must be positive when num_experts > 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def is_moe(self) -> bool:
        """Whether the FFN is a mixture of experts (otherwise one dense SwiGLU)."""
        return self.num_experts > 0

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers (what KV transfer moves)."""
        itemsize = 4 if self.dtype == "float32" else 2
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def num_parameters(self) -> int:
        """Parameter count, computed from the shape (no weights needed)."""
        h = self.hidden_size
        attention = h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.is_moe:
            ffn = (
                self.num_experts * h  # router
                + self.num_experts * 3 * h * self.moe_intermediate_size
                + self.num_shared_experts * 3 * h * self.intermediate_size
            )
        else:
            ffn = 3 * h * self.intermediate_size
        per_layer = attention + ffn + 2 * h  # two RMSNorm weights
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h  # embed, lm head, norm

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the serving plan and safetensors metadata carry this)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The inverse of `to_dict`; unknown keys are an error, so a typo is not ignored."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field(s): {', '.join(unknown)}; known: {', '.join(known)}"
            )
        return cls(**data)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Runs on a CPU in milliseconds: every code path of the MoE (routing, shared expert) at
    # a size tests can afford token by token.
    "tiny": ModelConfig(num_experts=4, num_experts_per_tok=2, num_shared_experts=1),
    "tiny-dense": ModelConfig(),
    # About 0.95 B parameters (16 experts, top-2, one shared expert): a GPU-sized model whose
    # decode is memory-bound like a real one, small enough to load in seconds.
    "small": ModelConfig(
        hidden_size=1024,
        num_layers=16,
        num_heads=16,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=2048,
        num_experts=16,
        num_experts_per_tok=2,
        moe_intermediate_size=1024,
        num_shared_experts=1,
        max_position=32768,
        dtype="bfloat16",
    ),
}
