"""The simulator: hand-checked discrete-event cases, fluid vs discrete-event agreement, the
policies' behaviour, and the `simulate` command."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kleave.planner.capacity import CapacityProfile, DecodeCurve, PrefillCurve
from kleave.planner.solver import Slo
from kleave.sim import engine, fluid
from kleave.sim.cli import simulate
from kleave.sim.cluster import ClusterView, Policy, RoleView, TickStats
from kleave.sim.metrics import SimResult, summarize
from kleave.sim.policies import DynamoSla, Kleave, Reactive, Static
from kleave.sim.requests import RequestSet, lognormal_shape, rescale, synthesize
from kleave.sim.runner import Options, profiles_for
from kleave.sim.scenario import Scenario
from kleave.traces import RateSeries, RequestTrace


def toy(
    *, prefill_per_token: float = 0.005, kv_tokens: float = 1e9, transfer_s_per_token: float = 0.001
) -> dict[str, CapacityProfile]:
    """Prefill 0.005 s/token, transfer 0.001 s/token, decode step 10 ms + 1 ms per sequence."""
    p = CapacityProfile(
        model="m",
        gpu_type="g",
        gpus=1,
        prefill=PrefillCurve(fixed_s=0.0, s_per_token=prefill_per_token, s_per_token2=0.0),
        decode=DecodeCurve(0.01, 0.001, 0.0, kv_tokens, 256),
        kv_bytes_per_token=transfer_s_per_token * 25e9,
    )
    return {"prefill": p, "decode": p}


class Fixed:
    def __init__(self, prefill: int, decode: int, later: dict[str, int] | None = None) -> None:
        self.name = "fixed"
        self.start = {"prefill": prefill, "decode": decode}
        self.later = later

    def initial(self) -> dict[str, int]:
        return dict(self.start)

    def decide(self, view: ClusterView) -> dict[str, int] | None:
        later, self.later = self.later, None
        return later


def requests(arrival: list[float], isl: list[float], osl: list[float], end: float) -> RequestSet:
    return RequestSet(np.array(arrival), np.array(isl), np.array(osl), end)


def run(req: RequestSet, policy: Fixed, startup_s: float = 30.0, **kw: float) -> SimResult:
    return engine.simulate(req, toy(**kw), Slo(), policy, startup_s=startup_s)


# ----- discrete-event engine, by hand -----------------------------------------------------------
def test_one_request_ttft_is_prefill_transfer_and_one_step() -> None:
    out = run(requests([0.0], [100], [11], 20.0), Fixed(1, 1))
    # prefill 0.5 s + transfer 0.1 s + one step of a batch of one (10 + 1 ms).
    assert out.ttft_s[0] == pytest.approx(0.611)
    assert out.tpot_s[0] == pytest.approx(0.011)
    assert out.both_ok == 1


def test_two_requests_queue_on_one_prefill_replica() -> None:
    out = run(requests([0.0, 0.0], [100, 100], [11, 11], 20.0), Fixed(1, 1))
    # The second waits 0.5 s for the first; the first has left decode when it joins.
    assert out.ttft_s[0] == pytest.approx(0.611)
    assert out.ttft_s[1] == pytest.approx(1.111)
    two = run(requests([0.0, 0.0], [100, 100], [11, 11], 20.0), Fixed(2, 1))
    assert two.ttft_s[1] == pytest.approx(0.611 + 0.001)  # joins a batch of one: step of two


def test_full_kv_cache_delays_admission() -> None:
    req = requests([0.0, 0.2], [100, 100], [101, 11], 20.0)
    out = run(req, Fixed(2, 1), kv_tokens=150)
    # The first decodes 101 tokens from 0.6 s at 11 ms a step; the second (ready at 0.8 s)
    # fits only once it is gone, then needs one step.
    first_done = 0.6 + 101 * 0.011
    assert out.ttft_s[1] == pytest.approx(first_done + 0.011 - 0.2)
    roomy = run(req, Fixed(2, 1))
    assert roomy.ttft_s[1] == pytest.approx(0.5 + 0.1 + 0.012, abs=1e-3)


def test_scale_up_serves_after_the_start_up_delay_and_costs_from_the_request() -> None:
    # A 50 s prefill holds the only replica; a second is asked for at the 10 s tick and is
    # ready at 40 s, when the 1 s request that arrived at 20 s starts.
    req = requests([5.0, 20.0], [10_000, 200], [2, 2], 100.0)
    out = run(req, Fixed(1, 1, later={"prefill": 2}), startup_s=30.0, prefill_per_token=0.005)
    second_ttft = 40.0 + 1.0 + 0.2 + 0.011 - 20.0
    assert out.ttft_s[1] == pytest.approx(second_ttft, abs=2e-3)
    assert out.gpu_seconds["prefill"] == pytest.approx(100.0 + 90.0)
    assert out.actions["prefill"] == 1


# ----- fluid model vs discrete-event engine -----------------------------------------------------
FLUID_TOLERANCE = 0.03
"""Attainment the fluid model may differ by on a short synthetic trace (measured: 34.0% vs
33.9% at 2/1 replicas, 87.6% vs 84.9% at 3/1 on the edge of saturation, 99.99% vs 100% at 4/1
and 6/2)."""


def ramp(minutes: int = 30, low: float = 10.0, high: float = 40.0) -> RateSeries:
    n = minutes
    return RateSeries(
        "ramp",
        np.arange(n, dtype=np.float64) * 60.0,
        np.full(n, 60.0),
        np.linspace(low, high, n),
        np.full(n, 2000.0),
        np.full(n, 100.0),
    )


@pytest.mark.parametrize(("prefill", "decode"), [(2, 1), (3, 1), (4, 1), (6, 2)])
def test_fluid_agrees_with_discrete_events_on_fixed_pools(prefill: int, decode: int) -> None:
    rates = ramp()
    profiles = profiles_for(Options(trace="", policies=()))
    des = engine.simulate(
        synthesize(rates, 1.0, seed=1), profiles, Slo(), Fixed(prefill, decode), startup_s=60
    )
    flu = fluid.simulate(
        rates, lognormal_shape(), profiles, Slo(), Fixed(prefill, decode), startup_s=60
    )
    a, b = summarize(des), summarize(flu)
    assert abs(float(a["slo_attainment"]) - float(b["slo_attainment"])) < FLUID_TOLERANCE
    assert float(a["gpu_hours"]) == pytest.approx(float(b["gpu_hours"]))


@pytest.mark.parametrize("make", [Reactive, DynamoSla, Kleave])
def test_fluid_agrees_with_discrete_events_under_a_scaling_policy(
    make: Callable[[Scenario], Policy],
) -> None:
    """Measured: reactive 57.2% vs 53.3%, dynamo-sla 56.0% vs 54.3%, kleave 99.99% vs 100%;
    GPU-hours within 2%."""
    rates = ramp()
    profiles = profiles_for(Options(trace="", policies=()))
    scenario = Scenario(profiles=profiles, slo=Slo(), startup_s=60, loads=rates)
    des = engine.simulate(
        synthesize(rates, 1.0, seed=1), profiles, Slo(), make(scenario), startup_s=60
    )
    flu = fluid.simulate(rates, lognormal_shape(), profiles, Slo(), make(scenario), startup_s=60)
    a, b = summarize(des), summarize(flu)
    assert abs(a["slo_attainment"] - b["slo_attainment"]) < 0.05
    assert b["gpu_hours"] == pytest.approx(a["gpu_hours"], rel=0.05)


# ----- policies ---------------------------------------------------------------------------------
def view(now: float, *, p: int, d: int, waiting: float = 0.0, kv: float = 0.7) -> ClusterView:
    return ClusterView(
        now,
        10.0,
        {
            "prefill": RoleView(p, p, waiting, None, None),
            "decode": RoleView(d, d, 0.0, kv, None),
        },
        TickStats(arrivals=100, isl_sum=1e5, osl_sum=1e4),
    )


def scenario() -> Scenario:
    return Scenario(
        profiles=profiles_for(Options(trace="", policies=())),
        slo=Slo(),
        startup_s=60,
        loads=ramp(),
    )


def test_static_never_changes() -> None:
    policy = Static(scenario())
    assert policy.initial()["prefill"] >= 1
    assert all(policy.decide(view(10.0 * k, p=3, d=1, waiting=500)) is None for k in range(50))


def test_reactive_scales_prefill_on_queue_and_decode_on_kv() -> None:
    policy = Reactive(scenario())
    out = policy.decide(view(10.0, p=4, d=2, waiting=40.0, kv=0.95))
    assert out == {"prefill": 5, "decode": 3}
    policy = Reactive(scenario())
    out = policy.decide(view(10.0, p=4, d=2, waiting=0.0, kv=0.3))
    assert out == {"prefill": 3, "decode": 1}
    starting = ClusterView(
        20.0,
        10.0,
        {
            "prefill": RoleView(5, 4, 40.0, None, None),
            "decode": RoleView(2, 2, 0.0, 0.95, None),
        },
        TickStats(),
    )
    assert policy.decide(starting) is None  # blocked while a pod starts, as Dynamo does


def test_kleave_scales_up_ahead_of_a_daily_ramp() -> None:
    """Two days of an hourly daily cycle, then the third morning's ramp: kleave has the
    replicas the next hour needs before it comes (it forecasts the ramp), so its pools stay
    ahead of the load and it meets the SLO, where sizing for the hour just seen lags."""
    hour = 3600.0
    t = np.arange(2 * 24 + 9, dtype=np.float64)
    rate = 20 + 15 * (1 - np.cos(2 * np.pi * t / 24))
    rates = RateSeries(
        "daily",
        t * hour,
        np.full(len(t), hour),
        rate,
        np.full(len(t), 1000.0),
        np.full(len(t), 100.0),
    )
    profiles = profiles_for(Options(trace="", policies=()))
    sc = Scenario(profiles=profiles, slo=Slo(), startup_s=60, loads=rates, interval_s=hour)
    out = fluid.simulate(
        rates, lognormal_shape(), profiles, Slo(), Kleave(sc, reselect_every=24), startup_s=60
    )
    ticks = out.timeline.t_s
    morning = ticks > 48 * hour
    window = np.minimum((ticks[morning] // hour).astype(np.int64), len(t) - 1)
    need = np.array([sc.sized(sc.load_at(int(i)))["prefill"] for i in window])
    assert np.all(out.timeline.replicas["prefill"][morning] >= need)
    assert summarize(out)["slo_attainment"] > 0.99


# ----- request sets -----------------------------------------------------------------------------
def test_synthesized_requests_follow_the_window_rates_and_means() -> None:
    rates = ramp(minutes=20, low=50, high=50)
    req = synthesize(rates, scale=2.0, seed=3)
    assert len(req) == pytest.approx(50 * 2 * 1200, rel=0.02)
    assert float(np.mean(req.isl)) == pytest.approx(2000, rel=0.05)
    assert np.all(np.diff(req.arrival_s) >= 0)
    again = synthesize(rates, scale=2.0, seed=3)
    assert np.array_equal(req.arrival_s, again.arrival_s)


def test_rescaled_request_trace_superposes_copies() -> None:
    n = 1000
    trace = RequestTrace("t", np.linspace(0, 600, n), np.full(n, 10.0), np.full(n, 5.0))
    assert len(rescale(trace, 3.0)) == 3 * n
    assert len(rescale(trace, 2.5, seed=1)) == pytest.approx(2.5 * n, rel=0.05)
    half = rescale(trace, 0.5, seed=1)
    assert len(half) == pytest.approx(n / 2, rel=0.1)
    assert float(half.arrival_s.max()) <= 600.0


# ----- the command ------------------------------------------------------------------------------
def write_requests(path: Path, n: int = 400) -> Path:
    rng = np.random.default_rng(0)
    ts = np.sort(rng.uniform(0, 300, n))
    lines = ["timestamp_s,input_tokens,output_tokens"]
    lines += [f"{t:.3f},{rng.integers(100, 3000)},{rng.integers(5, 200)}" for t in ts]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_json_has_the_scores_of_every_policy(tmp_path: Path) -> None:
    trace = write_requests(tmp_path / "req.csv")
    png = tmp_path / "timeline.png"
    result = CliRunner().invoke(
        simulate, ["--trace", str(trace), "--policy", "all", "--json", "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["rate_scale"] > 0
    assert set(doc["policies"]) == {
        "static",
        "reactive",
        "dynamo-sla",
        "dynamo-sla-arima",
        "kleave",
    }
    for scores in doc["policies"].values():
        assert {"slo_attainment", "gpu_hours", "goodput", "misses"} <= set(scores)
        assert 0.0 <= scores["slo_attainment"] <= 1.0
    assert png.stat().st_size < 200_000


def test_cli_table_prints_the_scale_used(tmp_path: Path) -> None:
    trace = write_requests(tmp_path / "req.csv")
    out = CliRunner().invoke(
        simulate, ["--trace", str(trace), "--policy", "static", "--rate-scale", "2"]
    )
    assert out.exit_code == 0, out.output
    assert "rate scale 2 (given)" in out.output
    assert "| static |" in out.output


def test_cli_malformed_trace_is_an_error_with_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp_s,input_tokens,output_tokens\n0,10,10\n1,abc,3\n")
    out = CliRunner().invoke(simulate, ["--trace", str(bad)])
    assert out.exit_code == 1
    assert f"error: {bad}: line 3:" in out.output
