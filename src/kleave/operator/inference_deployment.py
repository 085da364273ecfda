"""InferenceDeployment handlers: validate the spec and report it in status and events.

The decision (spec + current status -> new status and the event to post) is the pure function
:func:`decide`; the kopf handler only feeds it and applies its result, so the logic is tested
without a cluster. The handler is level-triggered and idempotent: it derives everything from
the current spec and status, writes only the status fields that differ, and posts an event
only when the Accepted condition changes, so a second run (a resume after restart, a replayed
event) changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import kopf
from pydantic import ValidationError

from kleave.api.inference_deployment import KIND, InferenceDeploymentSpec
from kleave.operator.conditions import condition_changed, get_condition, set_condition
from kleave.operator.metrics import instrumented

ACCEPTED = "Accepted"
REASON_SPEC_VALID = "SpecValid"
REASON_INVALID_SPEC = "InvalidSpec"
HANDLER_ID = "reconcile"
# Event messages longer than about 1 KiB are truncated by the API server; keep whole words.
_MAX_MESSAGE = 1000


@dataclass(frozen=True)
class EventToPost:
    """A Kubernetes event the handler should post about the object."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What one reconcile concluded.

    ``status`` holds every status field this reconciler owns, as it should be; ``status_patch``
    only those that differ from the current status (empty when nothing changed).
    """

    accepted: bool
    message: str
    status: dict[str, Any]
    status_patch: dict[str, Any] = field(default_factory=dict)
    event: EventToPost | None = None


def field_path(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as the manifest path a user would edit."""
    path = "spec"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each offending field: ``spec.engine: Input should be ...``."""
    problems = [
        f"{field_path(tuple(item['loc']))}: {item['msg']}"
        for item in error.errors(include_url=False)
    ]
    return _truncate("; ".join(problems) or "the spec is invalid")


def _truncate(message: str) -> str:
    if len(message) <= _MAX_MESSAGE:
        return message
    return message[: _MAX_MESSAGE - 1].rsplit(" ", 1)[0] + "…"


def summarize(spec: InferenceDeploymentSpec) -> str:
    return f"model {spec.model}, engine {spec.engine}, topology {spec.topology}"


def decide(
    spec: Mapping[str, Any],
    *,
    generation: int | None,
    status: Mapping[str, Any],
    now: datetime,
) -> Decision:
    """Compute the status (and event) that ``spec`` warrants, given the current ``status``."""
    try:
        parsed = InferenceDeploymentSpec.model_validate(dict(spec))
    except ValidationError as error:
        accepted, reason, message = False, REASON_INVALID_SPEC, describe_validation_error(error)
    else:
        accepted, reason, message = True, REASON_SPEC_VALID, summarize(parsed)

    current_conditions = status.get("conditions")
    if not isinstance(current_conditions, list):
        current_conditions = []
    conditions = set_condition(
        current_conditions,
        type=ACCEPTED,
        status="True" if accepted else "False",
        reason=reason,
        message=message,
        generation=generation,
        now=now,
    )

    desired: dict[str, Any] = {"conditions": conditions}
    if generation is not None:
        desired["observedGeneration"] = generation
    status_patch = {key: value for key, value in desired.items() if status.get(key) != value}

    event = None
    if condition_changed(
        get_condition(current_conditions, ACCEPTED), get_condition(conditions, ACCEPTED)
    ):
        event = EventToPost(
            type="Normal" if accepted else "Warning", reason=reason, message=message
        )

    return Decision(
        accepted=accepted,
        message=message,
        status=desired,
        status_patch=status_patch,
        event=event,
    )


@instrumented(KIND.kind)
async def reconcile(
    *,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    """Apply :func:`decide`; an invalid spec is a permanent failure, retried only on change.

    Returns None so that kopf stores no handler result in status.
    """
    generation = meta.get("generation")
    decision = decide(
        spec,
        generation=generation if isinstance(generation, int) else None,
        status=status,
        now=datetime.now(UTC),
    )
    for key, value in decision.status_patch.items():
        patch.status[key] = value
    if decision.event is not None:
        post = kopf.info if decision.event.type == "Normal" else kopf.warn
        post(body, reason=decision.event.reason, message=decision.event.message)
    if not decision.accepted:
        # kopf still applies the status patch above; it only stops retrying this spec.
        raise kopf.PermanentError(f"{REASON_INVALID_SPEC}: {decision.message}")


def register_handlers(registry: kopf.OperatorRegistry) -> None:
    """Register the reconcile for create, spec updates and resume (operator restart)."""
    group, version, plural = KIND.group, KIND.version, KIND.plural
    on = kopf.on
    on.create(group=group, version=version, plural=plural, id=HANDLER_ID, registry=registry)(
        reconcile
    )
    # Only spec changes: status writes (ours) and metadata edits need no reconcile.
    on.update(
        group=group, version=version, plural=plural, field="spec", id=HANDLER_ID, registry=registry
    )(reconcile)
    on.resume(group=group, version=version, plural=plural, id=HANDLER_ID, registry=registry)(
        reconcile
    )
