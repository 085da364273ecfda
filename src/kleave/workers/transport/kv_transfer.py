"""Prefill -> decode KV-cache transfer over TCP, layer by layer, overlapped with the prefill.

The sender's ``send_layer`` only queues: a dedicated writer thread with a blocking socket
encodes (device copy, SHA-256) and writes each layer while the caller computes the next one.
A thread rather than an asyncio task because the prefill's forward pass is synchronous torch
code: run on the event loop it would starve a writer task until the whole pass is done, and
run in an executor thread it calls ``send_layer`` from off the loop. Torch, hashlib and
``socket.sendall`` all release the GIL, so compute and the wire really proceed together.

Wire (frames of ``framing``): ``kv_hello {version, arena?}`` once per connection, then per
request ``kv_begin {request_id, meta}``, two tensor frames ``k`` / ``v`` with
``{request_id, layer}`` per layer, and ``kv_end {request_id, layers, bytes}`` (or
``kv_abort {request_id, reason}``). Requests may interleave on one connection. After the
hello the receiver never writes back: a process killed with unread data from its peer makes
its kernel answer with a reset, which could discard the layers that did arrive, and then the
error could not say how far the transfer got.

Backends: ``tcp`` puts the payload on the socket. ``shm`` and ``cuda_ipc`` (both ends on one
machine) put it in a shared ring (``kv_arena``: ``/dev/shm`` for host memory, a CUDA IPC
buffer on a shared GPU) that the hello describes; the receiver answers that one hello with
``kv_welcome`` (attached, or why not), and each tensor frame becomes a ``kv_layer_ref``
message saying where in the ring the bytes are. A tensor larger than the ring still goes on
the socket, so any size works.

The receiver turns every way a transfer can fail into ``KVTransferError`` naming the peer,
the request and how far it got (a ``ChecksumError`` for a corrupt layer); ``receive`` has a
timeout, so the decode side never hangs on a prefill that went away silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import queue
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch

from kleave.workers.transport.framing import (
    DTYPES,
    OFFLOAD_BYTES,
    STREAM_LIMIT,
    ChecksumError,
    EncodedFrame,
    Frame,
    PeerGone,
    TransportError,
    cpu_bytes,
    dtype_name,
    encode_message,
    encode_tensor,
    read_frame,
    recv_message,
    send_message,
)
from kleave.workers.transport.kv_arena import (
    SHM_DIR,
    ArenaBlock,
    ArenaError,
    ArenaKind,
    SharedArena,
    place,
)
from kleave.workers.transport.kv_dist import (
    DIST_BACKENDS,
    DistBackend,
    DistSpec,
    PairGroup,
    dist_unavailable,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2  # 2: the hello may offer a shared arena
SEND_CHUNK = 1 << 20  # progress (written_bytes) is counted per chunk
Backend = Literal["tcp", "shm", "cuda_ipc", "gloo", "nccl"]
BACKENDS: tuple[str, ...] = ("tcp", "shm", "cuda_ipc", "gloo", "nccl")
ARENA_KINDS: dict[str, ArenaKind] = {"shm": "shm", "cuda_ipc": "cuda"}
DEFAULT_ARENA_BYTES = 32 << 20  # per connection; pods get 64 MiB of /dev/shm by default
ARENA_WAIT_S = 30.0  # a receiver that frees no ring space for this long is stuck
FORMING_EXIT_S = 5.0  # a closed group's forming thread fails within milliseconds
DIST_TIMEOUT_S = 30.0  # gloo/nccl: forming the pair's group, and any one send or receive


class KVTransferError(TransportError):
    """A KV transfer did not complete; the message names the peer, request and progress."""


class BackendUnavailable(TransportError):  # noqa: N818 - names the state of the backend
    """The requested transfer backend cannot run in this process."""


def check_backend(backend: str) -> None:
    """Refuse a backend this process cannot run, with the reason: never swapped for TCP."""
    if backend == "tcp":
        return
    if backend not in BACKENDS:
        raise ValueError(f"unknown KV transfer backend {backend!r}: one of {', '.join(BACKENDS)}")
    if backend in ARENA_KINDS and not os.path.isdir(SHM_DIR):
        raise BackendUnavailable(f"KV transfer backend {backend!r} needs {SHM_DIR}; use tcp")
    if backend in DIST_BACKENDS:
        why = dist_unavailable(backend)
        if why is not None:
            raise BackendUnavailable(f"KV transfer backend {backend!r}: {why}")
        return
    if backend == "cuda_ipc" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"KV transfer backend {backend!r} needs a CUDA device and this process sees none "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use backend='tcp'"
        )


def layer_ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``: compact lists of missing layers."""
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class TransferStats:
    """What one request's transfer moved: K and V payload bytes, begin() to written, layers."""

    bytes: int
    seconds: float
    layers: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class ReceivedKV:
    """A complete transfer: the sender's meta and ``layers[i] == (k_i, v_i)``, on the CPU
    (``tcp``, ``shm``) or on the shared GPU (``cuda_ipc``)."""

    meta: dict[str, Any]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    bytes: int
    seconds: float
    peer: str = ""


