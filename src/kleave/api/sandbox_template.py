"""SandboxTemplate (``sbxt``): what every sandbox of one kind runs, and how it is fenced in.

A template is the admin's half of an agent sandbox: the image, the microVM runtime class, the
resource limits, the egress allow-list, the tool policy the in-sandbox runtime enforces,
persistence and lifetimes. Warm pools and AgentSandboxes only point at a template, so the
people who create sandboxes (often an agent platform acting for an LLM) cannot loosen any of
it. Every default is the safe one: microVM isolation, limits on every pod, no egress but DNS,
no commands, and a lifetime that ends.

The pieces an AgentSandbox may override (lifetime, persistence) and the references both other
kinds use live here too, so one definition serves all three kinds.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from kleave.api.common import (
    DEFAULTED,
    Condition,
    Int64,
    KindInfo,
    SpecModel,
    StatusModel,
    conditions_field,
)
from kleave.api.crd import crd_for
from kleave.api.inference_pool import EnvVar as PodEnvVar
from kleave.api.inference_pool import Toleration
from kleave.api.sandbox_policy import ToolPolicy

DEFAULT_RUNTIME_CLASS = "kleave-microvm"
"""The RuntimeClass the chart ships: Kata Containers with Firecracker (one microVM per pod)."""
DEFAULT_LIMITS: dict[str, int | str] = {"cpu": "1", "memory": "1Gi"}
DEFAULT_RUNTIME_PORT = 8080
"""The port ``kleave sandbox runtime`` listens on by default."""
RESERVED_ENV_PREFIX = "KLEAVE_"
"""Environment names kleave sets itself (the runtime's token and paths); specs may not."""

MAX_NAME_LENGTH = 63
"""kleave labels pods, volumes and policies with these objects' names: label values are <= 63."""

# resource.Quantity's syntax without a sign: a negative size or limit is never meant.
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Absolute, with no "." or ".." segment (a segment may not start with a dot), so a mount path
# can never land on "/" or climb out of where it says.
MOUNT_PATH_PATTERN = r"^(/[A-Za-z0-9_@+-][A-Za-z0-9_.@+-]*)+$"


def _check_quantity(value: int | str) -> int | str:
    """The API server checks the pattern; this gives the same refusal before anything is sent."""
    if isinstance(value, int) and value < 0:
        raise ValueError(f"a quantity must not be negative, got {value}")
    if isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 500m, 2, 1Gi or 512Mi")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]
"""A Kubernetes resource quantity (``500m``, ``2``, ``1Gi``), an integer or a string."""


def immutable(field: str, hint: str) -> dict[str, Any]:
    """``json_schema_extra`` for a field the API server keeps as it was at create."""
    return {
        "x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": f"spec.{field} is immutable: {hint}"}
        ]
    }


def name_length_rule(kind: str) -> dict[str, str]:
    """The object-level CEL rule that keeps a kind's names usable as label values."""
    return {
        "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        "message": (
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters: kleave labels the "
            f"{kind}'s pods and volumes with it"
        ),
    }


class EnvVar(PodEnvVar):
    """An environment variable of the sandbox container, readable by the agent's code."""


def env_field(description: str) -> Any:
    """A list of environment variables keyed by name, refusing the names kleave reserves."""
    return Field(
        default_factory=list,
        max_length=128,
        description=description,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            "x-kubernetes-validations": [
                {
                    "rule": f"self.all(e, !e.name.startsWith('{RESERVED_ENV_PREFIX}'))",
                    "message": (
                        f"environment names starting with {RESERVED_ENV_PREFIX} are reserved: "
                        "kleave sets them for the sandbox runtime"
                    ),
                }
            ],
        },
    )


def check_reserved_env(env: list[EnvVar]) -> list[EnvVar]:
    """Mirror the CEL rule of :func:`env_field` for specs parsed outside the API server."""
    reserved = sorted(e.name for e in env if e.name.startswith(RESERVED_ENV_PREFIX))
    if reserved:
        raise ValueError(
            f"environment names starting with {RESERVED_ENV_PREFIX} are reserved: "
            f"{', '.join(reserved)}"
        )
    return env


class ObjectRef(SpecModel):
    """A reference to another kleave object in the same namespace, by name."""

    name: str = Field(
        description="The object's metadata.name, in the same namespace.",
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=DNS_SUBDOMAIN_PATTERN,
    )


