"""Engine presets: the container kleave runs for each engine, topology and pool role.

A preset is what the engine's own documentation runs for that role. kleave adds only what a pod
on Kubernetes needs (bind 0.0.0.0 on one well-known port, advertise the pod IP to peers, fixed
side-channel ports so every pod of a pool agrees) and appends the user's ``args`` last, so a user
can override any flag without kleave knowing about it. Pure: no I/O and no Kubernetes imports.

The documented setups followed (repository paths, so they can be re-read at a pinned tag):

* vLLM workers, vllm-project/vllm: ``docs/features/nixl_connector_usage.md`` ("Multi-Instance
  Setup": ``kv_producer``/``kv_consumer``, ``VLLM_NIXL_SIDE_CHANNEL_HOST``/``_PORT``),
  ``docs/features/mooncake_connector_usage.md`` (``VLLM_MOONCAKE_BOOTSTRAP_PORT`` on the
  prefiller), ``docs/design/p2p_nccl_connector.md`` (``P2pNcclConnector``: ``kv_port``,
  ``kv_buffer_size``, ``proxy_ip``/``proxy_port``/``http_port``, ``PUT_ASYNC``),
  ``docs/serving/data_parallel_deployment.md`` and ``expert_parallel_deployment.md``
  (``--enable-expert-parallel``: the EP group is TP x DP).
* vLLM router, vllm-project/router: ``docs/cli_reference.md`` and
  ``docs/model-routing/pd-disaggregation.md`` (``--vllm-pd-disaggregation``,
  ``--prefill URL [BOOTSTRAP_PORT]``, ``--kv-connector mooncake``, ``--vllm-discovery-address``
  for NCCL-connector workers, ``--prometheus-host``/``--prometheus-port``).
* SGLang, sgl-project/sglang: ``docs/advanced_features/pd_disaggregation.md``
  (``--disaggregation-mode``, ``--disaggregation-transfer-backend``, the DeepSeek layout
  ``--tp-size N --dp-size M --enable-dp-attention``), ``server_arguments.md``
  (``--disaggregation-bootstrap-port``, ``--ep-size``, ``--enable-metrics``),
  ``expert_parallelism.md`` and ``router.md`` (``sglang_router.launch_router
  --pd-disaggregation --prefill URL BOOTSTRAP_PORT --decode URL``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kleave import __version__
from kleave.api.vocabulary import Engine, KvBackend, Role, Topology

__all__ = [
    "BOOTSTRAP_PORT",
    "DEFAULT_KV_BACKENDS",
    "METRICS_PATH",
    "NIXL_SIDE_CHANNEL_PORT",
    "P2P_NCCL_KV_PORT",
    "PLAN_DIR",
    "PLAN_FILE",
    "PLAN_PATH",
    "POD_IP_REF",
    "ROUTER_DISCOVERY_PORT",
    "ROUTER_METRICS_PORT",
    "ROUTER_PORT",
    "SUPPORTED_KV_BACKENDS",
    "SUPPORTED_TOPOLOGIES",
    "TOPOLOGY_ROLES",
    "WORKER_PORT",
    "Component",
    "ContainerPreset",
    "Engine",
    "EngineConfigError",
    "KvBackend",
    "Port",
    "Role",
    "RouterSpec",
    "Topology",
    "WorkerSpec",
    "default_image",
    "metrics_port",
    "resolve_kv_backend",
    "router_preset",
    "worker_preset",
]

Component = Literal["worker", "router"]

WORKER_PORT = 8000  # HTTP API + /metrics on every worker, port name "http"
ROUTER_PORT = 8000  # the router's OpenAI API, port name "http"
PLAN_DIR = "/etc/kleave/plan"  # where the serving-plan ConfigMap is mounted
PLAN_FILE = "plan.json"
PLAN_PATH = f"{PLAN_DIR}/{PLAN_FILE}"
METRICS_PATH = "/metrics"

# The engines' documented default ports, pinned so that every pod and the router agree.
NIXL_SIDE_CHANNEL_PORT = 5600  # vLLM VLLM_NIXL_SIDE_CHANNEL_PORT (base; + DP rank)
BOOTSTRAP_PORT = 8998  # SGLang --disaggregation-bootstrap-port, vLLM VLLM_MOONCAKE_BOOTSTRAP_PORT
P2P_NCCL_KV_PORT = 21001  # vLLM P2pNcclConnector kv_port (base; + TP rank)
ROUTER_DISCOVERY_PORT = 30001  # vllm-router ZMQ address P2pNcclConnector workers register with
ROUTER_METRICS_PORT = 29000  # vllm-router and SGLang router --prometheus-port

# Kubernetes expands $(POD_IP) from an env var defined earlier in the container's list; the pool
# builder defines POD_IP (downward API, status.podIP) before it appends a preset's env.
POD_IP_REF = "$(POD_IP)"

_BIND_ALL = "0.0.0.0"

# Images: short names (a mirror is one prefix away) at pinned release tags, never "latest"; the
# flags below follow those projects' current documentation. The SGLang image ships
# sglang_router, so it serves as the SGLang router image too.
_VLLM_WORKER_IMAGE = "vllm/vllm-openai:v0.31.0"
_VLLM_ROUTER_IMAGE = "vllm/vllm-router:v0.1.17"
_SGLANG_IMAGE = "lmsysorg/sglang:v0.5.21"
_KLEAVE_IMAGE = f"kleave/kleave:{__version__}"

_DEFAULT_IMAGES: Mapping[Engine, Mapping[Component, str]] = {
    "builtin": {"worker": _KLEAVE_IMAGE, "router": _KLEAVE_IMAGE},
    "vllm": {"worker": _VLLM_WORKER_IMAGE, "router": _VLLM_ROUTER_IMAGE},
    "sglang": {"worker": _SGLANG_IMAGE, "router": _SGLANG_IMAGE},
}

SUPPORTED_KV_BACKENDS: Mapping[Engine, tuple[KvBackend, ...]] = {
    "builtin": ("tcp", "nccl"),
    "vllm": ("nixl", "nccl", "mooncake"),  # NixlConnector, P2pNcclConnector, MooncakeConnector
    "sglang": ("mooncake", "nixl"),  # --disaggregation-transfer-backend choices on GPUs
}
DEFAULT_KV_BACKENDS: Mapping[Engine, KvBackend] = {
    "builtin": "nccl",
    "vllm": "nixl",
    "sglang": "mooncake",  # SGLang's own default transfer backend
}
# Attention-FFN disaggregation exists only in kleave's own workers.
SUPPORTED_TOPOLOGIES: Mapping[Engine, tuple[Topology, ...]] = {
    "builtin": ("Colocated", "PD", "PDAF"),
    "vllm": ("Colocated", "PD"),
    "sglang": ("Colocated", "PD"),
}
# Colocated runs one pool, "decode", that serves both phases.
TOPOLOGY_ROLES: Mapping[Topology, tuple[Role, ...]] = {
    "Colocated": ("decode",),
    "PD": ("prefill", "decode"),
    "PDAF": ("prefill", "attention", "ffn"),
}


class EngineConfigError(ValueError):
    """A spec the chosen engine cannot run; the message names the spec field to change."""


@dataclass(frozen=True)
class Port:
    name: str
    port: int


@dataclass(frozen=True)
class ContainerPreset:
    """The container an engine needs for one role; the pool builder adds the Kubernetes rest."""

    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # ordered (name, value); values may use $(POD_IP)
    ports: tuple[Port, ...]  # the first is "http"
    readiness_path: str  # HTTP GET path on "http"
    liveness_path: str
    metrics_path: str  # served on the "metrics" port when there is one, else on "http"
    shm: bool  # needs a large /dev/shm (multi-GPU processes talk through shared memory)


@dataclass(frozen=True)
class WorkerSpec:
    engine: Engine
    topology: Topology
    role: Role
    model: str
    tensor: int
    expert: int
    gpus: int
    kv_backend: KvBackend  # resolved by resolve_kv_backend ("auto" is resolved again here)
    extra_args: tuple[str, ...] = ()  # the user's spec args, appended last so they win
    image: str | None = None  # the user's override
    # The router Service's DNS name. Only vLLM's P2pNcclConnector needs it: its workers register
    # themselves with the router (the router has no --prefill/--decode list in that mode).
    router_host: str | None = None


@dataclass(frozen=True)
class RouterSpec:
    engine: Engine
    topology: Topology
    model: str
    kv_backend: KvBackend
    prefill_urls: tuple[str, ...]  # headless-Service URLs; empty for Colocated
    decode_urls: tuple[str, ...]  # Colocated: the single pool; PDAF: the attention pool
    extra_args: tuple[str, ...] = ()
    image: str | None = None


def resolve_kv_backend(engine: Engine, requested: KvBackend) -> KvBackend:
    """Turn ``auto`` into the engine's default and reject a backend the engine lacks."""
    _check_engine(engine)
    if requested == "auto":
        return DEFAULT_KV_BACKENDS[engine]
    supported = SUPPORTED_KV_BACKENDS[engine]
    if requested not in supported:
        raise EngineConfigError(
            f"spec.kvTransfer.backend {requested!r} is not supported by spec.engine {engine}: "
            f"use auto or one of {', '.join(supported)}"
        )
    return requested


