"""Data-parallel encoding for mining and evaluation: each process encodes a shard, every process gets all rows.

Under ``torchrun`` / ``accelerate launch`` the processes share a ``torch.distributed`` group (the live one, or
one joined from the launcher's environment by :func:`mmembed_rag.cli.distributed.join_processes`; gloo on
CPU). :func:`encode_sharded` gives each rank a share of the items, gathers the shards and puts the rows back
in the original order, so ranking, sampling and metrics then run identically on every rank, and
:meth:`DataParallel.on_main` lets rank 0 alone write files while the others wait.

Shards are whole batches of the Encoder's length-sorted order, dealt round-robin, when the item lengths are
known (:func:`encode_documents`, :func:`encode_queries`): every batch then holds the very items it holds in
one process, so the embeddings are bit-identical to a single-process run (padding a row into a different
batch moves it by ~1e-7, enough to flip a near-tie in a ranking). Without lengths the shards are contiguous.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["DataParallel", "data_parallel", "encode_documents", "encode_queries", "encode_sharded",
           "is_main_process", "shard_positions"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

GATHER_BYTES = 64 << 20  # rows sent per rank and round of all_gather: bounds the gather's extra memory


def _live_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """True unless a live process group says this is not rank 0 (joins nothing, so safe anywhere)."""
    return not _live_group() or torch.distributed.get_rank() == 0


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the processes that share the encoding (``world_size`` 1: alone).

    Attributes:
        rank: process index, 0 to ``world_size - 1``.
        world_size: processes in the ``torch.distributed`` group (1 without one).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        """True when several processes share the work (collectives run)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one process that writes files."""
        return self.rank == 0

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` alone); also a barrier."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (a no-op alone)."""
        if self.active:
            torch.distributed.barrier()

    def on_main(self, action: Callable[[], R], what: str) -> R | None:
        """Run ``action`` (a file write) on rank 0 only; every rank returns once it is done.

        The others wait for it (nobody reads a half-written file) and raise when it failed, instead of
        running on alone.

        Returns:
            ``action()``'s result on rank 0, ``None`` elsewhere.
        """
        if not self.active:
            return action()
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except Exception as exc:  # reported to the other ranks below, then re-raised
                error = exc
        failed = self.all_gather_object(None if error is None else repr(error))[0]
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(f"rank 0 failed to write {what}: {failed}")
        return result

    def gather_rows(self, rows: np.ndarray | None, positions: Sequence[np.ndarray], n: int) -> np.ndarray:
        """Every rank's ``rows`` (rank r's for items ``positions[r]``, ``None`` for none) as one (n, dim) array.

        Sent as zero-padded tensors in rounds of at most :data:`GATHER_BYTES` per rank, so the values arrive
        bit for bit; on the group's accelerator under NCCL.
        """
        counts = [len(p) for p in positions]
        if rows is not None and (rows.ndim != 2 or rows.shape[0] != counts[self.rank]):
            raise ValueError(f"rank {self.rank} encoded {rows.shape} for {counts[self.rank]} items")
        meta = self.all_gather_object(None if rows is None else (rows.shape[1], rows.dtype.str))
        kinds = {m for m in meta if m is not None}
        if len(kinds) != 1:
            raise ValueError(f"ranks returned embeddings of different widths or dtypes: {meta}")
        dim, dtype = kinds.pop()
        out = np.empty((n, dim), dtype=np.dtype(dtype))
        local = torch.from_numpy(np.ascontiguousarray(rows if rows is not None else out[:0]))
        backend = str(torch.distributed.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        step = max(1, GATHER_BYTES // max(1, dim * out.itemsize))
        for start in range(0, max(counts), step):
            size = min(step, max(counts) - start)
            piece = torch.zeros((size, dim), dtype=local.dtype, device=device)
            own = local[start:start + size]
            piece[:len(own)] = own.to(device)
            bucket = [torch.empty_like(piece) for _ in range(self.world_size)]
            torch.distributed.all_gather(bucket, piece)
            for rank, got in enumerate(bucket):
                take = min(size, counts[rank] - start)
                if take > 0:
                    out[positions[rank][start:start + take]] = got[:take].cpu().numpy()
        return out


def data_parallel(device: str | torch.device | None = None) -> DataParallel:
    """The live process group's rank and size; joins one from the launcher's environment when none is live.

    Joining is :func:`mmembed_rag.cli.distributed.join_processes` (accelerate's ``PartialState``, gloo on
    CPU). ``RANK``/``WORLD_SIZE`` without a rendezvous (no ``MASTER_ADDR``) give no group: each process then
    works alone.

    Args:
        device: the encoder's device; ``"cpu"`` makes a joined group use gloo.
    """
    if _live_group():
        return DataParallel(torch.distributed.get_rank(), torch.distributed.get_world_size())
    from mmembed_rag.cli.distributed import join_processes

    shard = join_processes(None if device is None else str(device))
    if shard.world_size > 1 and not shard.grouped:
        logger.warning("rank %d of %d has no process group to gather with: it encodes everything itself",
                       shard.rank, shard.world_size)
        return DataParallel()
    return DataParallel(shard.rank, shard.world_size)


def shard_positions(n: int, world_size: int, batch_size: int | None = None,
                    lengths: Sequence[int] | None = None) -> list[np.ndarray]:
    """Which items each rank encodes, in the order it should pass them.

    Args:
        n: number of items.
        world_size: number of ranks.
        batch_size: the encoding batch size (needed with ``lengths``).
        lengths: each item's token count. Given: the items sorted longest first (stable, as the Encoder
            sorts them) are cut into batches of ``batch_size``, dealt round-robin; a rank's items stay in
            that order, so its Encoder call forms the same batches. ``None``: contiguous near-equal shards.

    Returns:
        ``world_size`` int64 arrays of item positions, together a permutation of ``range(n)``.
    """
    if lengths is None:
        return list(np.array_split(np.arange(n, dtype=np.int64), world_size))
    if len(lengths) != n or batch_size is None or batch_size < 1:
        raise ValueError(f"need {n} lengths and batch_size >= 1, got {len(lengths)} and {batch_size}")
    order = sorted(range(n), key=lambda i: -lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [np.asarray([i for batch in batches[rank::world_size] for i in batch], dtype=np.int64)
            for rank in range(world_size)]


def encode_sharded(encode_fn: Callable[[list[T]], np.ndarray], items: Sequence[T], *, batch_size: int | None = None,
                   lengths_fn: Callable[[list[T]], Sequence[int]] | None = None, what: str = "items",
                   group: DataParallel | None = None) -> np.ndarray:
    """``encode_fn(items)``, computed by every rank of the group for its shard and gathered in item order.

    Every rank must call it with the same items. Alone (or with no item) it is just ``encode_fn(items)``.

    Args:
        encode_fn: items -> (len(items), dim) array; the same row for an item whatever else it is given with.
        items: what to encode.
        batch_size: ``encode_fn``'s batch size (used with ``lengths_fn``).
        lengths_fn: items -> the token count ``encode_fn`` sorts its batches by; the counts are computed
            sharded too, and the shards are then whole batches (see :func:`shard_positions`).
        what: a name for the log line.
        group: the processes (default :func:`data_parallel`).

    Returns:
        The (len(items), dim) embeddings, identical on every rank.
    """
    items = list(items)
    group = group if group is not None else data_parallel()
    if not group.active or not items:
        return encode_fn(items)
    lengths = None
    if lengths_fn is not None:
        part = np.array_split(np.arange(len(items)), group.world_size)[group.rank]
        counts = list(lengths_fn([items[i] for i in part])) if len(part) else []
        lengths = [c for share in group.all_gather_object(counts) for c in share]
    positions = shard_positions(len(items), group.world_size, batch_size, lengths)
    mine = positions[group.rank]
    logger.info("rank %d of %d encodes %d of %d %s (%s)", group.rank, group.world_size, len(mine), len(items), what,
                "whole length-sorted batches" if lengths is not None else "a contiguous shard")
    rows = encode_fn([items[i] for i in mine]) if len(mine) else None
    return group.gather_rows(None if rows is None else np.asarray(rows), positions, len(items))


def _encoder_device(encoder: Any) -> torch.device | None:
    return getattr(encoder, "device", None)


def _lengths(encoder: Any, prompts: Callable[[list[Any]], list[Any]] | None
             ) -> Callable[[list[Any]], list[int]] | None:
    """Token counts as the Encoder batches by, or ``None`` for a stand-in encoder without them."""
    if prompts is None or not hasattr(encoder, "token_count"):
        return None
    return lambda items: [encoder.token_count(p) for p in prompts(items)]


def encode_documents(encoder: Any, items: Sequence[Any], *, batch_size: int = 8, show_progress: bool | None = None,
                     what: str = "documents") -> np.ndarray:
    """``encoder.encode_documents(items)``, sharded over the process group (see :func:`encode_sharded`)."""
    group = data_parallel(_encoder_device(encoder))
    progress = show_progress if group.is_main else False
    return encode_sharded(lambda part: encoder.encode_documents(part, batch_size=batch_size, show_progress=progress),
                          items, batch_size=batch_size, what=what, group=group,
                          lengths_fn=_lengths(encoder, getattr(encoder, "document_prompts", None)))


def encode_queries(encoder: Any, items: Sequence[Any], *, batch_size: int = 8, show_progress: bool | None = None,
                   what: str = "queries") -> np.ndarray:
    """``encoder.encode_queries(items)`` (the items carry their instructions), sharded over the process group."""
    group = data_parallel(_encoder_device(encoder))
    progress = show_progress if group.is_main else False
    return encode_sharded(lambda part: encoder.encode_queries(part, batch_size=batch_size, show_progress=progress),
                          items, batch_size=batch_size, what=what, group=group,
                          lengths_fn=_lengths(encoder, getattr(encoder, "query_prompts", None)))
