"""The tool policy of a sandbox template: what the in-sandbox runtime lets an agent do.

One model serves two readers: the operator embeds it in ``SandboxTemplate.spec.tools`` (so the
API server validates it at ``kubectl apply``), and the runtime inside the sandbox reads the same
document from a file and enforces it (``kleave.sandbox.policy``). Every default denies: a
template that says nothing runs no commands and can only touch its own workspace.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from kleave.api.common import Int64, SpecModel

ToolName = Literal["exec", "readFile", "writeFile", "deleteFile", "listFiles", "loadSkill"]
ALL_TOOLS: tuple[ToolName, ...] = (
    "exec",
    "readFile",
    "writeFile",
    "deleteFile",
    "listFiles",
    "loadSkill",
)

BUILTIN_DENIED_PATHS: tuple[str, ...] = (
    "~/.ssh",
    "~/.aws",
    "~/.azure",
    "~/.config/gcloud",
    "~/.kube",
    "~/.docker/config.json",
    "~/.netrc",
    "~/.git-credentials",
    "~/.gnupg",
    "~/.pypirc",
    "/var/run/secrets",
    "/run/secrets",
    "/etc/shadow",
    "/etc/gshadow",
)
"""Credential locations refused whatever a template says: SSH and cloud keys, kubeconfigs,
registry and package-index logins, and the mounted service-account token."""

# A workspace-relative path prefix: "." (the whole workspace) or segments that are neither
# "." nor "..", so a prefix can never climb out of the workspace. RE2-compatible (no
# lookaround), because the API server checks the same pattern.
_SEGMENT = r"(\.?[A-Za-z0-9_@+-][A-Za-z0-9_.@+-]*|\.\.[A-Za-z0-9_.@+-]+)"
WORKSPACE_PREFIX_PATTERN = rf"^(\.|{_SEGMENT}(/{_SEGMENT})*)$"
# An absolute path or one under the home directory ("~/..."); no "." or ".." segments.
DENIED_PATH_PATTERN = rf"^(~|~/{_SEGMENT}(/{_SEGMENT})*|(/{_SEGMENT})+)$"
COMMAND_NAME_PATTERN = r"^[A-Za-z0-9_+][A-Za-z0-9_.+-]*$"

CommandName = Annotated[str, Field(max_length=128, pattern=COMMAND_NAME_PATTERN)]
WorkspacePrefix = Annotated[str, Field(max_length=1024, pattern=WORKSPACE_PREFIX_PATTERN)]
DeniedPath = Annotated[str, Field(max_length=1024, pattern=DENIED_PATH_PATTERN)]


class ToolPolicy(SpecModel):
    """Which runtime tools, commands and paths an agent in the sandbox may use."""

    allowed_tools: list[ToolName] = Field(
        default_factory=lambda: list(ALL_TOOLS),
        max_length=len(ALL_TOOLS),
        description=(
            "Runtime tools the agent may call: exec, readFile, writeFile, deleteFile, "
            "listFiles, loadSkill. File tools only ever reach the workspace, and exec runs "
            "nothing unless allowedCommands or allowAnyCommand says so."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set", "default": list(ALL_TOOLS)},
    )
    allowed_commands: list[CommandName] = Field(
        default_factory=list,
        max_length=256,
        description=(
            "Command names (argv[0], a bare name found on the runtime's PATH, never a path) "
            "that exec may start. Empty: none, unless allowAnyCommand. Shells and launchers "
            "(sh, bash, env, xargs, sudo, ...) are blanket grants and need allowAnyCommand "
            "even when listed. A listed interpreter (python3, node) can run any code it is "
            "given: list one only if that is intended."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    allow_any_command: bool = Field(
        default=False,
        description=(
            "Explicit opt-in to blanket execution: any command, shells (sh -c, bash -c), "
            "launchers and loader variables such as LD_PRELOAD. Also what lets a skill "
            "declaring `allowed-tools: Bash` load. Credential paths stay refused."
        ),
    )
    allowed_paths: list[WorkspacePrefix] = Field(
        default_factory=lambda: ["."],
        min_length=1,
        max_length=64,
        description=(
            "Workspace-relative path prefixes the file tools and exec's working directory may "
            "use; '.' is the whole workspace. Paths are resolved (.., symlinks, ~) before the "
            "check, and nothing outside the workspace is ever reachable."
        ),
        json_schema_extra={"default": ["."]},
    )
    denied_paths: list[DeniedPath] = Field(
        default_factory=lambda: list(BUILTIN_DENIED_PATHS),
        max_length=256,
        description=(
            "Absolute or ~/ paths refused to every tool, in file requests, exec arguments, "
            "exec environment values and skill files. The default list (SSH, cloud and "
            "registry credentials, kubeconfig, service-account token mounts, /etc/shadow) is "
            "always enforced; entries here add to it."
        ),
        json_schema_extra={"default": list(BUILTIN_DENIED_PATHS)},
    )
    max_exec_seconds: int = Field(
        default=300,
        ge=1,
        le=86400,
        description=(
            "Longest a command may run; longer timeoutSeconds requests are refused, and a "
            "command past its timeout is killed with its whole process group."
        ),
    )
    max_output_bytes: Int64 = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description=(
            "Most stdout plus stderr bytes one command may produce; past it the command is "
            "killed and its exit event says outputLimitExceeded."
        ),
    )
    max_file_bytes: Int64 = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        le=16 * 1024 * 1024 * 1024,
        description="Largest file readFile returns or writeFile accepts.",
    )

    @field_validator("allowed_tools", "allowed_commands")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        """Mirror the API server's list-type set rule, so a policy file fails the same way."""
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"duplicate entries: {', '.join(duplicates)}")
        return values

    # The "before" validators below only word the refusal; the Annotated patterns (which the
    # CRD schema carries too) are the rule.
    @field_validator("allowed_commands", mode="before")
    @classmethod
    def _command_names(cls, values: Any) -> Any:
        for value in _strings(values):
            if not re.fullmatch(COMMAND_NAME_PATTERN, value):
                raise ValueError(
                    f"{value!r} is not a command name; give the bare name (e.g. 'python3'), "
                    "which the runtime looks up on its own PATH"
                )
        return values

    @field_validator("allowed_paths", mode="before")
    @classmethod
    def _workspace_prefixes(cls, values: Any) -> Any:
        for value in _strings(values):
            if not re.fullmatch(WORKSPACE_PREFIX_PATTERN, value):
                raise ValueError(
                    f"{value!r} is not a workspace-relative prefix: use '.', or a path like "
                    "'src/app' without a leading '/' and without '.' or '..' segments"
                )
        return values

    @field_validator("denied_paths", mode="before")
    @classmethod
    def _denied_shape(cls, values: Any) -> Any:
        for value in _strings(values):
            if not re.fullmatch(DENIED_PATH_PATTERN, value):
                raise ValueError(
                    f"{value!r} is not an absolute or ~/ path without '.' or '..' segments"
                )
        return values


def _strings(values: Any) -> list[str]:
    """The string items of a raw list value; anything else is left to pydantic's own checks."""
    if not isinstance(values, list):
        return []
    return [v for v in values if isinstance(v, str)]
