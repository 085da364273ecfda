"""Pure decisions of pause, resume and idle timeout for AgentSandboxes.

Whether a sandbox should have a pod is not just ``spec.mode``: an idle timeout pauses a
sandbox without touching its spec (the operator never writes a user's spec, so GitOps sees no
drift), and the user asks to resume such a sandbox with a new value of the annotation
``kleave.dev/resume-requested`` (what the SDK's ``resume()`` sets). Status remembers both: when
the idle pause happened (``idlePausedAt``) and which resume request was acted on last
(``resumeRequest``), so the decision is the same after an operator restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from kleave.api.agent_sandbox import AgentSandboxSpec
from kleave.api.sandbox_template import Persistence, SandboxTemplateSpec
from kleave.operator.naming import ANNOTATION_RESUME_REQUESTED

Obj = Mapping[str, Any]

REQUESTED = "Requested"
IDLE = "IdleTimeout"


@dataclass(frozen=True)
class Intent:
    """Whether the sandbox should run now; when not, why it is paused."""

    run: bool
    pause_reason: str | None = None
    resume_request: str | None = None
    """A resume request (annotation value) this reconcile acts on: recorded in status."""


RUN = Intent(run=True)


def intent(spec: AgentSandboxSpec, sandbox: Obj) -> Intent:
    status = sandbox.get("status") or {}
    if spec.mode == "Paused":
        return Intent(run=False, pause_reason=REQUESTED)
    if not status.get("idlePausedAt"):
        return Intent(run=True)
    annotations = sandbox["metadata"].get("annotations") or {}
    request = annotations.get(ANNOTATION_RESUME_REQUESTED)
    if request and request != status.get("resumeRequest"):
        return Intent(run=True, resume_request=str(request)[:64])
    return Intent(run=False, pause_reason=IDLE)


def persistence_of(spec: AgentSandboxSpec, template: SandboxTemplateSpec) -> Persistence:
    """The template's persistence with the sandbox's overrides applied."""
    if spec.persistence is None:
        return template.persistence
    return spec.persistence.apply_to(template.persistence)


def idle_timeout_of(spec: AgentSandboxSpec, template: SandboxTemplateSpec) -> int:
    """Seconds of inactivity before a pause; 0 when it never pauses (no volume to pause to)."""
    if not persistence_of(spec, template).enabled:
        return 0
    lifetime = template.lifetime
    if spec.lifetime is not None:
        lifetime = spec.lifetime.apply_to(lifetime)
    return lifetime.idle_timeout_seconds


def idle_deadline(last_activity: datetime | None, idle_timeout_s: int) -> datetime | None:
    if idle_timeout_s <= 0 or last_activity is None:
        return None
    return last_activity + timedelta(seconds=idle_timeout_s)


def snapshot_status(answer: Mapping[str, Any], taken_at: str) -> dict[str, Any]:
    """``status.snapshot`` from the runtime's answer to ``POST /v1/snapshot``."""
    path = str(answer.get("path") or "")
    return {
        "generation": int(answer["generation"]),
        "name": path.rsplit("/", 1)[-1] or None,
        "sizeBytes": answer.get("sizeBytes"),
        "checksum": answer.get("sha256"),
        "takenAt": taken_at,
    }


def audit_head(value: Any) -> dict[str, Any] | None:
    """An audit head ``{seq, hash}`` from a runtime answer, if it is one."""
    if isinstance(value, Mapping) and isinstance(value.get("seq"), int) and value.get("hash"):
        return {"seq": value["seq"], "hash": str(value["hash"])}
    return None


def later_head(current: Any, seen: Any) -> dict[str, Any] | None:
    """The newer of two audit heads: the anchor only moves forward."""
    old, new = audit_head(current), audit_head(seen)
    if old is None or (new is not None and new["seq"] >= old["seq"]):
        return new or old
    return old
