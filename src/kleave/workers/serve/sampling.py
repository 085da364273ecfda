"""Sampling parameters and token selection, identical wherever a token is chosen.

In PD the first token is chosen on the prefill worker and the rest on the decode worker, and a
preempted sequence may be recomputed; a seeded request must still give the same text as on a
colocated worker. So the random stream is not a per-process generator but a function of
(seed, output index): token i of a request is always drawn from
``Generator().manual_seed(mix(seed, i))``, whichever process draws it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kleave.workers.tokenizer import EOS

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio increment: neighbouring indices far apart
_SEED_MASK = (1 << 63) - 1


class SamplingError(ValueError):
    """A sampling parameter out of range; `field` is the request field, named in the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """What the OpenAI request fields ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and
    ``stop_token_ids``/``ignore_eos`` (vLLM's extensions) ask for."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=(EOS,))

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SamplingError(
                "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingError(
                "temperature", f"temperature must be in [0, 2], got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop_token_ids": list(self.stop_token_ids),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """The worker-to-worker form (`to_dict`); types are checked, names match the fields."""
        stop = data.get("stop_token_ids", [EOS])
        if not isinstance(stop, list):
            raise SamplingError("stop_token_ids", f"stop_token_ids must be a list, not {stop!r}")
        return cls(
            max_tokens=_int(data.get("max_tokens", 16), "max_tokens"),
            temperature=_float(data.get("temperature", 0.0), "temperature"),
            top_p=_float(data.get("top_p", 1.0), "top_p"),
            seed=None if data.get("seed") is None else _int(data["seed"], "seed"),
            stop_token_ids=tuple(_int(t, "stop_token_ids") for t in stop),
        )


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingError(name, f"{name} must be an integer, not {value!r}")
    return value


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingError(name, f"{name} must be a number, not {value!r}")
    return float(value)


def step_seed(seed: int, index: int) -> int:
    """The generator seed of output token `index` of a request seeded with `seed`."""
    return (seed * _SEED_MIX + (index + 1) * 0x632BE59BD9B4E019) & _SEED_MASK


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Choose output token `index` from float32 logits `[vocab]`."""
    if params.greedy:
        return int(torch.argmax(logits))
    # On the host: the seeded generator is a CPU one (the same stream on every device).
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = torch.cumsum(ordered, dim=-1) - ordered < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], ordered[keep])
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(step_seed(params.seed, index))
    return int(torch.multinomial(probs, 1, generator=generator))
