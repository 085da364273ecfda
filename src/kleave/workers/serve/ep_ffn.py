"""Expert parallelism inside an FFN worker: its experts split over several processes.

``kleave workers serve --role ffn --expert-parallel N`` holds a MoE model's experts on N ranks
(one process, and on GPUs one device, per rank) with DeepEP's semantics (``transport.ep``):
rank 0 is the worker the attention workers talk to, ranks 1..N-1 are processes it starts.
Every rank keeps the layers' norms and only its contiguous slice of the experts; rank 0 also
keeps the routers and the shared experts. Per layer call, rank 0 tells the other ranks which
layer (a two-number broadcast), normalises and routes its tokens, and all ranks run
``dispatch`` (each token to the ranks of its top-k experts), their experts over what they
received (``fused_moe`` with local ids), and ``combine`` (the weighted rows back to rank 0,
summed per token); rank 0 then adds the shared experts and the residual. Outputs match
``MoEDecoder.ffn`` to float32 rounding, not bit for bit: each rank's expert GEMMs run over a
different batch of rows, and with k > 2 the partial sums are added in another order (tested:
within 1e-5, and greedy tokens the same).

The ranks form one ``torch.distributed`` world (gloo on CPU, NCCL on GPUs) through a
``TCPStore`` that rank 0 hosts on the loopback interface (``ranks``). The layer numbers go
over a gloo group of their own whose timeout is a week, so ranks 1..N-1 wait for the next
call as long as the worker stays idle; the collectives of a call keep ``op_timeout_s``. A
rank whose peer dies gets an error from its next collective and exits; rank 0 then fails the
layer call, which the attention worker reports (it retries once on another FFN worker).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist

from kleave.workers.config import ModelConfig
from kleave.workers.kernels import fused_moe
from kleave.workers.model import MoEDecoder, _MoEFFN, load_decoder
from kleave.workers.serve.ranks import (
    CONTROL_TIMEOUT,
    FORM_TIMEOUT,
    RankArgs,
    backend_for,
    rank_device,
    run_rank,
    start_ranks,
)
from kleave.workers.transport.ep import DistributedEPGroup, EPBuffer

log = logging.getLogger(__name__)

STOP = -1  # the layer number of the broadcast that ends the other ranks' loop


def check_expert_parallel(config: ModelConfig, world: int) -> None:
    """Refuse a model EP cannot split, with the reason."""
    if config.num_experts == 0:
        raise ValueError("--expert-parallel needs a MoE model; this one's FFN is dense")
    if config.num_experts % world:
        raise ValueError(
            f"--expert-parallel {world} does not divide the model's {config.num_experts} experts"
        )


def keep_expert_shard(model: MoEDecoder, rank: int, world: int) -> None:
    """Drop the experts that live on other ranks (and, off rank 0, the routers' users: the
    shared experts), so each rank holds its slice only."""
    per_rank = model.config.num_experts // world
    for layer in range(model.config.num_layers):
        ffn = model._ffn(layer)
        assert isinstance(ffn, _MoEFFN)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        ffn.experts_gate_up = torch.nn.Parameter(ffn.experts_gate_up[mine].clone(), False)
        ffn.experts_down = torch.nn.Parameter(ffn.experts_down[mine].clone(), False)
        if rank != 0:
            ffn.shared_gate_up = None
            ffn.shared_down = None


class ExpertParallelFFN:
    """One rank's share of every MoE layer; rank 0's ``ffn`` is what the FFN server calls."""

    def __init__(self, model: MoEDecoder, rank: int, world: int, groups: tuple[Any, Any]) -> None:
        self.model = model
        self.rank = rank
        self.world = world
        # data: dispatch/combine (op timeout); control: the layer numbers (waits a week)
        data, self.control = groups
        config = model.config
        self.buffer = EPBuffer(DistributedEPGroup(data), config.num_experts, config.hidden_size)

    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Rank 0: ``h + FFN(norm(h))`` of one layer, the experts' part spread over the ranks."""
        assert self.rank == 0
        self._announce(layer, h.shape[0])
        return self._layer(layer, h)

    def stop(self) -> None:
        """Rank 0: end the other ranks' loops."""
        self._announce(STOP, 0)

    def _announce(self, layer: int, tokens: int) -> None:
        header = torch.tensor([layer, tokens], dtype=torch.int64)
        dist.broadcast(header, 0, group=self.control)

    def serve(self) -> None:
        """Ranks 1..N-1: follow rank 0's layer calls until it says stop (or dies)."""
        hidden = self.model.config.hidden_size
        while True:
            header = torch.empty(2, dtype=torch.int64)
            dist.broadcast(header, 0, group=self.control)
            layer = int(header[0])
            if layer == STOP:
                return
            nothing = torch.empty((0, hidden), dtype=self.model.dtype, device=self.model.device)
            self._layer(layer, nothing)

    def _layer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``MoEDecoder.ffn`` with its routed experts spread over the ranks; off rank 0 ``h``
        is empty (that rank's tokens all arrive through ``dispatch``) and so is the result."""
        return self.model.ffn(layer, h, experts=self._experts)

    def _experts(
        self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        ffn = self.model._ffn(layer)
        assert isinstance(ffn, _MoEFFN)
        sent = self.buffer.dispatch(x, ids, weights)
        # Slots whose expert lives elsewhere arrive as id -1 with weight 0: point them at a
        # local expert with weight 0, which adds exactly nothing.
        local_ids = sent.recv_topk_idx.clamp(min=0)
        local_weights = sent.recv_topk_weights.masked_fill(sent.recv_topk_idx < 0, 0.0)
        rows = fused_moe(
            sent.recv_x, ffn.experts_gate_up, ffn.experts_down, local_weights, local_ids
        )
        return self.buffer.combine(rows, sent.handle)


def init_world(args: RankArgs, device: str) -> tuple[Any, Any]:
    """Join the rank-0-hosted world on 127.0.0.1:port; -> (data group, control group).

    The world itself has the long formation timeout (ranks start slowly); the groups made
    from it carry the op and control timeouts."""
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1",
        args.port,
        args.world,
        args.rank == 0,
        timeout=FORM_TIMEOUT,
        wait_for_workers=False,
    )
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(
        backend_for(device),
        store=store,
        rank=args.rank,
        world_size=args.world,
        timeout=FORM_TIMEOUT,
    )
    data = dist.new_group(backend=backend_for(device), timeout=args.op_timeout)
    return data, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def start_expert_ranks(args: RankArgs) -> list[subprocess.Popen[bytes]]:
    """Rank 0 starts ranks 1..N-1 (they die with it: see ``serve``)."""
    return start_ranks("kleave.workers.serve.ep_ffn", args)


def build_rank(args: RankArgs) -> ExpertParallelFFN:
    """Build this rank's model shard and join the world (rank 0 too, after ``start_ranks``)."""
    config = ModelConfig.from_dict(args.config)
    check_expert_parallel(config, args.world)
    device = rank_device(args.device, args.rank)
    model = load_decoder(config, seed=args.seed, weights=args.weights, device=device, part="ffn")
    keep_expert_shard(model, args.rank, args.world)
    groups = init_world(args, device)
    return ExpertParallelFFN(model, args.rank, args.world, groups)


def follow(args: RankArgs) -> None:
    """Ranks 1..N-1: hold the slice of the experts, serve rank 0's layer calls until it stops."""
    try:
        with torch.inference_mode():
            build_rank(args).serve()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    return run_rank(argv, "ep", follow)


if __name__ == "__main__":
    sys.exit(main())
