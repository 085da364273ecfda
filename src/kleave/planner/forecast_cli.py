"""`kleave forecast backtest`: how well each forecaster (and the auto choice) did on a trace.

Registered by the top-level CLI with `main.add_command(forecast)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

QUANTITIES = {
    "rate": "request_rate",
    "isl": "mean_input_tokens",
    "osl": "mean_output_tokens",
}


@click.group("forecast")
def forecast() -> None:
    """Load forecasting for the planner (request rate, mean input/output lengths)."""


@forecast.command("backtest")
@click.option(
    "--rates",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Per-window file: window_start_s,window_s,request_rate,mean_input_tokens,...",
)
@click.option(
    "--requests",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Per-request file: timestamp_s,input_tokens,output_tokens (needs --window).",
)
@click.option(
    "--window",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Aggregate --requests into windows of this many seconds.",
)
@click.option(
    "--horizon", type=click.IntRange(min=1), default=6, show_default=True, metavar="STEPS"
)
@click.option(
    "--quantity",
    type=click.Choice([*QUANTITIES, "all"]),
    default="rate",
    show_default=True,
)
@click.option(
    "--level",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.8,
    show_default=True,
    help="Central interval level; the planner provisions for its upper bound.",
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Windows between backtest origins (higher is faster).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def backtest(
    *,
    rates: Path | None,
    requests: Path | None,
    window: float | None,
    horizon: int,
    quantity: str,
    level: float,
    stride: int,
    as_json: bool,
) -> None:
    """Rolling-origin backtest on the second half of a trace: MASE per horizon step,
    sMAPE, interval coverage and fit time per forecaster, and what the auto choice picks."""
    from kleave.planner.backtest import report_to_dict, report_to_markdown, run_backtest
    from kleave.planner.forecast import missing_mask
    from kleave.traces import RateSeries, TraceError, read_rates, read_requests

    if (rates is None) == (requests is None):
        raise click.UsageError("give exactly one of --rates FILE or --requests FILE")
    if requests is not None and window is None:
        raise click.UsageError("--requests needs --window SECONDS to aggregate into windows")
    if rates is not None and window is not None:
        raise click.UsageError("--window applies to --requests only; --rates files are windowed")
    try:
        series: RateSeries = (
            read_rates(rates)
            if rates is not None
            else read_requests(requests or Path()).to_rates(window or 0.0)
        )
    except TraceError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    season = series.season_length()
    missing = missing_mask(series.request_rate)
    names = list(QUANTITIES) if quantity == "all" else [quantity]
    reports: dict[str, Any] = {}
    try:
        for name in names:
            values = getattr(series, QUANTITIES[name])
            reports[name] = run_backtest(
                values,
                horizon=horizon,
                season=season,
                level=level,
                stride=stride,
                missing=missing,
            )
    except ValueError as error:
        click.echo(f"error: {series.path}: {error}", err=True)
        sys.exit(1)
    if as_json:
        out = {
            "file": series.path,
            "windows": len(series),
            "step_s": series.step_s,
            "season": season,
            "horizon": horizon,
            "level": level,
            "quantities": {name: report_to_dict(r) for name, r in reports.items()},
        }
        click.echo(json.dumps(out))
        return
    click.echo(
        f"{series.path}: {len(series)} windows of {series.step_s:g} s, "
        f"season {season or 'none'}, horizon {horizon}"
    )
    for name, report in reports.items():
        click.echo(f"\n## {name}\n")
        click.echo(report_to_markdown(report))
