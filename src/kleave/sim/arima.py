"""The ARIMA load predictor of `dynamo-sla-arima`, fast enough for thousands of refits.

Dynamo refits `pmdarima.auto_arima` on the last 50 points at every adjustment. pmdarima is not
a kleave dependency and its stepwise search takes ~0.2 s per fit, far too slow for the 6,720
decisions of a 14-day trace, so this keeps the same recipe with a cheaper fit: the differencing
order `d` from the KPSS test at 5% (pmdarima's default), then ARIMA(p, d, 0) for p <= 3 by
least squares, the order picked by AIC, one step ahead. Constant data and fewer than 5 points
return the last value, as Dynamo's predictor does.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

WINDOW = 50
MIN_POINTS = 5
MAX_P = 3
KPSS_CRITICAL_5PCT = 0.463


def kpss_level(x: FloatArray) -> float:
    """KPSS statistic for level stationarity with the Newey-West long-run variance."""
    n = len(x)
    e = x - np.mean(x)
    s = np.cumsum(e)
    lags = math.ceil(12 * (n / 100) ** 0.25)
    lags = min(lags, n - 1)
    var = float(np.dot(e, e)) / n
    for k in range(1, lags + 1):
        w = 1 - k / (lags + 1)
        var += 2 * w * float(np.dot(e[k:], e[:-k])) / n
    if var <= 0:
        return 0.0
    return float(np.dot(s, s)) / (n * n * var)


def _ar_fit(y: FloatArray, p: int) -> tuple[float, FloatArray]:
    """AIC and coefficients [c, phi_1..phi_p] of an AR(p) with intercept by least squares."""
    n = len(y) - p
    columns = [np.ones(n)] + [y[p - k : len(y) - k] for k in range(1, p + 1)]
    design = np.column_stack(columns)
    target = y[p:]
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    resid = target - design @ coef
    sigma2 = max(float(np.dot(resid, resid)) / n, 1e-12)
    return n * math.log(sigma2) + 2 * (p + 2), np.asarray(coef, dtype=np.float64)


def arima_next(history: FloatArray) -> float:
    """One-step-ahead ARIMA(p, d, 0) forecast (see the module docstring)."""
    x = np.asarray(history, dtype=np.float64)
    if len(x) < MIN_POINTS or np.all(x == x[0]):
        return float(x[-1]) if len(x) else 0.0
    d = 1 if kpss_level(x) > KPSS_CRITICAL_5PCT else 0
    y = np.diff(x) if d else x
    best: tuple[float, FloatArray] | None = None
    for p in range(0, min(MAX_P, len(y) // 4) + 1):
        fit = _ar_fit(y, p)
        if best is None or fit[0] < best[0]:
            best = fit
    assert best is not None
    coef = best[1]
    p = len(coef) - 1
    step = float(coef[0] + sum(coef[k] * y[-k] for k in range(1, p + 1)))
    return float(x[-1] + step) if d else step


class ArimaPredictor:
    """Dynamo's ARIMAPredictor interface: add a point, predict the next (NaN counts as 0)."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.buffer: list[float] = []

    def add(self, value: float) -> None:
        self.buffer.append(0.0 if math.isnan(value) else value)
        if len(self.buffer) > self.window:
            del self.buffer[: len(self.buffer) - self.window]

    def predict(self) -> float:
        return max(0.0, arima_next(np.asarray(self.buffer)))
