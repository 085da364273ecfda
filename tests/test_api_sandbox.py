"""The sandbox kinds' API: SandboxTemplate, SandboxWarmPool and AgentSandbox, and their CRDs.

No CEL engine runs here, so CEL rules are checked as generated (present, with the message the
API server returns), and the pydantic mirrors of the same rules are checked for behaviour. The
schema side is checked by a small offline rendering of what the API server does with a
structural schema: apply defaults, and refuse wrong types, enums, patterns and unknown fields.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from kleave.api import agent_sandbox, registry, sandbox_template, sandbox_warm_pool
from kleave.api.agent_sandbox import (
    AgentSandboxSpec,
    AgentSandboxStatus,
    merged_env,
)
from kleave.api.inference_deployment import InferenceDeploymentSpec
from kleave.api.sandbox_policy import ToolPolicy
from kleave.api.sandbox_template import (
    EgressRule,
    EnvVar,
    Lifetime,
    LifetimeOverride,
    Persistence,
    PersistenceOverride,
    SandboxResources,
    SandboxTemplateSpec,
    SandboxTemplateStatus,
    Workspace,
)
from kleave.api.sandbox_warm_pool import SandboxWarmPoolSpec, SandboxWarmPoolStatus

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SANDBOX_EXAMPLES = ("sandbox-template.yaml", "sandbox-warm-pool.yaml", "agent-sandbox.yaml")

Schema = dict[str, Any]

SPEC_MODELS: dict[str, type[BaseModel]] = {
    "SandboxTemplate": SandboxTemplateSpec,
    "SandboxWarmPool": SandboxWarmPoolSpec,
    "AgentSandbox": AgentSandboxSpec,
    "InferenceDeployment": InferenceDeploymentSpec,
}
CRDS: dict[str, Callable[[], dict[str, Any]]] = {
    "SandboxTemplate": sandbox_template.crd,
    "SandboxWarmPool": sandbox_warm_pool.crd,
    "AgentSandbox": agent_sandbox.crd,
}


# ----- an offline rendering of the API server's structural-schema handling -------------------
def version_of(kind: str) -> dict[str, Any]:
    (version,) = CRDS[kind]()["spec"]["versions"]
    return dict(version)


def root_of(kind: str) -> Schema:
    return dict(version_of(kind)["schema"]["openAPIV3Schema"])


def spec_schema(kind: str) -> Schema:
    return dict(root_of(kind)["properties"]["spec"])


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting as the API server does it: missing fields get their default, and
    defaults are applied again inside what was just defaulted (so ``default: {}`` fills in)."""
    value = copy.deepcopy(value)
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        for name in list(value):
            sub = schema.get("properties", {}).get(name)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def schema_errors(schema: Schema, value: Any, path: str = "spec") -> list[str]:
    """What the API server's OpenAPI validation (not CEL) refuses in ``value``."""
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{path}: not an integer or string"]
        if isinstance(value, str) and not re.search(schema.get("pattern", ""), value):
            return [f"{path}: does not match {schema['pattern']}"]
        return []
    types: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    kind = schema.get("type")
    if kind is not None and not types[kind](value):
        return [f"{path}: not of type {kind}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if kind == "string":
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: longer than {schema['maxLength']}")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']}")
    if kind in ("integer", "number") and not (
        schema.get("minimum", value) <= value <= schema.get("maximum", value)
    ):
        errors.append(f"{path}: {value} out of range")
    if kind == "array":
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{path}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            errors += schema_errors(schema["items"], item, f"{path}[{i}]")
    if kind == "object":
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        errors += [f"{path}.{n}: required" for n in schema.get("required", []) if n not in value]
        for name, sub in value.items():
            if properties is not None and name in properties:
                errors += schema_errors(properties[name], sub, f"{path}.{name}")
            elif isinstance(extra, dict):
                errors += schema_errors(extra, sub, f"{path}.{name}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{name}: unknown field")
    return errors


def prune_empty(value: Any) -> Any:
    """Drop None and empty lists/maps: the API server stores no field for them."""
    if isinstance(value, dict):
        pruned = {k: prune_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, [], {})}
    if isinstance(value, list):
        return [prune_empty(v) for v in value]
    return value


