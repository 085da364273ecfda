"""The workers' transport over real sockets and real processes: framing, KV transfer, AF, EP.

Failure tests kill real peer processes; their waits carry generous limits only so that a
regression fails the test instead of hanging the suite, never to assert a speed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from kleave.workers.transport.af import FFNClient, FFNServer, RemoteFFNError
from kleave.workers.transport.ep import (
    DispatchResult,
    DistributedEPGroup,
    EPBuffer,
    LocalEPBuffer,
    LocalEPGroups,
    get_dispatch_layout,
)
from kleave.workers.transport.framing import (
    ChecksumError,
    FrameError,
    PeerGone,
    TransportTimeout,
    encode_tensor,
    read_frame,
    send_message,
    send_tensor,
    write_encoded,
)
from kleave.workers.transport.kv_transfer import (
    PROTOCOL_VERSION,
    Backend,
    BackendUnavailable,
    KVReceiver,
    KVSender,
    KVTransferError,
    layer_ranges,
)

# The KV backends every machine runs: the socket, the shared-memory ring of one host, and a
# gloo process group per connection (the code path of nccl).
HOST_BACKENDS = pytest.mark.parametrize("backend", ["tcp", "shm", "gloo"])
_NEEDS_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
# ... and the one that needs a GPU both processes share (run when a device is lent).
ALL_ONE_HOST_BACKENDS = pytest.mark.parametrize(
    "backend", ["tcp", "shm", "gloo", pytest.param("cuda_ipc", marks=_NEEDS_CUDA)]
)

HANG_GUARD = 60.0  # seconds; only ever reached when something is broken


def run(coro: Awaitable[Any]) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(HANG_GUARD * 2):
            return await coro

    return asyncio.run(guarded())


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def connected_pair() -> AsyncIterator[tuple[Streams, Streams]]:
    """A real TCP connection on 127.0.0.1: (server side, client side)."""
    accepted: asyncio.Queue[Streams] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await asyncio.open_connection("127.0.0.1", port)
    accepted_side = await accepted.get()
    try:
        yield accepted_side, client
    finally:
        for _, writer in (accepted_side, client):
            writer.close()
        server.close()


# --- framing ------------------------------------------------------------------------------


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, 7, generator=g)
    tensors = {
        "f32": base,
        "bf16": base.to(torch.bfloat16),
        "f16": base.to(torch.float16),
        "i64": torch.randint(-(2**40), 2**40, (3, 4), generator=g),
        "mask": base > 0,
        "strided": base.t(),  # not contiguous: sent as its contiguous copy
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 16),
    }
    if hasattr(torch, "float8_e4m3fn"):
        tensors["fp8"] = base.to(torch.float8_e4m3fn)
    return tensors


def test_frames_round_trip_bit_exact() -> None:
    async def scenario() -> None:
        async with connected_pair() as ((reader, _), (_, writer)):
            tensors = _sample_tensors()
            await send_message(writer, "hello", {"n": 1, "names": list(tensors)})
            for name, tensor in tensors.items():
                await send_tensor(writer, name, tensor, meta={"layer": 3})
            await send_tensor(writer, "unchecked", tensors["f32"], checksum=False)
            hello = await read_frame(reader, timeout=HANG_GUARD)
            assert (hello.kind, hello.tensor, hello.meta) == (
                "hello",
                None,
                {"n": 1, "names": list(tensors)},
            )
            for name, tensor in tensors.items():
                frame = await read_frame(reader, timeout=HANG_GUARD)
                assert (frame.kind, frame.name, frame.meta) == ("tensor", name, {"layer": 3})
                assert frame.tensor is not None
                assert frame.tensor.dtype == tensor.dtype and frame.tensor.shape == tensor.shape
                assert torch.equal(
                    frame.tensor.reshape(-1).view(torch.uint8),
                    tensor.contiguous().reshape(-1).view(torch.uint8),
                )
            unchecked = await read_frame(reader, timeout=HANG_GUARD)
            assert unchecked.tensor is not None and torch.equal(unchecked.tensor, tensors["f32"])

    run(scenario())


def test_corrupt_payload_is_a_checksum_error_and_the_stream_stays_in_step() -> None:
    async def scenario() -> None:
        async with connected_pair() as ((reader, _), (_, writer)):
            frame = encode_tensor("k", torch.arange(64, dtype=torch.float32), meta={"layer": 2})
            assert frame.payload is not None
            damaged = bytearray(frame.payload)
            damaged[17] ^= 0x01  # one bit flipped on the wire
            writer.write(frame.header + bytes(damaged))
            await send_message(writer, "after", {})
            with pytest.raises(ChecksumError, match=r"tensor 'k' .* is corrupt") as caught:
                await read_frame(reader, timeout=HANG_GUARD)
            assert caught.value.meta == {"layer": 2} and caught.value.name == "k"
            after = await read_frame(reader, timeout=HANG_GUARD)
            assert after.kind == "after"

    run(scenario())


def test_a_peer_closing_mid_frame_is_peer_gone_naming_it_and_the_frame() -> None:
    async def scenario() -> None:
        async with connected_pair() as ((reader, _), (_, writer)):
            frame = encode_tensor("v", torch.zeros(1000))
            assert frame.payload is not None
            writer.write(frame.header + bytes(frame.payload)[:1000])
            await writer.drain()
            port = writer.get_extra_info("sockname")[1]
            writer.close()
            with pytest.raises(
                PeerGone,
                match=rf"127\.0\.0\.1:{port} closed .* after 1000 of 4000 bytes of tensor 'v'",
            ):
                await read_frame(reader, timeout=HANG_GUARD)
            with pytest.raises(PeerGone, match="while a frame was expected"):
                await read_frame(reader, timeout=HANG_GUARD)

    run(scenario())


def test_read_timeout_and_garbage() -> None:
    async def scenario() -> None:
        async with connected_pair() as ((reader, _), (_, writer)):
            with pytest.raises(TransportTimeout, match="while expecting the reply"):
                await read_frame(reader, timeout=0.05, expecting="the reply")
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            with pytest.raises(FrameError, match="not this protocol"):
                await read_frame(reader, timeout=HANG_GUARD)

    run(scenario())


# --- KV transfer --------------------------------------------------------------------------


def layer_kv(seed: int, layer: int) -> tuple[Any, Any]:
    """Deterministic K (fp32) and V (bf16) of a layer: the sender process builds the same."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + layer)
    k = torch.randn(2, 64, 128, generator=g)
    v = torch.randn(2, 64, 128, generator=g).to(torch.bfloat16)
    return k, v


