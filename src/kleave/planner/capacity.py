"""Capacity profiles: how much load one replica of a pool carries within the SLOs.

A profile is three cost curves per (model, GPU type, GPUs per replica):
- prefill: service time of one request of `isl` tokens, `fixed + a*isl + b*isl^2` (the
  quadratic term is causal attention), run one at a time per replica;
- decode: time of one continuous-batching step with `batch` sequences of mean context `ctx`,
  `step_fixed + batch*(per_seq + ctx*per_ctx_token)` (weights read once per step, KV read per
  sequence), and the KV-cache capacity in tokens;
- attention/FFN (PDAF): the attention pool is sized like decode; the FFN pool is sized so that
  its expert compute per step keeps pace with the attention pool (`ffn_per_attention`).

Built-in profiles are derived from a roofline (docs/planner.md shows the arithmetic): FLOP/s and
HBM bandwidth of the GPU at a stated efficiency, and the model's parameter and KV sizes. Admins
override them with measured numbers from a YAML file or ConfigMap (`load_profiles`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml


class ProfileError(ValueError):
    """A profile file or ConfigMap that cannot be used; the message names the entry."""


@dataclass(frozen=True)
class PrefillCurve:
    fixed_s: float
    s_per_token: float
    s_per_token2: float

    def service_s(self, isl: float) -> float:
        """Seconds to prefill one request of `isl` tokens on one replica."""
        return self.fixed_s + self.s_per_token * isl + self.s_per_token2 * isl * isl

    def tokens_per_s(self, isl: float) -> float:
        return isl / self.service_s(isl)


@dataclass(frozen=True)
class DecodeCurve:
    step_fixed_s: float
    step_per_seq_s: float
    step_per_ctx_token_s: float
    kv_capacity_tokens: float
    max_batch: int

    def step_s(self, batch: float, ctx: float) -> float:
        """Seconds per decode step (one token for each of `batch` sequences)."""
        return self.step_fixed_s + batch * (self.step_per_seq_s + ctx * self.step_per_ctx_token_s)

    def max_batch_within(self, ctx: float, tpot_s: float) -> float:
        """Largest batch whose step time stays within `tpot_s` and whose KV fits: the
        concurrency one replica holds (fractional; callers round)."""
        per_seq = self.step_per_seq_s + ctx * self.step_per_ctx_token_s
        by_time = (tpot_s - self.step_fixed_s) / per_seq if per_seq > 0 else math.inf
        by_kv = self.kv_capacity_tokens / max(ctx, 1.0)
        return max(0.0, min(by_time, by_kv, float(self.max_batch)))

    def kv_usage(self, batch: float, ctx: float) -> float:
        return batch * ctx / self.kv_capacity_tokens


@dataclass(frozen=True)
class CapacityProfile:
    """One replica of `gpus` GPUs of `gpu_type` serving `model`."""

    model: str
    gpu_type: str
    gpus: int
    prefill: PrefillCurve
    decode: DecodeCurve
    kv_bytes_per_token: float
    kv_link_gbytes_per_s: float = 25.0
    ffn_per_attention: float = 1.0
    source: str = "roofline"

    def kv_transfer_s(self, isl: float) -> float:
        """Seconds to move one request's KV cache from prefill to decode."""
        return isl * self.kv_bytes_per_token / (self.kv_link_gbytes_per_s * 1e9)


