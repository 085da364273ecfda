"""The dev cluster's local node without a cluster: volume plans, path translation, the exact
process of a container, pod IPs, pod and node status, the provisioner's objects, and one
container run as a real local process (restart and readiness)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from kleave.api.sandbox_template import SandboxTemplateSpec
from kleave.devcluster.local_containers import ContainerRunner, kill_recorded
from kleave.devcluster.local_node import (
    NODE_LABEL,
    TAINT,
    lease_manifest,
    node_manifest,
    pick_pod_cidr,
    registration_patch,
)
from kleave.devcluster.local_pods import (
    PROCESS_MARKER,
    UNSUPPORTED_COMMAND,
    UNSUPPORTED_ENV,
    UNSUPPORTED_VOLUME,
    Launch,
    Mount,
    Projection,
    UnsupportedPodError,
    allocate_ip,
    container_launch,
    downward_value,
    expand,
    listening_ips,
    mounts_of,
    nested_links,
    plan_volumes,
    projected_files,
    translate,
)
from kleave.devcluster.local_status import (
    ContainerView,
    ReadinessCheck,
    Terminated,
    pod_phase,
    pod_status,
    readiness_check,
    rejected_status,
)
from kleave.devcluster.local_volumes import (
    PROVISIONED_BY,
    PROVISIONER,
    STORAGE_CLASS_NAME,
    is_released,
    persistent_volume,
    storage_class,
    volume_path,
    wants_volume,
)
from kleave.operator.sandbox_builder import PodOwner, build_pod
from kleave.operator.sandbox_tokens import PodToken

ROOT = Path("/srv/node")
POD_DIR = ROOT / "pods" / "uid-1"


def sandbox_pod() -> dict[str, Any]:
    """A warm-pool pod exactly as the operator builds it, with its snapshot claim."""
    template = {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "SandboxTemplate",
        "metadata": {"name": "coder", "namespace": "ns", "uid": "t-uid"},
    }
    pool = {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "SandboxWarmPool",
        "metadata": {"name": "coder", "namespace": "ns", "uid": "p-uid"},
    }
    spec = SandboxTemplateSpec.model_validate({"image": "kleave/kleave:0.1.0"})
    pod = build_pod(
        template,
        spec,
        PodOwner(pool, pool="coder"),
        name="coder-abc",
        token=PodToken(nonce="n", digest="0" * 64),
        claim_name="coder-abc-state",
    )
    pod["metadata"]["uid"] = "uid-1"
    return pod


def volume_dirs(pod: dict[str, Any]) -> dict[str, Path]:
    return {
        plan.name: (ROOT / "volumes" / "pvc-x" if plan.kind == "claim" else POD_DIR / plan.name)
        for plan in plan_volumes(pod)
    }


def launch_of(pod: dict[str, Any], container: dict[str, Any] | None = None) -> Launch:
    container = container or pod["spec"]["containers"][0]
    mounts = mounts_of(container, volume_dirs(pod))
    return container_launch(
        pod,
        container,
        mounts,
        pod_ip="127.77.0.9",
        pod_dir=POD_DIR,
        python="/venv/bin/python",
        base_env={"PATH": "/usr/bin"},
    )


def plain_pod(container: dict[str, Any], volumes: list[dict[str, Any]] | None = None) -> Any:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1"},
        "spec": {"containers": [{"name": "c", **container}], "volumes": volumes or []},
    }


# ----- pod IPs ---------------------------------------------------------------------------
def test_pod_ips_go_round_robin_skip_taken_and_never_use_network_or_broadcast() -> None:
    assert allocate_ip("127.77.0.0/24", set()) == "127.77.0.1"
    assert allocate_ip("127.77.0.0/24", {"127.77.0.1"}) == "127.77.0.2"
    assert allocate_ip("127.77.0.0/24", set(), after="127.77.0.5") == "127.77.0.6"
    assert allocate_ip("127.77.0.0/24", set(), after="127.77.0.254") == "127.77.0.1"
    with pytest.raises(UnsupportedPodError, match="no free pod IP"):
        allocate_ip("127.77.0.0/30", {"127.77.0.1", "127.77.0.2"})


def test_addresses_something_listens_on_are_read_from_proc_net_tcp() -> None:
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        "   0: 0100007F:9F41 00000000:0000 0A 00000000:00000000\n"  # 127.0.0.1, listening
        "   1: 01004D7F:1F90 00000000:0000 0A 00000000:00000000\n"  # 127.77.0.1:8080
        "   2: 02004D7F:D3B5 0100007F:1F90 01 00000000:00000000\n"  # established: not a listener
    )
    assert listening_ips(table) == {"127.0.0.1", "127.77.0.1"}
    with socket.socket() as server:
        server.bind(("127.77.0.249", 0))
        server.listen()
        assert "127.77.0.249" in listening_ips(Path("/proc/net/tcp").read_text())


def test_each_dev_cluster_on_a_host_gets_its_own_pod_range() -> None:
    assert pick_pod_cidr(set()) == "127.77.0.0/24"
    assert pick_pod_cidr({"127.77.0.0/24", "127.77.2.0/24"}) == "127.77.1.0/24"


def test_a_process_can_bind_an_address_of_the_pod_range_without_setup() -> None:
    with socket.socket() as server:
        server.bind(("127.77.0.250", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=2):
            pass


# ----- volumes ---------------------------------------------------------------------------
def test_a_sandbox_pods_volumes_are_supported_and_its_claim_nests_in_the_state_dir() -> None:
    pod = sandbox_pod()
    kinds = {plan.name: plan.kind for plan in plan_volumes(pod)}
    assert set(kinds.values()) == {"emptyDir", "files", "claim"}
    [claim] = [plan for plan in plan_volumes(pod) if plan.kind == "claim"]
    assert claim.claim == "coder-abc-state"
    mounts = mounts_of(pod["spec"]["containers"][0], volume_dirs(pod))
    [(link, target)] = nested_links(mounts)
    assert target == ROOT / "volumes" / "pvc-x"
    state = next(m for m in mounts if m.path == "/var/lib/kleave")
    assert link == state.host / "snapshots"


@pytest.mark.parametrize(
    ("volume", "kind"),
    [
        ({"hostPath": {"path": "/etc"}}, "hostPath"),
        ({"nfs": {"server": "x", "path": "/"}}, "nfs"),
        ({"ephemeral": {}}, "ephemeral"),
    ],
)
def test_other_volume_types_are_refused_naming_the_type(volume: dict[str, Any], kind: str) -> None:
    pod = plain_pod({"command": ["kleave"]}, [{"name": "v", **volume}])
    with pytest.raises(UnsupportedPodError) as error:
        plan_volumes(pod)
    assert error.value.reason == UNSUPPORTED_VOLUME
    assert f"volume 'v' is of type {kind}" in error.value.message


def test_the_default_service_account_volume_is_projected_files() -> None:
    namespace = {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
    projected = {
        "name": "kube-api-access-x",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "c"}],
                    }
                },
                {"downwardAPI": {"items": [namespace]}},
            ]
        },
    }
    [plan] = plan_volumes(plain_pod({}, [projected]))
    assert plan.kind == "files"
    assert [p.kind for p in plan.projections] == ["serviceAccountToken", "configMap", "downwardAPI"]
    assert plan.projections[0].expiration_seconds == 3607


def test_projected_files_of_configmaps_secrets_and_downward_api() -> None:
    pod = plain_pod({})
    pod["metadata"]["annotations"] = {"kleave.dev/tool-policy": '{"a":1}'}
    pod["metadata"]["labels"] = {"b": "2", "a": "1"}
    items = (("metadata.annotations['kleave.dev/tool-policy']", "policy.json"),)
    downward = Projection("downwardAPI", items=(*items, ("metadata.labels", "labels")))
    assert projected_files(downward, {}, pod) == {
        PurePosixPath("policy.json"): b'{"a":1}',
        PurePosixPath("labels"): b'a="1"\nb="2"',
    }
    everything = Projection("configMap", "cm")
    assert projected_files(everything, {"k": b"v"}, pod) == {PurePosixPath("k"): b"v"}
    picked = Projection("secret", "s", items=(("k", "sub/file"), ("gone", "x")), optional=True)
    assert projected_files(picked, {"k": b"v"}, pod) == {PurePosixPath("sub/file"): b"v"}
    with pytest.raises(UnsupportedPodError, match="has no key 'gone'"):
        projected_files(Projection("secret", "s", items=(("gone", "x"),)), {}, pod)
    with pytest.raises(UnsupportedPodError, match="leaves its volume"):
        projected_files(Projection("configMap", "cm", items=(("k", "../x"),)), {"k": b""}, pod)


def test_downward_values() -> None:
    pod = plain_pod({})
    pod["metadata"]["labels"] = {"app": "x"}
    assert downward_value(pod, "metadata.name") == "p"
    assert downward_value(pod, "metadata.namespace") == "ns"
    assert downward_value(pod, "metadata.labels['app']") == "x"
    assert downward_value(pod, "metadata.annotations['missing']") == ""
    assert downward_value(pod, "status.podIP", "127.77.0.3") == "127.77.0.3"
    with pytest.raises(UnsupportedPodError):
        downward_value(pod, "spec.containers[0].image")


# ----- path translation ------------------------------------------------------------------
def test_translation_takes_the_longest_mount_and_respects_path_boundaries() -> None:
    mounts = [
        Mount("/var/lib/kleave", Path("/h/state")),
        Mount("/var/lib/kleave/snapshots", Path("/h/pvc")),
        Mount("/workspace", Path("/h/ws")),
    ]
    assert translate("/workspace", mounts) == "/h/ws"
    assert translate("/workspace/a/b", mounts) == "/h/ws/a/b"
    assert translate("/workspace2", mounts) == "/workspace2"
    assert translate("/var/lib/kleave/snapshots/snap-1.tar", mounts) == "/h/pvc/snap-1.tar"
    assert translate("/var/lib/kleave/audit.jsonl", mounts) == "/h/state/audit.jsonl"
    assert translate("relative/path", mounts) == "relative/path"
    assert translate("", mounts) == ""


def test_mount_paths_are_normalised_and_sub_paths_join_the_volume() -> None:
    container = {"volumeMounts": [{"name": "v", "mountPath": "/data/", "subPath": "one/two"}]}
    assert mounts_of(container, {"v": Path("/h/v")}) == [Mount("/data", Path("/h/v/one/two"))]


def test_nested_mounts_link_into_the_nearest_outer_mount() -> None:
    mounts = [
        Mount("/a", Path("/h/a")),
        Mount("/a/b", Path("/h/b")),
        Mount("/a/b/c/d", Path("/h/d")),
        Mount("/z", Path("/h/z")),
    ]
    assert nested_links(mounts) == [
        (Path("/h/a/b"), Path("/h/b")),
        (Path("/h/b/c/d"), Path("/h/d")),
    ]


# ----- the process -----------------------------------------------------------------------
def test_the_sandbox_runtime_becomes_python_dash_m_kleave_with_host_paths() -> None:
    launch = launch_of(sandbox_pod())
    assert launch.argv[:6] == (
        "/venv/bin/python", "-P", "-X", f"{PROCESS_MARKER}={POD_DIR}", "-m", "kleave",
    )  # fmt: skip
    args = list(launch.argv[6:])
    assert args[:2] == ["sandbox", "runtime"]
    assert args[args.index("--workspace") + 1] == str(POD_DIR / "workspace")
    assert args[args.index("--state-dir") + 1] == str(POD_DIR / "state")
    assert args[args.index("--policy") + 1] == str(POD_DIR / "policy" / "policy.json")
    assert args[args.index("--token-sha256-file") + 1] == str(POD_DIR / "policy" / "token.sha256")
    assert args[args.index("--host") + 1] == "127.77.0.9"
    assert launch.cwd == POD_DIR / "workspace"
    assert launch.env["KLEAVE_WORKSPACE"] == str(POD_DIR / "workspace")
    assert launch.env["KLEAVE_RUNTIME_PORT"] == "8080"
    assert launch.env["TMPDIR"] == str(POD_DIR / "tmp")
    assert launch.env["PATH"] == "/usr/bin"


def test_env_field_refs_expansion_and_host_forms() -> None:
    pod = plain_pod(
        {
            "command": ["kleave", "serve"],
            "args": ["--host=0.0.0.0", "--name", "$(POD)", "$$(POD)"],
            "env": [
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "GREETING", "value": "hi $(POD)"},
            ],
            "workingDir": "/nowhere",
        }
    )
    launch = launch_of(pod)
    assert launch.argv[6:] == ("serve", "--host=127.77.0.9", "--name", "p", "$(POD)")
    assert launch.env["POD"] == "p"
    assert launch.env["IP"] == "127.77.0.9"
    assert launch.env["GREETING"] == "hi p"
    assert launch.cwd == POD_DIR  # no image filesystem behind /nowhere
    assert expand("$(UNSET) $$", {}) == "$(UNSET) $"


@pytest.mark.parametrize(
    "container",
    [
        {"command": ["sleep", "100"]},
        {"args": ["sleep", "100"]},
        {},
        {"command": ["/usr/bin/kleave", "x"]},
    ],
)
def test_only_kleave_commands_run(container: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedPodError) as error:
        launch_of(plain_pod(container))
    assert error.value.reason == UNSUPPORTED_COMMAND
    assert "the dev cluster's local node runs only `kleave ...` containers" in error.value.message


def test_env_from_other_sources_is_refused() -> None:
    secret_ref = {"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    with pytest.raises(UnsupportedPodError) as error:
        launch_of(plain_pod({"command": ["kleave"], "env": [secret_ref]}))
    assert error.value.reason == UNSUPPORTED_ENV
    assert "valueFrom.secretKeyRef" in error.value.message


# ----- readiness and status --------------------------------------------------------------
def test_readiness_probe_ports_by_name_or_number() -> None:
    pod = sandbox_pod()
    check = readiness_check(pod["spec"]["containers"][0])
    assert check == ReadinessCheck(port=8080, path="/healthz", period_s=1.0, failure_threshold=3)
    tcp = readiness_check({"name": "c", "readinessProbe": {"tcpSocket": {"port": 9}}})
    assert tcp is not None and tcp.path is None and tcp.port == 9
    assert readiness_check({"name": "c"}) is None
    with pytest.raises(UnsupportedPodError, match="exec readiness probes"):
        readiness_check({"name": "c", "readinessProbe": {"exec": {"command": ["true"]}}})
    with pytest.raises(UnsupportedPodError, match="not one of its ports"):
        readiness_check({"name": "c", "readinessProbe": {"httpGet": {"port": "web"}}})


def test_running_ready_status_keeps_pod_scheduled_and_transition_times() -> None:
    pod = plain_pod({})
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "T0"}
    pod["status"] = {"conditions": [scheduled]}
    view = ContainerView("c", "img", pid=42, started_at="T1", ready=True)
    status = pod_status(pod, [view], pod_ip="127.77.0.4", start_time="T1", now="T2")
    assert status["phase"] == "Running"
    assert status["podIP"] == "127.77.0.4" and status["podIPs"] == [{"ip": "127.77.0.4"}]
    assert status["hostIP"] == "127.0.0.1"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["PodScheduled"] == scheduled
    assert conditions["Ready"]["status"] == conditions["ContainersReady"]["status"] == "True"
    [container] = status["containerStatuses"]
    assert container["containerID"] == "local://42"
    assert container["state"] == {"running": {"startedAt": "T1"}}
    # Written once, the same status again later changes nothing: the node can skip it.
    pod["status"] = status
    again = pod_status(pod, [view], pod_ip="127.77.0.4", start_time="T1", now="T9")
    assert again == status


def test_a_restarting_container_shows_its_last_run_and_phases_follow_exit_codes() -> None:
    ended = Terminated(exit_code=3, started_at="T1", finished_at="T2")
    backoff = ContainerView(
        "c", "img", restart_count=1, last_terminated=ended, last_pid=7,
        waiting_reason="CrashLoopBackOff",
    )  # fmt: skip
    status = backoff.as_status()
    assert status["state"] == {"waiting": {"reason": "CrashLoopBackOff"}}
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert pod_phase([backoff]) == "Running"
    assert pod_phase([ContainerView("c", "img")]) == "Pending"
    done = Terminated(0, "T1", "T2")
    assert pod_phase([ContainerView("c", "i", terminated=done)]) == "Succeeded"
    failed = [ContainerView("c", "i", terminated=done), ContainerView("d", "i", terminated=ended)]
    assert pod_phase(failed) == "Failed"


def test_a_rejected_pod_is_failed_with_the_reason_everywhere() -> None:
    pod = plain_pod({"image": "busybox"})
    status = rejected_status(pod, UNSUPPORTED_COMMAND, "runs sleep", "T")
    assert (status["phase"], status["reason"], status["message"]) == (
        "Failed",
        UNSUPPORTED_COMMAND,
        "runs sleep",
    )
    [container] = status["containerStatuses"]
    assert container["state"]["terminated"]["reason"] == UNSUPPORTED_COMMAND


# ----- node ------------------------------------------------------------------------------
def test_the_node_is_tainted_labelled_and_not_kwoks() -> None:
    node = node_manifest("kleave-local-0", "127.77.0.0/24", "T")
    meta = node["metadata"]
    assert "kwok.x-k8s.io/node" not in meta["annotations"]
    assert meta["labels"][NODE_LABEL] == "true"
    assert meta["labels"]["kubernetes.io/hostname"] == "kleave-local-0"
    assert meta["labels"]["type"] == "local"
    assert node["spec"]["taints"] == [TAINT]
    assert node["spec"]["podCIDR"] == "127.77.0.0/24"
    assert node["status"]["allocatable"] | {"ephemeral-storage": ""} == {
        "cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "",
    }  # fmt: skip
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"


def test_registering_again_keeps_other_taints_and_drops_kwoks_annotation() -> None:
    other = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
    existing = {
        "metadata": {"name": "n"},
        "spec": {"taints": [other, dict(TAINT)], "podCIDR": "127.77.0.0/24"},
    }
    patch = registration_patch(existing, "127.77.0.0/24")
    assert patch["spec"]["taints"] == [other, TAINT]
    assert "podCIDR" not in patch["spec"]
    assert patch["metadata"]["annotations"]["kwok.x-k8s.io/node"] is None
    assert registration_patch({"metadata": {"name": "n"}}, "127.77.0.0/24")["spec"]["podCIDR"]
    with pytest.raises(RuntimeError, match="immutable"):
        registration_patch(existing, "127.78.0.0/24")


def test_the_lease_is_owned_by_the_node() -> None:
    lease = lease_manifest({"metadata": {"name": "n", "uid": "u"}}, "T")
    assert lease["metadata"]["namespace"] == "kube-node-lease"
    assert lease["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert lease["spec"]["holderIdentity"] == "n"


# ----- provisioner -----------------------------------------------------------------------
def claim(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "c", "namespace": "ns", "uid": "u1"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
            "storageClassName": STORAGE_CLASS_NAME,
            **spec,
        },
        "status": {"phase": "Pending"},
    }


def test_the_storage_class_is_the_default_with_immediate_binding() -> None:
    sc = storage_class()
    assert sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    assert (sc["provisioner"], sc["reclaimPolicy"], sc["volumeBindingMode"]) == (
        PROVISIONER,
        "Delete",
        "Immediate",
    )


def test_which_claims_get_a_volume() -> None:
    assert wants_volume(claim())
    unset = claim()
    del unset["spec"]["storageClassName"]
    assert wants_volume(unset)
    assert not wants_volume(claim(storageClassName=""))
    assert not wants_volume(claim(storageClassName="fast"))
    assert not wants_volume(claim(volumeName="pv-1"))
    assert not wants_volume(claim(volumeMode="Block"))


def test_a_claims_volume_is_a_pre_bound_host_path_directory() -> None:
    pv = persistent_volume(claim(), ROOT)
    assert pv["metadata"]["name"] == "pvc-u1"
    assert pv["metadata"]["annotations"][PROVISIONED_BY] == PROVISIONER
    assert pv["spec"]["hostPath"] == {
        "path": "/srv/node/volumes/pvc-u1",
        "type": "DirectoryOrCreate",
    }
    assert pv["spec"]["claimRef"] == {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "ns", "name": "c",
        "uid": "u1",
    }  # fmt: skip
    assert pv["spec"]["capacity"] == {"storage": "1Gi"}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    assert "nodeAffinity" not in pv["spec"]  # kwok nodes' pods stay schedulable with a claim
    assert volume_path(pv) == ROOT / "volumes" / "pvc-u1"
    assert not is_released(pv)
    pv["status"] = {"phase": "Released"}
    assert is_released(pv)
    pv["metadata"]["annotations"][PROVISIONED_BY] = "someone.else/x"
    assert not is_released(pv)


# ----- a container as a real process -----------------------------------------------------
def _runner(tmp_path: Path, script: str, policy: str, check: ReadinessCheck | None) -> Any:
    launch = Launch(argv=(sys.executable, "-c", script), env={}, cwd=tmp_path)
    return ContainerRunner(
        ContainerView("c", "img"),
        launch,
        log_path=tmp_path / "c.log",
        pid_record=tmp_path / "pids" / "c",
        restart_policy=policy,
        check=check,
        pod_ip="127.77.0.251",
        on_change=lambda: None,
        pod_name="ns/p",
    )


def test_on_failure_restarts_once_then_the_container_completes(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    script = (
        f"import pathlib, sys; p = pathlib.Path({str(counter)!r}); "
        "n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1)); "
        "sys.exit(1 if n == 0 else 0)"
    )

    async def scenario() -> ContainerView:
        runner = _runner(tmp_path, script, "OnFailure", None)
        runner.start()
        for _ in range(100):
            if runner.view.terminated is not None:
                break
            await asyncio.sleep(0.05)
        await runner.stop(1.0)
        view: ContainerView = runner.view
        return view

    view = asyncio.run(scenario())
    assert view.restart_count == 1
    assert view.terminated is not None and view.terminated.exit_code == 0
    assert view.last_terminated is not None and view.last_terminated.exit_code == 1
    assert not (tmp_path / "pids" / "c").exists()


def test_readiness_comes_from_the_http_probe_and_stop_ends_the_process(tmp_path: Path) -> None:
    server = (
        "import http.server as h\n"
        "class H(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self): self.send_response(200); self.end_headers()\n"
        "h.HTTPServer(('127.77.0.251', 18931), H).serve_forever()\n"
    )
    check = ReadinessCheck(port=18931, path="/healthz", period_s=1.0)

    async def scenario() -> tuple[bool, int | None]:
        runner = _runner(tmp_path, server, "Always", check)
        runner.start()
        for _ in range(100):
            if runner.view.ready:
                break
            await asyncio.sleep(0.05)
        ready, pid = runner.view.ready, runner.view.pid
        await runner.stop(2.0)
        return ready, pid

    ready, pid = asyncio.run(scenario())
    assert ready and pid is not None
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_restarted_node_ends_the_processes_its_predecessor_left(tmp_path: Path) -> None:
    root = tmp_path / "node"
    marker = f"{PROCESS_MARKER}={root}/pods/uid-1"
    leftover = subprocess.Popen(
        [sys.executable, "-X", marker, "-c", "import time; time.sleep(60)"],
        start_new_session=True,
    )
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (root / "pids").mkdir(parents=True)
        (root / "pids" / "uid-1_c").write_text(f"{leftover.pid}\n")
        (root / "pids" / "uid-2_c").write_text(f"{unrelated.pid}\n")  # a reused pid
        assert kill_recorded(root) == [leftover.pid]
        assert leftover.wait(timeout=5) != 0
        assert unrelated.poll() is None
        assert not list((root / "pids").iterdir())
    finally:
        for process in (leftover, unrelated):
            process.kill()
            process.wait()
