"""The `kleave` command: dev-cluster, crds, operator."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kleave import __version__
from kleave.devcluster.errors import DevClusterError

F = TypeVar("F", bound=Callable[..., Any])


def _state_dir_option(func: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Cluster state directory "
        "[default: $KLEAVE_CLUSTER_DIR or $KLEAVE_CACHE/clusters/default].",
    )(func)


class LazyGroup(click.Group):
    """A group whose subcommands named in ``lazy`` are imported only when run or listed.

    ``kleave sandbox runtime`` is the process every sandbox pod starts: importing the
    planner's statsmodels/scipy stack for it cost seconds of each cold start and resume.
    """

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})  # name -> "module:attribute"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            import importlib

            module, _, attribute = self.lazy[cmd_name].partition(":")
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    lazy={
        "forecast": "kleave.planner.forecast_cli:forecast",
        "simulate": "kleave.sim.cli:simulate",
        "loadgen": "kleave.sim.loadgen_cli:loadgen",
        "workers": "kleave.workers.cli:workers",
        "bench": "kleave.workers.bench_kernels:bench",
    },
)
@click.version_option(__version__, prog_name="kleave")
def main() -> None:
    """kleave: disaggregated LLM inference and agent sandboxes on Kubernetes."""


# ----- dev-cluster ----------------------------------------------------------------------------
@main.group(
    "dev-cluster",
    cls=LazyGroup,
    lazy={"local-node": "kleave.devcluster.local_node_cli:local_node_command"},
)
def dev_cluster() -> None:
    """A real local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)."""


def _cluster(state_dir: Path | None) -> Any:
    from kleave.devcluster.cluster import DevCluster

    return DevCluster(state_dir=state_dir, progress=lambda line: click.echo(line, err=True))


def _fail(error: Exception) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(1)


@dev_cluster.command("up")
@_state_dir_option
@click.option(
    "--nodes",
    default=None,
    metavar="GROUPS",
    help="Fake nodes as COUNTxPRODUCT[:GPUS],... [default: 4xH100-SXM:8,4xH20:8,2xcpu].",
)
@click.option(
    "--apiserver-port", type=click.IntRange(0, 65535), default=0, help="0 picks a free port."
)
@click.option(
    "--timeout", type=float, default=120.0, show_default=True, help="Seconds per component."
)
def dev_cluster_up(
    state_dir: Path | None, nodes: str | None, apiserver_port: int, timeout: float
) -> None:
    """Build (once) and start the cluster; a no-op when it already runs."""
    from kleave.devcluster.nodes import parse_node_groups

    try:
        groups = parse_node_groups(nodes) if nodes is not None else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--nodes") from error
    cluster = _cluster(state_dir)
    try:
        state = cluster.up(node_groups=groups, apiserver_port=apiserver_port, timeout=timeout)
    except DevClusterError as error:
        _fail(error)
    except KeyboardInterrupt:
        click.echo("interrupted: stopped what had started", err=True)
        sys.exit(130)
    click.echo(state.kubeconfig)
    click.echo(
        f"\nThe cluster is up ({len(state.nodes)} nodes). Use it with:\n"
        f"  export KUBECONFIG={state.kubeconfig}\n"
        "  kubectl get nodes -L nvidia.com/gpu.product\n"
        f"Stop it with: kleave dev-cluster down{_state_flag(state_dir)}",
        err=True,
    )


@dev_cluster.command("build")
def dev_cluster_build() -> None:
    """Build the pinned control-plane binaries into the cache (skips what is built)."""
    from kleave.devcluster.build import Builder
    from kleave.devcluster.paths import Binaries, cache_dir

    try:
        binaries = Builder(Binaries(cache_dir()), lambda line: click.echo(line, err=True)).ensure()
    except DevClusterError as error:
        _fail(error)
    click.echo(binaries.root)


@dev_cluster.command("down")
@_state_dir_option
def dev_cluster_down(state_dir: Path | None) -> None:
    """Stop every process of the cluster and delete its state directory."""
    cluster = _cluster(state_dir)
    try:
        stopped = cluster.down()
    except DevClusterError as error:
        _fail(error)
    click.echo(
        f"stopped {stopped} processes; removed {cluster.state_dir}"
        if stopped
        else "no dev cluster running"
    )


@dev_cluster.command("status")
@_state_dir_option
def dev_cluster_status(state_dir: Path | None) -> None:
    """Show each component, the API server's readiness and node readiness (exit 1 unless up)."""
    status = _cluster(state_dir).status()
    if status.state is None:
        click.echo(f"no dev cluster in {status.state_dir}")
        sys.exit(1)
    click.echo(f"state dir:  {status.state_dir}\nserver:     {status.state.server}")
    click.echo(f"kubeconfig: {status.state.kubeconfig}\nphase:      {status.state.phase}")
    for component in status.components:
        click.echo(
            f"  {component.name:<24} pid {component.pid:<8} "
            + ("running" if component.alive else "DEAD")
        )
    click.echo(f"API server: {'ready' if status.apiserver_ready else 'NOT ready'}")
    click.echo(f"nodes:      {status.nodes_ready}/{status.nodes_total} Ready")
    sys.exit(0 if status.running else 1)


