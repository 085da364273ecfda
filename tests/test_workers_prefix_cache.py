"""The prefill worker's prefix cache: chained block keys, longest-prefix reuse, LRU by bytes,
and the model's prefill after a cached prefix matching a prefill from position 0."""

from __future__ import annotations

import torch

from kleave.workers.config import MODEL_PRESETS
from kleave.workers.model import MoEDecoder
from kleave.workers.prefix_cache import PrefixCache, block_keys

BLOCK = 4


def fake_kv(tokens: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V whose every row is its token id: slices show exactly which positions came back."""
    rows = torch.tensor(tokens, dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 3)
    return [(rows + layer, -rows - layer) for layer in range(layers)]


def block_bytes(layers: int = 2) -> int:
    return layers * 2 * BLOCK * 2 * 3 * 4  # K and V, BLOCK tokens x 2 heads x 3 dims fp32


def test_a_block_key_names_its_whole_prefix() -> None:
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], BLOCK)
    b = block_keys([1, 2, 3, 4, 5, 6, 7, 0], BLOCK)
    c = block_keys([0, 2, 3, 4, 5, 6, 7, 8], BLOCK)
    assert len(a) == 2 and len(b) == 2  # full blocks only
    assert a[0] == b[0] and a[1] != b[1]
    assert c[1] != a[1]  # the same second block after a different first one


def test_lookup_returns_the_longest_cached_prefix_but_never_the_last_token() -> None:
    cache = PrefixCache(block_size=BLOCK, capacity_bytes=1 << 20)
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks
    assert cache.lookup(prompt).tokens == 0
    assert cache.insert(prompt, fake_kv(prompt)) == 3
    other = [*prompt[:8], 7, 7, 7, 7, 7]  # shares two blocks
    hit = cache.lookup(other)
    assert hit.tokens == 8 and hit.kv is not None
    assert torch.equal(hit.kv[1][0][:, 0, 0], torch.tensor(prompt[:8], dtype=torch.float32) + 1)
    assert torch.equal(hit.kv[0][1][:, 1, 2], -torch.tensor(prompt[:8], dtype=torch.float32))
    # a prompt that is exactly cached blocks still computes its last token
    exact = prompt[:12]
    assert cache.lookup(exact).tokens == 8
    assert cache.insert(other, fake_kv(other)) == 1  # only its third block is new


def test_eviction_is_by_bytes_and_takes_tails_first() -> None:
    cache = PrefixCache(block_size=BLOCK, capacity_bytes=3 * block_bytes())
    first = list(range(17))  # 4 usable full blocks: only 3 fit
    cache.insert(first, fake_kv(first))
    assert len(cache) == 3 and cache.nbytes == 3 * block_bytes() and cache.evicted_blocks == 1
    assert cache.lookup(first).tokens == 12  # the chain's tail went, its head stays
    second = [9, *range(1, 13)]  # a new 3-block chain pushes the older one out, tail first
    cache.insert(second, fake_kv(second))
    assert cache.nbytes <= cache.capacity_bytes
    assert cache.lookup(second).tokens == 12
    assert cache.lookup(first).tokens == 0
    for prompt in (first, second):  # whatever is cached, its parents are too
        keys = block_keys(prompt[:-1], BLOCK)
        cached = [key in cache._blocks for key in keys]
        assert cached == sorted(cached, reverse=True)


def test_a_cache_of_zero_bytes_keeps_nothing() -> None:
    cache = PrefixCache(block_size=BLOCK, capacity_bytes=0)
    prompt = list(range(9))
    assert cache.insert(prompt, fake_kv(prompt)) == 0 and len(cache) == 0
    assert cache.lookup(prompt).tokens == 0


def test_prefill_after_a_cached_prefix_matches_a_prefill_from_zero() -> None:
    model = MoEDecoder(MODEL_PRESETS["tiny"], seed=3)
    tokens = torch.randint(
        0, MODEL_PRESETS["tiny"].vocab_size, (40,), generator=torch.Generator().manual_seed(1)
    )
    logits, kv = model.prefill(tokens)
    _, prefix_kv = model.prefill(tokens[:32])
    seen: list[int] = []
    rest_logits, rest_kv = model.prefill(
        tokens[32:], prefix_kv, on_layer=lambda layer, k, v: seen.append(k.shape[0])
    )
    assert seen == [40] * model.config.num_layers  # the whole sequence's K/V, layer by layer
    assert int(rest_logits.argmax()) == int(logits.argmax())
    torch.testing.assert_close(rest_logits, logits, rtol=0, atol=1e-5)
    for (k, v), (k_full, v_full) in zip(rest_kv, kv, strict=True):
        torch.testing.assert_close(k, k_full, rtol=0, atol=1e-5)
        torch.testing.assert_close(v, v_full, rtol=0, atol=1e-5)
