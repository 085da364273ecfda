"""A compact MoE decoder, cut at the seams disaggregated serving needs.

One `MoEDecoder` serves every role: a prefill worker runs `prefill` (full causal attention
over the prompt) and ships the per-layer K/V; a decode worker writes them into its
`PagedKVCache` and runs `decode_step` over a batch; in PDAF an attention worker runs
`embed`/`attention_decode`/`logits` and an FFN worker runs `ffn`, exchanging `h` per layer.

Architecture: RMSNorm (float32 statistics), rotary embeddings in the neox layout (the two
halves of each head rotated together), grouped-query attention, and per layer either a
dense SwiGLU FFN or an MoE FFN (softmax router over all experts, top-k, the top-k weights
renormalized to sum to 1, plus shared experts that every token passes through). The lm head
is untied from the embedding: with random weights a tied head makes each token its own
likeliest successor, and greedy decoding would repeat one token forever.

Parameter names (stable: safetensors files and the tests use them): `embedding`, `norm`,
`lm_head`, and per layer `layers.{i}.attn.{norm,wq,wk,wv,wo}` and either
`layers.{i}.ffn.{norm,gate_up,down}` (dense) or `layers.{i}.ffn.{norm,router,experts_gate_up,
experts_down,shared_gate_up,shared_down}` (MoE). Projections are `[out, in]` (y = x @ W.T);
gate_up stacks the gate rows over the up rows; the shared experts are stored concatenated as
one SwiGLU of width `num_shared_experts * intermediate_size` (the same function as their sum).

A model may hold one `part` of the weights: an attention worker never runs the FFN (the FFN
workers do), so it holds `attention` (embedding, attention, final norm, lm head) and an FFN
worker holds `ffn` (the FFN layers only). Random weights are drawn per parameter from a seed
derived from the model seed and the parameter's name, so a part holds exactly the full model's
values for its parameters without drawing the others.

A model may also hold one tensor-parallel `shard` of them (`workers/tensor_parallel.py`): its
share of the heads and of the FFN width, sliced from the whole parameters (drawn or loaded
whole, one at a time). Such a model's attention and FFN outputs are partial sums, which it
passes through `reduce` (an all-reduce over the group, set by the caller) before the residual.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol, get_args

import torch
from torch import nn
from torch.nn import functional

from kleave.workers.config import ModelConfig
from kleave.workers.kernels import fused_moe, paged_decode_attention
from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.tensor_parallel import (
    WHOLE,
    LocalSizes,
    Shard,
    full_shape,
    local_sizes,
    shard_tensor,
)

METADATA_KEY = "kleave.model_config"
RoutedExperts = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""`experts(layer, x, topk_weights, topk_ids)` -> the routed experts' weighted sum per row."""

ModelPart = Literal["all", "attention", "ffn"]
MODEL_PARTS: tuple[str, ...] = get_args(ModelPart)