class SandboxResources(SpecModel):
    """CPU and memory of the sandbox container; limits are always set."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # Unset limits are defaulted (cpu 1, memory 1Gi) before this runs on a
                    # stored object; the API server also checks the `resources: {}` default
                    # itself, nested defaults not applied, so an absent field must pass.
                    "rule": "!has(self.limits) || "
                    "('cpu' in self.limits && 'memory' in self.limits)",
                    "message": (
                        "resources.limits must set cpu and memory: every sandbox pod runs with "
                        "limits (omit limits for the defaults, cpu 1 and memory 1Gi)"
                    ),
                    "fieldPath": ".limits",
                }
            ]
        }
    )

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=16,
        description=(
            "Resource requests, e.g. cpu: 250m. Empty: Kubernetes sets them equal to the "
            "limits (Guaranteed QoS), so a warm pool's pods hold what they may use."
        ),
    )
    limits: dict[str, Quantity] = Field(
        default_factory=lambda: dict(DEFAULT_LIMITS),
        min_length=1,
        max_length=16,
        description=(
            "Resource limits; cpu and memory are required, so code that an LLM wrote can "
            "never take a node's CPU or memory. Default: cpu 1, memory 1Gi."
        ),
        json_schema_extra={"default": dict(DEFAULT_LIMITS)},
    )

    @model_validator(mode="after")
    def _limits_set(self) -> SandboxResources:
        """Mirror the CEL rule, for templates parsed outside the API server."""
        missing = [key for key in ("cpu", "memory") if key not in self.limits]
        if missing:
            raise ValueError(f"resources.limits must set cpu and memory; missing {missing}")
        return self


class Workspace(SpecModel):
    """The agent's writable directory: the only writable path on a read-only root filesystem."""

    size_limit: Quantity = Field(
        default="1Gi",
        description=(
            "Most bytes the workspace may hold; past it the kubelet evicts the pod. Also "
            "bounds what a snapshot must store. Default 1Gi."
        ),
    )
    mount_path: str = Field(
        default="/workspace",
        max_length=1024,
        pattern=MOUNT_PATH_PATTERN,
        description=(
            "Where the workspace is mounted in the sandbox, an absolute path without '.' or "
            "'..' segments; commands start there and file tools see only it. Default /workspace."
        ),
    )


class EgressPort(SpecModel):
    """One destination port an egress rule opens."""

    port: int = Field(ge=1, le=65535, description="Destination port number.")
    protocol: Literal["TCP", "UDP"] = Field(default="TCP", description="TCP (default) or UDP.")


class EgressRule(SpecModel):
    """One destination the sandbox may reach: an IP range, or a host name on named ports."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.cidr) != has(self.host)",
                    "message": "each egress.allow entry sets exactly one of cidr or host",
                },
                {
                    "rule": "!has(self.host) || (has(self.ports) && self.ports.size() > 0)",
                    "message": (
                        "an egress.allow entry with host must list its ports: a host's "
                        "addresses change and are often shared, so the grant stays narrow"
                    ),
                    "fieldPath": ".ports",
                },
            ]
        }
    )

    cidr: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "An IPv4 or IPv6 range in CIDR notation, e.g. 10.0.0.0/8 or 2001:db8::/32. "
            "0.0.0.0/0 opens every address (cloud metadata endpoints included); prefer "
            "narrow ranges."
        ),
        json_schema_extra={"format": "cidr"},
    )
    host: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description=(
            "A DNS name such as pkg.example.com (no wildcards), allowed on the listed ports at the "
            "addresses it resolves to."
        ),
    )
    ports: list[EgressPort] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "Destination ports; required with host. Empty with cidr: every port of the range."
        ),
    )

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        """The API server's cidr format check, for templates parsed outside it."""
        if value is not None:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not a CIDR such as 10.0.0.0/8") from None
            if "/" not in value:
                raise ValueError(f"{value!r} needs a prefix length, e.g. {value}/32")
        return value

    @model_validator(mode="after")
    def _one_destination(self) -> EgressRule:
        """Mirror the CEL rules, for templates parsed outside the API server."""
        if (self.cidr is None) == (self.host is None):
            raise ValueError("each egress.allow entry sets exactly one of cidr or host")
        if self.host is not None and not self.ports:
            raise ValueError(f"egress.allow entry with host {self.host!r} must list its ports")
        return self


