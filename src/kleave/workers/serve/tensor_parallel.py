"""Tensor parallelism inside one worker: every layer's heads and FFN width over N ranks.

``kleave workers serve --tensor-parallel N`` (the operator passes the pool's
``parallelism.tensor``) runs the worker's model as N shards (``workers/tensor_parallel.py``):
this process is rank 0 and starts ranks 1..N-1 (``ranks``), one GPU each on a GPU pod. Each
rank holds 1/N of the attention heads, of the K/V heads and of the FFN width, and of the
paged KV cache: a pool of N-GPU replicas holds a model and a cache N GPUs wide.

Rank 0 keeps everything that is not a tensor: HTTP, the engine, the scheduler and the block
allocator. Its model (``TensorParallelDecoder``) and cache (``TensorParallelCache``) are
drop-in replacements for ``MoEDecoder`` and ``PagedKVCache``: each compute call is first
sent to the other ranks as a small JSON command over a gloo *control* group, then every rank
runs the same method of its shard (``ShardRunner``), with an all-reduce (the *data* group:
gloo on CPU, NCCL on GPUs) after each attention and FFN. Inputs only rank 0 holds (K/V from
a transfer or a prefix cache, PDAF activations) are scattered by heads or broadcast; K/V
rank 0 hands out (to a KV sender, a prefix cache) are gathered by heads. So the rest of the
data plane keeps speaking whole-model K/V, and prefill and decode pools may use different
tensor-parallel sizes. The other ranks' caches are followers: they take no block themselves
but adopt rank 0's block tables, sent with each command that touches the cache (only what
changed since the last one).

Failures: the ranks stay in step or the group is finished. A rank that dies closes its
sockets, so the next collective fails on every rank; a command that fails part way on rank 0
may leave the others inside a collective, and one that fails on another rank ends that rank.
Rank 0 then reports the group broken (``failure``): requests fail with the reason, ``/readyz``
and ``/healthz`` say it, and Kubernetes restarts the pod (a group cannot take a rank back).
What can fail on rank 0 alone is checked before a command is sent (a refused cache write, K/V
or activation shapes), or, for a prefill's KV sender, raised after the command ends on every
rank: those fail only their request. The other ranks exit when rank 0 does. On GPUs a
collective that stalls past the op timeout is NCCL's watchdog's to end (by default it stops
the process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]

from kleave.workers.config import ModelConfig
from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.model import ModelPart, MoEDecoder, RoutedExperts, load_decoder
from kleave.workers.serve.ranks import (
    CONTROL_TIMEOUT,
    FORM_TIMEOUT,
    RankArgs,
    exited,
    rank_device,
    reap,
    run_rank,
    start_ranks,
)
from kleave.workers.tensor_parallel import Shard, join_heads, split_heads
from kleave.workers.transport.process_groups import gloo_group, nccl_group

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"  # every rank of a worker is in its pod
HEADER_BYTES = 4096  # one broadcast carries a command this long; longer ones take a second
COMMANDS = frozenset(
    ("prefill", "attention_prefill", "attention_decode", "ffn", "decode_step", "write", "read")
)  # and "stop", which ends a follower's loop
ACTIVATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KVPair = tuple[torch.Tensor, torch.Tensor]
OnLayer = Callable[[int, torch.Tensor, torch.Tensor], None]


class TensorParallelError(RuntimeError):
    """The group is broken (a rank died or stalled): the worker cannot serve until restarted."""


class TPGroup:
    """One rank's two groups: control (commands, gloo, waits a week for the next one) and
    data (the tensors of a call: gloo or NCCL, each collective bounded by ``op_timeout``).

    Gloo forms a group within its default timeout, so both are built with ``FORM_TIMEOUT``
    and every collective passes its own timeout."""

    def __init__(
        self, store: Any, rank: int, world: int, device: torch.device, op_timeout: timedelta
    ) -> None:
        self.rank = rank
        self.world = world
        self.op_timeout = op_timeout
        self._control: Any = gloo_group(
            PrefixStore("control", store), rank, world, timeout=FORM_TIMEOUT, host=LOOPBACK
        )
        data = PrefixStore("data", store)
        if device.type == "cuda":
            self._data: Any = nccl_group(data, rank, world, timeout=op_timeout, device=device)
        else:
            self._data = gloo_group(data, rank, world, timeout=FORM_TIMEOUT, host=LOOPBACK)

    @property
    def root(self) -> bool:
        return self.rank == 0

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as error:
            first = str(error).splitlines()[0][:300] if str(error) else repr(error)
            raise TensorParallelError(f"tensor-parallel {what} failed: {first}") from error

    # ----- commands (rank 0 -> the others) ---------------------------------------------------
    def send(self, command: dict[str, Any]) -> None:
        payload = json.dumps(command, separators=(",", ":")).encode()
        header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        header[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
        head = payload[: HEADER_BYTES - 8]
        header[8 : 8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        self._wait(self._control.broadcast(header, 0, self.op_timeout), "sending a command")
        rest = payload[HEADER_BYTES - 8 :]
        if rest:
            tail = torch.frombuffer(bytearray(rest), dtype=torch.uint8)
            self._wait(self._control.broadcast(tail, 0, self.op_timeout), "sending a command")

    def receive(self) -> dict[str, Any]:
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        waiting = self._control.broadcast(header, 0, CONTROL_TIMEOUT)  # an idle worker is fine
        self._wait(waiting, "waiting for rank 0's next command")
        size = int(header[:8].view(torch.int64)[0])
        payload = header[8 : 8 + min(size, HEADER_BYTES - 8)].numpy().tobytes()
        if size > HEADER_BYTES - 8:
            tail = torch.empty(size - (HEADER_BYTES - 8), dtype=torch.uint8)
            self._wait(self._control.broadcast(tail, 0, self.op_timeout), "receiving a command")
            payload += tail.numpy().tobytes()
        command: dict[str, Any] = json.loads(payload)
        return command

    # ----- data ------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (the model's ``reduce``)."""
        tensor = tensor.contiguous()
        work = self._data.allreduce([tensor], dist.ReduceOp.SUM, self.op_timeout)
        self._wait(work, "all-reduce")
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (the others pass a buffer of its shape)."""
        tensor = tensor.contiguous()
        self._wait(self._data.broadcast(tensor, 0, self.op_timeout), "broadcast")
        return tensor

    def scatter(self, out: torch.Tensor, parts: list[torch.Tensor] | None) -> torch.Tensor:
        """Rank r gets rank 0's ``parts[r]`` in ``out``."""
        inputs = parts if self.root and parts is not None else []
        self._wait(self._data.scatter(out, inputs, 0, self.op_timeout), "scatter")
        return out

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's ``tensor``, in rank order, on rank 0 (None elsewhere)."""
        tensor = tensor.contiguous()
        outputs = [torch.empty_like(tensor) for _ in range(self.world)] if self.root else []
        self._wait(self._data.gather(outputs, tensor, 0, self.op_timeout), "gather")
        return outputs if self.root else None

    def close(self) -> None:
        for group in (self._data, self._control):
            try:
                group.abort()
            except Exception as error:  # closing: the peers learn it either way
                log.debug("aborting a tensor-parallel group: %s", error)


