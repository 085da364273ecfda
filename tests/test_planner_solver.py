"""Capacity math and the scaling policy, on cases checked by hand."""

from __future__ import annotations

import math

import pytest
import yaml

from kleave.planner.capacity import (
    CapacityProfile,
    DecodeCurve,
    PrefillCurve,
    ProfileError,
    ProfileTable,
    parse_profiles,
    profile_to_dict,
)
from kleave.planner.solver import (
    Load,
    PoolLimits,
    PoolState,
    ScalingPolicy,
    Slo,
    _wait_quantile_s,
    decide,
    decode_batch_per_replica,
    decode_replicas,
    expected_tpot_s,
    latency_correction,
    prefill_replicas,
    prefill_utilization,
    required_replicas,
)

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def profile(
    *,
    service_s: float = 0.1,
    step_fixed: float = 0.01,
    per_seq: float = 0.0005,
    per_ctx: float = 0.0,
    kv_tokens: float = 1e9,
) -> CapacityProfile:
    return CapacityProfile(
        model="m",
        gpu_type="g",
        gpus=1,
        prefill=PrefillCurve(fixed_s=service_s, s_per_token=0.0, s_per_token2=0.0),
        decode=DecodeCurve(step_fixed, per_seq, per_ctx, kv_tokens, 256),
        kv_bytes_per_token=1.0,  # transfer time ~0
    )


def test_wait_tail_is_kingman_exponential() -> None:
    # rho=0.5, E[S]=0.1, cv=1: tau = 0.1 * 2 / (2 * 0.5) = 0.2; t99 = 0.2 * ln(0.5 / 0.01).
    assert _wait_quantile_s(0.5, 0.1, 0.99) == pytest.approx(0.2 * math.log(50))
    assert _wait_quantile_s(0.005, 0.1, 0.99) == 0.0  # P(wait > 0) = rho < 1%


def test_prefill_utilization_meets_the_ttft_budget_exactly() -> None:
    p = profile(service_s=0.1)
    slo = Slo(ttft_s=1.0, tpot_s=0.1, attainment=0.99)
    rho = prefill_utilization(p, 100, slo)
    budget = 1.0 - 0.1 - p.kv_transfer_s(100)
    assert _wait_quantile_s(rho, 0.1, 0.99) == pytest.approx(budget, rel=1e-6)
    # 20 req/s at 0.1 s each is 2 busy servers; at utilization rho it takes 2 / rho replicas.
    assert prefill_replicas(Load(20, 100, 10), p, slo) == pytest.approx(2 / rho)


def test_prefill_that_cannot_meet_ttft_needs_infinite_replicas() -> None:
    p = profile(service_s=3.0)
    assert prefill_utilization(p, 100, Slo(ttft_s=2.0)) == 0.0
    assert prefill_replicas(Load(1, 100, 10), p, Slo(ttft_s=2.0)) == math.inf


def test_decode_batch_bound_by_tpot_then_littles_law() -> None:
    p = profile(step_fixed=0.01, per_seq=0.0005)
    slo = Slo(tpot_s=0.1)
    load = Load(rate_rps=100, mean_isl=100, mean_osl=50)
    # TPOT budget 0.085 s: (0.085 - 0.01) / 0.0005 = 150 sequences per replica.
    assert decode_batch_per_replica(p, load, slo) == pytest.approx(150)
    # 150 sequences per 0.085 s step = 1764.7 tokens/s; 100 req/s x 50 tokens = 5000 tokens/s.
    assert decode_replicas(load, p, slo) == pytest.approx(5000 / (150 / 0.085))


def test_decode_batch_bound_by_kv_cache() -> None:
    p = profile(kv_tokens=1000)
    load = Load(rate_rps=1, mean_isl=100, mean_osl=50)  # context 100 + 25 = 125 tokens
    assert decode_batch_per_replica(p, load, Slo()) == pytest.approx(8)


def test_expected_tpot_at_the_littles_law_batch() -> None:
    p = profile(step_fixed=0.01, per_seq=0.0005)
    load = Load(rate_rps=100, mean_isl=100, mean_osl=50)
    # batch = k * step(batch) with k = 100 * 50 / 2 = 2500 -> batch = 25 / (1 - 1.25) < 0: full.
    assert expected_tpot_s(load, p, 2) == pytest.approx(p.decode.step_s(256, 125))
    # 4 replicas: k = 1250, k * per_seq = 0.625: batch = 12.5 / 0.375 = 33.3.
    assert expected_tpot_s(load, p, 4) == pytest.approx(0.01 + (12.5 / 0.375) * 0.0005)


def test_required_replicas_by_topology() -> None:
    p = profile()
    load = Load(10, 100, 50)
    slo = Slo()
    pd = required_replicas(load, {"prefill": p, "decode": p}, slo, "PD")
    colocated = required_replicas(load, {"decode": p}, slo, "Colocated")
    assert colocated["decode"] == pytest.approx(pd["prefill"] + pd["decode"])
    pdaf = required_replicas(load, {"prefill": p, "attention": p, "ffn": p}, slo, "PDAF")
    assert pdaf["attention"] == pytest.approx(pd["decode"])
    assert pdaf["ffn"] == pytest.approx(pdaf["attention"] * p.ffn_per_attention)
    assert required_replicas(Load(0, 100, 50), {"prefill": p, "decode": p}, slo, "PD") == {
        "prefill": 0.0,
        "decode": 0.0,
    }


