"""The MoE FFN: every token through its top-k SwiGLU experts, weighted and summed.

The shape of the computation the kernel fuses: permute the (token, expert) pairs so each
expert's tokens are contiguous, run a grouped GEMM over the expert segments (gate and up
projections), SiLU-and-mul, a second grouped GEMM (down projection), then un-permute with the
top-k weights. The Triton kernel (`_triton_moe`) does the GEMMs in two launches over all
experts at once; the reference below does the same permutation with one GEMM pair per
expert segment in float32 (the CPU path and the kernel's oracle); `moe_loop_baseline` is the
masked per-expert loop most model code starts from (the benchmark's baseline).

Shapes: x `[T, hidden]`; w_gate_up `[E, 2*I, hidden]` (gate rows, then up rows); w_down
`[E, hidden, I]`; topk_weights float `[T, k]`; topk_ids long `[T, k]`. Returns `[T, hidden]`
in x's dtype: `out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))`,
`e = topk_ids[t, j]`.
"""

from __future__ import annotations

import torch
from torch.nn import functional


def _check(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    tokens, hidden = x.shape
    experts, two_i, hidden_in = w_gate_up.shape
    if hidden_in != hidden or two_i % 2 or w_down.shape != (experts, hidden, two_i // 2):
        raise ValueError(
            f"expected w_gate_up [E, 2*I, {hidden}] and w_down [E, {hidden}, I], got "
            f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != tokens:
        raise ValueError(
            f"topk_ids and topk_weights must both be [{tokens}, k], got "
            f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        )


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    half = gate_up.shape[0] // 2
    projected = x @ gate_up.t()
    return (functional.silu(projected[:, :half]) * projected[:, half:]) @ down.t()


def fused_moe_ref(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Permute by expert (stable sort), one GEMM pair per expert segment, weighted un-permute."""
    _check(x, w_gate_up, w_down, topk_weights, topk_ids)
    tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # pair index t*k + j, grouped by expert
    source_token = order // top_k
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    permuted = x.float()[source_token]
    expert_out = torch.empty_like(permuted)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            segment = slice(start, start + count)
            expert_out[segment] = _swiglu(
                permuted[segment], w_gate_up[expert].float(), w_down[expert].float()
            )
            start += count
    weights = topk_weights.reshape(-1)[order].float()
    out = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, source_token, expert_out * weights[:, None])
    return out.to(x.dtype)


def moe_loop_baseline(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The per-expert Python loop in x's dtype (HF-style): find each expert's tokens with a
    mask, run it, scatter-add the weighted result. The benchmark's baseline."""
    _check(x, w_gate_up, w_down, topk_weights, topk_ids)
    out = torch.zeros_like(x)
    for expert in range(w_gate_up.shape[0]):
        token_idx, slot = torch.where(topk_ids == expert)
        if token_idx.numel() == 0:
            continue
        y = _swiglu(x[token_idx], w_gate_up[expert], w_down[expert])
        weights = topk_weights[token_idx, slot].to(x.dtype)
        out.index_add_(0, token_idx, y * weights[:, None])
    return out


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The Triton grouped GEMM on CUDA tensors, the reference elsewhere (CPU)."""
    if x.is_cuda:
        from kleave.workers.kernels import _triton_moe

        _check(x, w_gate_up, w_down, topk_weights, topk_ids)
        return _triton_moe.fused_moe_triton(x, w_gate_up, w_down, topk_weights, topk_ids)
    return fused_moe_ref(x, w_gate_up, w_down, topk_weights, topk_ids)