def walk(node: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


def rules(node: Schema) -> dict[str, dict[str, str]]:
    """A node's CEL rules by their rule text."""
    return {r["rule"]: r for r in node.get("x-kubernetes-validations", [])}


def example(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(doc, dict)
    return doc


# ----- CRD shape --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "plural", "short"),
    [
        ("SandboxTemplate", "sandboxtemplates", "sbxt"),
        ("SandboxWarmPool", "sandboxwarmpools", "sbxwp"),
        ("AgentSandbox", "agentsandboxes", "asbx"),
    ],
)
def test_crd_names_scope_and_registration(kind: str, plural: str, short: str) -> None:
    crd = CRDS[kind]()
    assert crd["metadata"]["name"] == f"{plural}.kleave.dev"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("kleave.dev", "Namespaced")
    assert spec["names"]["kind"] == kind
    assert spec["names"]["shortNames"] == [short]
    assert "kleave" in spec["names"]["categories"]
    assert version_of(kind)["name"] == "v1alpha1"
    assert version_of(kind)["subresources"]["status"] == {}
    assert registry.generated_crds()[f"kleave.dev_{plural}.yaml"] == crd
    name_rule = rules(root_of(kind))["self.metadata.name.size() <= 63"]
    assert name_rule["message"].startswith("metadata.name must be at most 63 characters")


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_field_is_explained_and_the_schema_is_structural(kind: str) -> None:
    root = root_of(kind)
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const"}
    for part in ("spec", "status"):
        for path, node in walk(root["properties"][part]):
            assert not forbidden & set(node), f"{part}{path}"
            if node.get("type") == "object" or not path.endswith(("[*]", ".*")):
                assert node.get("description"), f"{part}{path} needs a description"
            if node.get("type") == "integer":
                assert node.get("format") in ("int32", "int64"), f"{part}{path}"
            assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{part}{path}"
    assert root["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    conditions = root["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_printer_columns() -> None:
    def columns(kind: str) -> list[tuple[str, str, int]]:
        return [
            (c["name"], c["jsonPath"], c.get("priority", 0))
            for c in version_of(kind)["additionalPrinterColumns"]
        ]

    assert columns("SandboxWarmPool") == [
        ("TEMPLATE", ".spec.templateRef.name", 0),
        ("DESIRED", ".spec.replicas", 0),
        ("READY", ".status.readyReplicas", 0),
        ("CLAIMED", ".status.claimed", 1),
        ("HASH", ".status.templateHash", 1),
        ("AUTOSCALE", ".status.autoscaling.reason", 1),
        ("AGE", ".metadata.creationTimestamp", 0),
    ]
    assert columns("AgentSandbox") == [
        ("MODE", ".spec.mode", 0),
        ("PHASE", ".status.phase", 0),
        ("POD", ".status.podName", 0),
        ("SOURCE", ".status.claim.source", 0),
        ("LATENCY(MS)", ".status.claim.latencyMs", 0),
        ("ENDPOINT", ".status.endpoint", 1),
        ("EXPIRES", ".status.expiresAt", 1),
        ("AGE", ".metadata.creationTimestamp", 0),
    ]
    assert [name for name, _, priority in columns("SandboxTemplate") if not priority] == [
        "IMAGE", "RUNTIME", "ACCEPTED", "AGE",
    ]  # fmt: skip
    # Every column's path exists in the schema (a typo shows an empty column, not an error).
    for kind in CRDS:
        for _, json_path, _ in columns(kind):
            if json_path.startswith(".metadata") or "[?" in json_path:
                continue
            node = root_of(kind)
            for part in json_path.strip(".").split("."):
                assert part in node.get("properties", {}), f"{kind}: {json_path}"
                node = node["properties"][part]


def test_warm_pool_scale_subresource() -> None:
    assert version_of("SandboxWarmPool")["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    status = root_of("SandboxWarmPool")["properties"]["status"]["properties"]
    assert status["replicas"]["type"] == "integer"
    assert status["selector"]["type"] == "string"
    assert status["claimed"]["format"] == "int64"
    assert "scale" not in version_of("AgentSandbox")["subresources"]
    assert "scale" not in version_of("SandboxTemplate")["subresources"]


# ----- CEL rules ----------------------------------------------------------------------------------
def test_agent_sandbox_cel_rules() -> None:
    spec = spec_schema("AgentSandbox")
    spec_rules = rules(spec)
    assert spec_rules["has(self.templateRef) != has(self.warmPoolRef)"]["message"] == (
        "set exactly one of spec.templateRef or spec.warmPoolRef"
    )
    switch = spec_rules[
        "has(self.templateRef) == has(oldSelf.templateRef) && "
        "has(self.warmPoolRef) == has(oldSelf.warmPoolRef)"
    ]
    assert switch["message"].startswith("spec.templateRef and spec.warmPoolRef are immutable")
    paused = [r for r in spec_rules.values() if r.get("fieldPath") == ".mode"]
    assert len(paused) == 1 and "persistence" in paused[0]["message"]
    assert "self.persistence.enabled" in paused[0]["rule"]
    assert "oldSelf.persistence" in "".join(spec_rules)


@pytest.mark.parametrize("field", ["templateRef", "warmPoolRef", "persistence"])
def test_agent_sandbox_refs_and_persistence_are_immutable(field: str) -> None:
    assert spec_schema("AgentSandbox")["properties"][field]["x-kubernetes-validations"] == [
        {
            "rule": "self == oldSelf",
            "message": f"spec.{field} is immutable: "
            + ("the sandbox's volume is created with it; " if field == "persistence" else "")
            + "create a new AgentSandbox instead",
        }
    ]


def test_agent_sandbox_mode_stays_mutable() -> None:
    mode = spec_schema("AgentSandbox")["properties"]["mode"]
    assert "x-kubernetes-validations" not in mode
    assert (mode["enum"], mode["default"]) == (["Running", "Paused"], "Running")


def test_warm_pool_cel_rules() -> None:
    spec_rules = rules(spec_schema("SandboxWarmPool"))
    assert spec_rules["!has(self.min) || !has(self.max) || self.min <= self.max"] == {
        "rule": "!has(self.min) || !has(self.max) || self.min <= self.max",
        "message": "spec.min must not exceed spec.max",
        "fieldPath": ".min",
    }
    [at_least] = [r for r in spec_rules.values() if "self.replicas >= self.min" in r["rule"]]
    assert at_least["message"] == (
        "spec.replicas must be at least spec.min (or left out, when spec.autoscaling sets it)"
    )
    assert "self.autoscaling.mode != 'off'" in at_least["rule"]
    assert spec_rules["!has(self.max) || self.replicas <= self.max"]["message"] == (
        "spec.replicas must be at most spec.max"
    )
    assert {r["fieldPath"] for r in spec_rules.values()} == {".min", ".replicas", ".max"}


def test_template_cel_rules() -> None:
    props = spec_schema("SandboxTemplate")["properties"]
    limits = rules(props["resources"])[
        "!has(self.limits) || ('cpu' in self.limits && 'memory' in self.limits)"
    ]
    assert limits["message"].startswith("resources.limits must set cpu and memory")
    egress = rules(props["egress"]["properties"]["allow"]["items"])
    assert egress["has(self.cidr) != has(self.host)"]["message"] == (
        "each egress.allow entry sets exactly one of cidr or host"
    )
    host_ports = egress["!has(self.host) || (has(self.ports) && self.ports.size() > 0)"]
    assert host_ports["fieldPath"] == ".ports"
    for kind in ("SandboxTemplate", "AgentSandbox"):
        env = spec_schema(kind)["properties"]["env"]
        assert rules(env)["self.all(e, !e.name.startsWith('KLEAVE_'))"]["message"].startswith(
            "environment names starting with KLEAVE_ are reserved"
        )
        assert env["x-kubernetes-list-map-keys"] == ["name"]


def test_cel_rules_only_read_fields_that_are_always_there_or_guarded() -> None:
    """A rule reading an absent optional field fails with "no such key" for every object."""
    for kind in CRDS:
        for path, node in walk(spec_schema(kind)):
            required = set(node.get("required", []))
            defaulted = {n for n, s in node.get("properties", {}).items() if "default" in s}
            for rule in rules(node):
                for name in re.findall(r"self\.(\w+)", rule):
                    if name not in node.get("properties", {}) or name in required | defaulted:
                        continue  # a method (self.all), or a field always present
                    assert f"has(self.{name})" in rule, f"{kind} spec{path}: {rule}"


# ----- defaults: the API server's equal pydantic's ----------------------------------------------
@pytest.mark.parametrize(
    ("kind", "minimal"),
    [
        ("SandboxTemplate", {"image": "kleave/kleave:0.1.0"}),
        ("SandboxWarmPool", {"templateRef": {"name": "t"}}),
        ("AgentSandbox", {"templateRef": {"name": "t"}}),
    ],
)
def test_crd_defaults_match_the_models(kind: str, minimal: dict[str, Any]) -> None:
    by_server = apply_defaults(spec_schema(kind), minimal)
    by_model = SPEC_MODELS[kind].model_validate(minimal).model_dump(by_alias=True)
    assert prune_empty(by_server) == prune_empty(by_model)
    assert schema_errors(spec_schema(kind), by_server) == []


def test_template_defaults_are_the_safe_ones() -> None:
    spec = SandboxTemplateSpec(image="img")
    assert spec.runtime_class_name == "kleave-microvm"
    assert spec.resources.limits == {"cpu": "1", "memory": "1Gi"}
    assert spec.resources.requests == {}
    assert (spec.workspace.size_limit, spec.workspace.mount_path) == ("1Gi", "/workspace")
    assert spec.egress.allow == []
    assert spec.tools == ToolPolicy()
    assert spec.tools.allowed_commands == [] and not spec.tools.allow_any_command
    assert (spec.persistence.enabled, spec.persistence.size) == (True, "1Gi")
    assert spec.persistence.storage_class_name is None
    assert spec.lifetime == Lifetime(
        idle_timeout_seconds=900, max_lifetime_seconds=86400, ttl_seconds_after_finished=3600
    )
    assert spec.runtime_port == 8080
    assert spec_schema("SandboxTemplate")["required"] == ["image"]
    server = apply_defaults(spec_schema("SandboxTemplate"), {"image": "img"})
    assert server["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    assert server["tools"]["deniedPaths"] == ToolPolicy().denied_paths


def test_warm_pool_and_sandbox_defaults() -> None:
    pool = SandboxWarmPoolSpec.model_validate({"templateRef": {"name": "t"}})
    assert (pool.replicas, pool.min_replicas, pool.max_replicas) == (0, None, None)
    sandbox = AgentSandboxSpec.model_validate({"warmPoolRef": {"name": "p"}})
    assert (sandbox.mode, sandbox.lifetime, sandbox.persistence, sandbox.env) == (
        "Running",
        None,
        None,
        [],
    )
    assert AgentSandboxStatus().phase == "Pending"
    assert SandboxWarmPoolStatus().claimed == 0


# ----- examples ----------------------------------------------------------------------------------
def example_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}#{i}", doc)
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc
    ]


def test_the_sandbox_examples_are_there() -> None:
    kinds = {example(name)["kind"] for name in SANDBOX_EXAMPLES}
    assert kinds == {"SandboxTemplate", "SandboxWarmPool", "AgentSandbox"}
    pool, sandbox = example("sandbox-warm-pool.yaml"), example("agent-sandbox.yaml")
    template_name = example("sandbox-template.yaml")["metadata"]["name"]
    assert pool["spec"]["templateRef"]["name"] == template_name
    assert sandbox["spec"]["warmPoolRef"]["name"] == pool["metadata"]["name"]


@pytest.mark.parametrize(("where", "doc"), example_docs(), ids=[w for w, _ in example_docs()])
def test_every_example_parses_and_round_trips(where: str, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "kleave.dev/v1alpha1", where
    model = SPEC_MODELS[doc["kind"]]
    spec = model.model_validate(doc["spec"])
    assert spec.model_dump(by_alias=True, exclude_unset=True) == doc["spec"]
    assert model.model_validate(spec.model_dump(by_alias=True)) == spec
    if doc["kind"] in CRDS:
        schema = spec_schema(doc["kind"])
        defaulted = apply_defaults(schema, doc["spec"])
        assert schema_errors(schema, defaulted) == []
        assert prune_empty(defaulted) == prune_empty(spec.model_dump(by_alias=True))
        assert len(doc["metadata"]["name"]) <= 63


def test_the_offline_schema_check_refuses_what_the_api_server_would() -> None:
    schema = spec_schema("SandboxTemplate")
    bad = {
        "image": "has space",
        "runtimeClassName": "Not_A_Name",
        "workspace": {"sizeLimit": "1 GB", "mountPath": "/a/../etc"},
        "egress": {"allow": [{"cidr": "10.0.0.0/8", "ports": [{"port": 0}]}]},
        "tools": {"allowedTools": ["sudo"]},
        "lifetime": {"idleTimeoutSeconds": -1},
        "runtimePort": 70000,
        "imagePullPolicy": "Always",
    }
    errors = schema_errors(schema, apply_defaults(schema, bad))
    for field in (
        "spec.image",
        "spec.runtimeClassName",
        "spec.workspace.sizeLimit",
        "spec.workspace.mountPath",
        "spec.egress.allow[0].ports[0].port",
        "spec.tools.allowedTools[0]",
        "spec.lifetime.idleTimeoutSeconds",
        "spec.runtimePort",
        "spec.imagePullPolicy: unknown field",
    ):
        assert any(e.startswith(field) for e in errors), (field, errors)


# ----- the models' own validation (mirrors of the CEL rules) ------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "exactly one of spec.templateRef or spec.warmPoolRef"),
        (
            {"templateRef": {"name": "t"}, "warmPoolRef": {"name": "p"}},
            "exactly one of spec.templateRef or spec.warmPoolRef",
        ),
        (
            {"templateRef": {"name": "t"}, "mode": "Paused", "persistence": {"enabled": False}},
            "Paused needs persistence",
        ),
        ({"templateRef": {"name": "t"}, "mode": "Stopped"}, "Running"),
        ({"templateRef": {"name": "Bad Name"}}, "pattern"),
        ({"templateRef": {"name": "t"}, "env": [{"name": "KLEAVE_SANDBOX_TOKEN"}]}, "reserved"),
        ({"templateRef": {"name": "t"}, "lifetime": {"idleTimeoutSeconds": -5}}, "greater"),
        ({"templateRef": {"name": "t"}, "image": "x"}, "Extra inputs"),
    ],
)
def test_agent_sandbox_spec_refusals(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AgentSandboxSpec.model_validate(data)


def test_paused_with_the_templates_persistence_is_fine() -> None:
    spec = AgentSandboxSpec.model_validate({"templateRef": {"name": "t"}, "mode": "Paused"})
    assert spec.mode == "Paused"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"replicas": 5, "min": 6, "max": 4}, r"spec\.min \(6\) must not exceed spec\.max"),
        ({"replicas": 1, "min": 2}, r"at least spec\.min"),
        ({"min": 2}, r"at least spec\.min"),
        (
            {"replicas": 1, "min": 2, "max": 4, "autoscaling": {"mode": "reactive"}},
            r"at least spec\.min",
        ),
        (
            {"min": 1, "autoscaling": {"mode": "forecast"}},
            r"spec\.max is required when spec\.autoscaling\.mode",
        ),
        (
            {"max": 4, "autoscaling": {"intervalSeconds": 5, "historySeconds": 86400}},
            r"historySeconds must be at most 10080 x intervalSeconds",
        ),
        ({"replicas": 9, "max": 8}, r"at most spec\.max"),
        ({"replicas": -1}, "greater than or equal"),
    ],
)
def test_warm_pool_spec_refusals(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SandboxWarmPoolSpec.model_validate({"templateRef": {"name": "t"}, **data})


def test_an_autoscaled_pool_may_leave_replicas_to_the_autoscaler() -> None:
    spec = SandboxWarmPoolSpec.model_validate(
        {"templateRef": {"name": "t"}, "min": 2, "max": 9, "autoscaling": {"mode": "reactive"}}
    )
    assert (spec.replicas, spec.min_replicas) == (0, 2)
    assert spec.autoscaling is not None
    assert spec.autoscaling.history_s == 2 * 86400
    short = spec.autoscaling.model_validate({"intervalSeconds": 5})
    assert short.history_s == 5 * 10080  # the default, capped to the windows status keeps


def test_warm_pool_bounds_accept_replicas_within_them() -> None:
    spec = SandboxWarmPoolSpec.model_validate(
        {"templateRef": {"name": "t"}, "replicas": 4, "min": 4, "max": 4}
    )
    assert (spec.min_replicas, spec.max_replicas) == (4, 4)
    assert spec.model_dump(by_alias=True, exclude_none=True) == {
        "templateRef": {"name": "t"},
        "replicas": 4,
        "min": 4,
        "max": 4,
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"resources": {"limits": {"memory": "2Gi"}}}, r"missing \['cpu'\]"),
        ({"resources": {"limits": {"cpu": "1 core", "memory": "1Gi"}}}, "not a Kubernetes"),
        ({"resources": {"limits": {"cpu": -1, "memory": "1Gi"}}}, "negative"),
        ({"workspace": {"mountPath": "/"}}, "pattern"),
        ({"workspace": {"mountPath": "/work/../etc"}}, "pattern"),
        ({"egress": {"allow": [{}]}}, "exactly one of cidr or host"),
        ({"egress": {"allow": [{"cidr": "10.0.0.0/8", "host": "a.b"}]}}, "exactly one"),
        ({"egress": {"allow": [{"host": "pkg.example.com"}]}}, "must list its ports"),
        ({"egress": {"allow": [{"host": "*.example.com", "ports": [{"port": 443}]}]}}, "pattern"),
        ({"egress": {"allow": [{"cidr": "10.0.0.300/8"}]}}, "not a CIDR"),
        ({"egress": {"allow": [{"cidr": "10.0.0.1"}]}}, "prefix length"),
        (
            {
                "egress": {
                    "allow": [{"cidr": "10.0.0.0/8", "ports": [{"port": 80, "protocol": "SCTP"}]}]
                }
            },
            "TCP",
        ),
        ({"tools": {"allowedCommands": ["/bin/sh"]}}, "not a command name"),
        ({"env": [{"name": "KLEAVE_POLICY", "value": "/tmp/x"}]}, "KLEAVE_POLICY"),
        ({"runtimeClassName": ""}, "at least 1"),
        ({"runtimePort": 0}, "greater than or equal to 1"),
    ],
)
def test_template_spec_refusals(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SandboxTemplateSpec.model_validate({"image": "img", **data})


def test_template_accepts_quantities_as_numbers_and_strings() -> None:
    resources = SandboxResources.model_validate(
        {"requests": {"cpu": "250m"}, "limits": {"cpu": 2, "memory": "1.5Gi"}}
    )
    assert resources.limits == {"cpu": 2, "memory": "1.5Gi"}
    assert Workspace.model_validate({"sizeLimit": 10**9}).size_limit == 10**9
    rule = EgressRule.model_validate({"cidr": "2001:db8::/32"})
    assert (rule.cidr, rule.ports) == ("2001:db8::/32", [])


# ----- overrides ----------------------------------------------------------------------------------
def test_lifetime_and_persistence_overrides_replace_only_what_they_set() -> None:
    base = Lifetime()
    override = LifetimeOverride(idle_timeout_seconds=60)
    assert override.apply_to(base) == base.model_copy(update={"idle_timeout_seconds": 60})
    assert LifetimeOverride().apply_to(base) == base
    assert LifetimeOverride(max_lifetime_seconds=0).apply_to(base).max_lifetime_seconds == 0
    persistence = Persistence(storage_class_name="fast")
    assert PersistenceOverride(size="8Gi").apply_to(persistence) == Persistence(
        storage_class_name="fast", size="8Gi"
    )
    assert PersistenceOverride(enabled=False).apply_to(persistence).enabled is False
    # The override shapes have the template's field names, so one manifest reads like the other.
    assert set(LifetimeOverride.model_fields) == set(Lifetime.model_fields)
    assert set(PersistenceOverride.model_fields) == set(Persistence.model_fields)


def test_sandbox_env_adds_to_the_templates_without_replacing_it() -> None:
    template = [EnvVar(name="HTTP_PROXY", value="http://proxy:3128"), EnvVar(name="A", value="1")]
    additions = [EnvVar(name="HTTP_PROXY", value="none"), EnvVar(name="TASK", value="t")]
    assert [(e.name, e.value) for e in merged_env(template, additions)] == [
        ("HTTP_PROXY", "http://proxy:3128"),
        ("A", "1"),
        ("TASK", "t"),
    ]


# ----- status ------------------------------------------------------------------------------------
SANDBOX_STATUS: dict[str, Any] = {
    "observedGeneration": 3,
    "phase": "Ready",
    "podName": "python-coder-7f9c-abcde",
    "templateHash": "5d41402abc",
    "claim": {"source": "Warm", "latencyMs": 42, "claimedAt": "2025-01-02T03:04:05Z"},
    "endpoint": "10.1.2.3:8080",
    "snapshot": {
        "generation": 2,
        "name": "snap-00000002.tar",
        "sizeBytes": 5 * 2**30,
        "checksum": "ab" * 32,
        "takenAt": "2025-01-02T02:00:00Z",
    },
    "auditHead": {"seq": 17, "hash": "cd" * 32},
    "lastActivityTime": "2025-01-02T03:05:00+00:00",
    "expiresAt": "2025-01-03T03:04:05Z",
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "RuntimeReady",
            "message": "",
            "lastTransitionTime": "2025-01-02T03:04:05Z",
        }
    ],
}