def test_latency_correction_is_smoothed_and_clamped() -> None:
    assert latency_correction(2.0, 1.0, 1.0) == pytest.approx(1.5)  # 0.5 * 2 + 0.5 * 1
    assert latency_correction(100.0, 1.0, 1.0) == pytest.approx(1.5)  # clamped at 2
    assert latency_correction(None, 1.0, 1.3) == 1.3


LIMITS = {"prefill": PoolLimits(1, 20, 1), "decode": PoolLimits(1, 20, 2)}
POLICY = ScalingPolicy()


def _decide(
    required: dict[str, float],
    states: dict[str, PoolState],
    policy: ScalingPolicy = POLICY,
    now: float = 1000.0,
) -> dict[str, tuple[int, str]]:
    out = decide(required, states, LIMITS, policy, now)
    return {role: (d.replicas, d.reason) for role, d in out.items()}


def test_decide_scales_up_to_the_ceiling_of_the_need() -> None:
    got = _decide(
        {"prefill": 3.2, "decode": 1.0}, {"prefill": PoolState(2), "decode": PoolState(1)}
    )
    assert got == {"prefill": (4, "Forecast"), "decode": (1, "Forecast")}


def test_decide_holds_within_the_scale_down_margin_and_cooldown() -> None:
    # need 3.7 -> 4 with a 10% margin (4.07 -> 5): no scale-down from 5.
    assert _decide({"prefill": 3.7}, {"prefill": PoolState(5)})["prefill"] == (5, "Hysteresis")
    # need 2.0 (2.2 -> 3 with margin) from 5, but changed 100 s ago: cooldown.
    state = PoolState(5, last_change_s=900.0)
    assert _decide({"prefill": 2.0}, {"prefill": state})["prefill"] == (5, "Cooldown")
    # after the cooldown: down to 4 at most (max step 25% of 5 -> 1).
    state = PoolState(5, last_change_s=0.0)
    assert _decide({"prefill": 2.0}, {"prefill": state})["prefill"] == (4, "MaxStep")


def test_decide_limits_the_step_up_and_clamps_to_max() -> None:
    assert _decide({"prefill": 30.0}, {"prefill": PoolState(3)})["prefill"] == (6, "MaxStep")
    assert _decide({"prefill": 30.0}, {"prefill": PoolState(15)})["prefill"] == (20, "MaxReplicas")
    assert _decide({"prefill": math.inf}, {"prefill": PoolState(15)})["prefill"][0] == 20


def test_decide_emergency_scale_up_on_queue_and_kv() -> None:
    queued = PoolState(4, waiting=40.0)  # 10 per replica > 5
    assert _decide({"prefill": 1.0}, {"prefill": queued})["prefill"] == (6, "EmergencyQueue")
    full = PoolState(4, kv_usage=0.95)
    assert _decide({"decode": 1.0}, {"decode": full})["decode"] == (5, "EmergencyKVCache")


def test_decide_gpu_budget_shrinks_pools_together() -> None:
    policy = ScalingPolicy(gpu_budget=12)
    got = _decide(
        {"prefill": 6.0, "decode": 6.0},
        {"prefill": PoolState(6), "decode": PoolState(6)},
        policy,
    )
    # wanted 6 + 6x2 = 18 GPUs; min 1 + 2 = 3; factor (12 - 3) / (18 - 3) = 0.6.
    assert got == {"prefill": (4, "GPUBudget"), "decode": (4, "GPUBudget")}
    assert got["prefill"][0] * 1 + got["decode"][0] * 2 <= 12


def test_roofline_profiles_are_plausible_and_round_trip_through_yaml() -> None:
    table = ProfileTable()
    h100 = table.lookup(LLAMA, "H100-SXM", 1)
    # 8B bf16 on H100: prefill ~16 GFLOP/token at 45% of 989 TFLOP/s -> ~28k tokens/s.
    assert 20_000 < h100.prefill.tokens_per_s(512) < 40_000
    # Decode step ~ 16 GB weights / (3.35 TB/s x 0.7) ~ 7 ms + overhead.
    assert 0.008 < h100.decode.step_fixed_s < 0.012
    text = yaml.safe_dump({"profiles": [profile_to_dict(h100)]})
    (loaded,) = parse_profiles(text, "test")
    assert loaded.decode == h100.decode and loaded.prefill == h100.prefill
    assert ProfileTable([loaded]).lookup(LLAMA, "H100-SXM", 1) is loaded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("profiles: []", "top-level `profiles:` list"),
        ("profiles: [{model: m, gpuType: g, gpusPerReplica: 1}]", "needs `prefill` and `decode`"),
        (
            "profiles: [{model: m, gpuType: g, gpusPerReplica: 1, kvBytesPerToken: 1,"
            " prefill: {fixedSeconds: 0, secondsPerToken: -1, secondsPerTokenSquared: 0},"
            " decode: {}}]",
            "profiles[0].prefill.secondsPerToken: must be > 0",
        ),
        ("{", "not valid YAML"),
    ],
)
def test_bad_profiles_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_profiles(text, "cm")


def test_unknown_model_or_gpu_says_how_to_fix() -> None:
    with pytest.raises(ProfileError, match="add one to the profiles ConfigMap"):
        ProfileTable().lookup("acme/unknown", "H100-SXM", 1)
    with pytest.raises(ProfileError, match="GPU type 'TPU'"):
        ProfileTable().lookup(LLAMA, "TPU", 1)
