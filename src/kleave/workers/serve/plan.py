"""Read the serving plan (operator/serving_plan.py) and resolve what one process needs from it.

In a cluster the plan is the ConfigMap mounted at /etc/kleave/plan/plan.json: a pool's address
is its headless Service's URL, whose DNS name resolves to one A record per ready pod, so the
router and the attention workers find individual workers by resolving it. `kleave workers up`
writes the same document in a local form, where each pool also lists its workers' URLs
(``urls``) on 127.0.0.1, because there is no DNS to resolve them.

Builtin workers serve bundled model shapes (workers/config.py MODEL_PRESETS). The plan's
``model`` names one (``tiny``, or ``kleave/tiny``), or a ``modelPreset`` key picks one for a
Hugging Face id such as the examples' ``deepseek-ai/DeepSeek-V3``. Every process of a plan must
build identical weights, so the seed travels in the plan too (``weights.seed``, default 0).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from kleave.operator import engines
from kleave.workers.config import MODEL_PRESETS, ModelConfig

# The pools of each topology as the operator builds them (Colocated's one pool is called
# ``decode`` and serves both phases); one definition, so workers and operator cannot disagree.
TOPOLOGY_ROLES: Mapping[str, tuple[str, ...]] = {
    str(topology): tuple(roles) for topology, roles in engines.TOPOLOGY_ROLES.items()
}
SERVER_ROLES = ("colocated", "prefill", "decode", "attention", "ffn")


class PlanError(ValueError):
    """A plan this process cannot run; the message names the plan key or option to fix."""


@dataclass(frozen=True)
class PoolRef:
    """Where one pool's workers answer: explicit URLs (local form) or a Service to resolve."""

    role: str
    url: str
    urls: tuple[str, ...] = ()

    async def resolve(self) -> list[str]:
        """The workers' base URLs now: the listed ones, else one per A record of the URL's host.

        A headless Service's name resolves to every ready pod's IP; a normal host name or an IP
        resolves to itself, so a single-worker pool needs no DNS magic.
        """
        if self.urls:
            return list(self.urls)
        parts = urlsplit(self.url)
        if not parts.hostname:
            raise PlanError(f"pools.{self.role}.url {self.url!r} has no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            parts.hostname, port, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
        addresses = sorted({str(info[4][0]) for info in infos})
        return [urlunsplit((parts.scheme, f"{ip}:{port}", "", "", "")) for ip in addresses]


@dataclass(frozen=True)
class ServingPlan:
    """The parts of a plan document the builtin workers and router act on."""

    topology: str
    model: str  # the name clients send in OpenAI requests
    preset: str
    config: ModelConfig
    seed: int
    revision: str
    pools: Mapping[str, PoolRef]
    router_url: str | None
    kv_backend: str
    source: str  # where it was read from, for error messages

    def server_role(self, role: str) -> str:
        """The server to run for a pool role; Colocated's ``decode`` pool runs ``colocated``."""
        if role not in SERVER_ROLES:
            raise PlanError(f"--role must be one of {', '.join(SERVER_ROLES)}, not {role!r}")
        if self.topology == "Colocated" and role in ("decode", "colocated"):
            return "colocated"
        if role == "colocated":
            raise PlanError(
                f"--role colocated needs topology Colocated; {self.source} has {self.topology}"
            )
        if role not in self.pools:
            raise PlanError(
                f"--role {role} is not a pool of {self.source} (topology {self.topology} runs "
                f"{', '.join(TOPOLOGY_ROLES[self.topology])})"
            )
        return role

    @property
    def decode_role(self) -> str:
        """The pool that holds KV and streams tokens: decode, or attention in PDAF."""
        return "attention" if self.topology == "PDAF" else "decode"

    def pool(self, role: str) -> PoolRef:
        try:
            return self.pools[role]
        except KeyError:
            raise PlanError(
                f"{self.source} has no pools.{role} (topology {self.topology})"
            ) from None


def load_plan(
    path: str | Path, *, preset: str | None = None, seed: int | None = None
) -> ServingPlan:
    """Read a plan file (JSON, or YAML for hand-written local plans); `preset`/`seed` override."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise PlanError(f"cannot read the serving plan {source}: {error.strerror}") from error
    try:
        document = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise PlanError(
            f"{source} is not valid {'JSON' if source.endswith('.json') else 'YAML'}: {error}"
        ) from error
    return parse_plan(document, source=source, preset=preset, seed=seed)


def parse_plan(
    document: Any, *, source: str = "the plan", preset: str | None = None, seed: int | None = None
) -> ServingPlan:
    """Validate a plan document and resolve the model preset and every pool's address."""
    if not isinstance(document, Mapping):
        raise PlanError(f"{source} must be a mapping (a ServingPlan document)")
    kind = document.get("kind", "ServingPlan")
    if kind != "ServingPlan":
        raise PlanError(f"{source}: kind must be ServingPlan, not {kind!r}")
    engine = document.get("engine", "builtin")
    if engine != "builtin":
        raise PlanError(f"{source}: engine is {engine!r}; kleave workers serve only engine builtin")
    topology = _required_str(document, "topology", source)
    if topology not in TOPOLOGY_ROLES:
        raise PlanError(
            f"{source}: topology must be one of {', '.join(TOPOLOGY_ROLES)}, not {topology!r}"
        )
    model = _required_str(document, "model", source)
    name = preset or document.get("modelPreset") or _preset_of(model)
    if name not in MODEL_PRESETS:
        raise PlanError(
            f"{source}: model {model!r} is not a bundled model of the builtin engine "
            f"({', '.join(MODEL_PRESETS)}); set modelPreset in the plan or pass --model-preset"
        )
    config = MODEL_PRESETS[name]
    if "modelConfig" in document:
        try:
            config = ModelConfig.from_dict(dict(document["modelConfig"]))
        except (TypeError, ValueError) as error:
            raise PlanError(f"{source}: modelConfig: {error}") from error
    weights = document.get("weights") or {}
    plan_seed = weights.get("seed", 0) if isinstance(weights, Mapping) else 0
    if not isinstance(plan_seed, int):
        raise PlanError(f"{source}: weights.seed must be an integer, not {plan_seed!r}")
    pools = _pools(document, topology, source)
    router = document.get("router")
    router_url = router.get("url") if isinstance(router, Mapping) else None
    kv = document.get("kvTransfer")
    return ServingPlan(
        topology=topology,
        model=model,
        preset=str(name),
        config=config,
        seed=seed if seed is not None else plan_seed,
        revision=str(document.get("revision", "local")),
        pools=pools,
        router_url=str(router_url) if router_url else None,
        kv_backend=str(kv.get("backend", "tcp")) if isinstance(kv, Mapping) else "tcp",
        source=source,
    )


def local_plan(
    *,
    topology: str,
    model: str,
    pools: Mapping[str, Sequence[str]],
    router_url: str,
    seed: int = 0,
) -> dict[str, Any]:
    """The local form `kleave workers up` writes: the operator's layout plus explicit URLs."""
    if topology not in TOPOLOGY_ROLES:
        raise PlanError(f"--topology must be one of {', '.join(TOPOLOGY_ROLES)}, not {topology!r}")
    missing = [role for role in TOPOLOGY_ROLES[topology] if not pools.get(role)]
    if missing:
        raise PlanError(f"topology {topology} needs workers for {', '.join(missing)}")
    return {
        "apiVersion": "kleave.dev/v1alpha1",
        "kind": "ServingPlan",
        "deployment": "local",
        "namespace": "local",
        "revision": "local",
        "model": model,
        "engine": "builtin",
        "topology": topology,
        "kvTransfer": {"backend": "tcp"},
        "weights": {"seed": seed},
        "pools": {
            role: {"url": urls[0], "urls": list(urls)}
            for role, urls in pools.items()
            if role in TOPOLOGY_ROLES[topology]
        },
        "router": {"url": router_url},
    }


def _preset_of(model: str) -> str:
    """``tiny`` and ``kleave/tiny`` both name the bundled ``tiny``."""
    return model.removeprefix("kleave/")


def _required_str(document: Mapping[str, Any], key: str, source: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value:
        raise PlanError(f"{source}: {key} must be a non-empty string")
    return value


def _pools(document: Mapping[str, Any], topology: str, source: str) -> dict[str, PoolRef]:
    raw = document.get("pools")
    if not isinstance(raw, Mapping):
        raise PlanError(f"{source}: pools must be a mapping of role to pool")
    pools: dict[str, PoolRef] = {}
    for role in TOPOLOGY_ROLES[topology]:
        entry = raw.get(role)
        if not isinstance(entry, Mapping):
            raise PlanError(f"{source}: topology {topology} needs pools.{role}")
        urls = entry.get("urls") or ()
        if not isinstance(urls, Sequence) or isinstance(urls, str):
            raise PlanError(f"{source}: pools.{role}.urls must be a list of URLs")
        url = entry.get("url") or (urls[0] if urls else None)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise PlanError(f"{source}: pools.{role}.url must be an http(s) URL, not {url!r}")
        pools[role] = PoolRef(role, url.rstrip("/"), tuple(str(u).rstrip("/") for u in urls))
    return pools
