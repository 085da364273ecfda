"""The prefill worker batching prompts: several prompts in one pass give each prompt's own
logits and K/V (to 1e-5, float32), each to its own sender; one failing sender fails only its
prompt; the queue takes prompts in order within its token and prompt limits; and PD through
the router still decodes generate_greedy's tokens when the prefills are batched.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")

from kleave.workers.config import MODEL_PRESETS
from kleave.workers.model import MoEDecoder, generate_greedy
from kleave.workers.prefix_cache import PrefixCache
from kleave.workers.serve.forward import ModelThread
from kleave.workers.serve.prefill_batch import PrefillBatcher, PrefillJob, prefill_jobs
from kleave.workers.serve.prefill_server import PrefillServer
from kleave.workers.tokenizer import BOS
from test_workers_serve import completion_tokens, plane, run

pytest_plugins = ("workers_fixtures",)  # the `model` and `reference` fixtures
CONFIG = MODEL_PRESETS["tiny"]
SYSTEM = [BOS, *b"You are kleave's test assistant; answer briefly."]


class RecordingSender:
    """Stands in for a KVSender's `send_layer` (the transfer itself is tested elsewhere)."""

    def __init__(self, fail_at_layer: int | None = None) -> None:
        self.layers: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.fail_at_layer = fail_at_layer

    def send_layer(self, request_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer == self.fail_at_layer:
            raise ConnectionResetError("the decode worker went away")
        self.layers[request_id, layer] = (k.clone(), v.clone())


def test_prompts_prefilled_together_match_each_alone(model: MoEDecoder) -> None:
    """Three prompts in one pass: one with a prefix-cache hit, one whose decode worker holds
    its first 16 tokens (skip), one short; each gets its own logits and K/V."""
    cache = PrefixCache(block_size=16, capacity_bytes=1 << 20)
    prompts = [SYSTEM + list(b"What is PD?"), [BOS, *range(1, 40)], [BOS, *b"hi"]]
    warm = RecordingSender()
    prefill_jobs(model, [PrefillJob("warm", SYSTEM + list(b"warm"), warm)], cache)
    senders = [RecordingSender() for _ in prompts]
    jobs = [
        PrefillJob(f"r{i}", prompt, sender, skip=16 if i == 1 else 0)
        for i, (prompt, sender) in enumerate(zip(prompts, senders, strict=True))
    ]
    prefill_jobs(model, jobs, cache)
    assert [job.cached for job in jobs] == [48, 0, 0]
    for job, sender, prompt in zip(jobs, senders, prompts, strict=True):
        logits, kv = model.prefill(torch.tensor(prompt))
        assert job.error is None and job.logits is not None
        torch.testing.assert_close(job.logits, logits, rtol=0, atol=1e-5)
        for layer, (k, v) in enumerate(kv):
            sent_k, sent_v = sender.layers[job.request_id, layer]
            torch.testing.assert_close(sent_k, k[job.skip :], rtol=0, atol=1e-5)
            torch.testing.assert_close(sent_v, v[job.skip :], rtol=0, atol=1e-5)


def test_a_failing_sender_fails_only_its_prompt(model: MoEDecoder) -> None:
    good, bad = RecordingSender(), RecordingSender(fail_at_layer=1)
    jobs = [PrefillJob("good", [BOS, *range(30)], good), PrefillJob("bad", [BOS, *range(20)], bad)]
    prefill_jobs(model, jobs, None)
    assert jobs[0].error is None and len(good.layers) == CONFIG.num_layers
    assert isinstance(jobs[1].error, ConnectionResetError)
    assert set(bad.layers) == {("bad", 0)}  # nothing after the failure


def test_the_queue_batches_in_order_within_its_limits() -> None:
    """While one batch runs, five prompts queue; the next batches take them in order, at
    most 100 new tokens (the first always fits) and 3 prompts each; a prompt cancelled
    while queued never runs."""

    async def scenario() -> list[list[str]]:
        thread = ModelThread()
        release = threading.Event()
        batches: list[list[str]] = []

        def compute(jobs: list[PrefillJob]) -> None:
            batches.append([job.request_id for job in jobs])
            release.wait(10)

        batcher = PrefillBatcher(thread, compute, max_tokens=100, max_jobs=3)
        batcher.start()
        try:
            sender: Any = RecordingSender()

            def job(name: str, tokens: int) -> PrefillJob:
                return PrefillJob(name, [1] * tokens, sender)

            first = asyncio.create_task(batcher.run(job("a", 10)))
            await asyncio.sleep(0.05)  # "a" runs alone, holding the model thread
            sizes = {"b": 30, "c": 30, "gone": 5, "d": 30, "e": 200, "f": 10}
            rest = {
                name: asyncio.create_task(batcher.run(job(name, n))) for name, n in sizes.items()
            }
            await asyncio.sleep(0.05)
            assert batcher.waiting == 6 and batcher.running == 1
            rest.pop("gone").cancel()
            await asyncio.sleep(0.01)
            assert batcher.waiting == 5
            release.set()
            await asyncio.gather(first, *rest.values())
            return batches
        finally:
            await batcher.stop()
            thread.close()

    assert run(scenario()) == [["a"], ["b", "c", "d"], ["e"], ["f"]]


@pytest.mark.parametrize("prefill_ranks", [1, 2])
def test_pd_with_batched_prefills_decodes_generate_greedys_tokens(
    model: MoEDecoder, prefill_ranks: int
) -> None:
    """Eight requests at once through PD: the prefill worker (one process, or a tensor
    parallel group of two, which batches prompt by prompt) runs them in fewer passes than
    prompts, and every request still decodes generate_greedy's tokens."""
    prompts = [[BOS, *range(1 + i, 30 + 3 * i)] for i in range(8)]
    expected = [generate_greedy(model, prompt, 8) for prompt in prompts]

    async def scenario() -> tuple[list[list[int]], int]:
        async with plane("PD", tensor_parallel={"prefill": prefill_ranks}) as p:
            (url,) = p.workers["prefill"]
            prefill = p.servers[url]
            assert isinstance(prefill, PrefillServer)
            tokens = await asyncio.gather(*(completion_tokens(p, q, 8) for q in prompts))
            return list(tokens), prefill.batcher.batches

    tokens, batches = run(scenario())
    assert tokens == expected
    assert batches < len(prompts)


def test_stopping_fails_the_batch_in_flight_and_refuses_new_prompts() -> None:
    async def scenario() -> None:
        thread = ModelThread()
        release = threading.Event()

        def compute(jobs: list[PrefillJob]) -> None:
            release.wait(10)

        batcher = PrefillBatcher(thread, compute, max_tokens=100, max_jobs=3)
        batcher.start()
        sender: Any = RecordingSender()
        running = asyncio.create_task(batcher.run(PrefillJob("a", [1] * 5, sender)))
        await asyncio.sleep(0.05)
        assert batcher.running == 1
        await batcher.stop()
        with pytest.raises(RuntimeError, match="shutting down"):
            await running
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.run(PrefillJob("b", [1] * 5, sender))
        release.set()
        thread.close()

    run(scenario())