def test_agent_sandbox_status_round_trips_and_ignores_kopfs_keys() -> None:
    status = AgentSandboxStatus.model_validate({**SANDBOX_STATUS, "kopf": {"progress": {}}})
    assert status.claim is not None and status.claim.latency_ms == 42
    assert status.snapshot is not None and status.snapshot.size_bytes == 5 * 2**30
    assert status.model_dump(by_alias=True, exclude_none=True) == SANDBOX_STATUS
    schema = root_of("AgentSandbox")["properties"]["status"]
    assert schema_errors(schema, SANDBOX_STATUS, "status") == []
    props = schema["properties"]
    assert props["phase"]["enum"] == list(agent_sandbox.PHASES)
    assert props["claim"]["properties"]["source"]["enum"] == ["Warm", "Cold", "Resume"]
    for int64 in (
        props["claim"]["properties"]["latencyMs"],
        props["snapshot"]["properties"]["sizeBytes"],
        props["snapshot"]["properties"]["generation"],
        props["auditHead"]["properties"]["seq"],
    ):
        assert int64["format"] == "int64"
    for timestamp in ("lastActivityTime", "expiresAt"):
        assert props[timestamp]["format"] == "date-time"


@pytest.mark.parametrize("field", ["lastActivityTime", "expiresAt"])
def test_status_times_must_be_rfc3339(field: str) -> None:
    with pytest.raises(ValidationError, match="RFC 3339"):
        AgentSandboxStatus.model_validate({field: "2025-01-02 03:04:05"})


