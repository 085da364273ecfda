"""Condition bookkeeping follows the Kubernetes conventions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from kleave.api.common import Condition
from kleave.operator.conditions import (
    condition_changed,
    format_time,
    get_condition,
    set_condition,
)

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def accepted(conditions: list[dict[str, Any]] | None, status: Any, **kwargs: Any) -> Any:
    args: dict[str, Any] = {
        "reason": "SpecValid",
        "message": "ok",
        "generation": 1,
        "now": T0,
    } | kwargs
    return set_condition(conditions, type="Accepted", status=status, **args)


def test_new_condition_is_appended_with_all_fields() -> None:
    result = accepted([], "True")
    assert result == [
        {
            "type": "Accepted",
            "status": "True",
            "reason": "SpecValid",
            "message": "ok",
            "lastTransitionTime": "2026-11-01T12:00:00Z",
            "observedGeneration": 1,
        }
    ]
    Condition.model_validate(result[0])  # the shape the CRD schema declares


def test_same_status_keeps_transition_time_but_updates_the_rest() -> None:
    first = accepted(None, "False", reason="InvalidSpec", message="bad engine")
    second = accepted(
        first, "False", reason="InvalidSpec", message="bad model", generation=2, now=T1
    )
    assert second[0]["lastTransitionTime"] == "2026-11-01T12:00:00Z"
    assert second[0]["message"] == "bad model"
    assert second[0]["observedGeneration"] == 2


def test_status_change_moves_transition_time() -> None:
    first = accepted(None, "False", reason="InvalidSpec")
    second = accepted(first, "True", now=T1)
    assert second[0]["lastTransitionTime"] == "2026-11-01T12:05:00Z"
    assert second[0]["status"] == "True"


def test_input_is_not_modified_and_a_new_list_is_returned() -> None:
    original = accepted(None, "True")
    snapshot = [dict(c) for c in original]
    updated = accepted(original, "False", reason="InvalidSpec", now=T1)
    assert original == snapshot
    assert updated is not original
    assert updated[0] is not original[0]


def test_order_is_stable_and_other_types_are_kept() -> None:
    ready = set_condition(
        None, type="Ready", status="False", reason="Pending", message="", generation=1, now=T0
    )
    both = accepted(ready, "True")
    assert [c["type"] for c in both] == ["Ready", "Accepted"]
    ready_again = set_condition(
        both, type="Ready", status="True", reason="AllReady", message="", generation=1, now=T1
    )
    assert [c["type"] for c in ready_again] == ["Ready", "Accepted"]
    assert ready_again[1] == both[1]


def test_missing_generation_is_omitted_not_null() -> None:
    result = accepted(None, "True", generation=None)
    assert "observedGeneration" not in result[0]


def test_times_are_rendered_in_utc_whole_seconds() -> None:
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2026, 11, 1, 14, 0, 0, 123456, tzinfo=plus_two)
    assert format_time(moment) == "2026-11-01T12:00:00Z"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"status": "Yes"}, "True, False or Unknown"),
        ({"status": "True", "now": datetime(2026, 1, 1)}, "timezone-aware"),
    ],
)
def test_invalid_input_is_rejected(kwargs: dict[str, Any], error: str) -> None:
    status = kwargs.pop("status")
    with pytest.raises(ValueError, match=error):
        accepted(None, status, **kwargs)


def test_get_condition_returns_a_copy() -> None:
    conditions = accepted(None, "True")
    found = get_condition(conditions, "Accepted")
    assert found == conditions[0]
    assert found is not conditions[0]
    assert get_condition(conditions, "Ready") is None
    assert get_condition(None, "Ready") is None


def test_condition_changed_looks_at_what_people_read() -> None:
    before = accepted(None, "True")[0]
    assert not condition_changed(before, {**before, "lastTransitionTime": "x"})
    assert not condition_changed(before, {**before, "observedGeneration": 7})
    assert condition_changed(before, {**before, "message": "other"})
    assert condition_changed(None, before)
    assert not condition_changed(None, None)
