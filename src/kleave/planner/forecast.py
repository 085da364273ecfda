"""Short-horizon load forecasts (request rate, mean ISL/OSL) with intervals, and model choice.

The DOPD planner provisions for the upper bound of a central interval, so every forecaster
returns `lower <= mean <= upper`, all non-negative. Zero windows that drop far below their
neighbours are source gaps, not load: every forecaster (baselines included) sees them imputed,
so a comparison measures the model, not the gap handling. Pure: no I/O, no printing.
"""

from __future__ import annotations

import abc
import ctypes
import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.signal import lfilter

FloatArray = npt.NDArray[np.float64]

#: A window is a gap when it is below this fraction of its neighbours' median ...
GAP_FRACTION = 0.2
#: ... and further below it than this many typical one-step changes (so the zeros of a sparse,
#: low-count series stay real).
GAP_SIGMAS = 8.0
_GAP_NEIGHBOURS = 49
#: In-sample h-step errors from this many recent origins give the empirical intervals.
ERROR_WINDOW = 1008


@dataclass(frozen=True)
class Forecast:
    """`horizon` steps ahead; [lower, upper] is the central interval at `level`."""

    model: str
    mean: FloatArray
    lower: FloatArray
    upper: FloatArray
    level: float


class Forecaster(Protocol):
    name: str

    def forecast(
        self, history: npt.NDArray[np.float64], horizon: int, level: float
    ) -> Forecast: ...


