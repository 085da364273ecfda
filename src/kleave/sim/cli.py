"""`kleave simulate`: replay a trace against scaling policies and score them side by side."""

from __future__ import annotations

import json
import sys

import click

from kleave.sim.policies import POLICIES


def _scale(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        scale = float(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a positive number, got {value!r}") from None
    if not scale > 0:
        raise click.BadParameter(f"must be positive, got {value!r}")
    return scale


def _interval(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        interval = float(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or seconds, got {value!r}") from None
    if not interval >= 10:
        raise click.BadParameter(f"must be at least 10 seconds, got {value!r}")
    return interval


@click.command("simulate")
@click.option(
    "--trace",
    "trace",
    required=True,
    type=click.Path(dir_okay=False),
    help=(
        "A per-request CSV (timestamp_s,input_tokens,output_tokens) or per-window rates CSV "
        "(window_start_s,window_s,request_rate,mean_input_tokens,mean_output_tokens)."
    ),
)
@click.option(
    "--policy",
    default="all",
    show_default=True,
    type=click.Choice([*POLICIES, "all"]),
    help="Policy to score, or all side by side.",
)
@click.option(
    "--rate-scale",
    default="auto",
    show_default=True,
    help=("Multiply the load: auto picks the scale at which the peak needs about 20 P+D replicas."),
)
@click.option("--slo-ttft-ms", default=2000.0, show_default=True, type=click.FloatRange(min=1))
@click.option("--slo-tpot-ms", default=100.0, show_default=True, type=click.FloatRange(min=1))
@click.option(
    "--startup-s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Pod start-up: a scaled-up replica serves this long after it is asked for.",
)
@click.option(
    "--interval-s",
    default="auto",
    show_default=True,
    help=(
        "kleave's decision interval (and history step); auto: 60 s, or a rates file's window if "
        "longer. Static sizing uses windows of this length."
    ),
)
@click.option("--model", default="meta-llama/Llama-3.1-8B-Instruct", show_default=True)
@click.option("--prefill-gpu", default="H100-SXM", show_default=True)
@click.option("--decode-gpu", default="H100-SXM", show_default=True)
@click.option("--gpus-per-replica", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--topology", default="PD", show_default=True, type=click.Choice(["PD"]))
@click.option(
    "--max-replicas",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Upper bound of every pool, for every policy.",
)
@click.option(
    "--engine",
    "engine_kind",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "des", "fluid"]),
    help="des: discrete-event; fluid: per-window model; auto: des up to 2M requests.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--begin-s",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Start of the slice of the trace to replay.",
)
@click.option(
    "--duration-s",
    default=None,
    type=click.FloatRange(min=1),
    help="Length of the slice [default: to the end].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.option(
    "--plot",
    "plot_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a timeline PNG (load, replicas, attainment).",
)
def simulate(
    *,
    trace: str,
    policy: str,
    rate_scale: str,
    slo_ttft_ms: float,
    slo_tpot_ms: float,
    startup_s: float,
    interval_s: str,
    model: str,
    prefill_gpu: str,
    decode_gpu: str,
    gpus_per_replica: int,
    topology: str,
    max_replicas: int,
    engine_kind: str,
    seed: int,
    begin_s: float,
    duration_s: float | None,
    as_json: bool,
    plot_path: str | None,
) -> None:
    """Replay TRACE against scaling policies; score SLO attainment, goodput and GPU-hours."""
    from kleave.planner.capacity import ProfileError
    from kleave.planner.solver import Slo
    from kleave.sim import report
    from kleave.sim.runner import Options, run
    from kleave.traces import TraceError

    options = Options(
        trace=trace,
        policies=POLICIES if policy == "all" else (policy,),
        rate_scale=_scale(rate_scale),
        slo=Slo(ttft_s=slo_ttft_ms / 1000, tpot_s=slo_tpot_ms / 1000),
        startup_s=startup_s,
        model=model,
        prefill_gpu=prefill_gpu,
        decode_gpu=decode_gpu,
        gpus_per_replica=gpus_per_replica,
        topology=topology,
        interval_s=_interval(interval_s),
        max_replicas=max_replicas,
        engine=engine_kind,
        seed=seed,
        begin_s=begin_s,
        duration_s=duration_s,
    )
    try:
        result = run(options)
    except (TraceError, ProfileError, ValueError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    scale_note = "auto" if options.rate_scale is None else "given"
    if as_json:
        click.echo(f"rate scale {result.scale:g} ({scale_note})", err=True)
        click.echo(json.dumps(report.document(result), indent=2))
    else:
        click.echo(report.header(result))
        click.echo(report.table(result))
    if plot_path:
        from kleave.sim.plot import plot

        plot(result, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


if __name__ == "__main__":
    simulate()
