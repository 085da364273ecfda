"""Paged decode attention in Triton, FlashDecoding style.

One program handles one (sequence, KV head, context split): it loads the GROUP query heads
that share the KV head as one tile (so each K/V byte is read once for all of them), walks its
slice of the context BLOCK_N tokens at a time through the block table, and keeps an online
softmax (running max, sum, weighted V) in float32. Long contexts are cut into splits so the
GPU has enough programs even at small batch; a second kernel merges the splits' partial
results by their log-sum-exp. With one split the first kernel writes the output directly.

Imported only for CUDA tensors (or under TRITON_INTERPRET=1, which the tests use to run the
kernel on the CPU), so machines without a working Triton never import it.
"""

# Triton conventions: compile-time constants are UPPER_CASE and kernels take their pointers,
# sizes and strides positionally.
# ruff: noqa: N803, PLR0917

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    context_lens_ptr,
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    scale_log2,
    split_len,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kb,
    stride_kh,
    stride_vn,
    stride_vb,
    stride_vh,
    stride_tb,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_tb
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % PAGE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_rows = page * stride_kn + slot * stride_kb + kv_head * stride_kh
        k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        # scores in log2 units: exp2 is the native instruction
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = page * stride_vn + slot * stride_vb + kv_head * stride_vh
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_tokens = l_i > 0.0
    result = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE_SPLIT:
        out_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = part_out_ptr + seq * stride_pb + split * stride_ps
        tl.store(part + heads[:, None] * stride_ph + offs_d[None, :], result, mask=out_mask)
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(
        part_lse_ptr + seq * stride_lb + head * stride_lh + offs_s,
        mask=s_mask,
        other=float("-inf"),
    )
    weights = tl.exp2(lse - tl.max(lse, 0))  # empty splits (lse -inf) weigh 0
    part = tl.load(
        part_out_ptr
        + seq * stride_pb
        + head * stride_ph
        + offs_s[:, None] * stride_ps
        + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    result = tl.sum(part * weights[:, None], 0) / tl.sum(weights, 0)
    out_ptrs = out_ptr + seq * stride_ob + head * stride_oh + offs_d
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # the interpreter: any modest number exercises the split path
    count: int = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def choose_splits(batch: int, kv_heads: int, max_context: int, num_sms: int) -> int:
    """Enough programs for about eight per SM, but no split shorter than 256 tokens (below
    that the merge costs more than the parallelism gains)."""
    programs = max(1, batch * kv_heads)
    wanted = math.ceil(8 * num_sms / programs)
    return max(1, min(wanted, math.ceil(max_context / 256)))


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launch the kernel (shapes as in `decode_attention`). The context bound comes from the
    block table's width, so nothing waits on the GPU to pick the split count."""
    batch, heads, head_dim = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    out_dtype = q.dtype
    q = q.to(k_cache.dtype).contiguous()
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    block_tables = block_tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty((batch, heads, head_dim), dtype=out_dtype, device=q.device)
    if batch == 0:
        return out
    max_context = max(1, block_tables.shape[1] * page)
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32
    if num_splits is None:
        num_splits = choose_splits(batch, kv_heads, max_context, _num_sms(q.device))
    split_len = math.ceil(math.ceil(max_context / num_splits) / block_n) * block_n
    num_splits = math.ceil(max_context / split_len)
    single = num_splits == 1
    part_shape = (batch, heads, num_splits) if not single else (1, 1, 1)
    part_out = torch.empty((*part_shape, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        part_out,
        part_lse,
        out,
        scale * LOG2E,
        split_len,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HEAD_DIM=head_dim,
        PAGE=page,
        SINGLE_SPLIT=single,
        PRECISION=precision,
        num_warps=4,
        num_stages=2,
    )
    if not single:
        _decode_merge_kernel[(batch, heads)](
            part_out,
            part_lse,
            out,
            num_splits,
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            out.stride(0),
            out.stride(1),
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            HEAD_DIM=head_dim,
            num_warps=4,
        )
    return out