def default_image(engine: Engine, component: Component) -> str:
    """The image kleave runs when the spec names none."""
    _check_engine(engine)
    if component not in ("worker", "router"):
        raise ValueError(f"component must be worker or router, not {component!r}")
    return _DEFAULT_IMAGES[engine][component]


def metrics_port(preset: ContainerPreset) -> Port:
    """The port Prometheus scrapes: the routers serve metrics on their own listener."""
    return next((p for p in preset.ports if p.name == "metrics"), preset.ports[0])


def worker_preset(spec: WorkerSpec) -> ContainerPreset:
    """The worker container for one pool role, or EngineConfigError naming the field to fix."""
    _check_engine(spec.engine)
    _check_topology(spec.engine, spec.topology)
    _check_role(spec.topology, spec.role)
    kv = resolve_kv_backend(spec.engine, spec.kv_backend)
    tensor, data = _layout(spec)
    image = spec.image or default_image(spec.engine, "worker")
    http = Port("http", WORKER_PORT)
    if spec.engine == "builtin":
        _check_builtin_layout(spec)
        return ContainerPreset(
            image=image,
            command=("kleave",),
            args=(
                "workers",
                "serve",
                "--role",
                spec.role,
                "--plan",
                PLAN_PATH,
                "--port",
                str(WORKER_PORT),
                "--kv-backend",
                kv,
                "--tensor-parallel",
                str(spec.tensor),
                "--expert-parallel",
                str(spec.expert),
                "--device",
                "cuda",
                *spec.extra_args,
            ),
            env=(),
            ports=(http,),
            readiness_path="/readyz",
            liveness_path="/healthz",
            metrics_path=METRICS_PATH,
            shm=spec.gpus > 1,
        )
    if spec.engine == "vllm":
        args, env, ports = _vllm_worker(spec, kv, tensor, data)
        command: tuple[str, ...] = ("vllm", "serve")
    else:
        args, env, ports = _sglang_worker(spec, kv, tensor, data)
        command = ("python3", "-m", "sglang.launch_server")
    return ContainerPreset(
        image=image,
        command=command,
        args=(*args, *spec.extra_args),
        env=env,
        ports=(http, *ports),
        readiness_path="/health",  # both return 200 once the model is loaded
        liveness_path="/health",
        metrics_path=METRICS_PATH,
        shm=spec.gpus > 1,  # TP/DP ranks exchange through /dev/shm (NCCL, engine IPC)
    )


