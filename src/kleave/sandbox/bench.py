"""`kleave sandbox bench`: claim latency and throughput of warm pools, and snapshot speed.

Against the cluster of ``$KUBECONFIG`` (a kleave operator must already run there) it:

1. creates a SandboxTemplate and a SandboxWarmPool of ``--warm`` replicas in ``--namespace``
   (the namespace too, when missing) and waits until the pool reports them all ready;
2. **warm**: creates ``--claims`` AgentSandboxes at once with the async SDK, each waiting for
   Ready, and records per sandbox the SDK's create-to-Ready time, the operator's
   ``status.claim.latencyMs`` and the claim source (all should be ``Warm``);
3. **cold**: scales the pool to 0, waits until its pods are gone, and does the same with
   ``--cold-claims`` sandboxes (source ``Cold``): the baseline a warm pool is measured against;
4. deletes everything it created, whether the run succeeded or not.

Independently of any cluster it measures snapshot and restore MB/s of a ``--snapshot-mb``
workspace on a runtime it starts itself (``bench_snapshot``). The report is a Markdown table
(``bench_stats``), or JSON with ``--json``. The exit status is 1 when a claim failed or came
from the wrong source: a benchmark that quietly measured cold starts as warm ones would lie.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from kleave.sandbox.bench_stats import BatchResult, BenchReport, SnapshotResult
    from kleave.sandbox.client_async import AsyncSandboxClient

RUN_LABEL = "kleave.dev/bench-run"
CREATED_BY = {"app.kubernetes.io/created-by": "kleave-sandbox-bench"}
POLL_SECONDS = 0.25
CLEANUP_TIMEOUT = 180.0


@dataclass(frozen=True)
class BenchSettings:
    """What one run does; the CLI's flags."""

    warm: int = 100
    claims: int = 100
    cold_claims: int | None = None
    namespace: str = "kleave-bench"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[str, ...] = ()
    image: str = "kleave/kleave:0.1.0"
    runtime_class: str | None = None
    runtime_port: int = 8080
    persistence: bool = False
    snapshot_mb: float = 100.0
    skip_cluster: bool = False
    timeout: float = 600.0
    kubeconfig: str | None = None

    @property
    def cold_count(self) -> int:
        return self.cold_claims if self.cold_claims is not None else min(self.claims, 20)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not self.skip_cluster:
            out |= {
                "namespace": self.namespace,
                "warm pool": self.warm,
                "warm claims": self.claims,
                "cold claims": self.cold_count,
            }
        out["snapshot MB"] = self.snapshot_mb
        return out


# ----- manifests (pure) -----------------------------------------------------------------------
def parse_toleration(text: str) -> dict[str, str]:
    """``KEY``, ``KEY=VALUE`` or either with ``:EFFECT``, as kubectl taint writes them."""
    rest, _, effect = text.partition(":")
    key, equals, value = rest.partition("=")
    if not key:
        raise ValueError(f"toleration {text!r} has no key: use KEY[=VALUE][:EFFECT]")
    toleration = {"key": key, "operator": "Equal" if equals else "Exists"}
    if equals:
        toleration["value"] = value
    if effect:
        toleration["effect"] = effect
    return toleration


def template_manifest(
    name: str, settings: BenchSettings, labels: Mapping[str, str]
) -> dict[str, Any]:
    """A small template: no idle pause mid-run, a lifetime that ends anything left behind."""
    spec: dict[str, Any] = {
        "image": settings.image,
        "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}},
        "tools": {"allowedCommands": ["echo"]},
        "persistence": {"enabled": settings.persistence},
        "lifetime": {
            "idleTimeoutSeconds": 0,
            "maxLifetimeSeconds": 3600,
            "ttlSecondsAfterFinished": 60,
        },
        "runtimePort": settings.runtime_port,
    }
    if settings.runtime_class:
        spec["runtimeClassName"] = settings.runtime_class
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        spec["tolerations"] = [parse_toleration(t) for t in settings.tolerations]
    return _object("SandboxTemplate", name, settings.namespace, labels, spec)