SENDER_MAIN = """
import asyncio, json, sys
from kleave.workers.transport.kv_transfer import KVSender

async def main(args):
    sender = await KVSender.connect(
        "127.0.0.1", args["port"], backend=args["backend"], arena_bytes=args["arena_bytes"],
        device=args["device"] if args["device"] != "cpu" else None,
    )
    rid, n = args["request_id"], args["num_layers"]
    await sender.begin(rid, {"num_layers": n, "prompt_tokens": [1, 2, 3], "first_token": 42})
    for layer in range(args.get("die_after", n)):
        k, v = layer_kv(args["seed"], layer)
        sender.send_layer(rid, layer, k.to(args["device"]), v.to(args["device"]))
    if "die_after" in args:
        await sender.flush()
        print("flushed", flush=True)
        await asyncio.sleep(3600)  # killed here, mid-transfer
    stats = await sender.end(rid)
    await sender.close()
    wrapped = sender.arena is not None and sender._head > sender.arena.capacity
    print(json.dumps({"bytes": stats.bytes, "layers": stats.layers, "seconds": stats.seconds,
                      "wrapped": wrapped}))

asyncio.run(main(json.loads(sys.argv[1])))
"""


async def start_python(main: str, helpers: list[Callable[..., Any]], args: dict[str, Any]) -> Any:
    """A real child interpreter running ``main`` with ``helpers``' source and JSON ``args``."""
    source = "\n".join(textwrap.dedent(inspect.getsource(h)) for h in helpers) + main
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from typing import Any\n" + source,
        json.dumps(args),
        stdout=asyncio.subprocess.PIPE,
    )


