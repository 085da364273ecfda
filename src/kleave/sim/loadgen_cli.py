"""`kleave loadgen`: replay a trace as vLLM-named metrics of virtual pods (see sim/loadgen.py).

Also runnable as `python -m kleave.sim.loadgen_cli` (tests use that form)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from kleave.sim.loadgen import Loadgen

_POSITIVE = click.FloatRange(min=0.0, min_open=True)


class _Failure(click.ClickException):
    """`error: ...` on stderr and exit 1, the kleave CLI's convention."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@click.command("loadgen", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Per-request (timestamp_s,input_tokens,output_tokens) or per-window rates CSV.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="0 picks a free port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address.")
@click.option(
    "--speedup", type=_POSITIVE, default=1.0, show_default=True, help="Trace seconds per second."
)
@click.option(
    "--rate-scale", type=_POSITIVE, default=1.0, show_default=True, help="Multiply the rate."
)
@click.option("--loop", is_flag=True, help="Start the trace again at its end.")
@click.option(
    "--replicas",
    default=None,
    help="Fixed pods per role, e.g. prefill=2,decode=3 [default: prefill=1,decode=1].",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Follow the InferencePools of --deployment in --namespace (ready replicas per role).",
)
@click.option("--namespace", default="default", show_default=True)
@click.option("--deployment", default=None, help="InferenceDeployment name (also pod names).")
@click.option("--model-name", default="kleave-sim", show_default=True)
@click.option("--role-label", default="kleave_dev_role", show_default=True)
@click.option("--prefill-capacity-rps", type=_POSITIVE, default=20.0, show_default=True)
@click.option("--decode-capacity-rps", type=_POSITIVE, default=10.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed the Poisson arrivals.")
def loadgen(
    *,
    trace_path: Path,
    port: int,
    host: str,
    speedup: float,
    rate_scale: float,
    loop: bool,
    replicas: str | None,
    kubeconfig: Path | None,
    namespace: str,
    deployment: str | None,
    model_name: str,
    role_label: str,
    prefill_capacity_rps: float,
    decode_capacity_rps: float,
    seed: int | None,
) -> None:
    """Serve /metrics, /healthz and /state for virtual vLLM pods replaying TRACE."""
    import numpy as np

    from kleave.sim import loadgen as lg
    from kleave.traces import TraceError, read_trace

    source: lg.ReplicaSource
    if kubeconfig is not None:
        if replicas is not None:
            raise click.UsageError("--replicas and --kubeconfig exclude each other")
        if deployment is None:
            raise click.UsageError("--kubeconfig needs --deployment (the InferenceDeployment)")
        source = lg.InferencePoolReplicas(kubeconfig, namespace, deployment)
    else:
        try:
            source = lg.StaticReplicas(lg.parse_replicas(replicas or "prefill=1,decode=1"))
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--replicas") from error
    try:
        trace = read_trace(trace_path)
    except TraceError as error:
        raise _Failure(str(error)) from error
    arrivals = lg.TraceArrivals(
        trace, rate_scale=rate_scale, loop=loop, rng=np.random.default_rng(seed)
    )
    params = lg.ModelParams(
        prefill_capacity_rps=prefill_capacity_rps, decode_capacity_rps=decode_capacity_rps
    )
    try:
        server = lg.Loadgen(
            arrivals,
            source,
            params=params,
            speedup=speedup,
            model_name=model_name,
            role_label=role_label,
            pod_prefix=deployment or "loadgen",
            host=host,
            port=port,
        )
    except OSError as error:
        raise _Failure(f"cannot listen on {host}:{port}: {error.strerror}") from error
    except ValueError as error:
        raise _Failure(str(error)) from error
    _serve(server, trace_path, len(trace))


def _serve(server: Loadgen, trace_path: Path, rows: int) -> None:
    """Run until SIGTERM or Ctrl-C; print replica-source errors once each."""
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    # The first line is the contract for scripts and tests: where to scrape.
    click.echo(f"serving {server.url}/metrics ({trace_path}: {rows} rows)")
    shown: str | None = None
    try:
        while not done.wait(1.0):
            error = server.replica_source.error
            if error and error != shown:
                click.echo(f"warning: {error}", err=True)
            shown = error
    finally:
        server.stop()


if __name__ == "__main__":
    loadgen()
