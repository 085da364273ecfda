"""AgentSandbox (``asbx``): one agent's isolated sandbox, claimed from a warm pool or cold-started.

The user's half of a sandbox: which template (directly, or through a warm pool of it), whether
it should be running or paused, and the few things a sandbox may set for itself (shorter or
longer lifetimes, its volume, extra environment). Isolation stays the template's. Status says
where the sandbox runs, how it was obtained and how long that took, its last snapshot, and the
audit-log head the operator anchored, so tampering with the in-sandbox log is detectable from
outside it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from kleave.api.common import (
    Condition,
    Int64,
    KindInfo,
    SpecModel,
    StatusModel,
    Timestamp,
    conditions_field,
)
from kleave.api.crd import crd_for
from kleave.api.sandbox_template import (
    EnvVar,
    LifetimeOverride,
    ObjectRef,
    PersistenceOverride,
    check_reserved_env,
    env_field,
    immutable,
    name_length_rule,
)

Mode = Literal["Running", "Paused"]
Phase = Literal[
    "Pending", "Starting", "Ready", "Pausing", "Paused", "Resuming", "Terminating", "Failed"
]
PHASES: tuple[Phase, ...] = (
    "Pending",
    "Starting",
    "Ready",
    "Pausing",
    "Paused",
    "Resuming",
    "Terminating",
    "Failed",
)
ClaimSource = Literal["Warm", "Cold", "Resume"]

_NEW_SANDBOX = "create a new AgentSandbox instead"


def _spec_rules() -> list[Any]:
    return [
        {
            "rule": "has(self.templateRef) != has(self.warmPoolRef)",
            "message": "set exactly one of spec.templateRef or spec.warmPoolRef",
        },
        {
            # Field-level rules only compare values present on both sides; this one stops a
            # sandbox from switching between a template and a pool by dropping one ref.
            "rule": "has(self.templateRef) == has(oldSelf.templateRef) && "
            "has(self.warmPoolRef) == has(oldSelf.warmPoolRef)",
            "message": (
                "spec.templateRef and spec.warmPoolRef are immutable: a sandbox cannot switch "
                f"between a template and a warm pool; {_NEW_SANDBOX}"
            ),
        },
        {
            "rule": "has(self.persistence) == has(oldSelf.persistence)",
            "message": (
                "spec.persistence is immutable: the sandbox's volume is created with it; "
                f"{_NEW_SANDBOX}"
            ),
            "fieldPath": ".persistence",
        },
        {
            "rule": "self.mode != 'Paused' || !has(self.persistence) || "
            "!has(self.persistence.enabled) || self.persistence.enabled",
            "message": (
                "spec.mode Paused needs persistence: with spec.persistence.enabled false the "
                "sandbox's state would be lost; delete the sandbox instead"
            ),
            "fieldPath": ".mode",
        },
    ]


KIND = KindInfo(
    kind="AgentSandbox",
    plural="agentsandboxes",
    singular="agentsandbox",
    short_names=["asbx"],
    categories=["kleave", "kleave-sandbox"],
    description=(
        "AgentSandbox is one agent's isolated sandbox: a microVM pod built from a "
        "SandboxTemplate, adopted from a SandboxWarmPool when one is named and has a ready "
        "sandbox, cold-started otherwise. Set spec.mode to Paused to snapshot it and free "
        "its pod, and back to Running to resume it."
    ),
    printer_columns=[
        {
            "name": "MODE",
            "type": "string",
            "jsonPath": ".spec.mode",
            "description": "The desired mode: Running or Paused.",
        },
        {
            "name": "PHASE",
            "type": "string",
            "jsonPath": ".status.phase",
            "description": "Where the sandbox is in its lifecycle.",
        },
        {
            "name": "POD",
            "type": "string",
            "jsonPath": ".status.podName",
            "description": "The pod the sandbox runs in.",
        },
        {
            "name": "SOURCE",
            "type": "string",
            "jsonPath": ".status.claim.source",
            "description": "How the pod was obtained: Warm, Cold or Resume.",
        },
        {
            "name": "LATENCY(MS)",
            "type": "integer",
            "jsonPath": ".status.claim.latencyMs",
            "description": "Milliseconds from create (or resume) to Ready.",
        },
        {
            "name": "ENDPOINT",
            "type": "string",
            "jsonPath": ".status.endpoint",
            "description": "The in-sandbox runtime's address.",
            "priority": 1,
        },
        {
            "name": "EXPIRES",
            "type": "string",  # a future time: kubectl shows "date" columns as an age
            "jsonPath": ".status.expiresAt",
            "description": "When maxLifetimeSeconds ends the sandbox.",
            "priority": 1,
        },
        {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    validations=[name_length_rule("sandbox")],
)


class AgentSandboxSpec(SpecModel):
    """The desired state of an AgentSandbox."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _spec_rules()})

    template_ref: ObjectRef | None = Field(
        default=None,
        description=(
            "The SandboxTemplate to cold-start from (no warm pool). Set exactly one of "
            "templateRef and warmPoolRef. Immutable."
        ),
        json_schema_extra=immutable("templateRef", _NEW_SANDBOX),
    )
    warm_pool_ref: ObjectRef | None = Field(
        default=None,
        description=(
            "The SandboxWarmPool to adopt a ready sandbox from; when it has none ready the "
            "sandbox cold-starts from the pool's template. Set exactly one of templateRef "
            "and warmPoolRef. Immutable."
        ),
        json_schema_extra=immutable("warmPoolRef", _NEW_SANDBOX),
    )
    mode: Mode = Field(
        default="Running",
        description=(
            "Running (default): keep the sandbox running, resuming it if paused. Paused: "
            "snapshot its state to its persistent volume and free its pod; setting Running "
            "again restores the snapshot into a fresh pod. An idle timeout pauses the sandbox "
            "without changing this field: status.phase shows Paused, and the Paused "
            "condition's reason is IdleTimeout."
        ),
    )
    lifetime: LifetimeOverride | None = Field(
        default=None,
        description=(
            "Lifetime fields that replace the template's for this sandbox; unset fields keep "
            "the template's."
        ),
    )
    persistence: PersistenceOverride | None = Field(
        default=None,
        description=(
            "Persistence fields that replace the template's for this sandbox; unset fields "
            "keep the template's. Immutable."
        ),
        json_schema_extra=immutable(
            "persistence", f"the sandbox's volume is created with it; {_NEW_SANDBOX}"
        ),
    )
    env: list[EnvVar] = env_field(
        "Environment variables added to the template's; a name the template already sets "
        "keeps the template's value. Names starting with KLEAVE_ are reserved."
    )

    @field_validator("env")
    @classmethod
    def _reserved_env(cls, env: list[EnvVar]) -> list[EnvVar]:
        return check_reserved_env(env)

    @model_validator(mode="after")
    def _one_source(self) -> AgentSandboxSpec:
        """Mirror the create-time CEL rules, for specs parsed outside the API server."""
        if (self.template_ref is None) == (self.warm_pool_ref is None):
            raise ValueError("set exactly one of spec.templateRef or spec.warmPoolRef")
        if self.mode == "Paused" and self.persistence and self.persistence.enabled is False:
            raise ValueError("spec.mode Paused needs persistence enabled")
        return self


