"""The forecast a scaling decision needs: the most load until what it asks for is ready.

A replica (or warm sandbox) asked for now serves from now + lead time on, and the next decision
comes one interval later, so a decision must carry the load up to now + lead + interval. Both
the DOPD planner (request rate) and the warm-pool autoscaler (claim rate) size for the upper
bound of that window's forecast, so the windowing, the fallbacks for a short history and the
cap on an absurd interval live here once. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kleave.planner.forecast import AutoForecaster

FloatArray = npt.NDArray[np.float64]

MIN_HISTORY = 3
"""Fewer finite points than this and the decision provisions for the last value seen."""
UPPER_CAP = 1.5
"""The provisioned upper bound never exceeds this times the larger of the mean forecast and
the highest value of the last season (or day of history)."""


@dataclass(frozen=True)
class WindowPrediction:
    mean: float
    upper: float
    model: str
    """The forecaster used: a model name, "last-value" (short history) or "none" (no data)."""


def last_finite(values: FloatArray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else None


def horizon_steps(interval_s: float, lead_time_s: float) -> int:
    """Forecast steps covering the next interval after something asked for now is ready."""
    return max(1, math.ceil((lead_time_s + interval_s) / interval_s - 1e-9))


class WindowForecaster:
    """An `AutoForecaster` over one per-interval series, read for a provisioning window."""

    def __init__(
        self,
        *,
        interval_s: float,
        level: float = 0.8,
        season_s: float | None = 86_400.0,
        history_s: float | None = None,
        reselect_every: int = 36,
    ) -> None:
        self.interval_s = interval_s
        season = None
        if season_s:
            m = round(season_s / interval_s)
            season = m if m >= 2 else None
        history = max(2, round(history_s / interval_s)) if history_s else None
        self._forecaster = AutoForecaster(
            season, level=level, reselect_every=reselect_every, max_history=history
        )
        self._cap_window = max(1, round(86_400.0 / interval_s))

    def _covering(self, steps: FloatArray, fallback: float, lead_time_s: float) -> float:
        """The largest step until something asked for now is ready and the next decision's
        is too (now + lead + interval). The last step counts by the share of it inside that
        window, so a 60 s lead on a 600 s interval does not provision for the whole interval
        after next."""
        values = np.where(np.isfinite(steps), steps, fallback)
        reach = (lead_time_s + self.interval_s) / self.interval_s
        whole = max(1, math.floor(reach + 1e-9))
        best = float(np.max(values[: min(whole, len(values))]))
        share = reach - whole
        if share > 1e-9 and whole < len(values):
            best = max(best, float(values[whole - 1] + share * (values[whole] - values[whole - 1])))
        return best

    def predict(self, history: npt.ArrayLike, lead_time_s: float) -> WindowPrediction:
        """(mean, upper) over the provisioning window; NaN in `history` marks a missing step."""
        series = np.asarray(history, dtype=np.float64).ravel()
        last = last_finite(series)
        if last is None:
            return WindowPrediction(0.0, 0.0, "none")
        if int(np.sum(np.isfinite(series))) < MIN_HISTORY:
            return WindowPrediction(last, last, "last-value")
        f = self._forecaster.forecast(series, horizon_steps(self.interval_s, lead_time_s))
        mean = self._covering(np.asarray(f.mean, np.float64), last, lead_time_s)
        upper = self._covering(np.asarray(f.upper, np.float64), mean, lead_time_s)
        # An interval from a few noisy errors can be absurd (a bursty series with zero
        # windows gave 13x its largest value ever): nothing beyond the recent maximum by
        # more than `UPPER_CAP` is believed.
        recent = series[-self._cap_window :]
        recent = recent[np.isfinite(recent)]  # a recent stretch may be all missing
        ceiling = UPPER_CAP * max(mean, float(recent.max()) if recent.size else mean)
        return WindowPrediction(max(mean, 0.0), min(max(upper, mean, 0.0), ceiling), f.model)
