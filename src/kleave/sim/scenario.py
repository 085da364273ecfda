"""Everything a simulated run shares across policies: profiles, SLO, limits, timing, the load.

`auto_scale` picks the rate scale at which the trace's peak needs about `TARGET_REPLICAS`
prefill + decode replicas by the capacity model, so traces of very different volume exercise
the planner at a size where one replica more or less matters but rounding does not dominate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kleave.planner.capacity import CapacityProfile
from kleave.planner.solver import Load, PoolLimits, Slo, required_replicas
from kleave.traces import RateSeries, RequestTrace

FloatArray = npt.NDArray[np.float64]

TARGET_REPLICAS = 20.0


@dataclass(frozen=True)
class Scenario:
    profiles: dict[str, CapacityProfile]
    slo: Slo
    startup_s: float
    loads: RateSeries
    """The (scaled) trace in windows of the planner interval: what static sizing and initial
    replicas see (a rates file keeps its own windows when they are longer)."""
    peaks: FloatArray | None = None
    """Per window of `loads`, the highest rate over `tick_s` sub-windows (request traces)."""
    limits: dict[str, PoolLimits] = field(default_factory=dict)
    tick_s: float = 10.0
    interval_s: float = 60.0
    topology: str = "PD"

    def load_at(self, index: int) -> Load:
        r = self.loads
        return Load(
            float(r.request_rate[index]),
            float(r.mean_input_tokens[index]),
            float(r.mean_output_tokens[index]),
            None if self.peaks is None else float(self.peaks[index]),
        )

    def required(self, load: Load) -> dict[str, float]:
        return required_replicas(load, self.profiles, self.slo, self.topology)

    def sized(self, load: Load) -> dict[str, int]:
        """Integer replicas for `load`, within the pool limits."""
        out = {}
        for role, need in self.required(load).items():
            lim = self.limits.get(role, PoolLimits())
            n = lim.max_replicas if not math.isfinite(need) else math.ceil(need - 1e-9)
            out[role] = min(max(n, lim.min_replicas), lim.max_replicas)
        return out

    def peak_sized(self) -> dict[str, int]:
        """Per role, the most replicas any window needs: the best fixed P/D for the trace."""
        best: dict[str, int] = {}
        for i in range(len(self.loads)):
            for role, n in self.sized(self.load_at(i)).items():
                best[role] = max(best.get(role, 0), n)
        return best


def window_peaks(trace: RequestTrace, window_s: float, tick_s: float) -> FloatArray:
    """Per window of `window_s`, the highest arrival rate over its `tick_s` sub-windows."""
    ticks = trace.to_rates(tick_s).request_rate
    per = max(1, round(window_s / tick_s))
    count = len(trace.to_rates(window_s))
    padded = np.zeros(count * per)
    padded[: min(len(ticks), len(padded))] = ticks[: len(padded)]
    return np.asarray(padded.reshape(count, per).max(axis=1), dtype=np.float64)


def peak_need(
    rates: RateSeries,
    profiles: dict[str, CapacityProfile],
    slo: Slo,
    topology: str = "PD",
    peaks: FloatArray | None = None,
) -> float:
    """Fractional prefill + decode replicas the busiest window needs at scale 1."""
    best = 0.0
    for i in range(len(rates)):
        load = Load(
            float(rates.request_rate[i]),
            float(rates.mean_input_tokens[i]),
            float(rates.mean_output_tokens[i]),
            None if peaks is None else float(peaks[i]),
        )
        need = sum(required_replicas(load, profiles, slo, topology).values())
        best = max(best, need)
    return best


def auto_scale(
    rates: RateSeries,
    profiles: dict[str, CapacityProfile],
    slo: Slo,
    *,
    topology: str = "PD",
    target: float = TARGET_REPLICAS,
    peaks: FloatArray | None = None,
) -> float:
    """The rate scale (2 significant digits) at which the peak needs about `target` replicas;
    the need is close to linear in the rate, so one evaluation at scale 1 is enough."""
    need = peak_need(rates, profiles, slo, topology, peaks)
    if not math.isfinite(need):
        raise ValueError("the SLO cannot be met at any scale: a request alone misses it")
    if need <= 0:
        return 1.0
    scale = target / need
    digits = 1 - math.floor(math.log10(scale))
    return float(np.round(scale, digits))


def scaled(rates: RateSeries, scale: float) -> RateSeries:
    return RateSeries(
        rates.path,
        rates.window_start_s,
        rates.window_s,
        rates.request_rate * scale,
        rates.mean_input_tokens,
        rates.mean_output_tokens,
    )
