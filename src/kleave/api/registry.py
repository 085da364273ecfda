"""Every CRD kleave installs, rendered to files, and the check that ``crds/`` matches them.

Kinds are generated from their models; kopf's peering CRDs come from ``kopf_peering``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kleave.api import (
    agent_sandbox,
    inference_deployment,
    inference_pool,
    kopf_peering,
    sandbox_template,
    sandbox_warm_pool,
)
from kleave.api.crd import to_yaml

CrdDict = dict[str, Any]

_GENERATORS: tuple[Callable[[], CrdDict], ...] = (
    inference_deployment.crd,
    inference_pool.crd,
    sandbox_template.crd,
    sandbox_warm_pool.crd,
    agent_sandbox.crd,
    kopf_peering.cluster_peering_crd,
    kopf_peering.namespaced_peering_crd,
)


def crd_filename(crd: CrdDict) -> str:
    """The file a CRD lives in: ``<group>_<plural>.yaml``, as controller-gen names them."""
    return f"{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml"


def generated_crds() -> dict[str, CrdDict]:
    """The CRDs generated from kleave's API models, by file name."""
    crds = (generate() for generate in _GENERATORS)
    return {crd_filename(crd): crd for crd in crds}


def all_crds() -> dict[str, CrdDict]:
    """Every CRD kleave installs, by file name, sorted by file name."""
    return dict(sorted(generated_crds().items()))


def render_crds() -> dict[str, str]:
    """Every CRD's YAML text, by file name."""
    return {name: to_yaml(crd) for name, crd in all_crds().items()}


def write_crds(directory: Path) -> list[Path]:
    """Make ``directory`` match :func:`render_crds` exactly; returns the rendered files' paths.

    Files whose content is already right are left untouched (no mtime churn), and files of a
    rendered CRD group that nothing renders any more are removed.
    """
    rendered = render_crds()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in _extra_files(directory, rendered):
        stale.unlink()
    paths = []
    for name, text in rendered.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    return paths


def crd_drift(directory: Path) -> list[str]:
    """What differs between ``directory`` and :func:`render_crds`, one line per file."""
    rendered = render_crds()
    problems = []
    for name, text in rendered.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path}: stale (differs from what src/kleave/api/ generates)")
    problems.extend(
        f"{path}: extra (nothing generates it any more)"
        for path in _extra_files(directory, rendered)
    )
    return problems


def _extra_files(directory: Path, rendered: dict[str, str]) -> list[Path]:
    """Files named like a rendered group's CRDs (``<group>_*.yaml``) that are not rendered."""
    if not directory.is_dir():
        return []
    groups = {name.split("_", 1)[0] for name in rendered if "_" in name}
    return sorted(
        path
        for group in groups
        for path in directory.glob(f"{group}_*.yaml")
        if path.name not in rendered
    )