def router_preset(spec: RouterSpec) -> ContainerPreset:
    """The router container in front of the pools of one serving-plan revision."""
    _check_engine(spec.engine)
    _check_topology(spec.engine, spec.topology)
    kv = resolve_kv_backend(spec.engine, spec.kv_backend)
    image = spec.image or default_image(spec.engine, "router")
    http = Port("http", ROUTER_PORT)
    if spec.engine == "builtin":
        # kleave's router reads every pool's address from the serving plan.
        return ContainerPreset(
            image=image,
            command=("kleave",),
            args=(
                "workers",
                "router",
                "--plan",
                PLAN_PATH,
                "--port",
                str(ROUTER_PORT),
                *spec.extra_args,
            ),
            env=(),
            ports=(http,),
            readiness_path="/readyz",
            liveness_path="/healthz",
            metrics_path=METRICS_PATH,
            shm=False,
        )
    registers = spec.engine == "vllm" and spec.topology == "PD" and kv == "nccl"
    _check_router_urls(spec, need_urls=not registers)
    listen = (
        "--host",
        _BIND_ALL,
        "--port",
        str(ROUTER_PORT),
        "--prometheus-host",
        _BIND_ALL,
        "--prometheus-port",
        str(ROUTER_METRICS_PORT),
    )
    ports = [http, Port("metrics", ROUTER_METRICS_PORT)]
    if spec.engine == "vllm":
        command: tuple[str, ...] = ("vllm-router",)
        workers = _vllm_router_workers(spec, kv)
        if registers:
            ports.append(Port("discovery", ROUTER_DISCOVERY_PORT))
    else:
        command = ("python3", "-m", "sglang_router.launch_router")
        workers = _sglang_router_workers(spec)
    return ContainerPreset(
        image=image,
        command=command,
        args=(*workers, *listen, *spec.extra_args),
        env=(),
        ports=tuple(ports),
        readiness_path="/health",
        liveness_path="/health",
        metrics_path=METRICS_PATH,
        shm=False,
    )


