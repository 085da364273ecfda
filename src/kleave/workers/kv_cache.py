"""A block-table (paged) KV cache, the layout vLLM's PagedAttention made standard.

Each layer has one K and one V tensor of shape `[num_blocks, block_size, num_kv_heads,
head_dim]`; a sequence owns a list of blocks (its block table), so sequences grow without
copying and memory is handed out in fixed pages. The decode kernels read the cache through
`block_table` and `context_lens`.

When a sequence's length advances: `length(seq)` is the number of tokens whose K and V are
written in *every* layer. The cache keeps one written length per layer and a write may start
anywhere up to that layer's written length (overwriting or appending, never leaving a hole),
so layers can be written in any order (a KV receiver may get them out of order) and a
sequence never looks longer than what all layers hold. The decode path writes a token's K/V
layer by layer and attends over `positions + 1` tokens; the length moves when the last layer
has been written.

Automatic prefix caching (vLLM's): a full block of a prefill can be ``register``ed under the
chained key of its tokens (``prefix_cache.block_keys``), and ``allocate_prefix`` gives a new
sequence the longest run of registered blocks its tokens match, shared (reference counted),
so only the rest is computed. A freed block that is registered is kept, evictable, until a
fresh block is needed and none is free: least recently freed first, and a sequence's blocks
are freed tail first, so a cached block's parent is evicted after it. Shared blocks are never
written: a sequence's writes start past its shared prefix (a write into it is refused).

Under tensor parallelism each rank's cache holds its share of the K/V heads (``num_kv_heads``)
in blocks that rank 0's cache hands out: the other ranks' caches are ``follower``s, which take
no block themselves but adopt rank 0's block tables (``table_state`` / ``adopt``) before each
step, so a block number means the same positions on every rank.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from kleave.workers.config import ModelConfig
from kleave.workers.prefix_cache import block_keys


class CacheFullError(RuntimeError):
    """Raised when the cache has no free blocks left for a sequence's request."""


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


