"""Which worker gets a request: load first, then KV-prefix locality. Pure, no I/O.

A prompt goes to the worker that holds the longest run of its leading KV blocks (16 tokens
each), as far as the router's `PrefixIndex` of what it sent where knows: a conversation's
later turns follow its earlier ones, to the prefill worker's prefix cache and to the decode
worker's paged cache (which then is not sent that prefix again: the router asks it to hold
it). A prompt no worker holds goes by its first block, so prompts sharing a system prompt
meet: that is rendezvous (highest-random-weight) hashing, where each worker's score is a hash
of (worker, block) and the highest score wins, with no ring to rebuild, and a restart or a
scale event moves only the prefixes of the workers that came or went. Locality yields to
load: when the preferred worker has more than `imbalance` requests more in flight than the
least busy one, the least busy one takes it (SGLang's cache-aware router makes the same
trade with its balance threshold).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from kleave.workers.serve.prefix_index import PrefixIndex


@dataclass(eq=False)
class WorkerState:
    """What the router knows about one worker."""

    url: str
    role: str
    ready: bool = False
    outstanding: int = 0  # requests the router has in flight to it now
    served: int = 0  # requests it was given (ties go to the one given fewer)
    failures: int = 0
    last_error: str | None = None
    info: dict[str, object] = field(default_factory=dict)

    @property
    def kv_address(self) -> str | None:
        """``host:port`` of its KV receiver (decode/attention workers), from /v1/info."""
        port = self.info.get("kv_port")
        if not isinstance(port, int):
            return None
        host = self.info.get("kv_host")
        if not isinstance(host, str) or not host:
            host = urlsplit(self.url).hostname or ""
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def prefix_key(tokens: Sequence[int], block_size: int) -> bytes:
    """The routing key of a prompt: its first KV block (the whole prompt when shorter)."""
    head = tokens[:block_size]
    return b"".join(int(t).to_bytes(4, "little") for t in head)


def rendezvous_score(url: str, key: bytes) -> int:
    digest = hashlib.blake2b(url.encode() + b"\0" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(urls: Sequence[str], key: bytes) -> list[str]:
    """Workers from most to least preferred for `key`."""
    return sorted(urls, key=lambda url: rendezvous_score(url, key), reverse=True)


def least_loaded(workers: Sequence[WorkerState]) -> WorkerState:
    """Fewest in flight; ties to the one given fewest requests, then by URL (stable)."""
    if not workers:
        raise ValueError("no workers to choose from")
    return min(workers, key=lambda w: (w.outstanding, w.served, w.url))


@dataclass(frozen=True)
class PrefixChoice:
    worker: WorkerState
    affinity: bool  # True: the prefix's worker; False: overridden by load
    blocks: int = 0  # leading blocks of the prompt the index says the worker holds


def choose_by_prefix(
    workers: Sequence[WorkerState],
    tokens: Sequence[int],
    *,
    block_size: int,
    imbalance: int,
    index: PrefixIndex | None = None,
    keys: Sequence[bytes] = (),
) -> PrefixChoice:
    """The worker holding the longest run of the prompt's blocks (`index`, given the prompt's
    `keys`), or with none the first block's rendezvous worker; either unless it is much busier
    than the least busy one."""
    if not workers:
        raise ValueError("no workers to choose from")
    by_url = {w.url: w for w in workers}
    holders, blocks = index.longest(keys, by_url) if index is not None else (set(), 0)
    if blocks:
        preferred = least_loaded([by_url[url] for url in holders])
    else:
        preferred = by_url[rendezvous_order(list(by_url), prefix_key(tokens, block_size))[0]]
    idlest = least_loaded(workers)
    if preferred.outstanding - idlest.outstanding > imbalance:
        return PrefixChoice(idlest, affinity=False)
    return PrefixChoice(preferred, affinity=True, blocks=blocks)
