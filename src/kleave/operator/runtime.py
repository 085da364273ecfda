"""Run the operator: kopf embedded in our own event loop, next to the health/metrics server.

kleave runs kopf through ``kopf.operator()`` rather than the ``kopf run`` CLI so that it owns
the settings, the handler registry and the process's logging, and so that the probes and
``/metrics`` share kopf's loop (an answer from them proves the loop is responsive).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client, config

from kleave.operator.controllers import Controllers
from kleave.operator.health import HealthServer, HealthState
from kleave.operator.kube import KubeApi
from kleave.operator.leader import (
    DEFAULT_LEASE_NAME,
    LeaderElector,
    check_lease_name,
    default_identity,
    pod_namespace,
)
from kleave.operator.logging_setup import (
    LOG_FORMATS,
    LogFormat,
    configure_kopf_posting,
    configure_logging,
)
from kleave.operator.peering import DEFAULT_PEERING_NAME, PeeringSetupError, ensure_peering
from kleave.operator.sandbox_controllers import SandboxControllers

logger = logging.getLogger("kleave.operator")

DEFAULT_HEALTH_HOST = "0.0.0.0"  # all interfaces: probes come from the kubelet, not localhost
DEFAULT_HEALTH_PORT = 8080
# kopf treats every annotation under its storage prefix as its own and leaves it out of the
# diffs that trigger handlers; a sub-domain keeps user-facing kleave.dev/* annotations visible.
ANNOTATION_PREFIX = "operator.kleave.dev"
FINALIZER = "kleave.dev/finalizer"
EVENT_COMPONENT = "kleave-operator"

# Watch requests: ask the API server to end each stream after 5 minutes (kopf resumes from the
# last resourceVersion), and give the client a little longer so the server ends it first.
# An int on purpose: kopf sends it verbatim as ?timeoutSeconds=, and the API server rejects
# "300.0" with 400 BadRequest, which stops every watcher.
WATCH_SERVER_TIMEOUT_S = 300
WATCH_CLIENT_TIMEOUT_S = 330.0
WATCH_CONNECT_TIMEOUT_S = 30.0
# Ordinary requests (patches, events): fail and retry long before kopf's 5-minute default.
REQUEST_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 15.0


class OperatorStartupError(RuntimeError):
    """The operator cannot start as configured; the message is one line saying what to do."""


@dataclass(frozen=True)
class _Scope:
    clusterwide: bool
    namespaces: tuple[str, ...]
    peering_name: str | None  # None: standalone


def run(
    *,
    namespaces: Sequence[str] | None,
    all_namespaces: bool,
    standalone: bool,
    peering_name: str | None,
    health_host: str,
    health_port: int,
    log_format: str,
    log_level: str,
    priority: int = 0,
    leader_elect: bool = False,
    leader_election_namespace: str | None = None,
    leader_election_id: str = DEFAULT_LEASE_NAME,
) -> None:
    """Run the operator until SIGINT/SIGTERM, then return (exit status 0 for the CLI).

    Each argument maps to one ``kleave operator run`` flag:

    * ``namespaces`` (``--namespace/-n NAME``, repeatable): watch only these namespaces. kopf
      also accepts patterns (``dev-*``, ``!kube-system``), but only with ``--standalone``.
    * ``all_namespaces`` (``--all-namespaces/-A``): watch every namespace. Exactly one of this
      and ``namespaces`` must be given, so the scope is never implied.
    * ``standalone`` (``--standalone``): no peering; for a single replica or local development.
      Without it, replicas coordinate through kopf's peering objects: the one with the
      highest priority works and the others stand by (still ready and healthy). This needs the
      peering CRDs from ``crds/``; a missing peering object is created.
    * ``peering_name`` (``--peering-name NAME``): which peering object the replicas share;
      default ``kleave``. ``KopfPeering`` in each watched namespace, or ``ClusterKopfPeering``
      with ``--all-namespaces``. Not allowed with ``--standalone``.
    * ``priority`` (``--priority N``, default 0): peering priority; a replica pauses while a
      live peer has a higher one, and resumes when that peer exits or its keep-alive expires
      (60 s after a crash). Peering is not leader election: replicas with *equal* priorities
      all pause (kopf warns "Possibly conflicting operators"), so several replicas need
      distinct priorities. A debugging copy with a higher priority takes over from the
      in-cluster one.
    * ``health_host``/``health_port`` (``--health-host``, ``--health-port``; defaults
      ``0.0.0.0``:8080): where ``/healthz``, ``/readyz`` and ``/metrics`` are served. Port 0
      picks a free port (logged at startup).
    * ``log_format`` (``--log-format text|json``) and ``log_level``
      (``--log-level debug|info|warning|error|critical``).
    * ``leader_elect`` (``--leader-elect``): leader election with a ``coordination.k8s.io``
      Lease, so that of several replicas exactly one reconciles. Replaces peering (kopf runs
      standalone in the leader), so it excludes ``--peering``/``--peering-name``. A standby
      serves ``/healthz`` and ``/readyz`` (200: it is ready to take over) and starts kopf once
      it holds the Lease. A leader that cannot renew the Lease stops and raises
      :class:`LostLeadership` (the CLI exits 1, the pod restarts); on SIGTERM it releases the
      Lease so that a standby takes over within seconds.
    * ``leader_election_namespace`` (``--leader-election-namespace``): where the Lease lives;
      default the pod's own namespace (service account file, else ``$POD_NAMESPACE``).
    * ``leader_election_id`` (``--leader-election-id``, default ``kleave-operator``): the
      Lease's name; replicas that share it elect one leader.

    Credentials come from the in-cluster service account, else the kubeconfig (``KUBECONFIG``),
    as kopf's ``login_via_client`` finds them. Raises :class:`OperatorStartupError` for any
    misconfiguration found before or while starting; the CLI should print it and exit 1.
    """
    if log_format not in LOG_FORMATS:
        raise OperatorStartupError(
            f"unknown log format {log_format!r}; use one of {', '.join(LOG_FORMATS)}"
        )
    fmt: LogFormat = "json" if log_format == "json" else "text"
    try:
        configure_logging(fmt, log_level)
    except ValueError as error:
        raise OperatorStartupError(str(error)) from None
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # kopf logs "Handler succeeded" for every watch event the caches consume.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    if leader_elect and (peering_name is not None or not standalone):
        raise OperatorStartupError(
            "--leader-elect replaces kopf peering: drop --peering and --peering-name"
        )
    scope = _resolve_scope(
        namespaces=namespaces,
        all_namespaces=all_namespaces,
        standalone=standalone,
        peering_name=peering_name,
    )
    elector = (
        _leader_elector(leader_election_namespace, leader_election_id) if leader_elect else None
    )
    api_client = load_api_client()  # fails fast on missing credentials, in every mode
    try:
        if scope.peering_name is not None:
            created = ensure_peering(
                name=scope.peering_name,
                clusterwide=scope.clusterwide,
                namespaces=scope.namespaces,
                api_client=api_client,
            )
            for where in created:
                logger.info("Created the peering object %s.", where)
    except PeeringSetupError as error:
        raise OperatorStartupError(str(error)) from None
    finally:
        api_client.close()

    settings = build_settings(scope=scope, priority=priority)
    asyncio.run(
        _serve(scope=scope, settings=settings, host=health_host, port=health_port, elector=elector)
    )


def _leader_elector(namespace: str | None, name: str) -> LeaderElector:
    """The elector for ``--leader-elect``; fails early on a namespace or name it cannot use."""
    namespace = namespace or pod_namespace()
    if namespace is None:
        raise OperatorStartupError(
            "--leader-elect needs the Lease's namespace: not in a pod and $POD_NAMESPACE is "
            "unset; pass --leader-election-namespace"
        )
    try:
        check_lease_name(namespace, name)
    except ValueError as error:
        raise OperatorStartupError(str(error)) from None
    # A factory: the elector opens its own client and closes it when it stops.
    return LeaderElector(load_api_client, namespace, name, default_identity())


def _resolve_scope(
    *,
    namespaces: Sequence[str] | None,
    all_namespaces: bool,
    standalone: bool,
    peering_name: str | None,
) -> _Scope:
    watched = tuple(namespaces or ())
    if all_namespaces and watched:
        raise OperatorStartupError("pass either --namespace or --all-namespaces, not both")
    if not all_namespaces and not watched:
        raise OperatorStartupError("pass --namespace NAME (repeatable) or --all-namespaces")
    if standalone and peering_name is not None:
        raise OperatorStartupError("--peering-name has no effect with --standalone; drop one")
    name = None if standalone else (peering_name or DEFAULT_PEERING_NAME)
    return _Scope(clusterwide=all_namespaces, namespaces=watched, peering_name=name)


def load_api_client() -> Any:
    """A ``kubernetes.client.ApiClient`` with the credentials kopf's login will find.

    Loading them up front turns "no credentials" into one clear line instead of kopf's login
    retries. Nothing is sent to the API server here.
    """
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError) as error:
            detail = " ".join(str(error).split()) or type(error).__name__
            raise OperatorStartupError(
                f"no Kubernetes credentials: not in a pod, and no usable kubeconfig ({detail})"
            ) from None
    configuration.retries = 1
    return client.ApiClient(configuration)


def build_settings(*, scope: _Scope, priority: int) -> kopf.OperatorSettings:
    """kopf settings for kleave; everything kopf would otherwise default differently is here."""
    settings = kopf.OperatorSettings()

    configure_kopf_posting(settings)
    settings.posting.reporting_component = EVENT_COMPONENT
    settings.posting.reporting_instance = socket.gethostname()  # the pod name in a pod
    settings.posting.event_name_prefix = "kleave-"
    # kleave's controllers post their own events (operator/events.py); kopf would otherwise
    # turn every handler's log line, for every watched pod and node, into an Event.
    settings.posting.enabled = False

    # Handler progress and the last-handled spec live in annotations, not in
    # status.kopf: status then holds only kleave's own fields, and a merge patch of
    # annotations never conflicts with the fields a GitOps tool applies.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX, v1=False
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration", v1=False
    )

    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT_S
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT_S
    settings.watching.connect_timeout = WATCH_CONNECT_TIMEOUT_S
    settings.networking.request_timeout = REQUEST_TIMEOUT_S
    settings.networking.connect_timeout = CONNECT_TIMEOUT_S

    # kopf.operator() sets these from its arguments too; set here so the object is complete.
    settings.peering.standalone = scope.peering_name is None
    settings.peering.mandatory = scope.peering_name is not None
    settings.peering.name = scope.peering_name or DEFAULT_PEERING_NAME
    settings.peering.priority = priority
    settings.peering.clusterwide = scope.clusterwide
    return settings


def build_registry(state: HealthState, stop_flag: asyncio.Event) -> kopf.OperatorRegistry:
    """A fresh registry with every kleave handler, so nothing depends on import side effects."""
    registry = kopf.OperatorRegistry()
    # A fresh registry has none of kopf's fallback logins; use the same one kopf would pick.
    kopf.on.login(registry=registry, id="login_via_client", errors=kopf.ErrorsMode.IGNORED)(
        kopf.login_via_client
    )

    def on_cleanup(**_: Any) -> None:
        state.mark_stopping()
        # When a signal stops kopf, its task waiting on stop_flag stays pending, and kopf then
        # waits 5 s for such "hung" tasks before exiting. Setting the flag releases it at once.
        stop_flag.set()

    kopf.on.cleanup(registry=registry, id="shutdown")(on_cleanup)

    # The controllers' caches are fed by kopf's watches; their workers start with kopf (so
    # only an active replica reconciles) and stop at its cleanup.
    controllers = Controllers(KubeApi.from_environment())
    controllers.register(registry)
    # The sandbox controllers have their own caches, queue and connection pool, so a burst of
    # sandbox claims never waits behind inference reconciles (or the other way round).
    sandboxes = SandboxControllers(KubeApi.from_environment())
    sandboxes.register(registry)
    tasks: list[asyncio.Task[None]] = []

    async def start_controllers(**_: Any) -> None:
        tasks.append(asyncio.create_task(controllers.run(), name="kleave-controllers"))
        tasks.append(asyncio.create_task(sandboxes.run(), name="kleave-sandbox-controllers"))

    async def stop_controllers(**_: Any) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await controllers.api.close()
        await sandboxes.api.close()

    kopf.on.startup(registry=registry, id="controllers")(start_controllers)
    kopf.on.cleanup(registry=registry, id="controllers-stop")(stop_controllers)
    return registry


async def _serve(
    *,
    scope: _Scope,
    settings: kopf.OperatorSettings,
    host: str,
    port: int,
    elector: LeaderElector | None = None,
) -> None:
    state = HealthState()
    stop_flag = asyncio.Event()
    registry = build_registry(state, stop_flag)
    _stop_on_early_signals(stop_flag)

    server = HealthServer(state, host=host, port=port)
    try:
        await server.start()
    except OSError as error:
        raise OperatorStartupError(
            f"cannot serve health and metrics on {host}:{port}: {error.strerror or error}"
        ) from None
    logger.info("Serving /healthz, /readyz and /metrics on %s:%d.", host, server.port)

    async def run_kopf() -> None:
        await kopf.operator(
            registry=registry,
            settings=settings,
            clusterwide=scope.clusterwide,
            namespaces=list(scope.namespaces),
            standalone=scope.peering_name is None,
            peering_name=scope.peering_name,
            priority=settings.peering.priority,
            ready_flag=state.ready_flag,
            stop_flag=stop_flag,
        )

    try:
        if elector is None:
            await run_kopf()
        else:
            state.ready_flag.set()  # a standby is ready: healthy, and takes over when needed
            await elector.run(run_kopf, stop_flag)
    except kopf.LoginError as error:
        raise OperatorStartupError(f"cannot log in to the Kubernetes API: {error}") from None
    finally:
        state.mark_stopping()
        await server.stop()


def _stop_on_early_signals(stop_flag: asyncio.Event) -> None:
    """Make SIGINT/SIGTERM stop the operator even before kopf installs its own handlers.

    kopf replaces these handlers when it starts (and then stops gracefully by itself); until
    then a signal sets ``stop_flag``, which kopf checks first thing.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signals are delivered to the main thread only; kopf says so in its log
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # platforms without loop signals
            loop.add_signal_handler(signum, stop_flag.set)
