"""`kleave sandbox bench`: its statistics, its report, its manifests, and the snapshot part.

The snapshot/restore measurement runs for real here at 2 MB (a runtime in-process, its HTTP
API on 127.0.0.1); the cluster part needs a cluster with an operator and is run by hand (see
docs/sandbox-sdk.md).
"""

from __future__ import annotations

import asyncio
import json
import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from kleave.api.agent_sandbox import AgentSandboxSpec
from kleave.api.sandbox_template import SandboxTemplateSpec
from kleave.api.sandbox_warm_pool import SandboxWarmPoolSpec
from kleave.cli import main
from kleave.sandbox.bench import (
    BenchSettings,
    parse_toleration,
    pool_failure,
    pool_manifest,
    pool_ready,
    template_manifest,
)
from kleave.sandbox.bench_snapshot import SIZE_CYCLE, file_sizes, fill_workspace, measure_snapshot
from kleave.sandbox.bench_stats import (
    MB,
    BatchResult,
    BenchReport,
    SnapshotResult,
    percentile,
    render_markdown,
    summarize,
    warm_speedup,
)
from kleave.sandbox.client_kube import sandbox_manifest


# ----- statistics -----------------------------------------------------------------------------
def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([10.0], 0.99) == 10.0
    assert percentile([1.0, 2.0], 0.0) == 1.0 and percentile([1.0, 2.0], 1.0) == 2.0
    ordered = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(ordered, 0.9) == pytest.approx(90.1)
    assert percentile(ordered, 0.99) == pytest.approx(99.01)


def test_percentiles_agree_with_numpy() -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 7, 20, 100, 1001):
        values = sorted(rng.lognormvariate(3, 1) for _ in range(n))
        for q in (0.0, 0.5, 0.9, 0.99, 1.0):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))


def test_bad_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 1.5)
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_summarize() -> None:
    stats = summarize([30.0, 10.0, 20.0, 40.0])  # unsorted on purpose
    assert (stats.n, stats.min, stats.max, stats.mean) == (4, 10.0, 40.0, 25.0)
    assert stats.p50 == 25.0 and stats.p90 == pytest.approx(37.0)
    assert stats.p99 == pytest.approx(39.7)


# ----- report ---------------------------------------------------------------------------------
def _batch(expected: str, client_ms: list[float], sources: dict[str, int]) -> BatchResult:
    return BatchResult(
        expected.lower(),
        expected,
        claims=sum(sources.values()),
        wall_seconds=0.5,
        client_ms=client_ms,
        operator_ms=[v / 2 for v in client_ms],
        sources=sources,
    )


def test_the_report_compares_warm_with_cold_and_flags_wrong_sources() -> None:
    warm = _batch("Warm", [40.0, 50.0, 60.0, 70.0], {"Warm": 4})
    cold = _batch("Cold", [900.0, 1000.0], {"Cold": 2})
    snapshot = SnapshotResult(100 * MB, 500, 101 * MB, snapshot_seconds=0.5, restore_seconds=0.25)
    report = BenchReport({"warm pool": 4}, warm=warm, cold=cold, snapshot=snapshot)
    assert report.ok and warm.claims_per_second == 8.0
    assert warm_speedup(report) == pytest.approx(950.0 / 55.0)
    assert (snapshot.snapshot_mb_per_s, snapshot.restore_mb_per_s) == (200.0, 400.0)

    text = render_markdown(report)
    assert "| warm: create → Ready (SDK) | 4 | 4/4 Warm | 55.0 | 67.0 |" in text
    assert "| cold: create → Ready (SDK) | 2 | 2/2 Cold | 950 |" in text
    assert "claim.latencyMs (operator)" in text
    assert "Cold p50 / warm p50 (SDK): **17.27x** (batches of 4 warm and 2 cold" in text
    assert "| snapshot (POST /v1/snapshot) | 100.0 | 500 | 101.0 | 0.500 | 200.0 |" in text
    assert "| restore (POST /v1/restore) | 100.0 | 500 | 101.0 | 0.250 | 400.0 |" in text

    data = json.loads(json.dumps(report.to_dict()))
    assert data["warm"]["clientMs"]["p50"] == 55.0 and data["warm"]["sources"] == {"Warm": 4}
    assert data["snapshot"]["restoreMBps"] == 400.0 and data["ok"] is True

    # A "warm" batch that got a cold start, and one that failed, make the run not ok.
    mixed = _batch("Warm", [40.0, 900.0], {"Warm": 1, "Cold": 1})
    mixed.claims += 1
    mixed.failures.append("timed out after 600s waiting for sandbox sbx-x to be Ready")
    flagged = BenchReport({}, warm=mixed)
    assert not flagged.ok
    text = render_markdown(flagged)
    assert "1/3 Warm (1 Cold)" in text and "1 warm claims failed" in text


