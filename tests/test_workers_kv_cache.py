"""The paged KV cache: block allocation (grow, free, all-or-nothing when full), the length
rule (what every layer holds), data round trips across page boundaries checked against the
raw pages, block tables and usage."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from kleave.workers.config import ModelConfig
from kleave.workers.kv_cache import CacheFullError, PagedKVCache

CONFIG = ModelConfig(num_layers=2, num_kv_heads=2, head_dim=4)


def cache(num_blocks: int = 8, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(CONFIG, num_blocks=num_blocks, block_size=block_size)


def kv(tokens: int, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values per token so a misplaced row shows."""
    base = torch.arange(tokens * 2 * 4, dtype=torch.float32).view(tokens, 2, 4) + offset
    return base, -base


def test_shapes_and_dtype_follow_the_config() -> None:
    c = cache()
    assert len(c.k) == len(c.v) == CONFIG.num_layers
    assert c.k[0].shape == (8, 4, 2, 4)
    assert c.k[0].dtype == torch.float32
    half = PagedKVCache(CONFIG, num_blocks=2, block_size=4, dtype=torch.float16)
    assert half.v[1].dtype == torch.float16


def test_allocate_grows_and_free_returns_blocks() -> None:
    c = cache()
    assert c.free_blocks == 8 and c.usage() == 0.0
    c.allocate(1, 5)  # 2 blocks
    assert c.free_blocks == 6
    c.allocate(1, 8)  # still 2 blocks
    assert c.free_blocks == 6
    c.allocate(1, 9)  # grows to 3
    c.allocate(2, 1)
    assert c.free_blocks == 4
    assert c.usage() == pytest.approx(0.5)
    table = c.block_table([1, 2])
    assert table.dtype == torch.int32 and table.shape == (2, 3)
    owned = [*table[0].tolist(), table[1, 0].item()]
    assert len(set(owned)) == 4  # no block shared between sequences
    assert table[1, 1:].tolist() == [0, 0]  # padding
    c.free(1)
    assert c.free_blocks == 7
    c.free(1)  # twice is harmless
    assert c.free_blocks == 7
    c.allocate(3, 12)
    assert c.free_blocks == 4


def test_cache_full_is_all_or_nothing_with_an_actionable_message() -> None:
    c = cache(num_blocks=3)
    c.allocate(1, 8)
    assert c.can_allocate(4) and not c.can_allocate(5)
    assert c.can_allocate(12, seq_id=1) and not c.can_allocate(13, seq_id=1)
    with pytest.raises(CacheFullError) as err:
        c.allocate(2, 9)
    message = str(err.value)
    assert "sequence 2 needs 3 more block(s)" in message
    assert "only 1 of 3 are free" in message
    assert c.free_blocks == 1 and 2 not in c  # nothing taken


def test_write_read_round_trip_across_pages_matches_the_raw_pages() -> None:
    c = cache()
    c.allocate(9, 2)  # another sequence first, so seq 1's blocks are not 0, 1, ...
    k, v = kv(7)
    for layer in range(CONFIG.num_layers):
        c.write(1, layer, 0, k + layer, v - layer)
    assert c.length(1) == 7
    blocks = c.block_table([1])[0].tolist()
    for position in range(7):  # the raw pages, by hand
        block, slot = blocks[position // 4], position % 4
        assert torch.equal(c.k[1][block, slot], k[position] + 1)
        assert torch.equal(c.v[0][block, slot], v[position])
    rk, rv = c.read(1, 1)
    assert torch.equal(rk, k + 1) and torch.equal(rv, v - 1)


def test_length_is_what_every_layer_holds_and_writes_append_or_overwrite() -> None:
    c = cache()
    k, v = kv(3)
    c.write(1, 1, 0, k, v)  # the last layer first: a receiver may get layers out of order
    assert c.length(1) == 0 and c.layer_length(1, 1) == 3
    assert c.read(1, 0)[0].shape == (0, 2, 4)
    c.write(1, 0, 0, k, v)
    assert c.length(1) == 3
    k2, v2 = kv(2, offset=100.0)
    for layer in range(2):
        c.write(1, layer, 3, k2, v2)  # append
    assert c.length(1) == 5
    c.write(1, 0, 1, k2[:1], v2[:1])  # overwrite one token
    assert c.length(1) == 5
    assert torch.equal(c.read(1, 0)[0][1], k2[0])
    assert torch.equal(c.context_lens([1]), torch.tensor([5], dtype=torch.int32))
    with pytest.raises(ValueError, match="hole"):
        c.write(1, 0, 7, k2, v2)
    with pytest.raises(ValueError, match=r"\[T, 2, 4\]"):
        c.write(1, 0, 0, torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))