@ALL_ONE_HOST_BACKENDS
def test_kv_transfer_between_processes_is_bit_exact_with_right_stats(backend: Backend) -> None:
    num_layers, seed = 6, 3

    async def scenario() -> None:
        receiver = KVReceiver()
        port = await receiver.start()
        try:
            args = {
                "port": port,
                "request_id": "req-1",
                "num_layers": num_layers,
                "seed": seed,
                "backend": backend,
                # 1.5 layers: the ring wraps several times and skips its tail end
                "arena_bytes": 150_000,
                "device": "cuda" if backend == "cuda_ipc" else "cpu",
            }
            child = await start_python(SENDER_MAIN, [layer_kv], args)
            received = await receiver.receive("req-1", timeout=HANG_GUARD)
            out, _ = await child.communicate()
            assert child.returncode == 0
            stats = json.loads(out)
        finally:
            await receiver.close()
        expected = [layer_kv(seed, layer) for layer in range(num_layers)]
        total = sum(k.nbytes + v.nbytes for k, v in expected)
        assert received.meta == {
            "num_layers": num_layers,
            "prompt_tokens": [1, 2, 3],
            "first_token": 42,
        }
        assert len(received.layers) == num_layers
        for (k, v), (k_want, v_want) in zip(received.layers, expected, strict=True):
            assert k.dtype == torch.float32 and v.dtype == torch.bfloat16
            assert k.is_cuda is v.is_cuda is (backend == "cuda_ipc")  # it stays on the GPU
            assert torch.equal(k.cpu(), k_want) and torch.equal(v.cpu(), v_want)
        assert received.bytes == stats["bytes"] == total
        assert stats["layers"] == num_layers and stats["seconds"] > 0 and received.seconds > 0
        assert stats["wrapped"] is (backend in ("shm", "cuda_ipc"))

    run(scenario())


@ALL_ONE_HOST_BACKENDS
def test_a_sender_killed_mid_transfer_fails_the_receive_with_its_progress(backend: Backend) -> None:
    async def scenario() -> None:
        receiver = KVReceiver()
        port = await receiver.start()
        args = {
            "port": port,
            "request_id": "req-k",
            "num_layers": 24,
            "seed": 1,
            "die_after": 3,
            "backend": backend,
            "arena_bytes": 1 << 20,
            "device": "cuda" if backend == "cuda_ipc" else "cpu",
        }
        child = await start_python(SENDER_MAIN, [layer_kv], args)
        try:
            assert child.stdout is not None
            assert (await child.stdout.readline()).strip() == b"flushed"
            child.send_signal(signal.SIGKILL)
            await child.wait()
            with pytest.raises(
                KVTransferError,
                match=r"^prefill peer 127\.0\.0\.1:\d+ disappeared after 3 of 24 layers "
                r"of request req-k$",
            ):
                await receiver.receive("req-k", timeout=HANG_GUARD)
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
            await receiver.close()

    run(scenario())


def test_receive_timeouts_name_what_is_missing() -> None:
    async def scenario() -> None:
        receiver = KVReceiver()
        port = await receiver.start()
        sender = await KVSender.connect("127.0.0.1", port)
        try:
            with pytest.raises(KVTransferError, match="request nobody: no KV transfer began"):
                await receiver.receive("nobody", timeout=0.05)
            await sender.begin("half", {"num_layers": 4})
            for layer in (0, 2):
                sender.send_layer("half", layer, *layer_kv(0, layer))
            await sender.flush()
            with pytest.raises(
                KVTransferError,
                match=r"request half from prefill peer .* 2 of 4 layers received; "
                r"missing layers 1, 3$",
            ):
                await receiver.receive("half", timeout=0.2)
        finally:
            await sender.close()
            await receiver.close()

    run(scenario())