# --- sender -------------------------------------------------------------------------------


@dataclass
class _Outgoing:
    num_layers: int
    started: float
    sent_layers: set[int] = field(default_factory=set)
    queued_bytes: int = 0
    ended: bool = False


@dataclass(frozen=True)
class _LayerItem:
    request_id: str
    layer: int
    k: torch.Tensor
    v: torch.Tensor
    ready: torch.cuda.Event | None  # the producer's stream reached this point: safe to copy


@dataclass(frozen=True)
class _MessageItem:
    frame: EncodedFrame


@dataclass(frozen=True)
class _Marker:
    """Resolved by the writer thread once everything queued before it is written."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[float]


_Item = _LayerItem | _MessageItem | _Marker | None


def _settle(marker: _Marker, result: float | BaseException) -> None:
    def settle() -> None:
        if marker.future.done():
            return
        if isinstance(result, BaseException):
            marker.future.set_exception(result)
        else:
            marker.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        marker.loop.call_soon_threadsafe(settle)


def _descriptor(meta: dict[str, Any], name: str, tensor: torch.Tensor) -> dict[str, Any]:
    """What every descriptor frame says of the tensor it stands for (``_described`` reads it)."""
    return {**meta, "name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}


def _handshake(
    sock: socket.socket, peer: str, arena: SharedArena | None, pair: PairGroup | None
) -> None:
    """Send the hello; with an arena or a process group, wait for the receiver to say it
    mapped the arena / joined the group (forming the group here, as its rank 0)."""
    hello: dict[str, Any] = {"version": PROTOCOL_VERSION}
    if arena is not None:
        hello["arena"] = arena.spec()
    if pair is not None:
        hello["dist"] = pair.spec.to_json()
    forming: threading.Thread | None = None
    formed: list[BaseException | None] = []
    try:
        sock.sendall(encode_message("kv_hello", hello).header)
        if arena is None and pair is None:
            return
        if pair is not None:
            # Form the group (rank 0) while waiting for the welcome: a receiver that cannot
            # join says why at once, instead of after the group's whole timeout.
            forming = threading.Thread(
                target=_form, args=(pair, formed), name=f"kv-group {peer}", daemon=True
            )
            forming.start()
        reply = recv_message(sock, who=f"decode peer {peer}", expecting="its kv_welcome")
    except (OSError, TransportError) as e:
        if pair is not None:
            _give_up(pair, forming)
        raise KVTransferError(f"the KV handshake with decode peer {peer} failed: {e}") from e
    if reply.kind != "kv_welcome" or "error" in reply.meta:
        if pair is not None:
            _give_up(pair, forming)
        reason = reply.meta.get("error", f"it answered {reply.kind}")
        what = f"the shared {arena.kind} KV arena" if arena is not None else "the process group"
        raise KVTransferError(f"decode peer {peer} cannot use {what}: {reason}")
    if forming is not None:
        forming.join()  # the receiver has joined, so this returns once the group is up
        if formed and formed[0] is not None:
            raise KVTransferError(f"decode peer {peer}: {formed[0]}") from formed[0]


def _give_up(pair: PairGroup, forming: threading.Thread | None) -> None:
    """Close a group the receiver will not join: stopping its store fails the forming
    thread's rendezvous at once, and it is joined so that no thread is left waiting inside
    torch (one still there when the interpreter exits aborts the process)."""
    pair.close()
    if forming is not None:
        forming.join(FORMING_EXIT_S)


def _form(pair: PairGroup, result: list[BaseException | None]) -> None:
    try:
        pair.connect()
        result.append(None)
    except BaseException as e:  # handed to the handshake, which raises it
        result.append(e)


class KVSender:
    """One connection from a prefill worker to a decode worker's ``KVReceiver``.

    ``begin``, ``end``, ``flush`` and ``close`` belong to the event loop; ``send_layer`` may be
    called from any thread (the loop, or the executor thread running the forward pass).
    ``k`` / ``v`` are read when the writer gets to them, so they must not be modified in
    place until ``end`` returns (fresh tensors per layer, or cache blocks not yet reused).
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        *,
        checksum: bool = True,
        arena: SharedArena | None = None,
        pair: PairGroup | None = None,
    ) -> None:
        self.peer = peer
        self.checksum = checksum
        self.arena = arena
        self.pair = pair
        self._head = 0  # the ring position the next block goes after (the writer's only)
        self.arena_wait_s = ARENA_WAIT_S
        self._sock = sock
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._requests: dict[str, _Outgoing] = {}
        self._error: KVTransferError | None = None
        self._closed = False
        self._queued_bytes = 0
        self._written_bytes = 0
        self._thread = threading.Thread(target=self._run, name=f"kv-sender {peer}", daemon=True)
        self._thread.start()

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        backend: Backend = "tcp",
        checksum: bool = True,
        arena_bytes: int = DEFAULT_ARENA_BYTES,
        device: torch.device | str | None = None,
    ) -> KVSender:
        """Connect to a decode worker's receiver (``timeout`` bounds the connect and the
        handshake). ``shm``/``cuda_ipc`` create an ``arena_bytes`` ring (on ``device`` for
        ``cuda_ipc``) and fail unless the receiver maps it: both must share the machine."""
        check_backend(backend)
        peer = f"{host}:{port}"
        try:
            sock = await asyncio.to_thread(socket.create_connection, (host, port), timeout)
        except OSError as e:
            raise KVTransferError(f"cannot connect to decode peer {peer}: {e}") from e
        arena: SharedArena | None = None
        pair: PairGroup | None = None
        try:
            if backend in ARENA_KINDS:
                arena = await asyncio.to_thread(
                    SharedArena.create, ARENA_KINDS[backend], arena_bytes, device=device
                )
            if backend in DIST_BACKENDS:
                local_host = str(sock.getsockname()[0])  # where the decode peer can reach us
                pair = await asyncio.to_thread(
                    PairGroup.host,
                    cast(DistBackend, backend),
                    local_host,
                    timeout_s=DIST_TIMEOUT_S,  # not the connect timeout: sends are long
                    device=device,
                )
            await asyncio.to_thread(_handshake, sock, peer, arena, pair)
        except BaseException as e:
            if arena is not None:
                arena.close()
            if pair is not None:
                pair.close()
            sock.close()
            if isinstance(e, TransportError) and not isinstance(e, KVTransferError):
                raise KVTransferError(f"KV transfer to decode peer {peer}: {e}") from e
            raise
        sock.settimeout(None)  # the writer thread blocks; close() unblocks it by shutting down
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, peer, checksum=checksum, arena=arena, pair=pair)

    # -- progress, for callers and tests that check the overlap without clocks --

    @property
    def queued_bytes(self) -> int:
        """K/V payload bytes handed to ``send_layer`` so far (all requests)."""
        with self._lock:
            return self._queued_bytes

    @property
    def written_bytes(self) -> int:
        """K/V payload bytes the writer thread has written to the socket so far."""
        with self._lock:
            return self._written_bytes

    @property
    def pending_bytes(self) -> int:
        """Queued but not yet written: what ``send_layer``'s early return left on the queue."""
        with self._lock:
            return self._queued_bytes - self._written_bytes

    def peer_closed(self) -> bool:
        """Whether this connection is dead: it failed, was closed, or the receiver closed its
        end. The receiver never writes, so a readable socket means end of stream or a reset:
        a decode worker that restarted (or went away) while this connection sat idle. A
        caller checks before reusing the connection, so the next request dials afresh
        instead of writing into a socket the kernel would still buffer and then drop."""
        if self._closed or self._error is not None:
            return True
        if self.arena is not None and self.arena.peer_closed:
            return True
        return self._sock_closed()

    def _sock_closed(self) -> bool:
        """The receiver's end of the socket is gone: end of stream or a reset (or bytes the
        protocol never sends after the hello). A non-blocking peek, not select(), which
        refuses descriptors past 1024 that a busy worker reaches."""
        try:
            self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False  # nothing to read: the peer is there and silent, as it should be
        except (OSError, ValueError):
            return True  # reset, or closed underneath us
        return True

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise KVTransferError(f"the KV sender to {self.peer} is closed")

    async def begin(self, request_id: str, meta: dict[str, Any]) -> None:
        """Announce a request; ``meta`` (JSON) must say ``num_layers``."""
        num_layers = meta.get("num_layers")
        if not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"request {request_id}: meta needs num_layers (got {num_layers!r})")
        with self._lock:
            self._raise_if_failed()
            if request_id in self._requests:
                raise ValueError(f"request {request_id} already began on this sender")
            self._requests[request_id] = _Outgoing(num_layers, time.perf_counter())
        frame = encode_message("kv_begin", {"request_id": request_id, "meta": meta})
        self._queue.put(_MessageItem(frame))

    def send_layer(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queue layer ``layer``'s K and V and return at once (the writer thread sends them)."""
        nbytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        with self._lock:
            self._raise_if_failed()
            outgoing = self._requests.get(request_id)
            if outgoing is None or outgoing.ended:
                raise ValueError(f"send_layer for request {request_id}, which is not begun")
            if not 0 <= layer < outgoing.num_layers or layer in outgoing.sent_layers:
                raise ValueError(
                    f"request {request_id}: layer {layer} is out of range 0..."
                    f"{outgoing.num_layers - 1} or already sent"
                )
            outgoing.sent_layers.add(layer)
            outgoing.queued_bytes += nbytes
            self._queued_bytes += nbytes
        ready = None
        if k.is_cuda or v.is_cuda:
            # The writer copies on its own thread's stream: make it wait for the producer's.
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()
        self._queue.put(_LayerItem(request_id, layer, k, v, ready))

    async def end(self, request_id: str) -> TransferStats:
        """Send the end marker and wait until the request's frames are all written."""
        with self._lock:
            self._raise_if_failed()
            outgoing = self._requests.get(request_id)
            if outgoing is None or outgoing.ended:
                raise ValueError(f"end for request {request_id}, which is not begun")
            missing = sorted(set(range(outgoing.num_layers)) - outgoing.sent_layers)
            if missing:
                raise ValueError(
                    f"request {request_id}: end() with layers {layer_ranges(missing)} of "
                    f"{outgoing.num_layers} not sent (abort() it instead)"
                )
            outgoing.ended = True
        meta = {
            "request_id": request_id,
            "layers": outgoing.num_layers,
            "bytes": outgoing.queued_bytes,
        }
        self._queue.put(_MessageItem(encode_message("kv_end", meta)))
        try:
            written_at = await self._marker()
        finally:
            with self._lock:
                self._requests.pop(request_id, None)
        return TransferStats(
            outgoing.queued_bytes, written_at - outgoing.started, outgoing.num_layers
        )

    async def abort(self, request_id: str, reason: str) -> None:
        """Tell the receiver this request will not complete (the prefill failed)."""
        with self._lock:
            self._raise_if_failed()
            if self._requests.pop(request_id, None) is None:
                return
        frame = encode_message("kv_abort", {"request_id": request_id, "reason": reason})
        self._queue.put(_MessageItem(frame))
        await self._marker()

    async def flush(self) -> None:
        """Wait until everything queued so far (all requests) is written to the socket."""
        self._raise_if_failed()
        await self._marker()

    async def _marker(self) -> float:
        loop = asyncio.get_running_loop()
        marker = _Marker(loop, loop.create_future())
        self._queue.put(marker)
        return await marker.future

    async def close(self, *, linger: float = 5.0) -> None:
        """Let queued frames go out for up to ``linger`` seconds, then shut the socket."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, linger)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # unblocks a writer stuck on a full socket
        if self.pair is not None:
            self.pair.close()  # ... or in a send to a receiver that stopped receiving
        await asyncio.to_thread(self._thread.join)
        self._sock.close()
        if self.arena is not None:
            self.arena.close()

    # -- the writer thread --

    def _send(self, frame: EncodedFrame, *, counted: bool) -> None:
        self._sock.sendall(frame.header)
        if frame.payload is None:
            return
        payload = frame.payload
        for start in range(0, payload.nbytes, SEND_CHUNK):
            chunk = payload[start : start + SEND_CHUNK]
            self._sock.sendall(chunk)
            if counted:
                with self._lock:
                    self._written_bytes += chunk.nbytes

    def _write(self, item: _LayerItem | _MessageItem) -> None:
        if isinstance(item, _MessageItem):
            self._send(item.frame, counted=False)
            return
        if item.ready is not None:
            item.ready.synchronize()
        for name, tensor in (("k", item.k), ("v", item.v)):
            meta = {"request_id": item.request_id, "layer": item.layer}
            nbytes = tensor.numel() * tensor.element_size()
            if self.pair is not None:
                self._send(self._to_pair(self.pair, name, tensor, meta), counted=False)
                try:
                    self.pair.send(tensor)
                except BaseException:
                    # The receiver waits in a recv for this tensor: end the connection and
                    # the group, so it fails now instead of at the group's timeout.
                    self.pair.close()
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)
                    raise
                with self._lock:
                    self._written_bytes += nbytes
                continue
            arena = self.arena
            if arena is not None and 0 < nbytes <= arena.capacity:
                self._send(self._to_arena(arena, name, tensor, meta), counted=False)
                with self._lock:
                    self._written_bytes += nbytes
                continue
            frame = encode_tensor(name, tensor, kind="kv_layer", meta=meta, checksum=self.checksum)
            self._send(frame, counted=True)

    def _to_pair(
        self, pair: PairGroup, name: str, tensor: torch.Tensor, meta: dict[str, Any]
    ) -> EncodedFrame:
        """The descriptor of a tensor that follows over the process group."""
        header = _descriptor(meta, name, tensor)
        header["nbytes"] = tensor.numel() * tensor.element_size()
        if self.checksum and pair.device.type == "cpu":
            _, payload = cpu_bytes(tensor)
            header["sha256"] = hashlib.sha256(payload).hexdigest()
        return encode_message("kv_layer_dist", header)

    def _to_arena(
        self, arena: SharedArena, name: str, tensor: torch.Tensor, meta: dict[str, Any]
    ) -> EncodedFrame:
        """Copy ``tensor`` into the ring (waiting for space) and describe where it is."""
        nbytes = tensor.numel() * tensor.element_size()
        header = _descriptor(meta, name, tensor)
        block = place(self._head, nbytes, arena.capacity)
        arena.wait_for_space(
            block.needs,
            timeout=self.arena_wait_s,
            alive=lambda: not self._sock_closed(),
            peer=self.peer,
        )
        start = block.start
        arena.write(start, tensor)
        self._head = block.end
        header.update(start=start, nbytes=nbytes, end=block.end)
        if self.checksum and arena.kind == "shm":
            assert arena.data is not None
            offset = start % arena.capacity
            view: Any = arena.data[offset : offset + nbytes].numpy()
            header["sha256"] = hashlib.sha256(memoryview(view)).hexdigest()
        return encode_message("kv_layer_ref", header)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, _Marker):
                _settle(item, self._error or time.perf_counter())
                continue
            if self._error is not None:
                continue
            try:
                self._write(item)
            except (OSError, PeerGone) as e:  # the socket, or the pair's group
                self._error = KVTransferError(
                    f"decode peer {self.peer} went away while we were sending ({e}); "
                    "the requests in flight on this connection are lost"
                )
            except TransportError as e:  # the shared arena: the receiver stopped reading
                self._error = KVTransferError(f"KV transfer to {self.peer} failed: {e}")
            except Exception as e:  # an unsendable tensor: fail loudly, keep the thread sane
                self._error = KVTransferError(f"KV sender to {self.peer} failed: {e!r}")
                log.exception("KV sender to %s failed", self.peer)


# --- receiver -----------------------------------------------------------------------------


def _layer_frame(meta: dict[str, Any], tensor: torch.Tensor) -> Frame:
    """The ``kv_layer`` frame a descriptor and the tensor it announced stand for."""
    nbytes = tensor.numel() * tensor.element_size()
    frame_meta = {"request_id": str(meta.get("request_id")), "layer": meta.get("layer")}
    return Frame("kv_layer", str(meta.get("name")), frame_meta, tensor, nbytes)


async def _check_digest(tensor: torch.Tensor, meta: dict[str, Any], peer: str, where: str) -> None:
    """A ``ChecksumError`` when the descriptor's SHA-256 is not that of the bytes that came."""
    expected = meta.get("sha256")
    if expected is None:
        return
    _, payload = cpu_bytes(tensor)

    def digest() -> str:
        return hashlib.sha256(payload).hexdigest()

    actual = await asyncio.to_thread(digest) if payload.nbytes > OFFLOAD_BYTES else digest()
    if actual != expected:
        frame = _layer_frame(meta, tensor)
        raise ChecksumError(
            f"tensor {frame.name!r} of request {frame.meta['request_id']} layer "
            f"{frame.meta['layer']} from {peer} is corrupt {where}: SHA-256 {actual[:16]}..., "
            f"descriptor says {str(expected)[:16]}...",
            kind="kv_layer",
            name=frame.name,
            meta=frame.meta,
        )


def _described(meta: dict[str, Any], peer: str) -> tuple[torch.dtype, list[int]]:
    """The dtype and shape a descriptor frame gives, checked against its ``nbytes``."""
    dtype, shape, nbytes = DTYPES.get(str(meta.get("dtype"))), meta.get("shape"), meta.get("nbytes")
    if (
        dtype is None
        or not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or math.prod(shape) * torch.empty((), dtype=dtype).element_size() != nbytes
    ):
        raise TransportError(
            f"{peer} described tensor {meta.get('name')!r} as {meta.get('dtype')} {shape} in "
            f"{nbytes} bytes, which do not match"
        )
    return dtype, shape


@dataclass
class _Incoming:
    request_id: str
    peer: str = ""
    meta: dict[str, Any] | None = None  # None until kv_begin arrived
    started: float = 0.0
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0
    result: ReceivedKV | None = None
    error: TransportError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def num_layers(self) -> int | None:
        return None if self.meta is None else int(self.meta["num_layers"])

    @property
    def complete_layers(self) -> list[int]:
        return sorted(set(self.k) & set(self.v))

    def progress(self) -> str:
        total = "?" if self.num_layers is None else str(self.num_layers)
        return f"{len(self.complete_layers)} of {total} layers"

    def fail(self, error: TransportError) -> None:
        if not self.done.is_set():
            self.error = error
            self.k.clear()
            self.v.clear()
            self.done.set()


class KVReceiver:
    """The decode worker's end: accepts prefill connections, assembles requests' layers.

    Completed transfers wait for ``receive``; at most ``max_unclaimed`` of them are kept (a
    request the decode side gave up on must not pin its KV in memory for ever).
    """

    def __init__(
        self,
        *,
        backend: Backend = "tcp",
        max_unclaimed: int = 256,
        hello_timeout: float = 10.0,
        device: torch.device | str | None = None,
    ) -> None:
        check_backend(backend)
        self.device = device  # where nccl transfers land (the decode worker's GPU)
        self.max_unclaimed = max_unclaimed
        self.hello_timeout = hello_timeout
        self._server: asyncio.Server | None = None
        self._incoming: OrderedDict[str, _Incoming] = OrderedDict()
        self._abandoned: deque[str] = deque(maxlen=4096)
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = False
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: a free port) and return the port."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=STREAM_LIMIT)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _state(self, request_id: str) -> _Incoming:
        state = self._incoming.get(request_id)
        if state is None:
            state = self._incoming[request_id] = _Incoming(request_id)
        return state

    async def receive(self, request_id: str, *, timeout: float) -> ReceivedKV:
        """Wait up to ``timeout`` seconds for request ``request_id``'s complete KV."""
        if self._closed:
            raise KVTransferError("the KV receiver is closed")
        state = self._state(request_id)
        try:
            async with asyncio.timeout(timeout):
                await state.done.wait()
        except TimeoutError:
            raise KVTransferError(self._timeout_message(state, timeout)) from None
        finally:
            if self._incoming.get(request_id) is state:
                del self._incoming[request_id]
            if not state.done.is_set():  # its later frames are dropped, not kept for ever
                state.fail(KVTransferError(f"request {request_id} was given up on"))
                self._abandoned.append(request_id)
        if state.error is not None:
            raise state.error
        assert state.result is not None
        return state.result

    def discard(self, request_id: str) -> None:
        """Forget a request the decode side will not ``receive`` (cancelled)."""
        state = self._incoming.pop(request_id, None)
        if state is not None:
            state.fail(KVTransferError(f"request {request_id} was discarded"))
        self._abandoned.append(request_id)

    @staticmethod
    def _timeout_message(state: _Incoming, timeout: float) -> str:
        if state.meta is None:
            return (
                f"request {state.request_id}: no KV transfer began within {timeout} s "
                "(no prefill peer sent kv_begin for it)"
            )
        total = state.num_layers or 0
        missing = sorted(set(range(total)) - set(state.complete_layers))
        what = f"layers {layer_ranges(missing)}" if missing else "only the end marker"
        return (
            f"request {state.request_id} from prefill peer {state.peer}: timed out after "
            f"{timeout} s with {state.progress()} received; missing {what}"
        )

    async def close(self) -> None:
        """Stop listening, drop connections, fail the receives still waiting."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        for state in self._incoming.values():
            state.fail(KVTransferError(f"the KV receiver closed before request {state.request_id}"))
        self._incoming.clear()

    # -- one prefill connection --

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        address = writer.get_extra_info("peername")
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        owned: dict[str, _Incoming] = {}
        arena: SharedArena | None = None
        pair: PairGroup | None = None
        try:
            hello = await self._hello(reader, peer)
            if "arena" in hello:
                arena = await self._attach(hello["arena"], writer, peer)
            if "dist" in hello:
                pair = await self._join(hello["dist"], writer, peer)
            while True:
                try:
                    frame = await read_frame(
                        reader, timeout=None, peer=peer, expecting="the next KV frame"
                    )
                    if frame.kind in ("kv_layer_ref", "kv_layer_dist"):
                        resolved = await (
                            self._from_arena(arena, frame, owned, peer)
                            if frame.kind == "kv_layer_ref"
                            else self._from_pair(pair, frame, owned, peer)
                        )
                        if resolved is None:
                            continue
                        frame = resolved
                except ChecksumError as e:
                    self._corrupt(e, owned, peer)
                    continue
                self._handle(frame, owned, peer)
        except PeerGone:
            self._fail_owned(owned, f"prefill peer {peer} disappeared")
        except TransportError as e:
            self._fail_owned(owned, f"prefill peer {peer} broke the KV stream", f": {e}")
        except asyncio.CancelledError:
            self._fail_owned(owned, f"the KV receiver closed its connection from {peer}")
            raise
        except Exception as e:
            log.exception("KV connection from %s failed", peer)
            self._fail_owned(owned, f"the KV receiver failed on the stream from {peer}", f": {e!r}")
        finally:
            self._connections.discard(task)
            if arena is not None:
                arena.close()
            if pair is not None:
                pair.close()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _hello(self, reader: asyncio.StreamReader, peer: str) -> dict[str, Any]:
        hello = await read_frame(
            reader, timeout=self.hello_timeout, peer=peer, expecting="a kv_hello"
        )
        version = hello.meta.get("version")
        if hello.kind != "kv_hello" or version != PROTOCOL_VERSION:
            raise TransportError(
                f"{peer} is not a KV sender of protocol {PROTOCOL_VERSION} "
                f"(first frame {hello.kind} version {version!r})"
            )
        return hello.meta

    @staticmethod
    async def _attach(spec: Any, writer: asyncio.StreamWriter, peer: str) -> SharedArena:
        """Map the arena the sender offered and say so (the one reply on this socket)."""
        try:
            arena = await asyncio.to_thread(SharedArena.attach, spec)
        except ArenaError as e:
            log.warning("refusing the shared KV arena of prefill peer %s: %s", peer, e)
            await send_message(writer, "kv_welcome", {"error": str(e)})
            raise TransportError(f"cannot map the shared KV arena of {peer}: {e}") from e
        await send_message(writer, "kv_welcome", {"arena": arena.kind})
        return arena

    async def _join(self, spec: Any, writer: asyncio.StreamWriter, peer: str) -> PairGroup:
        """Join the process group the sender offered and say so (the one reply)."""
        address = writer.get_extra_info("sockname")
        local_host = str(address[0]) if isinstance(address, tuple) else "127.0.0.1"
        try:
            pair = await asyncio.to_thread(
                PairGroup.join, DistSpec.from_json(spec), local_host, device=self.device
            )
        except TransportError as e:
            log.warning("refusing the process group of prefill peer %s: %s", peer, e)
            await send_message(writer, "kv_welcome", {"error": str(e)})
            raise TransportError(f"cannot join the process group of {peer}: {e}") from e
        await send_message(writer, "kv_welcome", {"dist": pair.spec.backend})
        return pair

    @staticmethod
    async def _from_pair(
        pair: PairGroup | None, frame: Frame, owned: dict[str, _Incoming], peer: str
    ) -> Frame | None:
        """The tensor a ``kv_layer_dist`` announces, received over the group (always, so the
        group stays in step; None when its request is no longer wanted)."""
        if pair is None:
            raise TransportError(f"{peer} sent a process-group KV frame without offering a group")
        dtype, shape = _described(frame.meta, peer)
        tensor = await asyncio.to_thread(pair.recv, dtype, shape)
        state = owned.get(str(frame.meta.get("request_id")))
        if state is None or state.done.is_set():
            return None
        await _check_digest(tensor, frame.meta, peer, f"after the {pair.spec.backend} transfer")
        return _layer_frame(frame.meta, tensor)

    @staticmethod
    async def _from_arena(
        arena: SharedArena | None, frame: Frame, owned: dict[str, _Incoming], peer: str
    ) -> Frame | None:
        """The tensor frame a ``kv_layer_ref`` stands for, copied out of the ring (None when
        its request is no longer wanted). The ring space is released either way."""
        if arena is None:
            raise TransportError(f"{peer} sent a shared-arena KV frame without offering an arena")
        meta = frame.meta
        block = ArenaBlock.of(meta)
        try:
            state = owned.get(str(meta.get("request_id")))
            if state is None or state.done.is_set():
                return None
            dtype, shape = _described({**meta, "nbytes": block.nbytes}, peer)
            read = functools.partial(arena.read, block.start, block.nbytes, dtype, shape)
            tensor = await asyncio.to_thread(read) if block.nbytes > OFFLOAD_BYTES else read()
            await _check_digest(tensor, meta, peer, "in the shared arena")
        finally:
            arena.release(block.end)
        return _layer_frame(meta, tensor)

    @staticmethod
    def _fail_owned(owned: dict[str, _Incoming], what: str, detail: str = "") -> None:
        """``what`` happened to the connection: fail its unfinished requests, saying how far."""
        for state in owned.values():
            if not state.done.is_set():
                state.fail(
                    KVTransferError(
                        f"{what} after {state.progress()} of request {state.request_id}{detail}"
                    )
                )
        owned.clear()

    def _corrupt(self, error: ChecksumError, owned: dict[str, _Incoming], peer: str) -> None:
        state = owned.pop(str(error.meta.get("request_id")), None)
        if state is not None:
            state.fail(error)
        else:
            log.warning("corrupt KV frame from %s for no request in flight: %s", peer, error)

    def _handle(self, frame: Frame, owned: dict[str, _Incoming], peer: str) -> None:
        request_id = str(frame.meta.get("request_id"))
        if frame.kind == "kv_begin":
            if request_id in self._abandoned:
                return
            state = self._state(request_id)
            if state.meta is not None or state.done.is_set():
                state.fail(KVTransferError(f"request {request_id} began twice (again by {peer})"))
                return
            meta = frame.meta.get("meta")
            if not isinstance(meta, dict) or not isinstance(meta.get("num_layers"), int):
                state.fail(KVTransferError(f"{peer} began request {request_id} without num_layers"))
                return
            state.peer, state.meta, state.started = peer, meta, time.perf_counter()
            owned[request_id] = state
            return
        owned_state = owned.get(request_id)
        if owned_state is None or owned_state.done.is_set():
            return  # abandoned by the decode side, or already failed: drop its frames
        if frame.kind == "kv_layer":
            self._layer(owned_state, frame)
        elif frame.kind == "kv_end":
            del owned[request_id]
            self._end(owned_state, frame)
        elif frame.kind == "kv_abort":
            del owned[request_id]
            owned_state.fail(
                KVTransferError(
                    f"prefill peer {peer} aborted request {request_id} after "
                    f"{owned_state.progress()}: {frame.meta.get('reason')}"
                )
            )
        else:
            raise TransportError(f"unexpected {frame.kind} frame in a KV stream")

    @staticmethod
    def _layer(state: _Incoming, frame: Frame) -> None:
        layer = frame.meta.get("layer")
        slots = state.k if frame.name == "k" else state.v if frame.name == "v" else None
        total = state.num_layers or 0
        if slots is None or frame.tensor is None or not isinstance(layer, int):
            state.fail(KVTransferError(f"malformed KV frame {frame.name!r} from {state.peer}"))
        elif not 0 <= layer < total or layer in slots:
            state.fail(
                KVTransferError(
                    f"request {state.request_id} from {state.peer}: layer {layer} "
                    f"{frame.name} is out of range 0...{total - 1} or duplicated"
                )
            )
        else:
            slots[layer] = frame.tensor
            state.nbytes += frame.nbytes

    def _end(self, state: _Incoming, frame: Frame) -> None:
        total = state.num_layers or 0
        missing = sorted(set(range(total)) - set(state.complete_layers))
        if missing or frame.meta.get("bytes") != state.nbytes:
            state.fail(
                KVTransferError(
                    f"request {state.request_id} from {state.peer} ended with {state.progress()}"
                    f" ({state.nbytes} bytes, sender says {frame.meta.get('bytes')})"
                    + (f"; missing layers {layer_ranges(missing)}" if missing else "")
                )
            )
            return
        assert state.meta is not None
        layers = [(state.k[i], state.v[i]) for i in range(total)]
        state.result = ReceivedKV(
            state.meta, layers, state.nbytes, time.perf_counter() - state.started, state.peer
        )
        state.k, state.v = {}, {}
        state.done.set()
        self._evict_unclaimed()

    def _evict_unclaimed(self) -> None:
        finished = [rid for rid, s in self._incoming.items() if s.done.is_set()]
        for request_id in finished[: max(0, len(finished) - self.max_unclaimed)]:
            log.warning("dropping the KV of request %s: nobody received it", request_id)
            del self._incoming[request_id]
            self._abandoned.append(request_id)
