"""The operator at scale: hundreds of InferenceDeployments applied at once to a 100-GPU-node
dev cluster, timed from a watch started before the apply.

Per InferenceDeployment, from the moment the watch sees it:
* children created: every InferencePool, every pool's Deployment/StatefulSet and the router
  Deployment exist (what the operator itself does);
* Ready: its `Ready` condition is True for the current generation;
* baselines, measured in the same run: all its pods (workers and router) are Ready, and all
  its workloads report them ready in their status (the controller-manager's work, which the
  operator reads; it can report Ready no sooner). Ready minus the latter is the operator's own
  status lag. A burst of the same number of plain creates straight to the API server is the
  floor for creating the children.

Operator cost: reconciles (``kleave_reconcile_total`` from its /metrics) per second of wall time
until everything is Ready, CPU seconds (utime + stime from /proc) and peak RSS (VmHWM).
Each scale point runs on a fresh cluster with a fresh operator, torn down even on failure.
"""

from __future__ import annotations

import base64
import json
import math
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kleave.api.registry import render_crds
from kleave.devcluster.cluster import DevCluster
from kleave.devcluster.nodes import parse_node_groups
from kleave.devcluster.processes import free_ports, is_alive
from kleave.operator.naming import LABEL_COMPONENT, LABEL_DEPLOYMENT, MANAGED_BY, MANAGER

NODE_GROUPS = "50xH100-SXM:8,50xH20:8,4xcpu"
"""100 GPU nodes (800 GPUs, half H100-SXM, half H20) and CPU nodes for the routers."""
NAMESPACE = "default"
READY_TIMEOUT_S = 900.0
CREATE_THREADS = 8
OPERATOR_WORKERS = 16
"""`Controllers(workers=16)`: the operator reconciles up to 16 keys concurrently."""
IDLE_WINDOW_S = 10.0
"""After everything is Ready: nothing changes, so a healthy operator should be nearly idle."""
RESULTS_DIR = Path(tempfile.gettempdir()) / "kleave-bench"


@dataclass(frozen=True)
class Scale:
    pd: int
    pdaf: int

    @property
    def deployments(self) -> int:
        return self.pd + self.pdaf

    @property
    def pools(self) -> int:
        return 2 * self.pd + 3 * self.pdaf

    @property
    def label(self) -> str:
        parts = [f"{n} {t}" for n, t in ((self.pd, "PD"), (self.pdaf, "PDAF")) if n]
        return " + ".join(parts)


SCALES = (Scale(pd=0, pdaf=200), Scale(pd=100, pdaf=170))
"""200 objects: at most 600 pools (PDAF has 3, PD 2); 700+ pools need more objects, so the
second point mixes 100 PD and 170 PDAF (270 objects, 710 pools, 710 of the 800 GPUs)."""