def test_write_tokens_is_one_decode_step_for_a_batch() -> None:
    c = cache()
    for seq, tokens in ((1, 3), (2, 4)):
        k, v = kv(tokens)
        for layer in range(2):
            c.write(seq, layer, 0, k, v)
    new_k = torch.full((2, 2, 4), 7.0)
    for layer in range(2):
        c.write_tokens([2, 1], layer, [4, 3], new_k * (layer + 1), -new_k)
    assert c.context_lens([1, 2]).tolist() == [4, 5]
    assert len(c.block_table([2])[0]) == 2  # seq 2 crossed into a second page
    assert torch.equal(c.read(2, 1)[0][4], new_k[0] * 2)
    assert torch.equal(c.read(1, 0)[1][3], -new_k[1])
    with pytest.raises(ValueError, match="hole"):
        c.write_tokens([1], 0, [9], new_k[:1], new_k[:1])


def test_block_table_reflects_growth_after_being_built() -> None:
    c = cache()
    c.allocate(1, 4)
    first = c.block_table([1])
    assert first.shape == (1, 1)
    assert c.block_table([1]) is first  # memoized while nothing changed
    c.allocate(1, 5)
    assert c.block_table([1]).shape == (1, 2)
    assert c.block_table([]).shape == (0, 0)


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        PagedKVCache(CONFIG, num_blocks=0)
    with pytest.raises(IndexError, match="layer 2"):
        cache().read(1, 2)


# ----- prefix caching -----------------------------------------------------------------------
def prefill(c: PagedKVCache, seq: int, tokens: list[int], cached: int) -> None:
    """Write the K/V of `tokens` after the `cached` positions the cache already shares."""
    for layer in range(CONFIG.num_layers):
        k, v = kv(len(tokens) - cached, offset=float(cached + 100 * layer))
        c.write(seq, layer, cached, k, v)


def test_a_registered_prefix_is_shared_by_the_next_sequence_and_never_written() -> None:
    c = cache(num_blocks=8, block_size=4)
    prompt = list(range(10))  # 2 full blocks, never the last token's
    assert c.allocate_prefix(0, prompt, 11) == 0
    prefill(c, 0, prompt, 0)
    assert c.register(0, prompt) == 2 and c.cached_blocks == 2
    other = [*prompt[:8], 42, 43, 44]
    assert c.allocate_prefix(1, other, 12) == 8
    assert c.block_table([0, 1])[0, :2].tolist() == c.block_table([0, 1])[1, :2].tolist()
    assert c.length(1) == 8 and c.free_blocks == 8 - 3 - 1  # 3 own + 1 new block for seq 1
    for layer in range(CONFIG.num_layers):
        k0, v0 = c.read(0, layer)
        k1, v1 = c.read(1, layer)
        assert torch.equal(k0[:8], k1) and torch.equal(v0[:8], v1)
    with pytest.raises(ValueError, match="cached prefix shared"):
        c.write(1, 0, 4, *kv(1))
    prefill(c, 1, other, 8)
    c.free(0)  # the shared blocks stay with sequence 1
    assert torch.equal(c.read(1, 1)[0][:8], kv(8, offset=100.0)[0])
    c.free(1)
    assert c.free_blocks == 8 and c.usage() == 0.0  # cached blocks count as free ...
    assert c.allocate_prefix(2, prompt, 11) == 8  # ... and still hit


def test_cached_blocks_are_evicted_tails_first_when_fresh_ones_run_out() -> None:
    c = cache(num_blocks=4, block_size=4)
    prompt = list(range(13))  # 3 full blocks
    c.allocate_prefix(0, prompt, 13)
    prefill(c, 0, prompt, 0)
    c.register(0, prompt)
    c.free(0)
    assert c.free_blocks == 4 and c.cached_blocks == 3
    c.allocate(9, 8)  # two fresh blocks: the free one, then the least recent cached one
    assert c.cached_blocks == 2
    c.free(9)
    assert c.allocate_prefix(1, prompt, 13) == 8  # the chain's tail went, its head stayed
    c.free(1)
    with pytest.raises(CacheFullError, match="beside its 2 cached"):
        c.allocate_prefix(2, prompt, 100)
    assert 2 not in c and c.free_blocks == 4  # all or nothing


def test_admission_counts_a_cached_prefix_as_already_there() -> None:
    """A request sharing 7 cached blocks needs 1 fresh one: it fits where a private copy of
    its 8 would not (what the engine asks before admitting it)."""
    c = cache(num_blocks=10, block_size=4)
    prompt = list(range(100, 128))  # 7 full blocks
    c.allocate_prefix(0, [*prompt, 1], 29)  # 8 blocks: the prompt and a decode token
    prefill(c, 0, [*prompt, 1], 0)
    c.register(0, [*prompt, 1])
    other = [*prompt, 7, 8]
    assert not c.can_allocate(30)  # 8 blocks of 2 free
    assert c.can_allocate_prefix(other, 30)
    assert c.allocate_prefix(1, other, 30) == 28 and c.free_blocks == 1
    assert not c.can_allocate_prefix(other, 30 + 2 * 4)  # 3 fresh blocks would be needed
