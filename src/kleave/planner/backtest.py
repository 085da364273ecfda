"""Rolling-origin backtest of the forecasters and of the auto choice on one series.

Every origin sees only the data before it (the auto forecaster is walked forward through the
origins, re-selecting as it would in the planner). Gap targets (zero windows far below their
neighbours, see `forecast.missing_mask`) are excluded from every metric: a forecaster should
not be scored on predicting a hole in the source data. Pure: no I/O.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kleave.planner.forecast import (
    AutoForecaster,
    Forecast,
    Forecaster,
    baselines,
    candidates,
    missing_mask,
    naive_scale,
)


@dataclass(frozen=True)
class ModelScore:
    """One forecaster's errors per horizon step (index 0 is one step ahead)."""

    name: str
    baseline: bool
    mase: list[float]
    smape: list[float]
    coverage: list[float]
    upper_coverage: list[float]
    fit_p50_s: float
    fit_p99_s: float
    fit_mean_s: float

    @property
    def mean_mase(self) -> float:
        return _nanmean(self.mase)


@dataclass(frozen=True)
class BacktestReport:
    horizon: int
    season: int | None
    level: float
    origins: int
    first_origin: int
    stride: int
    targets: int
    excluded_targets: int
    scores: list[ModelScore]
    auto_picks: dict[str, int]
    best_baseline: str
    ratio: list[float] = field(default_factory=list)

    @property
    def auto(self) -> ModelScore:
        return next(s for s in self.scores if s.name == "auto")

    @property
    def mean_ratio(self) -> float:
        """Auto's mean MASE over the steps / the best baseline's."""
        best = next(s for s in self.scores if s.name == self.best_baseline)
        return self.auto.mean_mase / best.mean_mase if best.mean_mase else math.nan


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


class _Tally:
    """Accumulates one forecaster's per-step errors and timings."""

    def __init__(self, horizon: int) -> None:
        self.abs_scaled: list[list[float]] = [[] for _ in range(horizon)]
        self.smape: list[list[float]] = [[] for _ in range(horizon)]
        self.inside: list[list[bool]] = [[] for _ in range(horizon)]
        self.below: list[list[bool]] = [[] for _ in range(horizon)]
        self.seconds: list[float] = []

    def add(self, fc: Forecast, actual: npt.NDArray[np.float64], ok: Any, scale: float) -> None:
        for h, a in enumerate(actual.tolist()):
            if not ok[h]:
                continue
            f = float(fc.mean[h])
            self.abs_scaled[h].append(abs(f - a) / scale)
            denominator = abs(f) + abs(a)
            self.smape[h].append(200.0 * abs(f - a) / denominator if denominator else 0.0)
            self.inside[h].append(bool(fc.lower[h] <= a <= fc.upper[h]))
            self.below[h].append(bool(a <= fc.upper[h]))

    def score(self, name: str, baseline: bool) -> ModelScore:
        def mean(rows: list[list[float]] | list[list[bool]]) -> list[float]:
            return [float(np.mean(r)) if r else math.nan for r in rows]

        seconds = np.asarray(self.seconds or [math.nan])
        return ModelScore(
            name=name,
            baseline=baseline,
            mase=mean(self.abs_scaled),
            smape=mean(self.smape),
            coverage=mean(self.inside),
            upper_coverage=mean(self.below),
            fit_p50_s=float(np.percentile(seconds, 50)),
            fit_p99_s=float(np.percentile(seconds, 99)),
            fit_mean_s=float(np.mean(seconds)),
        )