@dev_cluster.command("kubeconfig")
@_state_dir_option
def dev_cluster_kubeconfig(state_dir: Path | None) -> None:
    """Print the kubeconfig path (for `export KUBECONFIG=$(kleave dev-cluster kubeconfig)`)."""
    cluster = _cluster(state_dir)
    if cluster.load_state() is None:
        _fail(
            DevClusterError(f"no dev cluster in {cluster.state_dir}: run `kleave dev-cluster up`")
        )
    click.echo(cluster.kubeconfig_path)


def _state_flag(state_dir: Path | None) -> str:
    return f" --state-dir {state_dir}" if state_dir else ""


# ----- crds -----------------------------------------------------------------------------------
_crds_dir_option = click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("crds"),
    show_default=True,
    help="Directory of the CRD YAML files.",
)


@main.group("crds")
def crds() -> None:
    """CustomResourceDefinitions generated from kleave.api."""


@crds.command("generate")
@_crds_dir_option
def crds_generate(output: Path) -> None:
    """Write the CRD YAML files (checked in under crds/ and the Helm chart)."""
    from kleave.api.registry import write_crds

    for path in write_crds(output):
        click.echo(path)


@crds.command("check")
@_crds_dir_option
def crds_check(output: Path) -> None:
    """Exit 1 when the checked-in CRDs differ from what kleave.api generates."""
    from kleave.api.registry import crd_drift

    drift = crd_drift(output)
    for line in drift:
        click.echo(line, err=True)
    if drift:
        click.echo("run `kleave crds generate` and commit the result", err=True)
        sys.exit(1)
    click.echo("crds are up to date")


# ----- operator -------------------------------------------------------------------------------
@main.group("operator")
def operator() -> None:
    """The kleave operator (kopf)."""


