"""A two-rank ``torch.distributed`` group per prefill -> decode connection (``gloo``, ``nccl``).

The KV connection's socket still carries the protocol (hello, begin, end, one descriptor per
tensor); the tensors themselves go ``send``/``recv`` over the pair's process group: NCCL
between GPUs (NVLink, InfiniBand with GPUDirect), gloo between CPUs. This is the layout of
vLLM's P2P-NCCL connector: one group per P/D pair, made on demand, not one world for all.

The sender hosts the rendezvous: a ``TCPStore`` on an ephemeral port of the address its KV
socket leaves from, announced in the hello; it is rank 0, the receiver rank 1. The sender's
group talks to that store through a client of its own, so ``close`` can stop the server while
the group is still forming: the forming thread's wait then fails at once instead of holding a
thread inside C++ for the whole timeout (a daemon thread still there when the interpreter exits
aborts the process). Groups are
built directly (``ProcessGroupGloo``/``ProcessGroupNCCL``), never through
``init_process_group``, because a decode worker has one group per prefill peer and a prefill
worker one per decode peer. ``close`` aborts the group, which wakes a peer blocked in a send
or receive with an error at once (and a dead peer's sockets do the same for gloo).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # not in __all__

from kleave.workers.transport.framing import PeerGone, TransportError
from kleave.workers.transport.process_groups import gloo_group, nccl_group

DistBackend = Literal["gloo", "nccl"]
DIST_BACKENDS: tuple[str, ...] = ("gloo", "nccl")
SENDER, RECEIVER = 0, 1


def dist_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run in this process, or None."""
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if backend == "gloo" and not dist.is_gloo_available():
        return "this torch build has no gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            return (
                "the nccl KV backend needs a CUDA device and this process sees none "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use tcp"
            )
        if not dist.is_nccl_available():
            return "this torch build has no NCCL"
    return None


@dataclass(frozen=True)
class DistSpec:
    """The rendezvous the sender announces in its hello."""

    backend: DistBackend
    host: str
    port: int
    timeout_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "host": self.host,
            "port": self.port,
            "timeout_s": self.timeout_s,
        }

    @classmethod
    def from_json(cls, value: Any) -> DistSpec:
        if (
            not isinstance(value, dict)
            or value.get("backend") not in DIST_BACKENDS
            or not isinstance(value.get("host"), str)
            or not isinstance(value.get("port"), int)
            or not isinstance(value.get("timeout_s"), int | float)
        ):
            raise TransportError(f"the sender's process-group description is not one: {value!r}")
        return cls(value["backend"], value["host"], value["port"], float(value["timeout_s"]))


