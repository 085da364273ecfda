"""The kernels against references computed here, independently, in float64 with plain loops.

Paged decode attention: the torch reference (what the CPU path runs) and the Triton kernel
against attention over the context gathered page by page by hand. Fused MoE: the reference,
the per-expert baseline and the Triton kernel against a per-token loop over each token's
experts. The Triton tests (`triton_kernel` in their names) run on CUDA when there is one
(marked gpu); without one, `test_triton_kernels_in_the_interpreter` reruns them on the CPU
under TRITON_INTERPRET=1 (float32 and float16: the interpreter has no bfloat16).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from kleave.workers import bench_kernels
from kleave.workers.kernels import (
    fused_moe,
    fused_moe_ref,
    moe_loop_baseline,
    paged_decode_attention,
    paged_decode_attention_ref,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DEVICE = "cpu" if INTERPRETED else "cuda"
triton_kernel = pytest.mark.skipif(
    not (INTERPRETED or torch.cuda.is_available()),
    reason="needs CUDA (test_triton_kernels_in_the_interpreter covers them on the CPU)",
)
TRITON_DTYPES = [torch.float32, torch.float16] if INTERPRETED else [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


# ----- paged decode attention ---------------------------------------------------------------------
def naive_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: list[list[int]],
    lens: list[int],
    *,
    scale: float,
) -> torch.Tensor:
    """Gather each sequence's context token by token through its pages, then softmax per head."""
    batch, heads, dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        rows = [(tables[b][p // block_size], p % block_size) for p in range(lens[b])]
        keys = torch.stack([k_cache[blk, slot] for blk, slot in rows]).double()  # [L, Hkv, D]
        values = torch.stack([v_cache[blk, slot] for blk, slot in rows]).double()
        for h in range(heads):
            kv_head = h // (heads // kv_heads)
            scores = [float(q[b, h].double() @ keys[i, kv_head]) * scale for i in range(len(rows))]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            for i, w in enumerate(weights):
                out[b, h] += w / total * values[i, kv_head]
    return out


def decode_case(
    *,
    lens: list[int],
    heads: int,
    kv_heads: int,
    dim: int = 16,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]], list[int]]:
    """Random q and pages; each sequence gets random distinct pages of a shared pool."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(pages_per_seq) + 3
    q = torch.randn(len(lens), heads, dim, generator=gen).to(device, dtype)
    shape = (num_blocks, block_size, kv_heads, dim)
    k = torch.randn(shape, generator=gen).to(device, dtype)
    v = torch.randn(shape, generator=gen).to(device, dtype)
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for count in pages_per_seq:
        tables.append(pool[:count])
        pool = pool[count:]
    return q, k, v, tables, lens


def as_tensors(
    tables: list[list[int]], lens: list[int], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return (
        torch.tensor(padded, dtype=torch.int32, device=device),
        torch.tensor(lens, dtype=torch.int32, device=device),
    )


DECODE_SHAPES = [  # (heads, kv_heads, context lengths, block size)
    (4, 4, [1, 16, 17], 16),  # MHA, a single token, exactly one page, one past it
    (8, 2, [1, 5, 31, 40, 64], 16),  # GQA 4:1
    (8, 1, [3, 100], 8),  # MQA, small pages
    (4, 2, [15, 33], 4),
]


@pytest.mark.parametrize(("heads", "kv_heads", "lens", "block_size"), DECODE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_attention_reference_matches_naive_attention(
    heads: int, kv_heads: int, lens: list[int], block_size: int, dtype: torch.dtype
) -> None:
    q, k, v, tables, lens = decode_case(
        lens=lens, heads=heads, kv_heads=kv_heads, block_size=block_size, dtype=dtype
    )
    block_tables, context_lens = as_tensors(tables, lens, "cpu")
    scale = 16**-0.5
    got = paged_decode_attention_ref(q, k, v, block_tables, context_lens, scale)
    assert got.dtype == dtype and got.shape == q.shape
    expected = naive_decode_attention(q, k, v, tables, lens, scale=scale)
    torch.testing.assert_close(got.double(), expected, atol=TOLERANCE[dtype], rtol=0)
    # the CPU dispatch is the reference
    torch.testing.assert_close(
        paged_decode_attention(q, k, v, block_tables, context_lens, scale), got, atol=0, rtol=0
    )


def test_decode_attention_ignores_pages_past_the_context() -> None:
    q, k, v, tables, lens = decode_case(lens=[5, 20], heads=4, kv_heads=2)
    block_tables, context_lens = as_tensors(tables, lens, "cpu")
    before = paged_decode_attention_ref(q, k, v, block_tables, context_lens, 0.25)
    k2, v2 = k.clone(), v.clone()
    k2[tables[0][0], 5:] = 1e4  # same page, past the first sequence's 5 tokens
    v2[tables[0][0], 5:] = -1e4  # stale data of a freed page: finite, and weighted by 0
    after = paged_decode_attention_ref(q, k2, v2, block_tables, context_lens, 0.25)
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)


def test_decode_attention_rejects_mismatched_heads() -> None:
    q = torch.zeros(1, 3, 16)
    k = torch.zeros(2, 16, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention_ref(
            q, k, k, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0
        )


@triton_kernel
@pytest.mark.gpu
@pytest.mark.parametrize(("heads", "kv_heads", "lens", "block_size"), DECODE_SHAPES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_kernel_decode_attention_matches_naive(
    heads: int, kv_heads: int, lens: list[int], block_size: int, dtype: torch.dtype
) -> None:
    from kleave.workers.kernels._triton_decode import paged_decode_attention_triton

    q, k, v, tables, lens = decode_case(
        lens=lens,
        heads=heads,
        kv_heads=kv_heads,
        block_size=block_size,
        dtype=dtype,
        device=TRITON_DEVICE,
    )
    block_tables, context_lens = as_tensors(tables, lens, TRITON_DEVICE)
    expected = naive_decode_attention(q.cpu(), k.cpu(), v.cpu(), tables, lens, scale=0.25)
    for splits in (None, 1, 3):
        got = paged_decode_attention_triton(
            q, k, v, block_tables, context_lens, 0.25, num_splits=splits
        )
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), expected, atol=TOLERANCE[dtype], rtol=0)


@triton_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_kernel_decode_attention_long_contexts_split(dtype: torch.dtype) -> None:
    """Contexts of thousands of tokens at batch 2: the kernel splits them (FlashDecoding)."""
    from kleave.workers.kernels._triton_decode import paged_decode_attention_triton

    lens = [3000, 517] if INTERPRETED else [9000, 4097, 1]
    q, k, v, tables, lens = decode_case(
        lens=lens, heads=8, kv_heads=2, dim=64, dtype=dtype, device=TRITON_DEVICE
    )
    block_tables, context_lens = as_tensors(tables, lens, TRITON_DEVICE)
    expected = paged_decode_attention_ref(
        q.cpu().double(),
        k.cpu().double(),
        v.cpu().double(),
        block_tables.cpu(),
        context_lens.cpu(),
        0.125,
    )
    got = paged_decode_attention_triton(q, k, v, block_tables, context_lens, 0.125)
    torch.testing.assert_close(got.cpu().double(), expected, atol=TOLERANCE[dtype], rtol=0)
    if not INTERPRETED:  # the dispatch picks the kernel for CUDA tensors
        dispatched = paged_decode_attention(q, k, v, block_tables, context_lens, 0.125)
        torch.testing.assert_close(dispatched, got, atol=0, rtol=0)


# ----- fused MoE ----------------------------------------------------------------------------------
def naive_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Token by token, expert by expert, in float64."""
    inter = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate = w_gate_up[e, :inter].double() @ xt
            up = w_gate_up[e, inter:].double() @ xt
            act = gate / (1 + torch.exp(-gate)) * up
            out[t] += float(topk_weights[t, j]) * (w_down[e].double() @ act)
    return out


def per_expert_loop(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Expert by expert over the tokens routed to it, in float64."""
    inter = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(w_gate_up.shape[0]):
        for t, j in (topk_ids == e).nonzero().tolist():
            h = w_gate_up[e].double() @ x[t].double()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += float(topk_weights[t, j]) * (w_down[e].double() @ act)
    return out


def moe_case(
    *,
    tokens: int,
    hidden: int,
    inter: int,
    experts: int,
    top_k: int,
    unused: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random weights; routing is top-k of random scores (never to `unused` experts), and the
    weights are deliberately not normalized, so a kernel that ignores them fails."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    scores = torch.rand(tokens, experts, generator=gen)
    scores[:, list(unused)] = -1.0
    topk_ids = torch.topk(scores, top_k, dim=-1).indices
    topk_weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    return (
        x.to(device, dtype),
        w_gate_up.to(device, dtype),
        w_down.to(device, dtype),
        topk_weights.to(device),
        topk_ids.to(device),
    )


MoEShape = tuple[int, int, int, int, int, tuple[int, ...]]
MOE_SHAPES: list[MoEShape] = [  # (tokens, hidden, intermediate, experts, top_k, unused experts)
    (1, 32, 16, 4, 1, ()),
    (7, 32, 48, 6, 2, (0, 4)),  # experts that get no tokens
    (33, 64, 40, 8, 3, (5,)),
    (200, 48, 32, 4, 2, ()),  # many rows per expert: the large-tile path
]


@pytest.mark.parametrize("shape", MOE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_reference_matches_token_and_expert_loops(
    shape: MoEShape, dtype: torch.dtype
) -> None:
    tokens, hidden, inter, experts, top_k, unused = shape
    args = moe_case(
        tokens=tokens,
        hidden=hidden,
        inter=inter,
        experts=experts,
        top_k=top_k,
        unused=unused,
        dtype=dtype,
    )
    assert not set(unused) & set(args[4].flatten().tolist())
    expected = naive_moe(*args)
    torch.testing.assert_close(per_expert_loop(*args), expected, atol=1e-9, rtol=0)
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    got = fused_moe_ref(*args)
    assert got.dtype == dtype and got.shape == args[0].shape
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=0.02 if atol > 1e-5 else 0)
    baseline = moe_loop_baseline(*args)
    baseline_atol = 1e-5 if dtype == torch.float32 else 1e-1  # computes in bf16 throughout
    torch.testing.assert_close(baseline.double(), expected, atol=baseline_atol, rtol=0.05)
    torch.testing.assert_close(fused_moe(*args), got, atol=0, rtol=0)  # CPU: the reference


def test_fused_moe_applies_the_topk_weights() -> None:
    x, w_gate_up, w_down, weights, ids = moe_case(tokens=5, hidden=16, inter=8, experts=4, top_k=2)
    once = fused_moe_ref(x, w_gate_up, w_down, weights, ids)
    doubled = fused_moe_ref(x, w_gate_up, w_down, weights * 2, ids)
    torch.testing.assert_close(doubled, once * 2)
    only_first = weights.clone()
    only_first[:, 1] = 0
    single = fused_moe_ref(x, w_gate_up, w_down, only_first, ids)
    expected = naive_moe(x, w_gate_up, w_down, only_first[:, :1], ids[:, :1])
    torch.testing.assert_close(single.double(), expected, atol=1e-5, rtol=0)


def test_fused_moe_rejects_mismatched_weights() -> None:
    x, w_gate_up, w_down, weights, ids = moe_case(tokens=2, hidden=16, inter=8, experts=4, top_k=2)
    with pytest.raises(ValueError, match="w_down"):
        fused_moe_ref(x, w_gate_up, w_down[:, :, :4], weights, ids)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_alignment_groups_pairs_by_expert_in_padded_blocks(block_m: int) -> None:
    from kleave.workers.kernels._triton_moe import align_by_expert

    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [3, 2]])
    aligned = align_by_expert(ids, num_experts=5, block_m=block_m)
    pairs = aligned.sorted_pairs.tolist()
    total = int(aligned.total_rows.item())
    flat = ids.flatten().tolist()
    sentinel = len(flat)
    assert total % block_m == 0 and total <= len(pairs)
    assert sorted(p for p in pairs if p != sentinel) == list(range(len(flat)))  # each pair once
    assert all(p == sentinel for p in pairs[total:])
    for block in range(total // block_m):
        rows = pairs[block * block_m : (block + 1) * block_m]
        expert = int(aligned.block_experts[block])
        assert all(flat[p] == expert for p in rows if p != sentinel)
    # experts appear in order, each pair in its expert's segment in token order
    real = [p for p in pairs[:total] if p != sentinel]
    assert real == sorted(range(len(flat)), key=lambda p: (flat[p], p))


@triton_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("shape", MOE_SHAPES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_kernel_fused_moe_matches_naive(shape: MoEShape, dtype: torch.dtype) -> None:
    tokens, hidden, inter, experts, top_k, unused = shape
    from kleave.workers.kernels._triton_moe import TileConfig, fused_moe_triton

    args = moe_case(
        tokens=tokens,
        hidden=hidden,
        inter=inter,
        experts=experts,
        top_k=top_k,
        unused=unused,
        dtype=dtype,
        device=TRITON_DEVICE,
    )
    expected = naive_moe(*(a.cpu() for a in args))
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    # the heuristic tiles, and a small tile that forces many blocks and K iterations
    for config in (None, TileConfig(16, 32, 16, 2, 4, 2)):
        got = fused_moe_triton(*args, config=config)
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), expected, atol=atol, rtol=0.02)
    if not INTERPRETED:
        torch.testing.assert_close(fused_moe(*args), fused_moe_triton(*args), atol=0, rtol=0)


# ----- the Triton kernels compiled for a GPU, without one ----------------------------------------
def _signature(fn: Any, constexprs: dict[str, object], dtype: str) -> tuple[Any, Any]:
    """Argument types as Triton's launcher would specialize them for our wrappers' calls:
    data pointers of `dtype`, int32 tables, float32 partials and weights, int32 sizes; data
    pointers, strides and the GEMM sizes 16-divisible (what vectorized loads need)."""
    types = {
        "q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "out_ptr": dtype, "x_ptr": dtype,
        "w_ptr": dtype, "act_ptr": dtype, "block_tables_ptr": "*i32",
        "context_lens_ptr": "*i32", "sorted_pairs_ptr": "*i32", "block_experts_ptr": "*i32",
        "total_rows_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
        "weights_ptr": "*fp32", "scale_log2": "fp32",
    }  # fmt: skip
    signature = {
        name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names
    }
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name] not in ("constexpr", "fp32")
        and (name.endswith("_ptr") or name.startswith("stride") or name in ("N", "K"))
    }
    return signature, attrs


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_compile_for_hopper_without_spilling(tmp_path: Path) -> None:
    """The interpreter checks the arithmetic but not what only the compiler sees (types,
    layouts, shared memory, registers): compile each kernel to an sm_90 cubin with the ptxas
    Triton bundles, for the decode shape the benchmark runs and the smallest and largest MoE
    tiles, and require no register spills."""
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ASTSource for ahead-of-time compilation")
    from kleave.workers.kernels import _triton_decode, _triton_moe

    decode: dict[str, object] = {
        "GROUP": 4,
        "BLOCK_G": 16,
        "BLOCK_N": 64,
        "BLOCK_D": 128,
        "HEAD_DIM": 128,
    }
    decode |= {"PAGE": 16, "PRECISION": "tf32"}
    builds: list[tuple[Any, dict[str, object], int, int]] = [
        (_triton_decode._decode_split_kernel, {**decode, "SINGLE_SPLIT": False}, 4, 2),
        (_triton_decode._decode_split_kernel, {**decode, "SINGLE_SPLIT": True}, 4, 2),
        (
            _triton_decode._decode_merge_kernel,
            {"BLOCK_S": 4, "BLOCK_D": 128, "HEAD_DIM": 128},
            4,
            2,
        ),
    ]
    for config in (_triton_moe.choose_config(8, 256), _triton_moe.choose_config(1 << 17, 256)):
        tiles: dict[str, object] = {
            "BLOCK_M": config.block_m,
            "BLOCK_K": config.block_k,
            "GROUP_M": config.group_m,
        }
        tiles["PRECISION"] = "tf32"
        for kernel, block_n in (
            (_triton_moe._gate_up_kernel, max(16, config.block_n // 2)),
            (_triton_moe._down_kernel, config.block_n),
        ):
            builds.append(
                (kernel, {**tiles, "BLOCK_N": block_n}, config.num_warps, config.num_stages)
            )
    for fn, constexprs, num_warps, num_stages in builds:
        signature, attrs = _signature(fn, constexprs, "*bf16")
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True},
        )
        assert compiled.asm["cubin"], fn.__name__
        ptx = compiled.asm["ptx"]
        if fn is not _triton_decode._decode_merge_kernel:  # the merge has no matmul
            assert "mma" in ptx, f"{fn.__name__}: no tensor-core instructions"
        spills = _ptxas_spill_bytes(ptx, tmp_path / f"{fn.__name__}.ptx")
        assert spills == 0, f"{fn.__name__} {constexprs} spills {spills} bytes"


def _ptxas_spill_bytes(ptx: str, path: Path) -> int:
    """Spill stores ptxas reports for sm_90a, with the flags Triton itself passes."""
    from triton.backends.nvidia.compiler import get_ptxas

    path.write_text(ptx)
    cmd = [get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(path)]
    cmd += ["-o", str(path.with_suffix(".cubin"))]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


# ----- the Triton kernels on the CPU --------------------------------------------------------------
@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_in_the_interpreter() -> None:
    """The Triton tests of this file rerun on the CPU under Triton's interpreter, so the
    kernels' indexing, masking and split merging are checked on machines without a GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-m",
            "gpu",
            "-k",
            "triton_kernel",
            "-p",
            "no:cacheprovider",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


# ----- kleave bench kernels ---------------------------------------------------------------------
def wall_clock(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def test_bench_byte_and_flop_counts() -> None:
    shape = bench_kernels.AttentionShape(batch=2, heads=4, kv_heads=2, head_dim=8)
    # K and V: 2 * 2 seqs * 10 tokens * 2 heads * 8 dims; q and out: 2 * 2 * 4 * 8; bf16
    assert bench_kernels.attention_bytes(shape, 10) == (640 + 128) * 2
    moe = bench_kernels.MoEShape(hidden=4, intermediate=3, experts=8, top_k=2)
    # per pair: gate/up 2 * 4 * 6 + down 2 * 3 * 4 = 72 FLOPs; 5 tokens * 2 pairs
    assert bench_kernels.moe_flops(moe, 5) == 720
    deepseek = bench_kernels.MoEShape()
    full = bench_kernels.moe_weight_bytes(deepseek, 256)
    assert bench_kernels.experts_that_fit(deepseek, 128, 10 * full) == 256
    assert bench_kernels.experts_that_fit(deepseek, 128, full // 3) == 64  # halved twice
    assert bench_kernels.experts_that_fit(deepseek, 128, 1) == deepseek.top_k


def test_bench_plumbing_on_the_cpu_renders_markdown_and_json() -> None:
    """The measuring code, run on the CPU with a wall clock at toy sizes: it runs and the
    kernels agree with the baselines; the numbers themselves mean nothing here."""
    attention = bench_kernels.AttentionShape(batch=2, heads=4, kv_heads=2, head_dim=16)
    moe = bench_kernels.MoEShape(hidden=32, intermediate=16, experts=4, top_k=2)
    row = bench_kernels.bench_attention(
        attention, 64, repeats=1, copy_gbps=1.0, device="cpu", timer=wall_clock
    )
    assert row["context"] == 64 and row["max_abs_diff"] < 5e-2
    gen = torch.Generator().manual_seed(0)
    weights = (
        torch.randn(4, 32, 32, generator=gen).to(torch.bfloat16) / 6,
        torch.randn(4, 32, 16, generator=gen).to(torch.bfloat16) / 4,
    )
    moe_row = bench_kernels.bench_moe(moe, 8, weights, repeats=1, device="cpu", timer=wall_clock)
    assert moe_row["tokens"] == 8 and moe_row["max_rel_diff"] < 5e-2
    report = bench_kernels.Report(
        device="cpu (plumbing test)",
        copy_gbps=1.0,
        attention_shape=dataclasses.asdict(attention),
        moe_shape=dataclasses.asdict(moe),
        attention=[row],
        moe=[moe_row],
        kv_transfer=[
            {"size_mb": 64, "backend": "cuda_ipc", "ms": 1.0, "gbps": 67.1, "vs_copy": 0.5},
            {"size_mb": 64, "backend": "tcp", "ms": 40.0, "gbps": 1.7, "vs_copy": 0.01},
        ],
        notes=["a note"],
    )
    text = bench_kernels.render_markdown(report)
    assert "| context | kernel us | GB/s | vs copy |" in text
    assert "| 64 |" in text and "| 8 |" in text and "Note: a note" in text
    assert "| 64 MiB | cuda_ipc | 1.00 | 67 | 0.50 | 40.0x |" in text
    assert json.loads(json.dumps(dataclasses.asdict(report)))["moe"][0]["tokens"] == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_refuses_without_cuda() -> None:
    from kleave.cli import main

    result = CliRunner().invoke(main, ["bench", "kernels", "--json"])
    assert result.exit_code == 1
    assert bench_kernels.NO_CUDA in result.output
    assert "GB/s" not in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_runs_on_the_gpu_at_small_sizes() -> None:
    from kleave.cli import main

    args = ["bench", "kernels", "--json", "--contexts", "1024", "--batch", "8", "--tokens"]
    args += ["64", "--hidden", "256", "--intermediate", "128", "--experts", "8", "--repeats", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["copy_gbps"] > 0
    assert report["attention"][0]["max_abs_diff"] < 5e-2
    assert report["moe"][0]["max_rel_diff"] < 5e-2
