"""The prefill worker's compute: one prompt, or several in one pass, and the queue that
batches them (`PrefillBatcher`). No I/O of its own.

Each prompt's K/V go to its own KV sender layer by layer as they exist (``send_layer`` only
queues; the sender's thread writes). Several prompts are one pass: embedded together, each
attends over its own tokens (and its cached prefix) alone, and then their hidden states go
through the layer's FFN as one batch, so the FFN's GEMMs (a MoE's grouped GEMM above all)
see every prompt's tokens at once, which is where batching pays; on a ``MoEDecoder`` the QKV
and output projections are one GEMM for all prompts too (`attention_prefill_packed`), only
the attention itself runs prompt by prompt (vLLM and SGLang pack that too, in varlen
kernels). A prompt whose sender fails stops sending and fails alone; the others finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kleave.workers.model import Decoder, MoEDecoder
from kleave.workers.prefix_cache import PrefixCache, PrefixHit
from kleave.workers.serve.forward import ModelThread

KVPair = tuple[torch.Tensor, torch.Tensor]


class LayerSink(Protocol):
    """Where a prompt's K/V go: a ``KVSender`` (its ``send_layer`` only queues)."""

    def send_layer(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...


@dataclass
class PrefillJob:
    """One prompt: where its K/V go, and from which position (`skip`: what the decode
    worker holds already). `logits`, `cached` and `error` are filled in by the pass."""

    request_id: str
    tokens: list[int]
    sender: LayerSink
    skip: int = 0
    logits: torch.Tensor | None = None
    cached: int = 0  # leading tokens taken from the prefix cache, not computed
    error: BaseException | None = None  # its sender failed (queueing a layer raised)
    kv: list[KVPair] = field(default_factory=list)

    def send(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.error is not None:
            return
        try:
            self.sender.send_layer(self.request_id, layer, k[self.skip :], v[self.skip :])
        except Exception as error:  # its transfer is over; the other prompts go on
            self.error = error


def prefill_jobs(model: Decoder, jobs: Sequence[PrefillJob], cache: PrefixCache | None) -> None:
    """Prefill every job (runs on the model thread, the prefix cache's only user)."""
    hits = [cache.lookup(job.tokens) if cache is not None else PrefixHit(0, None) for job in jobs]
    if len(jobs) == 1:  # the model's own pass (one command for a tensor-parallel group)
        job, hit = jobs[0], hits[0]
        ids = torch.tensor(job.tokens[hit.tokens :], dtype=torch.long)
        job.logits, job.kv = model.prefill(ids, hit.kv, on_layer=job.send)
    else:
        _together(model, jobs, hits)
    for job, hit in zip(jobs, hits, strict=True):
        job.cached = hit.tokens
        if cache is not None:
            cache.insert(job.tokens, job.kv)


def _together(model: Decoder, jobs: Sequence[PrefillJob], hits: Sequence[PrefixHit]) -> None:
    """`Decoder.prefill` of several prompts: per-prompt attention, one FFN per layer."""
    new = [job.tokens[hit.tokens :] for job, hit in zip(jobs, hits, strict=True)]
    bounds: list[tuple[int, int]] = []
    start = 0
    for tokens in new:
        bounds.append((start, start + len(tokens)))
        start += len(tokens)
    positions = [model.prefill_positions(len(t), hit.kv) for t, hit in zip(new, hits, strict=True)]
    h = model.embed(torch.tensor([t for tokens in new for t in tokens], dtype=torch.long))
    for layer in range(model.config.num_layers):
        pasts = [None if hit.kv is None else hit.kv[layer] for hit in hits]
        if isinstance(model, MoEDecoder):  # a tensor-parallel group goes prompt by prompt
            h, kv = model.attention_prefill_packed(layer, h, bounds, torch.cat(positions), pasts)
        else:
            outs, kv = [], []
            for (lo, hi), where, past in zip(bounds, positions, pasts, strict=True):
                out, k, v = model.attention_prefill(layer, h[lo:hi], where, past)
                outs.append(out)
                kv.append((k, v))
            h = torch.cat(outs)
        for job, (k, v) in zip(jobs, kv, strict=True):
            job.send(layer, k, v)
            job.kv.append((k, v))
        h = model.ffn(layer, h)
    last = torch.tensor([hi - 1 for _, hi in bounds], device=h.device)
    for job, logits in zip(jobs, model.logits(h[last]), strict=True):
        job.logits = logits


@dataclass
class _Queued:
    job: PrefillJob
    done: asyncio.Future[None]


class PrefillBatcher:
    """First come, first served, several at a time: while the model runs one batch, the
    prompts that arrive queue, and the next batch takes them in order up to `max_tokens` prompt
    tokens (the first prompt always fits) and `max_jobs` prompts."""

    def __init__(
        self,
        thread: ModelThread,
        compute: Callable[[list[PrefillJob]], None],
        *,
        max_tokens: int,
        max_jobs: int,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.thread = thread
        self.compute = compute
        self.max_tokens = max_tokens
        self.max_jobs = max_jobs
        self.on_change = on_change
        self.running = 0  # prompts in the batch the model runs now
        self.batches = 0
        self._queue: deque[_Queued] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="prefill-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        _settle(list(self._queue), RuntimeError("the prefill worker is shutting down"))
        self._queue.clear()

    async def run(self, job: PrefillJob) -> None:
        """Prefill `job` in the next batch that has room for it (its fields then hold the
        outcome); an exception of the whole pass is raised here."""
        if self._task is None or self._task.done():
            raise RuntimeError("the prefill worker's batcher is not running")
        queued = _Queued(job, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        self._wake.set()
        self.on_change()
        try:
            await asyncio.shield(queued.done)
        except asyncio.CancelledError:
            if queued in self._queue:  # not started: it never runs
                self._queue.remove(queued)
                self.on_change()
            else:  # it runs on; nobody will read how it ended
                queued.done.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise

    def _take(self) -> list[_Queued]:
        batch = [self._queue.popleft()]
        tokens = len(batch[0].job.tokens)
        while self._queue and len(batch) < self.max_jobs:
            size = len(self._queue[0].job.tokens)
            if tokens + size > self.max_tokens:
                break
            batch.append(self._queue.popleft())
            tokens += size
        return batch

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take()
            self.running = len(batch)
            self.batches += 1
            self.on_change()
            try:
                await self.thread.run(self.compute, [queued.job for queued in batch])
            except Exception as error:
                _settle(batch, error)
            except BaseException:  # cancelled: the batch fails too, then the loop stops
                _settle(batch, RuntimeError("the prefill worker is shutting down"))
                raise
            else:
                _settle(batch, None)
            finally:
                self.running = 0
                self.on_change()


def _settle(batch: list[_Queued], error: BaseException | None) -> None:
    for queued in batch:
        if queued.done.done():
            continue
        if error is None:
            queued.done.set_result(None)
        else:
            queued.done.set_exception(error)