def merged_env(template_env: list[EnvVar], additions: list[EnvVar]) -> list[EnvVar]:
    """The sandbox's environment: the template's, then additions whose names it does not set.

    The template's values win because the template is the admin's policy (a proxy setting, a
    feature flag); a sandbox may add variables but not change those.
    """
    taken = {e.name for e in template_env}
    return [*template_env, *(e for e in additions if e.name not in taken)]


class ClaimStatus(StatusModel):
    """How the sandbox's current pod was obtained, and how long it took."""

    source: ClaimSource = Field(
        description=(
            "Warm: adopted from the warm pool's ready sandboxes. Cold: the pool had none "
            "ready (or no pool was named), so a pod was started. Resume: a paused sandbox's "
            "snapshot was restored into a fresh pod."
        ),
    )
    latency_ms: Int64 | None = Field(
        default=None,
        ge=0,
        description=(
            "Milliseconds from the AgentSandbox's creation (for Resume: from the request to "
            "resume) to Ready: what the agent waited."
        ),
    )
    claimed_at: Timestamp = Field(
        default=None, description="When the pod was bound to this sandbox (RFC 3339)."
    )


class SnapshotStatus(StatusModel):
    """The sandbox's latest verified state snapshot on its persistent volume."""

    generation: Int64 = Field(
        ge=0, description="The snapshot's generation number (one more per pause)."
    )
    name: str | None = Field(
        default=None,
        max_length=253,
        description="The snapshot's file name on the volume, e.g. snap-00000003.tar.",
    )
    size_bytes: Int64 | None = Field(
        default=None, ge=0, description="Size of the snapshot file in bytes."
    )
    checksum: str | None = Field(
        default=None,
        max_length=128,
        description=(
            "The snapshot's SHA-256 (hex) as the runtime recorded it in the archive's "
            "CHECKSUM; resume refuses a snapshot that no longer matches it."
        ),
    )
    taken_at: Timestamp = Field(default=None, description="When the snapshot was written.")