def test_a_corrupt_layer_fails_its_request_with_checksum_error_only() -> None:
    async def scenario() -> None:
        receiver = KVReceiver()
        port = await receiver.start()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await send_message(writer, "kv_hello", {"version": PROTOCOL_VERSION})
            for rid in ("bad", "good"):
                await send_message(
                    writer, "kv_begin", {"request_id": rid, "meta": {"num_layers": 1}}
                )
            k, v = layer_kv(5, 0)
            bad_k = encode_tensor("k", k, kind="kv_layer", meta={"request_id": "bad", "layer": 0})
            assert bad_k.payload is not None
            damaged = bytearray(bad_k.payload)
            damaged[-1] ^= 0x80
            writer.write(bad_k.header + bytes(damaged))
            nbytes = 0
            for name, tensor in (("k", k), ("v", v)):
                meta = {"request_id": "good", "layer": 0}
                await write_encoded(writer, encode_tensor(name, tensor, kind="kv_layer", meta=meta))
                nbytes += tensor.nbytes
            await send_message(
                writer, "kv_end", {"request_id": "good", "layers": 1, "bytes": nbytes}
            )
            with pytest.raises(ChecksumError, match=r"tensor 'k' \(kv_layer.*'bad'.* is corrupt"):
                await receiver.receive("bad", timeout=HANG_GUARD)
            good = await receiver.receive("good", timeout=HANG_GUARD)
            assert torch.equal(good.layers[0][0], k) and torch.equal(good.layers[0][1], v)
        finally:
            writer.close()
            await receiver.close()

    run(scenario())


def test_send_layer_returns_before_the_bytes_are_written() -> None:
    """The overlap: layers queue while the consumer reads nothing (no clock involved).

    The consumer's receive buffer is pinned at 64 KiB, so the kernel holds at most a few MiB
    of the 64 MiB queued: whatever send_layer returned before was not yet on the wire.
    """
    num_layers, shape = 8, (1024, 1024)  # 4 MiB per tensor, 64 MiB in all

    async def scenario() -> None:
        release, consumed = asyncio.Event(), asyncio.Event()
        frames: list[Any] = []

        async def slow_consumer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await release.wait()
            while True:
                frame = await read_frame(reader, timeout=HANG_GUARD)
                frames.append(frame)
                if frame.kind == "kv_end":
                    break
            consumed.set()
            writer.close()

        listener = socket.socket()
        listener.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16
        )  # accepted ones inherit it
        listener.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(slow_consumer, sock=listener)
        sender = await KVSender.connect("127.0.0.1", listener.getsockname()[1])
        try:
            await sender.begin("r", {"num_layers": num_layers})
            kv = [
                (torch.full(shape, float(i)), torch.full(shape, -float(i)))
                for i in range(num_layers)
            ]
            for layer, (k, v) in enumerate(kv):
                sender.send_layer("r", layer, k, v)
            total = sum(k.nbytes + v.nbytes for k, v in kv)
            assert sender.queued_bytes == total
            assert sender.written_bytes < total // 2 and sender.pending_bytes > total // 2
            end = asyncio.create_task(sender.end("r"))
            await asyncio.sleep(0)
            assert not end.done()  # end() waits for the wire, which waits for the consumer
            release.set()
            stats = await end
            assert (stats.bytes, stats.layers) == (total, num_layers)
            assert sender.written_bytes == total and sender.pending_bytes == 0
            await consumed.wait()  # written is in the kernel, not yet read by the consumer
        finally:
            await sender.close()
            server.close()
        layers = [f for f in frames if f.kind == "kv_layer"]
        assert [(f.meta["layer"], f.name) for f in layers] == [
            (i, n) for i in range(num_layers) for n in ("k", "v")
        ]
        assert all(torch.equal(f.tensor, kv[f.meta["layer"]][f.name == "v"]) for f in layers)

    run(scenario())


@HOST_BACKENDS
def test_sender_refuses_misuse_and_reports_a_vanished_receiver(backend: Backend) -> None:
    async def scenario() -> None:
        receiver = KVReceiver()
        port = await receiver.start()
        sender = await KVSender.connect("127.0.0.1", port, backend=backend)
        try:
            with pytest.raises(ValueError, match="num_layers"):
                await sender.begin("x", {})
            with pytest.raises(ValueError, match="not begun"):
                sender.send_layer("x", 0, *layer_kv(0, 0))
            await sender.begin("x", {"num_layers": 2})
            sender.send_layer("x", 0, *layer_kv(0, 0))
            with pytest.raises(ValueError, match="already sent"):
                sender.send_layer("x", 0, *layer_kv(0, 0))
            with pytest.raises(ValueError, match=r"layers 1 of 2 not sent"):
                await sender.end("x")
            await sender.abort("x", "prefill ran out of memory")
            with pytest.raises(
                KVTransferError, match="aborted request x after 1 of 2 layers: prefill ran out"
            ):
                await receiver.receive("x", timeout=HANG_GUARD)
            await receiver.close()  # the decode worker goes away
            big = torch.zeros(1 << 22)
            await sender.begin("y", {"num_layers": 64})
            with pytest.raises(
                KVTransferError, match=rf"decode peer 127\.0\.0\.1:{port} went away"
            ):
                for layer in range(64):  # the writer notices the reset within a few layers
                    sender.send_layer("y", layer, big, big)
                    await sender.flush()
        finally:
            await sender.close()
            await receiver.close()
        with pytest.raises(KVTransferError, match="cannot connect"):
            await KVSender.connect("127.0.0.1", port, timeout=5)

    run(scenario())