def test_pool_and_template_status() -> None:
    pool = SandboxWarmPoolStatus.model_validate(
        {
            "observedGeneration": 1,
            "replicas": 3,
            "readyReplicas": 2,
            "claimed": 10,
            "selector": "kleave.dev/warm-pool=python-coder",
            "templateHash": "5d41402abc",
        }
    )
    assert (pool.replicas, pool.ready_replicas, pool.claimed) == (3, 2, 10)
    template = SandboxTemplateStatus.model_validate({"templateHash": "5d41402abc"})
    assert template.template_hash == "5d41402abc"
    assert set(root_of("SandboxTemplate")["properties"]["status"]["properties"]) == {
        "observedGeneration", "templateHash", "conditions",
    }  # fmt: skip
    assert set(root_of("SandboxWarmPool")["properties"]["status"]["properties"]) == {
        "observedGeneration", "replicas", "readyReplicas", "claimed", "selector",
        "templateHash", "conditions", "autoscaling",
    }  # fmt: skip


def test_checked_in_sandbox_crds_are_current() -> None:
    for plural in ("sandboxtemplates", "sandboxwarmpools", "agentsandboxes"):
        name = f"kleave.dev_{plural}.yaml"
        assert (REPO / "crds" / name).read_text() == registry.render_crds()[name], name
