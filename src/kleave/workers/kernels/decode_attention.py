"""Paged decode attention: one query token per sequence against its paged KV cache.

Decode attention is memory-bound (each K/V byte is read once per step for a handful of
FLOPs), so what matters is reading the pages at full bandwidth: the Triton kernel
(`_triton_decode`) splits long contexts across programs FlashDecoding-style and merges the
partial softmaxes; this module's reference gathers the pages and computes in float32, and is
what the CPU path runs and what the kernel is tested against.

Shapes: q `[B, H, D]`; k_cache, v_cache `[N, block_size, Hkv, D]`; block_tables int32
`[B, M]`; context_lens int32 `[B]`, each at least 1; H a multiple of Hkv (grouped-query
attention: query head h reads KV head `h // (H // Hkv)`). Returns `[B, H, D]` in q's dtype.
"""

from __future__ import annotations

import torch


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [B, H, D] and k/v caches [N, block_size, Hkv, D], got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != dim or heads % kv_heads:
        raise ValueError(
            f"head_dim {k_cache.shape[3]} must equal q's {dim} and H ({heads}) be a multiple "
            f"of Hkv ({kv_heads})"
        )
    if block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(
            f"block_tables [B, M] and context_lens [B] must match the batch of {batch}, got "
            f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )


def paged_decode_attention_ref(  # noqa: PLR0917 - the kernel API the workers call
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The reference: gather each sequence's pages, masked softmax in float32."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    batch, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    max_len = int(context_lens.max().item()) if batch else 0
    if batch == 0 or max_len == 0:
        return torch.zeros_like(q)
    num_pages = -(-max_len // block_size)
    pages = block_tables[:, :num_pages].long()
    # [B, pages, block_size, Hkv, D] -> [B, Hkv, L, D], L a whole number of pages
    k = k_cache[pages].flatten(1, 2).permute(0, 2, 1, 3).float()
    v = v_cache[pages].flatten(1, 2).permute(0, 2, 1, 3).float()
    qg = q.float().view(batch, kv_heads, group, dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    positions = torch.arange(k.shape[2], device=q.device)
    masked = positions[None, :] >= context_lens.to(q.device).long()[:, None]  # [B, L]
    scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # [B, Hkv, G, D]
    return out.reshape(batch, heads, dim).to(q.dtype)


def paged_decode_attention(  # noqa: PLR0917 - the kernel API the workers call
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The Triton kernel on CUDA tensors, the reference elsewhere (CPU)."""
    if q.is_cuda:
        from kleave.workers.kernels import _triton_decode

        _check(q, k_cache, v_cache, block_tables, context_lens)
        return _triton_decode.paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, context_lens, scale
        )
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
