"""The prefill worker's prefix cache: K/V of prompt prefixes in whole blocks, reused.

Prompts that share a prefix (a system prompt, a few-shot preamble, a conversation so far)
have the same K/V for it, because attention is causal. The cache keeps each full block of
``block_size`` tokens under a key that chains the keys of every block before it (as vLLM's
automatic prefix caching does), so a key names a whole prefix, not just 16 tokens. A prompt
reuses its longest cached chain and the model computes only the rest; the router's
prefix-locality routing sends prompts that share a first block to the same prefill worker,
where their chain is.

Bounded in bytes, least recently used first. A lookup or insert touches a chain from its last
block back to its first, so a prefix's first blocks are always more recent than its later
ones and eviction takes the tails first: a cached block's parent is cached too. At least the
prompt's last token is always computed (its logits give the first output token). Not thread
safe: the prefill worker calls it from its one model thread. Pure: no I/O, no model.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), [tokens, Hkv, D]


@dataclass(frozen=True)
class PrefixHit:
    """The cached start of a prompt: ``tokens`` positions and their K/V per layer."""

    tokens: int
    kv: KVLayers | None  # None when nothing was cached


@dataclass
class _Block:
    kv: KVLayers  # this block's tokens only
    nbytes: int


def block_keys(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The chained key of every full block of ``tokens``."""
    keys: list[bytes] = []
    parent = b""
    layout = f"<{block_size}I"  # each token as 4 little-endian bytes (3x faster than to_bytes)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = struct.pack(layout, *tokens[start : start + block_size])
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Full-block prefix K/V, at most ``capacity_bytes`` of it (0 disables the cache)."""

    def __init__(self, *, block_size: int, capacity_bytes: int) -> None:
        if block_size <= 0 or capacity_bytes < 0:
            raise ValueError("block_size must be positive and capacity_bytes not negative")
        self.block_size = block_size
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self.evicted_blocks = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _usable_keys(self, tokens: Sequence[int]) -> list[bytes]:
        # Never the whole prompt: its last token must run through the model for the logits.
        return block_keys(tokens[: max(0, len(tokens) - 1)], self.block_size)

    def lookup(self, tokens: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of ``tokens`` in whole blocks (concatenated per layer)."""
        chain: list[bytes] = []
        for key in self._usable_keys(tokens):
            if key not in self._blocks:
                break
            chain.append(key)
        if not chain:
            return PrefixHit(0, None)
        self._touch(chain)
        blocks = [self._blocks[key].kv for key in chain]
        kv = [
            (
                torch.cat([block[layer][0] for block in blocks]),
                torch.cat([block[layer][1] for block in blocks]),
            )
            for layer in range(len(blocks[0]))
        ]
        return PrefixHit(len(chain) * self.block_size, kv)

    def insert(self, tokens: Sequence[int], kv: KVLayers) -> int:
        """Keep the full blocks of ``tokens`` (whose K/V per layer is ``kv``) not cached yet;
        returns how many blocks were added. The tensors are copied: callers may reuse theirs."""
        if self.capacity_bytes == 0:
            return 0
        keys = self._usable_keys(tokens)
        added = 0
        for index, key in enumerate(keys):
            if key in self._blocks:
                continue
            start, end = index * self.block_size, (index + 1) * self.block_size
            block_kv = [(k[start:end].clone(), v[start:end].clone()) for k, v in kv]
            nbytes = sum(k.nbytes + v.nbytes for k, v in block_kv)
            if nbytes > self.capacity_bytes:
                break
            self._blocks[key] = _Block(block_kv, nbytes)
            self.nbytes += nbytes
            added += 1
        self._touch(keys)
        self._evict()
        return added

    def clear(self) -> None:
        self._blocks.clear()
        self.nbytes = 0

    def _touch(self, chain: list[bytes]) -> None:
        for key in reversed(chain):  # the first block ends most recent
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.nbytes > self.capacity_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.nbytes -= block.nbytes
            self.evicted_blocks += 1