def _manifest(name: str, topology: str, index: int) -> dict[str, Any]:
    pool = {"replicas": 1, "gpusPerReplica": 1}
    if topology == "PD":
        spec: dict[str, Any] = {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "engine": "vllm",
            "topology": "PD",
            "pools": {
                "prefill": pool | {"gpuType": "H100-SXM"},
                "decode": pool | {"gpuType": "H20"},
            },
        }
    else:
        spec = {
            "model": "deepseek-ai/DeepSeek-V3",
            "engine": "builtin",
            "topology": "PDAF",
            "pools": {
                "prefill": pool | {"gpuType": "H100-SXM"},
                "attention": pool | {"gpuType": "H20"},
                # Alternate so both GPU types fill evenly.
                "ffn": pool | {"gpuType": "H100-SXM" if index % 2 else "H20"},
            },
        }
    return {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def _manifests(scale: Scale) -> list[dict[str, Any]]:
    items = [_manifest(f"pd-{i:03d}", "PD", i) for i in range(scale.pd)]
    items += [_manifest(f"pdaf-{i:03d}", "PDAF", i) for i in range(scale.pdaf)]
    return items


# -- watching -------------------------------------------------------------------------------


class ApiServer:
    """Raw watches against the dev cluster (JSON lines, no model deserialisation)."""

    def __init__(self, kubeconfig: Path) -> None:
        conf = yaml.safe_load(kubeconfig.read_text())
        cluster = conf["clusters"][0]["cluster"]
        token = conf["users"][0]["user"]["token"]
        context = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        self.http = httpx.Client(
            base_url=cluster["server"],
            verify=context,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=None),
        )
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried while a fresh API server answers 429 (a new CRD's storage
        is still initialising) or 5xx."""
        deadline = time.monotonic() + 60
        while True:
            response = self.http.request(method, path, **kwargs)
            retry = response.status_code == 429 or response.status_code >= 500
            if not retry or time.monotonic() > deadline:
                return response.raise_for_status()
            time.sleep(0.5)

    def watch(
        self, path: str, selector: str, handle: Callable[[str, Mapping[str, Any], float], None]
    ) -> None:
        """List (so the watch misses nothing), then watch in a thread until `stop`."""
        params = {"labelSelector": selector} if selector else {}
        body = self._request("GET", path, params=params).json()
        now = time.time()
        for item in body["items"]:
            handle("ADDED", item, now)
        version = body["metadata"]["resourceVersion"]
        thread = threading.Thread(
            target=self._stream, args=(path, params, version, handle), daemon=True
        )
        thread.start()
        self.threads.append(thread)

    def _stream(
        self,
        path: str,
        params: dict[str, str],
        version: str,
        handle: Callable[[str, Mapping[str, Any], float], None],
    ) -> None:
        while not self.stopping.is_set():
            query = params | {
                "watch": "true",
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": "600",
            }
            try:
                with self.http.stream("GET", path, params=query) as response:
                    for line in response.iter_lines():
                        if not line:
                            continue
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise RuntimeError(f"watch {path}: {obj.get('message')}")
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            handle(event["type"], obj, time.time())
            except (httpx.HTTPError, RuntimeError) as error:
                if self.stopping.is_set():
                    return
                print(f"watch {path} restarts: {error}", file=sys.stderr)
                time.sleep(0.5)

    def create_all(
        self, path: str, manifests: list[dict[str, Any]], threads: int = CREATE_THREADS
    ) -> None:
        """Create every object at once: `kubectl apply -f` goes one object after another
        (a GET and a POST each), which spreads a batch of hundreds over a minute or more."""

        def create(manifest: dict[str, Any]) -> None:
            self._request("POST", path, json=manifest)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(create, manifests))

    def write_floor(self, count: int) -> float:
        """Seconds to create `count` small objects with as many client threads as the
        operator has workers: how fast this API server takes the operator's writes at best."""
        path = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
        manifests = [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"floor-{i}"},
             "data": {"k": "v"}}
            for i in range(count)
        ]  # fmt: skip
        started = time.perf_counter()
        self.create_all(path, manifests, threads=OPERATOR_WORKERS)
        return time.perf_counter() - started

    def applies(self) -> int:
        """Server-side apply requests served so far (only the operator uses SSA here)."""
        text = self.http.get("/metrics").text
        return sum(
            int(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "apiserver_request_total" and sample.labels.get("verb") == "APPLY"
        )

    def stop(self) -> None:
        self.stopping.set()
        self.http.close()


def _ready(obj: Mapping[str, Any], condition: str = "Ready") -> bool:
    status = obj.get("status") or {}
    return any(
        c.get("type") == condition and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _ready_since(obj: Mapping[str, Any]) -> float:
    """The Ready condition's lastTransitionTime as epoch seconds (1 s resolution)."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return datetime.fromisoformat(condition["lastTransitionTime"]).timestamp()
    raise ValueError(f"{obj['metadata']['name']} has no Ready condition")


@dataclass
class Observations:
    """First-seen times (epoch seconds) of everything the benchmark cares about."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    created: dict[str, float] = field(default_factory=dict)
    ready: dict[str, float] = field(default_factory=dict)
    # InferenceDeployment name -> {(kind, child name): first seen}
    children: dict[str, dict[tuple[str, str], float]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    # InferenceDeployment name -> {workload or router name: first seen reporting all ready}
    workloads_ready: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    # kind -> seconds between a Ready condition's lastTransitionTime and the watch seeing it
    watch_delay: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # InferenceDeployment name -> {pod name: Ready since (the condition's timestamp)}
    pods_ready: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))

    def on_deployment(self, event: str, obj: Mapping[str, Any], now: float) -> None:
        meta = obj["metadata"]
        name = meta["name"]
        with self.lock:
            self.created.setdefault(name, now)
            current = (obj.get("status") or {}).get("observedGeneration") == meta.get("generation")
            if event != "DELETED" and current and _ready(obj) and name not in self.ready:
                self.ready[name] = now
                self.watch_delay["InferenceDeployment"].append(now - _ready_since(obj))

    def on_child(self, event: str, obj: Mapping[str, Any], now: float) -> None:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        owner = labels.get(LABEL_DEPLOYMENT)
        if owner is None or event == "DELETED":
            return
        kind = obj["kind"]
        if kind == "Deployment" and labels.get(LABEL_COMPONENT) == "router":
            kind = "Router"
        elif kind != "InferencePool":
            kind = "Workload"
        status = obj.get("status") or {}
        wanted = (obj.get("spec") or {}).get("replicas", 1)
        # The router starts at 0 replicas (scaled up once every pool serves): 0/0 is not ready.
        ready = int(status.get("readyReplicas") or 0)
        reported = kind != "InferencePool" and wanted >= 1 and ready >= wanted
        with self.lock:
            self.children[owner].setdefault((kind, meta["name"]), now)
            if reported and status.get("observedGeneration") == meta.get("generation"):
                self.workloads_ready[owner].setdefault(meta["name"], now)

    def all_workloads_ready(self, name: str, workloads: int) -> float | None:
        """When the last of `name`'s workloads (and router) reported its replicas ready."""
        with self.lock:
            times = sorted(self.workloads_ready.get(name, {}).values())
        return times[workloads - 1] if len(times) >= workloads else None

    def on_pod(self, event: str, obj: Mapping[str, Any], now: float) -> None:
        owner = (obj["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT)
        name = obj["metadata"]["name"]
        if owner is None or event == "DELETED" or not _ready(obj):
            return
        with self.lock:
            if name not in self.pods_ready[owner]:
                # Hundreds of pods change status at once and the watch can fall behind, so the
                # baseline uses the server's timestamp (kwok's, 1 s resolution).
                since = _ready_since(obj)
                self.pods_ready[owner][name] = since
                self.watch_delay["Pod"].append(now - since)

    def children_complete(self, name: str, pools: int) -> float | None:
        """When the last of `name`'s children appeared, or None while one is missing."""
        with self.lock:
            seen = dict(self.children.get(name, {}))
        kinds = Counter(kind for kind, _ in seen)
        if kinds["InferencePool"] < pools or kinds["Workload"] < pools or not kinds["Router"]:
            return None
        return max(seen.values())

    def all_pods_ready(self, name: str, pods: int) -> float | None:
        with self.lock:
            times = sorted(self.pods_ready.get(name, {}).values())
        return times[pods - 1] if len(times) >= pods else None


# -- the operator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessUsage:
    cpu_s: float
    hwm_mb: float


def _usage(pid: int) -> ProcessUsage:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return ProcessUsage(cpu, hwm)


def _reconciles(metrics_url: str) -> tuple[Counter[str], dict[str, float]]:
    """kleave_reconcile_total by kind/result, and the mean reconcile time by kind."""
    text = httpx.get(metrics_url, timeout=10.0).text
    totals: Counter[str] = Counter()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kleave_reconcile_total":
                totals[f"{sample.labels['kind']}/{sample.labels['result']}"] += int(sample.value)
            elif sample.name == "kleave_reconcile_duration_seconds_sum":
                sums[sample.labels["kind"]] = sample.value
            elif sample.name == "kleave_reconcile_duration_seconds_count":
                counts[sample.labels["kind"]] = sample.value
    means = {kind: sums[kind] / counts[kind] for kind in sums if counts.get(kind)}
    return totals, means


def _log_summary(log: Path) -> tuple[Counter[str], Counter[str]]:
    """Lines per level, and the most common warning/error messages."""
    levels: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            levels["non-json"] += 1
            problems[line[:160]] += 1
            continue
        level = str(record.get("level", "?")).upper()
        levels[level] += 1
        if level in ("WARNING", "ERROR", "CRITICAL"):
            problems[f"{level}: {str(record.get('message'))[:160]}"] += 1
    return levels, problems


# -- one scale point ------------------------------------------------------------------------


@dataclass(frozen=True)
class Idle:
    reconciles_per_s: float
    applies_per_s: float
    cpu_percent: float


@dataclass
class Result:
    scale: Scale
    apply_s: float
    children_s: list[float]
    ready_s: list[float]
    pods_ready_s: list[float]
    workloads_ready_s: list[float]
    lag_s: list[float]
    watch_delay: dict[str, list[float]]
    last_children_s: float
    all_ready_s: float
    reconciles: Counter[str]
    durations: dict[str, float]
    write_floor_s: float
    applies: int
    load: float
    idle: Idle
    cpu_s: float
    hwm_mb: float
    log_levels: Counter[str]
    log_problems: Counter[str]
    log: Path


def _apply_crds(kubeconfig: Path) -> None:
    kubectl = [_tool("kubectl"), f"--kubeconfig={kubeconfig}"]
    crds = "".join(f"---\n{text}" for text in render_crds().values())
    subprocess.run(
        [*kubectl, "apply", "--server-side", "--field-manager=kleave", "-f", "-"],
        input=crds, text=True, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=120s"],
        check=True, capture_output=True,
    )  # fmt: skip


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run_scale(scale: Scale, tmp: Path) -> Result:
    cluster = DevCluster(state_dir=tmp / "cluster", progress=lambda _line: None)
    pid: int | None = None
    api: ApiServer | None = None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    log = RESULTS_DIR / f"operator-{scale.deployments}.log"
    log.unlink(missing_ok=True)
    try:
        state = cluster.up(node_groups=parse_node_groups(NODE_GROUPS), timeout=300)
        kubeconfig = Path(state.kubeconfig)
        _apply_crds(kubeconfig)
        api = ApiServer(kubeconfig)
        writes = 3 * scale.deployments + 3 * scale.pools
        write_floor_s = api.write_floor(writes)

        [port] = free_ports(1)
        argv = [
            _tool("kleave"), "operator", "run", "--standalone", "--all-namespaces",
            f"--kubeconfig={kubeconfig}", "--health-host=127.0.0.1", f"--health-port={port}",
            "--log-format=json",
        ]  # fmt: skip
        # Registered with the cluster, so `down` stops it even when the benchmark fails.
        pid = cluster.register("kleave-operator", argv, log)
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _status(f"{base}/readyz") == 200, 60, "operator ready", pid, log)

        observed = Observations()
        managed = f"{MANAGED_BY}={MANAGER}"
        ns = f"namespaces/{NAMESPACE}"
        api.watch(
            f"/apis/kleave.dev/v1alpha1/{ns}/inferencedeployments", "", observed.on_deployment
        )
        api.watch(f"/apis/kleave.dev/v1alpha1/{ns}/inferencepools", "", observed.on_child)
        api.watch(f"/apis/apps/v1/{ns}/deployments", managed, observed.on_child)
        api.watch(f"/apis/apps/v1/{ns}/statefulsets", managed, observed.on_child)
        api.watch(f"/api/v1/{ns}/pods", managed, observed.on_pod)

        manifests = _manifests(scale)
        load = os.getloadavg()[0]
        before = _usage(pid)
        applies_before = api.applies()
        started = time.time()
        api.create_all(f"/apis/kleave.dev/v1alpha1/{ns}/inferencedeployments", manifests)
        apply_s = time.time() - started
        names = [m["metadata"]["name"] for m in manifests]
        pools = {m["metadata"]["name"]: len(m["spec"]["pools"]) for m in manifests}

        def all_ready() -> bool:
            with observed.lock:
                return len(observed.ready) >= len(names)

        running = pid
        _wait(all_ready, READY_TIMEOUT_S, f"{len(names)} InferenceDeployments Ready", pid, log)
        finished = time.time()
        after = _usage(pid)
        reconciles, durations = _reconciles(f"{base}/metrics")
        applies = api.applies() - applies_before
        # Let the pod watch catch up with the last pods (the baseline) before reading it.
        _wait(
            lambda: all(
                observed.all_pods_ready(n, pools[n] + 1)
                and observed.all_workloads_ready(n, pools[n] + 1)
                for n in names
            ),
            60, "all pods and workloads Ready", pid, log,
        )  # fmt: skip
        idle_from = (time.monotonic(), _usage(pid), sum(_reconciles(f"{base}/metrics")[0].values()))
        idle_applies = api.applies()
        time.sleep(IDLE_WINDOW_S)
        idle_s = time.monotonic() - idle_from[0]
        idle = Idle(
            reconciles_per_s=(sum(_reconciles(f"{base}/metrics")[0].values()) - idle_from[2])
            / idle_s,
            applies_per_s=(api.applies() - idle_applies) / idle_s,
            cpu_percent=100 * (_usage(running).cpu_s - idle_from[1].cpu_s) / idle_s,
        )
    finally:
        if api is not None:
            api.stop()
        if pid is not None and is_alive(pid):
            os.kill(pid, signal.SIGTERM)
            stopping = pid
            _wait(lambda: not is_alive(stopping), 30, "operator exit", None, log, check=False)
        cluster.down()

    children, ready, pods_ready, workloads_ready, lag = [], [], [], [], []
    for name in names:
        created = observed.created[name]
        done = observed.children_complete(name, pools[name])
        pods_done = observed.all_pods_ready(name, pools[name] + 1)
        workloads_done = observed.all_workloads_ready(name, pools[name] + 1)
        assert done is not None and pods_done is not None and workloads_done is not None, name
        children.append(done - created)
        ready.append(observed.ready[name] - created)
        pods_ready.append(pods_done - created)
        workloads_ready.append(workloads_done - created)
        lag.append(observed.ready[name] - workloads_done)
    last_children = max(
        observed.children_complete(n, pools[n]) or math.inf for n in names
    )  # fmt: skip
    levels, problems = _log_summary(log)
    return Result(
        scale=scale,
        apply_s=apply_s,
        children_s=children,
        ready_s=ready,
        pods_ready_s=pods_ready,
        workloads_ready_s=workloads_ready,
        lag_s=lag,
        watch_delay=dict(observed.watch_delay),
        last_children_s=last_children - started,
        all_ready_s=finished - started,
        reconciles=reconciles,
        durations=durations,
        write_floor_s=write_floor_s,
        applies=applies,
        load=load,
        idle=idle,
        cpu_s=after.cpu_s - before.cpu_s,
        hwm_mb=after.hwm_mb,
        log_levels=levels,
        log_problems=problems,
        log=log,
    )


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=1.0).status_code
    except httpx.HTTPError:
        return 0


def _wait(
    done: Callable[[], bool],
    timeout: float,
    what: str,
    pid: int | None,
    log: Path,
    *,
    check: bool = True,
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if pid is not None and not is_alive(pid):
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the operator exited while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            if not check:
                return
            raise TimeoutError(f"{what}: not within {timeout:.0f}s (operator log: {log})")
        time.sleep(0.5)


# -- report ---------------------------------------------------------------------------------


def _pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _p50_p99(values: list[float]) -> str:
    return f"{_pct(values, 50):.2f} s / {_pct(values, 99):.2f} s"


def _table(results: list[Result]) -> str:
    def row(metric: str, cell: Callable[[Result], str]) -> str:
        return f"| {metric} | " + " | ".join(cell(r) for r in results) + " |"

    def yes(ok: bool) -> str:
        return "yes" if ok else "**no**"

    header = "| | " + " | ".join(r.scale.label for r in results) + " |"
    lines = [
        f"### InferenceDeployments at scale ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"nodes {NODE_GROUPS})",
        "",
        header,
        "|---|" + "---:|" * len(results),
        row("InferenceDeployments", lambda r: str(r.scale.deployments)),
        row("InferencePools", lambda r: str(r.scale.pools)),
        row(
            "children (pools + workloads + routers)",
            lambda r: str(2 * r.scale.pools + r.scale.deployments),
        ),
        row("machine load average (1 min) at the apply", lambda r: f"{r.load:.1f}"),
        row(f"create the batch ({CREATE_THREADS} client threads)", lambda r: f"{r.apply_s:.1f} s"),
        row("children created p50 / p99", lambda r: _p50_p99(r.children_s)),
        row("Ready p50 / p99", lambda r: _p50_p99(r.ready_s)),
        row(
            "baseline: all pods Ready (pods' Ready lastTransitionTime) p50 / p99",
            lambda r: _p50_p99(r.pods_ready_s),
        ),
        row(
            "baseline: all workloads report ready (Deployment/StatefulSet status) p50 / p99",
            lambda r: _p50_p99(r.workloads_ready_s),
        ),
        row(
            "operator status lag (Ready - workloads report ready) p50 / p99",
            lambda r: _p50_p99(r.lag_s),
        ),
        row(
            "ratio Ready p99 / pods Ready p99",
            lambda r: f"{_pct(r.ready_s, 99) / _pct(r.pods_ready_s, 99):.2f}",
        ),
        row(
            "this benchmark's watch delay p99, pods / InferenceDeployments "
            "(seen - Ready lastTransitionTime, +-1 s)",
            lambda r: " / ".join(
                f"{_pct(r.watch_delay[kind], 99):.1f} s" for kind in ("Pod", "InferenceDeployment")
            ),
        ),
        row("apply start to last child created", lambda r: f"{r.last_children_s:.1f} s"),
        row(
            "baseline: the same number of creates (3 per object + 3 per pool) straight to the "
            f"API server, {OPERATOR_WORKERS} threads",
            lambda r: f"{r.write_floor_s:.1f} s",
        ),
        row(
            "ratio last child created / baseline",
            lambda r: f"{r.last_children_s / r.write_floor_s:.2f}",
        ),
        row("apply start to all Ready", lambda r: f"{r.all_ready_s:.1f} s"),
        row("reconciles (all kinds, all results)", lambda r: str(sum(r.reconciles.values()))),
        row(
            "reconciles/s",
            lambda r: f"{sum(r.reconciles.values()) / r.all_ready_s:.1f}",
        ),
        row(
            "reconcile errors (temporary / error)",
            lambda r: "{} / {}".format(
                sum(v for k, v in r.reconciles.items() if k.endswith("/temporary_error")),
                sum(v for k, v in r.reconciles.items() if k.endswith("/error")),
            ),
        ),
        row("server-side applies (apply to all Ready)", lambda r: str(r.applies)),
        row(
            f"idle {IDLE_WINDOW_S:.0f} s after all Ready: reconciles/s, applies/s, operator CPU",
            lambda r: (
                f"{r.idle.reconciles_per_s:.0f}, {r.idle.applies_per_s:.0f}, "
                f"{r.idle.cpu_percent:.0f} %"
            ),
        ),
        row(
            "mean reconcile time InferenceDeployment / InferencePool",
            lambda r: " / ".join(
                f"{1000 * r.durations.get(kind, math.nan):.0f} ms"
                for kind in ("InferenceDeployment", "InferencePool")
            ),
        ),
        row("operator CPU (apply to all Ready)", lambda r: f"{r.cpu_s:.1f} s"),
        row("operator peak RSS (VmHWM)", lambda r: f"{r.hwm_mb:.0f} MB"),
        row("target: children created p99 < 1 s", lambda r: yes(_pct(r.children_s, 99) < 1.0)),
        row("target: operator RSS < 300 MB", lambda r: yes(r.hwm_mb < 300)),
        row(
            "operator log lines (warning / error)",
            lambda r: f"{r.log_levels['WARNING']} / {r.log_levels['ERROR']}",
        ),
    ]
    return "\n".join(lines)


def _problems(results: list[Result]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r.scale.label}: operator log {r.log}; reconciles {dict(r.reconciles)}")
        lines += [f"  {count}x {message}" for message, count in r.log_problems.most_common(8)]
    return "\n".join(lines)


def main() -> str:
    results = []
    for scale in SCALES:
        with tempfile.TemporaryDirectory(prefix="kleave-bench-infd-") as tmp:
            results.append(_run_scale(scale, Path(tmp)))
    table = _table(results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "inference_deployments.md"
    out.write_text(table + "\n\n```\n" + _problems(results) + "\n```\n")
    print(_problems(results), file=sys.stderr)
    print(f"results: {out}", file=sys.stderr)
    return table