# ----- manifests ------------------------------------------------------------------------------
def test_tolerations_parse_like_kubectl_taints() -> None:
    assert parse_toleration("kleave.dev/local-node") == {
        "key": "kleave.dev/local-node",
        "operator": "Exists",
    }
    assert parse_toleration("kleave.dev/local-node=true:NoSchedule") == {
        "key": "kleave.dev/local-node",
        "operator": "Equal",
        "value": "true",
        "effect": "NoSchedule",
    }
    assert parse_toleration("gpu:NoExecute")["effect"] == "NoExecute"
    with pytest.raises(ValueError, match="no key"):
        parse_toleration("=x")


def test_the_manifests_are_valid_for_the_api() -> None:
    settings = BenchSettings(
        node_selector={"kleave.dev/local-node": "true"},
        tolerations=("kleave.dev/local-node",),
        runtime_port=18080,
        runtime_class="kleave-microvm",
    )
    labels = {"kleave.dev/bench-run": "abc123"}
    template = template_manifest("bench-abc123", settings, labels)
    spec = SandboxTemplateSpec.model_validate(template["spec"])
    assert spec.runtime_port == 18080 and spec.node_selector == {"kleave.dev/local-node": "true"}
    assert spec.lifetime.idle_timeout_seconds == 0  # no idle pause in the middle of a run
    assert template["metadata"]["labels"] == labels
    pool = pool_manifest("bench-abc123", "bench-abc123", 100, "kleave-bench", labels)
    assert SandboxWarmPoolSpec.model_validate(pool["spec"]).replicas == 100
    claim = sandbox_manifest("kleave-bench", warm_pool="bench-abc123", labels=labels)
    assert AgentSandboxSpec.model_validate(claim["spec"]).warm_pool_ref is not None
    assert BenchSettings(claims=100).cold_count == 20 and BenchSettings(claims=5).cold_count == 5


def test_pool_goal_and_failure() -> None:
    def pool(ready: int, generation: int = 1, observed: int = 1, **degraded: str) -> Any:
        conditions = [{"type": "Degraded", "status": "True", **degraded}] if degraded else []
        return {
            "metadata": {"name": "p", "generation": generation},
            "status": {
                "readyReplicas": ready,
                "observedGeneration": observed,
                "conditions": conditions,
            },
        }

    goal = pool_ready(3)
    assert goal(pool(3)) and not goal(pool(2)) and not goal(pool(3, generation=2))
    assert goal(pool(0)) is False and pool_ready(0)(pool(0))
    assert pool_failure(pool(0, reason="TemplateNotAccepted", message="RuntimeClassNotFound"))
    assert pool_failure(pool(0, reason="Unschedulable")) is None  # may still resolve


# ----- snapshot workspace and measurement -----------------------------------------------------
def test_file_sizes_mix_small_and_large_and_add_up_exactly() -> None:
    sizes = list(file_sizes(100 * MB))
    assert sum(sizes) == 100 * MB
    assert len(set(sizes)) >= len(set(SIZE_CYCLE))
    assert min(sizes) <= 4096 and max(sizes) >= 8 << 20
    assert sum(file_sizes(2 * MB)) == 2 * MB and list(file_sizes(0)) == []


def test_the_workspace_is_random_so_compression_cannot_cheat(tmp_path: Path) -> None:
    files = fill_workspace(tmp_path, 300_000)
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == files > 10
    data = b"".join(p.read_bytes() for p in written)
    assert len(data) == 300_000
    assert len(zlib.compress(data, 9)) > 0.99 * len(data)


def test_snapshot_and_restore_throughput_at_2_mb(tmp_path: Path) -> None:
    result = asyncio.run(measure_snapshot(tmp_path, 2 * MB))
    assert result.workspace_bytes == 2 * MB and result.files > 10
    assert result.archive_bytes > 2 * MB  # random bytes plus tar headers and the manifest
    assert result.snapshot_seconds > 0 and result.restore_seconds > 0
    assert result.snapshot_mb_per_s > 0 and result.restore_mb_per_s > 0
    restored = sum(p.stat().st_size for p in (tmp_path / "workspace").rglob("*.bin"))
    assert restored == 2 * MB  # the files deleted before the restore are back


def test_the_command_runs_without_a_cluster() -> None:
    result = CliRunner().invoke(
        main, ["sandbox", "bench", "--skip-cluster", "--snapshot-mb", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["warm"] is None and report["snapshot"]["workspaceBytes"] == MB
    markdown = CliRunner().invoke(
        main, ["sandbox", "bench", "--skip-cluster", "--snapshot-mb", "1"]
    )
    assert markdown.exit_code == 0 and "| restore (POST /v1/restore) | 1.0 |" in markdown.stdout
