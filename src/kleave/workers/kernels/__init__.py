"""Decode attention and MoE kernels: a torch reference each, and Triton on CUDA.

The Triton modules (`_triton_decode`, `_triton_moe`) are imported only when a CUDA tensor
reaches a kernel, so machines without a working Triton import this package fine.
"""

from kleave.workers.kernels.decode_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
)
from kleave.workers.kernels.fused_moe import fused_moe, fused_moe_ref, moe_loop_baseline

__all__ = [
    "fused_moe",
    "fused_moe_ref",
    "moe_loop_baseline",
    "paged_decode_attention",
    "paged_decode_attention_ref",
]