class Egress(SpecModel):
    """Where the sandbox may connect to. Everything not listed is denied, except DNS."""

    allow: list[EgressRule] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Destinations the sandbox may reach. Empty (default): none but cluster DNS, so "
            "code in the sandbox can resolve names but not connect anywhere."
        ),
    )


class Persistence(SpecModel):
    """The sandbox's persistent volume: where pause snapshots go and resume finds them."""

    enabled: bool = Field(
        default=True,
        description=(
            "Give each sandbox a PersistentVolumeClaim for its state snapshots. Without one a "
            "sandbox cannot be paused (its state would be lost): idleTimeoutSeconds does not "
            "apply, and mode Paused is refused with Degraded reason PersistenceDisabled. "
            "Default true."
        ),
    )
    storage_class_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="StorageClass of the claim; default: the cluster's default class.",
    )
    size: Quantity = Field(
        default="1Gi",
        description=(
            "Requested size of the claim. Two snapshots are kept (the newest and the one "
            "before), so allow about twice the workspace's sizeLimit. Default 1Gi."
        ),
    )


class PersistenceOverride(SpecModel):
    """Persistence fields one AgentSandbox sets differently from its template."""

    enabled: bool | None = Field(
        default=None, description="Whether this sandbox gets a persistent volume."
    )
    storage_class_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="StorageClass of this sandbox's claim.",
    )
    size: Quantity | None = Field(default=None, description="Requested size of the claim.")

    def apply_to(self, base: Persistence) -> Persistence:
        """The template's persistence with the fields set here replacing its own."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


_DAY = 86400


class Lifetime(SpecModel):
    """When a sandbox pauses, ends, and is cleaned up. 0 turns a limit off."""

    idle_timeout_seconds: int = Field(
        default=900,
        ge=0,
        le=30 * _DAY,
        description=(
            "Pause a Running sandbox after this long without a runtime call: its state is "
            "snapshotted and its pod freed, as with AgentSandbox spec.mode Paused. 0: never. "
            "Default 900 (15 minutes)."
        ),
    )
    max_lifetime_seconds: int = Field(
        default=_DAY,
        ge=0,
        le=365 * _DAY,
        description=(
            "End a sandbox this long after it was created, Running or Paused: its pod is "
            "deleted and it counts as finished. 0: no limit. Default 86400 (one day)."
        ),
    )
    ttl_seconds_after_finished: int = Field(
        default=3600,
        ge=0,
        le=30 * _DAY,
        description=(
            "Delete a finished sandbox (past maxLifetimeSeconds, or Failed) this long after it "
            "finished, with its volume; until then its status, snapshot and audit log can be "
            "read. 0: at once. Default 3600."
        ),
    )


class LifetimeOverride(SpecModel):
    """Lifetime fields one AgentSandbox sets differently from its template."""

    idle_timeout_seconds: int | None = Field(
        default=None, ge=0, le=30 * _DAY, description="Idle time before pausing; 0: never."
    )
    max_lifetime_seconds: int | None = Field(
        default=None, ge=0, le=365 * _DAY, description="Time from creation to the end; 0: none."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=30 * _DAY, description="Time a finished sandbox is kept."
    )

    def apply_to(self, base: Lifetime) -> Lifetime:
        """The template's lifetime with the fields set here replacing its own."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


