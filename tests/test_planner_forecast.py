"""Forecasters, model choice, backtest metrics and the `forecast backtest` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kleave.planner import forecast as fc
from kleave.planner.backtest import report_to_dict, report_to_markdown, run_backtest
from kleave.planner.forecast_cli import forecast as forecast_group


def _daily(days: int, season: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(days * season)
    return 100 + 40 * np.sin(2 * np.pi * t / season) + rng.normal(0, 1.0, len(t))


def test_last_value_and_moving_average_by_hand() -> None:
    f = fc.LastValue().forecast(np.array([1.0, 2.0, 3.0]), 2, 0.8)
    assert f.model == "last_value"
    assert f.mean.tolist() == [3.0, 3.0]
    m = fc.MovingAverage(2).forecast(np.array([1.0, 2.0, 3.0, 5.0]), 3, 0.8)
    assert m.mean.tolist() == [4.0, 4.0, 4.0]


def test_seasonal_naive_by_hand() -> None:
    f = fc.SeasonalNaive(3).forecast(np.array([9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0]), 5, 0.8)
    # Season 3: next windows repeat the last full cycle [3, 4, 5] (positions 5, 6, 7).
    assert f.mean.tolist() == [3.0, 4.0, 5.0, 3.0, 4.0]


def test_seasonal_naive_short_history_falls_back() -> None:
    f = fc.SeasonalNaive(24).forecast(np.array([5.0, 6.0]), 3, 0.8)
    assert f.model == "last_value"
    assert f.mean.tolist() == [6.0, 6.0, 6.0]


@pytest.mark.parametrize("forecaster", fc.candidates(24), ids=lambda f: f.name)
def test_intervals_ordered_and_non_negative(forecaster: fc.Forecaster) -> None:
    rng = np.random.default_rng(3)
    series = np.abs(_daily(6) - 100 + rng.normal(0, 20, 144))  # dips near zero
    out = forecaster.forecast(series, 6, 0.8)
    assert out.mean.shape == out.lower.shape == out.upper.shape == (6,)
    assert np.all(np.isfinite(out.mean))
    assert np.all(out.lower >= 0)
    assert np.all(out.lower <= out.mean)
    assert np.all(out.mean <= out.upper)
    assert out.level == 0.8


@pytest.mark.parametrize(
    "history",
    [
        [],
        [5.0],
        [0.0] * 50,
        [3.0] * 400,
        [np.nan] * 30,
        [1.0, np.nan, np.inf, -4.0, 2.0, 3.0] * 20,
        list(np.r_[np.full(200, 1000.0), np.zeros(10), np.full(100, 1100.0)]),
    ],
    ids=["empty", "one", "all-zero", "constant", "all-nan", "invalid", "gap"],
)
def test_degenerate_histories_do_not_crash(history: list[float]) -> None:
    for forecaster in fc.candidates(24):
        out = forecaster.forecast(np.asarray(history), 4, 0.8)
        assert np.all(np.isfinite(out.mean)), forecaster.name
        assert np.all((out.lower <= out.mean) & (out.mean <= out.upper)), forecaster.name
    auto = fc.AutoForecaster(24)
    assert np.all(np.isfinite(auto.forecast(np.asarray(history), 4).mean))


def test_gap_is_imputed_not_forecast() -> None:
    series = np.r_[np.full(200, 1000.0), np.zeros(5)]
    assert fc.missing_mask(series)[-5:].all()
    assert fc.LastValue().forecast(series, 2, 0.8).mean.tolist() == [1000.0, 1000.0]
    # A sparse low-count series keeps its zeros: they are load, not gaps.
    sparse = np.random.default_rng(1).poisson(2.0, 300).astype(float)
    assert not fc.missing_mask(sparse)[sparse == 0].any()


def test_select_picks_last_value_on_random_walk() -> None:
    walk = 1000 + np.cumsum(np.random.default_rng(7).normal(0, 10, 600))
    assert fc.select(walk, 3, None, candidates=fc.baselines(None)).name == "last_value"
    # Smoothers with alpha ~ 1 tie with it there; whatever wins must forecast like it.
    chosen = fc.select(walk, 3, None)
    assert abs(chosen.forecast(walk, 1, 0.8).mean[0] - walk[-1]) < 5.0


def test_select_picks_a_seasonal_model_on_daily_series() -> None:
    chosen = fc.select(_daily(8), 6, 24)
    assert chosen.name in {"seasonal_naive", "seasonal_ses", "stl_arima", "direct_regression"}


def test_auto_forecaster_reselects_only_every_n_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = fc.select

    def counting(history: np.ndarray, *args: object, **kwargs: object) -> fc.Forecaster:
        calls.append(len(history))
        return real(history, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fc, "select", counting)
    series = _daily(5)
    auto = fc.AutoForecaster(24, reselect_every=10)
    for n in range(60, 90):
        out = auto.forecast(series[:n], 3)
        assert out.mean.shape == (3,)
    assert calls == [60, 70, 80]
    assert auto.chosen


def test_mase_and_smape_by_hand() -> None:
    series = np.array([1.0, 3.0, 4.0, 8.0, 9.0, 15.0])
    report = run_backtest(series, horizon=1, season=None, min_train=4, forecasters=[fc.LastValue()])
    last = report.scores[0]
    # Origin 4: scale (2+1+4)/3, error 1; origin 5: scale (2+1+4+1)/4, error 6.
    assert last.mase[0] == pytest.approx((1 / (7 / 3) + 6 / 2) / 2)
    assert last.smape[0] == pytest.approx((200 * 1 / 17 + 200 * 6 / 24) / 2)
    assert report.origins == 2
    assert report.best_baseline == "last_value"
    assert report.scores[-1].name == "auto"
    json.dumps(report_to_dict(report))
    assert "auto picks" in report_to_markdown(report)


def test_backtest_excludes_gap_targets() -> None:
    series = np.r_[np.full(100, 500.0) + np.arange(100), np.zeros(4), np.full(40, 620.0)]
    report = run_backtest(series, horizon=2, season=None, forecasters=[fc.LastValue()])
    assert report.excluded_targets == 8  # 4 gap windows, each a target of 2 origins
    assert np.isfinite(report.scores[0].mase).all()


def _rates_csv(path: Path, windows: int, *, bad_line: int | None = None) -> Path:
    rows = ["window_start_s,window_s,request_rate,mean_input_tokens,mean_output_tokens"]
    rng = np.random.default_rng(5)
    for i in range(windows):
        rate = "abc" if bad_line == i + 2 else f"{50 + 5 * np.sin(i / 5) + rng.normal():.3f}"
        rows.append(f"{i * 60},60,{rate},{500 + i},{100 + i % 7}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_json(tmp_path: Path) -> None:
    file = _rates_csv(tmp_path / "r.csv", 60)
    result = CliRunner().invoke(
        forecast_group, ["backtest", "--rates", str(file), "--horizon", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert {"file", "windows", "step_s", "season", "horizon", "level", "quantities"} <= set(out)
    rate = out["quantities"]["rate"]
    assert {
        "scores",
        "auto_picks",
        "best_baseline",
        "ratio",
        "mean_ratio",
        "auto_mean_mase",
    } <= set(rate)
    assert {s["name"] for s in rate["scores"]} >= {"last_value", "ensemble", "auto"}
    assert len(rate["scores"][0]["mase"]) == 2


def test_cli_markdown_requests(tmp_path: Path) -> None:
    file = tmp_path / "q.csv"
    times = np.cumsum(np.random.default_rng(2).exponential(0.5, 4000))
    file.write_text(
        "timestamp_s,input_tokens,output_tokens\n" + "".join(f"{t:.3f},100,20\n" for t in times)
    )
    result = CliRunner().invoke(
        forecast_group,
        ["backtest", "--requests", str(file), "--window", "30", "--horizon", "2"],
    )
    assert result.exit_code == 0, result.output
    assert "| forecaster | h1 | h2 |" in result.output
    assert "auto picks" in result.output


def test_cli_requests_needs_window(tmp_path: Path) -> None:
    result = CliRunner().invoke(forecast_group, ["backtest", "--requests", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "--window" in result.output


def test_cli_needs_exactly_one_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(forecast_group, ["backtest"])
    assert result.exit_code == 2
    assert "exactly one" in result.output


def test_cli_malformed_file(tmp_path: Path) -> None:
    file = _rates_csv(tmp_path / "bad.csv", 10, bad_line=4)
    result = CliRunner().invoke(forecast_group, ["backtest", "--rates", str(file)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "line 4" in result.stderr
    assert "Traceback" not in result.output
