"""A same-host ring buffer that KV layers cross instead of the socket (``shm``, ``cuda_ipc``).

When a prefill worker and a decode worker share a machine, both can map the same memory: a
POSIX shared-memory file under ``/dev/shm`` for host tensors, or a CUDA IPC handle of a device
buffer when both sides share a GPU. The sender copies each K/V tensor into the ring and sends
only a small descriptor over the connection (position, dtype, shape, SHA-256); the receiver
copies it out and then advances ``tail`` in the shared header, which frees the space. One
producer, one consumer and positions that only grow, so nobody locks: the sender waits for
space by reading ``tail``, and the receiver still never writes on the socket.

The header (magic, capacity, tail, closed) is always host memory in the ``/dev/shm`` file; for
``cuda`` arenas the data lives on the GPU and the file holds only the header. The receiver
unlinks the file as soon as it has mapped it, so a crash of either side leaves nothing behind
once the other closes; the sender unlinks it too when the receiver never attached.

``tail`` is an aligned 8-byte store read by the other process. The receiver stores it only
after its copy out of the ring returned (a CUDA copy is synchronised first), and the torch
calls in between release and re-take the GIL, which are full memory barriers.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import mmap
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kleave.workers.transport.framing import TransportError

ArenaKind = Literal["shm", "cuda"]
SHM_DIR = "/dev/shm"
ARENA_PREFIX = "kleave-kv-"
HEADER_BYTES = 4096  # one page: the data of a host arena starts page-aligned
ALIGN = 256  # every block starts on a 256-byte boundary (vectorised copies, CUDA alignment)
MAGIC = 0x6B6C65617665_4B56  # "kleave" "KV"
_MAGIC, _CAPACITY, _TAIL, _CLOSED = range(4)
# Map every page up front: a ring touches fresh pages on its first lap, and a page fault per
# 4 KiB in both processes made the first 32 MiB of transfers slower than the socket.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class ArenaError(TransportError):
    """The shared arena could not be created, attached, or used; the message says why."""


@dataclass(frozen=True)
class Placement:
    """Where the next block goes: ``[start, end)``, once the reader's tail reaches ``needs``."""

    start: int
    end: int
    needs: int


def place(head: int, nbytes: int, capacity: int) -> Placement:
    """Place a block of ``nbytes`` in a ring whose writer is at ``head``.

    Blocks never wrap: one that would cross the end of the ring starts the next lap, and the
    skipped bytes are freed with it (``end`` is what the reader releases). The memory the block
    reuses held positions ``capacity`` earlier; those at or past ``head`` were skipped, never
    written, so the writer only waits for the reader to release ``min(end - capacity, head)``.
    ``capacity`` is a multiple of ``ALIGN``, so every block starts aligned.
    """
    size = -(-nbytes // ALIGN) * ALIGN
    if not 0 < size <= capacity or capacity % ALIGN:
        raise ValueError(f"a block of {nbytes} bytes does not fit a ring of {capacity}")
    start = head
    if start % capacity + size > capacity:
        start += capacity - start % capacity
    return Placement(start, start + size, min(start + size - capacity, head))


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: Any) -> bytes | None:
    return None if value is None else base64.b64decode(str(value))


# Fields of torch.multiprocessing.reductions.rebuild_cuda_tensor that vary per buffer; the
# rest (tensor class, dtype, shape) are fixed for an arena. Sent as JSON, never pickled.
_CUDA_FIELDS = (
    "storage_device",
    "storage_handle",
    "storage_size_bytes",
    "storage_offset_bytes",
    "requires_grad",
    "ref_counter_handle",
    "ref_counter_offset",
    "event_handle",
    "event_sync_required",
)
_CUDA_BYTES = {"storage_handle", "ref_counter_handle", "event_handle"}


def _share_cuda(data: torch.Tensor) -> dict[str, Any]:
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(data)  # type: ignore[no-untyped-call]
    fields = dict(zip(_CUDA_FIELDS, args[6:], strict=True))
    return {k: _b64(v) if k in _CUDA_BYTES else v for k, v in fields.items()}


def _open_cuda(spec: dict[str, Any], capacity: int) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    fields = {k: _unb64(spec.get(k)) if k in _CUDA_BYTES else spec.get(k) for k in _CUDA_FIELDS}
    data = rebuild_cuda_tensor(  # type: ignore[no-untyped-call]
        torch.Tensor,
        (capacity,),
        (1,),
        0,
        torch.storage.UntypedStorage,
        torch.uint8,
        *fields.values(),
    )
    assert isinstance(data, torch.Tensor)
    return data