class PairGroup:
    """One connection's two-rank group; ``send``/``recv`` block (call them off the loop)."""

    def __init__(
        self,
        spec: DistSpec,
        rank: int,
        store: TCPStore,
        *,
        local_host: str,
        device: torch.device | str | None,
        server: TCPStore | None = None,
    ) -> None:
        self.spec = spec
        self.rank = rank
        self.peer_rank = RECEIVER if rank == SENDER else SENDER
        self.device = torch.device("cpu") if spec.backend == "gloo" else _cuda(device)
        self._store: TCPStore | None = store
        self._server = server  # the sender's listening store (the receiver has none)
        self._local_host = local_host
        self._group: Any = None
        self._closed = False

    @classmethod
    def host(
        cls,
        backend: DistBackend,
        local_host: str,
        *,
        timeout_s: float,
        device: torch.device | str | None = None,
    ) -> PairGroup:
        """The sender's side: start the rendezvous store (the group forms in ``connect``)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            server = TCPStore(local_host, 0, 2, True, timeout=timeout, wait_for_workers=False)
            store = TCPStore(local_host, int(server.port), 2, False, timeout=timeout)
        except Exception as e:  # RuntimeError/DistNetworkError with the socket's reason
            raise TransportError(
                f"cannot start the {backend} rendezvous on {local_host}: {e}"
            ) from e
        spec = DistSpec(backend, local_host, int(server.port), timeout_s)
        return cls(spec, SENDER, store, local_host=local_host, device=device, server=server)

    @classmethod
    def join(
        cls, spec: DistSpec, local_host: str, *, device: torch.device | str | None = None
    ) -> PairGroup:
        """The receiver's side: reach the sender's store and form the group (blocks)."""
        why = dist_unavailable(spec.backend)
        if why is not None:
            raise TransportError(why)
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        try:
            store = TCPStore(spec.host, spec.port, 2, False, timeout=timeout)
        except Exception as e:
            where = f"{spec.host}:{spec.port}"
            raise TransportError(
                f"cannot reach the sender's {spec.backend} rendezvous at {where}: {e}"
            ) from e
        pair = cls(spec, RECEIVER, store, local_host=local_host, device=device)
        pair.connect()
        return pair

    def connect(self) -> None:
        """Form the group; returns once both ranks did (or raises after the timeout)."""
        timeout = datetime.timedelta(seconds=self.spec.timeout_s)
        if self._store is None:
            raise TransportError(f"the {self.spec.backend} group is closed")
        try:
            if self.spec.backend == "gloo":
                self._group = gloo_group(
                    self._store, self.rank, 2, timeout=timeout, host=self._local_host
                )
            else:
                # On a timeout or a dead peer, abort the communicator and report it here;
                # PyTorch's default (3) tears the whole process down, every other
                # connection with it.
                os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
                self._group = nccl_group(
                    self._store, self.rank, 2, timeout=timeout, device=self.device
                )
        except Exception as e:
            raise TransportError(f"the {self.spec.backend} group did not form: {e}") from e
        if self._closed:  # closed while forming (the handshake gave up): do not leak it
            self.close()
            raise TransportError(f"the {self.spec.backend} group was closed while forming")

    def send(self, tensor: torch.Tensor) -> None:
        """Send ``tensor`` (moved to this group's device first) to the peer rank."""
        data = tensor.detach().to(self.device).contiguous()
        self._run(lambda: self._group.send([data], self.peer_rank, 0), "sending to")

    def recv(self, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """Receive the peer's next tensor, which must be ``dtype``/``shape``."""
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self._run(lambda: self._group.recv([out], self.peer_rank, 0), "receiving from")
        return out

    def _run(self, op: Any, what: str) -> None:
        if self._group is None:
            raise TransportError(f"the {self.spec.backend} group is closed")
        try:
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    self._wait_nccl(op(), what)
            else:
                op().wait()  # gloo bounds it with the group's timeout
        except RuntimeError as e:
            message = str(e).splitlines()[0][:300]
            if "closed by peer" in message or "reset by peer" in message:
                raise PeerGone(f"the {self.spec.backend} peer went away ({message})") from e
            raise TransportError(f"{self.spec.backend} failed {what} the peer: {message}") from e

    def _wait_nccl(self, work: Any, what: str) -> None:
        """An NCCL op's ``wait`` only orders streams; poll it against the group's timeout so
        a stalled peer fails this connection, not the process (abort, then raise)."""
        deadline = time.monotonic() + self.spec.timeout_s
        pause = 20e-6
        while not work.is_completed():
            if time.monotonic() > deadline:
                self.close()
                raise TransportError(
                    f"nccl: {what} the peer did not finish within {self.spec.timeout_s} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        work.wait()
        torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        """Abort the group (the peer's pending send/recv fail now instead of at the
        timeout) and stop the rendezvous store, so nobody else can join through it and a
        group still forming on it (this side's or the peer's) fails now."""
        self._closed = True
        group, self._group = self._group, None
        if group is not None:
            with contextlib.suppress(Exception):  # closing: the peer learns it either way
                group.abort()
        self._server = None  # the listening TCPStore stops with its only reference
        self._store = None


def _cuda(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    resolved = torch.device(device)
    if resolved.type != "cuda":
        raise TransportError(f"the nccl KV backend needs a CUDA device, not {resolved}")
    return resolved