# ----- gaps ------------------------------------------------------------------------------------
def missing_mask(series: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """True where a value is not load: NaN/inf/negative, or a (near-)zero window far below the
    median of its positive neighbours (a gap in the source, e.g. the ServeGen zero windows)."""
    x = np.asarray(series, dtype=np.float64).ravel()
    bad = ~np.isfinite(x) | (x < 0)
    positive = np.where(bad | (x <= 0), np.nan, x)
    if len(x) < 3 or not np.isfinite(positive).any():
        return bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        steps = np.abs(np.diff(positive))
        typical = float(np.nanmedian(steps)) if np.isfinite(steps).any() else 0.0
    median = (
        pd.Series(positive)
        .rolling(_GAP_NEIGHBOURS, center=True, min_periods=1)
        .median()
        .to_numpy(dtype=np.float64)
    )
    with np.errstate(invalid="ignore"):
        gap: npt.NDArray[np.bool_] = (x < GAP_FRACTION * median) & (
            median - x > GAP_SIGMAS * typical
        )
    return bad | gap


def impute(series: npt.ArrayLike, missing: npt.NDArray[np.bool_]) -> FloatArray:
    """Linear interpolation inside, the last good value after the end (causal), 0 if none."""
    x = np.asarray(series, dtype=np.float64).ravel()
    good = np.flatnonzero(~missing)
    if not len(good):
        return np.zeros(len(x))
    if len(good) == len(x):
        return x.copy()
    return np.interp(np.arange(len(x)), good, x[good])


def clean(history: npt.ArrayLike) -> FloatArray:
    """The history a model fits: gaps and invalid values imputed."""
    x = np.asarray(history, dtype=np.float64).ravel()
    return impute(x, missing_mask(x))


def naive_scale(history: npt.ArrayLike, missing: npt.NDArray[np.bool_] | None = None) -> float:
    """MASE denominator: in-sample mean |one-step change| over pairs of non-missing values."""
    x = np.asarray(history, dtype=np.float64).ravel()
    if missing is None:
        missing = missing_mask(x)
    ok = ~missing[1:] & ~missing[:-1]
    return float(np.mean(np.abs(np.diff(x))[ok])) if ok.any() else math.nan


# ----- BLAS threads ----------------------------------------------------------------------------
@functools.cache
def _blas_thread_setters() -> tuple[Any, ...]:
    """OpenBLAS's per-thread thread-count setter in every loaded OpenBLAS (numpy and scipy
    each bundle one); empty where there is none or no /proc (then nothing changes)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]}
    except OSError:
        return ()
    setters = []
    for path in sorted(paths):
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
        setters.append(setter)
    return tuple(setters)


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run statsmodels' many tiny BLAS calls on this thread alone. Measured on a shared 2-core
    box: ARIMA fits went from ~60 ms to 0.4-3 s with OpenBLAS's thread pool fighting other
    processes; thread-local, so other threads keep their setting."""
    previous = [(setter, setter(1)) for setter in _blas_thread_setters()]
    try:
        yield
    finally:
        for setter, count in previous:
            setter(count)


# ----- model plumbing --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Point:
    """A model's output: the mean and either in-sample forecasts per step (`insample[h-1][t]`
    = forecast made at t for t+h, for empirical intervals) or ready bounds."""

    mean: FloatArray
    insample: list[FloatArray] | None = None
    bounds: tuple[FloatArray, FloatArray] | None = None


def _interval(
    x: FloatArray, point: _Point, level: float, missing: npt.NDArray[np.bool_] | None = None
) -> tuple[FloatArray, FloatArray]:
    """Empirical quantiles of recent in-sample h-step errors around the mean.

    Errors are relative to the level at their origin and rescaled to the current level: load
    noise grows with load, and ServeGen doubles in a week, so absolute errors from last week
    make too narrow an interval. Errors that start or end on an imputed (gap) window are left
    out: interpolation is smooth, and its tiny errors would narrow the interval too."""
    if point.bounds is not None:
        return point.bounds
    horizon = len(point.mean)
    lower, upper = point.mean.copy(), point.mean.copy()
    if point.insample is None:
        return lower, upper
    q = ((1 - level) / 2, (1 + level) / 2)
    n = len(x)
    valid = np.ones(n, dtype=bool) if missing is None else ~missing[-n:]
    floor = 0.1 * float(np.mean(x))  # near-zero origins would explode the ratio
    scale = np.maximum(x, floor)
    for h in range(1, horizon + 1):
        if n <= h:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            errors = (x[h:] - point.insample[h - 1][: n - h]) / scale[: n - h] * scale[-1]
        errors = errors[valid[h:] & valid[: n - h]][-ERROR_WINDOW:]
        errors = errors[np.isfinite(errors)]
        if len(errors) >= 5:
            lo, hi = np.quantile(errors, q)
            lower[h - 1] += lo
            upper[h - 1] += hi
    return lower, upper


def _finish(
    name: str, mean: FloatArray, lower: FloatArray, upper: FloatArray, level: float
) -> Forecast:
    mean = np.maximum(mean, 0.0)
    return Forecast(
        model=name,
        mean=mean,
        lower=np.clip(lower, 0.0, mean),
        upper=np.maximum(upper, mean),
        level=level,
    )


def _check(horizon: int, level: float) -> None:
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


class _Model(abc.ABC):
    """Shared flow: clean the trailing window, fit, predict, fall back to last value."""

    name = "model"
    max_points = 2016

    def min_points(self, horizon: int) -> int:
        return 2

    def fit(self, x: FloatArray, start: int) -> Any:
        """Estimate parameters (the expensive part); `start` is x[0]'s index in the history."""
        return None

    @abc.abstractmethod
    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        """Each model's own forecast from cleaned data and fitted parameters."""

    def forecast(self, history: npt.ArrayLike, horizon: int, level: float = 0.8) -> Forecast:
        return self.run(history, horizon, level)[0]

    def run(
        self, history: npt.ArrayLike, horizon: int, level: float, params: Any = None
    ) -> tuple[Forecast, Any]:
        """Forecast, reusing `params` when given (a cheap refit); returns the params used."""
        _check(horizon, level)
        raw = np.asarray(history, dtype=np.float64).ravel()
        # Gap detection needs neighbours beyond the fit window's edge.
        tail = raw[-(self.max_points + _GAP_NEIGHBOURS) :]
        missing = missing_mask(tail)
        cleaned = impute(tail, missing)
        start = len(raw) - len(cleaned)
        return self.run_clean(cleaned, start, horizon, level, params=params, missing=missing)

    def run_clean(
        self,
        cleaned: FloatArray,
        start: int,
        horizon: int,
        level: float,
        *,
        params: Any = None,
        missing: npt.NDArray[np.bool_] | None = None,
    ) -> tuple[Forecast, Any]:
        """`run` on an already cleaned history whose first value has index `start`;
        `missing` (aligned with it) marks the imputed windows."""
        x = cleaned[-self.max_points :]
        start += len(cleaned) - len(x)
        if len(x) < self.min_points(horizon):
            return _last_value(x, horizon, level, missing), None
        try:
            with warnings.catch_warnings(), _one_blas_thread():
                warnings.simplefilter("ignore")
                if params is None:
                    params = self.fit(x, start)
                point = self.predict(x, start, horizon, level, params)
                lower, upper = _interval(x, point, level, missing)
        except Exception:  # statsmodels raises many kinds (LinAlgError, ValueError, ...)
            return _last_value(x, horizon, level, missing), None
        if not (np.all(np.isfinite(point.mean)) and np.all(np.isfinite(lower + upper))):
            return _last_value(x, horizon, level, missing), None
        return _finish(self.name, point.mean, lower, upper, level), params


def _last_value(
    x: FloatArray, horizon: int, level: float, missing: npt.NDArray[np.bool_] | None = None
) -> Forecast:
    if not len(x):
        zeros = np.zeros(horizon)
        return Forecast("last_value", zeros, zeros.copy(), zeros.copy(), level)
    point = LastValue().predict(x, 0, horizon, level, None)
    return _finish("last_value", point.mean, *_interval(x, point, level, missing), level)


def _ses_levels(x: FloatArray, alpha: float) -> FloatArray:
    """SES level after each observation, started at x[0] (a linear filter: fast)."""
    if len(x) < 2:
        return x.copy()
    rest = lfilter([alpha], [1.0, alpha - 1.0], x[1:], zi=[(1.0 - alpha) * x[0]])[0]
    return np.concatenate([x[:1], np.asarray(rest, dtype=np.float64)])


def _ses_alpha(x: FloatArray) -> float:
    """Least-squares SES smoothing on a grid (cheap, no optimiser to fail)."""
    grid = np.linspace(0.05, 1.0, 20)
    sse = [float(np.sum((x[1:] - _ses_levels(x, a)[:-1]) ** 2)) for a in grid]
    return float(grid[int(np.argmin(sse))])


# ----- baselines -------------------------------------------------------------------------------
class LastValue(_Model):
    """Naive: the next windows look like the last one. The yardstick for MASE."""

    name = "last_value"

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        return _Point(np.full(horizon, x[-1]), [x] * horizon)


class MovingAverage(_Model):
    """Mean of the last k windows (k=6: one hour of 10-minute windows)."""

    def __init__(self, k: int = 6) -> None:
        self.k = k
        self.name = f"moving_average_{k}"

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        k = min(self.k, len(x))
        sums = np.cumsum(np.concatenate([[0.0], x]))
        means = np.full(len(x), np.nan)
        means[k - 1 :] = (sums[k:] - sums[:-k]) / k
        return _Point(np.full(horizon, means[-1]), [means] * horizon)


class SeasonalNaive(_Model):
    """Same window one season ago; the daily cycle's own baseline."""

    name = "seasonal_naive"

    def __init__(self, season: int) -> None:
        self.season = season

    def min_points(self, horizon: int) -> int:
        return self.season + 1

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        n, m = len(x), self.season
        mean = np.empty(horizon)
        insample = []
        for h in range(1, horizon + 1):
            lag = m * ((h - 1) // m + 1)
            mean[h - 1] = x[n + h - 1 - lag] if n + h - 1 - lag >= 0 else x[-1]
            fc = np.full(n, np.nan)
            shift = lag - h  # forecast at t for t+h is x[t+h-lag]
            if shift < n:
                fc[shift:] = x[: n - shift]
            insample.append(fc)
        return _Point(mean, insample)


def baselines(season: int | None) -> list[Forecaster]:
    """The naive yardsticks a model must beat: last value, moving average, seasonal naive."""
    out: list[Forecaster] = [LastValue(), MovingAverage()]
    if season and season >= 2:
        out.append(SeasonalNaive(season))
    return out


# ----- smoothing and statsmodels models --------------------------------------------------------
def _start_state(
    x: FloatArray, fitted: tuple[float, float, int], start: int
) -> tuple[float, float]:
    """Initial (level, trend) for a smoothing recursion over x: statsmodels' estimate when x
    starts where the fit did, else a line through the first points. It matters when the fit
    chose little smoothing (alpha ~ 0), where the start state is the whole forecast."""
    level, trend, anchor = fitted
    if anchor == start:
        return level, trend
    head = x[: min(len(x), 12)]
    if len(head) < 2:
        return float(x[0]), 0.0
    slope, intercept = np.polyfit(np.arange(len(head)), head, 1)
    return float(intercept), float(slope)


class Ses(_Model):
    """Simple exponential smoothing; statsmodels estimates alpha and the start level, refits
    reuse alpha."""

    name = "ses"
    max_points = 432

    def min_points(self, horizon: int) -> int:
        return 10

    def fit(self, x: FloatArray, start: int) -> Any:
        from statsmodels.tsa.holtwinters import ExponentialSmoothing

        p = ExponentialSmoothing(x, initialization_method="estimated").fit().params
        return float(p["smoothing_level"]), (float(p["initial_level"]), 0.0, start)

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        alpha, fitted = params
        # A level of one step before x[0] in statsmodels' convention; the filter starts at x[0].
        level0 = _start_state(x, fitted, start)[0]
        levels = _ses_levels(np.concatenate([[level0], x]), alpha)[1:]
        return _Point(np.full(horizon, levels[-1]), [levels] * horizon)


class HoltDamped(_Model):
    """Holt's linear method with a damped trend (statsmodels estimates alpha, beta, phi and the
    start state; refits reuse the parameters)."""

    name = "holt_damped"
    max_points = 432

    def min_points(self, horizon: int) -> int:
        return 20

    def fit(self, x: FloatArray, start: int) -> Any:
        from statsmodels.tsa.holtwinters import ExponentialSmoothing

        model = ExponentialSmoothing(
            x, trend="add", damped_trend=True, initialization_method="estimated"
        )
        p = model.fit().params
        smoothing = (float(p["smoothing_level"]), float(p["smoothing_trend"]))
        damping = float(p["damping_trend"])
        return smoothing, damping, (float(p["initial_level"]), float(p["initial_trend"]), start)

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        (alpha, beta), phi, fitted = params
        n = len(x)
        levels, trends = np.empty(n), np.empty(n)
        lvl, trend = _start_state(x, fitted, start)
        for t, y in enumerate(x.tolist()):
            prev = lvl
            lvl = alpha * y + (1 - alpha) * (prev + phi * trend)
            trend = beta * (lvl - prev) + (1 - beta) * phi * trend
            levels[t], trends[t] = lvl, trend
        damp = np.cumsum(phi ** np.arange(1, horizon + 1))
        mean = levels[-1] + damp * trends[-1]
        return _Point(mean, [levels + d * trends for d in damp])


class Arima(_Model):
    """ARIMA(1,1,1) with statsmodels' Gaussian intervals; refits refilter with fixed params."""

    name = "arima"
    max_points = 576

    def __init__(self, order: tuple[int, int, int] = (1, 1, 1)) -> None:
        self.order = order

    def min_points(self, horizon: int) -> int:
        return 30

    def fit(self, x: FloatArray, start: int) -> Any:
        from statsmodels.tsa.arima.model import ARIMA

        return ARIMA(x, order=self.order).fit().params

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        from statsmodels.tsa.arima.model import ARIMA

        result = ARIMA(x, order=self.order).filter(params).get_forecast(horizon)
        bounds = np.asarray(result.conf_int(alpha=1 - level), dtype=np.float64)
        mean = np.asarray(result.predicted_mean, dtype=np.float64)
        return _Point(mean, bounds=(bounds[:, 0], bounds[:, 1]))


class StlArima(_Model):
    """STL daily seasonal + ARIMA on the seasonally adjusted series (needs two seasons)."""

    name = "stl_arima"
    max_points = 576

    def __init__(self, season: int, order: tuple[int, int, int] = (1, 1, 1)) -> None:
        self.season = season
        self.order = order
        self.max_points = max(576, 4 * season)

    def min_points(self, horizon: int) -> int:
        return 2 * self.season

    def fit(self, x: FloatArray, start: int) -> Any:
        from statsmodels.tsa.arima.model import ARIMA
        from statsmodels.tsa.seasonal import STL

        seasonal = np.asarray(STL(x, period=self.season).fit().seasonal, dtype=np.float64)
        profile = np.empty(self.season)
        tail = np.arange(len(x) - self.season, len(x))
        profile[(start + tail) % self.season] = seasonal[tail]
        adjusted = x - profile[(start + np.arange(len(x))) % self.season]
        return profile, ARIMA(adjusted, order=self.order).fit().params

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        from statsmodels.tsa.arima.model import ARIMA

        profile, arima = params
        m = self.season
        adjusted = x - profile[(start + np.arange(len(x))) % m]
        result = ARIMA(adjusted, order=self.order).filter(arima).get_forecast(horizon)
        future = profile[(start + len(x) + np.arange(horizon)) % m]
        bounds = np.asarray(result.conf_int(alpha=1 - level), dtype=np.float64)
        mean = np.asarray(result.predicted_mean, dtype=np.float64) + future
        return _Point(mean, bounds=(bounds[:, 0] + future, bounds[:, 1] + future))


# ----- fast numpy models -----------------------------------------------------------------------
def _daily_profile(x: FloatArray, start: int, season: int, days: int = 7) -> FloatArray:
    """Mean daily shape of the last `days` days (detrended by a centred daily mean), smoothed
    over an hour and shrunk by half: the cycle is weak and noisy, a full profile overfits."""
    trend = pd.Series(x).rolling(season, center=True, min_periods=season // 2).mean()
    detrended = x - trend.to_numpy(dtype=np.float64)
    tail = np.arange(max(0, len(x) - days * season), len(x))
    phase = (start + tail) % season
    ok = np.isfinite(detrended[tail])
    sums = np.bincount(phase[ok], weights=detrended[tail][ok], minlength=season)
    counts = np.bincount(phase[ok], minlength=season)
    profile = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    k = max(1, min(6, season // 4))
    padded = np.concatenate([profile[-k:], profile, profile[:k]])
    smooth: FloatArray = np.convolve(padded, np.ones(k) / k, mode="same")[k:-k]
    return 0.5 * (smooth - float(smooth.mean()))


class SeasonalSes(_Model):
    """SES on the series minus a shrunk daily profile, plus the profile ahead."""

    name = "seasonal_ses"
    max_points = 1008

    def __init__(self, season: int) -> None:
        self.season = season

    def min_points(self, horizon: int) -> int:
        return 10

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        m = self.season
        # Under two seasons the profile is noise: plain SES.
        profile = _daily_profile(x, start, m) if len(x) >= 2 * m else np.zeros(m)
        seasonal = profile[(start + np.arange(len(x))) % m]
        adjusted = x - seasonal
        levels = _ses_levels(adjusted, _ses_alpha(adjusted))
        future = profile[(start + len(x) + np.arange(horizon)) % m]
        insample = []
        for h in range(1, horizon + 1):
            ahead = np.roll(seasonal, -h)  # seasonal[t+h], wrapped past the end (unused there)
            insample.append(levels + ahead)
        return _Point(levels[-1] + future, insample)


class DirectRegression(_Model):
    """One least-squares model per step: the change x[t+h]-x[t] regressed on how far fast and
    slow smoothed levels sit from x[t] (momentum vs mean reversion) and on the change over the
    same hours of the last two days. Cheap (a few small lstsq), measured best on ServeGen."""

    name = "direct_regression"
    alphas = (0.5, 0.2, 0.05, 0.01)

    def __init__(self, season: int | None) -> None:
        self.season = season

    def min_points(self, horizon: int) -> int:
        return max(40, 6 * horizon)

    def _days(self, n: int) -> int:
        m = self.season
        if not m or m < 2:
            return 0
        return max(0, min(2, (n - 100) // m))

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        n = len(x)
        smoothed = np.column_stack([_ses_levels(x, a) - x for a in self.alphas])
        days, m = self._days(n), self.season or 0
        index = np.arange(n)
        mean, insample = np.empty(horizon), []
        for h in range(1, horizon + 1):
            columns = [smoothed]
            for_days = np.zeros(n)
            counts = np.zeros(n)
            for d in range(1, days + 1):
                if d * m < h:  # that day's "same hour ahead" is not in the past yet
                    continue
                ok = index - d * m >= 0
                past = index[ok]
                for_days[ok] += x[past + h - d * m] - x[past - d * m]
                counts[ok] += 1
            if counts.any():
                columns.append((for_days / np.maximum(counts, 1))[:, None])
            features = np.column_stack(columns)
            first = days * m
            train = features[first : n - h]
            target = x[first + h :] - x[first : n - h]
            coef = np.linalg.lstsq(train, target, rcond=None)[0]
            mean[h - 1] = x[-1] + features[-1] @ coef
            insample.append(x + features @ coef)
        return _Point(mean, insample)


class Ensemble(_Model):
    """Equal-weight mean of models whose errors differ (regression and seasonal SES): a
    combination is steadier than either across regimes. In-sample errors average exactly."""

    name = "ensemble"

    def __init__(self, members: Sequence[_Model]) -> None:
        self.members = list(members)
        self.max_points = max(m.max_points for m in self.members)

    def min_points(self, horizon: int) -> int:
        return max(m.min_points(horizon) for m in self.members)

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        points = []
        for member in self.members:
            keep = min(len(x), member.max_points)
            part = member.predict(x[-keep:], start + len(x) - keep, horizon, level, None)
            if part.insample is None:
                raise ValueError(f"{member.name} gives no in-sample forecasts")
            pad = np.full(len(x) - keep, np.nan)
            points.append((part.mean, [np.concatenate([pad, f]) for f in part.insample]))
        mean = np.mean([p[0] for p in points], axis=0)
        insample = [np.mean([p[1][h] for p in points], axis=0) for h in range(horizon)]
        return _Point(mean, insample)


def _ensemble(season: int | None) -> Ensemble:
    other: _Model = SeasonalSes(season) if season and season >= 2 else _GridSes()
    return Ensemble([DirectRegression(season), other])


class _GridSes(_Model):
    """SES with a grid-fitted alpha: the ensemble's partner when there is no season."""

    name = "grid_ses"

    def min_points(self, horizon: int) -> int:
        return 10

    def predict(self, x: FloatArray, start: int, horizon: int, level: float, params: Any) -> _Point:
        levels = _ses_levels(x, _ses_alpha(x))
        return _Point(np.full(horizon, levels[-1]), [levels] * horizon)


def candidates(season: int | None) -> list[Forecaster]:
    """Baselines first (ties go to them), then the statsmodels and numpy models."""
    out = baselines(season)
    out += [Ses(), HoltDamped(), Arima()]
    if season and season >= 2:
        out += [StlArima(season), SeasonalSes(season)]
    out += [DirectRegression(season), _ensemble(season)]
    return out


# ----- choice ----------------------------------------------------------------------------------
def _origins(n: int, horizon: int, season: int | None, origins: int) -> list[int]:
    """Rolling origins over the recent past (four seasons, or 4 x origins windows), spaced
    evenly; every target is inside the history. A long span matters: on ServeGen the best
    model's lead is steady but small, and two days of origins often crown a lucky one."""
    first = max(20, 3 * horizon)
    last = n - horizon
    span = 4 * season if season and season >= 2 else 4 * origins
    # A short history packs its origins closer rather than using fewer of them.
    stride = max(1, min(span, last - first + 1) // max(1, origins))
    return sorted(o for o in range(last, last - origins * stride, -stride) if o >= first)


def _scores(
    history: npt.ArrayLike,
    *,
    horizon: int,
    season: int | None,
    level: float,
    origins: int,
    pool: Sequence[Forecaster],
) -> list[float]:
    """Mean MASE over steps and origins per forecaster; params are fitted once at the first
    origin and reused (a cheap refit), as the auto forecaster does between re-selections."""
    raw = np.asarray(history, dtype=np.float64).ravel()
    missing = missing_mask(raw)
    keep = max(getattr(f, "max_points", len(raw)) for f in pool) + _GAP_NEIGHBOURS
    totals, counts = np.zeros(len(pool)), np.zeros(len(pool))
    params: list[Any] = [None] * len(pool)
    for o in _origins(len(raw), horizon, season, origins):
        scale = naive_scale(raw[:o], missing[:o])
        target = raw[o : o + horizon]
        ok = ~missing[o : o + horizon]
        if not (scale > 0 and ok.any()):
            continue
        lo = max(0, o - keep)
        gaps = missing_mask(raw[lo:o])
        cleaned = impute(raw[lo:o], gaps)
        for i, forecaster in enumerate(pool):
            if isinstance(forecaster, _Model):
                fc, params[i] = forecaster.run_clean(
                    cleaned, lo, horizon, level, params=params[i], missing=gaps
                )
            else:
                fc = forecaster.forecast(raw[:o], horizon, level)
            totals[i] += float(np.mean(np.abs(fc.mean - target)[ok])) / scale
            counts[i] += 1
    return [t / c if c else math.inf for t, c in zip(totals, counts, strict=True)]


def select(
    history: npt.ArrayLike,
    horizon: int,
    season: int | None,
    *,
    level: float = 0.8,
    origins: int = 48,
    candidates: Sequence[Forecaster] | None = None,
) -> Forecaster:
    """The candidate with the lowest mean MASE over `horizon` steps on a rolling-origin
    backtest of the recent history; last value when the history is too short to judge."""
    _check(horizon, level)
    pool = list(candidates) if candidates is not None else _all(season)
    scores = _scores(
        history, horizon=horizon, season=season, level=level, origins=origins, pool=pool
    )
    if not pool or not np.isfinite(min(scores, default=math.inf)):
        return LastValue()
    return pool[int(np.argmin(scores))]


def _all(season: int | None) -> list[Forecaster]:
    return candidates(season)


class AutoForecaster:
    """Model choice for a loop that forecasts every window (planner, simulator): re-selects
    every `reselect_every` calls or as much history growth, and in between reuses the chosen
    model's parameters (a cheap refit), so a call costs milliseconds on average. Satisfies
    `Forecaster` too (name "auto")."""

    name = "auto"

    def __init__(
        self,
        season: int | None,
        *,
        level: float = 0.8,
        reselect_every: int = 36,
        max_history: int | None = None,
        origins: int = 48,
    ) -> None:
        _check(1, level)
        self.season = season
        self.level = level
        self.reselect_every = max(1, reselect_every)
        self.max_history = max_history
        self.origins = origins
        self._model: Forecaster | None = None
        self._params: Any = None
        self._selected_at = 0
        self._calls = 0
        self._horizon = 0

    @property
    def chosen(self) -> str:
        """The selected forecaster's name ('' before the first call)."""
        return self._model.name if self._model is not None else ""

    def forecast(
        self, history: npt.ArrayLike, horizon: int, level: float | None = None
    ) -> Forecast:
        level = self.level if level is None else level
        raw = np.asarray(history, dtype=np.float64).ravel()
        if self.max_history:
            raw = raw[-self.max_history :]
        n = len(raw)
        # A young history re-selects sooner (after growing by half): an early choice made on
        # a handful of origins should not stand for the next `reselect_every` calls.
        every = min(self.reselect_every, max(1, self._selected_at // 2))
        if (
            self._model is None
            or horizon != self._horizon
            or self._calls >= self.reselect_every
            or not 0 <= n - self._selected_at < every
        ):
            self._model = select(raw, horizon, self.season, level=level, origins=self.origins)
            self._params, self._selected_at, self._calls = None, n, 0
            self._horizon = horizon
        self._calls += 1
        if isinstance(self._model, _Model):
            fc, self._params = self._model.run(raw, horizon, level, self._params)
            return fc
        return self._model.forecast(raw, horizon, level)
