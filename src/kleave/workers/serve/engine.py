"""Continuous batching over the paged KV cache: the decode side of every worker that streams.

One loop, one iteration at a time: admit waiting requests while the cache has blocks for them,
run up to ``max_prefill_tokens`` of prefill, then one `decode` for every running sequence
together, then hand each sequence its token. Prefill is chunked, as vLLM's is: a prompt longer
than what is left of an iteration's budget is prefilled over several iterations, each chunk
attending over the K/V of the chunks before it (read back from the cache), so one long prompt
delays the running sequences' next token by one chunk, not by its whole prefill. A request
enters in one of three ways, and all three leave it in the same state (its context's K/V in
the cache, its last output token to be fed next):

* fresh (colocated): the engine prefills it, and the last chunk yields the first token; with
  prefix caching the cache's blocks of a prefix an earlier request computed are shared and
  only the rest is prefilled (``PagedKVCache.allocate_prefix``);
* with received KV (PD/PDAF decode): the prefill worker's K/V are copied into the cache and the
  prefill worker's first token is the first output. With prefix caching the received prompt's
  blocks are registered like a computed one's, and a prefix this cache already holds is not
  received at all: ``hold_prefix`` pins it before the prefill (``prefix_holds``), the prefill
  worker sends the K/V after it, and the request takes the hold over. Untaken holds give
  way to anything that needs blocks (a running sequence's next block, or with nothing
  running the queue's head, for which waiting requests give up theirs too), and a request
  whose hold is gone (dropped, expired) is recomputed like a preempted one (below), not
  failed; only holds taken by requests whose K/V are arriving are waited for;
* preempted: when a running sequence needs a block and none is free, the youngest running
  sequence is evicted (its blocks freed, its output kept) and later recomputed by a prefill
  over prompt + output, as vLLM's recompute preemption does. Greedy output stays the same.

A request that could never fit (its prompt plus ``max_tokens`` needs more blocks than the cache
has, or more positions than the model) is refused up front with the field to change, so nothing
waits forever. The cache and the model are touched only by this loop (between its awaits on
the model thread), so no lock is needed and an abort never frees blocks under a running step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.serve.forward import Forward, KVLayers, ModelThread
from kleave.workers.serve.metrics import WorkerMetrics
from kleave.workers.serve.prefix_holds import Hold, PrefixHolds
from kleave.workers.serve.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


class RejectedRequestError(ValueError):
    """A request this worker will never run; `field` is the request field to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TokenEvent:
    token: int
    index: int


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" (a stop token) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    status: int = 500


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass(eq=False)
class _Sequence:
    request_id: str
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    arrival: float
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    output: list[int] = field(default_factory=list)
    kv: KVLayers | None = None  # received prompt K/V, until copied into the cache
    kv_start: int = 0  # the received K/V's first position: the end of the prefix it holds
    last_token_at: float = 0.0
    done: bool = False
    computed: int = 0  # while prefilling: context tokens whose K/V is in the cache

    @property
    def prefill_context(self) -> list[int]:
        """What a prefill computes: the prompt, or (preempted) all but the last output token,
        which the next decode step feeds."""
        return self.prompt if not self.output else self.prompt + self.output[:-1]

    @property
    def context_tokens(self) -> int:
        """Tokens whose K/V the next step needs in the cache, its own new token included."""
        return len(self.prompt) + max(len(self.output), 1)


class RequestStream:
    """One request's events; leaving the iteration early aborts the request."""

    def __init__(self, engine: Engine, seq: _Sequence) -> None:
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request_id

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self._seq.events.get()
                yield event
                if not isinstance(event, TokenEvent):
                    return
        finally:
            if not self._seq.done:
                self._engine.abort(self.request_id)


