"""A decode worker's prefix cache in PD: received prompts are cached, and a prefix the decode
worker holds is not sent again (the router asks it to hold the prefix, the prefill worker
sends the K/V after it). Every scenario checks generate_greedy's exact tokens and that no
block stays pinned afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from kleave.workers.config import MODEL_PRESETS
from kleave.workers.kv_cache import PagedKVCache
from kleave.workers.model import MoEDecoder, generate_greedy
from kleave.workers.serve.decode_server import DecodeServer
from kleave.workers.serve.engine import Engine, RejectedRequestError, TokenEvent
from kleave.workers.serve.http import ApiError
from kleave.workers.serve.metrics import WorkerMetrics
from kleave.workers.serve.prefill_server import PrefillServer
from kleave.workers.serve.prefix_holds import Hold, PrefixHolds
from kleave.workers.serve.prefix_index import PrefixIndex
from kleave.workers.serve.routing import WorkerState, choose_by_prefix
from kleave.workers.serve.sampling import SamplingParams
from kleave.workers.tokenizer import BOS
from test_workers_serve import completion_tokens, make_engine, plane, post, run

pytest_plugins = ("workers_fixtures",)  # the `model` and `reference` fixtures
CONFIG = MODEL_PRESETS["tiny"]
SYSTEM = [BOS, *b"You are kleave's test assistant; answer briefly."]  # 50 tokens: 3 full blocks
QUESTIONS = [SYSTEM + list(b"What is PD?"), SYSTEM + list(b"And PDAF?"), SYSTEM + list(b"PD?")]
LABELS = {"model_name": "tiny", "engine": "0"}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=())


def whole_kv(model: MoEDecoder, prompt: list[int]) -> tuple[int, list[tuple[Any, Any]]]:
    """What a prefill worker computes: (first greedy token, every layer's K/V)."""
    logits, kv = model.prefill(torch.tensor(prompt, dtype=torch.long))
    return int(logits.argmax()), kv


async def settled(engine: Engine) -> None:
    """Wait for the loop to free what finished (it reaps at its next iteration)."""
    for _ in range(200):
        if engine.cache.free_blocks == engine.cache.num_blocks and not engine.holds.work:
            return
        await asyncio.sleep(0.01)


async def tokens_of(stream: Any) -> list[int]:
    return [event.token async for event in stream if isinstance(event, TokenEvent)]


@asynccontextmanager
async def running(model: MoEDecoder, blocks: int) -> AsyncIterator[tuple[Engine, WorkerMetrics]]:
    """A started engine over a cache of `blocks` blocks, stopped on the way out."""
    engine, metrics = make_engine(model, blocks)
    engine.start()
    try:
        yield engine, metrics
    finally:
        await engine.stop()


async def receive(
    engine: Engine,
    model: MoEDecoder,
    request_id: str,
    prompt: list[int],
    *,
    start: int = 0,
    hold: Hold | None = None,
) -> list[int]:
    """Submit `prompt` as a decode worker gets it from a prefill worker: its first token and
    its K/V from position `start` (after `hold`'s tokens); -> the tokens it decodes."""
    first, kv = whole_kv(model, prompt)
    tail = [(k[start:], v[start:]) for k, v in kv]
    stream = engine.submit(
        request_id, prompt, GREEDY, first_token=first, kv=tail, kv_start=start, hold=hold
    )
    return await tokens_of(stream)


# ----- the bookkeeping, on a cache alone ----------------------------------------------------
def test_a_hold_pins_its_blocks_until_released_or_expired() -> None:
    cache = PagedKVCache(CONFIG, num_blocks=4, block_size=16)
    cache.allocate(0, 40)
    zeros = torch.zeros(40, CONFIG.num_kv_heads, CONFIG.head_dim)
    for layer in range(CONFIG.num_layers):
        cache.write(0, layer, 0, zeros, zeros)
    cache.register(0, QUESTIONS[0][:40])  # two full blocks reusable
    cache.free(0)
    holds = PrefixHolds()
    assert holds.make(cache, "a", QUESTIONS[0], seq_id=1, ttl_s=10.0, now=0.0) == 32
    assert holds.make(cache, "b", QUESTIONS[1], seq_id=2, ttl_s=1.0, now=0.0) == 32
    other = [BOS, *b"unrelated prompt, nothing cached"]
    assert holds.make(cache, "c", other, seq_id=3, ttl_s=10.0, now=0.0) == 0
    assert 3 not in cache  # nothing held: no sequence left behind
    with pytest.raises(ValueError, match="already holds"):
        holds.make(cache, "a", QUESTIONS[0], seq_id=4, ttl_s=10.0)
    assert len(holds) == 2 and "a" in holds and "c" not in holds
    # pinned: a sequence that needs every block cannot have the held ones
    assert not cache.can_allocate(4 * 16)
    holds.expire(cache, now=5.0)  # "b" expired; "a" still pins the same two blocks
    assert "b" not in holds and 2 not in cache and not cache.can_allocate(4 * 16)
    assert holds.release("a") and not holds.release("a")
    assert 1 in cache and holds.work  # freed by the loop, not by release
    holds.expire(cache, now=5.0)
    assert len(holds) == 0 and cache.free_blocks == 4 and cache.cached_blocks == 2


# ----- the engine -----------------------------------------------------------------------------
def test_received_kv_is_cached_and_a_held_prefix_is_not_received_again(
    model: MoEDecoder,
) -> None:
    """The first request arrives with its whole K/V; the next ones hold the 48 tokens of the
    system prompt's blocks and arrive with the K/V after them; all decode exactly."""
    expected = [generate_greedy(model, prompt, 10) for prompt in QUESTIONS]

    async def scenario() -> tuple[list[list[int]], list[int], Engine, float]:
        async with running(model, 32) as (engine, metrics):
            outputs, held = [], []
            for index, prompt in enumerate(QUESTIONS):
                cached = engine.hold_prefix(f"r{index}", prompt, ttl_s=30.0)
                hold = engine.holds.take(f"r{index}")
                outputs.append(
                    await receive(engine, model, f"r{index}", prompt, start=cached, hold=hold)
                )
                held.append(cached)
            hits = metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", LABELS)
            await settled(engine)
            return outputs, held, engine, hits or 0.0

    outputs, held, engine, hits = run(scenario())
    assert outputs == expected
    assert held == [0, 48, 48] and hits == 96.0
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_whole_kv_from_a_sender_that_ignored_the_hold_is_used_after_it(
    model: MoEDecoder,
) -> None:
    """A prefill worker that predates holds sends the whole prompt's K/V: the engine uses
    them from the hold's end (exact tokens). K/V of the wrong length are refused and the
    hold is given back; a second hold for one request is refused."""
    expected = generate_greedy(model, QUESTIONS[1], 10)

    async def scenario() -> tuple[list[int], Engine]:
        async with running(model, 32) as (engine, _):
            await receive(engine, model, "a", QUESTIONS[0])
            assert engine.hold_prefix("b", QUESTIONS[1], ttl_s=30.0) == 48
            tokens = await receive(engine, model, "b", QUESTIONS[1], hold=engine.holds.take("b"))
            assert engine.hold_prefix("c", QUESTIONS[1], ttl_s=30.0) == 48
            first, kv = whole_kv(model, QUESTIONS[0])
            with pytest.raises(RejectedRequestError, match="expected"):
                engine.submit(
                    "c", QUESTIONS[1], GREEDY, first_token=first, kv=kv, hold=engine.holds.take("c")
                )
            assert engine.hold_prefix("d", QUESTIONS[1], ttl_s=30.0) == 48
            with pytest.raises(RejectedRequestError, match="already running or held"):
                engine.hold_prefix("d", QUESTIONS[1], ttl_s=30.0)
            assert engine.release_hold("d")
            await settled(engine)
            return tokens, engine

    tokens, engine = run(scenario())
    assert tokens == expected
    assert engine.cache.free_blocks == engine.cache.num_blocks and len(engine.holds) == 0


def test_a_hold_nobody_takes_ends_at_its_ttl(model: MoEDecoder) -> None:
    async def scenario() -> tuple[int, Engine]:
        async with running(model, 32) as (engine, _):
            await receive(engine, model, "a", QUESTIONS[0])
            held = engine.hold_prefix("b", QUESTIONS[1], ttl_s=0.2)
            assert len(engine.holds) == 1
            await asyncio.sleep(0.3)  # the idle loop wakes at the deadline by itself
            await settled(engine)
            return held, engine

    held, engine = run(scenario())
    assert held == 48 and len(engine.holds) == 0
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_blocks_needed_now_unpin_holds_and_their_requests_recompute_exactly(
    model: MoEDecoder,
) -> None:
    """8 blocks: "b" holds 3 of them, then "c" needs all 8 with nothing running. "c" runs
    (the hold is dropped, not waited out), and "b"'s K/V tail, arriving after, no longer
    has its prefix: "b" is recomputed and still gets generate_greedy's tokens."""
    long_prompt = [BOS, *range(1, 100)]
    expected = generate_greedy(model, QUESTIONS[1], 10)

    async def scenario() -> tuple[list[int], int, Engine]:
        async with running(model, 8) as (engine, _):
            await receive(engine, model, "a", QUESTIONS[0])
            held = engine.hold_prefix("b", QUESTIONS[1], ttl_s=3600.0)
            params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=())
            out = await asyncio.wait_for(
                tokens_of(engine.submit("c", long_prompt, params)), timeout=30.0
            )
            assert len(out) == 20 and len(engine.holds) == 0
            hold = engine.holds.take("b")
            tokens = await receive(engine, model, "b", QUESTIONS[1], start=held, hold=hold)
            await settled(engine)
            return tokens, held, engine

    tokens, held, engine = run(scenario())
    assert held == 48 and tokens == expected
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_a_request_blocked_by_a_taken_hold_waits_without_spinning(
    model: MoEDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "b" took its hold (its K/V are on the way), so "c", which needs all 8 blocks, cannot
    run yet: the loop waits instead of retrying, and "c" runs once "b"'s hold comes back."""
    calls = 0
    unpin = Engine._unpin

    def counted(self: Engine, head: Any) -> bool:
        nonlocal calls
        calls += 1
        return unpin(self, head)

    monkeypatch.setattr(Engine, "_unpin", counted)

    async def scenario() -> tuple[int, list[int]]:
        async with running(model, 8) as (engine, _):
            await receive(engine, model, "a", QUESTIONS[0])
            assert engine.hold_prefix("b", QUESTIONS[1], ttl_s=3600.0) == 48
            hold = engine.holds.take("b")
            params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=())
            blocked = asyncio.create_task(
                tokens_of(engine.submit("c", [BOS, *range(1, 100)], params))
            )
            await asyncio.sleep(0.3)
            waited = calls
            assert not blocked.done()
            engine.give_back(hold)  # "b" failed to arrive
            out = await asyncio.wait_for(blocked, timeout=30.0)
            await settled(engine)
            return waited, out

    waited, out = run(scenario())
    assert waited <= 3  # spinning, it was tens of thousands
    assert len(out) == 20