def _check_engine(engine: str) -> None:
    if engine not in SUPPORTED_KV_BACKENDS:
        raise EngineConfigError(
            f"spec.engine {engine!r} is unknown: use one of {', '.join(SUPPORTED_KV_BACKENDS)}"
        )


def _check_topology(engine: Engine, topology: Topology) -> None:
    if topology not in TOPOLOGY_ROLES:
        raise EngineConfigError(
            f"spec.topology {topology!r} is unknown: use one of {', '.join(TOPOLOGY_ROLES)}"
        )
    if topology not in SUPPORTED_TOPOLOGIES[engine]:
        raise EngineConfigError(
            f"spec.topology {topology} needs spec.engine builtin: only kleave's workers "
            f"disaggregate attention and FFN; with spec.engine {engine} use one of "
            f"{', '.join(SUPPORTED_TOPOLOGIES[engine])}"
        )


def _check_role(topology: Topology, role: Role) -> None:
    roles = TOPOLOGY_ROLES[topology]
    if role not in roles:
        raise EngineConfigError(
            f"spec.pools.{role} is not part of spec.topology {topology}, which runs the "
            f"pools {', '.join(roles)}"
        )


def _layout(spec: WorkerSpec) -> tuple[int, int]:
    """Split a replica's GPUs into (tensor-parallel size, data-parallel groups).

    Every replica runs ``gpus / tensor`` data-parallel groups of ``tensor`` GPUs, so all its
    GPUs serve. ``expert > 1`` spreads the experts over all of them (vLLM and SGLang both size
    the expert-parallel group as TP x DP), which needs ``tensor x expert`` to divide ``gpus``.
    """
    where = f"spec.pools.{spec.role}"
    if spec.tensor < 1 or spec.expert < 1 or spec.gpus < 1:
        raise EngineConfigError(
            f"{where}.parallelism.tensor, .parallelism.expert and .gpusPerReplica must be at "
            f"least 1 (got {spec.tensor}, {spec.expert}, {spec.gpus})"
        )
    if spec.gpus % (spec.tensor * spec.expert):
        raise EngineConfigError(
            f"{where}.gpusPerReplica ({spec.gpus}) must be a multiple of parallelism.tensor x "
            f"parallelism.expert ({spec.tensor} x {spec.expert})"
        )
    return spec.tensor, spec.gpus // spec.tensor


