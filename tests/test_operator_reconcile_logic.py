"""InferenceDeployment: the spec -> status decision, and the thin kopf handler around it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import kopf
import pytest

from kleave.api.inference_deployment import InferenceDeploymentStatus
from kleave.operator import inference_deployment as infd
from kleave.operator.metrics import REGISTRY

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
VALID = {"model": "Qwen/Qwen3-0.6B", "engine": "vllm", "topology": "PD"}


def decide(spec: dict[str, Any], status: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"generation": 1, "now": T0} | kwargs
    return infd.decide(spec, status=status or {}, **args)


def accepted_condition(status: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in status["conditions"] if c["type"] == "Accepted"]
    assert len(found) == 1
    return found[0]


def test_valid_spec_is_accepted_with_a_summary() -> None:
    decision = decide(VALID)
    assert decision.accepted
    condition = accepted_condition(decision.status)
    assert condition["status"] == "True"
    assert condition["reason"] == "SpecValid"
    assert condition["message"] == "model Qwen/Qwen3-0.6B, engine vllm, topology PD"
    assert condition["observedGeneration"] == 1
    assert decision.status["observedGeneration"] == 1
    assert decision.status_patch == decision.status
    assert decision.event == infd.EventToPost("Normal", "SpecValid", condition["message"])
    InferenceDeploymentStatus.model_validate(decision.status)


def test_defaults_from_the_model_show_in_the_summary() -> None:
    decision = decide({"model": "m"})
    assert decision.message == "model m, engine builtin, topology PD"


def test_second_run_changes_nothing() -> None:
    first = decide(VALID)
    second = decide(VALID, first.status, now=T1)
    assert second.status == first.status
    assert second.status_patch == {}
    assert second.event is None


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**VALID, "engine": "tgi"}, "spec.engine"),
        ({"engine": "vllm"}, "spec.model"),
        ({**VALID, "model": "has space"}, "spec.model"),
        ({**VALID, "replicas": 3}, "spec.replicas"),
    ],
)
def test_invalid_spec_names_the_field(spec: dict[str, Any], field: str) -> None:
    decision = decide(spec)
    assert not decision.accepted
    condition = accepted_condition(decision.status)
    assert condition["status"] == "False"
    assert condition["reason"] == "InvalidSpec"
    assert condition["message"].startswith(f"{field}: ")
    assert decision.event is not None
    assert decision.event.type == "Warning"
    assert decision.event.reason == "InvalidSpec"
    assert decision.status["observedGeneration"] == 1
    InferenceDeploymentStatus.model_validate(decision.status)


def test_every_invalid_field_is_reported() -> None:
    decision = decide({"engine": "tgi", "topology": "Ring"})
    assert "spec.model: Field required" in decision.message
    assert "spec.engine: " in decision.message
    assert "spec.topology: " in decision.message


def test_same_invalid_spec_again_posts_no_second_warning() -> None:
    first = decide({**VALID, "engine": "tgi"})
    again = decide({**VALID, "engine": "tgi"}, first.status, now=T1)
    assert again.event is None
    assert again.status_patch == {}


def test_fixing_the_spec_flips_the_condition_and_posts_normal() -> None:
    broken = decide({**VALID, "engine": "tgi"})
    fixed = decide(VALID, broken.status, generation=2, now=T1)
    condition = accepted_condition(fixed.status)
    assert condition["status"] == "True"
    assert condition["lastTransitionTime"] == "2026-11-01T12:01:00Z"
    assert fixed.event is not None
    assert fixed.event.type == "Normal"


def test_new_generation_with_equivalent_spec_updates_generation_silently() -> None:
    first = decide(VALID)
    bumped = decide(VALID, first.status, generation=2, now=T1)
    assert bumped.status_patch["observedGeneration"] == 2
    assert accepted_condition(bumped.status_patch)["observedGeneration"] == 2
    assert accepted_condition(bumped.status)["lastTransitionTime"] == "2026-11-01T12:00:00Z"
    assert bumped.event is None


def test_conditions_owned_by_others_are_preserved() -> None:
    ready = {
        "type": "Ready",
        "status": "False",
        "reason": "Pending",
        "message": "",
        "lastTransitionTime": "2026-10-01T00:00:00Z",
    }
    decision = decide(VALID, {"conditions": [ready], "observedGeneration": 1})
    assert decision.status["conditions"][0] == ready
    assert "observedGeneration" not in decision.status_patch


def test_malformed_status_is_treated_as_empty() -> None:
    decision = decide(VALID, {"conditions": "garbage"})
    assert [c["type"] for c in decision.status["conditions"]] == ["Accepted"]


def test_field_path_renders_list_indexes() -> None:
    assert infd.field_path(("pools", "prefill", "args", 2)) == "spec.pools.prefill.args[2]"
    assert infd.field_path(()) == "spec"


def test_long_messages_are_truncated_for_events() -> None:
    decision = decide({**VALID, **{f"unknownField{i}": i for i in range(100)}})
    assert len(decision.message) <= 1000
    assert decision.message.endswith("…")


# The kopf handler: a thin wrapper; kopf's event posting is replaced by a recorder.


def run_handler(spec: dict[str, Any], status: dict[str, Any], monkeypatch: Any) -> Any:
    posted: list[tuple[str, str, str]] = []

    def recorder(kind: str) -> Any:
        def post(_: Any, *, reason: str, message: str) -> None:
            posted.append((kind, reason, message))

        return post

    monkeypatch.setattr(kopf, "info", recorder("Normal"))
    monkeypatch.setattr(kopf, "warn", recorder("Warning"))
    raw = {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "demo", "namespace": "ml", "generation": 3},
        "spec": spec,
        "status": status,
    }
    body = kopf.Body(cast(kopf.RawBody, raw))
    patch = kopf.Patch()
    coro = infd.reconcile(
        body=body, spec=body.spec, meta=body.meta, status=body.status, patch=patch
    )
    return asyncio.run(coro), patch, posted


def reconcile_count(result: str) -> float:
    value = REGISTRY.get_sample_value(
        "kleave_reconcile_total", {"kind": "InferenceDeployment", "result": result}
    )
    return value or 0.0


def test_handler_patches_status_only_and_posts_one_event(monkeypatch: Any) -> None:
    before = reconcile_count("success")
    result, patch, posted = run_handler(VALID, {}, monkeypatch)
    assert result is None
    assert set(patch) == {"status"}
    assert patch["status"]["observedGeneration"] == 3
    assert posted == [("Normal", "SpecValid", "model Qwen/Qwen3-0.6B, engine vllm, topology PD")]
    assert reconcile_count("success") == before + 1


def test_handler_is_idempotent(monkeypatch: Any) -> None:
    _, first, _ = run_handler(VALID, {}, monkeypatch)
    _, second, posted = run_handler(VALID, dict(first["status"]), monkeypatch)
    assert not second
    assert posted == []


def test_handler_fails_permanently_on_invalid_spec_but_writes_status(monkeypatch: Any) -> None:
    before = reconcile_count("permanent_error")
    with pytest.raises(kopf.PermanentError, match=r"spec\.engine"):
        run_handler({**VALID, "engine": "tgi"}, {}, monkeypatch)
    assert reconcile_count("permanent_error") == before + 1


def test_invalid_spec_status_patch_is_kept_when_the_handler_fails(monkeypatch: Any) -> None:
    patch = kopf.Patch()
    raw = {"metadata": {"generation": 1}, "spec": {"engine": "tgi"}}
    body = kopf.Body(cast(kopf.RawBody, raw))
    monkeypatch.setattr(kopf, "warn", lambda *_, **__: None)
    with pytest.raises(kopf.PermanentError):
        asyncio.run(
            infd.reconcile(
                body=body, spec=body.spec, meta=body.meta, status=body.status, patch=patch
            )
        )
    assert patch["status"]["conditions"][0]["reason"] == "InvalidSpec"


def test_handlers_register_in_a_fresh_registry() -> None:
    registry = kopf.OperatorRegistry()
    infd.register_handlers(registry)
    infd.register_handlers(kopf.OperatorRegistry())  # no global state between registries
