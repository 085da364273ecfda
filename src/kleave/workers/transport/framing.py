"""Tensors and small JSON messages over TCP, one self-describing frame at a time.

A frame is a 4-byte big-endian header length, a UTF-8 JSON header
``{"kind", "name", "dtype", "shape", "nbytes", "sha256"?, "meta"}`` and then ``nbytes`` raw
bytes: a tensor's contiguous CPU memory in C order (nothing for a message). JSON rather than
pickle so a peer can never make the reader run code, and a header stays readable in a packet
capture. The optional SHA-256 of the payload is end-to-end integrity that TCP's 16-bit
checksum does not give; it also catches a sender whose tensor changed while it was on the wire.

The encoding half is synchronous (``encode_message``, ``encode_tensor``) so a writer thread
with a blocking socket (``kv_transfer``) sends exactly the frames the asyncio helpers do.
Reads name the peer and what was expected when the peer goes away, so an operator reading the
log knows which worker died in the middle of what.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

HEADER_PREFIX = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes; more means a desynced stream
READ_CHUNK = 1 << 20
# Hash and copy off the event loop above this size, so one big frame does not stall every
# other connection the loop serves.
OFFLOAD_BYTES = 1 << 20
STREAM_LIMIT = 1 << 22  # asyncio stream buffer for our connections (the 64 KiB default is slow)

_DTYPE_NAMES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _DTYPE_NAMES if hasattr(torch, name)
}
_NAME_OF_DTYPE = {dtype: name for name, dtype in DTYPES.items()}


class TransportError(Exception):
    """Moving tensors between workers failed; the message says which peer and what."""


class PeerGone(TransportError):  # noqa: N818 - names the state of the peer, like the brief
    """The peer closed or reset the connection (its process died, or it shut down)."""


class ChecksumError(TransportError):
    """A payload's SHA-256 differs from the one its header announced.

    The header was fine, so the stream is still in step: a reader may drop this frame and go
    on. ``kind``, ``name`` and ``meta`` say which frame it was (e.g. which request's layer).
    """

    def __init__(
        self, message: str, *, kind: str = "", name: str = "", meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.meta = meta or {}


class FrameError(TransportError):
    """The byte stream is not a valid frame (a different protocol, or a desynced stream)."""


class TransportTimeout(TransportError, TimeoutError):  # noqa: N818 - an outcome, like TimeoutError
    """Nothing complete arrived in time; also a ``TimeoutError`` for callers that catch that."""


@dataclass(frozen=True)
class Frame:
    """One received frame: a message (``tensor`` None) or a tensor with its metadata."""

    kind: str
    name: str
    meta: dict[str, Any]
    tensor: torch.Tensor | None = None
    nbytes: int = 0


@dataclass(frozen=True)
class EncodedFrame:
    """A frame ready for the wire: ``header`` (length prefix included), then ``payload``.

    ``payload`` is a view of ``keepalive``'s memory (no copy), so the frame must be written
    before that tensor changes.
    """

    header: bytes
    payload: memoryview | None = None
    keepalive: torch.Tensor | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return 0 if self.payload is None else self.payload.nbytes


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; a clear error for dtypes the frame format does not carry."""
    try:
        return _NAME_OF_DTYPE[dtype]
    except KeyError:
        raise ValueError(
            f"cannot send tensors of dtype {dtype}: supported are {', '.join(DTYPES)}"
        ) from None


def _header(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    if len(body) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {len(body)} bytes is over {MAX_HEADER_BYTES}")
    return HEADER_PREFIX.pack(len(body)) + body


def encode_message(kind: str, meta: dict[str, Any]) -> EncodedFrame:
    """A message frame: header only (``meta`` must be JSON-serialisable)."""
    return EncodedFrame(
        _header({"kind": kind, "name": "", "dtype": None, "shape": None, "nbytes": 0, "meta": meta})
    )


def cpu_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """``tensor``'s contiguous CPU copy (the tensor itself when it already is one) as bytes."""
    if tensor.layout != torch.strided:
        raise ValueError(f"cannot send a {tensor.layout} tensor: only dense tensors")
    cpu = tensor.detach()
    if cpu.device.type != "cpu":
        cpu = cpu.to("cpu")
    cpu = cpu.resolve_conj().resolve_neg().contiguous()
    flat: Any = cpu.reshape(-1).view(torch.uint8).numpy()  # numpy's stubs lack __buffer__
    return cpu, memoryview(flat)


def encode_tensor(
    name: str,
    tensor: torch.Tensor,
    *,
    kind: str = "tensor",
    meta: dict[str, Any] | None = None,
    checksum: bool = True,
) -> EncodedFrame:
    """A tensor frame; the payload aliases the tensor's (CPU, contiguous) memory."""
    wire_dtype = dtype_name(tensor.dtype)
    cpu, payload = cpu_bytes(tensor)
    header: dict[str, Any] = {
        "kind": kind,
        "name": name,
        "dtype": wire_dtype,
        "shape": list(cpu.shape),
        "nbytes": payload.nbytes,
        "meta": meta or {},
    }
    if checksum:
        header["sha256"] = hashlib.sha256(payload).hexdigest()
    return EncodedFrame(_header(header), payload, cpu)


def peer_name(transport_owner: asyncio.StreamWriter | asyncio.StreamReader | None) -> str:
    """``host:port`` of the other end, or ``"the peer"`` when the transport does not say."""
    if transport_owner is None:
        return "the peer"
    if isinstance(transport_owner, asyncio.StreamWriter):
        transport: Any = transport_owner.transport
    else:  # StreamReader keeps its transport private; it is the only place the address lives
        transport = getattr(transport_owner, "_transport", None)
    address = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "the peer" if address is None else str(address)


async def _drain(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except (ConnectionError, BrokenPipeError) as e:
        raise PeerGone(f"{peer_name(writer)} closed the connection while we were sending") from e


async def write_encoded(writer: asyncio.StreamWriter, frame: EncodedFrame) -> None:
    """Write one encoded frame and wait for the transport's buffer to drain."""
    if writer.is_closing():
        raise PeerGone(f"the connection to {peer_name(writer)} is closed")
    writer.write(frame.header)
    if frame.payload is not None and frame.payload.nbytes:
        writer.write(frame.payload)
    await _drain(writer)


async def send_message(writer: asyncio.StreamWriter, kind: str, meta: dict[str, Any]) -> None:
    """Send a small JSON message (control traffic: begin/end of a transfer, errors)."""
    await write_encoded(writer, encode_message(kind, meta))


async def send_tensor(
    writer: asyncio.StreamWriter,
    name: str,
    tensor: torch.Tensor,
    *,
    meta: dict[str, Any] | None = None,
    checksum: bool = True,
    kind: str = "tensor",
) -> None:
    """Send a tensor as its contiguous CPU bytes (a CUDA tensor is copied to the host first).

    The device copy and the hash of a large tensor run on a thread, so the event loop keeps
    serving other connections meanwhile. Returns once the frame is handed to the transport.
    """
    if tensor.is_cuda:
        # The copy runs on another thread's stream: wait for the caller's stream to get here.
        produced = torch.cuda.Event()  # type: ignore[no-untyped-call]
        produced.record()

        def encode_after_producer() -> EncodedFrame:
            produced.synchronize()
            return encode_tensor(name, tensor, kind=kind, meta=meta, checksum=checksum)

        frame = await asyncio.to_thread(encode_after_producer)
    elif tensor.numel() * tensor.element_size() > OFFLOAD_BYTES:
        frame = await asyncio.to_thread(
            encode_tensor, name, tensor, kind=kind, meta=meta, checksum=checksum
        )
    else:
        frame = encode_tensor(name, tensor, kind=kind, meta=meta, checksum=checksum)
    await write_encoded(writer, frame)


async def _read_into(reader: asyncio.StreamReader, view: memoryview, who: str, what: str) -> None:
    got, total = 0, view.nbytes
    while got < total:
        try:
            chunk = await reader.read(min(total - got, READ_CHUNK))
        except ConnectionError as e:
            raise PeerGone(
                f"{who} reset the connection after {got} of {total} bytes of {what}"
            ) from e
        if not chunk:
            if got == 0:
                raise PeerGone(f"{who} closed the connection while {what} was expected")
            raise PeerGone(f"{who} closed the connection after {got} of {total} bytes of {what}")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)


def _sha256(view: memoryview) -> str:
    return hashlib.sha256(view).hexdigest()


def _parse_header(body: bytes, who: str) -> dict[str, Any]:
    try:
        header = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrameError(f"{who} sent a frame header that is not JSON ({e})") from e
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise FrameError(f"{who} sent a frame header without a kind: {body[:200]!r}")
    nbytes = header.get("nbytes", 0)
    if not isinstance(nbytes, int) or nbytes < 0:
        raise FrameError(f"{who} sent a frame header with nbytes={nbytes!r}")
    if not isinstance(header.get("meta", {}), dict):
        raise FrameError(f"{who} sent a frame header whose meta is not an object")
    return header


def _tensor_of(header: dict[str, Any], buffer: bytearray, who: str) -> torch.Tensor:
    dtype = DTYPES.get(str(header.get("dtype")))
    shape = header.get("shape")
    if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise FrameError(
            f"{who} sent tensor {header.get('name')!r} with dtype {header.get('dtype')!r} "
            f"and shape {shape!r}, which this reader cannot build"
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize != len(buffer):
        raise FrameError(
            f"{who} sent tensor {header.get('name')!r} of shape {shape} {header['dtype']} "
            f"with {len(buffer)} bytes, not {math.prod(shape) * itemsize}"
        )
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    timeout: float | None,
    peer: str | None = None,
    expecting: str = "a frame",
) -> Frame:
    """Read one frame, verifying its SHA-256 when the header carries one.

    ``timeout`` bounds the whole frame (None: wait for ever, for idle connections whose
    liveness something else watches). ``peer`` and ``expecting`` only shape error messages.
    Raises ``PeerGone``, ``ChecksumError``, ``FrameError`` or ``TransportTimeout``.
    """
    who = peer or peer_name(reader)
    try:
        async with asyncio.timeout(timeout):
            return await _read_frame(reader, who, expecting)
    except TimeoutError as e:
        if isinstance(e, TransportError):
            raise
        raise TransportTimeout(
            f"no complete frame from {who} within {timeout} s while expecting {expecting}"
        ) from None


async def _read_frame(reader: asyncio.StreamReader, who: str, expecting: str) -> Frame:
    prefix = bytearray(HEADER_PREFIX.size)
    await _read_into(reader, memoryview(prefix), who, expecting)
    (length,) = HEADER_PREFIX.unpack(prefix)
    if length == 0 or length > MAX_HEADER_BYTES:
        raise FrameError(f"{who} sent a frame header length of {length} bytes: not this protocol")
    body = bytearray(length)
    await _read_into(reader, memoryview(body), who, f"the header of {expecting}")
    header = _parse_header(bytes(body), who)
    kind, name = header["kind"], str(header.get("name", ""))
    meta: dict[str, Any] = header.get("meta") or {}
    nbytes: int = header.get("nbytes", 0)
    if header.get("dtype") is None:
        if nbytes:
            raise FrameError(f"{who} sent a {kind} message with a {nbytes}-byte payload")
        return Frame(kind, name, meta)
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    await _read_into(reader, view, who, f"tensor {name!r} ({kind})")
    expected = header.get("sha256")
    if expected is not None:
        actual = await asyncio.to_thread(_sha256, view) if nbytes > OFFLOAD_BYTES else _sha256(view)
        if actual != expected:
            raise ChecksumError(
                f"tensor {name!r} ({kind}, meta {meta}) from {who} is corrupt: SHA-256 "
                f"{actual[:16]}... of its {nbytes} bytes, header says {str(expected)[:16]}...",
                kind=kind,
                name=name,
                meta=meta,
            )
    return Frame(kind, name, meta, _tensor_of(header, buffer, who), nbytes)


def _recv_exactly(sock: socket.socket, nbytes: int, who: str, what: str) -> bytes:
    chunks, got = [], 0
    while got < nbytes:
        try:
            chunk = sock.recv(nbytes - got)
        except TimeoutError:
            raise TransportTimeout(f"{who} sent no {what} in time") from None
        except ConnectionError as e:
            raise PeerGone(f"{who} reset the connection while {what} was expected") from e
        if not chunk:
            raise PeerGone(f"{who} closed the connection while {what} was expected")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket, *, who: str, expecting: str) -> Frame:
    """Blocking read of one message frame (a handshake reply, before a writer thread owns
    the socket); the socket's timeout bounds each read."""
    (length,) = HEADER_PREFIX.unpack(_recv_exactly(sock, HEADER_PREFIX.size, who, expecting))
    if length == 0 or length > MAX_HEADER_BYTES:
        raise FrameError(f"{who} sent a frame header length of {length} bytes: not this protocol")
    header = _parse_header(_recv_exactly(sock, length, who, f"the header of {expecting}"), who)
    if header.get("dtype") is not None or header.get("nbytes"):
        raise FrameError(f"{who} sent a tensor where {expecting} (a message) was expected")
    return Frame(header["kind"], str(header.get("name", "")), header.get("meta") or {})