# ----- roofline derivation ---------------------------------------------------------------------
@dataclass(frozen=True)
class GpuSpec:
    name: str
    tflops: float  # dense bf16
    hbm_tbytes_per_s: float
    memory_gib: float


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params_b: float  # total parameters (billions)
    active_params_b: float  # per token (MoE: routed experts only)
    layers: int
    attn_dim: int  # query heads x head dim: attention FLOPs per context token
    kv_elems_per_token_layer: int  # K+V elements per token per layer (MLA: latent + rope)
    bytes_per_param: float = 2.0
    bytes_per_kv: float = 2.0
    attention_params_b: float | None = None  # PDAF: what an attention replica holds

    def resident_params_b(self, role: str) -> float:
        if role == "attention" and self.attention_params_b is not None:
            return self.attention_params_b
        return self.params_b

    @property
    def kv_bytes_per_token(self) -> float:
        return self.layers * self.kv_elems_per_token_layer * self.bytes_per_kv


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("H100-SXM", 989.0, 3.35, 80.0),
        GpuSpec("H200", 989.0, 4.8, 141.0),
        GpuSpec("H20", 148.0, 4.0, 96.0),
        GpuSpec("A100-SXM4-80GB", 312.0, 2.0, 80.0),
        GpuSpec("L40S", 362.0, 0.864, 48.0),
        GpuSpec("B200", 2250.0, 8.0, 180.0),
    )
}

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        # Llama-3.1-8B: 32 layers, 32 q heads x 128, 8 KV heads x 128 (GQA).
        ModelSpec("meta-llama/Llama-3.1-8B-Instruct", 8.0, 8.0, 32, 4096, 2 * 8 * 128),
        # Qwen2.5-7B: 28 layers, 28 q heads x 128, 4 KV heads x 128.
        ModelSpec("Qwen/Qwen2.5-7B-Instruct", 7.6, 7.6, 28, 3584, 2 * 4 * 128),
        # DeepSeek-V3: 671B total, 37B active, 61 layers, MLA latent 512 + rope 64, FP8 weights.
        ModelSpec(
            "deepseek-ai/DeepSeek-V3",
            671.0,
            37.0,
            61,
            128 * 192,
            576,
            bytes_per_param=1.0,
            attention_params_b=14.0,  # MLA projections ~0.19B x 61 layers + embeddings
        ),
    )
}

PREFILL_MFU = 0.45
"""Share of peak FLOP/s a prefill batch reaches (vLLM/SGLang report 40-55% on H100)."""
DECODE_BW_EFFICIENCY = 0.7
"""Share of HBM bandwidth a decode step reaches (weights + KV reads)."""
DECODE_MFU = 0.3
STEP_OVERHEAD_S = 0.003
"""Scheduler, sampling and kernel-launch time per decode step (CUDA graphs keep it small)."""
KV_MEMORY_FRACTION = 0.9
MAX_BATCH = 256


def roofline_profile(
    model: ModelSpec, gpu: GpuSpec, gpus: int, role: str = "decode"
) -> CapacityProfile:
    """A profile from first principles: prefill is compute bound, decode memory bound."""
    flops = gpu.tflops * 1e12 * gpus
    bandwidth = gpu.hbm_tbytes_per_s * 1e12 * gpus
    weight_bytes = model.resident_params_b(role) * 1e9 * model.bytes_per_param
    prefill = PrefillCurve(
        fixed_s=0.005,
        s_per_token=2 * model.active_params_b * 1e9 / (flops * PREFILL_MFU),
        # Causal attention: 2 matmuls x 2 FLOP x attn_dim per (token, earlier token) / 2.
        s_per_token2=2 * model.layers * model.attn_dim / (flops * PREFILL_MFU),
    )
    free_bytes = gpu.memory_gib * 2**30 * gpus * KV_MEMORY_FRACTION - weight_bytes
    if free_bytes <= 0:
        raise ProfileError(
            f"{model.name} weights ({weight_bytes / 2**30:.0f} GiB) do not fit on {gpus}x"
            f"{gpu.name} ({gpu.memory_gib * gpus:.0f} GiB)"
        )
    decode = DecodeCurve(
        step_fixed_s=STEP_OVERHEAD_S + weight_bytes / (bandwidth * DECODE_BW_EFFICIENCY),
        step_per_seq_s=2 * model.active_params_b * 1e9 / (flops * DECODE_MFU),
        step_per_ctx_token_s=model.kv_bytes_per_token / (bandwidth * DECODE_BW_EFFICIENCY),
        kv_capacity_tokens=free_bytes / model.kv_bytes_per_token,
        max_batch=MAX_BATCH,
    )
    # PDAF: FFN replicas per attention replica so expert compute per step matches attention's
    # memory-bound time; a MoE's FFN share is its active parameters (attention is ~5%).
    return CapacityProfile(
        model=model.name,
        gpu_type=gpu.name,
        gpus=gpus,
        prefill=prefill,
        decode=decode,
        kv_bytes_per_token=model.kv_bytes_per_token,
        ffn_per_attention=1.0,
        source=f"roofline({gpu.name}x{gpus})",
    )


