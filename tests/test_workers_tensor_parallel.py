"""Tensor parallelism: the weight slices, the shards' arithmetic, rank 0's block tables on the
other ranks, and workers of every topology over two real gloo processes.

A tensor-parallel output is the ranks' partial sums added by an all-reduce, so it equals the
whole model's to float32 rounding, not bit for bit; greedy tokens are the same (tested).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from kleave.workers.config import MODEL_PRESETS, ModelConfig
from kleave.workers.kv_cache import CacheFullError, PagedKVCache
from kleave.workers.model import MoEDecoder, generate_greedy
from kleave.workers.serve.engine import Engine
from kleave.workers.serve.forward import LocalForward, ModelThread
from kleave.workers.serve.metrics import WorkerMetrics
from kleave.workers.serve.ranks import RankArgs
from kleave.workers.serve.sampling import SamplingParams
from kleave.workers.serve.tensor_parallel import (
    TableSync,
    TensorParallelDecoder,
    TensorParallelError,
    adopt_tables,
    start_tensor_parallel,
)
from kleave.workers.tensor_parallel import (
    Shard,
    check_tensor_parallel,
    full_shape,
    join_heads,
    shard_tensor,
    split_heads,
)
from test_workers_serve import (
    CONFIG,
    PROMPTS,
    completion_tokens,
    generate_all,
    info,
    plane,
    post,
    run,
)

pytest_plugins = ("workers_fixtures",)  # the `model` and `reference` fixtures
DENSE = MODEL_PRESETS["tiny-dense"]


# ----- the slices ------------------------------------------------------------------------------
def test_a_size_that_does_not_divide_the_model_is_refused_naming_the_widths() -> None:
    check_tensor_parallel(CONFIG, 2)
    with pytest.raises(ValueError, match=r"--tensor-parallel 4 must divide .*num_kv_heads \(2\)"):
        check_tensor_parallel(CONFIG, 4)
    odd = ModelConfig(num_heads=6, num_kv_heads=6, intermediate_size=96, num_experts=0)
    with pytest.raises(ValueError, match=r"num_kv_heads \(6\), num_heads \(6\)"):
        check_tensor_parallel(odd, 4)


@pytest.mark.parametrize(
    "name",
    [
        "layers.0.attn.wq",
        "layers.0.attn.wo",
        "layers.1.ffn.gate_up",
        "layers.1.ffn.down",
        "layers.0.ffn.experts_gate_up",
        "layers.0.ffn.experts_down",
        "layers.0.ffn.shared_gate_up",
        "embedding",
        "layers.0.ffn.router",
    ],
)
def test_the_shards_of_a_parameter_put_together_are_the_parameter(name: str) -> None:
    shapes = {"experts_gate_up": (4, 8, 6), "experts_down": (4, 6, 4), "wo": (6, 8)}
    shape = shapes.get(name.rsplit(".", 1)[-1], (8, 6))
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    parts = [shard_tensor(name, whole, Shard(rank, 2)) for rank in range(2)]
    assert all(full_shape(name, tuple(p.shape), Shard(0, 2)) == shape for p in parts)
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("embedding", "router"):
        assert all(p is whole for p in parts)  # replicated
    elif leaf.endswith("gate_up"):  # each rank: its slice of the gate over its slice of up
        dim = 1 if leaf == "experts_gate_up" else 0
        gates = [p.chunk(2, dim=dim)[0] for p in parts]
        ups = [p.chunk(2, dim=dim)[1] for p in parts]
        assert torch.equal(torch.cat(gates + ups, dim=dim), whole)
    else:
        dim = 0 if leaf == "wq" else -1
        assert torch.equal(torch.cat(parts, dim=dim), whole)


def test_heads_split_and_join() -> None:
    kv = torch.randn(5, 4, 3)
    parts = split_heads(kv, 2)
    assert [tuple(p.shape) for p in parts] == [(5, 2, 3), (5, 2, 3)]
    assert torch.equal(join_heads(parts), kv)


def test_a_shard_holds_exactly_its_slices_of_the_whole_model(tmp_path: Path) -> None:
    whole = MoEDecoder(CONFIG, seed=4)
    path = tmp_path / "tiny.safetensors"
    whole.save_safetensors(path)
    for rank in range(2):
        drawn = MoEDecoder(CONFIG, seed=4, shard=Shard(rank, 2))
        loaded = MoEDecoder.from_safetensors(path, shard=Shard(rank, 2))
        wanted = {n: shard_tensor(n, t, Shard(rank, 2)) for n, t in whole.state_dict().items()}
        for name, tensor in drawn.state_dict().items():
            assert torch.equal(tensor, wanted[name]), name
            assert torch.equal(loaded.state_dict()[name], wanted[name]), name
    with pytest.raises(ValueError, match="save the whole model"):
        drawn.save_safetensors(tmp_path / "shard.safetensors")


class ThreadGroup:
    """An all-reduce between threads of this process: the shards' arithmetic without
    processes (the real group is tested below)."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world

    def reduce_for(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(partial: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = partial
            self.barrier.wait()
            total = torch.stack([s for s in self.slots if s is not None]).sum(dim=0)
            self.barrier.wait()
            return total

        return reduce


def on_threads(shards: list[MoEDecoder], fn: Callable[[MoEDecoder], Any]) -> list[Any]:
    results: list[Any] = [None] * len(shards)

    def body(rank: int) -> None:
        results[rank] = fn(shards[rank])

    threads = [threading.Thread(target=body, args=(r,)) for r in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.parametrize("config", [CONFIG, DENSE], ids=["moe", "dense"])
def test_shards_whose_partial_sums_are_added_compute_the_whole_model(config: ModelConfig) -> None:
    whole = MoEDecoder(config, seed=2)
    group = ThreadGroup(2)
    shards = [MoEDecoder(config, seed=2, shard=Shard(rank, 2)) for rank in range(2)]
    for rank, shard in enumerate(shards):
        shard.reduce = group.reduce_for(rank)
    tokens = torch.tensor(PROMPTS[2])
    logits, kv = whole.prefill(tokens)
    per_rank = on_threads(shards, lambda shard: shard.prefill(tokens))
    for shard_logits, _ in per_rank:
        torch.testing.assert_close(shard_logits, logits, rtol=0, atol=1e-5)
    for layer, (k, v) in enumerate(kv):  # each rank holds its K/V heads (layer 0 exactly)
        atol = 1e-5 if layer else 0.0
        for index, whole_kv in enumerate((k, v)):
            joined = join_heads([kvs[layer][index] for _, kvs in per_rank])
            torch.testing.assert_close(joined, whole_kv, rtol=0, atol=atol)


# ----- rank 0's block tables on the other ranks ------------------------------------------------
def test_followers_adopt_rank_0s_block_tables_through_every_allocation() -> None:
    """Random allocations, prefix sharing, growth and frees on the leader; after each sync the
    follower holds the same table for every sequence named, from only what changed."""
    leader = PagedKVCache(CONFIG, num_blocks=40, block_size=4, num_kv_heads=1)
    follower = PagedKVCache(CONFIG, num_blocks=40, block_size=4, num_kv_heads=1, follower=True)
    sync = TableSync()
    rng = random.Random(3)
    blocks_sent = 0
    for step in range(400):
        live = leader.seq_ids
        action = rng.random()
        try:
            if action < 0.3 or not live:
                tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
                seq = step
                leader.allocate_prefix(seq, tokens, len(tokens) + rng.randrange(4))
                leader.register(seq, tokens[: leader.length(seq)])
            elif action < 0.7:
                seq = rng.choice(live)
                leader.allocate(seq, len(leader.table_state(seq)[0]) * 4 + rng.randrange(1, 9))
            else:
                leader.free(rng.choice(live))
        except CacheFullError:
            pass
        named = rng.sample(leader.seq_ids, k=min(3, len(leader.seq_ids)))
        update = sync.update(leader, named)
        blocks_sent += sum(len(blocks) for _, _, blocks, _, _ in update["seqs"])
        adopt_tables(follower, update)
        for seq in named:
            assert follower.table_state(seq) == leader.table_state(seq)
        assert set(follower.seq_ids) <= set(leader.seq_ids) | set(named)
    assert set(follower.seq_ids) <= set(leader.seq_ids)  # freed sequences were dropped
    full_every_time = 400 * 3 * 3  # a rough bound of resending whole tables
    assert blocks_sent < full_every_time


def test_a_follower_never_takes_a_block_itself() -> None:
    follower = PagedKVCache(CONFIG, num_blocks=4, block_size=4, follower=True)
    with pytest.raises(RuntimeError, match="rank 0 allocates"):
        follower.allocate(0, 3)
    follower.adopt(0, [2], 0, [0] * CONFIG.num_layers, 0)
    follower.allocate(0, 3)  # within the adopted block: nothing to take
    with pytest.raises(RuntimeError, match="diverged"):
        follower.adopt(1, [3], 2, [0] * CONFIG.num_layers, 0)


# ----- two processes ---------------------------------------------------------------------------
def rank_args(**overrides: Any) -> RankArgs:
    fields: dict[str, Any] = {
        "rank": 0,
        "world": 2,
        "port": 0,
        "config": CONFIG.to_dict(),
        "seed": 0,
        "weights": None,
        "device": "cpu",
        "torch_threads": 1,
    }
    return RankArgs(**(fields | overrides))


def greedy_on(model: TensorParallelDecoder, prompt: list[int], count: int) -> list[int]:
    """generate_greedy's loop over a tensor-parallel model and its cache."""
    cache = model.cache
    assert cache is not None
    logits, kv = model.prefill(torch.tensor(prompt))
    for layer, (k, v) in enumerate(kv):
        cache.write(0, layer, 0, k, v)
    out = [int(logits.argmax())]
    while len(out) < count:
        position = len(prompt) + len(out) - 1
        step = model.decode_step(torch.tensor([out[-1]]), torch.tensor([position]), cache, [0])
        out.append(int(step[0].argmax()))
    cache.free(0)
    return out


def test_an_idle_group_keeps_its_ranks_past_the_op_timeout(
    model: MoEDecoder, reference: list[list[int]]
) -> None:
    """The other ranks wait for the next command on the control group (a week), not the
    collectives' timeout: a worker idle for longer than that still serves."""
    tp = start_tensor_parallel(rank_args(op_timeout_s=1.0, cache_blocks=16))
    try:
        assert greedy_on(tp, PROMPTS[0], 24) == reference[0]
        time.sleep(2.5)
        assert tp.failure is None
        assert greedy_on(tp, PROMPTS[1], 24) == reference[1]
    finally:
        tp.close()
    assert [child.returncode for child in tp.children] == [0]  # told to stop
    with pytest.raises(TensorParallelError, match="stopped"):
        tp.prefill(torch.tensor([1, 2]))


def test_what_fails_only_its_request_leaves_the_group_in_step(
    reference: list[list[int]],
) -> None:
    """A KV sender failing mid-prefill (its decode worker went away) is rank 0's alone: the
    command still runs to its end on every rank, the error reaches the caller, and the next
    request is exact. Input only rank 0 holds is checked before any rank starts."""
    tp = start_tensor_parallel(rank_args(cache_blocks=16))
    try:
        calls: list[int] = []

        def sender_gone(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            calls.append(layer)
            raise ConnectionResetError("decode peer went away")

        with pytest.raises(ConnectionResetError, match="went away"):
            tp.prefill(torch.tensor(PROMPTS[2]), on_layer=sender_gone)
        assert calls == [0]  # not called again once it failed
        bad_past = [(torch.zeros(3, 1, 16), torch.zeros(3, 1, 16))] * CONFIG.num_layers
        with pytest.raises(ValueError, match=r"K/V must be \[3, 2, 16\]"):
            tp.prefill(torch.tensor([1, 2]), bad_past)
        with pytest.raises(ValueError, match="activations must be"):
            tp.ffn(0, torch.zeros(2, 3))
        assert tp.failure is None
        assert greedy_on(tp, PROMPTS[2], 24) == reference[2]
    finally:
        tp.close()


def test_a_rank_that_never_joins_fails_the_start_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child rank that dies while the group forms (here: its Python cannot start) fails
    rank 0's start with the rank named, not after the rendezvous's ten minutes."""
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")  # read by the children only
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited with code \d+"):
        start_tensor_parallel(rank_args())
    assert time.monotonic() - started < 60


def test_the_engine_over_two_ranks_chunks_shares_prefixes_and_preempts_exactly(
    model: MoEDecoder,
) -> None:
    """Chunked prefill reads K/V back (gathered), shared prefix blocks and preemptions
    reshape rank 0's tables: every path the other ranks must follow, exact tokens."""
    system = list(range(1, 40))
    prompts = [system + [50 + i] * (3 + i) for i in range(4)]
    expected = [generate_greedy(model, prompt, 12) for prompt in prompts]
    tp = start_tensor_parallel(rank_args(cache_blocks=14, block_size=8))
    thread = ModelThread()
    metrics = WorkerMetrics("tiny", max_model_len=CONFIG.max_position)
    assert tp.cache is not None
    engine = Engine(
        LocalForward(tp, thread),
        tp.cache,
        thread,
        metrics,
        max_model_len=CONFIG.max_position,
        max_num_seqs=4,
        max_prefill_tokens=16,
        prefix_caching=True,
    )

    async def scenario() -> list[Any]:
        engine.start()
        try:
            params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=())
            return await generate_all(engine, prompts, params)
        finally:
            await engine.stop()

    try:
        results = run(scenario())
    finally:
        thread.close()
        tp.close()
    assert [tokens for tokens, _ in results] == expected
    labels = {"model_name": "tiny", "engine": "0"}
    assert (metrics.registry.get_sample_value("vllm:num_preemptions_total", labels) or 0) > 0
    assert (metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", labels) or 0) > 0


@pytest.mark.parametrize(
    ("topology", "tensor_parallel"),
    [
        ("Colocated", {"decode": 2}),
        ("PD", {"prefill": 2}),  # K/V gathered on the prefill side, whole on the decode side
        ("PD", {"decode": 2}),  # ... scattered by heads on the decode side
        ("PDAF", {"attention": 2, "ffn": 2}),
    ],
)
def test_every_topology_over_two_ranks_gives_generate_greedys_tokens(
    topology: str, tensor_parallel: dict[str, int], reference: list[list[int]]
) -> None:
    async def scenario() -> tuple[list[list[int]], dict[str, Any]]:
        async with plane(topology, tensor_parallel=tensor_parallel) as p:
            tokens = list(
                await asyncio.gather(*(completion_tokens(p, prompt, 24) for prompt in PROMPTS))
            )
            role = next(iter(tensor_parallel))
            url = p.workers["attention" if role == "attention" else role][0]
            return tokens, await info(p.session, url)

    tokens, worker = run(scenario())
    assert tokens == reference
    assert worker["tensor_parallel"]["size"] == len(worker["tensor_parallel"]["rank_pids"]) == 2
    whole = MoEDecoder(CONFIG, seed=0, part=worker["weights"]["part"])
    assert worker["weights"]["parameters"] < sum(p.numel() for p in whole.parameters())


def test_a_dead_rank_fails_requests_and_health_naming_it() -> None:
    async def scenario() -> None:
        async with plane("Colocated", tensor_parallel={"decode": 2}) as p:
            (url,) = p.workers["decode"]
            server = p.servers[url]
            model = getattr(server, "model", None)
            assert isinstance(model, TensorParallelDecoder)
            (child,) = model.children
            child.kill()
            child.wait()
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "temperature": 0}
            status, answer = await post(p.session, f"{p.router}/v1/completions", body)
            assert status in (502, 503), answer
            assert "rank 1" in answer["error"]["message"], answer
            for path, code in (("/readyz", 503), ("/healthz", 500)):
                async with p.session.get(f"{url}{path}") as response:
                    assert response.status == code
                    reason = (await response.json())["error"]["message"]
                    assert "rank 1" in reason and "restart" in reason, reason

    run(scenario())


# ----- the command line ------------------------------------------------------------------------
def serve_refusal(tmp_path: Path, *args: str) -> str:
    """`kleave workers serve ARGS` against a local tiny plan: its error line (exit 1)."""
    from click.testing import CliRunner

    from kleave.cli import main
    from kleave.workers.serve.plan import local_plan

    plan = tmp_path / "plan.json"
    urls = {"decode": ["http://127.0.0.1:1"]}
    document = local_plan(topology="Colocated", model="tiny", pools=urls, router_url="http://r")
    plan.write_text(json.dumps(document))
    result = CliRunner().invoke(
        main, ["workers", "serve", "--role", "decode", "--plan", str(plan), *args]
    )
    assert result.exit_code == 1, result.output
    return result.output


def test_serve_refuses_what_its_ranks_could_not_run_naming_the_setting(tmp_path: Path) -> None:
    assert "must divide the model's num_kv_heads (2)" in serve_refusal(
        tmp_path, "--tensor-parallel", "4"
    )
    assert "by width or by experts" in serve_refusal(
        tmp_path, "--tensor-parallel", "2", "--expert-parallel", "2"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_serve_on_a_gpu_it_cannot_see_fails_at_once_saying_why(tmp_path: Path) -> None:
    output = serve_refusal(tmp_path, "--device", "cuda", "--tensor-parallel", "2")
    assert "--device cuda: this process sees no CUDA device" in output


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_two_gpus_over_nccl_give_the_whole_models_tokens() -> None:
    """The NCCL path: rank r on cuda:r; the reference is the whole model on cuda:0."""
    whole = MoEDecoder(CONFIG, seed=0, device="cuda:0")
    expected = [generate_greedy(whole, prompt, 24) for prompt in PROMPTS]
    tp = start_tensor_parallel(rank_args(device="cuda", cache_blocks=16))
    try:
        assert [greedy_on(tp, prompt, 24) for prompt in PROMPTS] == expected
    finally:
        tp.close()
