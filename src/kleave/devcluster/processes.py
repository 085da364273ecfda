"""Start, find and stop the cluster's processes. Every process gets its own session (so `up`
can return while the cluster runs) and mentions the state directory in its command line, which
lets `down` find stragglers even when the state file was lost."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Popen objects of processes started by this interpreter, kept so they can be reaped."""


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start `argv` detached, output appended to `log`; return its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    _CHILDREN[process.pid] = process
    return process.pid


def is_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    """The argv of a running process, or [] when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def processes_mentioning(marker: str) -> list[int]:
    """Pids (not ours) whose command line mentions `marker`: the cluster's processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if is_alive(pid) and any(marker in arg for arg in cmdline(pid)):
            found.append(pid)
    return sorted(found)


def stop(pids: Iterable[int], timeout: float = 15.0) -> None:
    """SIGTERM each process group, wait, then SIGKILL what is left; reap our own children."""
    pids = [pid for pid in pids if is_alive(pid)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        _reap(pids)
        time.sleep(0.1)
    for pid in pids:
        if is_alive(pid):
            _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while any(is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        _reap(pids)
        time.sleep(0.05)
    _reap(pids)


def _signal(pid: int, sig: signal.Signals) -> None:
    # The group first (the process leads its own session), the pid itself as a fallback.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _reap(pids: Iterable[int]) -> None:
    for pid in pids:
        child = _CHILDREN.get(pid)
        if child is not None and child.poll() is not None:
            _CHILDREN.pop(pid, None)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (binding is the only reliable test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports the kernel says are free now (a later bind can still race; callers check)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(log: Path, lines: int = 40) -> list[str]:
    """The last non-empty lines of a log, for error messages."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