def pool_manifest(
    name: str, template: str, replicas: int, namespace: str, labels: Mapping[str, str]
) -> dict[str, Any]:
    spec = {"templateRef": {"name": template}, "replicas": replicas}
    return _object("SandboxWarmPool", name, namespace, labels, spec)


def _object(
    kind: str, name: str, namespace: str, labels: Mapping[str, str], spec: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": spec,
    }


def pool_ready(replicas: int) -> Any:
    """The wait goal: the pool reports exactly ``replicas`` ready, for its current spec."""
    from kleave.sandbox.client_kube import observed

    def goal(pool: Mapping[str, Any]) -> bool:
        status = pool.get("status") or {}
        return status.get("readyReplicas", 0) == replicas and observed(pool)

    return goal


def pool_failure(pool: Mapping[str, Any]) -> str | None:
    """A pool that cannot fill: its template is missing or refused (the operator says why)."""
    from kleave.sandbox.client_kube import conditions_of, observed

    degraded = conditions_of(pool).get("Degraded") or {}
    if degraded.get("status") == "True" and observed(pool):
        reason = degraded.get("reason")
        if reason in ("TemplateNotFound", "TemplateNotAccepted"):
            return f"the warm pool cannot fill: {reason}: {degraded.get('message', '')}"
    return None


# ----- the cluster part -----------------------------------------------------------------------
async def run_cluster(settings: BenchSettings) -> tuple[BatchResult, BatchResult]:
    """Fill a pool, claim from it warm, empty it, claim cold; always clean up."""
    from kleave.sandbox.client_async import AsyncSandboxClient
    from kleave.sandbox.client_kube import TEMPLATES, WARM_POOLS, resource_path

    run_id = secrets.token_hex(3)
    name = f"bench-{run_id}"
    labels = {RUN_LABEL: run_id, **CREATED_BY}
    ns = settings.namespace
    async with AsyncSandboxClient(namespace=ns, kubeconfig=settings.kubeconfig) as client:
        created_namespace = await _ensure_namespace(client, ns, labels, settings.timeout)
        try:
            await client.kube_request(
                "POST",
                resource_path(TEMPLATES, namespace=ns),
                body=template_manifest(name, settings, labels),
            )
            await client.kube_request(
                "POST",
                resource_path(WARM_POOLS, namespace=ns),
                body=pool_manifest(name, name, settings.warm, ns, labels),
            )
            _progress(f"waiting for {settings.warm} warm sandboxes in {ns}/{name}")
            started = time.perf_counter()
            await _wait_pool(client, name, settings.warm, settings.timeout)
            _progress(f"pool ready in {time.perf_counter() - started:.1f}s")

            warm = await claim_batch(
                client, name, settings.claims, "Warm", labels=labels, settings=settings
            )
            _progress(f"warm: {settings.claims} claims in {warm.wall_seconds:.2f}s")
            await _delete_sandboxes(client, run_id)  # the cold batch should not share the node
            await _empty_pool(client, name, settings.timeout)
            cold = await claim_batch(
                client, name, settings.cold_count, "Cold", labels=labels, settings=settings
            )
            _progress(f"cold: {settings.cold_count} claims in {cold.wall_seconds:.2f}s")
            return warm, cold
        finally:
            await _cleanup(client, name, run_id, created_namespace, settings)


