"""`kleave sandbox runtime`: serve the in-sandbox runtime API until SIGTERM/SIGINT.

Registered by the top-level CLI under its `sandbox` group. In a sandbox pod it is the
container's process; in tests it runs as a local process (kwok pods execute nothing).
Heavy imports (aiohttp) happen only when the command runs, to keep `kleave --help` fast.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from kleave.sandbox.runtime import RuntimeConfig

TOKEN_ENV = "KLEAVE_SANDBOX_TOKEN"


@click.command("runtime")
@click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The agent's working directory (created if missing).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Runtime state: audit.jsonl, loaded-skill registry, snapshots. Outside the workspace.",
)
@click.option(
    "--snapshot-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where snapshots go (the persistent volume) [default: STATE_DIR/snapshots].",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Tool policy YAML/JSON (a SandboxTemplate's spec.tools) [default: deny-by-default].",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: free port."
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the bound port here once serving (useful with --port 0).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help=f"Bearer token required on every route but /healthz [default: ${TOKEN_ENV}; none].",
)
@click.option(
    "--token-sha256-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="A file holding the hex SHA-256 of the bearer token (what a sandbox pod is given).",
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="HOME for commands and ~ in paths [default: the workspace].",
)
def sandbox_runtime_command(
    *,
    workspace: Path,
    state_dir: Path,
    snapshot_dir: Path | None,
    policy_file: Path | None,
    host: str,
    port: int,
    port_file: Path | None,
    token_file: Path | None,
    token_sha256_file: Path | None,
    home: Path | None,
) -> None:
    """Serve the sandbox runtime: exec, files, skills, audit log, snapshots."""
    from kleave.api.sandbox_policy import ToolPolicy
    from kleave.sandbox.audit import AuditLogCorrupt
    from kleave.sandbox.policy import PolicyFileError, load_policy
    from kleave.sandbox.runtime import RuntimeConfig, RuntimeSetupError

    try:
        policy = load_policy(policy_file) if policy_file else ToolPolicy()
        token = _read_token(token_file)
        digest = _read_digest(token_sha256_file) if token_sha256_file else None
        config = RuntimeConfig(
            workspace=workspace,
            state_dir=state_dir,
            policy=policy,
            token=token,
            token_file=token_file,
            token_sha256=digest,
            snapshot_dir=snapshot_dir,
            home=home,
        )
        asyncio.run(_serve(config, host, port, port_file))
    except (PolicyFileError, RuntimeSetupError, AuditLogCorrupt, OSError) as error:
        raise click.ClickException(str(error)) from None


def _read_token(token_file: Path | None) -> str | None:
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    token = token_file.read_text(encoding="utf-8").strip()
    if not token:
        raise click.ClickException(f"the token file {token_file} is empty")
    return token


def _read_digest(path: Path) -> str:
    digest = path.read_text(encoding="utf-8").strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise click.ClickException(
            f"{path} must hold the 64 hex digits of the token's SHA-256, not {digest[:16]!r}..."
        )
    return digest


async def _serve(config: RuntimeConfig, host: str, port: int, port_file: Path | None) -> None:
    from kleave.sandbox.runtime import SandboxRuntime
    from kleave.sandbox.server import start_server

    runtime = SandboxRuntime(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        runner, bound = await start_server(runtime, host, port)
    except BaseException:
        runtime.close()
        raise
    try:
        if port_file is not None:
            temporary = port_file.with_name(port_file.name + ".tmp")
            temporary.write_text(f"{bound}\n")
            os.replace(temporary, port_file)
        click.echo(
            f"kleave sandbox runtime: serving http://{host}:{bound} "
            f"(workspace {runtime.workspace}, state {runtime.state_dir})",
        )
        await stop.wait()
    finally:
        runtime.kill_all()  # streaming calls end, and are audited, before the log closes
        await runner.cleanup()
        runtime.close()
