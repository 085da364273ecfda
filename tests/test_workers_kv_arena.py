"""The shared-memory KV ring (``shm`` backend): placement, handshake, integrity, back-pressure.

The bit-exact transfers between processes, a killed sender and a vanished receiver run for
``shm`` as well as ``tcp`` in test_workers_transport.py; these are the ring's own cases.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable
from typing import Any

import pytest
import torch

from kleave.workers.bench_kv import measure
from kleave.workers.transport.framing import (
    ChecksumError,
    read_frame,
    send_message,
)
from kleave.workers.transport.kv_arena import (
    ALIGN,
    HEADER_BYTES,
    ArenaError,
    SharedArena,
    place,
)
from kleave.workers.transport.kv_transfer import (
    PROTOCOL_VERSION,
    KVReceiver,
    KVSender,
    KVTransferError,
)

HANG_GUARD = 60.0


def run(coro: Awaitable[Any]) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(HANG_GUARD):
            return await coro

    return asyncio.run(guarded())


def our_arena_files() -> list[str]:
    return glob.glob(f"/dev/shm/kleave-kv-{os.getpid()}-*")


def test_place_keeps_blocks_whole_and_waits_only_for_written_bytes() -> None:
    cap = 4 * ALIGN
    first = place(0, 10, cap)  # rounded up to one aligned block
    assert (first.start, first.end, first.needs) == (0, ALIGN, ALIGN - cap)
    second = place(first.end, 2 * ALIGN, cap)
    assert (second.start, second.end) == (ALIGN, 3 * ALIGN)
    # 2 blocks do not fit in the last one: the next lap, skipping it
    third = place(second.end, 2 * ALIGN, cap)
    assert (third.start, third.end) == (cap, cap + 2 * ALIGN)
    # it reuses positions 0..2*ALIGN, so the reader must have released those (not the skip)
    assert third.needs == 2 * ALIGN
    # an empty ring at an awkward offset takes a full-size block without a deadlock: the
    # skipped bytes were never written, so it needs the reader only to be caught up
    full = place(3 * ALIGN, cap, cap)
    assert (full.start, full.end, full.needs) == (cap, 2 * cap, 3 * ALIGN)
    with pytest.raises(ValueError, match="does not fit"):
        place(0, cap + 1, cap)
    with pytest.raises(ValueError, match="does not fit"):
        place(0, 0, cap)


def test_an_arena_file_is_gone_once_attached_and_the_close_flag_is_shared() -> None:
    arena = SharedArena.create("shm", 10_000)
    assert arena.capacity == 10_000 - 10_000 % ALIGN
    assert os.path.exists(arena.path)
    peer = SharedArena.attach(arena.spec())
    assert not os.path.exists(arena.path)  # a crash of either side leaves no file behind
    assert peer.data is not None and arena.data is not None
    arena.write(512, torch.arange(16, dtype=torch.int32))
    assert torch.equal(peer.read(512, 64, torch.int32, [4, 4]), torch.arange(16).view(4, 4).int())
    peer.release(768)
    assert arena.tail == 768
    assert not arena.peer_closed
    peer.close()
    assert arena.peer_closed
    arena.close()
    assert our_arena_files() == []


def test_an_arena_on_another_host_is_refused_at_connect_with_the_reason() -> None:
    async def scenario() -> None:
        receiver = KVReceiver()
        port = await receiver.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            spec = {"kind": "shm", "path": "/dev/shm/kleave-kv-elsewhere", "capacity": 4096}
            await send_message(writer, "kv_hello", {"version": PROTOCOL_VERSION, "arena": spec})
            reply = await read_frame(reader, timeout=HANG_GUARD, expecting="a kv_welcome")
            assert reply.kind == "kv_welcome"
            assert "is not on this machine" in reply.meta["error"]
            assert await reader.read() == b""  # and it hangs up
        finally:
            writer.close()
            await receiver.close()

    run(scenario())


def test_a_full_ring_that_nobody_frees_fails_the_sender_within_its_wait() -> None:
    attached: list[SharedArena] = []

    async def stuck_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader, timeout=HANG_GUARD, expecting="a kv_hello")
        attached.append(SharedArena.attach(hello.meta["arena"]))
        await send_message(writer, "kv_welcome", {"arena": "shm"})
        await asyncio.sleep(HANG_GUARD)  # maps the ring, never reads a descriptor

    async def scenario() -> None:
        server = await asyncio.start_server(stuck_receiver, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sender = await KVSender.connect("127.0.0.1", port, backend="shm", arena_bytes=1 << 20)
        sender.arena_wait_s = 0.3
        try:
            big = torch.zeros(100_000)  # 400 kB: K and V of one layer fit, the next layer not
            await sender.begin("r", {"num_layers": 2})
            sender.send_layer("r", 0, big, big)
            sender.send_layer("r", 1, big, big)
            with pytest.raises(
                KVTransferError, match=r"has not freed space in the shared KV arena for 0\.3 s"
            ):
                await sender.flush()
        finally:
            await sender.close()
            for arena in attached:
                arena.close()
            server.close()

    run(scenario())
    assert our_arena_files() == []


def test_a_block_changed_in_the_ring_fails_only_its_request() -> None:
    async def scenario() -> None:
        receiver = KVReceiver()
        port = await receiver.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        arena = SharedArena.create("shm", 1 << 16)
        try:
            await send_message(
                writer, "kv_hello", {"version": PROTOCOL_VERSION, "arena": arena.spec()}
            )
            welcome = await read_frame(reader, timeout=HANG_GUARD, expecting="a kv_welcome")
            assert welcome.meta == {"arena": "shm"}
            k = torch.arange(64, dtype=torch.float32)
            good_sha = hashlib.sha256(k.numpy().tobytes()).hexdigest()
            head = 0
            for rid in ("bad", "good"):
                await send_message(
                    writer, "kv_begin", {"request_id": rid, "meta": {"num_layers": 1}}
                )
                for name in ("k", "v"):
                    block = place(head, k.nbytes, arena.capacity)
                    arena.write(block.start, k)
                    head = block.end
                    sha = good_sha
                    if (rid, name) == ("bad", "k"):
                        sha = "0" * 64  # as if the bytes changed after the sender hashed them
                    ref = {
                        "request_id": rid,
                        "layer": 0,
                        "name": name,
                        "dtype": "float32",
                        "shape": [64],
                        "start": block.start,
                        "nbytes": k.nbytes,
                        "end": block.end,
                        "sha256": sha,
                    }
                    await send_message(writer, "kv_layer_ref", ref)
                await send_message(
                    writer, "kv_end", {"request_id": rid, "layers": 1, "bytes": 2 * k.nbytes}
                )
            with pytest.raises(ChecksumError, match=r"'k' of request bad layer 0 .* is corrupt"):
                await receiver.receive("bad", timeout=HANG_GUARD)
            good = await receiver.receive("good", timeout=HANG_GUARD)
            assert torch.equal(good.layers[0][0], k) and torch.equal(good.layers[0][1], k)
            assert arena.tail == head  # every block was released, the corrupt one too
        finally:
            writer.close()
            await receiver.close()
            arena.close()

    run(scenario())


def test_the_kv_benchmark_measures_both_host_backends_between_processes() -> None:
    """bench_kv's plumbing at a toy size: real transfers through a child process (the
    numbers mean nothing on a shared CI box; docs/benchmarks.md has measured ones)."""
    for backend in ("tcp", "shm"):
        result = measure(backend, 1 << 20, layers=4, repeats=1, baseline_gbps=1.0)
        assert result.backend == backend and result.size_bytes == 1 << 20
        assert result.seconds > 0 and result.gbps == pytest.approx((1 << 20) / result.seconds / 1e9)
        assert result.vs_copy == pytest.approx(result.gbps)
    assert our_arena_files() == []


def test_a_live_connection_on_a_high_descriptor_does_not_look_closed() -> None:
    """Busy workers pass descriptor 1024, where select() refuses to look (review finding)."""
    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 1500))
    sender = KVSender(high, "peer")
    try:
        assert not sender.peer_closed()
        b.close()
        assert sender.peer_closed()
    finally:
        sender._queue.put(None)
        sender._thread.join()
        high.close()
        a.close()


def test_attach_refuses_a_foreign_file_without_deleting_it() -> None:
    for name in ("someone-elses", "kleave-kv-not-one"):  # wrong name; right name, no magic
        path = f"/dev/shm/{name}-{os.getpid()}"
        with open(path, "wb") as f:
            f.write(b"\0" * (HEADER_BYTES + 256))
        try:
            with pytest.raises(ArenaError, match=r"not named like|not a kleave KV arena"):
                SharedArena.attach({"kind": "shm", "path": path, "capacity": 256})
            assert os.path.exists(path)
        finally:
            os.unlink(path)


def test_closing_an_arena_keeps_memory_a_tensor_still_views() -> None:
    """A copy out of the ring may still run in a thread when the connection closes: closing
    must not unmap under it (it did, and the process died with SIGSEGV)."""
    script = textwrap.dedent(
        """
        from kleave.workers.transport.kv_arena import SharedArena
        sender = SharedArena.create("shm", 1 << 20)
        receiver = SharedArena.attach(sender.spec())
        view = receiver.data[0:1024]
        receiver.close()
        sender.close()
        print(int(view.sum()))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stderr[-300:]


def test_a_receiver_that_cannot_join_the_group_says_why_at_once() -> None:
    """The sender forms its gloo group while it waits for the welcome, so a refusal reaches
    it now, not after the group's 30 s timeout (a 20 s guard here would trip on that)."""

    async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader, timeout=HANG_GUARD, expecting="a kv_hello")
        assert hello.meta["dist"]["backend"] == "gloo"
        await send_message(writer, "kv_welcome", {"error": "no route to your store"})
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(refusing, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncio.timeout(20):
                with pytest.raises(
                    KVTransferError,
                    match="cannot use the process group: no route to your store",
                ):
                    await KVSender.connect("127.0.0.1", port, backend="gloo")
        finally:
            server.close()
        # ... and no thread is left waiting in the rendezvous (one still waiting when the
        # interpreter exits aborts the process: "terminate called without an active exception")
        assert not [t.name for t in threading.enumerate() if t.name.startswith("kv-group")]

    run(scenario())
