"""InfoNCE over in-batch and given negatives, with candidates gathered across processes.

Written once: the plain path (embed the whole batch, call the loss, backward) and the gradient-cached
path (:mod:`.gradcache`) call the same :class:`InfoNCELoss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["InfoNCELoss", "gather_with_grad"]


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` of a (n_r, d) shard per rank (n_r may differ) whose backward sums the gradient
    over ranks and hands each rank the slice of its own shard.

    Every rank's loss reads every rank's candidates, so the gradient of a shard is the sum of what all
    ranks' losses send it: all-reduce (sum), then slice. Gloo and NCCL both have all-reduce, unlike the
    reduce-scatter / all-to-all ``torch.distributed.nn.functional.all_gather`` needs.
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, counts: list[int]) -> torch.Tensor:  # type: ignore[override]
        padded = shard.new_zeros((max(counts), *shard.shape[1:]))
        padded[: shard.shape[0]] = shard
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        ctx.counts, ctx.rank = counts, dist.get_rank()
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(shard: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every process's ``shard`` (rank order); gradients flow back to the local shard.

    Args:
        shard: (n_local, d); ``n_local`` may differ between processes.

    Returns:
        The (sum of n_r, d) concatenation and the row offset of the local shard in it. Outside
        ``torch.distributed`` (or with one process) the shard itself and offset 0.
    """
    if not _distributed():
        return shard, 0
    size = torch.tensor([shard.shape[0]], device=shard.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    return _GatherWithGrad.apply(shard, counts), sum(counts[: dist.get_rank()])


class InfoNCELoss(nn.Module):
    """Contrastive loss: each query against its positive, every other positive in the (global) batch,
    and every given negative in the (global) batch.

    ``candidates`` is laid out ``[positives; negatives]``: rows ``0..b-1`` are the positives of the
    ``b`` queries in order, the rest are negatives in any order and number. Under
    ``torch.distributed`` the positives and the negatives of all processes are gathered (gradients
    flow back to the local rows), so every query also scores the other processes' candidates; each
    process's loss is its queries' mean weighted by its share of the global batch, so that
    data-parallel gradient averaging yields the gradient of the global mean, exactly as one process
    holding the whole batch would (and the processes' losses average to the global loss).

    Args:
        temperature: the scores ``q·c`` (cosine: embeddings are L2-normalised) are divided by it.
        gather_across_processes: gather candidates from every process when ``torch.distributed``
            runs with more than one process.

    Example:
        >>> loss_fn = InfoNCELoss(temperature=0.02)
        >>> loss = loss_fn(query_emb, torch.cat([positive_emb, negative_emb]))
    """

    def __init__(self, temperature: float = 0.02, gather_across_processes: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_across_processes = gather_across_processes

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Mean InfoNCE over the local queries.

        Args:
            queries: (b, d) query embeddings.
            candidates: (b + m, d): the b positives (aligned with ``queries``), then m negatives.

        Returns:
            Scalar loss.
        """
        b = queries.shape[0]
        if candidates.shape[0] < b:
            raise ValueError(f"{b} queries but only {candidates.shape[0]} candidates; the first b rows "
                             "of candidates must be the queries' positives")
        positives, negatives = candidates[:b], candidates[b:]
        offset, scale = 0, 1.0
        if self.gather_across_processes and _distributed():
            positives, offset = gather_with_grad(positives)
            negatives, _ = gather_with_grad(negatives)
            # Data parallelism averages gradients over processes; weighting each process's mean by its
            # share of the queries makes that average the global mean even when shares differ.
            scale = dist.get_world_size() * b / positives.shape[0]
        scores = queries @ torch.cat([positives, negatives]).T / self.temperature
        target = torch.arange(offset, offset + b, device=queries.device)
        return F.cross_entropy(scores.to(torch.promote_types(scores.dtype, torch.float32)), target) * scale

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_across_processes={self.gather_across_processes}"
