"""The runtime's state and actions, independent of HTTP: one ``SandboxRuntime`` per sandbox.

It owns the policy guard, the audit log, the running commands and the state directory, and
does what a call asks once the guard allowed it. ``server`` maps HTTP onto it and records the
outcome of every call in the audit log.

Directory layout: the workspace (the agent's files) and the state directory (``audit.jsonl``,
``registry/skills.json``, ``snapshots/`` unless placed elsewhere) are separate and neither may
contain the other, so the agent's file tools can never reach the audit log or the snapshots.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kleave.api.sandbox_policy import ToolPolicy
from kleave.sandbox.audit import AuditLog
from kleave.sandbox.credentials import is_within
from kleave.sandbox.exec import ExecProcess, ExecSpec
from kleave.sandbox.files import ToolError
from kleave.sandbox.policy import DEFAULT_SEARCH_PATH, PolicyGuard, PolicyRefusal, policy_digest
from kleave.sandbox.skills import SkillReport, loaded_skills, record_skill, vet_skill
from kleave.sandbox.snapshot import (
    RestoreResult,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotInfo,
    list_snapshots,
    restore_snapshot,
    write_snapshot,
)

AUDIT_FILE = "audit.jsonl"
REGISTRY_DIR = "registry"


class RuntimeSetupError(Exception):
    """The runtime cannot start with this configuration."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Where the sandbox's files and state live, its policy, and how calls authenticate."""

    workspace: Path
    state_dir: Path
    policy: ToolPolicy
    token: str | None = None
    token_file: Path | None = None
    token_sha256: str | None = None
    """The hex SHA-256 of the bearer token instead of the token itself: what a sandbox pod
    gets (from its pod annotation), so the pod spec never carries a usable credential."""
    snapshot_dir: Path | None = None
    """Default: ``<state_dir>/snapshots``; put it on the sandbox's persistent volume."""
    home: Path | None = None
    """HOME for commands and ``~`` in paths; default: the workspace."""
    search_path: str | None = None
    """Where bare command names are looked up; default: the runtime's own PATH."""
    keep_snapshots: int = 2
    audit_fsync: bool = True