def test_a_hold_is_not_used_for_another_prompt(model: MoEDecoder) -> None:
    """A generate call whose prompt is not the one the hold was made for gets no held
    blocks: its whole K/V are used, and it decodes its own generate_greedy tokens."""
    other = [BOS, *range(1, 70)]
    expected = generate_greedy(model, other, 10)

    async def scenario() -> tuple[list[int], Engine]:
        async with running(model, 32) as (engine, _):
            await receive(engine, model, "a", QUESTIONS[0])
            assert engine.hold_prefix("b", QUESTIONS[1], ttl_s=3600.0) == 48
            tokens = await receive(engine, model, "b", other, hold=engine.holds.take("b"))
            await settled(engine)
            return tokens, engine

    tokens, engine = run(scenario())
    assert tokens == expected
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_an_untaken_hold_gives_way_before_a_running_request_is_preempted(
    model: MoEDecoder,
) -> None:
    """8 blocks, 3 of them held for "h": "r" grows to 100 tokens (7 blocks) while running;
    the hold is dropped for it, and nothing is preempted."""
    prompt = [BOS, *range(1, 40)]
    params = SamplingParams(max_tokens=60, temperature=0.0, stop_token_ids=())
    expected = generate_greedy(model, prompt, 60)

    async def scenario() -> tuple[list[int], float, Engine]:
        async with running(model, 8) as (engine, metrics):
            await receive(engine, model, "a", QUESTIONS[0])
            assert engine.hold_prefix("h", QUESTIONS[1], ttl_s=3600.0) == 48
            tokens = await tokens_of(engine.submit("r", prompt, params))
            preempted = metrics.registry.get_sample_value("vllm:num_preemptions_total", LABELS)
            await settled(engine)
            return tokens, preempted or 0.0, engine

    tokens, preempted, engine = run(scenario())
    assert tokens == expected and preempted == 0.0 and len(engine.holds) == 0


