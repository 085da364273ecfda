"""The sandbox benchmark's numbers: percentiles, per-batch results and the report it prints.

Pure code (no I/O), so the statistics are unit-tested on their own and the report reads the
same whether it comes from a 2 MB test run or a 100-sandbox cluster run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MB = 1_000_000
"""Megabytes are decimal here, as in every throughput figure a disk or network vendor quotes."""


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one latency sample, in the sample's unit (milliseconds in the bench)."""

    n: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float
    min: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
            "mean": self.mean,
            "min": self.min,
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of sorted values, interpolating linearly between ranks.

    The same definition as numpy's default (``method="linear"``), so the numbers compare with
    anyone else's analysis of the same sample; nearest-rank would jump between samples at the
    small counts a cold batch has.
    """
    if not ordered:
        raise ValueError("no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside 0..1")
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summarize(values: Sequence[float]) -> LatencyStats:
    """p50/p90/p99/max/mean/min of a non-empty sample."""
    if not values:
        raise ValueError("cannot summarize an empty sample")
    ordered = sorted(float(v) for v in values)
    return LatencyStats(
        n=len(ordered),
        p50=percentile(ordered, 0.50),
        p90=percentile(ordered, 0.90),
        p99=percentile(ordered, 0.99),
        max=ordered[-1],
        mean=math.fsum(ordered) / len(ordered),
        min=ordered[0],
    )


@dataclass
class BatchResult:
    """One batch of concurrent claims (warm or cold) as the bench observed it."""

    label: str
    expected_source: str
    claims: int
    wall_seconds: float
    client_ms: list[float] = field(default_factory=list)
    """Create call to Ready, as the SDK saw it (POST, then the watch event)."""
    operator_ms: list[float] = field(default_factory=list)
    """``status.claim.latencyMs``: the operator's own measure, creation to Ready."""
    sources: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def claims_per_second(self) -> float:
        return self.claims / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def as_expected(self) -> int:
        return self.sources.get(self.expected_source, 0)

    @property
    def ok(self) -> bool:
        return not self.failures and self.as_expected == self.claims

    def to_dict(self) -> dict[str, Any]:
        return {
            "claims": self.claims,
            "expectedSource": self.expected_source,
            "sources": dict(self.sources),
            "wallSeconds": self.wall_seconds,
            "claimsPerSecond": self.claims_per_second,
            "clientMs": summarize(self.client_ms).to_dict() if self.client_ms else None,
            "operatorMs": summarize(self.operator_ms).to_dict() if self.operator_ms else None,
            "failures": list(self.failures),
        }


@dataclass(frozen=True)
class SnapshotResult:
    """One snapshot and one restore of a workspace of ``workspace_bytes`` random bytes."""

    workspace_bytes: int
    files: int
    archive_bytes: int
    snapshot_seconds: float
    restore_seconds: float

    @property
    def snapshot_mb_per_s(self) -> float:
        return self.workspace_bytes / MB / self.snapshot_seconds

    @property
    def restore_mb_per_s(self) -> float:
        return self.workspace_bytes / MB / self.restore_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "workspaceBytes": self.workspace_bytes,
            "files": self.files,
            "archiveBytes": self.archive_bytes,
            "snapshotSeconds": self.snapshot_seconds,
            "restoreSeconds": self.restore_seconds,
            "snapshotMBps": self.snapshot_mb_per_s,
            "restoreMBps": self.restore_mb_per_s,
        }


@dataclass
class BenchReport:
    """Everything one ``kleave sandbox bench`` run measured."""

    settings: Mapping[str, Any]
    warm: BatchResult | None = None
    cold: BatchResult | None = None
    snapshot: SnapshotResult | None = None

    @property
    def ok(self) -> bool:
        return all(batch.ok for batch in (self.warm, self.cold) if batch is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "warm": self.warm.to_dict() if self.warm else None,
            "cold": self.cold.to_dict() if self.cold else None,
            "warmSpeedupP50": warm_speedup(self),
            "snapshot": self.snapshot.to_dict() if self.snapshot else None,
            "ok": self.ok,
        }


def warm_speedup(report: BenchReport) -> float | None:
    """Cold p50 over warm p50 (client-observed): what the warm pool buys, in one number."""
    if not (report.warm and report.cold and report.warm.client_ms and report.cold.client_ms):
        return None
    warm = summarize(report.warm.client_ms).p50
    return summarize(report.cold.client_ms).p50 / warm if warm > 0 else None


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _latency_row(name: str, values: Sequence[float], source: str, rate: str) -> str:
    if not values:
        return f"| {name} | 0 | {source} | - | - | - | - | - | {rate} |"
    s = summarize(values)
    cells = " | ".join(_ms(v) for v in (s.p50, s.p90, s.p99, s.max, s.mean))
    return f"| {name} | {s.n} | {source} | {cells} | {rate} |"


def render_markdown(report: BenchReport) -> str:
    """The report as Markdown tables: claim latencies with the cold baseline, then snapshots."""
    lines = ["## kleave sandbox bench", ""]
    settings = ", ".join(f"{k} {v}" for k, v in report.settings.items())
    lines += [f"Settings: {settings}.", ""]
    batches = [b for b in (report.warm, report.cold) if b is not None]
    if batches:
        lines += [
            "| claims | n | source | p50 ms | p90 ms | p99 ms | max ms | mean ms | claims/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for batch in batches:
            source = f"{batch.as_expected}/{batch.claims} {batch.expected_source}"
            others = {k: v for k, v in batch.sources.items() if k != batch.expected_source}
            if others:
                source += " (" + ", ".join(f"{v} {k}" for k, v in sorted(others.items())) + ")"
            rate = f"{batch.claims_per_second:.1f}"
            lines.append(
                _latency_row(f"{batch.label}: create → Ready (SDK)", batch.client_ms, source, rate)
            )
            lines.append(
                _latency_row(
                    f"{batch.label}: claim.latencyMs (operator)", batch.operator_ms, "", ""
                )
            )
        speedup = warm_speedup(report)
        if speedup is not None and report.warm and report.cold:
            lines += [
                "",
                f"Cold p50 / warm p50 (SDK): **{speedup:.2f}x** (batches of "
                f"{report.warm.claims} warm and {report.cold.claims} cold claims at once).",
            ]
        for batch in batches:
            if batch.failures:
                lines += ["", f"{len(batch.failures)} {batch.label} claims failed:"]
                lines += [f"- {failure}" for failure in batch.failures[:10]]
        lines.append("")
    if report.snapshot is not None:
        snap = report.snapshot
        size = f"{snap.workspace_bytes / MB:.1f}"
        lines += [
            "| state | workspace MB | files | archive MB | seconds | MB/s |",
            "|---|---|---|---|---|---|",
            f"| snapshot (POST /v1/snapshot) | {size} | {snap.files} | "
            f"{snap.archive_bytes / MB:.1f} | {snap.snapshot_seconds:.3f} | "
            f"{snap.snapshot_mb_per_s:.1f} |",
            f"| restore (POST /v1/restore) | {size} | {snap.files} | "
            f"{snap.archive_bytes / MB:.1f} | {snap.restore_seconds:.3f} | "
            f"{snap.restore_mb_per_s:.1f} |",
            "",
        ]
    return "\n".join(lines)
