"""Expert parallelism with DeepEP's semantics: layout, dispatch, combine.

Experts are split contiguously over ranks (rank ``r`` owns ``[r*E/R, (r+1)*E/R)``). A token
goes to every rank that owns one of its top-k experts, once per rank however many of its
experts live there; the receiver sees the token's top-k with *local* expert ids (-1 where the
expert is elsewhere, weight 0 there) and runs its experts; ``combine`` sends each received
row back to its source and sums the contributions per token. That is DeepEP's legacy
``Buffer`` contract, so a model written against it runs here, and this is the reference for
a GPU kernel implementation later.

Received rows are ordered by source rank, then by token index at the source (DeepEP's order
as well), and contributions are summed in rank order, so the result is the same whether the
ranks are processes (``DistributedEPGroup`` over ``torch.distributed``: gloo on CPU, NCCL
across GPUs) or live in one process (``LocalEPGroups``: several ranks on one GPU, where NCCL
refuses two ranks per device, or in tests). Both modes run the same routing and assembly
functions; only the exchange differs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _check_topk(topk_idx: torch.Tensor, num_experts: int) -> None:
    if topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
        raise ValueError(
            f"topk_idx must be int64 [tokens, k], not {topk_idx.dtype} {tuple(topk_idx.shape)}"
        )
    if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= num_experts):
        raise ValueError(f"topk_idx holds expert ids outside -1..{num_experts - 1}")


def _experts_per_rank(num_experts: int, num_ranks: int) -> int:
    if num_ranks < 1 or num_experts % num_ranks:
        raise ValueError(f"{num_experts} experts do not split evenly over {num_ranks} ranks")
    return num_experts // num_ranks


def get_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E], is_token_in_rank
    bool [T, R])`` for ``topk_idx`` int64 ``[T, k]`` (-1: no expert in that slot).

    A token counts once per rank even with several experts there; per expert, every slot
    that names it counts (as in DeepEP's kernel).
    """
    _check_topk(topk_idx, num_experts)
    per_rank = _experts_per_rank(num_experts, num_ranks)
    valid = topk_idx >= 0
    experts = topk_idx[valid]
    num_tokens_per_expert = torch.bincount(experts, minlength=num_experts).to(torch.int32)
    is_token_in_rank = torch.zeros(
        topk_idx.shape[0], num_ranks, dtype=torch.bool, device=topk_idx.device
    )
    tokens = torch.arange(topk_idx.shape[0], device=topk_idx.device)
    tokens = tokens.unsqueeze(1).expand_as(topk_idx)[valid]
    is_token_in_rank[tokens, experts // per_rank] = True
    num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


class EPGroup(Protocol):
    """The collectives dispatch and combine need, for one rank of the group."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order."""
        ...

    def all_to_all(
        self, chunks: Sequence[torch.Tensor], recv_rows: Sequence[int]
    ) -> list[torch.Tensor]:
        """Send ``chunks[r]`` to rank ``r``; return the chunk from each rank (``recv_rows[s]``
        rows from rank ``s``). Chunks share dtype and trailing dimensions on all ranks."""
        ...


class DistributedEPGroup:
    """An ``EPGroup`` over a ``torch.distributed`` process group (the default one if None).

    Uses ``all_to_all_single`` where the backend has it and pairs of ``isend``/``irecv``
    otherwise (``use_all_to_all`` forces one or the other; None: try, then fall back).
    Tensors must live where the backend wants them: CPU for gloo, the rank's GPU for NCCL.
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, *, use_all_to_all: bool | None = None
    ) -> None:
        self.group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        self._use_all_to_all = use_all_to_all

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        gathered = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(gathered, tensor.contiguous(), group=self.group)
        return gathered

    def all_to_all(
        self, chunks: Sequence[torch.Tensor], recv_rows: Sequence[int]
    ) -> list[torch.Tensor]:
        if len(chunks) != self._world_size or len(recv_rows) != self._world_size:
            raise ValueError(
                f"all_to_all needs one chunk and one count per rank ({self._world_size})"
            )
        dtype = chunks[self._rank].dtype
        if dtype.itemsize == 1 and dtype not in (torch.uint8, torch.int8):
            # Collectives lack FP8 (gloo: "Invalid scalar type"); bytes are bytes.
            raw = self.all_to_all([c.view(torch.uint8) for c in chunks], recv_rows)
            return [r.view(dtype) for r in raw]
        mine = chunks[self._rank]
        if self._use_all_to_all is not False:
            try:
                return self._all_to_all_single(chunks, recv_rows)
            except (RuntimeError, NotImplementedError) as e:
                # Only a backend without the collective falls back; it fails on every rank
                # before any byte moves, so the ranks stay in step.
                if self._use_all_to_all or "support" not in str(e).lower():
                    raise
                log.info("all_to_all_single unavailable (%s): isend/irecv pairs instead", e)
                self._use_all_to_all = False
        recv = [
            torch.empty((n, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
            for n in recv_rows
        ]
        self._point_to_point(chunks, recv)
        return recv

    def _all_to_all_single(
        self, chunks: Sequence[torch.Tensor], recv_rows: Sequence[int]
    ) -> list[torch.Tensor]:
        mine = chunks[self._rank]
        output = torch.empty(
            (sum(recv_rows), *mine.shape[1:]), dtype=mine.dtype, device=mine.device
        )
        dist.all_to_all_single(
            output,
            torch.cat(list(chunks)),
            output_split_sizes=list(recv_rows),
            input_split_sizes=[int(c.shape[0]) for c in chunks],
            group=self.group,
        )
        return list(torch.split(output, list(recv_rows)))

    def _point_to_point(self, chunks: Sequence[torch.Tensor], recv: list[torch.Tensor]) -> None:
        works = []
        for peer in range(self._world_size):
            if peer == self._rank:
                recv[peer].copy_(chunks[peer])
                continue
            global_peer = peer if self.group is None else dist.get_global_rank(self.group, peer)
            # Both ends know every size beforehand, so empty messages are simply skipped.
            if chunks[peer].numel():
                works.append(dist.isend(chunks[peer].contiguous(), global_peer, group=self.group))
            if recv[peer].numel():
                works.append(dist.irecv(recv[peer], global_peer, group=self.group))
        for work in works:
            if work is not None:
                work.wait()


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs to send expert outputs back where their tokens came from."""

    num_tokens: int  # tokens at this (source) rank
    send_token_idx: list[torch.Tensor]  # per destination rank: our token indices sent there
    recv_counts: list[int]  # per source rank: rows received from it, in recv order
    num_tokens_matrix: torch.Tensor  # [R, R]: tokens sent from rank s to rank r
    is_token_in_rank: torch.Tensor  # [T, R] of this rank's tokens

    @property
    def rank_prefix_matrix(self) -> torch.Tensor:
        """DeepEP's: tokens sent to rank ``r`` by ranks ``0..s`` (cumulative over sources)."""
        return self.num_tokens_matrix.cumsum(dim=0)


class DispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: list[int]
    handle: DispatchHandle


@dataclass(frozen=True)
class _Routed:
    """One source rank's tokens split by destination rank, topk already local there."""

    num_tokens_per_rank: torch.Tensor
    is_token_in_rank: torch.Tensor
    token_idx: list[torch.Tensor]
    x: list[torch.Tensor]
    topk_idx: list[torch.Tensor]
    topk_weights: list[torch.Tensor]


def _route(
    x: torch.Tensor,
    *,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    hidden: int,
) -> _Routed:
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [tokens, {hidden}], not {tuple(x.shape)}")
    if topk_idx.shape[0] != x.shape[0] or topk_weights.shape != topk_idx.shape:
        raise ValueError(
            f"x {tuple(x.shape)}, topk_idx {tuple(topk_idx.shape)} and topk_weights "
            f"{tuple(topk_weights.shape)} disagree on tokens or k"
        )
    num_tokens_per_rank, _, is_token_in_rank = get_dispatch_layout(topk_idx, num_experts, num_ranks)
    per_rank = num_experts // num_ranks
    routed = _Routed(num_tokens_per_rank, is_token_in_rank, [], [], [], [])
    for rank in range(num_ranks):
        tokens = is_token_in_rank[:, rank].nonzero().squeeze(1)  # ascending token order
        idx = topk_idx[tokens]
        local = (idx >= rank * per_rank) & (idx < (rank + 1) * per_rank)
        routed.token_idx.append(tokens)
        routed.x.append(x[tokens])
        routed.topk_idx.append((idx - rank * per_rank).masked_fill(~local, -1))
        routed.topk_weights.append(topk_weights[tokens].masked_fill(~local, 0))
    return routed


def _assemble(
    routed: _Routed,
    *,
    num_tokens_matrix: torch.Tensor,
    rank: int,
    recv_x: list[torch.Tensor],
    recv_idx: list[torch.Tensor],
    recv_weights: list[torch.Tensor],
    experts_per_rank: int,
) -> DispatchResult:
    topk_idx = torch.cat(recv_idx)
    counts = torch.bincount(topk_idx[topk_idx >= 0], minlength=experts_per_rank)
    handle = DispatchHandle(
        num_tokens=int(routed.is_token_in_rank.shape[0]),
        send_token_idx=routed.token_idx,
        recv_counts=[int(n) for n in num_tokens_matrix[:, rank].tolist()],
        num_tokens_matrix=num_tokens_matrix,
        is_token_in_rank=routed.is_token_in_rank,
    )
    return DispatchResult(
        torch.cat(recv_x), topk_idx, torch.cat(recv_weights), counts.tolist(), handle
    )


def _split_back(x: torch.Tensor, handle: DispatchHandle, hidden: int) -> list[torch.Tensor]:
    if x.dim() != 2 or x.shape[0] != sum(handle.recv_counts) or x.shape[1] != hidden:
        raise ValueError(
            f"combine needs the {sum(handle.recv_counts)} received rows of width {hidden}, "
            f"got {tuple(x.shape)}"
        )
    return list(torch.split(x, handle.recv_counts))


def _sum_back(
    returned: Sequence[torch.Tensor], handle: DispatchHandle, like: torch.Tensor
) -> torch.Tensor:
    # Half-precision inputs accumulate in fp32, as DeepEP's combine does.
    accumulate = torch.float32 if like.element_size() < 4 else like.dtype
    out = torch.zeros((handle.num_tokens, like.shape[1]), dtype=accumulate, device=like.device)
    for tokens, rows in zip(handle.send_token_idx, returned, strict=True):
        out.index_add_(0, tokens, rows.to(accumulate))
    return out.to(like.dtype)


class EPBuffer:
    """Dispatch and combine for one rank of an ``EPGroup`` (every rank calls both)."""

    def __init__(self, group: EPGroup, num_experts: int, hidden: int) -> None:
        self.group = group
        self.num_experts = num_experts
        self.hidden = hidden
        self.experts_per_rank = _experts_per_rank(num_experts, group.world_size)

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> DispatchResult:
        """Send each token to the ranks of its experts: ``(recv_x, recv_topk_idx (local ids,
        -1 elsewhere), recv_topk_weights (0 elsewhere), tokens per local expert, handle)``."""
        world = self.group.world_size
        routed = _route(
            x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_experts=self.num_experts,
            num_ranks=world,
            hidden=self.hidden,
        )
        matrix = torch.stack(self.group.all_gather(routed.num_tokens_per_rank)).cpu()
        recv_rows = [int(n) for n in matrix[:, self.group.rank].tolist()]
        recv_x = self.group.all_to_all(routed.x, recv_rows)
        recv_idx = self.group.all_to_all(routed.topk_idx, recv_rows)
        recv_weights = self.group.all_to_all(routed.topk_weights, recv_rows)
        return _assemble(
            routed,
            num_tokens_matrix=matrix,
            rank=self.group.rank,
            recv_x=recv_x,
            recv_idx=recv_idx,
            recv_weights=recv_weights,
            experts_per_rank=self.experts_per_rank,
        )

    def combine(self, x: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Return expert outputs (rows as received, already weighted) to their source
        tokens and sum them: ``[num_tokens, hidden]`` at each source rank."""
        back = _split_back(x, handle, self.hidden)
        returned = self.group.all_to_all(back, [len(t) for t in handle.send_token_idx])
        return _sum_back(returned, handle, x)


class LocalEPGroups:
    """``world_size`` ranks in one process: the exchange is a transposition of chunk lists.

    For several EP ranks on one GPU (NCCL refuses two ranks per device) and for tests; each
    collective takes every rank's input at once.
    """

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError("an EP group needs at least one rank")
        self.world_size = world_size

    def all_gather(self, tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        self.check_per_rank(tensors)
        return [list(tensors) for _ in range(self.world_size)]

    def all_to_all(self, chunks: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """``chunks[s][r]`` (from rank s to rank r) -> ``received[r][s]``."""
        self.check_per_rank(chunks)
        return [[chunks[s][r] for s in range(self.world_size)] for r in range(self.world_size)]

    def check_per_rank(self, per_rank: Sequence[object]) -> None:
        if len(per_rank) != self.world_size:
            raise ValueError(f"need one input per rank ({self.world_size}), got {len(per_rank)}")


class LocalEPBuffer:
    """``EPBuffer`` for all ranks of a ``LocalEPGroups`` at once: lists in, lists out, and
    rank ``r``'s results equal what ``EPBuffer`` returns at rank ``r`` of a distributed group.
    """

    def __init__(self, groups: LocalEPGroups, num_experts: int, hidden: int) -> None:
        self.groups = groups
        self.num_experts = num_experts
        self.hidden = hidden
        self.experts_per_rank = _experts_per_rank(num_experts, groups.world_size)

    def dispatch(
        self,
        xs: Sequence[torch.Tensor],
        topk_idx: Sequence[torch.Tensor],
        topk_weights: Sequence[torch.Tensor],
    ) -> list[DispatchResult]:
        world = self.groups.world_size
        routed = [
            _route(
                x,
                topk_idx=i,
                topk_weights=w,
                num_experts=self.num_experts,
                num_ranks=world,
                hidden=self.hidden,
            )
            for x, i, w in zip(xs, topk_idx, topk_weights, strict=True)
        ]
        self.groups.check_per_rank(routed)
        matrix = torch.stack([r.num_tokens_per_rank.cpu() for r in routed])
        recv_x = self.groups.all_to_all([r.x for r in routed])
        recv_idx = self.groups.all_to_all([r.topk_idx for r in routed])
        recv_weights = self.groups.all_to_all([r.topk_weights for r in routed])
        return [
            _assemble(
                routed[rank],
                num_tokens_matrix=matrix,
                rank=rank,
                recv_x=recv_x[rank],
                recv_idx=recv_idx[rank],
                recv_weights=recv_weights[rank],
                experts_per_rank=self.experts_per_rank,
            )
            for rank in range(world)
        ]

    def combine(
        self, xs: Sequence[torch.Tensor], handles: Sequence[DispatchHandle]
    ) -> list[torch.Tensor]:
        back = [_split_back(x, h, self.hidden) for x, h in zip(xs, handles, strict=True)]
        returned = self.groups.all_to_all(back)
        return [
            _sum_back(returned[rank], handles[rank], xs[rank])
            for rank in range(self.groups.world_size)
        ]
