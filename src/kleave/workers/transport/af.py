"""Attention <-> FFN activation exchange for PDAF (Step-3 / StepMesh style).

Per layer, the attention worker sends its hidden states to the FFN worker and waits for the
FFN's output; many calls may be in flight on one connection (one per micro-batch, as
StepMesh pipelines them), matched by call id, so replies may come back in any order.

The wire dtype is a choice per client: by default activations travel in their own dtype, so
an fp32 model is bit-exact across the split. ``send_dtype`` / ``return_dtype`` trade precision
for bytes the way StepMesh does (FP8 attention -> FFN with a per-tensor scale, BF16 back).

Frames (``framing``): ``af_hello {version}`` from the client, then ``af_call`` tensors
``{id, layer, dtype, return_dtype, scale?}`` one way and ``af_result`` tensors ``{id, dtype,
scale?}`` or ``af_error {id, error, type}`` messages back. A client whose FFN peer dies fails
every call in flight and every later one with ``PeerGone`` at once, rather than waiting for
a timeout, so the attention worker can report the dead peer and fail over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from kleave.workers.transport.framing import (
    DTYPES,
    STREAM_LIMIT,
    ChecksumError,
    Frame,
    PeerGone,
    TransportError,
    TransportTimeout,
    dtype_name,
    peer_name,
    read_frame,
    send_message,
    send_tensor,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
FFN = Callable[[int, torch.Tensor], torch.Tensor]


class RemoteFFNError(TransportError):
    """The FFN worker's function raised; the message carries its error."""


@dataclass(frozen=True)
class _Wire:
    tensor: torch.Tensor
    meta: dict[str, Any]


def to_wire(tensor: torch.Tensor, wire_dtype: torch.dtype | None) -> _Wire:
    """``tensor`` as it travels, with what the far side needs to restore it.

    FP8 gets a per-tensor scale (amax maps to the format's largest finite value): without it,
    activations beyond the format's narrow range would saturate or underflow.
    """
    meta: dict[str, Any] = {"dtype": dtype_name(tensor.dtype)}
    if wire_dtype is None or wire_dtype == tensor.dtype:
        return _Wire(tensor, meta)
    if wire_dtype.is_floating_point and torch.finfo(wire_dtype).bits == 8:
        amax = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
        scale = amax / torch.finfo(wire_dtype).max if amax > 0 else 1.0
        meta["scale"] = scale
        return _Wire((tensor.float() / scale).to(wire_dtype), meta)
    return _Wire(tensor.to(wire_dtype), meta)


def from_wire(tensor: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Undo ``to_wire``: back to the sender's dtype (and scale)."""
    dtype = DTYPES[str(meta["dtype"])]
    if "scale" in meta:
        return (tensor.float() * float(meta["scale"])).to(dtype)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class FFNServer:
    """Serves ``ffn(layer, h)`` to attention workers.

    The function runs on a thread pool of ``max_concurrency`` threads (one by default: a GPU
    runs one FFN at a time anyway) so the event loop keeps receiving the next micro-batch
    while the current one computes. ``device`` is where ``h`` is moved before the call.
    """

    def __init__(
        self,
        ffn: FFN,
        *,
        max_concurrency: int = 1,
        device: str | torch.device | None = None,
        checksum: bool = True,
    ) -> None:
        self.ffn = ffn
        self.device = device
        self.checksum = checksum
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="ffn")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: a free port) and return the port."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=STREAM_LIMIT)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and drop connections (their clients see ``PeerGone``)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _compute(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if self.device is not None:
            h = h.to(self.device)
        with torch.inference_mode():
            return self.ffn(layer, h)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = peer_name(writer)
        lock = asyncio.Lock()  # one frame at a time on the wire
        calls: set[asyncio.Task[None]] = set()
        try:
            hello = await read_frame(reader, timeout=10.0, peer=peer, expecting="an af_hello")
            if hello.kind != "af_hello" or hello.meta.get("version") != PROTOCOL_VERSION:
                raise TransportError(f"{peer} is not an FFN client of protocol {PROTOCOL_VERSION}")
            while True:
                try:
                    frame = await read_frame(reader, timeout=None, peer=peer, expecting="a call")
                except ChecksumError as e:
                    async with lock:
                        await _send_error(writer, e.meta.get("id"), e)
                    continue
                if frame.kind != "af_call" or frame.tensor is None:
                    raise TransportError(f"{peer} sent a {frame.kind} frame, not an af_call")
                call = asyncio.create_task(self._call(frame, writer, lock))
                calls.add(call)
                call.add_done_callback(calls.discard)
        except PeerGone:
            pass  # the attention worker went away: nothing to answer any more
        except TransportError as e:
            log.warning("FFN connection from %s dropped: %s", peer, e)
        finally:
            for call in list(calls):
                call.cancel()
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _call(self, frame: Frame, writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        meta, call_id = frame.meta, frame.meta.get("id")
        assert frame.tensor is not None
        try:
            h = from_wire(frame.tensor, meta)
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self._executor, self._compute, int(meta["layer"]), h)
            return_dtype = meta.get("return_dtype")
            wire = to_wire(out, None if return_dtype is None else DTYPES[return_dtype])
        except Exception as e:
            log.exception("FFN call %s (layer %s) failed", call_id, meta.get("layer"))
            async with lock:
                await _send_error(writer, call_id, e)
            return
        async with lock:
            await send_tensor(
                writer,
                "out",
                wire.tensor,
                kind="af_result",
                meta={"id": call_id, **wire.meta},
                checksum=self.checksum,
            )