def test_a_finished_answer_stays_cached_for_the_next_turn(model: MoEDecoder) -> None:
    """Turn 2's prompt is turn 1's prompt, its answer and a new question: the 5 full blocks
    of turn 1's prompt and answer are reused (only the prompt's 3 without output caching)."""
    first_turn = QUESTIONS[0]  # 60 tokens
    answer = generate_greedy(model, first_turn, 30)
    second_turn = first_turn + answer + list(b"Why?")
    expected = generate_greedy(model, second_turn, 10)

    async def scenario() -> tuple[list[int], float]:
        async with running(model, 32) as (engine, metrics):
            params = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=())
            assert await tokens_of(engine.submit("t1", first_turn, params)) == answer
            await settled(engine)
            before = metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", LABELS)
            tokens = await tokens_of(engine.submit("t2", second_turn, GREEDY))
            after = metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", LABELS)
            await settled(engine)
            return tokens, (after or 0.0) - (before or 0.0)

    tokens, hits = run(scenario())
    assert tokens == expected
    assert hits == 80.0  # 90 tokens of K/V were written: 5 full blocks


# ----- the router's index of what it sent where ----------------------------------------------
def test_the_index_finds_the_worker_holding_the_longest_run_of_blocks() -> None:
    index = PrefixIndex(block_size=16, capacity=8)
    turn_1 = QUESTIONS[0]  # 60 tokens: 3 blocks before the last token
    turn_2 = turn_1 + list(range(40))  # 100 tokens: 6 blocks
    index.record("http://a", index.keys(turn_1))
    index.record("http://b", index.keys([*SYSTEM, 1, 2, 3]))  # the system prompt's 3 blocks
    assert len(index.keys(turn_2)) == 6
    assert index.longest(index.keys(turn_2), {"http://a", "http://b"}) == (
        {"http://a", "http://b"},
        3,
    )
    index.record("http://a", index.keys(turn_2))
    assert index.longest(index.keys(turn_2), {"http://a", "http://b"}) == ({"http://a"}, 6)
    assert index.longest(index.keys(turn_2), {"http://b"}) == ({"http://b"}, 3)
    assert index.longest(index.keys([BOS, *range(60)]), {"http://a"}) == (set(), 0)
    assert len(index) == 6  # the 3 system blocks are shared keys
    index.record("http://c", index.keys([BOS, *range(60)]))  # 3 new keys: 9 > 8, one goes
    assert len(index) == 8
    # recorded tails first, so the oldest key was turn 2's last block, not its first
    assert index.longest(index.keys(turn_2), {"http://a"}) == ({"http://a"}, 5)
    index.forget("http://c")
    assert len(index) == 5


