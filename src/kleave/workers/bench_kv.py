"""Prefill -> decode KV transfer between two real processes, per backend, against a memcpy.

The receiver (a ``KVReceiver``, as in a decode worker) runs here; the sender (a ``KVSender``,
as in a prefill worker) is a child process fed one request at a time over a pipe, so each
timing is one request's whole transfer: from telling the child to send to the complete KV in
this process, checksums and copies included. A request is ``layers`` layers of K and V that
add up to ``size`` bytes. The baseline is one ``copy_`` of the same bytes in this process (host
memcpy on CPU, device-to-device on a GPU), measured in the same run: the best a transfer that
must move the bytes once could do. With ``device=cuda`` the sender's tensors are on the GPU
and the KV must end on the GPU (``tcp`` copies to the host and back; ``cuda_ipc`` does not).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from kleave.workers.transport.kv_transfer import DEFAULT_ARENA_BYTES, KVReceiver

_GO = b"go\n"


@dataclass(frozen=True)
class KVRun:
    """One backend at one size: median seconds per request and GB/s (1e9 bytes)."""

    backend: str
    checksum: bool
    size_bytes: int
    layers: int
    seconds: float
    gbps: float
    copy_gbps: float  # one copy_ of size_bytes, this process, same device

    @property
    def vs_copy(self) -> float:
        return self.gbps / self.copy_gbps


def copy_gbps(size_bytes: int, device: str, repeats: int) -> float:
    """GB/s of one ``dst.copy_(src)`` of ``size_bytes`` (bytes moved, not read + written)."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    src.random_()
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        if device != "cpu":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return size_bytes / statistics.median(times) / 1e9


async def _measure(
    backend: str,
    size_bytes: int,
    *,
    layers: int,
    repeats: int,
    device: str,
    checksum: bool,
    arena_bytes: int,
) -> list[float]:
    receiver = KVReceiver()
    port = await receiver.start()
    args = {
        "port": port,
        "backend": backend,
        "size_bytes": size_bytes,
        "layers": layers,
        "repeats": repeats + 1,
        "device": device,
        "checksum": checksum,
        "arena_bytes": arena_bytes,
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kleave.workers.bench_kv",
        json.dumps(args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    times: list[float] = []
    try:
        if (await child.stdout.readline()).strip() != b"ready":
            raise RuntimeError(f"the {backend} KV sender did not start (exit {child.returncode})")
        for i in range(repeats + 1):  # the first one warms up (connections, allocator)
            start = time.perf_counter()
            child.stdin.write(_GO)
            await child.stdin.drain()
            received = await receiver.receive(f"r{i}", timeout=300)
            if device != "cpu":
                layers_on_device = [(k.to(device), v.to(device)) for k, v in received.layers]
                torch.cuda.synchronize(device)
                del layers_on_device
            if i:
                times.append(time.perf_counter() - start)
            del received
        child.stdin.close()
        if await child.wait() != 0:
            raise RuntimeError(f"the {backend} KV sender exited with {child.returncode}")
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await receiver.close()
    return times


def measure(
    backend: str,
    size_bytes: int,
    *,
    layers: int = 8,
    repeats: int = 5,
    device: str = "cpu",
    checksum: bool = True,
    arena_bytes: int = DEFAULT_ARENA_BYTES,
    baseline_gbps: float | None = None,
) -> KVRun:
    """Median of ``repeats`` transfers of ``size_bytes`` in ``layers`` layers."""
    times = asyncio.run(
        _measure(
            backend,
            size_bytes,
            layers=layers,
            repeats=repeats,
            device=device,
            checksum=checksum,
            arena_bytes=arena_bytes,
        )
    )
    seconds = statistics.median(times)
    baseline = baseline_gbps or copy_gbps(size_bytes, device, repeats)
    return KVRun(
        backend, checksum, size_bytes, layers, seconds, size_bytes / seconds / 1e9, baseline
    )


# ----- the sender process ---------------------------------------------------------------------
async def _send(args: dict[str, Any]) -> None:
    from kleave.workers.transport.kv_transfer import KVSender

    torch.set_num_threads(1)  # as each worker of `kleave workers up` runs
    device = args["device"]
    layers = args["layers"]
    per_tensor = args["size_bytes"] // (2 * layers) // 2  # bf16 elements
    generator = torch.Generator(device=device).manual_seed(0)
    kv = [
        (
            torch.randn(per_tensor, generator=generator, device=device).to(torch.bfloat16),
            torch.randn(per_tensor, generator=generator, device=device).to(torch.bfloat16),
        )
        for _ in range(layers)
    ]
    sender = await KVSender.connect(
        "127.0.0.1",
        args["port"],
        backend=args["backend"],
        checksum=args["checksum"],
        arena_bytes=args["arena_bytes"],
        device=device if device != "cpu" else None,
    )
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    for i in range(args["repeats"]):
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        request_id = f"r{i}"
        await sender.begin(request_id, {"num_layers": layers})
        for layer, (k, v) in enumerate(kv):
            sender.send_layer(request_id, layer, k, v)
        await sender.end(request_id)
    await sender.close()


if __name__ == "__main__":
    asyncio.run(_send(json.loads(sys.argv[1])))