class ShardRunner:
    """One rank's side of every command: rank 0 passes the inputs only it holds, the others
    receive them through the data group; all run the same method of their shard."""

    def __init__(self, shard: MoEDecoder, group: TPGroup, cache: PagedKVCache | None) -> None:
        self.shard = shard
        self.group = group
        self.cache = cache
        shard.reduce = group.all_reduce

    def run(self, command: dict[str, Any], inputs: dict[str, Any] | None = None) -> Any:
        if command.get("op") not in COMMANDS:
            raise ValueError(f"unknown tensor-parallel command {command.get('op')!r}")
        if not self.group.root and "tables" in command:
            self._adopt(command["tables"])
        op: Callable[[dict[str, Any], dict[str, Any]], Any] = getattr(self, f"_{command['op']}")
        return op(command, inputs or {})

    def _adopt(self, tables: dict[str, Any]) -> None:
        adopt_tables(self._cache(), tables)

    def _cache(self) -> PagedKVCache:
        if self.cache is None:
            raise RuntimeError("this rank was started without a KV cache")
        return self.cache

    # ----- moving tensors between rank 0's whole-model layout and the shards ----------------
    def _scatter_kv(self, whole: KVPair | None, length: int) -> KVPair:
        """Each rank's heads of rank 0's whole K/V ``[length, Hkv, D]``."""
        shard = self.shard
        out = torch.empty(
            (2, length, shard.local.num_kv_heads, shard.config.head_dim),
            dtype=shard.dtype,
            device=shard.device,
        )
        parts = None
        if self.group.root:
            assert whole is not None
            stacked = torch.stack(whole).to(device=shard.device, dtype=shard.dtype)
            parts = split_heads(stacked, self.group.world)
        self.group.scatter(out, parts)
        return out[0], out[1]

    def _gather_kv(self, k: torch.Tensor, v: torch.Tensor) -> KVPair | None:
        """The whole K/V on rank 0 from every rank's heads (None elsewhere)."""
        parts = self.group.gather(torch.stack((k, v)))
        if parts is None:
            return None
        whole = join_heads(parts)
        return whole[0], whole[1]

    def _scatter_past(
        self, command: dict[str, Any], past: list[KVPair] | None
    ) -> list[KVPair] | None:
        length = command["past_len"]
        if length is None:
            return None
        layers = self.shard.config.num_layers
        return [
            self._scatter_kv(past[layer] if past is not None else None, length)
            for layer in range(layers)
        ]

    def _h(self, command: dict[str, Any], h: torch.Tensor | None) -> torch.Tensor:
        """Rank 0's activations ``[rows, hidden]`` on every rank."""
        if self.group.root:
            assert h is not None
            return self.group.broadcast(h.to(self.shard.device))
        buffer = torch.empty(
            (command["rows"], self.shard.config.hidden_size),
            dtype=ACTIVATION_DTYPES[command["dtype"]],
            device=self.shard.device,
        )
        return self.group.broadcast(buffer)

    # ----- the commands ------------------------------------------------------------------------
    def _prefill(self, command: dict[str, Any], inputs: dict[str, Any]) -> Any:
        tokens = torch.tensor(command["tokens"], dtype=torch.long)
        past = self._scatter_past(command, inputs.get("past"))
        on_layer: OnLayer | None = inputs.get("on_layer")
        whole_kv: list[KVPair] = []
        failed: list[Exception] = []

        def gather(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            whole = self._gather_kv(k, v)
            if whole is None:
                return
            whole_kv.append(whole)
            if on_layer is not None and not failed:
                try:  # rank 0's alone (a KV sender): the other ranks go on, so must this one
                    on_layer(layer, *whole)
                except Exception as error:
                    failed.append(error)

        logits, _ = self.shard.prefill(tokens, past, on_layer=gather)
        return logits, whole_kv, failed[0] if failed else None

    def _attention_prefill(self, command: dict[str, Any], inputs: dict[str, Any]) -> Any:
        h = self._h(command, inputs.get("h"))
        past = inputs.get("past")
        before = None
        if command["past_len"] is not None:
            before = self._scatter_kv(past, command["past_len"])
        positions = torch.tensor(command["positions"], dtype=torch.long)
        out, k, v = self.shard.attention_prefill(command["layer"], h, positions, before)
        whole = self._gather_kv(k, v)
        return (out, *whole) if whole is not None else None

    def _attention_decode(self, command: dict[str, Any], inputs: dict[str, Any]) -> Any:
        h = self._h(command, inputs.get("h"))
        positions = torch.tensor(command["positions"], dtype=torch.long)
        return self.shard.attention_decode(
            command["layer"], h, positions, self._cache(), command["seq_ids"]
        )

    def _ffn(self, command: dict[str, Any], inputs: dict[str, Any]) -> Any:
        return self.shard.ffn(command["layer"], self._h(command, inputs.get("h")))

    def _decode_step(self, command: dict[str, Any], _: dict[str, Any]) -> Any:
        return self.shard.decode_step(
            torch.tensor(command["tokens"], dtype=torch.long),
            torch.tensor(command["positions"], dtype=torch.long),
            self._cache(),
            command["seq_ids"],
        )

    def _write(self, command: dict[str, Any], inputs: dict[str, Any]) -> None:
        k, v = self._scatter_kv(inputs.get("kv"), command["count"])
        if not self.group.root:  # rank 0 wrote its heads before sending (that validated it)
            PagedKVCache.write(
                self._cache(), command["seq_id"], command["layer"], command["start"], k, v
            )

    def _read(self, command: dict[str, Any], _: dict[str, Any]) -> KVPair | None:
        k, v = PagedKVCache.read(self._cache(), command["seq_id"], command["layer"])
        return self._gather_kv(k, v)

    def follow(self) -> None:
        """Ranks 1..N-1: run rank 0's commands until it says stop (or its group breaks).

        Any error ends this rank: a command that failed part way leaves the ranks' collectives
        out of step, and only a new group (the worker restarted) puts them back in step."""
        while True:
            command = self.group.receive()
            if command["op"] == "stop":
                return
            with torch.inference_mode():
                self.run(command)


class TensorParallelCache(PagedKVCache):
    """Rank 0's paged cache: its own heads' pages and every rank's block allocator.

    ``write``/``read`` take and give whole-model K/V (scattered to / gathered from the ranks);
    the engine uses it as it uses a ``PagedKVCache``."""

    def __init__(self, decoder: TensorParallelDecoder, num_blocks: int, block_size: int) -> None:
        shard = decoder.shard
        super().__init__(
            shard.config,
            num_blocks,
            block_size,
            device=shard.device,
            dtype=shard.dtype,
            num_kv_heads=shard.local.num_kv_heads,
        )
        self._decoder = decoder
        self.tables = TableSync()

    def write(self, seq_id: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._decoder.write_kv(self, seq_id, layer, start, (k, v))

    def read(self, seq_id: int, layer: int) -> KVPair:
        return self._decoder.read_kv(self, seq_id, layer)

    def ensure(self, seq_ids: list[int], tokens: list[int]) -> None:
        """Blocks for ``tokens[i]`` tokens of each sequence, taken here before a command, so
        the other ranks never need a block rank 0 has not told them about."""
        for seq_id, count in zip(seq_ids, tokens, strict=True):
            self.allocate(seq_id, count)

    def sync(self, seq_ids: Iterable[int]) -> dict[str, Any]:
        return self.tables.update(self, seq_ids)


class TableSync:
    """What rank 0 has told the other ranks' caches of its block tables, so each command
    carries only what changed: the sequences freed since, and the blocks added since."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[list[int], int]] = {}  # seq -> (its table, blocks sent)

    def update(self, leader: PagedKVCache, seq_ids: Iterable[int]) -> dict[str, Any]:
        """The JSON the followers ``adopt_tables`` before a command on ``seq_ids``.

        A table only grows until its sequence is freed, and a sequence allocated again gets
        a new list: so the same list means "send the blocks past those already sent"."""
        drop = [seq_id for seq_id in self._sent if seq_id not in leader]
        for seq_id in drop:
            del self._sent[seq_id]
        seqs: list[list[Any]] = []
        for seq_id in dict.fromkeys(seq_ids):
            if seq_id not in leader:
                continue
            table, layer_lens, shared = leader.table_state(seq_id)
            sent = self._sent.get(seq_id)
            offset = sent[1] if sent is not None and sent[0] is table else 0
            seqs.append([seq_id, offset, table[offset:], layer_lens, shared])
            self._sent[seq_id] = (table, len(table))
        return {"drop": drop, "seqs": seqs}


def adopt_tables(follower: PagedKVCache, tables: dict[str, Any]) -> None:
    """A follower's cache takes a ``TableSync.update``."""
    for seq_id in tables["drop"]:
        follower.forget(seq_id)
    for seq_id, offset, blocks, layer_lens, shared in tables["seqs"]:
        follower.adopt(seq_id, blocks, offset, layer_lens, shared)


class TensorParallelDecoder:
    """Rank 0's model: ``MoEDecoder``'s methods, each run by every rank on its shard."""

    def __init__(
        self,
        shard: MoEDecoder,
        group: TPGroup,
        *,
        children: list[subprocess.Popen[bytes]],
        store: Any,
        cache_blocks: int,
        block_size: int,
    ) -> None:
        self.shard = shard
        self.config: ModelConfig = shard.config
        self.part: ModelPart = shard.part
        self.group = group
        self.children = children
        self._store = store  # the rendezvous lives as long as the group
        self._lock = threading.Lock()
        self._failure: str | None = None
        self.cache = TensorParallelCache(self, cache_blocks, block_size) if cache_blocks else None
        self.runner = ShardRunner(shard, group, self.cache)

    @property
    def world(self) -> int:
        return self.group.world

    @property
    def device(self) -> torch.device:
        return self.shard.device

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.shard.parameters()

    @property
    def failure(self) -> str | None:
        """Why the group cannot serve any more (a rank exited, a collective failed), or None."""
        if self._failure is None:
            why = exited(self.children)
            if why is not None:
                self._failure = f"tensor-parallel {why}; restart the worker"
        return self._failure

    def _call(self, command: dict[str, Any], inputs: dict[str, Any] | None = None) -> Any:
        with self._lock:
            failure = self.failure
            if failure is not None:
                raise TensorParallelError(failure)
            try:
                self.group.send(command)
                return self.runner.run(command, inputs)
            except TensorParallelError as error:
                self._failure = f"{error}; restart the worker"
                raise
            except Exception as error:
                # Part way through a command the other ranks may be in a collective this
                # rank left: the group is out of step for good.
                self._failure = (
                    f"tensor-parallel {command['op']} failed on rank 0 part way: {error}; "
                    "restart the worker"
                )
                raise TensorParallelError(self._failure) from error

    def _decoding(
        self, cache: PagedKVCache, positions: torch.Tensor, seq_ids: list[int]
    ) -> dict[str, Any]:
        """A decode command's cache part: each sequence's slot for its new token taken here
        first, then the tables the other ranks need."""
        if cache is not self.cache or self.cache is None:
            raise ValueError("a tensor-parallel model runs over the cache it was built with")
        where = [int(p) for p in positions.tolist()]
        self.cache.ensure(seq_ids, [p + 1 for p in where])
        return {"positions": where, "seq_ids": seq_ids, "tables": self.cache.sync(seq_ids)}

    # ----- what only rank 0 holds is checked before a command, since a mistake found part way
    # would leave the other ranks waiting in a collective this rank never joins -------------
    def _kv_length(self, pairs: list[KVPair], layers: int) -> int:
        """The length of whole-model K/V pairs (one per layer) rank 0 is about to scatter."""
        want = (self.config.num_kv_heads, self.config.head_dim)
        if len(pairs) != layers:
            raise ValueError(f"expected K/V of {layers} layer(s), got {len(pairs)}")
        length = int(pairs[0][0].shape[0])
        for k, v in pairs:
            if tuple(k.shape) != (length, *want) or k.shape != v.shape:
                raise ValueError(
                    f"K/V must be [{length}, {want[0]}, {want[1]}] in every layer, got "
                    f"{tuple(k.shape)} and {tuple(v.shape)}"
                )
        return length

    def _activations(self, h: torch.Tensor) -> dict[str, Any]:
        """How the other ranks size their buffer for ``h`` ``[rows, hidden]``."""
        dtype = _dtype_name(h.dtype)
        if h.dim() != 2 or h.shape[1] != self.config.hidden_size or dtype not in ACTIVATION_DTYPES:
            raise ValueError(
                f"activations must be [rows, {self.config.hidden_size}] in one of "
                f"{', '.join(ACTIVATION_DTYPES)}, got {tuple(h.shape)} {dtype}"
            )
        return {"rows": int(h.shape[0]), "dtype": dtype}

    # ----- replicated pieces: rank 0 alone ---------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.shard.embed(tokens)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.shard.logits(h)

    def prefill_positions(self, tokens: int, past: list[KVPair] | None) -> torch.Tensor:
        return self.shard.prefill_positions(tokens, past)

    # ----- every rank --------------------------------------------------------------------------
    def prefill(
        self,
        tokens: torch.Tensor,
        past: list[KVPair] | None = None,
        on_layer: OnLayer | None = None,
    ) -> tuple[torch.Tensor, list[KVPair]]:
        past_len = None
        if past is not None:
            past_len = self._kv_length(past, self.config.num_layers)
        command = {
            "op": "prefill",
            "tokens": [int(t) for t in tokens.tolist()],
            "past_len": past_len,
        }
        logits, kv, failed = self._call(command, {"past": past, "on_layer": on_layer})
        if failed is not None:  # the command finished on every rank; only its consumer failed
            raise failed
        return logits, kv

    def attention_prefill(
        self,
        layer: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        past: KVPair | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        command = {
            "op": "attention_prefill",
            "layer": layer,
            **self._activations(h),
            "positions": [int(p) for p in positions.tolist()],
            "past_len": None if past is None else self._kv_length([past], 1),
        }
        out, k, v = self._call(command, {"h": h, "past": past})
        return out, k, v

    def attention_decode(
        self,
        layer: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        seq_ids: list[int],
    ) -> torch.Tensor:
        command = {
            "op": "attention_decode",
            "layer": layer,
            **self._activations(h),
            **self._decoding(cache, positions, seq_ids),
        }
        out: torch.Tensor = self._call(command, {"h": h})
        return out

    def ffn(
        self, layer: int, h: torch.Tensor, experts: RoutedExperts | None = None
    ) -> torch.Tensor:
        if experts is not None:
            raise ValueError("a tensor-parallel FFN runs its own experts (no expert hook)")
        command = {
            "op": "ffn",
            "layer": layer,
            **self._activations(h),
        }
        out: torch.Tensor = self._call(command, {"h": h})
        return out

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        seq_ids: list[int],
    ) -> torch.Tensor:
        command = {
            "op": "decode_step",
            "tokens": [int(t) for t in tokens.tolist()],
            **self._decoding(cache, positions, seq_ids),
        }
        logits: torch.Tensor = self._call(command)
        return logits

    def write_kv(
        self, cache: TensorParallelCache, seq_id: int, layer: int, start: int, kv: KVPair
    ) -> None:
        """Whole-model K/V ``[T, Hkv, D]`` into every rank's heads of the paged cache."""
        k, v = kv
        want = (self.config.num_kv_heads, self.config.head_dim)
        if k.shape != v.shape or tuple(k.shape[1:]) != want:
            raise ValueError(
                f"k and v must both be [T, {want[0]}, {want[1]}], "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        mine = self.group.rank  # this rank's heads, a view (the scatter splits them all)
        own_k, own_v = k.chunk(self.world, dim=-2)[mine], v.chunk(self.world, dim=-2)[mine]
        PagedKVCache.write(cache, seq_id, layer, start, own_k, own_v)  # validates, allocates
        command = {
            "op": "write",
            "seq_id": seq_id,
            "layer": layer,
            "start": start,
            "count": int(k.shape[0]),
            "tables": cache.sync([seq_id]),
        }
        self._call(command, {"kv": kv})

    def read_kv(self, cache: TensorParallelCache, seq_id: int, layer: int) -> KVPair:
        command = {"op": "read", "seq_id": seq_id, "layer": layer, "tables": cache.sync([seq_id])}
        whole: KVPair = self._call(command)
        return whole

    def close(self) -> None:
        """Stop the other ranks (told to, or their group closed under them) and reap them."""
        with self._lock:
            told = False
            if self._failure is None and exited(self.children) is None:
                try:
                    self.group.send({"op": "stop"})
                    told = True
                except TensorParallelError as error:
                    log.warning("could not tell the other ranks to stop: %s", error)
            if not told:
                self.group.close()  # their wait for the next command fails now
            reap(self.children)
            self.group.close()
            self._store = None
            if self._failure is None:
                self._failure = "the worker stopped its tensor-parallel ranks"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----- building a group ------------------------------------------------------------------------
def load_shard(args: RankArgs, device: str) -> MoEDecoder:
    """This rank's shard of the model: from ``args.weights``, else drawn from the seed."""
    return load_decoder(
        ModelConfig.from_dict(args.config),
        seed=args.seed,
        weights=args.weights,
        device=device,
        part=args.part,  # type: ignore[arg-type]
        shard=Shard(args.rank, args.world),
    )


def _form_group(
    args: RankArgs,
    device: torch.device,
    client: Any,
    children: list[subprocess.Popen[bytes]],
    stop_rendezvous: Callable[[], None],
) -> TPGroup:
    """Form the groups. Rank 0 watches its children meanwhile: when one exits, it stops the
    rendezvous (every rank's wait in it fails now, not at ``FORM_TIMEOUT``) and says which."""
    result: list[TPGroup | BaseException] = []

    def form() -> None:
        try:
            result.append(TPGroup(client, args.rank, args.world, device, args.op_timeout))
        except BaseException as error:  # handed to the caller
            result.append(error)

    thread = threading.Thread(target=form, name="tp-form", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        why = exited(children) if thread.is_alive() else None
        if why is not None:
            stop_rendezvous()
            thread.join(FORM_TIMEOUT.total_seconds())
            raise TensorParallelError(f"tensor-parallel {why} before the group formed")
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise TensorParallelError(f"the tensor-parallel group did not form: {outcome}") from outcome
    return outcome


def start_tensor_parallel(args: RankArgs) -> TensorParallelDecoder:
    """Rank 0: host the rendezvous, start ranks 1..N-1, load this rank's shard, form the
    group. Blocks until every rank joined (or one exited, or ``FORM_TIMEOUT``)."""
    device = rank_device(args.device, 0)
    # The listening store is held here only: dropping it stops the rendezvous.
    server = [TCPStore(LOOPBACK, 0, args.world, True, timeout=FORM_TIMEOUT, wait_for_workers=False)]
    args = dataclasses.replace(args, rank=0, port=int(server[0].port))
    children = start_ranks("kleave.workers.serve.tensor_parallel", args)
    log.info("tensor parallel over %d ranks (pids %s)", args.world, [c.pid for c in children])
    try:
        shard = load_shard(args, device)
        client = TCPStore(LOOPBACK, args.port, args.world, False, timeout=FORM_TIMEOUT)
        group = _form_group(args, torch.device(device), client, children, server.clear)
    except BaseException:
        server.clear()
        for child in children:
            child.kill()
        reap(children)
        raise
    return TensorParallelDecoder(
        shard,
        group,
        children=children,
        store=server[0],
        cache_blocks=args.cache_blocks,
        block_size=args.block_size,
    )


def follow(args: RankArgs) -> None:
    """Ranks 1..N-1: load the shard, join rank 0's group, run its commands until it stops."""
    device = rank_device(args.device, args.rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    shard = load_shard(args, device)
    cache = None
    if args.cache_blocks:
        cache = PagedKVCache(
            shard.config,
            args.cache_blocks,
            args.block_size,
            device=shard.device,
            dtype=shard.dtype,
            num_kv_heads=shard.local.num_kv_heads,
            follower=True,
        )
    client = TCPStore(LOOPBACK, args.port, args.world, False, timeout=FORM_TIMEOUT)
    group = _form_group(args, torch.device(device), client, [], lambda: None)
    try:
        ShardRunner(shard, group, cache).follow()
    finally:
        group.close()


def main(argv: list[str] | None = None) -> int:
    return run_rank(argv, "tp", follow)


if __name__ == "__main__":
    sys.exit(main())
