"""The router's picture of which worker's cache holds which prompt blocks. Pure, no I/O.

Routing by a prompt's first block alone sends every conversation that shares a system prompt
to one worker, whichever worker holds that conversation's earlier turns. This index remembers,
for each chained block key (``prefix_cache.block_keys``: one key names a whole prefix), the
workers the router sent it to, and a prompt's match on a worker is how many of its leading
blocks that worker was sent: SGLang's cache-aware router keeps the same approximate tree of
what it routed where. It is a guess (a worker evicts without telling), which only costs a
cache miss; the worker's own cache decides what is reused. Bounded: least recently used keys
go first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

from kleave.workers.prefix_cache import block_keys

DEFAULT_CAPACITY = 1 << 16  # block keys (x 16 tokens: a million tokens of prefixes)


def reusable_keys(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The chained keys of the blocks a worker's cache could reuse for `tokens`: every full
    block but one holding the last token, which is always computed."""
    return block_keys(tokens[: max(0, len(tokens) - 1)], block_size)


class PrefixIndex:
    def __init__(self, block_size: int, capacity: int = DEFAULT_CAPACITY) -> None:
        if block_size < 1 or capacity < 1:
            raise ValueError("block_size and capacity must be positive")
        self.block_size = block_size
        self.capacity = capacity
        self._owners: OrderedDict[bytes, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        return reusable_keys(tokens, self.block_size)

    def record(self, worker: str, keys: Sequence[bytes]) -> None:
        """`worker` was sent (and so now caches) the prefix these keys name. Tails first, so
        a chain's start is its most recently used key and is evicted last."""
        for key in reversed(keys):
            owners = self._owners.get(key)
            if owners is None:
                owners = self._owners[key] = set()
            else:
                self._owners.move_to_end(key)
            owners.add(worker)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)

    def forget(self, worker: str) -> None:
        """A worker restarted or left: its cache is empty."""
        for key in [k for k, owners in self._owners.items() if worker in owners]:
            owners = self._owners[key]
            owners.discard(worker)
            if not owners:
                del self._owners[key]

    def longest(self, keys: Sequence[bytes], workers: Collection[str]) -> tuple[set[str], int]:
        """The workers among `workers` holding the most leading blocks, and how many (0, with
        an empty set, when none holds the first)."""
        best: set[str] = set()
        depth = 0
        candidates = set(workers)
        for key in keys:
            candidates &= self._owners.get(key, set())
            if not candidates:
                break
            best, depth = set(candidates), depth + 1
        return best, depth