def _check_builtin_layout(spec: WorkerSpec) -> None:
    """What kleave's own workers can run: one model copy per replica over exactly its GPUs,
    split by tensor parallelism (any role) or by experts (FFN workers only), not both."""
    where = f"spec.pools.{spec.role}"
    if spec.expert > 1 and spec.role != "ffn":
        raise EngineConfigError(
            f"{where}.parallelism.expert ({spec.expert}): the builtin engine splits experts "
            "only in PDAF's ffn workers; split this pool with parallelism.tensor"
        )
    if spec.expert > 1 and spec.tensor > 1:
        raise EngineConfigError(
            f"{where}.parallelism: the builtin engine splits an ffn worker by experts or by "
            f"tensor, not both (got tensor {spec.tensor}, expert {spec.expert})"
        )
    used = spec.tensor * spec.expert
    if spec.gpus != used:
        raise EngineConfigError(
            f"{where}.gpusPerReplica ({spec.gpus}) must equal parallelism.tensor x "
            f"parallelism.expert ({used}) for the builtin engine: each replica runs one copy "
            "of the model over all its GPUs (no data-parallel groups), so more would sit idle"
        )


def _vllm_worker(
    spec: WorkerSpec, kv: KvBackend, tensor: int, data: int
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[Port, ...]]:
    """``vllm serve``: TP = tensor, DP = the rest of the GPUs, EP over TP x DP when asked."""
    args = [spec.model, "--host", _BIND_ALL, "--port", str(WORKER_PORT)]
    args += ["--tensor-parallel-size", str(tensor)]
    if data > 1:
        args += ["--data-parallel-size", str(data)]
    if spec.expert > 1:
        args.append("--enable-expert-parallel")
    if spec.topology == "Colocated":
        return tuple(args), (), ()
    config, env, ports = _vllm_kv_transfer(spec, kv)
    args += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
    return tuple(args), env, ports


def _vllm_kv_transfer(
    spec: WorkerSpec, kv: KvBackend
) -> tuple[dict[str, Any], tuple[tuple[str, str], ...], tuple[Port, ...]]:
    """The connector config, env and ports of a vLLM P/D worker, per the connector's guide."""
    prefill = spec.role == "prefill"
    kv_role = "kv_producer" if prefill else "kv_consumer"
    env: tuple[tuple[str, str], ...]
    config: dict[str, Any]
    if kv == "nixl":
        # Peers reach each other on the side channel at the address the prefiller advertises
        # (default localhost), so it must be the pod IP.
        env = (
            ("VLLM_NIXL_SIDE_CHANNEL_HOST", POD_IP_REF),
            ("VLLM_NIXL_SIDE_CHANNEL_PORT", str(NIXL_SIDE_CHANNEL_PORT)),
        )
        config = {"kv_connector": "NixlConnector", "kv_role": kv_role}
        return config, env, (Port("nixl", NIXL_SIDE_CHANNEL_PORT),)
    if kv == "mooncake":
        # The prefiller's bootstrap server; the router is told the same port.
        config = {"kv_connector": "MooncakeConnector", "kv_role": kv_role}
        if prefill:
            env = (("VLLM_MOONCAKE_BOOTSTRAP_PORT", str(BOOTSTRAP_PORT)),)
            return config, env, (Port("bootstrap", BOOTSTRAP_PORT),)
        return config, (), ()
    if not spec.router_host:
        raise EngineConfigError(
            "spec.kvTransfer.backend nccl with spec.engine vllm needs the router's address "
            "(P2pNcclConnector workers register with it), and none was given"
        )
    config = {
        "kv_connector": "P2pNcclConnector",
        "kv_role": kv_role,
        # The guide's sizes: a prefiller sending with PUT_ASYNC buffers nothing; a decoder
        # keeps received KV in a GPU buffer (about 10% of the GPU) before it spills to host.
        "kv_buffer_size": "1e1" if prefill else "8e9",
        "kv_port": str(P2P_NCCL_KV_PORT),
        "kv_connector_extra_config": {
            "proxy_ip": spec.router_host,
            "proxy_port": str(ROUTER_DISCOVERY_PORT),
            "http_port": str(WORKER_PORT),  # must equal --port
            "send_type": "PUT_ASYNC",
        },
    }
    # The worker registers <its IP>:http_port with the router; VLLM_HOST_IP pins that IP.
    return config, (("VLLM_HOST_IP", POD_IP_REF),), (Port("kv-nccl", P2P_NCCL_KV_PORT),)