TEMPLATE_KIND = KindInfo(
    kind="SandboxTemplate",
    plural="sandboxtemplates",
    singular="sandboxtemplate",
    short_names=["sbxt"],
    categories=["kleave", "kleave-sandbox"],
    description=(
        "SandboxTemplate fixes what an agent sandbox runs and how it is isolated: image, "
        "microVM runtime class, resource limits, egress allow-list, tool policy, persistence "
        "and lifetime. SandboxWarmPools and AgentSandboxes refer to it by name."
    ),
    printer_columns=[
        {
            "name": "IMAGE",
            "type": "string",
            "jsonPath": ".spec.image",
            "description": "The sandbox image.",
        },
        {
            "name": "RUNTIME",
            "type": "string",
            "jsonPath": ".spec.runtimeClassName",
            "description": "The RuntimeClass sandbox pods run under.",
        },
        {
            "name": "ACCEPTED",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Accepted")].status',
            "description": "Whether kleave can build sandboxes from the template.",
        },
        {
            "name": "HASH",
            "type": "string",
            "jsonPath": ".status.templateHash",
            "description": "Hash of the pod-shaping fields; warm pools roll when it changes.",
            "priority": 1,
        },
        {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    validations=[name_length_rule("template")],
)


class SandboxTemplateSpec(SpecModel):
    """The desired state of a SandboxTemplate."""

    image: str = Field(
        description=(
            "The sandbox container image. It must run kleave's in-sandbox runtime "
            "(kleave sandbox runtime) listening on runtimePort; pin it by digest for "
            "reproducible sandboxes."
        ),
        min_length=1,
        max_length=512,
        pattern=r"^\S+$",
    )
    command: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="The container's entrypoint; empty: the image's ENTRYPOINT.",
    )
    args: list[str] = Field(
        default_factory=list,
        max_length=128,
        description="Arguments to the entrypoint; empty: the image's CMD.",
    )
    runtime_class_name: str = Field(
        default=DEFAULT_RUNTIME_CLASS,
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description=(
            "RuntimeClass of the sandbox pods. Default kleave-microvm, the chart's Kata "
            "Containers class with the Firecracker hypervisor: each sandbox is its own microVM "
            "with its own kernel, so a container escape does not reach the node."
        ),
    )
    resources: SandboxResources = Field(
        default_factory=SandboxResources,
        json_schema_extra=DEFAULTED,
        description="CPU and memory requests and limits of the sandbox container.",
    )
    workspace: Workspace = Field(
        default_factory=Workspace,
        json_schema_extra=DEFAULTED,
        description="The writable workspace volume; the rest of the filesystem is read-only.",
    )
    egress: Egress = Field(
        default_factory=Egress,
        json_schema_extra=DEFAULTED,
        description="Network destinations the sandbox may reach; default: none but DNS.",
    )
    tools: ToolPolicy = Field(
        default_factory=ToolPolicy,
        json_schema_extra=DEFAULTED,
        description=(
            "The tool policy the in-sandbox runtime enforces on every call: tools, commands "
            "and paths allowed. Default: every tool, but exec runs no command and the file "
            "tools stay in the workspace."
        ),
    )
    persistence: Persistence = Field(
        default_factory=Persistence,
        json_schema_extra=DEFAULTED,
        description="Each sandbox's persistent volume for pause/resume snapshots.",
    )
    lifetime: Lifetime = Field(
        default_factory=Lifetime,
        json_schema_extra=DEFAULTED,
        description="Idle pause, maximum lifetime and clean-up of the template's sandboxes.",
    )
    env: list[EnvVar] = env_field(
        "Environment variables of the sandbox container. Names starting with KLEAVE_ are "
        "reserved. Never put credentials here: the agent can read its environment."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Node labels sandbox pods require, e.g. the nodes where the runtime class's "
            "handler is installed."
        ),
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=64,
        description="Taints sandbox pods tolerate (e.g. a dedicated sandbox node pool's).",
    )
    runtime_port: int = Field(
        default=DEFAULT_RUNTIME_PORT,
        ge=1,
        le=65535,
        description=(
            "The TCP port of the in-sandbox runtime's HTTP API (exec, files, snapshots, "
            "health); status.endpoint of each AgentSandbox points at it. Default 8080."
        ),
    )

    @field_validator("env")
    @classmethod
    def _reserved_env(cls, env: list[EnvVar]) -> list[EnvVar]:
        return check_reserved_env(env)


class SandboxTemplateStatus(StatusModel):
    """The observed state of a SandboxTemplate, written by kleave."""

    observed_generation: Int64 | None = Field(
        default=None,
        ge=0,
        description=(
            "The metadata.generation kleave last reconciled; when it lags, the latest spec "
            "change is not yet reflected in templateHash and conditions."
        ),
    )
    template_hash: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "Hash of the fields sandbox pods are built from. Warm pools replace their unclaimed "
            "pods when it changes; sandboxes already claimed keep running what they started "
            "with."
        ),
    )
    conditions: list[Condition] = conditions_field(
        "Current conditions, one per type: Accepted (sandboxes can be built from the "
        "template; False with reason RuntimeClassNotFound or InvalidPolicy says why not)."
    )


def crd() -> dict[str, Any]:
    """The SandboxTemplate CustomResourceDefinition."""
    return crd_for(TEMPLATE_KIND, SandboxTemplateSpec, SandboxTemplateStatus)
