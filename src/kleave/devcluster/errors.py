"""Errors the dev cluster raises; each message is one line that says what to do."""

from __future__ import annotations


class DevClusterError(RuntimeError):
    """Base class: the CLI prints the message alone (no traceback) and exits non-zero."""


class ToolchainMissingError(DevClusterError):
    """The Go toolchain is absent or too old to build the control plane."""


class BuildError(DevClusterError):
    """A build step failed; names the step and its log."""

    def __init__(self, step: str, log: str, detail: str) -> None:
        self.step = step
        self.log = log
        super().__init__(f"dev-cluster build step '{step}' failed: {detail} (full log: {log})")


class PortInUseError(DevClusterError):
    """A port the cluster needs is taken by another process."""


class StaleStateError(DevClusterError):
    """A state directory from a cluster that is no longer (fully) running."""


class StartupError(DevClusterError):
    """A component exited or never became healthy while the cluster started."""
