"""Enforcement of a template's ``ToolPolicy``: every runtime call passes through a ``PolicyGuard``.

A refusal is a ``PolicyRefusal`` with a stable code (for the audit log and for clients) and a
message that names what was refused, why, and what would allow it. The guard decides; it runs
nothing and touches no file, so the HTTP layer and the tests exercise one set of rules.

What the command rules can and cannot do: ``allowedCommands`` bounds what exec starts directly.
Programs that run other programs (interpreters, ``make``, ``find -exec``) extend that set, so
shells and launchers are treated as the blanket grants they are, and the microVM, not this
list, is the isolation boundary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError

from kleave.api.sandbox_policy import BUILTIN_DENIED_PATHS, ToolName, ToolPolicy
from kleave.sandbox.credentials import CredentialMatcher, is_within, normalize

SHELLS = frozenset(
    {"sh", "bash", "rbash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "pwsh"}
)
"""Command interpreters: starting one runs whatever command line it is handed."""

LAUNCHERS = frozenset(
    {
        "busybox", "env", "xargs", "nohup", "timeout", "nice", "ionice", "setsid", "stdbuf",
        "sudo", "doas", "su", "runuser", "chroot", "unshare", "nsenter", "script", "watch",
        "flock", "taskset", "time", "strace", "ltrace", "chrt", "parallel", "systemd-run",
        "setpriv", "capsh", "prlimit", "exec", "eval", "command",
    }
)  # fmt: skip
"""Programs whose purpose is to start another program named in their arguments."""

_INJECTION_ENV = frozenset(
    {
        "BASH_ENV", "ENV", "PROMPT_COMMAND", "SHELLOPTS", "PS4", "GCONV_PATH", "PATH",
        "EDITOR", "VISUAL", "PAGER", "GIT_PAGER", "GIT_EDITOR", "GIT_SSH", "GIT_SSH_COMMAND",
        "GIT_EXTERNAL_DIFF", "GIT_ASKPASS", "SSH_ASKPASS", "GIT_EXEC_PATH", "GIT_PROXY_COMMAND",
    }
)  # fmt: skip
_INJECTION_ENV_PREFIXES = ("LD_", "DYLD_", "BASH_FUNC_", "GIT_CONFIG")
"""Environment variables that make an allowed program load or run another one."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHELL_SYNTAX = re.compile(r"[\s|&;<>()$`]")

DEFAULT_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

NOT_FOUND_CODES = frozenset({"command-not-found", "not-found"})
REQUEST_ERROR_CODES = frozenset({"bad-request", "bad-path"})


class PolicyRefusal(Exception):  # noqa: N818 - a refusal is an outcome, not a fault
    """A call the policy does not allow (or cannot judge), with a stable reason code."""

    def __init__(self, code: str, message: str, extra: Mapping[str, object] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.extra = dict(extra or {})
        """More response fields for the client (a skill's full vetting report)."""

    def to_dict(self) -> dict[str, str]:
        """The refusal as it appears in API errors and audit entries."""
        return {"code": self.code, "message": self.message}


class PolicyFileError(Exception):
    """A policy file that cannot be read or does not validate."""


def load_policy(path: Path) -> ToolPolicy:
    """Read a ``ToolPolicy`` from a YAML or JSON file (camelCase keys, as in the template)."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise PolicyFileError(f"cannot read the tool policy {path}: {error}") from None
    if document is None:
        document = {}
    try:
        return ToolPolicy.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()
        )
        raise PolicyFileError(f"invalid tool policy {path}: {problems}") from None


def policy_digest(policy: ToolPolicy) -> str:
    """SHA-256 of the policy's canonical JSON: snapshots record which policy they ran under."""
    canonical = json.dumps(policy.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class PolicyGuard:
    """The policy bound to one sandbox: its workspace, home, and runtime-private paths.

    ``private_paths`` (the state directory with the audit log, the snapshots, the token file)
    are refused like credentials, so the agent cannot reach them through the runtime's tools.
    """

    def __init__(
        self,
        policy: ToolPolicy,
        workspace: Path,
        *,
        home: Path | None = None,
        private_paths: Sequence[Path] = (),
        search_path: str | None = None,
    ) -> None:
        self.policy = policy
        self.workspace = Path(os.path.realpath(workspace))
        self.home = Path(os.path.abspath(home)) if home is not None else self.workspace
        self.credentials = CredentialMatcher(
            [*BUILTIN_DENIED_PATHS, *policy.denied_paths],
            homes=[self.home, Path.home()],
            extra=private_paths,
        )
        self.search_path = search_path if search_path is not None else DEFAULT_SEARCH_PATH

    # ----- tools ------------------------------------------------------------------------------
    def check_tool(self, tool: ToolName) -> None:
        """Refuse a tool the template's ``allowedTools`` leaves out."""
        if tool not in self.policy.allowed_tools:
            allowed = ", ".join(self.policy.allowed_tools) or "none"
            raise PolicyRefusal(
                "tool-not-allowed",
                f"the {tool} tool is not enabled in this sandbox (allowedTools: {allowed}); "
                f"add {tool} to the template's tools.allowedTools",
            )

    # ----- paths ------------------------------------------------------------------------------
    def check_path(
        self,
        path: str,
        *,
        write: bool = False,
        base: Path | None = None,
        follow_final_symlink: bool = True,
    ) -> Path:
        """The resolved absolute path a request may use, or a refusal saying why not.

        ``~`` is the sandbox home; relative paths start at ``base`` (default: the workspace).
        ``..`` and symlinks are resolved before the workspace and allow-list checks, so a link
        planted in the workspace cannot lead outside it. With ``follow_final_symlink=False``
        (deleting a link) only the parent is resolved.
        """
        verb = "writing" if write else "reading"
        if not isinstance(path, str) or not path or "\x00" in path:
            raise PolicyRefusal("bad-path", f"expected a non-empty path string, got {path!r}")
        expanded = self._expand_home(path)
        lexical = normalize(os.path.join(base or self.workspace, expanded))
        self._refuse_credentials(path, lexical, verb)
        if follow_final_symlink:
            resolved = os.path.realpath(lexical)
        else:
            resolved = os.path.join(os.path.realpath(os.path.dirname(lexical)), Path(lexical).name)
        self._refuse_credentials(path, resolved, verb)
        workspace = str(self.workspace)
        if not is_within(resolved, workspace):
            via = " through a symlink" if is_within(lexical, workspace) else ""
            raise PolicyRefusal(
                "path-outside-workspace",
                f"{verb} {path!r} refused: it resolves{via} to {resolved}, outside the "
                f"workspace {workspace}",
            )
        roots = [os.path.realpath(self.workspace / prefix) for prefix in self.policy.allowed_paths]
        if not any(is_within(resolved, root) and is_within(root, workspace) for root in roots):
            raise PolicyRefusal(
                "path-not-allowed",
                f"{verb} {path!r} refused: {resolved} is not under the allowed workspace "
                f"paths {self.policy.allowed_paths}; extend the template's tools.allowedPaths",
            )
        return Path(resolved)

    def _expand_home(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            return str(self.home) + path[1:]
        if path.startswith("~"):
            raise PolicyRefusal(
                "bad-path", f"{path!r} names another user's home directory; use a workspace path"
            )
        return path

    def _refuse_credentials(self, requested: str, absolute: str, verb: str) -> None:
        match = self.credentials.path_match(absolute)
        if match is not None:
            raise PolicyRefusal(
                "credential-path",
                f"{verb} {requested!r} refused: it is under {match}, a credential or "
                "runtime-private location that is always denied",
            )

    # ----- exec -------------------------------------------------------------------------------
    def check_exec(self, argv: Sequence[str], *, cwd: Path) -> str:
        """The executable to start for ``argv`` run in ``cwd`` (already path-checked).

        argv[0] must be a bare name from ``allowedCommands``, found on the runtime's own
        search path (never in the workspace); shells and launchers need ``allowAnyCommand``.
        Every argument is scanned for credential paths, with or without the opt-in.
        """
        self.check_tool("exec")
        if (
            not isinstance(argv, list | tuple)
            or not argv
            or not all(isinstance(a, str) and "\x00" not in a for a in argv)
        ):
            raise PolicyRefusal(
                "bad-request", 'argv must be a non-empty list of strings, e.g. ["ls", "-la"]'
            )
        name = argv[0]
        if not name or _SHELL_SYNTAX.search(name):
            raise PolicyRefusal(
                "shell-string",
                f"argv[0] {name!r} looks like a shell command line; send argv as a list "
                '(["ls", "-la"]); a shell line needs ["sh", "-c", "..."] and the template\'s '
                "tools.allowAnyCommand: true",
            )
        for index, argument in enumerate(argv):
            match = self.credentials.text_match(argument, cwd=str(cwd))
            if match is not None:
                raise PolicyRefusal(
                    "credential-path",
                    f"argument {index} ({_clip(argument)}) refers to {match}, a credential or "
                    "runtime-private location that is always denied",
                )
        if self.policy.allow_any_command:
            return self._resolve(name, cwd, include_workspace=True)
        command = os.path.basename(name)
        if "/" in name:
            raise PolicyRefusal(
                "command-path",
                f"argv[0] must be a bare command name from allowedCommands, not the path "
                f"{name!r}: a path could start a workspace file that borrows an allowed name",
            )
        if command in SHELLS or command in LAUNCHERS:
            kind = "a shell" if command in SHELLS else "a launcher of other commands"
            raise PolicyRefusal(
                "blanket-shell",
                f"{command} is {kind}, so allowing it grants arbitrary execution; that needs "
                "the template's explicit tools.allowAnyCommand: true (listing it in "
                "allowedCommands is not enough)",
            )
        if command not in self.policy.allowed_commands:
            allowed = ", ".join(self.policy.allowed_commands) or "none"
            raise PolicyRefusal(
                "command-not-allowed",
                f"{command!r} is not an allowed command (allowedCommands: {allowed}); add it "
                "to the template's tools.allowedCommands",
            )
        return self._resolve(name, cwd, include_workspace=False)

    def _resolve(self, name: str, cwd: Path, *, include_workspace: bool) -> str:
        if "/" in name:
            candidate = os.path.join(cwd, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
            raise PolicyRefusal("command-not-found", f"{name!r} is not an executable file")
        entries = [
            entry
            for entry in self.search_path.split(os.pathsep)
            if entry
            and (include_workspace or not is_within(os.path.realpath(entry), str(self.workspace)))
        ]
        found = shutil.which(name, path=os.pathsep.join(entries))
        if found is None:
            raise PolicyRefusal(
                "command-not-found",
                f"{name!r} is allowed but not installed in the sandbox image (searched "
                f"{os.pathsep.join(entries)})",
            )
        return found

    def check_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The request's extra environment, if every name and value passes."""
        if not isinstance(env, Mapping):
            raise PolicyRefusal("bad-request", "env must be an object of string values")
        checked: dict[str, str] = {}
        for name, value in env.items():
            if not isinstance(name, str) or not _ENV_NAME.match(name):
                raise PolicyRefusal("bad-request", f"{name!r} is not an environment name")
            if not isinstance(value, str) or "\x00" in value:
                raise PolicyRefusal("bad-request", f"env {name} must be a string without NUL")
            if not self.policy.allow_any_command and (
                name in _INJECTION_ENV or name.startswith(_INJECTION_ENV_PREFIXES)
            ):
                raise PolicyRefusal(
                    "env-not-allowed",
                    f"setting {name} makes allowed programs load or run other code; it needs "
                    "the template's tools.allowAnyCommand: true",
                )
            match = self.credentials.text_match(value)
            if match is not None:
                raise PolicyRefusal(
                    "credential-path",
                    f"env {name} refers to {match}, a credential or runtime-private location "
                    "that is always denied",
                )
            checked[name] = value
        return checked

    def check_timeout(self, requested: float | None) -> float:
        """The timeout for one command: the request's, within ``maxExecSeconds``."""
        limit = float(self.policy.max_exec_seconds)
        if requested is None:
            return limit
        if isinstance(requested, bool) or not isinstance(requested, int | float):
            raise PolicyRefusal("bad-request", "timeoutSeconds must be a number")
        if not 0 < requested <= limit:
            raise PolicyRefusal(
                "timeout-too-long",
                f"timeoutSeconds {requested} is outside (0, {limit:g}]; the template's "
                "tools.maxExecSeconds bounds it",
            )
        return float(requested)


def _clip(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
