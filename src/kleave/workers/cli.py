"""`kleave workers`: run the data plane's processes (serve, router) or all of them (up).

`serve` and `router` are what the operator's pods run (operator/engines.py builds their
arguments); `up` starts a whole topology on this host. Heavy imports (torch, aiohttp) happen
inside the commands, so `kleave --help` stays fast.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, cast

import click

if TYPE_CHECKING:
    from kleave.workers.transport.kv_transfer import Backend

_POSITIVE = click.FloatRange(min=0.0, min_open=True)
_ROLES = ("colocated", "prefill", "decode", "attention", "ffn")


class _Failure(click.ClickException):
    """`error: ...` on stderr and exit 1, the kleave CLI's convention."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.group("workers", context_settings={"help_option_names": ["-h", "--help"]})
def workers() -> None:
    """kleave's own inference workers: prefill, decode, attention, FFN, router."""


_plan_option = click.option(
    "--plan",
    "plan_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The serving plan (the ConfigMap's plan.json, or a local plan in JSON or YAML).",
)


@workers.command("serve")
@click.option("--role", required=True, type=click.Choice(_ROLES), help="The pool to serve.")
@_plan_option
@click.option("--host", default="0.0.0.0", show_default=True, help="Listen address (HTTP, KV).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--kv-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="decode/attention: KV receiver port (0: any; peers read it from /v1/info).",
)
@click.option(
    "--af-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="ffn: activation port (0: any; attention workers read it from /v1/info).",
)
@click.option("--advertise-host", default=None, help="The address peers use for KV/activations.")
@click.option(
    "--kv-backend",
    type=click.Choice(["tcp", "shm", "cuda_ipc", "gloo", "nccl"]),
    default="tcp",
    show_default=True,
    help="prefill: how KV reaches decode. shm/cuda_ipc: a shared ring, both on one host "
    "(cuda_ipc: one GPU); gloo/nccl: a process group per P/D pair (nccl: GPUs; on a host "
    "without CUDA it falls back to tcp with a warning).",
)
@click.option(
    "--kv-arena-mb",
    type=_POSITIVE,
    default=32.0,
    show_default=True,
    help="shm/cuda_ipc: the shared ring per decode peer (larger tensors go over the socket).",
)
@click.option(
    "--tensor-parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Split every layer's heads and FFN width (and the KV cache) over N ranks: this "
    "process and N-1 it starts, one GPU each with --device cuda.",
)
@click.option("--expert-parallel", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--kv-blocks", type=click.IntRange(min=1), default=None, help="KV cache blocks.")
@click.option(
    "--prefix-caching/--no-prefix-caching",
    default=True,
    show_default=True,
    help="colocated/decode: share the paged cache's blocks of prompt prefixes already computed.",
)
@click.option(
    "--prefix-cache-mb",
    type=click.FloatRange(min=0.0),
    default=64.0,
    show_default=True,
    help="prefill: K/V of recent prompts' full blocks, reused by prompts that share them (0: off).",
)
@click.option("--kv-cache-mb", type=_POSITIVE, default=64.0, show_default=True)
@click.option("--block-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-prefill-tokens", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--kv-timeout", "kv_timeout_s", type=_POSITIVE, default=30.0, show_default=True)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="A safetensors file of MoEDecoder.save_safetensors (default: random from the seed).",
)
@click.option("--model-preset", default=None, help="Override the plan's model preset.")
@click.option("--seed", type=int, default=None, help="Override the plan's weights.seed.")
@click.option("--torch-threads", type=click.IntRange(min=1), default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option("--log-level", default="info", show_default=True)
def serve(
    *,
    role: str,
    plan_path: Path,
    host: str,
    port: int,
    kv_port: int,
    af_port: int,
    advertise_host: str | None,
    kv_backend: str,
    kv_arena_mb: float,
    tensor_parallel: int,
    expert_parallel: int,
    kv_blocks: int | None,
    prefix_caching: bool,
    prefix_cache_mb: float,
    kv_cache_mb: float,
    block_size: int,
    max_num_seqs: int,
    max_prefill_tokens: int,
    kv_timeout_s: float,
    weights: Path | None,
    model_preset: str | None,
    seed: int | None,
    torch_threads: int | None,
    device: str,
    log_level: str,
) -> None:
    """One worker process of the plan's pool ROLE."""
    _logging(log_level)
    from kleave.workers.serve.plan import PlanError, load_plan

    _check_one_ffn_split(tensor_parallel, expert_parallel)
    if expert_parallel > 1 and role != "ffn":
        raise _Failure(
            f"--expert-parallel > 1 splits the experts of an ffn worker (PDAF); the {role} "
            "worker runs the whole FFN: set its pool's parallelism.expert to 1"
        )
    _check_device(device, max(tensor_parallel, expert_parallel))
    from kleave.workers.transport.framing import TransportError
    from kleave.workers.transport.kv_transfer import check_backend

    if kv_backend == "nccl" and device == "cpu":
        # The operator's default for builtin pools; a CPU-only worker has no NCCL to use.
        logging.getLogger("kleave.workers").warning(
            "--kv-backend nccl needs --device cuda; this CPU worker moves KV over tcp"
        )
        kv_backend = "tcp"
    try:
        check_backend(kv_backend)
    except TransportError as error:
        raise _Failure(str(error)) from None
    from kleave.workers.tensor_parallel import check_tensor_parallel

    try:
        plan = load_plan(plan_path, preset=model_preset, seed=seed)
        server_role = plan.server_role(role)
        check_tensor_parallel(plan.config, tensor_parallel)
    except PlanError as error:
        raise _Failure(str(error)) from None
    except ValueError as error:
        raise _Failure(f"model {plan.preset}: {error}") from None
    from kleave.workers.serve.main import run_worker
    from kleave.workers.serve.runtime import WorkerOptions, configure_torch

    configure_torch(torch_threads)
    options = WorkerOptions(
        role=server_role,
        host=host,
        port=port,
        kv_port=kv_port,
        af_port=af_port,
        advertise_host=advertise_host,
        kv_blocks=kv_blocks,
        kv_cache_mb=kv_cache_mb,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_prefill_tokens=max_prefill_tokens,
        kv_timeout_s=kv_timeout_s,
        kv_backend=cast("Backend", kv_backend),
        tensor_parallel=tensor_parallel,
        kv_arena_mb=kv_arena_mb,
        prefix_cache_mb=prefix_cache_mb,
        prefix_caching=prefix_caching,
        expert_parallel=expert_parallel,
        weights=weights,
        device=device,
    )
    asyncio.run(run_worker(plan, options))


def _check_one_ffn_split(tensor_parallel: int, expert_parallel: int) -> None:
    if tensor_parallel > 1 and expert_parallel > 1:
        raise _Failure(
            f"--tensor-parallel {tensor_parallel} with --expert-parallel {expert_parallel}: a "
            "worker splits its FFN one way, by width or by experts; set one of the pool's "
            "parallelism.tensor and parallelism.expert to 1"
        )


def _check_device(device: str, ranks: int) -> None:
    """A worker told to use GPUs that it cannot see fails now, saying why (the operator runs
    builtin pools with ``--device cuda``), instead of when the model loads."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise _Failure(
            f"--device {device}: this process sees no CUDA device (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); a GPU pool's pods need nvidia.com/gpu and "
            "the NVIDIA container runtime, or run the worker with --device cpu"
        )
    if device != "cuda" and ranks > 1:
        raise _Failure(
            f"--device {device} with {ranks} ranks: they need a GPU each; use --device cuda "
            "(rank r runs on cuda:r)"
        )
    visible = torch.cuda.device_count()
    if device == "cuda" and ranks > visible:
        raise _Failure(
            f"{ranks} ranks need {ranks} GPUs, one each, and this process sees {visible}: "
            "set the pool's gpusPerReplica to parallelism.tensor x parallelism.expert"
        )


@workers.command("router")
@_plan_option
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--refresh", "refresh_s", type=_POSITIVE, default=1.0, show_default=True)
@click.option(
    "--imbalance",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="In-flight requests a prefix's prefill worker may exceed the idlest one by.",
)
@click.option("--default-max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--worker-timeout", "worker_timeout_s", type=_POSITIVE, default=60.0, show_default=True
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Times a request is sent to other workers after a failure before its first token.",
)
@click.option("--model-preset", default=None, help="Override the plan's model preset.")
@click.option("--log-level", default="info", show_default=True)
def router(
    *,
    plan_path: Path,
    host: str,
    port: int,
    refresh_s: float,
    imbalance: int,
    default_max_tokens: int,
    worker_timeout_s: float,
    retries: int,
    model_preset: str | None,
    log_level: str,
) -> None:
    """The OpenAI-compatible router in front of the plan's pools."""
    _logging(log_level)
    from kleave.workers.serve.plan import PlanError, load_plan

    try:
        plan = load_plan(plan_path, preset=model_preset)
    except PlanError as error:
        raise _Failure(str(error)) from None
    from kleave.workers.serve.main import run_router
    from kleave.workers.serve.router import RouterOptions

    options = RouterOptions(
        host=host,
        port=port,
        refresh_s=refresh_s,
        imbalance=imbalance,
        default_max_tokens=default_max_tokens,
        worker_timeout_s=worker_timeout_s,
        retries=retries,
    )
    asyncio.run(run_router(plan, options))


@workers.command("up")
@click.option(
    "--topology", type=click.Choice(["Colocated", "PD", "PDAF"]), default="PD", show_default=True
)
@click.option("--model", default="tiny", show_default=True, help="A bundled model preset.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--prefill", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--decode",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Decode workers (Colocated: the colocated workers; PDAF: the attention workers).",
)
@click.option("--ffn", type=click.IntRange(min=1), default=1, show_default=True, help="PDAF only.")
@click.option(
    "--ffn-expert-parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="PDAF: split each FFN worker's experts over this many processes.",
)
@click.option(
    "--tensor-parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Split every worker's heads, FFN width and KV cache over this many processes.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Weights seed, all workers.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Plan and logs [default: a new temporary directory].",
)
@click.option("--kv-blocks", type=click.IntRange(min=1), default=None)
@click.option(
    "--kv-backend",
    type=click.Choice(["auto", "tcp", "shm", "cuda_ipc"]),
    default="auto",
    show_default=True,
    help="P->D KV transfer; auto: a shared ring where /dev/shm exists (shm, or cuda_ipc with "
    "--device cuda), else tcp.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Every worker's torch device (cuda: the workers share one GPU).",
)
def up(
    *,
    topology: str,
    model: str,
    port: int,
    prefill: int,
    decode: int,
    ffn: int,
    ffn_expert_parallel: int,
    tensor_parallel: int,
    seed: int,
    state_dir: Path | None,
    kv_blocks: int | None,
    kv_backend: str,
    device: str,
) -> None:
    """The whole data plane as local processes, until Ctrl-C or SIGTERM."""
    import tempfile

    from kleave.workers.serve.local import LocalDataPlane, LocalStartError
    from kleave.workers.serve.plan import PlanError

    _check_one_ffn_split(tensor_parallel, ffn_expert_parallel)
    worker_args = ["--tensor-parallel", str(tensor_parallel)]
    if kv_blocks:
        worker_args += ["--kv-blocks", str(kv_blocks)]
    counts = {"Colocated": {"decode": decode}, "PD": {"prefill": prefill, "decode": decode}}
    counts["PDAF"] = {"prefill": prefill, "attention": decode, "ffn": ffn}
    directory = state_dir or Path(tempfile.mkdtemp(prefix="kleave-workers-"))
    plane = LocalDataPlane(
        topology=topology,
        state_dir=directory,
        model=model,
        counts=counts[topology],
        router_port=port,
        seed=seed,
        kv_backend=kv_backend,
        device=device,
        role_args={"ffn": ("--expert-parallel", str(ffn_expert_parallel))},
        worker_args=tuple(worker_args),
    )
    stopping: list[int] = []

    def on_signal(signum: int, _: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        click.echo(f"starting {topology} ({model}); plan and logs in {directory}", err=True)
        try:
            plane.start()
        except (LocalStartError, PlanError) as error:
            raise _Failure(str(error)) from None
        for process in plane.processes:
            click.echo(f"  {process.name:<12} {process.url}  pid {process.pid}", err=True)
        click.echo(f"router: {plane.url}/v1  (OpenAI API; Ctrl-C stops everything)")
        reported: set[str] = set()
        while not stopping:
            for process in plane.exited():
                if process.name not in reported:
                    reported.add(process.name)
                    click.echo(f"warning: {process.name} exited (log {process.log})", err=True)
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        plane.stop()
    click.echo("stopped", err=True)
