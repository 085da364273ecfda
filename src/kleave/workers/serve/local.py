"""The whole data plane as local processes: what `kleave workers up`, the tests and the
benchmark run.

Each worker is its own ``kleave workers serve`` process, exactly as a pod would run it, on
127.0.0.1 with ports chosen up front (the plan must list every worker's URL before any
starts: the router and the attention workers read it). KV and activation ports are left to
the OS and read from each worker's ``/v1/info``, as in a cluster. Every process builds the
same weights from the plan's seed. Workers start first, then the router once every worker is
ready; stopping sends SIGTERM to all and SIGKILL to what is still there after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kleave.devcluster.processes import free_ports, log_tail
from kleave.workers.serve.plan import TOPOLOGY_ROLES, PlanError, local_plan


class LocalStartError(RuntimeError):
    """A process of the local data plane did not become ready; the message has its log tail."""


@dataclass
class LocalProcess:
    name: str
    role: str
    url: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def local_kv_backend(choice: str, device: str = "cpu") -> str:
    """``auto`` for workers that all run on this host: a shared ring, which beats the loopback
    socket (docs/benchmarks.md), wherever there is a ``/dev/shm`` (not on macOS): in host
    memory, or a CUDA IPC buffer when the workers share a GPU."""
    if choice != "auto":
        return choice
    if not os.path.isdir("/dev/shm"):  # kv_arena.SHM_DIR; no torch imported here
        return "tcp"
    return "cuda_ipc" if device.startswith("cuda") else "shm"


@dataclass
class LocalDataPlane:
    """One topology's workers and router on this host (`start()`, then `stop()`)."""

    topology: str
    state_dir: Path
    model: str = "tiny"
    counts: Mapping[str, int] = field(default_factory=dict)  # per pool role
    router_port: int = 0  # 0: a free port
    seed: int = 0
    kv_backend: str = "auto"  # auto: a shared ring (one host), see local_kv_backend
    device: str = "cpu"  # every worker's --device (cuda: all share the one GPU)
    worker_args: Sequence[str] = ()  # appended to every `workers serve`
    role_args: Mapping[str, Sequence[str]] = field(default_factory=dict)  # ... of one role
    router_args: Sequence[str] = ()
    ready_timeout_s: float = 120.0
    processes: list[LocalProcess] = field(default_factory=list)

    @property
    def plan_path(self) -> Path:
        return self.state_dir / "plan.json"

    @property
    def router(self) -> LocalProcess:
        return next(p for p in self.processes if p.role == "router")

    @property
    def url(self) -> str:
        return self.router.url

    def workers(self, role: str) -> list[LocalProcess]:
        return [p for p in self.processes if p.role == role]

    def _layout(self) -> None:
        if self.topology not in TOPOLOGY_ROLES:
            raise PlanError(
                f"--topology must be one of {', '.join(TOPOLOGY_ROLES)}, not {self.topology!r}"
            )
        roles = TOPOLOGY_ROLES[self.topology]
        counts = {role: int(self.counts.get(role, 1)) for role in roles}
        for role, count in counts.items():
            if count < 1:
                raise PlanError(f"topology {self.topology} needs at least one {role} worker")
        ports = free_ports(sum(counts.values()) + (0 if self.router_port else 1))
        router_port = self.router_port or ports.pop()
        urls: dict[str, list[str]] = {}
        for role, count in counts.items():
            for index in range(count):
                port = ports.pop()
                url = f"http://127.0.0.1:{port}"
                urls.setdefault(role, []).append(url)
                self.processes.append(
                    LocalProcess(
                        f"{role}-{index}",
                        role,
                        url,
                        self._serve_argv(role, port),
                        self.state_dir / f"{role}-{index}.log",
                    )
                )
        router_url = f"http://127.0.0.1:{router_port}"
        argv = [
            *_kleave(),
            "workers",
            "router",
            "--plan",
            str(self.plan_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(router_port),
            *self.router_args,
        ]
        self.processes.append(
            LocalProcess("router", "router", router_url, argv, self.state_dir / "router.log")
        )
        plan = local_plan(
            topology=self.topology,
            model=self.model,
            pools=urls,
            router_url=router_url,
            seed=self.seed,
        )
        self.plan_path.write_text(json.dumps(plan, indent=2) + "\n")

    def _serve_argv(self, role: str, port: int) -> list[str]:
        return [
            *_kleave(),
            "workers",
            "serve",
            "--role",
            role,
            "--plan",
            str(self.plan_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--kv-backend",
            local_kv_backend(self.kv_backend, self.device),
            "--device",
            self.device,
            "--torch-threads",
            "1",
            *self.worker_args,
            *self.role_args.get(role, ()),
        ]

    def start(self) -> None:
        """Start every worker, wait for all to be ready, then the router; stop all on failure."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._layout()
        try:
            workers = [p for p in self.processes if p.role != "router"]
            for process in workers:
                self._spawn(process)
            deadline = time.monotonic() + self.ready_timeout_s
            for process in workers:
                self._wait_ready(process, deadline)
            self._spawn(self.router)
            self._wait_ready(self.router, deadline)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, process: LocalProcess) -> None:
        with process.log.open("ab") as log:
            process.process = subprocess.Popen(
                process.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `up`, which stops them in order
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def _wait_ready(self, process: LocalProcess, deadline: float) -> None:
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not process.alive:
                raise LocalStartError(
                    f"{process.name} exited with code {_code(process)} while starting "
                    f"(log {process.log}): " + " | ".join(log_tail(process.log, 8))
                )
            try:
                with urllib.request.urlopen(f"{process.url}/readyz", timeout=2.0) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as error:
                last = error.read().decode(errors="replace")[:300]
            except (urllib.error.URLError, OSError) as error:
                last = str(error)
            time.sleep(0.1)
        raise LocalStartError(
            f"{process.name} at {process.url} was not ready within {self.ready_timeout_s:g}s "
            f"({last}); log {process.log}: " + " | ".join(log_tail(process.log, 8))
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """Router first (no new requests), then the workers; SIGKILL after `grace_s`."""
        ordered = sorted(self.processes, key=lambda p: p.role != "router")
        for process in ordered:
            if process.alive and process.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in ordered:
            if process.process is None:
                continue
            try:
                process.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.process.kill()
                process.process.wait()

    def exited(self) -> list[LocalProcess]:
        """Processes that stopped on their own."""
        return [p for p in self.processes if p.process is not None and not p.alive]

    def __enter__(self) -> LocalDataPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _kleave() -> list[str]:
    return [sys.executable, "-m", "kleave"]


def _code(process: LocalProcess) -> int | None:
    return process.process.returncode if process.process is not None else None
