"""Load generator -> real Prometheus -> PrometheusReader: the planner's metrics path, end to end.

Needs the prometheus binary (`make prometheus`), not the Kubernetes cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import wait_for
from kleave.devcluster.prometheus import PrometheusServer, ScrapeTarget
from kleave.planner.metrics import MetricsUnavailable, ObservedLoad, PrometheusReader

pytestmark = pytest.mark.e2e

TRACE_RATE, SPEEDUP = 5.0, 4.0  # 20 requests per wall-clock second
ISL, OSL = 600, 120
LABELS = {"namespace": "prod", "kleave_dev_inference_deployment": "llama"}
SELECTOR = 'namespace="prod",kleave_dev_inference_deployment="llama"'


@pytest.fixture
def loadgen(tmp_path: Path) -> Iterator[str]:
    """`python -m kleave.sim.loadgen_cli` replaying a constant-rate trace; yields its URL."""
    trace = tmp_path / "rates.csv"
    trace.write_text(
        "window_start_s,window_s,request_rate,mean_input_tokens,mean_output_tokens\n"
        f"0,600,{TRACE_RATE},{ISL},{OSL}\n"
    )
    stderr = (tmp_path / "loadgen.err").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kleave.sim.loadgen_cli",
            "--trace",
            str(trace),
            "--port",
            "0",
            "--speedup",
            str(SPEEDUP),
            "--loop",
            "--replicas",
            "prefill=2,decode=3",
            "--deployment",
            "llama",
            "--seed",
            "7",
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("serving http://"), (
            f"loadgen did not start: {line!r} {(tmp_path / 'loadgen.err').read_text()}"
        )
        yield line.split()[1].removesuffix("/metrics")
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0, "loadgen did not stop cleanly on SIGTERM"
        stderr.close()


def state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/state", timeout=5) as response:
        result: dict[str, Any] = json.load(response)
        return result


def test_reader_sees_the_replayed_load_and_survives_a_prometheus_restart(
    loadgen: str, tmp_path: Path
) -> None:
    replayed = state(loadgen)
    assert replayed["target_rate_rps"] == TRACE_RATE * SPEEDUP
    target = ScrapeTarget(loadgen.removeprefix("http://"), job="loadgen", labels=LABELS)
    with PrometheusServer(tmp_path / "prometheus", [target], scrape_interval_s=1.0) as prom:
        reader = PrometheusReader(prom.url, SELECTOR, timeout_s=2.0)
        rate = replayed["target_rate_rps"]

        def settled() -> ObservedLoad | None:
            try:
                load = reader.observe(window_s=10)
            except MetricsUnavailable as error:
                assert error.reason == "NoSeries", error.message
                return None
            close = (
                abs(load.rate_rps - rate) <= 0.3 * rate
                and load.mean_isl is not None
                and abs(load.mean_isl - ISL) <= 0.2 * ISL
                and load.mean_osl is not None
                and abs(load.mean_osl - OSL) <= 0.2 * OSL
            )
            return load if close else None

        load = wait_for(settled, timeout=40, what=f"observe() near {rate} req/s, ISL/OSL")
        for gauges in (load.waiting, load.running, load.kv_usage):
            assert set(gauges) == {"prefill", "decode"}
        assert all(0.0 <= usage <= 1.0 for usage in load.kv_usage.values())
        assert load.running["decode"] > 0
        assert load.ttft_p90_s is not None and 0.0 < load.ttft_p90_s < 1.0
        assert load.tpot_p90_s is not None and 0.0 < load.tpot_p90_s < 1.0
        assert load.ttft_mean_s is not None and load.tpot_mean_s is not None

        history = reader.history("rate", duration_s=30, step_s=5)
        assert isinstance(history, np.ndarray) and history.shape == (6,)
        assert np.nanmax(history) == pytest.approx(rate, rel=0.5)
        isl_history = reader.history("isl", duration_s=30, step_s=5)
        assert np.nanmax(isl_history) == pytest.approx(ISL, rel=0.2)

        url = prom.url
        prom.stop()
        with pytest.raises(MetricsUnavailable) as caught:
            reader.observe(window_s=10)
        assert caught.value.reason == "PrometheusUnreachable"
        assert url in caught.value.message

        prom.start()
        assert prom.url == url  # same port: the reader's URL stays valid
        again = reader.observe(window_s=10)  # the TSDB kept the samples scraped before
        assert again.rate_rps > 0