async def claim_batch(
    client: AsyncSandboxClient,
    pool: str,
    count: int,
    expected: str,
    *,
    labels: Mapping[str, str],
    settings: BenchSettings,
) -> BatchResult:
    """Create ``count`` sandboxes at once from ``pool``; each timed from its create call to
    the watch event that showed it Ready."""
    from kleave.sandbox.bench_stats import BatchResult
    from kleave.sandbox.client_types import SandboxError

    async def claim() -> tuple[float, dict[str, Any]] | str:
        started = time.perf_counter()
        try:
            sandbox = await client.create(warm_pool=pool, labels=labels, timeout=settings.timeout)
        except SandboxError as error:
            return str(error)
        return (time.perf_counter() - started) * 1000, sandbox.status.get("claim") or {}

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(claim() for _ in range(count)))
    wall = time.perf_counter() - started
    result = BatchResult(expected.lower(), expected, count, wall)
    sources: Counter[str] = Counter()
    for outcome in outcomes:
        if isinstance(outcome, str):
            result.failures.append(outcome)
            continue
        client_ms, claimed = outcome
        result.client_ms.append(client_ms)
        sources[str(claimed.get("source") or "unknown")] += 1
        if claimed.get("latencyMs") is not None:
            result.operator_ms.append(float(claimed["latencyMs"]))
    result.sources = dict(sources)
    return result


async def _ensure_namespace(
    client: AsyncSandboxClient, ns: str, labels: Mapping[str, str], timeout: float
) -> bool:
    """Create the namespace unless it exists; whether this run created it (and so deletes it).

    A namespace left Terminating by an earlier run refuses new objects, so wait it out first.
    """
    from kleave.sandbox.client_kube import CORE_API, resource_path
    from kleave.sandbox.client_types import KubeApiError

    path = resource_path("namespaces", name=ns, api=CORE_API)
    deadline = time.monotonic() + timeout
    while (found := await client.kube_request("GET", path, missing_ok=True)) is not None:
        if (found.get("status") or {}).get("phase") != "Terminating":
            return False
        if time.monotonic() > deadline:
            raise click.ClickException(f"namespace {ns} is still terminating after {timeout:.0f}s")
        await asyncio.sleep(1.0)
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}
    try:
        await client.kube_request("POST", resource_path("namespaces", api=CORE_API), body=body)
    except KubeApiError as error:
        if error.status != 409:
            raise
        return False
    # Pods are refused until the namespace's default ServiceAccount exists.
    account = resource_path("serviceaccounts", namespace=ns, name="default", api=CORE_API)
    while await client.kube_request("GET", account, missing_ok=True) is None:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_SECONDS)
    return True


async def _wait_pool(client: AsyncSandboxClient, pool: str, replicas: int, timeout: float) -> None:
    from kleave.sandbox.client_kube import WARM_POOLS, ObjectWait, resource_path
    from kleave.sandbox.client_types import SandboxTimeout

    wait = ObjectWait(
        "warm pool",
        pool,
        f"{replicas} ready",
        pool_ready(replicas),
        timeout,
        failure=pool_failure,
    )
    try:
        await client.wait_for(resource_path(WARM_POOLS, namespace=client.namespace), wait)
    except SandboxTimeout as error:
        raise SandboxTimeout(
            f"{error}; is a kleave operator running against this cluster, and can the "
            "template's pods be scheduled (--node-selector, --toleration)?",
            error.last_status,
        ) from None


async def _empty_pool(client: AsyncSandboxClient, pool: str, timeout: float) -> None:
    """Scale the pool to 0 (through ``/scale``, as kubectl scale does) and wait until it has
    no live pods left, so every claim after this is a cold start."""
    from kleave.sandbox.client_kube import CORE_API, MERGE_PATCH, WARM_POOLS, resource_path
    from kleave.sandbox.client_types import SandboxTimeout

    ns = client.namespace
    await client.kube_request(
        "PATCH",
        resource_path(WARM_POOLS, namespace=ns, name=pool, subresource="scale"),
        body={"spec": {"replicas": 0}},
        content_type=MERGE_PATCH,
    )
    pods = resource_path("pods", namespace=ns, api=CORE_API)
    deadline = time.monotonic() + timeout
    while True:
        listing = await client.kube_request(
            "GET", pods, params={"labelSelector": f"kleave.dev/warm-pool={pool}"}
        )
        live = [
            p
            for p in (listing or {}).get("items", [])
            if not (p.get("metadata") or {}).get("deletionTimestamp")
        ]
        if not live:
            return
        if time.monotonic() > deadline:
            raise SandboxTimeout(
                f"the warm pool {pool} still has {len(live)} pods after scaling to 0"
            )
        await asyncio.sleep(POLL_SECONDS)


