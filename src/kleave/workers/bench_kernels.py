"""`kleave bench kernels`: the data plane's GPU kernels against the hardware and torch, in one run.

Paged decode attention is memory-bound, so it is scored in GB/s of K/V (plus q and out) read
against the device's own copy bandwidth measured in the same run, and timed against a torch
baseline (gather the pages, matmul, softmax, matmul). Fused MoE is compute-bound at prefill
sizes, so it is scored in TFLOP/s against one torch.matmul doing the same FLOPs, and timed
against the per-expert loop most model code starts from. KV transfer is a sender process's
K/V reaching this process's GPU, ``cuda_ipc`` against ``tcp`` (``bench_kv``), scored against
one device copy of the same bytes. Kernel numbers are CUDA-event medians after warmup, KV
transfers wall-clock medians; without a CUDA device the command refuses instead of printing
anything that would look like a measurement.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import torch

NO_CUDA = (
    "no CUDA device: the kernel benchmark needs a GPU; the CPU references are covered by the tests"
)


@dataclass(frozen=True)
class AttentionShape:
    batch: int = 64
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    itemsize: int = 2  # bf16


@dataclass(frozen=True)
class MoEShape:
    hidden: int = 7168
    intermediate: int = 2048
    experts: int = 256
    top_k: int = 8
    itemsize: int = 2  # bf16


def attention_bytes(shape: AttentionShape, context: int) -> int:
    """Bytes one decode step must move: every K and V of the context, q in and out back."""
    kv = 2 * shape.batch * context * shape.kv_heads * shape.head_dim
    q_and_out = 2 * shape.batch * shape.heads * shape.head_dim
    return (kv + q_and_out) * shape.itemsize


def moe_flops(shape: MoEShape, tokens: int) -> int:
    """FLOPs of the routed experts: per (token, expert) pair a gate/up GEMM (2 * hidden * 2I)
    and a down GEMM (2 * I * hidden)."""
    return 6 * tokens * shape.top_k * shape.hidden * shape.intermediate


def moe_weight_bytes(shape: MoEShape, experts: int) -> int:
    return 3 * experts * shape.hidden * shape.intermediate * shape.itemsize


def moe_activation_bytes(shape: MoEShape, tokens: int) -> int:
    """Activations of the largest run, generously: per (token, expert) pair the kernel's
    activation and output rows and the one-GEMM baseline's input and output rows; per token
    x, the outputs and their float32 copies for the comparison."""
    pairs = tokens * shape.top_k
    per_pair = (shape.intermediate + shape.hidden) + (shape.hidden + 3 * shape.intermediate)
    return (pairs * per_pair + 6 * tokens * shape.hidden) * shape.itemsize


def experts_that_fit(shape: MoEShape, max_tokens: int, free_bytes: int) -> int:
    """The expert count to run with: the requested one, halved until weights and activations
    fit in 80% of free memory (never below top_k)."""
    experts = shape.experts
    activations = moe_activation_bytes(shape, max_tokens)
    while experts > shape.top_k and moe_weight_bytes(shape, experts) + activations > (
        0.8 * free_bytes
    ):
        experts //= 2
    return max(experts, shape.top_k)


@dataclass
class Report:
    device: str
    copy_gbps: float
    attention_shape: dict[str, int]
    moe_shape: dict[str, int]
    attention: list[dict[str, float]] = field(default_factory=list)
    moe: list[dict[str, float]] = field(default_factory=list)
    kv_transfer: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----- measurement (CUDA only) ----------------------------------------------------------------
def time_cuda(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` by CUDA events, after `warmup` calls (Triton compiles there)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    event: Callable[..., Any] = torch.cuda.Event  # untyped in torch's stubs
    times: list[float] = []
    for _ in range(repeats):
        start = event(enable_timing=True)
        end = event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


Timer = Callable[..., float]
"""`timer(fn, warmup=..., repeats=...)` -> median seconds (time_cuda on the GPU)."""


def copy_bandwidth(*, repeats: int, size_bytes: int = 2 << 30) -> float:
    """Device-to-device copy GB/s of a large buffer, counting bytes read plus written."""
    import torch

    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src), warmup=3, repeats=repeats)
    return 2 * size_bytes / seconds / 1e9


def bench_kv_transfer(
    backend: str, size_mb: int, *, copy_gbps: float, arena_mb: int, repeats: int
) -> dict[str, Any]:
    """One KV transfer row: a sender process on this GPU to this process (bench_kv)."""
    from kleave.workers.bench_kv import measure

    run = measure(
        backend,
        size_mb << 20,
        repeats=max(3, min(repeats, 10)),
        device="cuda",
        checksum=False,
        arena_bytes=arena_mb << 20,
        baseline_gbps=copy_gbps / 2,  # bytes moved by one copy, not read + written
    )
    return {
        "size_mb": size_mb,
        "backend": backend,
        "ms": run.seconds * 1e3,
        "gbps": run.gbps,
        "vs_copy": run.vs_copy,
    }


def torch_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor
) -> torch.Tensor:
    """The baseline: gather the pages, then matmul/softmax/matmul in bf16 with a float32
    softmax. Every sequence is at the full context, so no mask is needed."""
    import torch

    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    k = k_cache[tables].flatten(1, 2).permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    v = v_cache[tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
    qg = q.view(batch, kv_heads, heads // kv_heads, dim)
    probs = torch.softmax(torch.matmul(qg, k).float() * dim**-0.5, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(batch, heads, dim)


def bench_attention(
    shape: AttentionShape,
    context: int,
    *,
    repeats: int,
    copy_gbps: float,
    device: str = "cuda",
    timer: Timer = time_cuda,
) -> dict[str, float]:
    """One context length: the kernel (through the dispatch the model uses) and the torch
    baseline on the same pages, and their largest difference."""
    import torch

    from kleave.workers.kernels import paged_decode_attention

    gen = torch.Generator(device=device).manual_seed(context)
    pages = context // shape.block_size
    num_blocks = shape.batch * pages
    cache_shape = (num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
    dtype = torch.bfloat16
    k_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    q = torch.randn(
        (shape.batch, shape.heads, shape.head_dim), generator=gen, device=device, dtype=dtype
    )
    # pages scattered over the pool, as after a while of serving
    tables = torch.randperm(num_blocks, generator=gen, device=device).view(shape.batch, pages)
    tables = tables.to(torch.int32)
    lens = torch.full((shape.batch,), context, dtype=torch.int32, device=device)
    scale = shape.head_dim**-0.5

    def kernel() -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)

    def baseline() -> torch.Tensor:
        return torch_decode_attention(q, k_cache, v_cache, tables.long())

    diff = float((kernel().float() - baseline().float()).abs().max())
    kernel_s = timer(kernel, warmup=3, repeats=repeats)
    baseline_s = timer(baseline, warmup=2, repeats=max(3, repeats // 2))
    gbps = attention_bytes(shape, context) / kernel_s / 1e9
    return {
        "context": context,
        "kernel_us": kernel_s * 1e6,
        "gbps": gbps,
        "vs_copy": gbps / copy_gbps,
        "torch_us": baseline_s * 1e6,
        "speedup_vs_torch": baseline_s / kernel_s,
        "max_abs_diff": diff,
    }


def bench_moe(
    shape: MoEShape,
    tokens: int,
    weights: tuple[torch.Tensor, torch.Tensor],
    *,
    repeats: int,
    device: str = "cuda",
    timer: Timer = time_cuda,
) -> dict[str, float]:
    """One token count: the fused kernel, one torch.matmul of the same FLOPs, and the
    per-expert loop (whose output the kernel's is compared with)."""
    import torch

    from kleave.workers.kernels import fused_moe, moe_loop_baseline

    w_gate_up, w_down = weights
    experts = w_gate_up.shape[0]
    gen = torch.Generator(device=device).manual_seed(tokens)
    dtype = torch.bfloat16
    x = torch.randn((tokens, shape.hidden), generator=gen, device=device, dtype=dtype)
    # uniform random routing: the balanced case a trained router with a balance loss aims at
    scores = torch.rand((tokens, experts), generator=gen, device=device)
    topk_weights, topk_ids = torch.topk(scores.softmax(dim=-1), shape.top_k, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    pairs = tokens * shape.top_k
    a = torch.randn((pairs, shape.hidden), generator=gen, device=device, dtype=dtype)
    b = torch.randn(
        (shape.hidden, 3 * shape.intermediate), generator=gen, device=device, dtype=dtype
    )

    def kernel() -> torch.Tensor:
        return fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)

    def loop() -> torch.Tensor:
        return moe_loop_baseline(x, w_gate_up, w_down, topk_weights, topk_ids)

    expected = loop().float()
    diff = float((kernel().float() - expected).abs().max() / expected.abs().max())
    kernel_s = timer(kernel, warmup=3, repeats=repeats)
    matmul_s = timer(lambda: torch.matmul(a, b), warmup=3, repeats=repeats)
    loop_s = timer(loop, warmup=1, repeats=max(3, repeats // 4))
    flops = moe_flops(shape, tokens)
    tflops = flops / kernel_s / 1e12
    matmul_tflops = flops / matmul_s / 1e12
    return {
        "tokens": tokens,
        "kernel_ms": kernel_s * 1e3,
        "tflops": tflops,
        "matmul_tflops": matmul_tflops,
        "vs_matmul": tflops / matmul_tflops,
        "loop_ms": loop_s * 1e3,
        "speedup_vs_loop": loop_s / kernel_s,
        "max_rel_diff": diff,
    }


# ----- output ---------------------------------------------------------------------------------
def render_markdown(report: Report) -> str:
    a, m = report.attention_shape, report.moe_shape
    lines = [
        f"# Kernel benchmark on {report.device}",
        "",
        f"Device-to-device copy: {report.copy_gbps:,.0f} GB/s (bytes read + written).",
        "",
    ]
    if report.attention:
        lines += [
            f"## Paged decode attention (batch {a['batch']}, {a['heads']} heads / "
            f"{a['kv_heads']} KV heads, head_dim {a['head_dim']}, pages of "
            f"{a['block_size']}, bf16)",
            "",
            "| context | kernel us | GB/s | vs copy | torch us | speedup vs torch | max abs diff |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['context']:.0f} | {r['kernel_us']:,.1f} | {r['gbps']:,.0f} | "
            f"{r['vs_copy']:.2f} | {r['torch_us']:,.1f} | {r['speedup_vs_torch']:.2f}x | "
            f"{r['max_abs_diff']:.1e} |"
            for r in report.attention
        ]
        lines.append("")
    if report.moe:
        lines += [
            f"## Fused MoE (hidden {m['hidden']}, intermediate {m['intermediate']}, "
            f"{m['experts']} experts, top-{m['top_k']}, bf16)",
            "",
            "| tokens | kernel ms | TFLOP/s | matmul TFLOP/s | vs matmul | loop ms "
            "| speedup vs loop | max rel diff |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['tokens']:.0f} | {r['kernel_ms']:,.3f} | {r['tflops']:,.1f} | "
            f"{r['matmul_tflops']:,.1f} | {r['vs_matmul']:.2f} | {r['loop_ms']:,.3f} | "
            f"{r['speedup_vs_loop']:.2f}x | {r['max_rel_diff']:.1e} |"
            for r in report.moe
        ]
        lines.append("")
    if report.kv_transfer:
        lines += [
            "## KV transfer between two processes on this GPU (8 layers of K and V)",
            "",
            "| size | backend | ms | GB/s | vs copy | vs tcp |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        tcp = {r["size_mb"]: r for r in report.kv_transfer if r["backend"] == "tcp"}
        lines += [
            f"| {r['size_mb']} MiB | {r['backend']} | {r['ms']:,.2f} | {r['gbps']:,.0f} | "
            f"{r['vs_copy']:.2f} | "
            + (f"{tcp[r['size_mb']]['ms'] / r['ms']:.1f}x |" if r["size_mb"] in tcp else "- |")
            for r in report.kv_transfer
        ]
        lines.append("")
    lines += [f"Note: {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def _ints(_ctx: click.Context, _param: click.Parameter, value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not numbers or min(numbers) <= 0:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return numbers


# ----- the command ----------------------------------------------------------------------------
@click.group("bench")
def bench() -> None:
    """Benchmarks of the data plane."""


@bench.command("kernels")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of Markdown.")
@click.option(
    "--contexts",
    default="1024,2048,4096,8192,16384,32768",
    show_default=True,
    callback=_ints,
    help="Decode attention context lengths.",
)
@click.option("--batch", default=64, show_default=True, help="Decode attention batch.")
@click.option(
    "--tokens",
    default="128,512,2048,8192,16384",
    show_default=True,
    callback=_ints,
    help="Fused MoE token counts.",
)
@click.option("--hidden", default=7168, show_default=True, help="MoE hidden size.")
@click.option("--intermediate", default=2048, show_default=True, help="MoE expert width.")
@click.option(
    "--experts",
    default=256,
    show_default=True,
    help="MoE experts (halved until the weights fit in GPU memory; the output says so).",
)
@click.option("--top-k", default=8, show_default=True, help="Experts per token.")
@click.option(
    "--kv-sizes",
    default="16,64,256",
    show_default=True,
    callback=_ints,
    help="KV transfer sizes in MiB (one request's K and V).",
)
@click.option(
    "--kv-arena-mb",
    default=256,
    show_default=True,
    help="cuda_ipc: the shared ring (the workers' --kv-arena-mb).",
)
@click.option("--repeats", default=20, show_default=True, help="Timed repeats (median).")
@click.option(
    "--only",
    type=click.Choice(["all", "attention", "moe", "kv"]),
    default="all",
    show_default=True,
    help="Which kernels to run.",
)
def kernels(
    *,
    as_json: bool,
    contexts: list[int],
    batch: int,
    tokens: list[int],
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    kv_sizes: list[int],
    kv_arena_mb: int,
    repeats: int,
    only: str,
) -> None:
    """Paged decode attention (GB/s vs copy bandwidth and torch), fused MoE (TFLOP/s vs
    one torch.matmul and vs the per-expert loop) and P->D KV transfer between two processes
    (cuda_ipc vs tcp, GB/s vs copy bandwidth), measured on this machine's GPU."""
    try:
        import torch
    except ImportError:
        raise click.ClickException(
            "torch is not installed: pip install 'kleave[workers]' (and a CUDA device)"
        ) from None
    if not torch.cuda.is_available():
        click.echo(NO_CUDA, err=True)
        sys.exit(1)
    attention_shape = AttentionShape(batch=batch)
    moe_shape = MoEShape(hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k)
    with torch.inference_mode():
        report = _run(
            attention_shape=attention_shape,
            moe_shape=moe_shape,
            contexts=contexts,
            tokens=tokens,
            kv_sizes=kv_sizes,
            kv_arena_mb=kv_arena_mb,
            repeats=repeats,
            only=only,
        )
    click.echo(json.dumps(asdict(report), indent=2) if as_json else render_markdown(report))


def _run(
    *,
    attention_shape: AttentionShape,
    moe_shape: MoEShape,
    contexts: list[int],
    tokens: list[int],
    repeats: int,
    only: str,
    kv_sizes: tuple[int, ...] | list[int] = (),
    kv_arena_mb: int = 256,
) -> Report:
    import torch

    def progress(line: str) -> None:
        click.echo(line, err=True)

    copy_gbps = copy_bandwidth(repeats=repeats)
    report = Report(
        device=torch.cuda.get_device_name(),
        copy_gbps=copy_gbps,
        attention_shape=asdict(attention_shape),
        moe_shape=asdict(moe_shape),
    )
    if only in ("all", "attention"):
        for context in contexts:
            progress(f"decode attention, context {context}")
            report.attention.append(
                bench_attention(attention_shape, context, repeats=repeats, copy_gbps=copy_gbps)
            )
            torch.cuda.empty_cache()  # the next context's pages reuse this one's memory
    if only in ("all", "moe"):
        free, _ = torch.cuda.mem_get_info()
        experts = experts_that_fit(moe_shape, max(tokens), free)
        if experts != moe_shape.experts:
            report.notes.append(
                f"MoE run with {experts} experts instead of {moe_shape.experts}: the weights "
                f"of {moe_shape.experts} do not fit in {free / 2**30:.0f} GiB of free GPU "
                f"memory (per-expert shapes and top-{moe_shape.top_k} unchanged)"
            )
            moe_shape = MoEShape(**{**asdict(moe_shape), "experts": experts})
            report.moe_shape = asdict(moe_shape)
        gen = torch.Generator(device="cuda").manual_seed(0)
        h, i, dtype = moe_shape.hidden, moe_shape.intermediate, torch.bfloat16
        w_gate_up = torch.randn((experts, 2 * i, h), generator=gen, device="cuda", dtype=dtype)
        w_gate_up *= h**-0.5
        w_down = torch.randn((experts, h, i), generator=gen, device="cuda", dtype=dtype)
        w_down *= i**-0.5
        for count in tokens:
            progress(f"fused MoE, {count} tokens")
            report.moe.append(bench_moe(moe_shape, count, (w_gate_up, w_down), repeats=repeats))
    if only in ("all", "kv"):
        for size_mb in kv_sizes:
            for backend in ("cuda_ipc", "tcp"):
                progress(f"KV transfer, {size_mb} MiB over {backend}")
                report.kv_transfer.append(
                    bench_kv_transfer(
                        backend, size_mb, copy_gbps=copy_gbps, arena_mb=kv_arena_mb, repeats=repeats
                    )
                )
        report.notes.append(
            "KV transfer: one request's K/V from a sender process's GPU tensors until they are "
            "on the GPU in the receiving process (tcp: via host memory and the loopback "
            "socket), median of the repeats, no SHA-256; 'vs copy' is against one "
            "device-to-device copy of the same bytes (half the read + written copy rate). "
            f"cuda_ipc copies into the {kv_arena_mb} MiB shared ring and out of it: two copies"
        )
    report.notes.append(
        "decode attention: every sequence at the full context, pages in random order; "
        "MoE: uniform random routing; times are CUDA-event medians after warmup"
    )
    return report
