"""The test Prometheus: its config, and a clear error when the binary is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from kleave.devcluster import prometheus
from kleave.devcluster.errors import StartupError
from kleave.devcluster.prometheus import (
    PrometheusNotFoundError,
    PrometheusServer,
    ScrapeTarget,
    find_binary,
    prometheus_duration,
    render_config,
)


def test_config_groups_targets_by_job_with_their_labels() -> None:
    config = render_config(
        [
            ScrapeTarget("127.0.0.1:9000", job="loadgen", labels={"namespace": "prod"}),
            ScrapeTarget("127.0.0.1:9001", job="loadgen"),
            ScrapeTarget("127.0.0.1:9100", job="operator", metrics_path="/m"),
        ],
        scrape_interval_s=1.0,
    )
    assert config["global"] == {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    assert config["scrape_configs"] == [
        {
            "job_name": "loadgen",
            "metrics_path": "/metrics",
            "static_configs": [
                {"targets": ["127.0.0.1:9000"], "labels": {"namespace": "prod"}},
                {"targets": ["127.0.0.1:9001"], "labels": {}},
            ],
        },
        {
            "job_name": "operator",
            "metrics_path": "/m",
            "static_configs": [{"targets": ["127.0.0.1:9100"], "labels": {}}],
        },
    ]


def test_scrape_timeout_never_exceeds_the_interval() -> None:
    slow = render_config([], scrape_interval_s=30.0)["global"]
    assert slow == {"scrape_interval": "30s", "scrape_timeout": "10s", "evaluation_interval": "30s"}
    fast = render_config([], scrape_interval_s=0.5)["global"]
    assert isinstance(fast, dict)
    assert fast["scrape_interval"] == fast["scrape_timeout"] == "500ms"
    assert prometheus_duration(2.25) == "2250ms"


def test_one_job_cannot_mix_metrics_paths() -> None:
    with pytest.raises(ValueError, match="mixes metrics paths"):
        render_config(
            [ScrapeTarget("a:1", job="j"), ScrapeTarget("b:1", job="j", metrics_path="/x")], 1.0
        )


def test_missing_binary_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(prometheus, "DEFAULT_BINARY", tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PrometheusNotFoundError, match="make prometheus"):
        find_binary()
    with pytest.raises(PrometheusNotFoundError, match="does not exist"):
        find_binary(tmp_path / "nope")
    with pytest.raises(PrometheusNotFoundError, match="apt-get install prometheus"):
        PrometheusServer(tmp_path)


def test_port_is_unknown_before_the_first_start(tmp_path: Path) -> None:
    fake = tmp_path / "prometheus"
    fake.write_text("#!/bin/sh\n")
    server = PrometheusServer(tmp_path / "state", binary=fake)
    with pytest.raises(RuntimeError, match="not been started"):
        _ = server.url
    assert not server.running
    assert PrometheusServer(tmp_path, binary=fake, port=9999).url == "http://127.0.0.1:9999"


def test_a_server_that_exits_at_once_reports_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "prometheus"
    fake.write_text("#!/bin/sh\necho 'bad flag: boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = PrometheusServer(tmp_path / "state", binary=fake, ready_timeout_s=5)
    with pytest.raises(StartupError, match=r"exited while starting.*bad flag: boom"):
        server.start()
    assert not server.running