@HOST_BACKENDS
def test_an_idle_sender_sees_its_receiver_close(backend: Backend) -> None:
    async def scenario() -> None:
        receiver = KVReceiver()
        port = await receiver.start()
        sender = await KVSender.connect("127.0.0.1", port, backend=backend)
        try:
            await sender.begin("r", {"num_layers": 1})
            sender.send_layer("r", 0, *layer_kv(0, 0))
            await sender.end("r")
            await receiver.receive("r", timeout=HANG_GUARD)  # the receiver holds the connection
            assert not sender.peer_closed()
            await receiver.close()  # a decode worker that restarts
            for _ in range(1000):
                if sender.peer_closed():
                    break
                await asyncio.sleep(0.01)
            assert sender.peer_closed()
        finally:
            await sender.close()
        assert sender.peer_closed()

    run(scenario())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_backends_are_refused_with_a_reason() -> None:
    with pytest.raises(BackendUnavailable, match="cuda_ipc"):
        KVReceiver(backend="cuda_ipc")
    with pytest.raises(BackendUnavailable, match="nccl"):
        run(KVSender.connect("127.0.0.1", 1, backend="nccl"))
    with pytest.raises(ValueError, match="unknown KV transfer backend"):
        KVReceiver(backend="rdma")  # type: ignore[arg-type]


def test_layer_ranges() -> None:
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert layer_ranges([3]) == "3" and layer_ranges([]) == ""


# --- attention <-> FFN exchange -----------------------------------------------------------


def known_ffn(layer: int, h: Any) -> Any:
    """The FFN worker's function: deterministic per layer; layer 999 blocks, layer -1 fails."""
    import threading

    import torch

    if layer == 999:
        print("blocked", flush=True)
        threading.Event().wait()
    if layer < 0:
        raise ValueError(f"no layer {layer}")
    return torch.relu(h) * (layer + 1) - 0.5 * layer