class AuditHeadStatus(StatusModel):
    """The last in-sandbox audit entry the operator has read and recorded outside the sandbox."""

    seq: Int64 = Field(ge=0, description="The entry's sequence number (0: an empty log).")
    hash: str = Field(
        max_length=128,
        description=(
            "The entry's chained SHA-256 hash (hex). A log whose entry at seq has another hash "
            "was rewritten."
        ),
    )


class AgentSandboxStatus(StatusModel):
    """The observed state of an AgentSandbox, written by kleave."""

    observed_generation: Int64 | None = Field(
        default=None, ge=0, description="The metadata.generation kleave last reconciled."
    )
    phase: Phase = Field(
        default="Pending",
        description=(
            "Pending (waiting for a pod: template or pool missing, or unschedulable), "
            "Starting (a pod is starting or being adopted), Ready (the runtime answers at "
            "endpoint), Pausing (snapshotting before the pod is freed), Paused (no pod; state "
            "in the snapshot), Resuming (restoring the snapshot into a fresh pod), Terminating "
            "(past its lifetime, or being deleted), Failed (cannot run; see the Degraded "
            "condition)."
        ),
    )
    pod_name: str | None = Field(
        default=None, max_length=253, description="The pod the sandbox runs in; none when Paused."
    )
    template_hash: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "The template hash the sandbox's pod was built from; template changes do not "
            "touch a claimed sandbox."
        ),
    )
    claim: ClaimStatus | None = Field(
        default=None, description="How the current pod was obtained and how long it took."
    )
    endpoint: str | None = Field(
        default=None,
        max_length=1024,
        description=(
            "Address of the in-sandbox runtime's HTTP API: the pod IP and the template's "
            "runtimePort (10.1.2.3:8080), or a URL."
        ),
    )
    snapshot: SnapshotStatus | None = Field(
        default=None, description="The latest snapshot, written at the last pause."
    )
    audit_head: AuditHeadStatus | None = Field(
        default=None,
        description=(
            "The last audit-log entry the operator anchored here; the log must still contain "
            "it, unchanged, on every later read and after resume."
        ),
    )
    last_activity_time: Timestamp = Field(
        default=None,
        description="The last runtime call seen; idleTimeoutSeconds counts from it.",
    )
    volume_claim_name: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "The PersistentVolumeClaim holding the sandbox's snapshots (owned by the "
            "sandbox, deleted with it); none without persistence."
        ),
    )
    token_secret_name: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "The Secret (key token) holding the bearer token of the sandbox's current pod "
            "(<pod>-runtime-token, owned by the pod): every runtime call but /healthz needs "
            "it. It changes with the pod (resume)."
        ),
    )
    idle_paused_at: Timestamp = Field(
        default=None,
        description=(
            "When idleTimeoutSeconds paused the sandbox (spec.mode stays Running). It stays "
            "paused until the annotation kleave.dev/resume-requested is set to a new value "
            "(the SDK's resume() does that) or spec.mode goes Paused and back to Running."
        ),
    )
    resume_request: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "The value of the kleave.dev/resume-requested annotation last acted on: a new "
            "value resumes an idle-paused sandbox."
        ),
    )
    expires_at: Timestamp = Field(
        default=None,
        description="When maxLifetimeSeconds ends the sandbox; none without a limit.",
    )
    conditions: list[Condition] = conditions_field(
        "Current conditions, one per type: Ready (the runtime answers at endpoint), Paused "
        "(state is in the snapshot and no pod runs; reason Requested or IdleTimeout), "
        "Degraded (why not as asked: TemplateNotFound, WarmPoolNotFound, "
        "PersistenceDisabled, SnapshotFailed, RestoreFailed, AuditVerificationFailed, "
        "Unschedulable)."
    )


def crd() -> dict[str, Any]:
    """The AgentSandbox CustomResourceDefinition."""
    return crd_for(KIND, AgentSandboxSpec, AgentSandboxStatus)