async def _send_error(writer: asyncio.StreamWriter, call_id: Any, error: Exception) -> None:
    with contextlib.suppress(TransportError):  # the caller is gone: it learns that itself
        await send_message(
            writer, "af_error", {"id": call_id, "error": str(error), "type": type(error).__name__}
        )


class FFNClient:
    """The attention worker's connection to one FFN worker; ``ffn`` calls may overlap."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        *,
        send_dtype: torch.dtype | None,
        return_dtype: torch.dtype | None,
        checksum: bool,
    ) -> None:
        self.peer = peer
        self.send_dtype = send_dtype
        self.return_dtype = return_dtype
        self.checksum = checksum
        self._reader, self._writer = reader, writer
        self._lock = asyncio.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[torch.Tensor]] = {}
        self._failure: TransportError | None = None
        self._reading = asyncio.create_task(self._read_replies())

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        send_dtype: torch.dtype | None = None,
        return_dtype: torch.dtype | None = None,
        checksum: bool = True,
    ) -> FFNClient:
        """Connect to an ``FFNServer``; ``*_dtype`` None keeps activations' own dtype."""
        peer = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=STREAM_LIMIT)
        except (OSError, TimeoutError) as e:
            raise PeerGone(f"cannot connect to FFN peer {peer}: {e or 'timed out'}") from e
        await send_message(writer, "af_hello", {"version": PROTOCOL_VERSION})
        return cls(
            reader,
            writer,
            peer,
            send_dtype=send_dtype,
            return_dtype=return_dtype,
            checksum=checksum,
        )

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def ffn(
        self, layer: int, h: torch.Tensor, *, timeout: float | None = None
    ) -> torch.Tensor:
        """The FFN of ``layer`` applied to ``h`` by the remote worker, on ``h``'s device."""
        if self._failure is not None:
            raise self._failure
        call_id = next(self._ids)
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        wire = to_wire(h, self.send_dtype)
        meta = {"id": call_id, "layer": layer, **wire.meta}
        if self.return_dtype is not None:
            meta["return_dtype"] = dtype_name(self.return_dtype)
        try:
            async with self._lock:
                await send_tensor(
                    self._writer,
                    "h",
                    wire.tensor,
                    kind="af_call",
                    meta=meta,
                    checksum=self.checksum,
                )
            async with asyncio.timeout(timeout):
                out = await future
        except TimeoutError:
            raise TransportTimeout(
                f"FFN peer {self.peer} did not answer layer {layer} (call {call_id}) "
                f"within {timeout} s"
            ) from None
        finally:
            self._pending.pop(call_id, None)
        return out.to(h.device) if out.device != h.device else out

    async def _read_replies(self) -> None:
        try:
            while True:
                frame = await self._next_reply()
                if frame is None:
                    continue
                future = self._pending.get(int(frame.meta.get("id", -1)))
                if future is None or future.done():
                    continue  # its caller timed out or was cancelled
                if frame.kind == "af_result" and frame.tensor is not None:
                    future.set_result(from_wire(frame.tensor, frame.meta))
                elif frame.kind == "af_error":
                    error_type = (
                        ChecksumError
                        if frame.meta.get("type") == "ChecksumError"
                        else RemoteFFNError
                    )
                    future.set_exception(
                        error_type(f"FFN peer {self.peer}: {frame.meta.get('error')}")
                    )
                else:
                    raise TransportError(f"FFN peer {self.peer} sent a {frame.kind} frame")
        except PeerGone as e:
            self._fail(PeerGone(f"{e}; {self.in_flight} calls in flight are lost"))
        except TransportError as e:
            self._fail(e)
        except asyncio.CancelledError:
            self._fail(PeerGone(f"the connection to FFN peer {self.peer} was closed"))
            raise

    async def _next_reply(self) -> Frame | None:
        """The next reply; a corrupt one fails only its own call."""
        try:
            return await read_frame(
                self._reader, timeout=None, peer=f"FFN peer {self.peer}", expecting="a reply"
            )
        except ChecksumError as e:
            future = self._pending.get(int(e.meta.get("id", -1)))
            if future is not None and not future.done():
                future.set_exception(e)
            return None

    def _fail(self, error: TransportError) -> None:
        self._failure = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Close the connection; calls still in flight fail with ``PeerGone``."""
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