class Engine:
    """Continuous batching of one worker; `start()` it inside the server's event loop."""

    def __init__(
        self,
        forward: Forward,
        cache: PagedKVCache,
        thread: ModelThread,
        metrics: WorkerMetrics,
        *,
        max_model_len: int,
        max_num_seqs: int = 64,
        max_prefill_tokens: int = 2048,
        prefix_caching: bool = True,
    ) -> None:
        self.forward = forward
        self.cache = cache
        self.thread = thread
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_caching = prefix_caching
        self.pending = 0  # requests a server holds before submit (waiting for their KV)
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []  # admitted, blocks allocated, chunks to go
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._ids = itertools.count()
        self.holds = PrefixHolds()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None

    # ----- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for seq in [*self._running, *self._prefilling, *self._waiting]:
            self._fail(seq, "the worker is shutting down", 503)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    # ----- requests ---------------------------------------------------------------------------
    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Refuse what can never run here, naming the request field to change."""
        if prompt_len < 1:
            raise RejectedRequestError("prompt", "the prompt must contain at least one token")
        total = prompt_len + params.max_tokens
        if total > self.max_model_len:
            raise RejectedRequestError(
                "max_tokens",
                f"the prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) is "
                f"{total} tokens, over this model's context of {self.max_model_len}",
            )
        need = self.cache.blocks_for(total)
        if need > self.cache.num_blocks:
            raise RejectedRequestError(
                "max_tokens",
                f"the prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) needs "
                f"{need} KV blocks of {self.cache.block_size} tokens and this worker's cache "
                f"has {self.cache.num_blocks} in all: lower max_tokens or shorten the prompt",
            )

    def hold_prefix(self, request_id: str, prompt: Sequence[int], ttl_s: float) -> int:
        """Pin the longest prefix of `prompt` this cache holds for the request's received K/V
        (which then starts there); -> the tokens pinned, 0 when none (or no prefix caching).
        At once, even mid-step (see ``prefix_holds``)."""
        if self.failure is not None or not self.alive:
            raise RuntimeError(f"the engine is not running: {self.failure!r}")
        if not self.prefix_caching or len(prompt) <= self.cache.block_size:
            return 0
        if request_id in self._by_id or request_id in self.holds:
            raise RejectedRequestError(
                "request_id", f"request {request_id} is already running or held here"
            )
        cached = self.holds.make(
            self.cache, request_id, prompt, seq_id=next(self._ids), ttl_s=ttl_s
        )
        self.metrics.prefix_cache_queries.inc(len(prompt))
        self.metrics.prefix_cache_hits.inc(cached)
        if cached:  # an idle loop wakes to free it if nobody takes it by then
            asyncio.get_running_loop().call_later(ttl_s, self._wake.set)
        return cached

    def submit(
        self,
        request_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        first_token: int | None = None,
        kv: KVLayers | None = None,
        kv_start: int = 0,
        hold: Hold | None = None,
        arrival: float | None = None,
    ) -> RequestStream:
        """Queue a request: fresh (`first_token`/`kv` None) or with its prefill done elsewhere
        (`kv` then holds positions `kv_start`... of the prompt, the ones before being the
        `hold` taken for it)."""
        try:
            seq = self._sequence(
                request_id,
                prompt,
                params,
                first_token=first_token,
                kv=kv,
                kv_start=kv_start,
                hold=hold,
            )
        except BaseException:
            self.give_back(hold)
            raise
        seq.arrival = arrival if arrival is not None else seq.arrival
        self._by_id[request_id] = seq
        self.metrics.prompt_tokens.inc(len(prompt))
        if first_token is not None:
            self._emit(seq, first_token)  # already computed: stream it without waiting
        if not seq.done:
            self._waiting.append(seq)
        else:  # the first token ended it: a held prefix is not needed
            self.holds.free_later(seq.seq_id)
        self._wake.set()
        self._gauges()
        return RequestStream(self, seq)

    def _sequence(
        self,
        request_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        first_token: int | None,
        kv: KVLayers | None,
        kv_start: int,
        hold: Hold | None,
    ) -> _Sequence:
        if self.failure is not None or not self.alive:
            raise RuntimeError(f"the engine is not running: {self.failure!r}")
        if request_id in self._by_id:
            raise RejectedRequestError(
                "request_id", f"request {request_id} is already running here"
            )
        self.check(len(prompt), params)
        if (first_token is None) != (kv is None):
            raise ValueError("a request with received KV needs both kv and first_token")
        if hold is not None and kv is None:
            raise ValueError("a prefix hold is for a request with received KV")
        if hold is not None and tuple(prompt[: hold.tokens]) != hold.prefix:
            log.warning("request %s: its prompt is not the one its prefix was held for", request_id)
            self.give_back(hold)
            hold = None
        held = hold.tokens if hold is not None else 0
        if kv is not None:
            if kv_start < 0:
                raise RejectedRequestError("kv", f"received K/V start at token {kv_start}")
            self._check_kv(kv, len(prompt), kv_start)
            if kv_start <= held:  # the held prefix and more (a sender that ignored the hold)
                kv = [(k[held - kv_start :], v[held - kv_start :]) for k, v in kv]
                kv_start = held
            else:  # the prefix before the K/V is not here: its hold was dropped or expired
                log.info(
                    "request %s: the prefix before its K/V is no longer held; recomputing it",
                    request_id,
                )
                kv, kv_start = None, 0
                self.give_back(hold)
                hold = None
        return _Sequence(
            request_id,
            hold.seq_id if hold is not None else next(self._ids),
            list(prompt),
            params,
            time.perf_counter(),
            kv=kv,
            kv_start=kv_start,
        )

    def release_hold(self, request_id: str) -> bool:
        """Unpin a prefix held for a request that will not come (its prefill failed)."""
        released = self.holds.release(request_id)
        self._wake.set()
        return released

    def give_back(self, hold: Hold | None) -> None:
        """Unpin a hold that was taken for a request that will not run here."""
        if hold is not None:
            self.holds.free_later(hold.seq_id)
            self._wake.set()

    def abort(self, request_id: str) -> None:
        """Drop a request whose client went away; its blocks are freed between steps."""
        seq = self._by_id.get(request_id)
        if seq is None or seq.done:
            return
        self._finish(seq, "abort", notify=False)
        with contextlib.suppress(ValueError):
            self._waiting.remove(seq)
            self.holds.free_later(seq.seq_id)  # blocks of its held prefix, if it has any
        self._wake.set()

    def _check_kv(self, kv: KVLayers, prompt_len: int, start: int) -> None:
        config = self.cache.config
        if len(kv) != config.num_layers:
            raise RejectedRequestError(
                "kv", f"received KV has {len(kv)} layers, the model has {config.num_layers}"
            )
        want = (prompt_len - start, config.num_kv_heads, config.head_dim)
        after = f" after the {start} cached here" if start else ""
        for layer, (k, v) in enumerate(kv):
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise RejectedRequestError(
                    "kv",
                    f"received KV layer {layer} is {tuple(k.shape)}/{tuple(v.shape)}, expected "
                    f"{want} for the {want[0]} tokens of a {prompt_len}-token prompt{after}",
                )

    # ----- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            while True:
                self._wake.clear()  # whatever happens from here on wakes the waits below
                self._reap()
                self.holds.expire(self.cache)
                if self._idle() and not self._waiting:
                    self._gauges()
                    await self._wake.wait()
                    continue
                await self._admit()
                await self._prefill_chunks()
                if self._running:
                    await self._step()
                elif not self._prefilling:  # nothing fits: requests receiving K/V hold blocks
                    self._gauges()
                    await self._wake.wait()  # until one comes, gives its hold back or goes
                self._gauges()
                await asyncio.sleep(0)  # let handlers read the tokens just queued
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a bug: fail every request visibly, not silently hang
            log.exception("the engine loop failed")
            self.failure = error
            for seq in [*self._running, *self._prefilling, *self._waiting]:
                self._fail(seq, f"the engine failed: {error!r}", 500)
            raise

    def _reap(self) -> None:
        """Free the blocks of sequences that finished or were aborted since the last step;
        with prefix caching their full blocks of output stay cached too (the next turn of a
        conversation sends this one's answer back as part of its prompt)."""
        for queue in (self._running, self._prefilling):
            for seq in [seq for seq in queue if seq.done]:
                if self.prefix_caching and seq.output:
                    self.cache.register(seq.seq_id, seq.prompt + seq.output)
                self.cache.free(seq.seq_id)
                queue.remove(seq)

    async def _admit(self) -> None:
        """Admit waiting requests while blocks and ``max_num_seqs`` allow; those to prefill
        queue for chunks, but no more than one iteration's budget of prefill ahead (their
        blocks are taken now, and the running sequences need blocks to grow)."""
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_num_seqs:
            seq = self._waiting[0]
            if not self._fits(seq) and not (self._idle() and self._unpin(seq)):
                return
            if seq.kv is None and self._prefill_backlog() >= self.max_prefill_tokens:
                return
            self._waiting.popleft()
            if seq.kv is None:
                self._allocate_for_prefill(seq)
                self._prefilling.append(seq)
                continue
            self.cache.allocate(seq.seq_id, seq.context_tokens)
            kv, seq.kv = seq.kv, None
            try:
                await self.thread.run(_write_kv, self.cache, seq.seq_id, kv, seq.kv_start)
            except Exception as error:
                self._prefill_failed(seq, error)
                continue
            if seq.done:  # aborted meanwhile
                self.cache.free(seq.seq_id)
                continue
            if self.prefix_caching:  # the next prompt sharing this one's start needs less
                self.cache.register(seq.seq_id, seq.prompt)
            self._running.append(seq)

    def _idle(self) -> bool:
        return not self._running and not self._prefilling

    def _unpin(self, head: _Sequence) -> bool:
        """Nothing runs and `head` does not fit: what holds pin goes (untaken holds, and
        the blocks of the requests waiting behind it, which are then recomputed); -> whether
        `head` fits now. It does (`check` sized it against an empty cache) unless requests
        still receiving their K/V hold blocks: the loop then waits for them."""
        self.holds.drop_all(self.cache)
        for seq in self._waiting:
            if seq is not head and seq.seq_id in self.cache:
                self.cache.free(seq.seq_id)
                if seq.kv is not None:
                    log.info("request %s gives up its held prefix; recomputing it", seq.request_id)
                seq.kv, seq.kv_start = None, 0
        return self._fits(head)

    def _fits(self, seq: _Sequence) -> bool:
        """Whether the cache has blocks for the sequence now (its cached prefix counted)."""
        if seq.kv is None and self.prefix_caching:
            return self.cache.can_allocate_prefix(seq.prefill_context, seq.context_tokens)
        return self.cache.can_allocate(seq.context_tokens, seq.seq_id)

    def _allocate_for_prefill(self, seq: _Sequence) -> None:
        """Blocks for the whole context; with prefix caching the cached start of its prefill
        is shared, not computed (``computed`` starts there)."""
        context = seq.prefill_context
        if not self.prefix_caching:
            self.cache.allocate(seq.seq_id, seq.context_tokens)
            seq.computed = 0
            return
        seq.computed = self.cache.allocate_prefix(seq.seq_id, context, seq.context_tokens)
        if not seq.output:  # a preempted sequence's recompute is not a new query
            self.metrics.prefix_cache_queries.inc(len(context))
            self.metrics.prefix_cache_hits.inc(seq.computed)

    def _prefill_backlog(self) -> int:
        return sum(len(seq.prefill_context) - seq.computed for seq in self._prefilling)

    async def _prefill_chunks(self) -> None:
        """Up to ``max_prefill_tokens`` of prefill, oldest first; a sequence whose context is
        all in the cache starts decoding (a fresh one with the first token sampled here)."""
        budget = self.max_prefill_tokens
        for seq in list(self._prefilling):
            if budget <= 0:
                return
            if seq.done:
                continue  # aborted: reaped before the next iteration
            context = seq.prefill_context
            chunk = min(len(context) - seq.computed, budget)
            try:
                logits = await self._prefill_chunk(
                    seq, context[seq.computed : seq.computed + chunk]
                )
            except Exception as error:
                self._prefilling.remove(seq)
                self._prefill_failed(seq, error)
                continue
            budget -= chunk
            if seq.computed < len(context):
                continue
            if self.prefix_caching:
                self.cache.register(seq.seq_id, context)
            if not seq.output and not seq.done:
                try:  # still in _prefilling: a stop() meanwhile fails it like the others
                    token = await self.thread.run(sample, logits, seq.params, 0)
                except Exception as error:
                    self._prefilling.remove(seq)
                    self._prefill_failed(seq, error)
                    continue
                if not seq.done:
                    self._emit(seq, token)
            self._prefilling.remove(seq)
            if seq.done:  # the first token ended it, or it was aborted meanwhile
                self.cache.free(seq.seq_id)
            else:
                self._running.append(seq)

    async def _prefill_chunk(self, seq: _Sequence, tokens: list[int]) -> torch.Tensor:
        """Prefill ``tokens`` after the sequence's ``computed`` positions; write their K/V."""
        past = None
        if seq.computed:
            past = await self.thread.run(_read_kv, self.cache, seq.seq_id)
        logits, kv = await self.forward.prefill(tokens, past)
        start = seq.computed
        new = [(k[start:], v[start:]) for k, v in kv]
        await self.thread.run(_write_kv, self.cache, seq.seq_id, new, start)
        seq.computed += len(tokens)
        return logits

    def _prefill_failed(self, seq: _Sequence, error: Exception) -> None:
        log.error("prefill of request %s failed: %r", seq.request_id, error, exc_info=error)
        self.cache.free(seq.seq_id)
        self._fail(seq, f"prefill failed: {error}", 502)

    def _make_room(self) -> None:
        """Give every running sequence a slot for its next token, preempting the youngest."""
        for seq in list(self._running):
            if seq not in self._running:
                continue  # preempted below for an older sequence
            while not self.cache.can_allocate(seq.context_tokens, seq.seq_id):
                if self.holds.droppable:  # an untaken hold gives way before a running request
                    self.holds.drop_all(self.cache)
                    continue
                victim = self._running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.cache.allocate(seq.seq_id, seq.context_tokens)

    def _preempt(self, seq: _Sequence) -> None:
        self.cache.free(seq.seq_id)
        self._running.remove(seq)
        self._waiting.appendleft(seq)
        self.metrics.preemptions.inc()
        log.info("preempted request %s (recomputed when blocks free up)", seq.request_id)

    async def _step(self) -> None:
        self._make_room()
        batch = list(self._running)
        if not batch:
            return
        tokens = [seq.output[-1] for seq in batch]
        positions = [len(seq.prompt) + len(seq.output) - 1 for seq in batch]
        seq_ids = [seq.seq_id for seq in batch]
        try:
            logits = await self.forward.decode(tokens, positions, self.cache, seq_ids)
            choices = [(seq.params, len(seq.output)) for seq in batch]
            chosen = await self.thread.run(_sample_batch, logits, choices)
        except Exception as error:
            log.exception("decode step of %d sequences failed", len(batch))
            for seq in batch:
                self._fail(seq, f"decode step failed: {error}", 502)
            self._reap()
            return
        for seq, token in zip(batch, chosen, strict=True):
            if not seq.done:
                self._emit(seq, token)

    # ----- outcomes ---------------------------------------------------------------------------
    def _emit(self, seq: _Sequence, token: int) -> None:
        now = time.perf_counter()
        index = len(seq.output)
        seq.output.append(token)
        if index == 0:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generation_tokens.inc()
        seq.events.put_nowait(TokenEvent(token, index))
        if token in seq.params.stop_token_ids:
            self._finish(seq, "stop")
        elif len(seq.output) >= seq.params.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str, *, notify: bool = True) -> None:
        seq.done = True
        self._by_id.pop(seq.request_id, None)
        self.metrics.request_finished(
            reason=reason,
            prompt_tokens=len(seq.prompt),
            generation_tokens=len(seq.output),
            e2e_s=time.perf_counter() - seq.arrival,
        )
        if notify:
            seq.events.put_nowait(FinishEvent(reason, len(seq.prompt), len(seq.output)))

    def _fail(self, seq: _Sequence, message: str, status: int) -> None:
        if seq.done:
            return
        seq.done = True
        self._by_id.pop(seq.request_id, None)
        seq.events.put_nowait(ErrorEvent(message, status))

    def _gauges(self) -> None:
        self.metrics.running.set(len(self._running) + len(self._prefilling))
        self.metrics.waiting.set(len(self._waiting) + self.pending)
        self.metrics.kv_usage.set(self.cache.usage())

    def stats(self) -> dict[str, float | int]:
        return {
            "running": len(self._running) + len(self._prefilling),
            "prefilling": len(self._prefilling),
            "waiting": len(self._waiting) + self.pending,
            "kv_usage": self.cache.usage(),
            "free_blocks": self.cache.free_blocks,
            "cached_blocks": self.cache.cached_blocks,
            "num_blocks": self.cache.num_blocks,
            "block_size": self.cache.block_size,
            "prefix_caching": self.prefix_caching,
            "prefix_holds": len(self.holds),
        }


def _write_kv(cache: PagedKVCache, seq_id: int, kv: KVLayers, start: int) -> None:
    """Copy K/V of positions ``start``... into the cache (received K/V arrives on the host)."""
    for layer, (k, v) in enumerate(kv):
        cache.write(seq_id, layer, start, k.to(cache.device), v.to(cache.device))


def _read_kv(cache: PagedKVCache, seq_id: int) -> KVLayers:
    """The K/V of every layer already in the cache: the past of a sequence's next chunk."""
    return [cache.read(seq_id, layer) for layer in range(cache.config.num_layers)]


def _sample_batch(logits: torch.Tensor, choices: list[tuple[SamplingParams, int]]) -> list[int]:
    if all(params.greedy for params, _ in choices):
        return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]
    return [sample(logits[row], params, index) for row, (params, index) in enumerate(choices)]