async def _delete_sandboxes(client: AsyncSandboxClient, run_id: str) -> None:
    from kleave.sandbox.client_kube import SANDBOXES, resource_path

    await client.kube_request(
        "DELETE",
        resource_path(SANDBOXES, namespace=client.namespace),
        params={"labelSelector": f"{RUN_LABEL}={run_id}"},
    )


async def _cleanup(
    client: AsyncSandboxClient,
    name: str,
    run_id: str,
    created_namespace: bool,
    settings: BenchSettings,
) -> None:
    """Delete what this run created; keep going past errors, and say what could not go."""
    from kleave.sandbox.client_kube import CORE_API, SANDBOXES, TEMPLATES, WARM_POOLS
    from kleave.sandbox.client_kube import resource_path as path
    from kleave.sandbox.client_types import SandboxError

    ns = settings.namespace
    steps: list[tuple[str, str, Mapping[str, str] | None]] = [
        ("sandboxes", path(SANDBOXES, namespace=ns), {"labelSelector": f"{RUN_LABEL}={run_id}"}),
        ("warm pool", path(WARM_POOLS, namespace=ns, name=name), None),
        ("template", path(TEMPLATES, namespace=ns, name=name), None),
    ]
    if created_namespace:
        steps.append(("namespace", path("namespaces", name=ns, api=CORE_API), None))
    for what, target, params in steps:
        try:
            await client.kube_request("DELETE", target, params=params, missing_ok=True)
        except SandboxError as error:
            _progress(f"cleanup: could not delete the {what}: {error}")
    # Wait until it is gone, so the next run does not meet a namespace being terminated.
    gone = (
        path("namespaces", name=ns, api=CORE_API)
        if created_namespace
        else path(SANDBOXES, namespace=ns)
    )
    deadline = time.monotonic() + CLEANUP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if created_namespace:
                if await client.kube_request("GET", gone, missing_ok=True) is None:
                    return
            else:
                params = {"labelSelector": f"{RUN_LABEL}={run_id}"}
                listing = await client.kube_request("GET", gone, params=params)
                if not (listing or {}).get("items"):
                    return
        except SandboxError as error:
            _progress(f"cleanup: {error}")
            return
        await asyncio.sleep(1.0)
    _progress(f"cleanup: {'namespace ' + ns if created_namespace else 'sandboxes'} still going")


def _progress(line: str) -> None:
    click.echo(line, err=True)


# ----- the whole run --------------------------------------------------------------------------
async def run_bench(settings: BenchSettings) -> BenchReport:
    """The cluster batches (unless skipped), then the local snapshot measurement."""
    from kleave.sandbox.bench_stats import BenchReport

    report = BenchReport(settings.summary())
    if not settings.skip_cluster:
        report.warm, report.cold = await run_cluster(settings)
    if settings.snapshot_mb > 0:
        report.snapshot = await run_snapshot(settings.snapshot_mb)
    return report


async def run_snapshot(megabytes: float) -> SnapshotResult:
    from kleave.sandbox.bench_snapshot import measure_snapshot
    from kleave.sandbox.bench_stats import MB

    with tempfile.TemporaryDirectory(prefix="kleave-bench-snapshot-") as workdir:
        _progress(f"snapshot: {megabytes:g} MB workspace")
        return await measure_snapshot(Path(workdir), int(megabytes * MB))