@operator.command("run")
@click.option(
    "-n", "--namespace", "namespaces", multiple=True, help="Watch this namespace (repeatable)."
)
@click.option("-A", "--all-namespaces", is_flag=True, help="Watch every namespace (cluster-wide).")
@click.option(
    "--standalone/--peering",
    default=True,
    show_default=True,
    help="--peering: replicas share a kopf peering object; the highest --priority works, "
    "the others stand by (give each replica a distinct priority; needs kopf's peering CRDs).",
)
@click.option("--peering-name", default="kleave", show_default=True, help="Peering object name.")
@click.option("--priority", type=int, default=0, show_default=True, help="Peering priority.")
@click.option("--health-host", default="0.0.0.0", show_default=True, help="Probe/metrics address.")
@click.option("--health-port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option("--log-level", default="INFO", show_default=True)
@click.option(
    "--leader-elect",
    is_flag=True,
    help="Elect one active replica with a coordination.k8s.io Lease; the others stand by "
    "(ready) and take over when it goes. Replaces --peering.",
)
@click.option(
    "--leader-election-namespace",
    default=None,
    help="Namespace of the Lease [default: the pod's namespace, else $POD_NAMESPACE].",
)
@click.option(
    "--leader-election-id",
    default="kleave-operator",
    show_default=True,
    help="Name of the Lease; replicas sharing it elect one leader.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Kubeconfig to use [default: in-cluster, then $KUBECONFIG / ~/.kube/config].",
)
@click.option(
    "--runtime-token-key-file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Key the sandbox pods' runtime tokens are derived from (32+ bytes; every replica "
    "needs the same) [default: $KLEAVE_RUNTIME_TOKEN_KEY_FILE, else "
    "~/.config/kleave/runtime-token.key, created if missing].",
)
def operator_run(
    *,
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    standalone: bool,
    peering_name: str,
    priority: int,
    health_host: str,
    health_port: int,
    log_format: str,
    log_level: str,
    leader_elect: bool,
    leader_election_namespace: str | None,
    leader_election_id: str,
    kubeconfig: str | None,
    runtime_token_key_file: str | None,
) -> None:
    """Run the operator: reconcile kleave's resources; serve /healthz, /readyz and /metrics."""
    import os

    # --peering-name has a default, so only its source tells whether it was given; passing it
    # on lets run() reject it next to --leader-elect instead of ignoring it.
    source = click.get_current_context().get_parameter_source("peering_name")
    peering_name_given = source is not click.core.ParameterSource.DEFAULT

    # Scope checks (namespaces vs --all-namespaces, peering flags) live in runtime.run().
    if kubeconfig:
        # Before the kubernetes client is imported: it reads $KUBECONFIG at import time.
        os.environ["KUBECONFIG"] = kubeconfig
    from kleave.operator.sandbox_tokens import KEY_FILE_ENV, TokenKeyError, load_key

    if runtime_token_key_file:
        os.environ[KEY_FILE_ENV] = runtime_token_key_file
    try:
        load_key()  # a bad key is a clear error now, not a traceback once kopf runs
    except TokenKeyError as error:
        _fail(error)

    from kleave.operator.leader import LostLeadership
    from kleave.operator.runtime import OperatorStartupError, run

    try:
        run(
            namespaces=list(namespaces) or None,
            all_namespaces=all_namespaces,
            standalone=standalone,
            peering_name=(
                peering_name if not standalone or (leader_elect and peering_name_given) else None
            ),
            health_host=health_host,
            health_port=health_port,
            log_format=log_format,
            log_level=log_level,
            priority=priority,
            leader_elect=leader_elect,
            leader_election_namespace=leader_election_namespace,
            leader_election_id=leader_election_id,
        )
    except (OperatorStartupError, LostLeadership) as error:
        _fail(error)


# ----- demo -----------------------------------------------------------------------------------
@main.group("demo")
def demo() -> None:
    """The local demo behind `make demo`."""


@demo.command("up")
@click.option(
    "--examples",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("examples"),
    show_default=True,
)
def demo_up(examples: Path) -> None:
    """Start the dev cluster and the operator, apply the examples, show them."""
    from kleave.demo import Demo

    try:
        Demo(_cluster(None), examples, click.echo).up()
    except DevClusterError as error:
        _fail(error)


@demo.command("down")
def demo_down() -> None:
    """Stop the demo's operator and cluster."""
    dev_cluster_down.callback(state_dir=None)  # type: ignore[misc]


# ----- sandbox --------------------------------------------------------------------------------
@main.group(
    "sandbox",
    cls=LazyGroup,
    lazy={
        "runtime": "kleave.sandbox.runtime_cli:sandbox_runtime_command",
        "bench": "kleave.sandbox.bench:sandbox_bench_command",
    },
)
def sandbox() -> None:
    """Agent sandboxes: the in-sandbox runtime and the claim benchmark."""
