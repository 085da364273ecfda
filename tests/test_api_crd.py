"""The pydantic-to-structural-schema translation, and the CRDs built from it."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kleave.api.common import (
    Condition,
    Int64,
    KindInfo,
    ScaleSubresource,
    SpecModel,
    StatusModel,
)
from kleave.api.crd import YAML_HEADER, crd_for, structural_schema, to_yaml
from kleave.api.inference_deployment import (
    KIND,
    InferenceDeploymentSpec,
    InferenceDeploymentStatus,
    crd,
)

# Keywords a structural schema must not contain (JSON Schema spellings, or forbidden in CRDs).
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const", "uniqueItems"}


class Color(StrEnum):
    """A color."""

    RED = "red"
    BLUE = "blue"


class Port(SpecModel):
    """A named port."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [{"message": "name or number", "rule": "self.number > 0"}]
        }
    )

    port_name: str = Field(description="The port's name.")
    number: int = Field(default=80, description="The port number.", gt=0, le=65535)


class Everything(SpecModel):
    """A model touching every translation rule."""

    primary_port: Port = Field(description="The main port.")
    maybe_port: Port | None = Field(default=None, description="An optional port.")
    ports: list[Port] = Field(default_factory=list, description="More ports.")
    color: Color = Field(default=Color.RED, description="Paint.")
    mode: Literal["a", "b"] = Field(default="b", description="A mode.")
    only: Literal["x"] = Field(default="x", description="The one value.")
    level: Literal[1, 2, 3] = Field(default=1, description="A level.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    port_map: dict[str, Port] = Field(default_factory=dict, description="Ports by name.")
    free_form: dict[str, Any] = Field(default_factory=dict, description="Anything.")
    tags: set[str] = Field(default_factory=set, description="Tags.")
    ratio: float = Field(default=0.5, ge=0, lt=1, description="A ratio.")
    big: Int64 = Field(default=0, description="A big number.")
    count: int | None = Field(default=None, ge=1, description="A count.")
    name: str = Field(
        default="n",
        min_length=1,
        max_length=63,
        pattern=r"^[a-z]+$",
        description="A name.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "immutable", "reason": "FieldValueForbidden"}
            ]
        },
    )
    target: int | str = Field(
        default=1,
        description="Port or name.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    default_port: Port = Field(default=Port(port_name="http"), description="Defaulted port.")


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node under ``node``, with its path."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


def assert_structural(schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        assert not FORBIDDEN & set(node), f"{path}: {sorted(FORBIDDEN & set(node))}"
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        untyped_ok = node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        assert "type" in node or untyped_ok, f"{path} has no type"
        if node.get("type") == "array":
            assert "items" in node, path
        if node.get("type") == "integer":
            assert node.get("format") in ("int32", "int64"), path


@pytest.fixture(scope="module")
def everything() -> dict[str, Any]:
    return structural_schema(Everything)


def test_schema_is_structural(everything: dict[str, Any]) -> None:
    assert_structural(everything)


def test_refs_are_inlined_with_field_descriptions_winning(everything: dict[str, Any]) -> None:
    props = everything["properties"]
    assert props["primaryPort"]["description"] == "The main port."
    assert props["primaryPort"]["properties"]["portName"] == {
        "description": "The port's name.",
        "type": "string",
    }
    assert props["primaryPort"]["required"] == ["portName"]
    assert props["maybePort"]["type"] == "object"
    assert "nullable" not in props["maybePort"]
    assert props["ports"]["items"]["description"] == "A named port."
    assert everything["required"] == ["primaryPort"]


def test_enums_become_typed_enums(everything: dict[str, Any]) -> None:
    props = everything["properties"]
    assert props["color"] | {"description": ""} == {
        "description": "",
        "type": "string",
        "enum": ["red", "blue"],
        "default": "red",
    }
    assert props["mode"]["type"] == "string"
    assert props["mode"]["enum"] == ["a", "b"]
    assert props["only"]["enum"] == ["x"]
    assert (props["level"]["type"], props["level"]["enum"]) == ("integer", [1, 2, 3])


def test_defaults_are_kept_by_alias_and_none_dropped(everything: dict[str, Any]) -> None:
    props = everything["properties"]
    assert props["mode"]["default"] == "b"
    assert props["defaultPort"]["default"] == {"portName": "http", "number": 80}
    assert props["primaryPort"]["properties"]["number"]["default"] == 80
    assert "default" not in props["maybePort"]
    assert "default" not in props["count"]


def test_numbers_bounds_and_formats(everything: dict[str, Any]) -> None:
    props = everything["properties"]
    number = props["primaryPort"]["properties"]["number"]
    assert number["format"] == "int32"
    assert (number["minimum"], number["exclusiveMinimum"], number["maximum"]) == (0, True, 65535)
    assert "exclusiveMaximum" not in number
    assert props["ratio"] | {"description": ""} == {
        "description": "",
        "type": "number",
        "default": 0.5,
        "minimum": 0,
        "maximum": 1,
        "exclusiveMaximum": True,
    }
    assert props["big"]["format"] == "int64"
    assert (props["count"]["type"], props["count"]["minimum"]) == ("integer", 1)


def test_string_constraints(everything: dict[str, Any]) -> None:
    name = everything["properties"]["name"]
    assert (name["minLength"], name["maxLength"], name["pattern"]) == (1, 63, "^[a-z]+$")


def test_cel_rules_pass_through_from_fields_and_models(everything: dict[str, Any]) -> None:
    props = everything["properties"]
    assert props["name"]["x-kubernetes-validations"] == [
        {"rule": "self == oldSelf", "message": "immutable", "reason": "FieldValueForbidden"}
    ]
    model_rule = {"rule": "self.number > 0", "message": "name or number"}
    assert props["primaryPort"]["x-kubernetes-validations"] == [model_rule]
    assert list(props["primaryPort"]["x-kubernetes-validations"][0]) == ["rule", "message"]
    assert props["ports"]["items"]["x-kubernetes-validations"] == [model_rule]


def test_dicts_become_additional_properties(everything: dict[str, Any]) -> None:
    props = everything["properties"]
    assert props["labels"]["additionalProperties"] == {"type": "string"}
    assert props["portMap"]["additionalProperties"]["properties"]["number"]["type"] == "integer"
    assert props["freeForm"] == {
        "description": "Anything.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }


def test_sets_and_int_or_string(everything: dict[str, Any]) -> None:
    props = everything["properties"]
    assert props["tags"]["x-kubernetes-list-type"] == "set"
    assert props["target"] == {
        "description": "Port or name.",
        "default": 1,
        "x-kubernetes-int-or-string": True,
    }


class Inner(BaseModel):
    value: int | str


class Outer(BaseModel):
    inner: Inner


class Node(BaseModel):
    children: list[Node] = []


class Untyped(BaseModel):
    anything: Any


class Pair(BaseModel):
    pair: tuple[int, str]


class BadReason(BaseModel):
    name: str = Field(
        json_schema_extra={"x-kubernetes-validations": [{"rule": "true", "reason": "Nope"}]}
    )


class NoRule(BaseModel):
    name: str = Field(json_schema_extra={"x-kubernetes-validations": [{"message": "m"}]})


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Outer, r"^Outer: field 'inner\.value': a union of several types"),
        (Node, r"^Node: field 'children\[\*\]': recursive type 'Node'"),
        (Untyped, r"^Untyped: field 'anything': no type"),
        (Pair, r"^Pair: field 'pair': unsupported JSON schema keywords \['prefixItems'\]"),
        (BadReason, r"^BadReason: field 'name': CEL reason 'Nope'"),
        (NoRule, r"^NoRule: field 'name': CEL validation .* needs a 'rule' string"),
    ],
)
def test_unconvertible_models_raise_naming_model_and_field(
    model: type[BaseModel], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        structural_schema(model)


class Status(StatusModel):
    ready_replicas: int = Field(default=0, description="Ready replicas.")
    selector: str = Field(default="", description="Pod selector.")


SCALED = KindInfo(
    kind="Widget",
    plural="widgets",
    singular="widget",
    short_names=["wdg"],
    scope="Cluster",
    scale=ScaleSubresource(".spec.replicas", ".status.readyReplicas", ".status.selector"),
    printer_columns=[{"name": "READY", "type": "integer", "jsonPath": ".status.readyReplicas"}],
)


def test_crd_for_builds_a_v1_crd() -> None:
    widget = crd_for(SCALED, Port, Status)
    assert widget["apiVersion"] == "apiextensions.k8s.io/v1"
    assert widget["metadata"] == {"name": "widgets.kleave.dev"}
    spec = widget["spec"]
    assert (spec["group"], spec["scope"]) == ("kleave.dev", "Cluster")
    assert spec["names"] == {
        "kind": "Widget",
        "listKind": "WidgetList",
        "plural": "widgets",
        "singular": "widget",
        "shortNames": ["wdg"],
        "categories": ["kleave"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.readyReplicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    assert version["additionalPrinterColumns"][0]["name"] == "READY"
    root = version["schema"]["openAPIV3Schema"]
    assert list(root["properties"]) == ["apiVersion", "kind", "metadata", "spec", "status"]
    assert root["required"] == ["spec"]
    status = root["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert status["properties"]["readyReplicas"]["type"] == "integer"
    assert_structural(root)


def test_to_yaml_is_deterministic_and_round_trips() -> None:
    text = to_yaml(crd())
    assert text.startswith(YAML_HEADER)
    assert text == to_yaml(crd())
    assert yaml.safe_load(text) == crd()


def test_inference_deployment_crd() -> None:
    version = crd()["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    assert_structural(root)
    spec = root["properties"]["spec"]
    assert spec["required"] == ["model", "pools"]
    assert spec["properties"]["engine"]["enum"] == ["builtin", "vllm", "sglang"]
    assert spec["properties"]["engine"]["default"] == "builtin"
    topology = spec["properties"]["topology"]
    assert topology["default"] == "PD"
    assert topology["x-kubernetes-validations"] == [
        {
            "rule": "self == oldSelf",
            "message": "spec.topology is immutable: create a new InferenceDeployment to change it",
        }
    ]
    conditions = root["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "READY", "TOPOLOGY", "P", "D", "A", "F", "ENGINE", "MODEL", "REVISION", "AGE",
    ]  # fmt: skip
    assert crd()["spec"]["names"]["shortNames"] == ["infd"]
    # Scalar list items and map values are explained by their field's description.
    for path, node in walk(root["properties"]["spec"]):
        if node.get("type") == "object" or not path.endswith(("[*]", ".*")):
            assert node.get("description"), f"spec{path} needs a description for kubectl explain"
    for path, node in walk(root["properties"]["status"]):
        if node.get("type") == "object" or not path.endswith(("[*]", ".*")):
            assert node.get("description"), f"status{path} needs a description"


def test_inference_deployment_models_validate() -> None:
    pools = {"prefill": {"gpuType": "H100-SXM"}, "decode": {"gpuType": "H20"}}
    spec = InferenceDeploymentSpec.model_validate(
        {"model": "meta-llama/Llama-3.1-8B-Instruct", "pools": pools}
    )
    assert (spec.engine, spec.topology) == ("builtin", "PD")
    assert list(spec.pools.defined()) == ["prefill", "decode"]
    with pytest.raises(ValidationError):
        InferenceDeploymentSpec.model_validate({"model": "has space", "pools": pools})
    with pytest.raises(ValidationError):
        InferenceDeploymentSpec.model_validate({"model": "m", "pools": pools, "replicas": 3})
    status = InferenceDeploymentStatus.model_validate(
        {
            "observedGeneration": 2,
            "conditions": [
                {
                    "type": "Accepted",
                    "status": "True",
                    "reason": "Valid",
                    "lastTransitionTime": "2025-01-02T03:04:05Z",
                }
            ],
            "kopf": {"progress": {}},
        }
    )
    assert status.observed_generation == 2
    assert status.model_dump(by_alias=True, exclude_none=True)["conditions"][0] == {
        "type": "Accepted",
        "status": "True",
        "reason": "Valid",
        "message": "",
        "lastTransitionTime": "2025-01-02T03:04:05Z",
    }


@pytest.mark.parametrize("timestamp", ["yesterday", "2025-01-02", "2025-01-02T03:04:05"])
def test_condition_rejects_non_rfc3339_times(timestamp: str) -> None:
    with pytest.raises(ValidationError, match="RFC 3339"):
        Condition(type="Ready", status="True", reason="Up", last_transition_time=timestamp)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"plural": "Widgets"}, "lowercase"),
        ({"printer_columns": [{"name": "X", "type": "text", "jsonPath": ".a"}]}, "type 'text'"),
        ({"printer_columns": [{"name": "X", "type": "string", "jsonPath": "a"}]}, "jsonPath"),
        ({"status_subresource": False}, "scale subresource needs the status"),
    ],
)
def test_kind_info_rejects_what_the_api_server_would(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "kind": "Widget",
        "plural": "widgets",
        "singular": "widget",
        "scale": ScaleSubresource(".spec.replicas", ".status.replicas"),
    }
    with pytest.raises(ValueError, match=message):
        KindInfo(**(fields | changes))


def test_kind_info_is_immutable() -> None:
    assert KIND.short_names == ("infd",)
    assert KIND.crd_name == "inferencedeployments.kleave.dev"
    assert KIND.api_version == "kleave.dev/v1alpha1"
