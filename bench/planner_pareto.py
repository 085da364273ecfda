"""Planner policies at equal GPU-hours: each dynamic policy's provisioning knob swept on the
same trace, so attainment is compared where the GPU-hours match, not only at each policy's
default (a policy that under-provisions always spends less and misses more).

Knobs: dynamo-sla's load multiplier (`headroom`, 1.0 is Dynamo's formula), reactive's queue
threshold, kleave's sizing attainment and forecast level. The table lists every point and, for
each baseline point, kleave's attainment interpolated at that point's GPU-hours (on kleave's
own curve) and the other way round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from kleave.sim import runner
from kleave.sim.policies import DynamoSla, Kleave, Reactive, Static
from kleave.sim.scenario import Scenario

TRACES = Path(os.environ.get("KLEAVE_TRACES", Path(__file__).parents[2] / "shared" / "traces"))
SERVEGEN = ("servegen_m-mid_rates.csv", 0.13)
"""The 14-day rates trace at the scale `kleave simulate` picks for it (fluid engine)."""


def _reactive(scenario: Scenario, queue_up: float) -> Reactive:
    policy = Reactive(scenario)
    policy.queue_up = queue_up
    return policy


def variants() -> dict[str, runner.PolicyMaker]:
    points: dict[str, runner.PolicyMaker] = {"static": Static}
    for queue in (5.0, 2.0, 0.5):
        points[f"reactive queue={queue:g}"] = partial(_reactive, queue_up=queue)
    for headroom in (1.0, 1.15, 1.3, 1.5):
        points[f"dynamo-sla headroom={headroom:g}"] = partial(DynamoSla, headroom=headroom)
    for sizing, level in ((0.99, 0.8), (0.95, 0.8), (0.9, 0.5), (0.8, 0.5)):
        label = f"kleave sizing={sizing:g} level={level:g}"
        points[label] = partial(Kleave, sizing_attainment=sizing, level=level)
    return points


@dataclass(frozen=True)
class Point:
    label: str
    family: str
    gpu_hours: float
    attainment: float
    misses: float


def _interpolate(curve: Sequence[Point], gpu_hours: float) -> float | None:
    """Attainment on a family's curve at `gpu_hours` (None outside the swept range)."""
    pts = sorted(curve, key=lambda p: p.gpu_hours)
    xs = [p.gpu_hours for p in pts]
    if not pts or gpu_hours < xs[0] or gpu_hours > xs[-1]:
        return None
    # The frontier: attainment can only rise with GPU-hours (a dominated point is ignored).
    ys = np.maximum.accumulate([p.attainment for p in pts])
    return float(np.interp(gpu_hours, xs, ys))


def score(trace: str, scale: float | None) -> list[Point]:
    options = runner.Options(trace=str(TRACES / trace), policies=(), rate_scale=scale)
    run = runner.run(options, variants())
    points = []
    for result in run.results:
        gpu_hours = sum(result.gpu_seconds.values()) / 3600.0
        family = result.policy.split(" ")[0]
        attainment = result.both_ok / result.requests if result.requests else 0.0
        misses = result.requests - result.both_ok
        points.append(Point(result.policy, family, gpu_hours, attainment, misses))
    return points


def _at(curve: Sequence[Point], gpu_hours: float) -> str:
    at = _interpolate(curve, gpu_hours)
    if at is not None:
        return f"{at:.2%}"
    top = max(curve, key=lambda p: p.gpu_hours)
    if gpu_hours > top.gpu_hours:
        return f"beyond its range (at most {top.attainment:.2%} at {top.gpu_hours:,.1f})"
    return "below its range"


def table(trace: str, points: list[Point]) -> str:
    """Every point, then each baseline's attainment interpolated at kleave's default point's
    GPU-hours, and kleave's at each baseline's default point's."""
    lines = [
        f"### {trace}",
        "",
        "| policy | GPU-hours | SLO attain. | misses |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {p.label} | {p.gpu_hours:,.1f} | {p.attainment:.2%} | {p.misses:,.0f} |" for p in points
    ]
    kleave = [p for p in points if p.family == "kleave"]
    own = kleave[0]
    lines += [
        "",
        f"| baseline | its attainment at kleave's {own.gpu_hours:,.1f} GPU-hours "
        f"(kleave: {own.attainment:.2%}) | kleave's at the baseline's default GPU-hours |",
        "|---|---|---|",
    ]
    for family in dict.fromkeys(p.family for p in points if p.family not in ("kleave", "static")):
        curve = [p for p in points if p.family == family]
        lines.append(
            f"| {family} | {_at(curve, own.gpu_hours)} | {_at(kleave, curve[0].gpu_hours)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench planner")
    parser.add_argument("--json", type=Path, help="also write the points as JSON here")
    parser.add_argument(
        "--traces", default="servegen,mooncake,azure", help="comma-separated subset"
    )
    args = parser.parse_args(list(argv))
    chosen: dict[str, tuple[str, float | None]] = {
        "servegen": SERVEGEN,
        "mooncake": ("mooncake_conversation_requests.csv", None),
        "azure": ("azure2023_code_requests.csv", None),
    }
    out = [
        "## Planner policies at equal GPU-hours",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}."
        " Llama-3.1-8B on one H100 per replica, SLO TTFT 2 s / TPOT 100 ms, start-up 60 s.",
        "",
    ]
    dump: dict[str, list[dict[str, object]]] = {}
    for key in args.traces.split(","):
        trace, scale = chosen[key]
        points = score(trace, scale)
        dump[trace] = [p.__dict__ for p in points]
        out += [table(trace, points), ""]
    if args.json:
        args.json.write_text(json.dumps(dump, indent=2))
    return "\n".join(out)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