FFN_SERVER_MAIN = """
import asyncio
from kleave.workers.transport.af import FFNServer

async def main():
    server = FFNServer(known_ffn, max_concurrency=2)
    print(await server.start(), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@asynccontextmanager
async def ffn_server_process() -> AsyncIterator[tuple[Any, int]]:
    child = await start_python(FFN_SERVER_MAIN, [known_ffn], {})
    try:
        assert child.stdout is not None
        yield child, int(await child.stdout.readline())
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


def test_ffn_calls_to_another_process_are_exact_and_may_overlap() -> None:
    async def scenario() -> None:
        async with ffn_server_process() as (_, port):
            client = await FFNClient.connect("127.0.0.1", port)
            try:
                g = torch.Generator().manual_seed(11)
                inputs = [
                    (layer % 6, torch.randn(1 + layer, 64, generator=g)) for layer in range(24)
                ]
                results = await asyncio.gather(*(client.ffn(layer, h) for layer, h in inputs))
                for (layer, h), out in zip(inputs, results, strict=True):
                    assert out.dtype == torch.float32 and torch.equal(out, known_ffn(layer, h))
                with pytest.raises(RemoteFFNError, match="no layer -1"):
                    await client.ffn(-1, inputs[0][1])
                assert client.in_flight == 0
            finally:
                await client.close()

    run(scenario())


def test_a_killed_ffn_server_is_peer_gone_for_calls_in_flight_and_later() -> None:
    async def scenario() -> None:
        async with ffn_server_process() as (child, port):
            client = await FFNClient.connect("127.0.0.1", port)
            try:
                h = torch.ones(4, 8)
                assert torch.equal(await client.ffn(1, h), known_ffn(1, h))
                stuck = asyncio.create_task(client.ffn(999, h))
                assert (await child.stdout.readline()).strip() == b"blocked"
                child.send_signal(signal.SIGKILL)
                with pytest.raises(PeerGone, match=rf"FFN peer 127\.0\.0\.1:{port} closed"):
                    await asyncio.wait_for(stuck, HANG_GUARD)
                with pytest.raises(PeerGone, match="calls in flight are lost"):
                    await client.ffn(2, h)  # fails at once: the reader already knows
            finally:
                await client.close()

    run(scenario())


def test_ffn_wire_dtypes_bf16_and_scaled_fp8() -> None:
    async def scenario() -> None:
        server = FFNServer(known_ffn)
        port = await server.start()
        h = torch.randn(16, 256, generator=torch.Generator().manual_seed(2)) * 40
        want = known_ffn(3, h)
        try:
            bf16 = await FFNClient.connect("127.0.0.1", port, send_dtype=torch.bfloat16)
            out = await bf16.ffn(3, h)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
            await bf16.close()
            if hasattr(torch, "float8_e4m3fn"):
                fp8 = await FFNClient.connect(
                    "127.0.0.1", port, send_dtype=torch.float8_e4m3fn, return_dtype=torch.bfloat16
                )
                out = await fp8.ffn(3, h)
                scale = float(want.abs().max())
                assert out.dtype == torch.float32 and not torch.equal(out, want)
                assert float((out - want).abs().max()) < 0.07 * scale  # e4m3: 3 mantissa bits
                await fp8.close()
        finally:
            await server.close()

    run(scenario())


# --- expert parallelism (DeepEP's tests, on gloo processes and in one process) -------------

EP_EXPERTS, EP_HIDDEN, EP_TOPK, EP_WORLD = 16, 32, 4, 4


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity measure: 0 for equal tensors, < 5e-6 passes."""
    if x.numel() == 0:
        return 0.0
    x, y = x.double() + 1, y.double() + 1
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def random_topk(tokens: int, generator: torch.Generator, drop: float = 0.2) -> torch.Tensor:
    """Distinct experts per token, a fraction of slots dropped to -1 (as capacity limits do)."""
    scores = torch.rand(tokens, EP_EXPERTS, generator=generator)
    topk = scores.topk(EP_TOPK, dim=1).indices
    topk[torch.rand(tokens, EP_TOPK, generator=generator) < drop] = -1
    return topk


