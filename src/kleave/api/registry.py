"""Every CRD kleave installs, rendered to files, and the check that ``crds/`` matches them.

Kinds are generated from their models; other packages may add CRDs they do not model (kopf's
peering CRDs) with :func:`register_static_crd`, so ``kleave crds generate`` writes them all.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kleave.api import inference_deployment
from kleave.api.crd import to_yaml

CrdDict = dict[str, Any]

_GENERATORS: tuple[Callable[[], CrdDict], ...] = (inference_deployment.crd,)
_static_crds: dict[str, CrdDict] = {}


def crd_filename(crd: CrdDict) -> str:
    """The file a CRD lives in: ``<group>_<plural>.yaml``, as controller-gen names them."""
    return f"{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml"


def generated_crds() -> dict[str, CrdDict]:
    """The CRDs generated from kleave's API models, by file name."""
    crds = (generate() for generate in _GENERATORS)
    return {crd_filename(crd): crd for crd in crds}


def register_static_crd(filename: str, crd: CrdDict) -> None:
    """Add a hand-written CRD to the rendered set; registering the same one again is a no-op."""
    if "/" in filename or "\\" in filename or not filename.endswith(".yaml"):
        raise ValueError(f"static CRD file name must be a bare *.yaml name, got {filename!r}")
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{filename}: not a CustomResourceDefinition (kind={crd.get('kind')!r})")
    if filename in generated_crds():
        raise ValueError(f"{filename}: a kleave kind already generates this file")
    if filename in _static_crds and _static_crds[filename] != crd:
        raise ValueError(f"{filename}: a different CRD is already registered under this name")
    _static_crds[filename] = copy.deepcopy(crd)


def all_crds() -> dict[str, CrdDict]:
    """Generated and registered CRDs, by file name, sorted by file name."""
    crds = generated_crds() | copy.deepcopy(_static_crds)
    return dict(sorted(crds.items()))


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
