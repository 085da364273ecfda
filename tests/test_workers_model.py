"""The decoder against a naive forward written here from the raw weights: position by position,
head by head, expert by expert, in float64. Then the paged decode path against prefill of the
longer sequence, greedy generation against recomputing full attention, determinism from the
seed, the safetensors round trip, and the config."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from kleave.workers.config import MODEL_PRESETS, ModelConfig
from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.model import MoEDecoder, generate_greedy, rms_norm, rotary

TINY = MODEL_PRESETS["tiny"]
DENSE = MODEL_PRESETS["tiny-dense"]
TWO_SHARED = ModelConfig(num_experts=4, num_experts_per_tok=3, num_shared_experts=2)
NO_SHARED = ModelConfig(num_experts=3, num_experts_per_tok=1, num_shared_experts=0)
CONFIGS = {"tiny": TINY, "tiny-dense": DENSE, "two-shared": TWO_SHARED, "no-shared": NO_SHARED}
PROMPT = list(b"The quick brown fox")


# ----- the naive forward --------------------------------------------------------------------------
def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def naive_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / math.sqrt(float((x * x).mean()) + eps) * weight


def naive_rotate(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Pair i with i + D/2 and turn each pair by position * theta^(-2i/D)."""
    half = x.shape[0] // 2
    out = x.clone()
    for i in range(half):
        angle = position * theta ** (-2 * i / x.shape[0])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    inter = down.shape[1]
    return down @ (silu(gate_up[:inter] @ x) * (gate_up[inter:] @ x))


def naive_ffn(
    c: ModelConfig, w: dict[str, torch.Tensor], layer: int, x: torch.Tensor
) -> torch.Tensor:
    p = f"layers.{layer}.ffn."
    if not c.is_moe:
        return swiglu(x, w[p + "gate_up"], w[p + "down"])
    logits = (w[p + "router"] @ x).tolist()
    top = max(logits)
    probs = [math.exp(v - top) for v in logits]
    probs = [v / sum(probs) for v in probs]
    chosen = sorted(range(c.num_experts), key=lambda e: -probs[e])[: c.num_experts_per_tok]
    total = sum(probs[e] for e in chosen)
    out = torch.zeros_like(x)
    for e in chosen:
        out += probs[e] / total * swiglu(x, w[p + "experts_gate_up"][e], w[p + "experts_down"][e])
    inter = c.intermediate_size
    for s in range(c.num_shared_experts):  # stored concatenated: gates of all, then ups of all
        gate_up = w[p + "shared_gate_up"]
        half = gate_up.shape[0] // 2
        rows = torch.cat(
            [
                gate_up[s * inter : (s + 1) * inter],
                gate_up[half + s * inter : half + (s + 1) * inter],
            ]
        )
        out += swiglu(x, rows, w[p + "shared_down"][:, s * inter : (s + 1) * inter])
    return out


