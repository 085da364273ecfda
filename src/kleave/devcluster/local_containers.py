"""One container of a local-node pod as a process: start it in its own session, probe its
readiness, restart it by the pod's restartPolicy with a capped backoff, stop it with a grace
period. The state lives in a :class:`ContainerView` the pod worker turns into status.

Each process's pid is recorded under ``<root>/pids`` while it runs, so a node that was killed
(not stopped) can end its predecessor's processes before starting pods again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from kleave.devcluster import processes
from kleave.devcluster.local_pods import PROCESS_MARKER, Launch
from kleave.devcluster.local_status import ContainerView, ReadinessCheck, Terminated, now_rfc3339

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 10.0
FAST_PROBE_S = 0.1
"""Until the first success a probe runs this often, so a cold start is seen at once."""
STEADY_RUN_S = 10.0
"""A process that ran this long before exiting restarts without the accumulated backoff."""


def _group_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def kill_recorded(root: Path) -> list[int]:
    """End the processes an earlier run of this node left (recorded pids whose command line
    still names this node's pods, plus any unrecorded ones that do); return their pids."""
    marker = f"{PROCESS_MARKER}={root}/pods/"
    pids = set(processes.processes_mentioning(marker))
    records = root / "pids"
    for record in records.glob("*") if records.is_dir() else []:
        with contextlib.suppress(ValueError, OSError):
            pid = int(record.read_text().strip())
            if any(marker in arg for arg in processes.cmdline(pid)):
                pids.add(pid)
        record.unlink(missing_ok=True)
    processes.stop(sorted(pids), timeout=5.0)
    return sorted(pids)


class ContainerRunner:
    """Runs one container until stopped; ``on_change`` is called whenever ``view`` changes."""

    def __init__(
        self,
        view: ContainerView,
        launch: Launch,
        *,
        log_path: Path,
        pid_record: Path,
        restart_policy: str,
        check: ReadinessCheck | None,
        pod_ip: str,
        on_change: Callable[[], None],
        pod_name: str,
    ) -> None:
        self.view = view
        self.launch = launch
        self.log_path = log_path
        self.pid_record = pid_record
        self.restart_policy = restart_policy
        self.check = check
        self.pod_ip = pod_ip
        self.on_change = on_change
        self.pod_name = pod_name
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def _set(self, **changes: object) -> None:
        self.view = dataclasses.replace(self.view, **changes)  # type: ignore[arg-type]
        self.on_change()

    def start(self) -> None:
        self._task = asyncio.create_task(
            self._run(), name=f"container {self.pod_name}/{self.view.name}"
        )

    async def _run(self) -> None:
        backoff = BACKOFF_START_S
        while not self._stopping:
            started = time.monotonic()
            code, started_at = await self._run_once()
            if self._stopping:
                return
            ended = Terminated(code, started_at, now_rfc3339())
            restart = self.restart_policy == "Always" or (
                self.restart_policy == "OnFailure" and code != 0
            )
            log.info(
                "pod %s container %s exited with %d%s",
                self.pod_name, self.view.name, code, "; restarting" if restart else "",
            )  # fmt: skip
            if not restart:
                self._set(pid=None, ready=False, terminated=ended)
                return
            if time.monotonic() - started >= STEADY_RUN_S:
                backoff = BACKOFF_START_S
            self._set(
                pid=None, ready=False, last_terminated=ended, waiting_reason="CrashLoopBackOff"
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP_S)
            self.view = dataclasses.replace(self.view, restart_count=self.view.restart_count + 1)

    async def _run_once(self) -> tuple[int, str]:
        """Start the process, probe it while it runs; its exit code (127: could not start)."""
        started_at = now_rfc3339()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            try:
                process = await asyncio.create_subprocess_exec(
                    *self.launch.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=self.launch.cwd,
                    env=self.launch.env,
                    start_new_session=True,
                )
            except OSError as error:
                out.write(f"local node: cannot start {self.launch.argv}: {error}\n".encode())
                return 127, started_at
        self._process = process
        self.pid_record.parent.mkdir(parents=True, exist_ok=True)
        self.pid_record.write_text(f"{process.pid}\n")
        log.info("pod %s container %s started (pid %d)", self.pod_name, self.view.name, process.pid)
        self._set(pid=process.pid, last_pid=process.pid, started_at=started_at, ready=False)
        probe = asyncio.create_task(self._probe(process.pid))
        try:
            code = await process.wait()
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
            # What the process left in its group goes with it, as a container's processes do.
            _group_signal(process.pid, signal.SIGKILL)
            self.pid_record.unlink(missing_ok=True)
        return (code if code >= 0 else 128 - code), started_at

    def _mark_ready(self, pid: int, ready: bool) -> None:
        if self.view.pid == pid and self.view.ready != ready:
            log.info(
                "pod %s container %s %s", self.pod_name, self.view.name,
                "ready" if ready else "not ready",
            )  # fmt: skip
            self._set(ready=ready)

    async def _probe(self, pid: int) -> None:
        check = self.check
        if check is None:
            self._mark_ready(pid, True)
            return
        await asyncio.sleep(check.initial_delay_s)
        successes = failures = 0
        ever_ready = False
        timeout = aiohttp.ClientTimeout(total=check.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if await self._probe_once(session, check):
                    failures, successes = 0, successes + 1
                    if successes >= check.success_threshold:
                        ever_ready = True
                        self._mark_ready(pid, True)
                else:
                    failures, successes = failures + 1, 0
                    if failures >= check.failure_threshold:
                        self._mark_ready(pid, False)
                await asyncio.sleep(check.period_s if ever_ready else FAST_PROBE_S)

    async def _probe_once(self, session: aiohttp.ClientSession, check: ReadinessCheck) -> bool:
        try:
            if check.path is None:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.pod_ip, check.port), check.timeout_s
                )
                writer.close()
                return True
            url = f"http://{self.pod_ip}:{check.port}{check.path}"
            async with session.get(url, headers=check.headers) as response:
                return 200 <= response.status < 400
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    @property
    def stopped(self) -> bool:
        return self._stopping

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL after ``grace_s``; no restart follows."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            _group_signal(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                log.info(
                    "pod %s container %s: SIGKILL after %.0fs",
                    self.pod_name,
                    self.view.name,
                    grace_s,
                )
                _group_signal(process.pid, signal.SIGKILL)
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if process is not None:
            _group_signal(process.pid, signal.SIGKILL)
            log.info("pod %s container %s stopped", self.pod_name, self.view.name)
        self.pid_record.unlink(missing_ok=True)
