"""Fused MoE in Triton: two grouped GEMMs over all experts at once.

1. Align (torch, on the device, no host sync): the T*k (token, expert) pairs are sorted by
   expert and each expert's segment is padded to a multiple of BLOCK_M, so every BLOCK_M row
   block belongs to exactly one expert (`sorted_pairs`, `block_experts`); padding rows hold
   the sentinel T*k. The launch grid covers the worst case and blocks past the real total
   return at once, so the grid size needs no device-to-host read.
2. Gate/up grouped GEMM: each program gathers its block's token rows of x (the permutation
   is never materialized), multiplies by its expert's gate and up tiles into two float32
   accumulators, and stores SiLU(gate) * up for its pairs (SiLU-and-mul fused in the epilogue).
3. Down grouped GEMM: the activations times the expert's down projection, scaled by each
   pair's top-k weight, stored per pair; un-permute is then the sum over each token's k rows.

Tile sizes come from the tokens per expert (small blocks for decode batches, large for
prefill); they are heuristics in the range vLLM's defaults use, not tuned per GPU.
"""

# Triton conventions: compile-time constants are UPPER_CASE and kernels take their pointers,
# sizes and strides positionally.
# ruff: noqa: N803, PLR0917

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int  # of the down GEMM; the gate/up GEMM uses half (it keeps two accumulators)
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def choose_config(num_pairs: int, num_experts: int) -> TileConfig:
    """Tiles by the average rows per expert."""
    per_expert = num_pairs / max(1, num_experts)
    if per_expert <= 16:
        return TileConfig(16, 64, 128, 1, 4, 3)
    if per_expert <= 48:
        return TileConfig(32, 64, 64, 8, 4, 4)
    if per_expert <= 160:
        return TileConfig(64, 128, 64, 8, 8, 3)
    return TileConfig(128, 128, 64, 8, 8, 3)


@dataclass(frozen=True)
class Alignment:
    sorted_pairs: torch.Tensor  # int32 [num_blocks * block_m]: pair index t*k + j, or sentinel
    block_experts: torch.Tensor  # int32 [num_blocks]
    total_rows: torch.Tensor  # int32 [1]: rows in use (a multiple of block_m)
    num_blocks: int  # the grid's worst case


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort pairs by expert and pad each expert's rows to a multiple of block_m."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(num_pairs, device=device) - count_start[expert_of]
    # at most min(E, pairs) experts are used, each wasting under block_m rows
    capacity = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    num_blocks = max(1, -(-capacity // block_m))
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[padded_start[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)
    block_experts = block_experts.clamp_(max=num_experts - 1).to(torch.int32)
    total = padded_end[-1:].to(torch.int32)
    return Alignment(sorted_pairs, block_experts, total, num_blocks)


@triton.jit
def _block_coordinates(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row blocks sweep the columns together, so an expert's weight
    # tiles are read while still in L2 by the blocks of that expert.
    in_group = GROUP_M * num_pid_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    act_ptr,
    sorted_pairs_ptr,
    block_experts_ptr,
    total_rows_ptr,
    num_pairs,
    top_k,
    num_pid_m,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_wk,
    stride_am,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, pid_n = _block_coordinates(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_rows_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m)
    m_mask = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :]
    gate_ptrs = (
        w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    )
    up_ptrs = gate_ptrs + N * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        gate = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        up = tl.load(up_ptrs, mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    act_ptrs = act_ptr + pairs.to(tl.int64)[:, None] * stride_am + offs_n[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    act_ptr,
    w_ptr,
    out_ptr,
    weights_ptr,
    sorted_pairs_ptr,
    block_experts_ptr,
    total_rows_ptr,
    num_pairs,
    num_pid_m,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, pid_n = _block_coordinates(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_rows_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m)
    m_mask = pairs < num_pairs
    rows = pairs.to(tl.int64)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    weight = tl.load(weights_ptr + rows, mask=m_mask, other=0.0)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fused_moe_triton(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Launch align, gate/up and down (shapes as in `fused_moe`)."""
    tokens, hidden = x.shape
    experts, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    num_pairs = tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    w_gate_up = w_gate_up.to(x.dtype)
    w_down = w_down.to(x.dtype)
    if config is None:
        config = choose_config(num_pairs, experts)
    aligned = align_by_expert(topk_ids, experts, config.block_m)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    act = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    per_pair = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    gate_up_n = max(16, config.block_n // 2)
    grid_gate_up = (aligned.num_blocks * triton.cdiv(inter, gate_up_n),)
    _gate_up_kernel[grid_gate_up](
        x,
        w_gate_up,
        act,
        aligned.sorted_pairs,
        aligned.block_experts,
        aligned.total_rows,
        num_pairs,
        top_k,
        aligned.num_blocks,
        inter,
        hidden,
        x.stride(0),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        w_gate_up.stride(2),
        act.stride(0),
        BLOCK_M=config.block_m,
        BLOCK_N=gate_up_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        PRECISION=precision,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    grid_down = (aligned.num_blocks * triton.cdiv(hidden, config.block_n),)
    _down_kernel[grid_down](
        act,
        w_down,
        per_pair,
        weights,
        aligned.sorted_pairs,
        aligned.block_experts,
        aligned.total_rows,
        num_pairs,
        aligned.num_blocks,
        hidden,
        inter,
        act.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        w_down.stride(2),
        per_pair.stride(0),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        PRECISION=precision,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    # un-permute: each token's k weighted rows summed (float32 accumulation inside torch.sum)
    return per_pair.view(tokens, top_k, hidden).sum(dim=1)