def run_backtest(
    series: npt.ArrayLike,
    *,
    horizon: int,
    season: int | None,
    level: float = 0.8,
    min_train: int | None = None,
    stride: int = 1,
    missing: npt.NDArray[np.bool_] | None = None,
    forecasters: list[Forecaster] | None = None,
    reselect_every: int = 36,
) -> BacktestReport:
    """Origins from `min_train` (default: half the series) to the end, every `stride` windows.

    MASE divides each origin's absolute errors by the mean |one-step change| of the history
    before it (standard in-sample naive scaling); `missing` overrides the gap mask (e.g. the
    rate's gaps for the length series, whose gap values are carried forward)."""
    y = np.asarray(series, dtype=np.float64).ravel()
    n = len(y)
    gaps = missing_mask(y) if missing is None else np.asarray(missing, dtype=bool)
    pool = forecasters if forecasters is not None else candidates(season)
    baseline_names = {f.name for f in baselines(season)}
    first = max(2, n // 2 if min_train is None else min_train)
    origins = list(range(first, n - horizon + 1, max(1, stride)))
    if not origins:
        raise ValueError(
            f"series of {n} windows is too short for a backtest from window {first} "
            f"with horizon {horizon}"
        )
    tallies = {f.name: _Tally(horizon) for f in pool}
    auto, auto_tally, picks = (
        AutoForecaster(season, level=level, reselect_every=reselect_every),
        _Tally(horizon),
        Counter[str](),
    )
    targets = excluded = 0
    for o in origins:
        history, actual, ok = y[:o], y[o : o + horizon], ~gaps[o : o + horizon]
        scale = naive_scale(history, gaps[:o])
        usable = math.isfinite(scale) and scale > 0
        targets += int(ok.sum())
        excluded += int((~ok).sum())
        for forecaster in pool:
            began = time.perf_counter()
            fc = forecaster.forecast(history, horizon, level)
            tallies[forecaster.name].seconds.append(time.perf_counter() - began)
            if usable:
                tallies[forecaster.name].add(fc, actual, ok, scale)
        began = time.perf_counter()
        fc = auto.forecast(history, horizon)
        auto_tally.seconds.append(time.perf_counter() - began)
        picks[auto.chosen] += 1
        if usable:
            auto_tally.add(fc, actual, ok, scale)
    scores = [tallies[f.name].score(f.name, f.name in baseline_names) for f in pool]
    scores.append(auto_tally.score("auto", False))
    base = [s for s in scores if s.baseline] or scores[:1]
    best = min(base, key=lambda s: s.mean_mase if math.isfinite(s.mean_mase) else math.inf)
    ratio = [a / b if b else math.nan for a, b in zip(scores[-1].mase, best.mase, strict=True)]
    return BacktestReport(
        horizon=horizon,
        season=season,
        level=level,
        origins=len(origins),
        first_origin=first,
        stride=max(1, stride),
        targets=targets,
        excluded_targets=excluded,
        scores=scores,
        auto_picks=dict(picks.most_common()),
        best_baseline=best.name,
        ratio=ratio,
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def report_to_dict(report: BacktestReport) -> dict[str, Any]:
    """JSON-ready (NaN becomes null), with the derived means and the auto/baseline ratio."""
    out = asdict(report)
    for row, score in zip(out["scores"], report.scores, strict=True):
        row["mean_mase"] = score.mean_mase
    out["auto_mean_mase"] = report.auto.mean_mase
    out["mean_ratio"] = report.mean_ratio
    result: dict[str, Any] = _json_safe(out)
    return result


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def report_to_markdown(report: BacktestReport) -> str:
    """Forecasters x steps MASE table, then the auto/best-baseline ratio and the picks."""
    steps = [f"h{h}" for h in range(1, report.horizon + 1)]
    head = [
        "forecaster",
        *steps,
        "mean MASE",
        "sMAPE %",
        "cover",
        "upper cover",
        "fit p50 ms",
        "fit p99 ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report.scores:
        name = f"{s.name} (baseline)" if s.baseline else s.name
        cells = [
            name,
            *(_fmt(v) for v in s.mase),
            _fmt(s.mean_mase),
            _fmt(_nanmean(s.smape), 2),
            _fmt(_nanmean(s.coverage), 2),
            _fmt(_nanmean(s.upper_coverage), 2),
            _fmt(1000 * s.fit_p50_s, 1),
            _fmt(1000 * s.fit_p99_s, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ratio = ["auto / " + report.best_baseline, *(_fmt(r) for r in report.ratio)]
    ratio += [_fmt(report.mean_ratio), "", "", "", "", ""]
    lines.append("| " + " | ".join(ratio) + " |")
    picks = ", ".join(f"{name} x{count}" for name, count in report.auto_picks.items())
    top = next(iter(report.auto_picks), "-")
    lines += [
        "",
        f"{report.origins} origins from window {report.first_origin} (stride {report.stride}), "
        f"level {report.level:g}; {report.excluded_targets} gap targets of "
        f"{report.targets + report.excluded_targets} excluded from the metrics.",
        f"auto picks {top} ({picks}); auto mean MASE / best baseline ({report.best_baseline}) "
        f"= {_fmt(report.mean_ratio)}",
    ]
    return "\n".join(lines)
