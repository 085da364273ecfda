"""The tool policy: its API model (CRD-expressible, deny by default) and its enforcement."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kleave.api.crd import structural_schema
from kleave.api.sandbox_policy import BUILTIN_DENIED_PATHS, ToolPolicy
from kleave.sandbox.policy import (
    PolicyFileError,
    PolicyGuard,
    PolicyRefusal,
    load_policy,
    policy_digest,
)

FORBIDDEN_SCHEMA_KEYS = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not"}


def _keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for value in node.values() for k in _keys(value)}
    if isinstance(node, list):
        return {k for item in node for k in _keys(item)}
    return set()


def _guard(tmp_path: Path, **policy: object) -> PolicyGuard:
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    return PolicyGuard(
        ToolPolicy.model_validate(policy),
        workspace,
        home=workspace,
        private_paths=[tmp_path / "state"],
    )


def _refusal(call: object, *args: object, **kwargs: object) -> PolicyRefusal:
    assert callable(call)
    with pytest.raises(PolicyRefusal) as refused:
        call(*args, **kwargs)
    return refused.value


# ----- the model ------------------------------------------------------------------------------
def test_the_policy_is_a_structural_crd_schema_with_descriptions() -> None:
    schema = structural_schema(ToolPolicy)
    assert not _keys(schema) & FORBIDDEN_SCHEMA_KEYS
    for name, field in schema["properties"].items():
        assert field.get("description"), name
    assert schema["properties"]["deniedPaths"]["default"] == list(BUILTIN_DENIED_PATHS)
    assert schema["properties"]["allowAnyCommand"]["default"] is False


def test_defaults_deny_commands_and_keep_to_the_workspace() -> None:
    policy = ToolPolicy()
    assert policy.allowed_commands == [] and policy.allow_any_command is False
    assert policy.allowed_paths == ["."]
    assert set(BUILTIN_DENIED_PATHS) <= set(policy.denied_paths)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"allowedCommands": ["/usr/bin/python3"]}, "bare name"),
        ({"allowedPaths": ["../etc"]}, "workspace-relative"),
        ({"allowedPaths": ["/etc"]}, "workspace-relative"),
        ({"deniedPaths": ["relative/path"]}, "absolute or ~/"),
        ({"allowedTools": ["exec", "exec"]}, "duplicate"),
        ({"allowedTools": ["shell"]}, "allowedTools"),
        ({"maxExecSeconds": 0}, "maxExecSeconds"),
        ({"allowAnyComand": True}, "allowAnyComand"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(
    document: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ToolPolicy.model_validate(document)


def test_a_policy_file_round_trips_and_its_digest_tracks_content(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("allowedCommands: [ls, python3]\nmaxExecSeconds: 30\n")
    policy = load_policy(path)
    assert policy.allowed_commands == ["ls", "python3"] and policy.max_exec_seconds == 30
    assert policy_digest(policy) == policy_digest(load_policy(path))
    assert policy_digest(policy) != policy_digest(ToolPolicy())
    path.write_text("allowedCommands: [/bin/sh]\n")
    with pytest.raises(PolicyFileError, match="allowedCommands"):
        load_policy(path)


# ----- paths ----------------------------------------------------------------------------------
def test_workspace_paths_resolve_and_escapes_are_refused(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    workspace = guard.workspace
    (workspace / "src").mkdir()
    assert guard.check_path("src/a.py") == workspace / "src" / "a.py"
    assert guard.check_path(str(workspace / "src")) == workspace / "src"
    assert guard.check_path("~/src") == workspace / "src"
    refusal = _refusal(guard.check_path, "../outside.txt")
    assert refusal.code == "path-outside-workspace"
    assert "outside the workspace" in refusal.message
    assert _refusal(guard.check_path, "/etc/hostname").code == "path-outside-workspace"
    assert _refusal(guard.check_path, "src/../../x").code == "path-outside-workspace"
    assert _refusal(guard.check_path, "~root/x").code == "bad-path"
    assert _refusal(guard.check_path, "a\x00b").code == "bad-path"


def test_a_symlink_planted_in_the_workspace_cannot_lead_out(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (guard.workspace / "escape").symlink_to(outside)
    refusal = _refusal(guard.check_path, "escape/secret.txt")
    assert refusal.code == "path-outside-workspace"
    assert "through a symlink" in refusal.message
    # Deleting the link itself is fine: only its parent is resolved.
    assert guard.check_path("escape", write=True, follow_final_symlink=False) == (
        guard.workspace / "escape"
    )


@pytest.mark.parametrize(
    "path",
    [
        "~/.ssh/id_rsa",
        "~/.aws/credentials",
        "~/.kube/config",
        "~/.docker/config.json",
        ".ssh/authorized_keys",
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "/run/secrets/kubernetes.io/serviceaccount/token",
        "/etc/shadow",
    ],
)
def test_credential_paths_are_refused_even_inside_the_workspace(tmp_path: Path, path: str) -> None:
    refusal = _refusal(_guard(tmp_path).check_path, path)
    assert refusal.code == "credential-path"
    assert "always denied" in refusal.message


def test_runtime_private_paths_are_refused(tmp_path: Path) -> None:
    refusal = _refusal(_guard(tmp_path).check_path, str(tmp_path / "state" / "audit.jsonl"))
    assert refusal.code == "credential-path"


def test_allowed_paths_narrow_the_workspace(tmp_path: Path) -> None:
    guard = _guard(tmp_path, allowedPaths=["src"])
    (guard.workspace / "src").mkdir()
    guard.check_path("src/main.py", write=True)
    refusal = _refusal(guard.check_path, "notes.txt", write=True)
    assert refusal.code == "path-not-allowed" and "allowedPaths" in refusal.message


# ----- exec -----------------------------------------------------------------------------------
def test_exec_is_denied_by_default(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    refusal = _refusal(guard.check_exec, ["ls"], cwd=guard.workspace)
    assert refusal.code == "command-not-allowed"
    assert "allowedCommands: none" in refusal.message


def test_allowed_commands_resolve_on_the_runtime_path_only(tmp_path: Path) -> None:
    guard = _guard(tmp_path, allowedCommands=["ls", "true"])
    assert guard.check_exec(["ls", "-la"], cwd=guard.workspace).endswith("/ls")
    # A workspace file borrowing an allowed name is never what runs.
    fake = guard.workspace / "ls"
    fake.write_text("#!/bin/sh\necho pwned\n")
    fake.chmod(0o755)
    assert _refusal(guard.check_exec, ["./ls"], cwd=guard.workspace).code == "command-path"
    poisoned = PolicyGuard(
        guard.policy, guard.workspace, search_path=f"{guard.workspace}:/usr/bin:/bin"
    )
    assert not poisoned.check_exec(["ls"], cwd=guard.workspace).startswith(str(guard.workspace))


@pytest.mark.parametrize("argv", [["sh", "-c", "id"], ["bash", "-c", "id"], ["bash", "x.sh"]])
def test_blanket_shells_need_the_explicit_opt_in(tmp_path: Path, argv: list[str]) -> None:
    listed = _guard(tmp_path, allowedCommands=["sh", "bash"])
    refusal = _refusal(listed.check_exec, argv, cwd=listed.workspace)
    assert refusal.code == "blanket-shell" and "allowAnyCommand" in refusal.message
    opted_in = _guard(tmp_path, allowAnyCommand=True)
    assert opted_in.check_exec(argv, cwd=opted_in.workspace).endswith(argv[0])


@pytest.mark.parametrize("argv", [["env", "sh"], ["xargs", "rm"], ["sudo", "id"], ["nohup", "x"]])
def test_launchers_are_blanket_grants_too(tmp_path: Path, argv: list[str]) -> None:
    guard = _guard(tmp_path, allowedCommands=[argv[0]])
    assert _refusal(guard.check_exec, argv, cwd=guard.workspace).code == "blanket-shell"


def test_a_shell_string_is_refused_with_how_to_send_argv(tmp_path: Path) -> None:
    guard = _guard(tmp_path, allowAnyCommand=True)
    refusal = _refusal(guard.check_exec, ["ls -la | wc -l"], cwd=guard.workspace)
    assert refusal.code == "shell-string" and '["ls", "-la"]' in refusal.message


@pytest.mark.parametrize(
    "argv",
    [
        ["cat", "~/.ssh/id_rsa"],
        ["cat", "/root/.aws/credentials"],
        ["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"],
        ["cat", "../../../../../../etc/shadow"],
        ["cp", "-r", "$HOME/.kube", "x"],
        ["tar", "--file=/run/secrets/token"],
    ],
)
def test_credential_paths_in_arguments_are_refused_even_with_the_opt_in(
    tmp_path: Path, argv: list[str]
) -> None:
    for guard in (
        _guard(tmp_path, allowedCommands=[argv[0]]),
        _guard(tmp_path, allowAnyCommand=True),
    ):
        refusal = _refusal(guard.check_exec, argv, cwd=guard.workspace)
        assert refusal.code == "credential-path", argv


def test_env_that_injects_code_needs_the_opt_in(tmp_path: Path) -> None:
    guard = _guard(tmp_path, allowedCommands=["git"])
    assert guard.check_env({"GREETING": "hi"}) == {"GREETING": "hi"}
    for name in ("LD_PRELOAD", "GIT_SSH_COMMAND", "BASH_ENV", "PATH"):
        assert _refusal(guard.check_env, {name: "x"}).code == "env-not-allowed"
    assert _refusal(guard.check_env, {"KEY": "~/.ssh/id_rsa"}).code == "credential-path"
    assert _refusal(guard.check_env, {"1BAD": "x"}).code == "bad-request"
    assert _guard(tmp_path, allowAnyCommand=True).check_env({"LD_PRELOAD": "x"})


def test_timeouts_stay_within_the_policy(tmp_path: Path) -> None:
    guard = _guard(tmp_path, maxExecSeconds=10)
    assert guard.check_timeout(None) == 10 and guard.check_timeout(2.5) == 2.5
    assert _refusal(guard.check_timeout, 11).code == "timeout-too-long"
    assert _refusal(guard.check_timeout, 0).code == "timeout-too-long"


def test_tools_left_out_are_refused(tmp_path: Path) -> None:
    guard = _guard(tmp_path, allowedTools=["readFile"], allowAnyCommand=True)
    refusal = _refusal(guard.check_exec, ["true"], cwd=guard.workspace)
    assert refusal.code == "tool-not-allowed" and "allowedTools" in refusal.message
    guard.check_tool("readFile")