class Decoder(Protocol):
    """What the servers call on a model: a ``MoEDecoder``, or rank 0 of a tensor-parallel
    group (``serve.tensor_parallel.TensorParallelDecoder``) that runs each call on every
    rank's shard. K/V in and out are always the whole model's ``[T, Hkv, D]``."""

    config: ModelConfig
    part: ModelPart

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def attention_prefill(
        self,
        layer: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def prefill_positions(
        self, tokens: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> torch.Tensor: ...

    def attention_decode(
        self,
        layer: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        seq_ids: list[int],
    ) -> torch.Tensor: ...

    def ffn(
        self, layer: int, h: torch.Tensor, experts: RoutedExperts | None = None
    ) -> torch.Tensor: ...

    def logits(self, h: torch.Tensor) -> torch.Tensor: ...

    def prefill(
        self,
        tokens: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]: ...

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        seq_ids: list[int],
    ) -> torch.Tensor: ...


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of one parameter: independent of every other parameter's draw."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a ModelConfig's `dtype` string names."""
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, with the statistics in float32 (bf16 sums lose the small terms)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate `x` `[T, heads, D]` by its positions `[T]`, neox style: dimension i pairs with
    i + D/2 at frequency theta^(-2i/D). Angles in float32 so long positions stay exact."""
    dim = x.shape[-1]
    half = dim // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / dim)
    angles = positions.to(device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos = angles.cos()[:, None, :]
    sin = angles.sin()[:, None, :]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
    result: torch.Tensor = (functional.silu(gate) * up) @ down.t()
    return result


def _param(c: ModelConfig, *shape: int) -> nn.Parameter:
    """An uninitialized parameter in the config's dtype, on the current default device."""
    return nn.Parameter(torch.empty(shape, dtype=torch_dtype(c.dtype)), requires_grad=False)


class _Attention(nn.Module):
    def __init__(self, c: ModelConfig, n: LocalSizes) -> None:
        super().__init__()
        self.norm = _param(c, c.hidden_size)
        self.wq = _param(c, n.num_heads * c.head_dim, c.hidden_size)
        self.wk = _param(c, n.num_kv_heads * c.head_dim, c.hidden_size)
        self.wv = _param(c, n.num_kv_heads * c.head_dim, c.hidden_size)
        self.wo = _param(c, c.hidden_size, n.num_heads * c.head_dim)


class _DenseFFN(nn.Module):
    def __init__(self, c: ModelConfig, n: LocalSizes) -> None:
        super().__init__()
        self.norm = _param(c, c.hidden_size)
        self.gate_up = _param(c, 2 * n.intermediate_size, c.hidden_size)
        self.down = _param(c, c.hidden_size, n.intermediate_size)


class _MoEFFN(nn.Module):
    def __init__(self, c: ModelConfig, n: LocalSizes) -> None:
        super().__init__()
        self.norm = _param(c, c.hidden_size)
        self.router = _param(c, c.num_experts, c.hidden_size)
        self.experts_gate_up = _param(c, c.num_experts, 2 * n.moe_intermediate_size, c.hidden_size)
        self.experts_down = _param(c, c.num_experts, c.hidden_size, n.moe_intermediate_size)
        shared = c.num_shared_experts * n.intermediate_size
        self.shared_gate_up: nn.Parameter | None = None
        self.shared_down: nn.Parameter | None = None
        if shared:
            self.shared_gate_up = _param(c, 2 * shared, c.hidden_size)
            self.shared_down = _param(c, c.hidden_size, shared)


class _Layer(nn.Module):
    def __init__(self, c: ModelConfig, part: ModelPart, n: LocalSizes) -> None:
        super().__init__()
        self.attn: _Attention | None = None if part == "ffn" else _Attention(c, n)
        self.ffn: _DenseFFN | _MoEFFN | None = None
        if part != "attention":
            self.ffn = _MoEFFN(c, n) if c.is_moe else _DenseFFN(c, n)


def _no_reduce(partial: torch.Tensor) -> torch.Tensor:
    return partial


def _init_std(name: str, shape: tuple[int, ...], c: ModelConfig) -> float | None:
    """The init std of a parameter, None for norm weights (ones).

    Inputs are scaled by 1/sqrt(fan_in) so every layer mixes; output projections (wo, down)
    further by 1/sqrt(2 * layers) so the residual stream does not grow with depth; the
    embedding has unit std and the lm head 1/sqrt(hidden), so logits have a std near 1:
    random-weight greedy decoding then follows the context instead of a fixed point.
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "norm":
        return None
    if leaf == "embedding":
        return 1.0
    depth = 1.0 / math.sqrt(2 * c.num_layers)
    fan_in = shape[-1]
    if leaf in ("wo", "down", "experts_down", "shared_down"):
        return depth / math.sqrt(fan_in)
    return 1.0 / math.sqrt(fan_in)


class MoEDecoder(nn.Module):
    """The decoder. All compute methods run under torch.inference_mode."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        random_init: bool = True,
        part: ModelPart = "all",
        shard: Shard = WHOLE,
    ) -> None:
        """Random weights from `seed`, drawn on the CPU in float32 parameter by parameter, so
        every worker (CPU or GPU) that builds the model (or a part or shard of it) from the
        same seed holds the same weights. `random_init=False` leaves them uninitialized (for
        loading)."""
        super().__init__()
        if part not in MODEL_PARTS:
            raise ValueError(f"unknown model part {part!r}: one of {', '.join(MODEL_PARTS)}")
        self.config = config
        self.part: ModelPart = part
        self.shard = shard
        self.local = local_sizes(config, shard)
        # Sums a partial attention/FFN output over the tensor-parallel group (whole: as is).
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduce
        c = config
        self.embedding: nn.Parameter | None = None
        self.norm: nn.Parameter | None = None
        self.lm_head: nn.Parameter | None = None
        with torch.device(device):  # allocated in place: a 1B model never exists twice
            if part != "ffn":
                self.embedding = _param(c, c.vocab_size, c.hidden_size)
            self.layers = nn.ModuleList(_Layer(c, part, self.local) for _ in range(c.num_layers))
            if part != "ffn":
                self.norm = _param(c, c.hidden_size)
                self.lm_head = _param(c, c.vocab_size, c.hidden_size)
        if random_init:
            with torch.no_grad():
                for name, param in self.named_parameters():
                    shape = full_shape(name, tuple(param.shape), shard)
                    std = _init_std(name, shape, c)
                    if std is None:
                        param.fill_(1.0)
                    else:  # drawn whole on the CPU in float32, one parameter at a time
                        generator = torch.Generator().manual_seed(parameter_seed(seed, name))
                        drawn = torch.empty(shape).normal_(0.0, std, generator=generator)
                        param.copy_(shard_tensor(name, drawn, shard))

    def _layer(self, index: int) -> _Layer:
        layer = self.layers[index]
        assert isinstance(layer, _Layer)
        return layer

    def _missing(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"this model holds only its {self.part} part, which has no {what} (an attention "
            "worker calls the FFN workers; an FFN worker runs only the FFN)"
        )

    def _attn(self, index: int) -> _Attention:
        attn = self._layer(index).attn
        if attn is None:
            raise self._missing("attention")
        return attn

    def _ffn(self, index: int) -> _DenseFFN | _MoEFFN:
        ffn = self._layer(index).ffn
        if ffn is None:
            raise self._missing("FFN")
        return ffn

    def _head(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """(embedding, final norm, lm head)."""
        if self.embedding is None or self.norm is None or self.lm_head is None:
            raise self._missing("embedding or lm head")
        return self.embedding, self.norm, self.lm_head

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ----- safetensors ------------------------------------------------------------------------
    def save_safetensors(self, path: str | Path) -> None:
        """Write the weights with the config as metadata (`from_safetensors` needs no config)."""
        from safetensors.torch import save_file

        if self.shard.world > 1:
            raise ValueError("a tensor-parallel shard holds slices: save the whole model")

        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(self.config.to_dict())})

    @classmethod
    def from_safetensors(
        cls,
        path: str | Path,
        config: ModelConfig | None = None,
        device: str | torch.device = "cpu",
        part: ModelPart = "all",
        shard: Shard = WHOLE,
    ) -> MoEDecoder:
        """Load weights (only `part`'s tensors are read, and of those `shard`'s slice is
        kept); the config comes from the file's metadata unless given."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(torch.device(device))) as handle:
            if config is None:
                metadata = handle.metadata() or {}
                if METADATA_KEY not in metadata:
                    raise ValueError(
                        f"{path} has no {METADATA_KEY!r} metadata; pass the ModelConfig explicitly"
                    )
                config = ModelConfig.from_dict(json.loads(metadata[METADATA_KEY]))
            model = cls(config, device=device, random_init=False, part=part, shard=shard)
            wanted = list(model.state_dict())
            missing = sorted(set(wanted) - set(handle.keys()))
            if missing:
                shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
                raise ValueError(
                    f"{path} lacks {len(missing)} tensors of the model's {part} part: {shown}"
                )
            tensors = {name: shard_tensor(name, handle.get_tensor(name), shard) for name in wanted}
        model.load_state_dict(tensors, strict=True)
        return model

    # ----- pieces -----------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """long `[T]` -> `[T, hidden]`."""
        embedding, _, _ = self._head()
        return functional.embedding(tokens.to(self.device), embedding)

    def _qkv(
        self, layer: int, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        attn = self._attn(layer)
        x = rms_norm(h, attn.norm, c.rms_norm_eps)
        n = self.local
        q = (x @ attn.wq.t()).view(-1, n.num_heads, c.head_dim)
        k = (x @ attn.wk.t()).view(-1, n.num_kv_heads, c.head_dim)
        v = (x @ attn.wv.t()).view(-1, n.num_kv_heads, c.head_dim)
        return rotary(q, positions, c.rope_theta), rotary(k, positions, c.rope_theta), v

    @torch.inference_mode()
    def attention_prefill(
        self,
        layer: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sequence's causal self-attention: `h` `[T, hidden]` -> (h + attention, rotated
        K, V). Attends within these T tokens and, with `past` (the K/V `[P, Hkv, D]` of the P
        positions before them, e.g. a cached prefix; `positions` then start at P, see
        `prefill_positions`), over those too. K and V are the whole sequence's: `[P + T, Hkv,
        D]` (`[T, Hkv, D]` without a past), the concatenation the attention needed anyway."""
        q, k, v = self._qkv(layer, h, positions)
        out, keys, values = self._attend(q, k, v, past)
        return h + self.reduce(out @ self._attn(layer).wo.t()), keys, values

    @torch.inference_mode()
    def attention_prefill_packed(
        self,
        layer: int,
        h: torch.Tensor,
        spans: Sequence[tuple[int, int]],
        positions: torch.Tensor,
        pasts: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """`attention_prefill` of several sequences packed in `h` (sequence i is rows
        `spans[i]`, at `positions` rows of its own): one QKV and one output projection for
        all, the attention itself per sequence. -> (h + attention, each sequence's K/V)."""
        q, k, v = self._qkv(layer, h, positions)
        outs, kv = [], []
        for (lo, hi), past in zip(spans, pasts, strict=True):
            out, keys, values = self._attend(q[lo:hi], k[lo:hi], v[lo:hi], past)
            outs.append(out)
            kv.append((keys, values))
        return h + self.reduce(torch.cat(outs) @ self._attn(layer).wo.t()), kv

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sequence's causal attention of `q` `[T, H, D]` over its past and `k`/`v`:
        -> (`[T, H * D]` before the output projection, the whole K, V)."""
        c = self.config
        keys, values = (
            (k, v) if past is None else (torch.cat([past[0], k]), torch.cat([past[1], v]))
        )
        tokens = q.shape[0]
        mask = None
        if past is not None:  # token i (position P + i) sees positions 0 .. P + i
            width = keys.shape[0]
            mask = torch.ones(tokens, width, dtype=torch.bool, device=q.device).tril(
                diagonal=width - tokens
            )
        group = c.num_heads // c.num_kv_heads  # the same on every shard
        out = functional.scaled_dot_product_attention(
            q.transpose(0, 1),
            keys.repeat_interleave(group, dim=1).transpose(0, 1),
            values.repeat_interleave(group, dim=1).transpose(0, 1),
            attn_mask=mask,
            is_causal=past is None,
            scale=1.0 / math.sqrt(c.head_dim),
        )  # [H, T, D]
        return out.transpose(0, 1).reshape(tokens, self.local.num_heads * c.head_dim), keys, values

    def prefill_positions(
        self, tokens: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> torch.Tensor:
        """The positions of `tokens` new tokens after `past` (0.. without one)."""
        start = 0 if past is None else past[0][0].shape[0]
        return torch.arange(start, start + tokens, device=self.device)

    @torch.inference_mode()
    def attention_decode(
        self,
        layer: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        seq_ids: list[int],
    ) -> torch.Tensor:
        """One new token per sequence: write its K/V into `cache` at `positions` `[B]`, attend
        over the sequence's positions 0..position through the paged cache; h + attention.

        `positions` is read on the host (cheapest when it lives on the CPU); each must be the
        sequence's written length in this layer (append) or less (overwrite).
        """
        c = self.config
        pos_list = [int(p) for p in positions.tolist()]
        q, k, v = self._qkv(layer, h, positions)
        cache.write_tokens(seq_ids, layer, pos_list, k, v)
        context_lens = torch.tensor([p + 1 for p in pos_list], dtype=torch.int32)
        out = paged_decode_attention(
            q,
            cache.k[layer],
            cache.v[layer],
            cache.block_table(seq_ids),
            context_lens.to(cache.device),
            1.0 / math.sqrt(c.head_dim),
        )
        out = out.to(h.dtype).reshape(h.shape[0], self.local.num_heads * c.head_dim)
        return h + self.reduce(out @ self._attn(layer).wo.t())

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router on normed `x`: softmax over all experts in float32, top-k, the top-k
        weights renormalized to sum to 1. -> (weights float32 `[N, k]`, ids long `[N, k]`)."""
        ffn = self._ffn(layer)
        assert isinstance(ffn, _MoEFFN)
        probs = torch.softmax(x.float() @ ffn.router.float().t(), dim=-1)
        weights, ids = torch.topk(probs, self.config.num_experts_per_tok, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

    @torch.inference_mode()
    def ffn(
        self, layer: int, h: torch.Tensor, experts: RoutedExperts | None = None
    ) -> torch.Tensor:
        """`[N, hidden]` -> h + FFN(norm(h)): routed experts via fused_moe plus the shared
        experts, or the dense SwiGLU. `experts(layer, x, weights, ids)` replaces the routed
        experts' fused_moe (expert parallelism runs them on several ranks)."""
        ffn = self._ffn(layer)
        x = rms_norm(h, ffn.norm, self.config.rms_norm_eps)
        if isinstance(ffn, _DenseFFN):
            return h + self.reduce(_swiglu(x, ffn.gate_up, ffn.down))
        weights, ids = self.route(layer, x)
        if experts is not None:
            out = experts(layer, x, weights, ids)
        else:
            out = fused_moe(x, ffn.experts_gate_up, ffn.experts_down, weights, ids)
        if ffn.shared_gate_up is not None and ffn.shared_down is not None:
            out = out + _swiglu(x, ffn.shared_gate_up, ffn.shared_down)
        return h + self.reduce(out)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm head: `[N, hidden]` -> float32 `[N, vocab]`."""
        _, norm, lm_head = self._head()
        return (rms_norm(h, norm, self.config.rms_norm_eps) @ lm_head.t()).float()

    # ----- whole passes -----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        tokens: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One sequence: the last position's logits `[vocab]` and each layer's (K, V)
        `[P + T, Hkv, D]` (what a prefill worker sends). From position 0, or after `past`: the
        K/V of P earlier positions per layer (a cached prefix), which only `tokens` follow.
        `on_layer(layer, k, v)` gets each layer's K/V the moment it exists (a KV sender)."""
        tokens = tokens.to(self.device)
        positions = self.prefill_positions(tokens.shape[0], past)
        h = self.embed(tokens)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in range(self.config.num_layers):
            before = None if past is None else past[layer]
            h, k, v = self.attention_prefill(layer, h, positions, before)
            if on_layer is not None:
                on_layer(layer, k, v)
            kv.append((k, v))
            h = self.ffn(layer, h)
        return self.logits(h[-1:])[0], kv

    @torch.inference_mode()
    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        seq_ids: list[int],
    ) -> torch.Tensor:
        """One token per sequence `[B]` at `positions` `[B]` -> float32 logits `[B, vocab]`."""
        h = self.embed(tokens)
        for layer in range(self.config.num_layers):
            h = self.attention_decode(layer, h, positions, cache, seq_ids)
            h = self.ffn(layer, h)
        return self.logits(h)


class WeightsConfigError(ValueError):
    """A weights file whose embedded config is not the model the worker serves."""


def load_decoder(
    config: ModelConfig,
    *,
    seed: int,
    weights: str | Path | None,
    device: str | torch.device,
    part: ModelPart = "all",
    shard: Shard = WHOLE,
    serves: str = "the worker serves",
) -> MoEDecoder:
    """What every worker process holds of the model: read from ``weights`` (which must hold
    ``config``; ``serves`` says who wants it in the error), else drawn from ``seed``."""
    if weights is None:
        return MoEDecoder(config, seed=seed, device=device, part=part, shard=shard)
    model = MoEDecoder.from_safetensors(weights, device=device, part=part, shard=shard)
    if model.config != config:
        raise WeightsConfigError(
            f"--weights {weights} holds model config {model.config.to_dict()}, but {serves} "
            f"{config.to_dict()}"
        )
    return model


def generate_greedy(
    model: MoEDecoder,
    prompt: list[int],
    max_new_tokens: int,
    *,
    eos_token: int | None = None,
    block_size: int = 16,
) -> list[int]:
    """The single-process reference the PD/PDAF paths must reproduce: prefill the prompt,
    write its K/V into a fresh PagedKVCache, then decode_step one token at a time (argmax).

    Returns the generated tokens (not the prompt); stops after `max_new_tokens` or after
    emitting `eos_token` (which is included).
    """
    if not prompt:
        raise ValueError("generate_greedy needs a non-empty prompt")
    if max_new_tokens <= 0:
        return []
    total = len(prompt) + max_new_tokens
    cache = PagedKVCache(
        model.config,
        num_blocks=-(-total // block_size),
        block_size=block_size,
        device=model.device,
        dtype=model.dtype,
    )
    seq = 0
    logits, kv = model.prefill(torch.tensor(prompt, dtype=torch.long))
    for layer, (k, v) in enumerate(kv):
        cache.write(seq, layer, 0, k, v)
    out = [int(logits.argmax())]
    while len(out) < max_new_tokens and out[-1] != eos_token:
        position = len(prompt) + len(out) - 1
        step = model.decode_step(
            torch.tensor([out[-1]], dtype=torch.long),
            torch.tensor([position], dtype=torch.long),
            cache,
            [seq],
        )
        out.append(int(step[0].argmax()))
    return out
