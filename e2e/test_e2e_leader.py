"""Leader election against the real API server: two replicas, one leader, fast failover."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Cluster, tool, wait_for
from kleave.api.registry import render_crds
from kleave.devcluster.processes import free_ports

LEASE = "kleave-operator"  # the default --leader-election-id
_WAITING = re.compile(r"Waiting to acquire leader lease \S+ as (\S+)\.$")


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    documents = "".join(f"---\n{text}" for text in render_crds().values())
    cluster.kubectl("apply", "--server-side", "--field-manager=kleave", "-f", "-", stdin=documents)
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


@dataclass
class Replica:
    """One `kleave operator run --leader-elect` process, as a pod of a Deployment would run it."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def get(self, path: str) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.url}{path}", timeout=1.0)
        except httpx.HTTPError:
            return None

    def leader(self) -> float | None:
        """The kleave_leader gauge, or None when /metrics does not answer."""
        response = self.get("/metrics")
        if response is None:
            return None
        for line in response.text.splitlines():
            if line.startswith("kleave_leader "):
                return float(line.split()[1])
        raise AssertionError(f"{self.name}: no kleave_leader in /metrics")

    def identity(self) -> str:
        for message in self.messages():
            match = _WAITING.search(message)
            if match:
                return match.group(1)
        raise AssertionError(f"{self.name} logged no identity: {self.tail()}")

    def messages(self) -> list[str]:
        """The JSON log's messages (the CLI's own last words on exit are plain text)."""
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                found.append(str(json.loads(line)["message"]))
        return found

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"{self.name} did not stop on SIGTERM: {self.tail()}") from None


@pytest.fixture
def replicas(cluster: Cluster, crds: None, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    """Two candidates for one Lease, both ready; the Lease starts absent."""
    cluster.kubectl("delete", "lease", LEASE, "-n", "default", "--ignore-not-found")
    started: list[Replica] = []
    try:
        for name, port in zip(("a", "b"), free_ports(2), strict=True):
            log = tmp_path / f"operator-{name}.log"
            with log.open("w") as out:
                process = subprocess.Popen(
                    [
                        tool("kleave"), "operator", "run", "--leader-elect",
                        "--leader-election-namespace", "default", "-A",
                        f"--kubeconfig={cluster.kubeconfig}", "--health-host=127.0.0.1",
                        f"--health-port={port}", "--log-format=json",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            started.append(Replica(name, process, f"http://127.0.0.1:{port}", log))
        for replica in started:

            def ready(replica: Replica = replica) -> bool:
                if replica.process.poll() is not None:
                    raise AssertionError(f"{replica.name} exited: {replica.tail()}")
                response = replica.get("/readyz")
                return response is not None and response.status_code == 200

            wait_for(ready, 60, f"replica {replica.name} ready")
        yield started[0], started[1]
    finally:
        for replica in started:
            if replica.process.poll() is None:
                replica.stop()


def lease_spec(cluster: Cluster) -> dict[str, Any]:
    spec: dict[str, Any] = cluster.get_json("lease", LEASE, "-n", "default")["spec"]
    return spec


def the_leader(a: Replica, b: Replica) -> tuple[Replica, Replica] | None:
    """(leader, standby) once exactly one replica reports kleave_leader 1, else None."""
    values = (a.leader(), b.leader())
    if values == (1.0, 0.0):
        return a, b
    if values == (0.0, 1.0):
        return b, a
    assert values != (1.0, 1.0), "both replicas lead"
    return None


def test_one_leader_and_failover_on_sigterm(
    cluster: Cluster, replicas: tuple[Replica, Replica]
) -> None:
    a, b = replicas
    leader, standby = wait_for(lambda: the_leader(a, b), 30, "exactly one leader")

    # It stays that way: the standby keeps waiting while the leader renews (every 2 s).
    for _ in range(10):
        assert the_leader(a, b) == (leader, standby)
        time.sleep(0.3)
    spec = lease_spec(cluster)
    assert spec["holderIdentity"] == leader.identity() != standby.identity()
    assert spec["leaseDurationSeconds"] == 15
    assert any(m.startswith("Became leader") for m in leader.messages())
    assert not any(m.startswith("Became leader") for m in standby.messages())
    # A standby is healthy and ready: it must not be restarted or taken out of its Service.
    for path in ("/healthz", "/readyz"):
        response = standby.get(path)
        assert response is not None and response.status_code == 200, path

    # SIGTERM (a rollout, a drained node): the leader releases the Lease as it exits.
    transitions = spec.get("leaseTransitions", 0)
    leader.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_for(lambda: standby.leader() == 1.0, 10, "the standby to take over")
    took = time.monotonic() - sent
    assert leader.process.wait(timeout=30) == 0, leader.tail()  # one SIGTERM, as the kubelet
    assert any(m.startswith("Released leader lease") for m in leader.messages())

    spec = lease_spec(cluster)
    assert spec["holderIdentity"] == standby.identity()
    assert spec["leaseTransitions"] == transitions + 1
    print(f"failover after SIGTERM took {took:.1f}s")


def test_a_leader_whose_lease_is_taken_exits_non_zero(
    cluster: Cluster, replicas: tuple[Replica, Replica]
) -> None:
    a, b = replicas
    leader, standby = wait_for(lambda: the_leader(a, b), 30, "exactly one leader")

    # Someone else writes the Lease (another operator version, a manual edit): the leader must
    # stop reconciling at once and exit, so that its pod restarts as a fresh candidate.
    cluster.kubectl(
        "patch", "lease", LEASE, "-n", "default", "--type=merge",
        "-p", '{"spec":{"holderIdentity":"intruder"}}',
    )  # fmt: skip
    wait_for(lambda: leader.process.poll() is not None, 15, "the leader to exit")
    assert leader.process.returncode == 1, leader.tail()
    assert any(m.startswith("lost leadership") for m in leader.messages()), leader.tail()
    assert lease_spec(cluster)["holderIdentity"] == "intruder"  # not released, not taken back
    assert standby.leader() == 0.0  # the intruder's lease has not expired yet