class SandboxRuntime:
    """The sandbox's runtime state; create it inside the event loop that will serve it."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.workspace = Path(os.path.realpath(config.workspace))
        self.state_dir = Path(os.path.realpath(config.state_dir))
        self.snapshot_dir = Path(
            os.path.realpath(config.snapshot_dir or self.state_dir / "snapshots")
        )
        self._check_layout()
        for directory in (self.workspace, self.state_dir, self.snapshot_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.registry_dir = self.state_dir / REGISTRY_DIR
        self.home = Path(os.path.abspath(config.home)) if config.home else self.workspace
        private = [self.state_dir, self.snapshot_dir]
        if config.token_file is not None:
            private.append(Path(os.path.abspath(config.token_file)))
        self.search_path = config.search_path or os.environ.get("PATH") or DEFAULT_SEARCH_PATH
        self.guard = PolicyGuard(
            config.policy,
            self.workspace,
            home=self.home,
            private_paths=private,
            search_path=self.search_path,
        )
        self.policy_digest = policy_digest(config.policy)
        self.audit = AuditLog(self.state_dir / AUDIT_FILE, fsync=config.audit_fsync)
        self.processes: dict[str, ExecProcess] = {}
        self._state_lock = asyncio.Lock()
        self.last_activity = datetime.now(UTC)
        """The last agent call (start or end); idleTimeoutSeconds counts from it."""
        self.audit.append(
            "runtime.start",
            "ok",
            {
                "workspace": str(self.workspace),
                "policyDigest": self.policy_digest,
                "pid": os.getpid(),
            },
        )

    def _check_layout(self) -> None:
        workspace, state, snapshots = map(str, (self.workspace, self.state_dir, self.snapshot_dir))
        for name, path in (("state directory", state), ("snapshot directory", snapshots)):
            if is_within(path, workspace) or is_within(workspace, path):
                raise RuntimeSetupError(
                    f"the {name} {path} and the workspace {workspace} must not contain each "
                    "other: the agent's file tools would reach the audit log and snapshots"
                )

    # ----- exec -------------------------------------------------------------------------------
    def prepare_exec(self, body: Mapping[str, Any]) -> ExecSpec:
        """Check an exec request against the policy; the spec to run."""
        argv = body.get("argv")
        if not isinstance(argv, list):
            raise PolicyRefusal("bad-request", 'argv must be a list of strings, e.g. ["ls", "-la"]')
        cwd = self.guard.check_path(_string(body.get("cwd", "."), "cwd"))
        if not cwd.is_dir():
            raise ToolError("not-a-directory", f"cwd {cwd} is not a directory", 400)
        executable = self.guard.check_exec(argv, cwd=cwd)
        env = self.guard.check_env(body.get("env") or {})
        timeout = self.guard.check_timeout(body.get("timeoutSeconds"))
        stdin = body.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise PolicyRefusal("bad-request", "stdin must be a string")
        return ExecSpec(
            executable=executable,
            argv=list(argv),
            cwd=cwd,
            env={**self.base_env(cwd), **env},
            timeout=timeout,
            max_output_bytes=self.config.policy.max_output_bytes,
            stdin=stdin.encode() if stdin is not None else None,
        )

    def base_env(self, cwd: Path) -> dict[str, str]:
        """A minimal environment: nothing of the runtime's own (its token) leaks to commands."""
        return {
            "PATH": self.search_path,
            "HOME": str(self.home),
            "PWD": str(cwd),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }

    def touch(self) -> None:
        """Record agent activity now."""
        self.last_activity = datetime.now(UTC)

    def last_activity_iso(self) -> str:
        """The last activity, or now while a command runs (a running command is not idle)."""
        moment = datetime.now(UTC) if self.processes else self.last_activity
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def kill_all(self) -> int:
        """Kill every running command's process group; how many were running."""
        return sum(process.kill() for process in list(self.processes.values()))

    # ----- skills -----------------------------------------------------------------------------
    def load_skill(self, path: Path) -> tuple[SkillReport, dict[str, Any] | None]:
        """Vet a skill directory in the workspace; record it as loaded when it passes."""
        if not path.is_dir():
            raise ToolError("not-a-directory", f"{path} is not a skill directory", 400)
        report = vet_skill(path, self.guard)
        if not report.ok:
            return report, None
        return report, record_skill(self.registry_dir, report, _now())

    def skills(self) -> list[dict[str, Any]]:
        """The loaded skills."""
        return loaded_skills(self.registry_dir)

    # ----- snapshots --------------------------------------------------------------------------
    def _trees(self) -> dict[str, Path]:
        return {"workspace": self.workspace, "registry": self.registry_dir}

    async def snapshot(self) -> SnapshotInfo:
        """Write a snapshot of the workspace, loaded skills and audit log (one at a time)."""
        async with self._state_lock:
            session = {
                "policyDigest": self.policy_digest,
                "workspace": str(self.workspace),
                "runningCommands": len(self.processes),
            }
            try:
                return await asyncio.to_thread(
                    write_snapshot,
                    self.snapshot_dir,
                    self._trees(),
                    audit=self.audit,
                    session=session,
                    keep=self.config.keep_snapshots,
                )
            except SnapshotError as error:
                raise ToolError("snapshot-failed", str(error), 500) from None

    def snapshots(self) -> list[dict[str, Any]]:
        """The kept snapshots, newest first."""
        return [
            {"generation": generation, "path": str(path), "sizeBytes": path.stat().st_size}
            for generation, path in list_snapshots(self.snapshot_dir)
        ]

    async def restore(self, generation: int | None, fallback: bool) -> RestoreResult:
        """Kill running commands, then restore a verified snapshot (see ``restore_snapshot``)."""
        async with self._state_lock:
            self.kill_all()
            self.touch()  # a resumed sandbox's idle time starts again
            try:
                return await asyncio.to_thread(
                    restore_snapshot,
                    self.snapshot_dir,
                    self._trees(),
                    audit=self.audit,
                    generation=generation,
                    fallback=fallback,
                )
            except SnapshotCorrupt as error:
                raise ToolError("snapshot-corrupt", str(error), 409) from None
            except SnapshotError as error:
                raise ToolError("no-snapshot", str(error), 404) from None

    def close(self) -> None:
        """Kill running commands, record the stop, close the audit log."""
        killed = self.kill_all()
        self.audit.append("runtime.stop", "ok", {"killedCommands": killed})
        self.audit.close()


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise PolicyRefusal("bad-request", f"{name} must be a string")
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