def reference_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain Python loops over DeepEP's definition."""
    per_rank = num_experts // num_ranks
    per_expert, per_rank_counts = [0] * num_experts, [0] * num_ranks
    in_rank = [[False] * num_ranks for _ in range(topk_idx.shape[0])]
    for token, experts in enumerate(topk_idx.tolist()):
        for expert in experts:
            if expert >= 0:
                per_expert[expert] += 1
                in_rank[token][expert // per_rank] = True
        for rank in range(num_ranks):
            per_rank_counts[rank] += in_rank[token][rank]
    return (
        torch.tensor(per_rank_counts, dtype=torch.int32),
        torch.tensor(per_expert, dtype=torch.int32),
        torch.tensor(in_rank, dtype=torch.bool).reshape(topk_idx.shape[0], num_ranks),
    )


@pytest.mark.parametrize(
    ("tokens", "num_ranks", "seed"), [(0, 4, 0), (1, 2, 1), (97, 4, 2), (256, 8, 3)]
)
def test_dispatch_layout_equals_the_reference(tokens: int, num_ranks: int, seed: int) -> None:
    topk_idx = random_topk(tokens, torch.Generator().manual_seed(seed))
    if tokens:
        topk_idx[0] = -1  # a token routed nowhere
    layout = get_dispatch_layout(topk_idx, EP_EXPERTS, num_ranks)
    for got, want in zip(layout, reference_layout(topk_idx, EP_EXPERTS, num_ranks), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(ValueError, match="do not split evenly"):
        get_dispatch_layout(topk_idx, EP_EXPERTS, 3)


def ep_inputs(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    tokens = 0 if seed == 1 and rank == 2 else 24 + 8 * rank  # seed 1: one rank has no tokens
    topk_idx = random_topk(tokens, g)
    return {
        "x": torch.full((tokens, EP_HIDDEN), float(rank), dtype=torch.bfloat16),
        "topk_idx": topk_idx,
        "topk_weights": torch.rand(tokens, EP_TOPK, generator=g),
        "x_rand": torch.randn(tokens, EP_HIDDEN, generator=g),
    }


def experts_apply(
    recv_x: torch.Tensor, recv_topk_idx: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """The receiving rank's experts, weighted: global expert e scales its input by e + 1."""
    base = rank * (EP_EXPERTS // EP_WORLD)
    scale = torch.where(recv_topk_idx >= 0, recv_topk_idx + base + 1, 0).to(recv_x.dtype)
    return recv_x * (weights * scale).sum(dim=1, keepdim=True)


def moe_reference(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same MoE computed without any exchange."""
    idx, w = inputs["topk_idx"], inputs["topk_weights"]
    scale = torch.where(idx >= 0, idx + 1, 0).to(w.dtype)
    return inputs["x_rand"] * (w * scale).sum(dim=1, keepdim=True)


def check_rank(
    rank: int,
    inputs: dict[str, torch.Tensor],
    *,
    result: DispatchResult,
    combined: torch.Tensor,
    moe: torch.Tensor,
    global_per_rank: torch.Tensor,
    global_per_expert: torch.Tensor,
) -> None:
    """DeepEP's checks for one rank, given the all-reduced layout counts."""
    per_rank = EP_EXPERTS // EP_WORLD
    recv_counts = result.handle.recv_counts
    assert sum(recv_counts) == result.recv_x.shape[0] == int(global_per_rank[rank])
    source = torch.repeat_interleave(torch.arange(EP_WORLD), torch.tensor(recv_counts))
    assert torch.equal(result.recv_x.float(), source[:, None].float().expand_as(result.recv_x))
    idx = result.recv_topk_idx
    assert bool(((idx == -1) | ((idx >= 0) & (idx < per_rank))).all())
    counts = [int((idx == e).sum()) for e in range(per_rank)]
    want = global_per_expert[rank * per_rank : (rank + 1) * per_rank].tolist()
    assert result.num_recv_tokens_per_expert == counts == want
    assert bool((result.recv_topk_weights[idx == -1] == 0).all())
    fan_out = result.handle.is_token_in_rank.sum(dim=1, keepdim=True)
    assert calc_diff(combined.float(), inputs["x"].float() * fan_out) < 5e-6
    assert calc_diff(moe, moe_reference(inputs)) < 5e-6
    torch.testing.assert_close(moe, moe_reference(inputs))


def ep_rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    """One gloo rank (spawned): DeepEP's checks on both exchange paths, results saved."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=HANG_GUARD),
    )
    try:
        saved: dict[str, Any] = {}
        for seed in (0, 1):
            inputs = ep_inputs(rank, seed)
            per_rank, per_expert, _ = get_dispatch_layout(inputs["topk_idx"], EP_EXPERTS, world)
            dist.all_reduce(per_rank)
            dist.all_reduce(per_expert)
            for path in (None, False):  # all_to_all_single; isend/irecv pairs
                buffer = EPBuffer(DistributedEPGroup(use_all_to_all=path), EP_EXPERTS, EP_HIDDEN)
                result = buffer.dispatch(inputs["x"], inputs["topk_idx"], inputs["topk_weights"])
                combined = buffer.combine(result.recv_x, result.handle)
                rand = buffer.dispatch(inputs["x_rand"], inputs["topk_idx"], inputs["topk_weights"])
                out = experts_apply(rand.recv_x, rand.recv_topk_idx, rand.recv_topk_weights, rank)
                moe = buffer.combine(out, rand.handle)
                check_rank(
                    rank,
                    inputs,
                    result=result,
                    combined=combined,
                    moe=moe,
                    global_per_rank=per_rank,
                    global_per_expert=per_expert,
                )
                saved[f"{seed}/{path}"] = {
                    "recv_x": result.recv_x,
                    "recv_topk_idx": result.recv_topk_idx,
                    "recv_topk_weights": result.recv_topk_weights,
                    "counts": result.num_recv_tokens_per_expert,
                    "combined": combined,
                    "moe": moe,
                }
        torch.save(saved, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_local_ep(seed: int) -> list[dict[str, Any]]:
    """All EP_WORLD ranks in this process; the same checks as the distributed ranks."""
    inputs = [ep_inputs(rank, seed) for rank in range(EP_WORLD)]
    buffer = LocalEPBuffer(LocalEPGroups(EP_WORLD), EP_EXPERTS, EP_HIDDEN)
    results = buffer.dispatch(
        [i["x"] for i in inputs],
        [i["topk_idx"] for i in inputs],
        [i["topk_weights"] for i in inputs],
    )
    combined = buffer.combine([r.recv_x for r in results], [r.handle for r in results])
    rand = buffer.dispatch(
        [i["x_rand"] for i in inputs],
        [i["topk_idx"] for i in inputs],
        [i["topk_weights"] for i in inputs],
    )
    outs = [
        experts_apply(r.recv_x, r.recv_topk_idx, r.recv_topk_weights, rank)
        for rank, r in enumerate(rand)
    ]
    moe = buffer.combine(outs, [r.handle for r in rand])
    layouts = [get_dispatch_layout(i["topk_idx"], EP_EXPERTS, EP_WORLD) for i in inputs]
    per_rank = torch.stack([lay[0] for lay in layouts]).sum(dim=0)
    per_expert = torch.stack([lay[1] for lay in layouts]).sum(dim=0)
    saved = []
    for rank in range(EP_WORLD):
        check_rank(
            rank,
            inputs[rank],
            result=results[rank],
            combined=combined[rank],
            moe=moe[rank],
            global_per_rank=per_rank,
            global_per_expert=per_expert,
        )
        saved.append(
            {
                "recv_x": results[rank].recv_x,
                "recv_topk_idx": results[rank].recv_topk_idx,
                "recv_topk_weights": results[rank].recv_topk_weights,
                "counts": results[rank].num_recv_tokens_per_expert,
                "combined": combined[rank],
                "moe": moe[rank],
            }
        )
    return saved


@pytest.mark.parametrize("seed", [0, 1])
def test_ep_dispatch_combine_in_one_process(seed: int) -> None:
    run_local_ep(seed)


def test_ep_dispatch_combine_over_four_gloo_processes_matches_local_mode(tmp_path: Any) -> None:
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(  # type: ignore[attr-defined,no-untyped-call]
        ep_rank_main, args=(EP_WORLD, free_port(), str(tmp_path)), nprocs=EP_WORLD, join=False
    )
    deadline = time.monotonic() + HANG_GUARD * 3  # a hang guard, not a speed assertion
    try:
        while not context.join(timeout=1.0):
            assert time.monotonic() < deadline, "EP ranks hung"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    for seed in (0, 1):
        local = run_local_ep(seed)
        for rank in range(EP_WORLD):
            saved = torch.load(tmp_path / f"rank{rank}.pt")
            for path in ("None", "False"):
                distributed = saved[f"{seed}/{path}"]
                assert distributed["counts"] == local[rank]["counts"]
                for key in ("recv_x", "recv_topk_idx", "recv_topk_weights", "combined", "moe"):
                    assert torch.equal(distributed[key], local[rank][key]), (seed, rank, path, key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_travel_as_host_bytes() -> None:
    """KV made on a side stream is copied only once that stream produced it; FFN replies
    come back on the caller's device."""

    async def scenario() -> None:
        receiver = KVReceiver()
        port = await receiver.start()
        sender = await KVSender.connect("127.0.0.1", port)
        server = FFNServer(known_ffn, device="cuda")
        ffn_port = await server.start()
        client = await FFNClient.connect("127.0.0.1", ffn_port)
        try:
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            with torch.cuda.stream(side):
                k = torch.randn(64, 1024, device="cuda") @ torch.randn(1024, 1024, device="cuda")
                v = k.to(torch.bfloat16)
                await sender.begin("gpu", {"num_layers": 1})
                sender.send_layer("gpu", 0, k, v)
            await sender.end("gpu")
            received = await receiver.receive("gpu", timeout=HANG_GUARD)
            assert torch.equal(received.layers[0][0], k.cpu())
            assert torch.equal(received.layers[0][1], v.cpu())
            out = await client.ffn(2, k)
            assert out.is_cuda and torch.equal(out, known_ffn(2, k))
        finally:
            await client.close()
            await server.close()
            await sender.close()
            await receiver.close()

    run(scenario())
