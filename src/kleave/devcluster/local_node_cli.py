"""`kleave dev-cluster local-node`: run the dev cluster's local node in the foreground.

`kleave dev-cluster up` starts it as one of the cluster's components; run by hand it joins
any cluster its kubeconfig reaches. The node itself is imported only when the command runs.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click


@click.command("local-node")
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="Credentials of the node (it registers a Node, runs pods, provisions volumes).",
)
@click.option("--name", default="kleave-local-0", show_default=True, help="The Node's name.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where pods' volumes, logs and the provisioned volumes live.",
)
@click.option(
    "--pod-cidr",
    default=None,
    help="Pod IPs come from here, a loopback range (processes bind it without setup) "
    "[default: the Node's podCIDR when it is registered, else 127.77.0.0/24].",
)
def local_node_command(kubeconfig: Path, name: str, root: Path, pod_cidr: str | None) -> None:
    """Run sandbox pods bound to NAME as local processes (NO isolation: dev only)."""
    if pod_cidr is not None:
        try:
            network = ipaddress.ip_network(pod_cidr)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--pod-cidr") from error
        if not network.is_loopback:
            raise click.BadParameter(
                f"{pod_cidr} is not a loopback range: processes could not bind its addresses "
                "without network setup; use a range inside 127.0.0.0/8",
                param_hint="--pod-cidr",
            )
        pod_cidr = str(network)
    from kleave.devcluster.local_node import LocalNodeConfig, run

    run(kubeconfig, LocalNodeConfig(name=name, root=root, pod_cidr=pod_cidr))
