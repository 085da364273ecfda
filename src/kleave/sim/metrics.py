"""Scores of one simulated run: SLO attainment, latency percentiles, goodput and GPU-hours.

Both engines produce a `SimResult`: the discrete-event engine one latency sample per request
(weight 1), the fluid model a few weighted samples per tick. Attainment counts a request as
good only if it meets both the TTFT and the TPOT target, as the issue defines it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Timeline:
    """Per tick (time = end of the tick): load, replicas after the decision, outcomes."""

    t_s: FloatArray
    arrivals: FloatArray
    replicas: dict[str, FloatArray]
    ready: dict[str, FloatArray]
    met: FloatArray
    """Requests arriving in the tick that met both targets (fractional in the fluid model)."""


@dataclass(frozen=True)
class SimResult:
    policy: str
    engine: str
    duration_s: float
    gpu_seconds: dict[str, float]
    actions: dict[str, int]
    timeline: Timeline
    ttft_s: FloatArray
    tpot_s: FloatArray
    weight: FloatArray
    requests: float
    ttft_ok: float
    tpot_ok: float
    both_ok: float
    ceiling: float
    """Share of requests that meet both targets on an idle, infinitely large cluster."""


def weighted_quantile(values: FloatArray, weights: FloatArray, q: float) -> float:
    if not len(values) or float(np.sum(weights)) <= 0:
        return float("nan")
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    k = int(np.searchsorted(cum, q * cum[-1], side="left"))
    return float(values[order][min(k, len(values) - 1)])


def summarize(result: SimResult) -> dict[str, Any]:
    """The per-policy numbers `--json` prints and the tables show."""
    n = max(result.requests, 1e-12)
    t = result.timeline
    dt = np.diff(np.concatenate([[0.0], t.t_s]))
    span = max(float(np.sum(dt)), 1e-12)
    out: dict[str, Any] = {
        "policy": result.policy,
        "engine": result.engine,
        "requests": round(result.requests),
        "slo_attainment": result.both_ok / n,
        "ttft_attainment": result.ttft_ok / n,
        "tpot_attainment": result.tpot_ok / n,
        "misses": round(result.requests - result.both_ok),
        "goodput": result.both_ok / max(result.duration_s, 1e-12),
        "gpu_hours": sum(result.gpu_seconds.values()) / 3600.0,
        "gpu_hours_by_role": {r: s / 3600.0 for r, s in result.gpu_seconds.items()},
        "mean_replicas": {r: float(np.sum(v * dt) / span) for r, v in t.replicas.items()},
        "scaling_actions": sum(result.actions.values()),
        "attainment_ceiling": result.ceiling,
    }
    for name, values in (("ttft", result.ttft_s), ("tpot", result.tpot_s)):
        for q in (50, 90, 99):
            out[f"p{q}_{name}_s"] = weighted_quantile(values, result.weight, q / 100)
    return out