def test_a_conversation_follows_the_worker_that_holds_it_unless_that_one_is_much_busier() -> None:
    """Turn 1 went to the idler worker (load overrode the system prompt's rendezvous worker):
    turn 2 follows it there, where its 6 blocks are, not back to the rendezvous worker."""
    workers = [WorkerState(f"http://w{i}", "decode", ready=True) for i in range(2)]
    index = PrefixIndex(block_size=16)
    turn_1 = QUESTIONS[0]
    turn_2 = turn_1 + list(range(40))
    home = choose_by_prefix(workers, turn_1, block_size=16, imbalance=2, index=index)
    other = next(w for w in workers if w is not home.worker)
    home.worker.outstanding = 5
    moved = choose_by_prefix(
        workers, turn_1, block_size=16, imbalance=2, index=index, keys=index.keys(turn_1)
    )
    assert moved.worker is other and not moved.affinity
    index.record(other.url, index.keys(turn_2))
    home.worker.outstanding = 1
    follows = choose_by_prefix(
        workers, turn_2, block_size=16, imbalance=2, index=index, keys=index.keys(turn_2)
    )
    assert follows.worker is other and follows.affinity and follows.blocks == 6
    other.outstanding = 4  # 3 more than the rendezvous worker: over the imbalance
    busy = choose_by_prefix(
        workers, turn_2, block_size=16, imbalance=2, index=index, keys=index.keys(turn_2)
    )
    assert busy.worker is home.worker and not busy.affinity


# ----- PD servers on real sockets -------------------------------------------------------------
def kv_bytes(server: PrefillServer | DecodeServer) -> float:
    value = server.metrics.registry.get_sample_value("kleave:kv_transfer_bytes_total", LABELS)
    return value or 0.0


@pytest.mark.parametrize(
    ("topology", "decode_prefix_caching"), [("PD", True), ("PD", False), ("PDAF", True)]
)
def test_pd_sends_only_what_the_decode_worker_lacks(
    model: MoEDecoder, topology: str, decode_prefix_caching: bool
) -> None:
    """Three prompts sharing a system prompt through the router: the decode (or attention)
    worker holds the system prompt's 3 blocks after the first, so the next two send the K/V
    of their own tokens only; without prefix caching on it every token is sent."""
    expected = [generate_greedy(model, prompt, 12) for prompt in QUESTIONS]
    per_token = CONFIG.kv_bytes_per_token

    async def scenario() -> tuple[list[list[int]], list[float], float]:
        async with plane(topology) as p:
            (decode_url,) = p.workers[p.plan.decode_role]
            decode = p.servers[decode_url]
            assert isinstance(decode, DecodeServer) and decode.engine is not None
            decode.engine.prefix_caching = decode_prefix_caching
            await p.routing.refresh()  # the router learns whether it caches prefixes
            sent: list[float] = []
            tokens: list[list[int]] = []
            for prompt in QUESTIONS:
                before = kv_bytes(decode)
                tokens.append(await completion_tokens(p, prompt, 12))
                sent.append((kv_bytes(decode) - before) / per_token)
            hits = decode.metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", LABELS)
            assert len(decode.engine.holds) == 0
            return tokens, sent, hits or 0.0

    tokens, sent, hits = run(scenario())
    assert tokens == expected
    lengths = [len(prompt) for prompt in QUESTIONS]
    if decode_prefix_caching:
        assert sent == [lengths[0], lengths[1] - 48, lengths[2] - 48]
        assert hits == 96.0
    else:
        assert sent == lengths and hits == 0.0