async def _until_stopped(work: Coroutine[Any, Any, BenchReport]) -> BenchReport:
    """Run the bench as a task that SIGTERM cancels like Ctrl-C does, so a killed run still
    reaches its cleanup (``finally`` blocks) instead of leaving the namespace behind."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


def _key_value(values: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, equals, val = value.partition("=")
        if not key or not equals:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--node-selector")
        pairs[key] = val
    return pairs


@click.command("bench")
@click.option(
    "--warm",
    type=click.IntRange(1, 10000),
    default=100,
    show_default=True,
    help="Replicas of the warm pool.",
)
@click.option(
    "--claims",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="AgentSandboxes created at once from the full pool.",
)
@click.option(
    "--cold-claims",
    type=click.IntRange(1),
    default=None,
    help="AgentSandboxes created at once from the emptied pool [default: min(claims, 20)].",
)
@click.option(
    "--namespace",
    default="kleave-bench",
    show_default=True,
    help="Where to run (created and deleted when missing).",
)
@click.option(
    "--node-selector",
    multiple=True,
    metavar="KEY=VALUE",
    help="Node label the sandbox pods require (repeatable).",
)
@click.option(
    "--toleration",
    multiple=True,
    metavar="KEY[=VALUE][:EFFECT]",
    help="Taint the sandbox pods tolerate (repeatable).",
)
@click.option(
    "--image",
    default="kleave/kleave:0.1.0",
    show_default=True,
    help="Sandbox image (runs `kleave sandbox runtime`).",
)
@click.option("--runtime-class", default=None, help="RuntimeClass [default: the template's].")
@click.option("--runtime-port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--persistence/--no-persistence",
    default=False,
    show_default=True,
    help="Give each sandbox a volume (PVC provisioning then counts in cold starts).",
)
@click.option(
    "--snapshot-mb",
    type=click.FloatRange(0),
    default=100.0,
    show_default=True,
    help="Workspace size for the snapshot/restore measurement (0 skips it).",
)
@click.option(
    "--skip-cluster",
    is_flag=True,
    help="Only the local snapshot/restore measurement; no cluster needed.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(1),
    default=600.0,
    show_default=True,
    help="Seconds for each wait: the pool to fill, a claim, the pool to empty.",
)
@click.option(
    "--kubeconfig", default=None, help="[default: $KUBECONFIG, in-cluster, ~/.kube/config]"
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of Markdown.")
def sandbox_bench_command(
    *,
    warm: int,
    claims: int,
    cold_claims: int | None,
    namespace: str,
    node_selector: tuple[str, ...],
    toleration: tuple[str, ...],
    image: str,
    runtime_class: str | None,
    runtime_port: int,
    persistence: bool,
    snapshot_mb: float,
    skip_cluster: bool,
    timeout: float,
    kubeconfig: str | None,
    as_json: bool,
) -> None:
    """Measure warm and cold claim latency, claims/s, and snapshot/restore MB/s."""
    from kleave.sandbox.bench_stats import render_markdown
    from kleave.sandbox.client_types import SandboxError

    for value in toleration:
        try:
            parse_toleration(value)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--toleration") from None
    settings = BenchSettings(
        warm=warm,
        claims=claims,
        cold_claims=cold_claims,
        namespace=namespace,
        node_selector=_key_value(node_selector),
        tolerations=toleration,
        image=image,
        runtime_class=runtime_class,
        runtime_port=runtime_port,
        persistence=persistence,
        snapshot_mb=snapshot_mb,
        skip_cluster=skip_cluster,
        timeout=timeout,
        kubeconfig=kubeconfig,
    )
    try:
        report = asyncio.run(_until_stopped(run_bench(settings)))
    except SandboxError as error:
        raise click.ClickException(str(error)) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        _progress("interrupted: deleted what the run had created")
        sys.exit(130)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else render_markdown(report))
    if not report.ok:
        _progress("some claims failed or came from the wrong source (see the report)")
        sys.exit(1)
