"""Side-by-side tables and the JSON document of a simulated run."""

from __future__ import annotations

from typing import Any

from kleave.sim.metrics import summarize
from kleave.sim.runner import Run

COLUMNS = (
    ("policy", "policy", "{}"),
    ("SLO attain.", "slo_attainment", "{:.2%}"),
    ("TTFT attain.", "ttft_attainment", "{:.2%}"),
    ("TPOT attain.", "tpot_attainment", "{:.2%}"),
    ("misses", "misses", "{:,}"),
    ("GPU-hours", "gpu_hours", "{:.1f}"),
    ("goodput req/s", "goodput", "{:.2f}"),
    ("p90 TTFT s", "p90_ttft_s", "{:.2f}"),
    ("p99 TTFT s", "p99_ttft_s", "{:.2f}"),
    ("p90 TPOT ms", "p90_tpot_s", "{:.1f}"),
    ("mean P/D", "mean_replicas", "{}"),
    ("actions", "scaling_actions", "{:,}"),
)


def _cell(key: str, fmt: str, row: dict[str, Any]) -> str:
    value = row[key]
    if key == "mean_replicas":
        return "/".join(f"{v:.1f}" for v in value.values())
    if key == "p90_tpot_s":
        value = value * 1000
    return fmt.format(value)


def document(run: Run) -> dict[str, Any]:
    """What `--json` prints: the setup, then one entry per policy."""
    o = run.options
    return {
        "trace": o.trace,
        "rate_scale": run.scale,
        "engine": run.engine,
        "requests": round(run.requests),
        "slo": {"ttft_s": o.slo.ttft_s, "tpot_s": o.slo.tpot_s},
        "startup_s": o.startup_s,
        "interval_s": run.interval_s,
        "model": o.model,
        "gpus": {
            "prefill": o.prefill_gpu,
            "decode": o.decode_gpu,
            "per_replica": o.gpus_per_replica,
        },
        "policies": {
            r.policy: {**summarize(r), "wall_s": round(run.wall_s[r.policy], 2)}
            for r in run.results
        },
    }


def table(run: Run) -> str:
    """A Markdown table, one row per policy."""
    rows = [summarize(r) for r in run.results]
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(_cell(k, f, row) for _, k, f in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def header(run: Run) -> str:
    o = run.options
    ceiling = run.results[0].ceiling if run.results else 1.0
    return (
        f"{o.trace}: {run.requests:,.0f} requests at rate scale {run.scale:g} "
        f"({'auto' if o.rate_scale is None else 'given'}), {run.engine} engine, "
        f"SLO TTFT {o.slo.ttft_s * 1000:.0f} ms / TPOT {o.slo.tpot_s * 1000:.0f} ms, "
        f"start-up {o.startup_s:g} s, planner interval {run.interval_s:g} s; "
        f"{ceiling:.2%} of requests can meet the SLO on an idle cluster"
    )