def test_a_failed_prefill_releases_the_hold_it_made() -> None:
    """The prefill worker refuses the request after the decode worker held its prefix: the
    router releases the hold at once instead of leaving the blocks pinned for its ttl."""

    async def scenario() -> DecodeServer:
        async with plane("PD") as p:
            (decode_url,) = p.workers["decode"]
            decode = p.servers[decode_url]
            assert isinstance(decode, DecodeServer) and decode.engine is not None
            await completion_tokens(p, QUESTIONS[0], 4)
            (prefill_url,) = p.workers["prefill"]
            prefill = p.servers[prefill_url]
            assert isinstance(prefill, PrefillServer)

            async def broken(*_: Any, **__: Any) -> Any:
                raise ApiError(500, "the prefill broke")

            prefill._run = broken  # type: ignore[method-assign]
            queries = decode.metrics.registry.get_sample_value(
                "vllm:prefix_cache_queries_total", LABELS
            )
            body = {"model": "tiny", "prompt": QUESTIONS[1], "max_tokens": 4}
            status, answer = await post(p.session, f"{p.router}/v1/completions", body)
            assert status == 502 and "the prefill broke" in answer["error"]["message"], answer
            after = decode.metrics.registry.get_sample_value(
                "vllm:prefix_cache_queries_total", LABELS
            )
            assert after == (queries or 0.0) + len(QUESTIONS[1])  # the hold was made
            for _ in range(100):
                if len(decode.engine.holds) == 0:
                    break
                await asyncio.sleep(0.02)
            return decode

    decode = run(scenario())
    assert decode.engine is not None and len(decode.engine.holds) == 0


def test_hold_requests_with_bad_fields_are_refused_naming_them() -> None:
    async def scenario() -> list[tuple[int, Any]]:
        async with plane("PD") as p:
            (decode_url,) = p.workers["decode"]
            bodies: list[dict[str, Any]] = [
                {"prompt_tokens": QUESTIONS[0]},
                {"request_id": "x", "prompt_tokens": []},
                {"request_id": "x", "prompt_tokens": QUESTIONS[0], "ttl_s": 0},
                {"request_id": "x", "prompt_tokens": QUESTIONS[0], "ttl_s": 1e9},
            ]
            answers = [await post(p.session, f"{decode_url}/v1/kv/hold", b) for b in bodies]
            (prefill_url,) = p.workers["prefill"]
            body = {
                "request_id": "y",
                "prompt_tokens": QUESTIONS[0],
                "decode": "127.0.0.1:1",
                "decode_cached_tokens": len(QUESTIONS[0]),
            }
            answers.append(await post(p.session, f"{prefill_url}/v1/prefill", body))
            return answers

    answers = run(scenario())
    params = [answer["error"]["param"] for _, answer in answers]
    assert [status for status, _ in answers] == [400] * 5
    assert params == ["request_id", "prompt_tokens", "ttl_s", "ttl_s", "decode_cached_tokens"]


def test_a_tensor_parallel_decode_worker_holds_prefixes_exactly(model: MoEDecoder) -> None:
    """The decode worker over two ranks: the held blocks are rank 0's tables, which its
    follower adopts with the request; the tail lands after them on every rank."""
    expected = [generate_greedy(model, prompt, 12) for prompt in QUESTIONS]

    async def scenario() -> tuple[list[list[int]], float]:
        async with plane("PD", tensor_parallel={"decode": 2}) as p:
            (decode_url,) = p.workers["decode"]
            decode = p.servers[decode_url]
            assert isinstance(decode, DecodeServer)
            tokens = [await completion_tokens(p, prompt, 12) for prompt in QUESTIONS]
            hits = decode.metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", LABELS)
            return tokens, hits or 0.0

    tokens, hits = run(scenario())
    assert tokens == expected and hits == 96.0
