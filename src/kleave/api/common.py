"""Pieces shared by every kind: the model base classes, Condition, and CRD metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

GROUP = "kleave.dev"
VERSION = "v1alpha1"


class ApiModel(BaseModel):
    """Base of every API model: Python names in code, camelCase names on the wire."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="forbid")


class SpecModel(ApiModel):
    """Base of spec models: unknown fields are errors, so typos are not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class StatusModel(ApiModel):
    """Base of status models: unknown fields are ignored, since kopf writes its own keys there."""

    model_config = ConfigDict(extra="ignore")


DEFAULTED: dict[str, Any] = {"default": {}}
"""``json_schema_extra`` for an object field whose own fields all have defaults: the API server
then fills them in when the object is omitted (pydantic leaves ``default_factory`` out)."""

Int64 = Annotated[int, Field(json_schema_extra={"format": "int64"})]
"""An integer the CRD declares as int64 (generations, byte counts); plain ``int`` is int32."""


def check_rfc3339(value: str) -> str:
    """Refuse timestamps the API server's date-time format would refuse."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}") from None
    if "T" not in value.upper() or parsed.tzinfo is None:
        raise ValueError(f"not an RFC 3339 timestamp with a time zone: {value!r}")
    return value


def _check_optional_rfc3339(value: str | None) -> str | None:
    return None if value is None else check_rfc3339(value)


Timestamp = Annotated[
    str | None,
    AfterValidator(_check_optional_rfc3339),
    Field(json_schema_extra={"format": "date-time"}),
]
"""An optional RFC 3339 time, e.g. ``2025-01-02T03:04:05Z``."""


class Condition(StatusModel):
    """One aspect of the resource's current state, in the shape of metav1.Condition."""

    type: str = Field(
        description="Condition type in CamelCase: Ready, Progressing, Degraded, Accepted, ...",
        min_length=1,
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    status: Literal["True", "False", "Unknown"] = Field(
        description="Whether the condition holds: True, False, or Unknown.",
    )
    reason: str = Field(
        description=(
            "Machine-readable CamelCase reason for the last transition, for alerting and "
            "automation, such as ModelNotFound."
        ),
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
    )
    message: str = Field(
        default="",
        description="Human-readable details about the transition: what happened and what to do.",
        max_length=32768,
    )
    last_transition_time: str = Field(
        description="When the status last changed (RFC 3339), not when it was last checked.",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: Int64 | None = Field(
        default=None,
        description=(
            "The metadata.generation this condition was computed from; older than the "
            "resource's generation means the condition may be stale."
        ),
        ge=0,
    )

    @field_validator("last_transition_time")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        """Reject timestamps the API server would reject, before they are sent."""
        return check_rfc3339(value)


PrinterColumnType = Literal["integer", "number", "string", "boolean", "date"]


class PrinterColumn(TypedDict):
    """One ``kubectl get`` column (an ``additionalPrinterColumns`` entry)."""

    name: str
    type: PrinterColumnType
    jsonPath: str
    description: NotRequired[str]
    priority: NotRequired[int]


@dataclass(frozen=True)
class ScaleSubresource:
    """JSON paths of the ``/scale`` subresource, which ``kubectl scale`` and the HPA use."""

    spec_replicas_path: str
    status_replicas_path: str
    label_selector_path: str | None = None


_PRINTER_COLUMN_TYPES = frozenset({"integer", "number", "string", "boolean", "date"})


@dataclass(frozen=True)
class KindInfo:
    """The CRD metadata of a kind: names, scope, printer columns and subresources."""

    kind: str
    plural: str
    singular: str
    short_names: Sequence[str] = ()
    group: str = GROUP
    version: str = VERSION
    categories: Sequence[str] = ("kleave",)
    scope: Literal["Namespaced", "Cluster"] = "Namespaced"
    printer_columns: Sequence[PrinterColumn] = ()
    status_subresource: bool = True
    scale: ScaleSubresource | None = None
    description: str = ""
    """What the kind is for, shown by ``kubectl explain <kind>``."""
    validations: Sequence[Mapping[str, str]] = ()
    """CEL rules on the whole object (they may read ``self.metadata.name``)."""

    def __post_init__(self) -> None:
        # Frozen in fact, not only in name: lists passed in become tuples.
        object.__setattr__(self, "short_names", tuple(self.short_names))
        object.__setattr__(self, "categories", tuple(self.categories))
        object.__setattr__(self, "printer_columns", tuple(self.printer_columns))
        object.__setattr__(self, "validations", tuple(dict(v) for v in self.validations))
        for name in (self.plural, self.singular, *self.short_names, *self.categories):
            if not name or name != name.lower():
                raise ValueError(f"{self.kind}: CRD names must be lowercase, got {name!r}")
        if self.scope not in ("Namespaced", "Cluster"):
            raise ValueError(f"{self.kind}: scope must be Namespaced or Cluster")
        if self.scale is not None and not self.status_subresource:
            raise ValueError(f"{self.kind}: the scale subresource needs the status subresource")
        for column in self.printer_columns:
            _check_printer_column(self.kind, column)

    @property
    def crd_name(self) -> str:
        """The CRD's metadata.name, ``<plural>.<group>``."""
        return f"{self.plural}.{self.group}"

    @property
    def api_version(self) -> str:
        """The apiVersion of the kind's objects, ``<group>/<version>``."""
        return f"{self.group}/{self.version}"


def _check_printer_column(kind: str, column: Mapping[str, object]) -> None:
    """Fail at import time on columns the API server would reject when the CRD is applied."""
    unknown = set(column) - {"name", "type", "jsonPath", "description", "priority", "format"}
    if unknown:
        raise ValueError(f"{kind}: printer column has unknown keys {sorted(unknown)}")
    if not column.get("name"):
        raise ValueError(f"{kind}: printer column without a name")
    if column.get("type") not in _PRINTER_COLUMN_TYPES:
        raise ValueError(
            f"{kind}: printer column {column['name']!r} has type {column.get('type')!r}; "
            f"expected one of {sorted(_PRINTER_COLUMN_TYPES)}"
        )
    json_path = column.get("jsonPath")
    if not isinstance(json_path, str) or not json_path.startswith("."):
        raise ValueError(
            f"{kind}: printer column {column['name']!r} needs a jsonPath starting with '.'"
        )
    priority = column.get("priority", 0)
    if not isinstance(priority, int) or priority < 0:
        raise ValueError(f"{kind}: printer column {column['name']!r} priority must be >= 0")


def conditions_field(description: str) -> Any:
    """``status.conditions``: a list keyed by type, so merge patches and SSA touch one entry."""
    return Field(
        default_factory=list,
        description=description,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
