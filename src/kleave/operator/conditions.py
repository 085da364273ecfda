"""Status conditions the Kubernetes way, as pure functions over plain dicts.

Conditions are stored in ``status.conditions`` as ``metav1.Condition``-shaped dicts. The rules
followed (from the Kubernetes API conventions):

* one entry per ``type``; an update replaces that entry in place, so the list order is stable
  and new types are appended (tools that diff status do not see churn);
* ``lastTransitionTime`` changes only when ``status`` changes; a new reason or message on the
  same status keeps the old time, so ``kubectl`` shows how long a state has really held;
* ``observedGeneration`` records the spec generation the condition was computed from.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]
_STATUSES: frozenset[str] = frozenset({"True", "False", "Unknown"})


def format_time(moment: datetime) -> str:
    """Render a time as ``metav1.Time`` does: RFC 3339 in UTC, whole seconds, ``Z`` suffix."""
    if moment.tzinfo is None:
        raise ValueError("condition times must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(
    conditions: Sequence[Mapping[str, Any]] | None, type_: str
) -> dict[str, Any] | None:
    """Return a copy of the condition of ``type_``, or None when it is absent."""
    for condition in conditions or ():
        if condition.get("type") == type_:
            return dict(condition)
    return None


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    *,
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Return a new condition list with ``type`` set; the input is never modified.

    ``now`` is only used when the status of the condition changes (or it is new).
    ``generation`` may be None for objects without ``metadata.generation``; the field is then
    omitted rather than written as null, which the CRD schema would reject.
    """
    if status not in _STATUSES:
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    if not type:
        raise ValueError("condition type must not be empty")

    result: list[dict[str, Any]] = [copy.deepcopy(dict(c)) for c in conditions or ()]
    previous = next((c for c in result if c.get("type") == type), None)

    transition_time = format_time(now)
    if previous is not None and previous.get("status") == status:
        transition_time = previous.get("lastTransitionTime") or transition_time

    updated: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition_time,
    }
    if generation is not None:
        updated["observedGeneration"] = generation

    if previous is None:
        result.append(updated)
    else:
        result[result.index(previous)] = updated
    return result


def condition_changed(
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
) -> bool:
    """Tell whether a condition differs in what a human reads: status, reason or message."""
    if before is None or after is None:
        return before is not after
    return any(before.get(key) != after.get(key) for key in ("status", "reason", "message"))