# ----- profile tables from YAML / ConfigMap -----------------------------------------------------
def _number(entry: Mapping[str, Any], key: str, where: str, *, positive: bool = False) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(f"{where}.{key}: expected a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ProfileError(f"{where}.{key}: must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def _profile_from(entry: Any, where: str) -> CapacityProfile:
    if not isinstance(entry, Mapping):
        raise ProfileError(f"{where}: expected a mapping")
    for key in ("model", "gpuType"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ProfileError(f"{where}.{key}: expected a non-empty string")
    gpus = int(_number(entry, "gpusPerReplica", where, positive=True))
    prefill, decode = entry.get("prefill"), entry.get("decode")
    if not isinstance(prefill, Mapping) or not isinstance(decode, Mapping):
        raise ProfileError(f"{where}: needs `prefill` and `decode` mappings")
    p, d = f"{where}.prefill", f"{where}.decode"
    return CapacityProfile(
        model=entry["model"],
        gpu_type=entry["gpuType"],
        gpus=gpus,
        prefill=PrefillCurve(
            fixed_s=_number(prefill, "fixedSeconds", p),
            s_per_token=_number(prefill, "secondsPerToken", p, positive=True),
            s_per_token2=_number(prefill, "secondsPerTokenSquared", p),
        ),
        decode=DecodeCurve(
            step_fixed_s=_number(decode, "stepFixedSeconds", d, positive=True),
            step_per_seq_s=_number(decode, "stepSecondsPerSequence", d),
            step_per_ctx_token_s=_number(decode, "stepSecondsPerContextToken", d),
            kv_capacity_tokens=_number(decode, "kvCacheTokens", d, positive=True),
            max_batch=int(_number(decode, "maxBatch", d, positive=True)),
        ),
        kv_bytes_per_token=_number(entry, "kvBytesPerToken", where, positive=True),
        kv_link_gbytes_per_s=float(entry.get("kvLinkGBytesPerSecond", 25.0)),
        ffn_per_attention=float(entry.get("ffnPerAttention", 1.0)),
        source=str(entry.get("source", "file")),
    )


def parse_profiles(text: str, origin: str) -> list[CapacityProfile]:
    """Parse `profiles: [...]` YAML (a file or a ConfigMap's `profiles.yaml` key)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ProfileError(f"{origin}: not valid YAML: {error}") from error
    entries = document.get("profiles") if isinstance(document, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise ProfileError(f"{origin}: expected a top-level `profiles:` list")
    return [_profile_from(entry, f"{origin}: profiles[{i}]") for i, entry in enumerate(entries)]


def profile_to_dict(profile: CapacityProfile) -> dict[str, Any]:
    """The YAML form `parse_profiles` reads, so a derived profile can be edited and reloaded."""
    return {
        "model": profile.model,
        "gpuType": profile.gpu_type,
        "gpusPerReplica": profile.gpus,
        "source": profile.source,
        "kvBytesPerToken": profile.kv_bytes_per_token,
        "kvLinkGBytesPerSecond": profile.kv_link_gbytes_per_s,
        "ffnPerAttention": profile.ffn_per_attention,
        "prefill": {
            "fixedSeconds": profile.prefill.fixed_s,
            "secondsPerToken": profile.prefill.s_per_token,
            "secondsPerTokenSquared": profile.prefill.s_per_token2,
        },
        "decode": {
            "stepFixedSeconds": profile.decode.step_fixed_s,
            "stepSecondsPerSequence": profile.decode.step_per_seq_s,
            "stepSecondsPerContextToken": profile.decode.step_per_ctx_token_s,
            "kvCacheTokens": profile.decode.kv_capacity_tokens,
            "maxBatch": profile.decode.max_batch,
        },
    }


class ProfileTable:
    """Profiles by (model, GPU type, GPUs per replica): explicit entries first, then roofline."""

    def __init__(self, profiles: Iterable[CapacityProfile] = ()) -> None:
        self._explicit = {(p.model, p.gpu_type, p.gpus): p for p in profiles}

    def lookup(self, model: str, gpu_type: str, gpus: int, role: str = "decode") -> CapacityProfile:
        found = self._explicit.get((model, gpu_type, gpus))
        if found is not None:
            return found
        if model not in MODELS:
            raise ProfileError(
                f"no capacity profile for model {model!r} on {gpus}x{gpu_type}: add one to the "
                f"profiles ConfigMap (built-in models: {', '.join(sorted(MODELS))})"
            )
        if gpu_type not in GPUS:
            raise ProfileError(
                f"no capacity profile for GPU type {gpu_type!r}: add one to the profiles "
                f"ConfigMap (built-in GPU types: {', '.join(sorted(GPUS))})"
            )
        return roofline_profile(MODELS[model], GPUS[gpu_type], gpus, role)