def _sglang_worker(
    spec: WorkerSpec, kv: KvBackend, tensor: int, data: int
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[Port, ...]]:
    """``sglang.launch_server``, with the documented layouts for TP, DP and EP.

    Dense: ``--tp-size tensor`` and ``--dp-size`` for the remaining GPUs. MoE with experts
    spread (``expert > 1``): SGLang's EP group lives inside its TP group, so ``--tp-size`` and
    ``--ep-size`` cover every GPU and DP attention (``--dp-size``, ``--enable-dp-attention``)
    keeps attention split ``tensor`` ways, as in the DeepSeek P/D example.
    """
    args = ["--model-path", spec.model, "--host", _BIND_ALL, "--port", str(WORKER_PORT)]
    if spec.expert > 1:
        args += ["--tp-size", str(spec.gpus)]
        if data > 1:
            args += ["--dp-size", str(data), "--enable-dp-attention"]
        args += ["--ep-size", str(spec.gpus)]
    else:
        args += ["--tp-size", str(tensor)]
        if data > 1:
            args += ["--dp-size", str(data)]
    args.append("--enable-metrics")  # SGLang serves /metrics only when asked
    ports: tuple[Port, ...] = ()
    if spec.topology == "PD":
        args += ["--disaggregation-mode", spec.role, "--disaggregation-transfer-backend", kv]
        if spec.role == "prefill":
            args += ["--disaggregation-bootstrap-port", str(BOOTSTRAP_PORT)]
            ports = (Port("bootstrap", BOOTSTRAP_PORT),)
    return tuple(args), (), ports


def _check_router_urls(spec: RouterSpec, *, need_urls: bool) -> None:
    if spec.topology == "Colocated":
        if spec.prefill_urls or not spec.decode_urls:
            raise EngineConfigError(
                "spec.topology Colocated routes to the decode pool only: the router needs its "
                f"URL and no prefill URL (got prefill {list(spec.prefill_urls)}, decode "
                f"{list(spec.decode_urls)})"
            )
    elif need_urls and not (spec.prefill_urls and spec.decode_urls):
        raise EngineConfigError(
            f"spec.topology {spec.topology} needs the prefill and the decode pool's URLs for the "
            f"router (got prefill {list(spec.prefill_urls)}, decode {list(spec.decode_urls)})"
        )


def _vllm_router_workers(spec: RouterSpec, kv: KvBackend) -> tuple[str, ...]:
    if spec.topology == "Colocated":
        return ("--worker-urls", *spec.decode_urls)
    if kv == "nccl":
        # P2pNcclConnector workers announce themselves over ZMQ; no static lists.
        return (
            "--vllm-pd-disaggregation",
            "--vllm-discovery-address",
            f"{_BIND_ALL}:{ROUTER_DISCOVERY_PORT}",
        )
    args = ["--vllm-pd-disaggregation"]
    if kv == "mooncake":
        args += ["--kv-connector", "mooncake"]  # nixl is the router's default
    for url in spec.prefill_urls:
        args += ["--prefill", url]
        if kv == "mooncake":
            args.append(str(BOOTSTRAP_PORT))
    for url in spec.decode_urls:
        args += ["--decode", url]
    return tuple(args)


def _sglang_router_workers(spec: RouterSpec) -> tuple[str, ...]:
    if spec.topology == "Colocated":
        return ("--worker-urls", *spec.decode_urls)
    args = ["--pd-disaggregation"]
    for url in spec.prefill_urls:
        args += ["--prefill", url, str(BOOTSTRAP_PORT)]
    for url in spec.decode_urls:
        args += ["--decode", url]
    return tuple(args)
