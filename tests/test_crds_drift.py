"""The checked-in crds/ directory matches what src/kleave/api/ generates."""

from __future__ import annotations

import os
from pathlib import Path

from kleave.api import registry
from kleave.api.crd import YAML_HEADER

CRDS_DIR = Path(__file__).resolve().parents[1] / "crds"
ID_FILE = "kleave.dev_inferencedeployments.yaml"


def test_checked_in_crds_match_the_api_models() -> None:
    drift = registry.crd_drift(CRDS_DIR)
    assert not drift, (
        "crds/ is out of date with src/kleave/api/:\n  "
        + "\n  ".join(drift)
        + "\nRun `kleave crds generate` and commit the result."
    )


def test_render_names_files_by_group_and_plural() -> None:
    rendered = registry.render_crds()
    assert ID_FILE in rendered
    assert all(text.startswith(YAML_HEADER) for text in rendered.values())


def test_drift_reports_missing_stale_and_extra_files(tmp_path: Path) -> None:
    assert registry.crd_drift(tmp_path) == [
        f"{tmp_path / name}: missing" for name in sorted(registry.render_crds())
    ]
    registry.write_crds(tmp_path)
    assert registry.crd_drift(tmp_path) == []
    (tmp_path / ID_FILE).write_text("edited by hand\n")
    (tmp_path / "kleave.dev_oldkinds.yaml").write_text("renamed long ago\n")
    (tmp_path / "unrelated.yaml").write_text("not ours\n")
    assert registry.crd_drift(tmp_path) == [
        f"{tmp_path / ID_FILE}: stale (differs from what src/kleave/api/ generates)",
        f"{tmp_path / 'kleave.dev_oldkinds.yaml'}: extra (nothing generates it any more)",
    ]


def test_write_crds_converges_and_leaves_current_files_alone(tmp_path: Path) -> None:
    (tmp_path / "kleave.dev_oldkinds.yaml").write_text("renamed long ago\n")
    (tmp_path / "unrelated.yaml").write_text("not ours\n")
    written = registry.write_crds(tmp_path)
    generated = sorted(registry.render_crds())
    assert written == [tmp_path / name for name in generated]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*generated, "unrelated.yaml"])
    os.utime(written[0], (0, 0))
    registry.write_crds(tmp_path)
    assert written[0].stat().st_mtime == 0
    assert registry.crd_drift(tmp_path) == []