def naive_forward(
    model: MoEDecoder, tokens: list[int]
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Logits at every position `[T, vocab]` and per-layer rotated K and V, in float64."""
    c = model.config
    w = {name: t.double() for name, t in model.state_dict().items()}
    group = c.num_heads // c.num_kv_heads
    hs = [w["embedding"][t].clone() for t in tokens]
    kv = []
    for layer in range(c.num_layers):
        p = f"layers.{layer}.attn."
        keys, values, queries = [], [], []
        for pos, h in enumerate(hs):
            x = naive_norm(h, w[p + "norm"], c.rms_norm_eps)
            q = (w[p + "wq"] @ x).view(c.num_heads, c.head_dim)
            k = (w[p + "wk"] @ x).view(c.num_kv_heads, c.head_dim)
            queries.append(
                torch.stack([naive_rotate(q[i], pos, c.rope_theta) for i in range(c.num_heads)])
            )
            keys.append(
                torch.stack([naive_rotate(k[i], pos, c.rope_theta) for i in range(c.num_kv_heads)])
            )
            values.append((w[p + "wv"] @ x).view(c.num_kv_heads, c.head_dim))
        kv.append((torch.stack(keys), torch.stack(values)))
        for pos in range(len(hs)):
            heads = []
            for head in range(c.num_heads):
                kvh = head // group
                scores = [
                    float(queries[pos][head] @ keys[j][kvh]) / math.sqrt(c.head_dim)
                    for j in range(pos + 1)
                ]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                heads.append(
                    sum(wt / sum(weights) * values[j][kvh] for j, wt in enumerate(weights))
                )
            hs[pos] = hs[pos] + w[p + "wo"] @ torch.cat(heads)
        for pos in range(len(hs)):
            x = naive_norm(hs[pos], w[f"layers.{layer}.ffn.norm"], c.rms_norm_eps)
            hs[pos] = hs[pos] + naive_ffn(c, w, layer, x)
    logits = [w["lm_head"] @ naive_norm(h, w["norm"], c.rms_norm_eps) for h in hs]
    return torch.stack(logits), kv


# ----- the pieces ---------------------------------------------------------------------------------
def test_rms_norm_matches_the_formula() -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 8, generator=generator)
    weight = torch.rand(8, generator=generator) + 0.5
    got = rms_norm(x, weight, 1e-6)
    for row in range(3):
        # A float32 result against a float64 formula: float32's tolerances, not float64's.
        expected = naive_norm(x[row].double(), weight.double(), 1e-6)
        torch.testing.assert_close(got[row], expected.float())
    half = rms_norm(x.to(torch.bfloat16), weight.to(torch.bfloat16), 1e-6)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), got, atol=3e-2, rtol=2e-2)


def test_rotary_rotates_pairs_and_keeps_relative_positions() -> None:
    x = torch.randn(4, 2, 8)  # [T, heads, D]
    positions = torch.tensor([0, 1, 7, 1000])
    got = rotary(x, positions, 10000.0)
    torch.testing.assert_close(got[0], x[0])  # position 0: identity
    for t, pos in enumerate(positions.tolist()):
        for h in range(2):
            expected = naive_rotate(x[t, h].double(), pos, 10000.0)
            torch.testing.assert_close(got[t, h].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))  # a rotation
    # <rot(q, m), rot(k, n)> depends on m - n only
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)

    def dot(m: int, n: int) -> float:
        rq = rotary(q, torch.tensor([m]), 10000.0)
        rk = rotary(k, torch.tensor([n]), 10000.0)
        return float((rq * rk).sum())

    assert dot(5, 2) == pytest.approx(dot(103, 100), abs=1e-4)


# ----- the model against the naive forward --------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_matches_the_naive_forward(name: str) -> None:
    model = MoEDecoder(CONFIGS[name], seed=3)
    tokens = PROMPT[:9]
    expected_logits, expected_kv = naive_forward(model, tokens)
    for length in (1, 4, 9):
        logits, kv = model.prefill(torch.tensor(tokens[:length]))
        assert logits.shape == (model.config.vocab_size,) and logits.dtype == torch.float32
        torch.testing.assert_close(
            logits.double(), expected_logits[length - 1], atol=1e-4, rtol=1e-4
        )
    for (k, v), (ek, ev) in zip(kv, expected_kv, strict=True):
        assert k.shape == (9, model.config.num_kv_heads, model.config.head_dim)
        torch.testing.assert_close(k.double(), ek, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v.double(), ev, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-dense"])
def test_batched_decode_over_the_paged_cache_matches_prefill_of_the_longer_sequence(
    name: str,
) -> None:
    model = MoEDecoder(CONFIGS[name], seed=1)
    prompts = [PROMPT[:5], PROMPT[:12], PROMPT[3:4]]
    cache = PagedKVCache(model.config, num_blocks=32, block_size=4)
    seq_ids = [7, 3, 11]
    cache.allocate(99, 6)  # someone else's pages first, so block tables are not trivial
    for seq_id, prompt in zip(seq_ids, prompts, strict=True):
        _, kv = model.prefill(torch.tensor(prompt))
        for layer, (k, v) in enumerate(kv):
            cache.write(seq_id, layer, 0, k, v)
    sequences = [list(p) for p in prompts]
    for step in range(6):  # crosses page boundaries for every sequence
        tokens = [(17 * step + 5 * i) % 256 for i in range(3)]
        positions = [len(s) for s in sequences]
        logits = model.decode_step(torch.tensor(tokens), torch.tensor(positions), cache, seq_ids)
        assert logits.shape == (3, model.config.vocab_size)
        for i, token in enumerate(tokens):
            sequences[i].append(token)
            expected, _ = model.prefill(torch.tensor(sequences[i]))
            torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=1e-4)
    assert cache.context_lens(seq_ids).tolist() == [len(s) for s in sequences]


@pytest.mark.parametrize("name", ["tiny", "tiny-dense"])
def test_greedy_generation_equals_recomputing_full_attention(name: str) -> None:
    model = MoEDecoder(CONFIGS[name], seed=0)
    got = generate_greedy(model, PROMPT, 24, block_size=4)
    sequence, expected = list(PROMPT), []
    for _ in range(24):
        logits, _ = model.prefill(torch.tensor(sequence))
        expected.append(int(logits.argmax()))
        sequence.append(expected[-1])
    assert got == expected
    assert len(set(got)) >= 6, f"degenerate greedy output {got}"


def test_generation_stops_at_eos_and_is_deterministic_from_the_seed() -> None:
    first = generate_greedy(MoEDecoder(TINY, seed=5), PROMPT, 20)
    assert generate_greedy(MoEDecoder(TINY, seed=5), PROMPT, 20) == first
    assert generate_greedy(MoEDecoder(TINY, seed=6), PROMPT, 20) != first
    eos = first[4]
    stopped = generate_greedy(MoEDecoder(TINY, seed=5), PROMPT, 20, eos_token=eos)
    assert stopped == first[: first.index(eos) + 1]
    assert generate_greedy(MoEDecoder(TINY, seed=5), PROMPT, 0) == []


def test_same_seed_same_weights_parameter_by_parameter() -> None:
    a, b = MoEDecoder(TINY, seed=2).state_dict(), MoEDecoder(TINY, seed=2).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert sum(t.numel() for t in a.values()) == TINY.num_parameters()


@pytest.mark.parametrize("config", [TINY, DENSE], ids=["moe", "dense"])
def test_attention_and_ffn_parts_hold_the_whole_models_weights_and_nothing_else(
    config: ModelConfig,
) -> None:
    whole = MoEDecoder(config, seed=3).state_dict()
    attention = MoEDecoder(config, seed=3, part="attention").state_dict()
    ffn = MoEDecoder(config, seed=3, part="ffn").state_dict()
    assert set(attention) | set(ffn) == set(whole) and not set(attention) & set(ffn)
    assert all(".ffn." not in name for name in attention)
    assert all(name.startswith("layers.") and ".ffn." in name for name in ffn)
    assert all(torch.equal(t, whole[n]) for part in (attention, ffn) for n, t in part.items())
    held = sum(t.numel() for t in attention.values())
    assert held < config.num_parameters()  # the attention worker's memory saving


def test_attention_and_ffn_parts_compose_to_the_whole_model() -> None:
    """PDAF's split: the attention part's passes with the FFN part's `ffn` give the same
    logits as the whole model, bit for bit."""
    whole = MoEDecoder(TINY, seed=1)
    attention = MoEDecoder(TINY, seed=1, part="attention")
    ffn = MoEDecoder(TINY, seed=1, part="ffn")
    tokens = torch.tensor(PROMPT)
    positions = torch.arange(len(PROMPT))
    h = attention.embed(tokens)
    for layer in range(TINY.num_layers):
        h, _, _ = attention.attention_prefill(layer, h, positions)
        h = ffn.ffn(layer, h)
    expected, _ = whole.prefill(tokens)
    assert torch.equal(attention.logits(h[-1:])[0], expected)
    with pytest.raises(RuntimeError, match="holds only its attention part, which has no FFN"):
        attention.ffn(0, h)
    with pytest.raises(RuntimeError, match="holds only its ffn part, which has no attention"):
        ffn.attention_prefill(0, h, positions)
    with pytest.raises(RuntimeError, match="no embedding or lm head"):
        ffn.embed(tokens)
    with pytest.raises(ValueError, match="unknown model part 'experts'"):
        MoEDecoder(TINY, part="experts")  # type: ignore[arg-type]


def test_bfloat16_model_runs_and_stays_close_to_float32() -> None:
    config = ModelConfig.from_dict({**TINY.to_dict(), "dtype": "bfloat16"})
    model = MoEDecoder(config, seed=0)
    assert model.dtype == torch.bfloat16
    logits, kv = model.prefill(torch.tensor(PROMPT))
    assert kv[0][0].dtype == torch.bfloat16
    reference, _ = MoEDecoder(TINY, seed=0).prefill(torch.tensor(PROMPT))
    assert float((logits - reference).abs().max()) < 0.15 * float(reference.abs().max())
    assert len(generate_greedy(model, PROMPT, 8)) == 8


# ----- safetensors --------------------------------------------------------------------------------
def test_safetensors_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = MoEDecoder(TINY, seed=4)
    path = tmp_path / "tiny.safetensors"
    model.save_safetensors(path)
    loaded = MoEDecoder.from_safetensors(path)
    assert loaded.config == TINY
    a, _ = model.prefill(torch.tensor(PROMPT))
    b, _ = loaded.prefill(torch.tensor(PROMPT))
    assert torch.equal(a, b)
    assert generate_greedy(loaded, PROMPT, 10) == generate_greedy(model, PROMPT, 10)
    explicit = MoEDecoder.from_safetensors(path, config=TINY)
    assert torch.equal(explicit.prefill(torch.tensor(PROMPT))[0], a)
    with pytest.raises(ValueError, match=r"lacks \d+ tensors of the model's all part"):
        MoEDecoder.from_safetensors(path, config=DENSE)


def test_a_part_loads_only_its_tensors_from_a_whole_models_file(tmp_path: Path) -> None:
    model = MoEDecoder(TINY, seed=4)
    path = tmp_path / "tiny.safetensors"
    model.save_safetensors(path)
    whole = model.state_dict()
    for part in ("attention", "ffn"):
        loaded = MoEDecoder.from_safetensors(path, part=part)
        held = loaded.state_dict()
        assert held and all(torch.equal(held[name], whole[name]) for name in held)
    ffn_only = tmp_path / "ffn.safetensors"
    MoEDecoder(TINY, seed=4, part="ffn").save_safetensors(ffn_only)
    with pytest.raises(ValueError, match=r"lacks \d+ tensors of the model's attention part"):
        MoEDecoder.from_safetensors(ffn_only, part="attention")


def test_safetensors_without_metadata_needs_a_config(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({"embedding": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="pass the ModelConfig"):
        MoEDecoder.from_safetensors(path)


# ----- config -------------------------------------------------------------------------------------
def test_config_round_trips_through_json_and_refuses_unknown_fields() -> None:
    for config in MODEL_PRESETS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="num_expert"):
        ModelConfig.from_dict({**TINY.to_dict(), "num_expert": 3})


def test_config_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig(num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="float8")


def test_presets() -> None:
    tiny = MODEL_PRESETS["tiny"]
    assert tiny.is_moe and (tiny.num_experts, tiny.num_experts_per_tok) == (4, 2)
    assert tiny.num_shared_experts == 1 and tiny.num_layers == 2
    assert not MODEL_PRESETS["tiny-dense"].is_moe
    small = MODEL_PRESETS["small"]
    assert small.is_moe and small.dtype == "bfloat16"
    assert 0.8e9 < small.num_parameters() < 1.2e9