class SharedArena:
    """One connection's ring: ``data`` (``capacity`` bytes) and the shared ``tail``/``closed``."""

    def __init__(
        self, kind: ArenaKind, path: str, mapping: mmap.mmap, data: torch.Tensor, *, owner: bool
    ) -> None:
        self.kind = kind
        self.path = path
        self.capacity = int(data.numel())
        self.owner = owner
        self._mmap = mapping
        self._header: torch.Tensor | None = torch.frombuffer(mapping, dtype=torch.int64, count=4)
        self.data: torch.Tensor | None = data
        self._cuda: dict[str, Any] | None = None
        self._stream: torch.cuda.Stream | None = None

    # -- creating (sender) and attaching (receiver) --

    @classmethod
    def create(
        cls, kind: ArenaKind, capacity: int, *, device: torch.device | str | None = None
    ) -> SharedArena:
        """A fresh arena; ``device`` is the GPU of a ``cuda`` arena (default: the current one)."""
        capacity -= capacity % ALIGN
        if capacity <= 0:
            raise ValueError(f"a KV arena needs at least {ALIGN} bytes")
        if not os.path.isdir(SHM_DIR):
            raise ArenaError(f"{SHM_DIR} does not exist here: the shared KV arena needs it")
        path = os.path.join(SHM_DIR, f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
        size = HEADER_BYTES + (capacity if kind == "shm" else 0)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:  # reserve the pages now: a full tmpfs is an error here, not a SIGBUS later
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise ArenaError(
                    f"cannot reserve {size} bytes of shared memory in {SHM_DIR} for the KV "
                    f"arena ({os.strerror(e.errno or errno.ENOSPC)}); lower the arena size or "
                    f"give the pod a larger {SHM_DIR} (an emptyDir with medium: Memory)"
                ) from e
            mapping = mmap.mmap(fd, size, flags=_MAP_FLAGS)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        if kind == "shm":
            data = torch.frombuffer(mapping, dtype=torch.uint8, offset=HEADER_BYTES, count=capacity)
        else:
            dev = torch.device(device) if device is not None else torch.device("cuda")
            data = torch.empty(capacity, dtype=torch.uint8, device=dev)
        arena = cls(kind, path, mapping, data, owner=True)
        assert arena._header is not None
        arena._header[_MAGIC] = MAGIC
        arena._header[_CAPACITY] = capacity
        if kind == "cuda":
            arena._cuda = _share_cuda(data)
        return arena

    def spec(self) -> dict[str, Any]:
        """What the receiver needs to attach (JSON, for the connection's hello)."""
        return {"kind": self.kind, "path": self.path, "capacity": self.capacity, "cuda": self._cuda}

    @classmethod
    def attach(cls, spec: Any) -> SharedArena:
        """Map the arena a sender described in its hello, then unlink its file."""
        if not isinstance(spec, dict) or spec.get("kind") not in ("shm", "cuda"):
            raise ArenaError(f"the sender's arena description is not one: {spec!r}")
        kind: ArenaKind = spec["kind"]
        path, capacity = str(spec.get("path")), spec.get("capacity")
        if (
            os.path.dirname(path) != SHM_DIR
            or not isinstance(capacity, int)
            or capacity <= 0
            or capacity % ALIGN
        ):
            raise ArenaError(f"the sender's arena is not under {SHM_DIR} or has no capacity")
        if not os.path.basename(path).startswith(ARENA_PREFIX):
            raise ArenaError(f"{path} is not named like a kleave KV arena ({ARENA_PREFIX}*)")
        size = HEADER_BYTES + (capacity if kind == "shm" else 0)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise ArenaError(
                f"the sender's shared KV arena {path} is not on this machine: shm and cuda_ipc "
                "need the prefill and decode workers on one host (same /dev/shm); use tcp"
            ) from None
        except OSError as e:  # e.g. another user's 0600 file: the workers' UIDs differ
            raise ArenaError(
                f"cannot open the sender's shared KV arena {path}: {os.strerror(e.errno or 0)} "
                "(it is mode 0600: run the prefill and decode workers as the same user)"
            ) from e
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ArenaError(f"{path} is {actual} bytes, not {size}")
            mapping = mmap.mmap(fd, size, flags=_MAP_FLAGS)
        except OSError as e:
            raise ArenaError(f"cannot map the shared KV arena {path}: {e}") from e
        finally:
            os.close(fd)
        header = torch.frombuffer(mapping, dtype=torch.int64, count=4)
        valid = int(header[_MAGIC]) == MAGIC and int(header[_CAPACITY]) == capacity
        del header
        if not valid:  # checked before the unlink: never delete a file that is not ours
            raise ArenaError(f"{path} is not a kleave KV arena of {capacity} bytes")
        with contextlib.suppress(OSError):
            os.unlink(path)  # both ends hold mappings now; the name is no longer needed
        if kind == "shm":
            data = torch.frombuffer(mapping, dtype=torch.uint8, offset=HEADER_BYTES, count=capacity)
        else:
            if not torch.cuda.is_available():
                raise ArenaError("the sender's arena is on a GPU and this process sees none")
            try:
                data = _open_cuda(spec.get("cuda") or {}, capacity)
            except Exception as e:
                raise ArenaError(f"cannot open the sender's CUDA IPC arena: {e}") from e
        return cls(kind, path, mapping, data, owner=False)

    # -- the shared header --

    def _word(self, index: int) -> int:
        if self._header is None:
            raise ArenaError("the KV arena is closed")
        return int(self._header[index])

    @property
    def tail(self) -> int:
        """Bytes (positions) the receiver has released so far."""
        return self._word(_TAIL)

    @property
    def peer_closed(self) -> bool:
        """The receiver said it will not read any more (it closed the connection's arena)."""
        return self._word(_CLOSED) != 0

    # -- the sender's side --

    def wait_for_space(
        self, needs: int, *, timeout: float, alive: Callable[[], bool], peer: str
    ) -> None:
        """Block until the receiver has released the ring up to position ``needs``."""
        deadline = time.monotonic() + timeout
        pause = 20e-6
        while self.tail < needs:
            if self.peer_closed or not alive():
                raise ArenaError(
                    f"decode peer {peer} went away (it stopped reading the shared KV arena)"
                )
            if time.monotonic() > deadline:
                raise ArenaError(
                    f"decode peer {peer} has not freed space in the shared KV arena for "
                    f"{timeout} s (it holds {needs - self.tail} bytes more than fit in "
                    f"{self.capacity}); it is stuck or too slow"
                )
            time.sleep(pause)
            pause = min(pause * 2, 200e-6)  # a GPU copies ~0.5 GB in 200 us: poll often

    def write(self, start: int, tensor: torch.Tensor) -> int:
        """Copy ``tensor``'s bytes to position ``start``; returns the byte count."""
        assert self.data is not None
        nbytes = tensor.numel() * tensor.element_size()
        offset = start % self.capacity
        region = self.data[offset : offset + nbytes]
        if self.kind == "cuda":
            # A side stream, so waiting for this copy does not wait for the model's kernels
            # on the default stream (the caller synchronised with the producer already).
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.data.device)  # type: ignore[no-untyped-call]
            with torch.cuda.stream(self._stream):
                flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                region.copy_(flat, non_blocking=True)
            self._stream.synchronize()
        else:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            region.copy_(flat)
        return int(flat.numel())

    # -- the receiver's side --

    def read(self, start: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """A copy of the block at ``start`` (on the arena's device) as ``dtype``/``shape``."""
        data = self.data  # a local reference: close() may run meanwhile (it never unmaps)
        if data is None:
            raise ArenaError("the KV arena is closed")
        offset = start % self.capacity
        if start < 0 or nbytes < 0 or offset + nbytes > self.capacity:
            raise ArenaError(f"block [{start}, +{nbytes}) is outside the {self.capacity}-byte ring")
        out = torch.empty(nbytes, dtype=torch.uint8, device=data.device)
        out.copy_(data[offset : offset + nbytes])
        if self.kind == "cuda":
            torch.cuda.current_stream(data.device).synchronize()
        return out.view(dtype).reshape(shape)

    def release(self, end: int) -> None:
        """Free the ring up to position ``end`` (everything the sender placed before it)."""
        if self._header is None:
            return
        if end > int(self._header[_TAIL]):
            self._header[_TAIL] = end

    # -- closing --

    def close(self) -> None:
        """Let go of the ring; the receiver first tells the sender it is gone, the owner
        unlinks the file. The memory is unmapped when the last tensor viewing it is freed,
        never explicitly: a copy still running in another thread keeps its view valid."""
        if self._header is None:
            return
        if not self.owner:
            self._header[_CLOSED] = 1
        self._header = None
        cuda = self.kind == "cuda"
        self.data = None
        self._stream = None
        if self.owner:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            if cuda:  # a buffer shared with nobody who attached stays in torch's IPC limbo
                torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class ArenaBlock:
    """Where one tensor sits in the ring, as the descriptor frame says it."""

    start: int
    nbytes: int
    end: int

    @classmethod
    def of(cls, meta: dict[str, Any]) -> ArenaBlock:
        start, nbytes, end = meta.get("start"), meta.get("nbytes"), meta.get("end")
        if not all(isinstance(x, int) for x in (start, nbytes, end)):
            raise ArenaError(f"a KV arena descriptor without start/nbytes/end: {meta}")
        assert isinstance(start, int) and isinstance(nbytes, int) and isinstance(end, int)
        if not start <= start + nbytes <= end:
            raise ArenaError(
                f"a KV arena descriptor with start {start}, nbytes {nbytes}, end {end}"
            )
        return cls(start, nbytes, end)