class PagedKVCache:
    """A paged KV cache for one model: per-layer K and V pages plus per-sequence block tables."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        num_kv_heads: int | None = None,
        follower: bool = False,
    ) -> None:
        """``num_kv_heads``: the heads held (a tensor-parallel rank's share; default all).
        ``follower``: blocks come from another cache's tables (``adopt``), never from here."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}"
            )
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else _torch_dtype(config.dtype)
        self.num_kv_heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
        self.follower = follower
        shape = (num_blocks, block_size, self.num_kv_heads, config.head_dim)
        self.k: list[torch.Tensor] = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(config.num_layers)
        ]
        self.v: list[torch.Tensor] = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(config.num_layers)
        ]
        # A stack with block 0 on top: allocation order is deterministic (0, 1, 2, ...).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks  # sequences using each block
        self._key_of: dict[int, bytes] = {}  # registered blocks -> their chained key
        self._block_of: dict[bytes, int] = {}  # ... and back
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unused; LRU
        self._shared: dict[int, int] = {}  # seq -> leading blocks it shares (never written)
        self._tables: dict[int, list[int]] = {}
        self._layer_lens: dict[int, list[int]] = {}
        # block_table() is called once per layer of a decode step with the same batch; the
        # tensor only changes when some table does, so it is kept until then.
        self._version = 0
        self._table_memo: tuple[tuple[int, ...], int, torch.Tensor] | None = None

    # ----- allocation -------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def free_blocks(self) -> int:
        """Blocks not owned by any sequence (cached prefix blocks nobody uses included)."""
        return len(self._free) + len(self._evictable)

    @property
    def cached_blocks(self) -> int:
        """Blocks registered for prefix reuse (in use or evictable)."""
        return len(self._key_of)

    def can_allocate(self, num_tokens: int, seq_id: int | None = None) -> bool:
        """Whether a new sequence of `num_tokens` tokens fits (or `seq_id` can grow to it)."""
        have = len(self._tables.get(seq_id, ())) if seq_id is not None else 0
        return self.blocks_for(num_tokens) - have <= self.free_blocks

    def _take_block(self) -> int:
        """A fresh block: a free one, else the least recently freed cached one (forgotten)."""
        if self.follower:
            raise RuntimeError(
                "a tensor-parallel follower's cache takes no blocks: rank 0 allocates them "
                "and sends its block tables before each step"
            )
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Make sure `seq_id` has blocks for `num_tokens` tokens in total (it only grows).

        All or nothing: when the free blocks do not suffice, nothing is taken and
        CacheFullError says how many were needed.
        """
        table = self._tables.get(seq_id)
        have = len(table) if table is not None else 0
        need = self.blocks_for(num_tokens) - have
        if need > self.free_blocks:
            raise CacheFullError(
                f"KV cache full: sequence {seq_id} needs {need} more block(s) of "
                f"{self.block_size} tokens for {num_tokens} tokens, but only "
                f"{self.free_blocks} of {self.num_blocks} are free; free finished sequences, "
                f"admit fewer, or size the cache larger"
            )
        if table is None:
            table = self._tables[seq_id] = []
            self._layer_lens[seq_id] = [0] * self.config.num_layers
        if need > 0:
            table.extend(self._take_block() for _ in range(need))
            self._version += 1

    def _cached_run(self, tokens: Sequence[int]) -> list[int]:
        """The registered blocks of the longest chain `tokens` starts with (never its last
        token's block: that token is always computed)."""
        hits: list[int] = []
        for key in block_keys(tokens[: max(0, len(tokens) - 1)], self.block_size):
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def _prefix_shortfall(self, hits: list[int], num_tokens: int) -> int:
        """Fresh blocks missing for a sequence of `num_tokens` that shares `hits` (<= 0: fits);
        an idle cached hit stops counting as free once it is taken."""
        idle_hits = sum(1 for block in hits if block in self._evictable)
        return self.blocks_for(num_tokens) - len(hits) - (self.free_blocks - idle_hits)

    def can_allocate_prefix(self, tokens: Sequence[int], num_tokens: int) -> bool:
        """Whether `allocate_prefix` would succeed now (it needs fewer blocks than
        `can_allocate` counts when `tokens` start with a cached prefix)."""
        return self._prefix_shortfall(self._cached_run(tokens), num_tokens) <= 0

    def allocate_prefix(self, seq_id: int, tokens: Sequence[int], num_tokens: int) -> int:
        """Allocate a new sequence of `num_tokens` tokens whose first blocks are the longest
        registered chain `tokens` matches (never all of `tokens`: its last token is computed);
        returns the tokens whose K/V are already there. All or nothing, like `allocate`."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        hits = self._cached_run(tokens)
        shortfall = self._prefix_shortfall(hits, num_tokens)
        if shortfall > 0:
            need = self.blocks_for(num_tokens) - len(hits)
            raise CacheFullError(
                f"KV cache full: sequence {seq_id} needs {need} block(s) of {self.block_size} "
                f"tokens beside its {len(hits)} cached ones, but only {need - shortfall} of "
                f"{self.num_blocks} are free"
            )
        for block in hits:
            self._evictable.pop(block, None)
            self._refs[block] += 1
        self._tables[seq_id] = hits
        self._shared[seq_id] = len(hits)
        cached = len(hits) * self.block_size
        self._layer_lens[seq_id] = [cached] * self.config.num_layers
        self._version += 1
        self.allocate(seq_id, num_tokens)
        return cached

    def register(self, seq_id: int, tokens: Sequence[int]) -> int:
        """Offer the sequence's full blocks of `tokens` (its first positions, all written) for
        reuse by later sequences; returns how many blocks became newly reusable."""
        table = self._tables.get(seq_id, [])
        written = min(len(tokens), self.length(seq_id))
        added = 0
        for index, key in enumerate(block_keys(tokens[:written], self.block_size)):
            block = table[index]
            if key in self._block_of or block in self._key_of:
                continue  # the same prefix is cached already (another sequence computed it)
            self._block_of[key] = block
            self._key_of[block] = key
            added += 1
        return added

    def free(self, seq_id: int) -> None:
        """Return the sequence's blocks to the pool (unknown ids are ignored: freeing twice is
        harmless, which keeps abort paths simple). Registered blocks stay cached, evictable."""
        table = self._tables.pop(seq_id, None)
        self._layer_lens.pop(seq_id, None)
        self._shared.pop(seq_id, None)
        if not table:
            return
        for block in reversed(table):  # the tail first: it is evicted before its parents
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
        self._version += 1

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._tables

    @property
    def seq_ids(self) -> list[int]:
        """The sequences that own blocks."""
        return list(self._tables)

    def usage(self) -> float:
        """The fraction of blocks in use (what vllm:kv_cache_usage_perc reports)."""
        return 1.0 - self.free_blocks / self.num_blocks

    # ----- tensor-parallel followers -----------------------------------------------------------
    def table_state(self, seq_id: int) -> tuple[list[int], list[int], int]:
        """(block table, written length per layer, shared leading blocks) of a sequence: what
        a follower ``adopt``s. The table is this cache's own list (it only grows until the
        sequence is freed; a new sequence gets a new list)."""
        return self._tables[seq_id], list(self._layer_lens[seq_id]), self._shared.get(seq_id, 0)

    def adopt(
        self, seq_id: int, blocks: list[int], offset: int, layer_lens: list[int], shared: int
    ) -> None:
        """A follower takes a sequence's state from rank 0's ``table_state``: its table is
        the first ``offset`` blocks it already had for it followed by ``blocks``."""
        table = self._tables.get(seq_id, []) if offset else []
        if len(table) < offset:
            raise RuntimeError(
                f"sequence {seq_id}: rank 0 sent blocks from {offset}, this rank holds "
                f"{len(table)} (the ranks' block tables diverged)"
            )
        self._tables[seq_id] = table[:offset] + blocks
        self._layer_lens[seq_id] = list(layer_lens)
        self._shared[seq_id] = shared
        self._version += 1

    def forget(self, seq_id: int) -> None:
        """A follower drops a sequence rank 0 freed (its blocks are rank 0's to reuse)."""
        self._tables.pop(seq_id, None)
        self._layer_lens.pop(seq_id, None)
        self._shared.pop(seq_id, None)
        self._version += 1

    # ----- lengths ----------------------------------------------------------------------------
    def length(self, seq_id: int) -> int:
        """Tokens whose K/V are written in every layer (0 for an unknown sequence)."""
        lens = self._layer_lens.get(seq_id)
        return min(lens) if lens else 0

    def layer_length(self, seq_id: int, layer: int) -> int:
        """Tokens written in one layer."""
        lens = self._layer_lens.get(seq_id)
        return lens[layer] if lens else 0

    # ----- data -------------------------------------------------------------------------------
    def _slots(self, seq_id: int, start: int, count: int) -> torch.Tensor:
        table = self._tables[seq_id]
        bs = self.block_size
        slots = [table[p // bs] * bs + p % bs for p in range(start, start + count)]
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def _check_not_shared(self, seq_id: int, start: int) -> None:
        shared = self._shared.get(seq_id, 0) * self.block_size
        if start < shared:
            raise ValueError(
                f"write at {start} for sequence {seq_id} would change its first {shared} "
                "tokens, which are a cached prefix shared with other sequences"
            )

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.config.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.config.num_layers - 1}")

    def write(self, seq_id: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V `[T, Hkv, D]` of one layer at positions `start..start+T-1`.

        Allocates blocks as needed. `start` may not exceed the layer's written length (no
        holes). The sequence's `length` becomes the minimum over layers of what is written.
        """
        self._check_layer(layer)
        count = k.shape[0]
        if k.shape != v.shape or k.shape[1:] != self.k[layer].shape[2:]:
            raise ValueError(
                f"k and v must both be [T, {self.num_kv_heads}, {self.config.head_dim}], "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        written = self.layer_length(seq_id, layer)
        if start < 0 or start > written:
            raise ValueError(
                f"write at {start} for sequence {seq_id} layer {layer} would leave a hole: "
                f"{written} token(s) are written there"
            )
        self._check_not_shared(seq_id, start)
        self.allocate(seq_id, start + count)
        if count == 0:
            return
        slots = self._slots(seq_id, start, count)
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(self.dtype))
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(self.dtype))
        lens = self._layer_lens[seq_id]
        lens[layer] = max(lens[layer], start + count)

    def write_tokens(
        self,
        seq_ids: list[int],
        layer: int,
        positions: list[int],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Write one token per sequence (`k`, `v` `[B, Hkv, D]`) in one copy: a decode step.

        The same rules as `write` apply per sequence; all blocks are allocated before any
        data is copied, so a CacheFullError leaves the data untouched.
        """
        self._check_layer(layer)
        if len(seq_ids) != len(positions) or k.shape[0] != len(seq_ids) or k.shape != v.shape:
            raise ValueError("write_tokens needs one position and one k/v row per sequence")
        for seq_id, position in zip(seq_ids, positions, strict=True):
            written = self.layer_length(seq_id, layer)
            if position < 0 or position > written:
                raise ValueError(
                    f"write at {position} for sequence {seq_id} layer {layer} would leave a "
                    f"hole: {written} token(s) are written there"
                )
            self._check_not_shared(seq_id, position)
            self.allocate(seq_id, position + 1)
        bs = self.block_size
        slots = torch.tensor(
            [
                self._tables[s][p // bs] * bs + p % bs
                for s, p in zip(seq_ids, positions, strict=True)
            ],
            dtype=torch.long,
            device=self.device,
        )
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(self.dtype))
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(self.dtype))
        for seq_id, position in zip(seq_ids, positions, strict=True):
            lens = self._layer_lens[seq_id]
            lens[layer] = max(lens[layer], position + 1)

    def read(self, seq_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's K and V `[length, Hkv, D]` of one layer, as fresh tensors."""
        self._check_layer(layer)
        length = self.length(seq_id)
        shape = self.k[layer].shape[2:]
        if length == 0:
            empty = torch.empty((0, *shape), dtype=self.dtype, device=self.device)
            return empty, empty.clone()
        slots = self._slots(seq_id, 0, length)
        k = self.k[layer].view(-1, *shape).index_select(0, slots)
        v = self.v[layer].view(-1, *shape).index_select(0, slots)
        return k, v

    def block_table(self, seq_ids: list[int]) -> torch.Tensor:
        """int32 `[B, max_blocks]` on the cache's device: each row a sequence's blocks, padded
        with 0 (the kernels never read past `context_lens`)."""
        key = tuple(seq_ids)
        memo = self._table_memo
        if memo is not None and memo[0] == key and memo[1] == self._version:
            return memo[2]
        tables = [self._tables.get(s, []) for s in seq_ids]
        width = max((len(t) for t in tables), default=0)
        rows = [t + [0] * (width - len(t)) for t in tables]
        table = torch.tensor(rows, dtype=torch.int32).reshape(len(seq_ids), width)
        table = table.to(self.device)
        self._table_memo = (key, self._version, table)
        return table

    def context_lens(self, seq_ids: list[int]) -> torch.Tensor:
        """int32 `[B]` on the cache's device: each sequence's `length`."""
        lens = [self.length(s) for s in seq_ids]
        return torch.tensor(lens, dtype=torch.int32).to(self.device)
