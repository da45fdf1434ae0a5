"""Task-homogeneous batches: every mini-batch comes from ONE task, so in-batch negatives stay meaningful.

Mixing a text->image query with text->text passages in one batch would make the other passages trivial
negatives; :class:`TaskBatchSampler` groups indices by task key, shuffles within tasks, and interleaves
the tasks' batches in a seeded order.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .data import ContrastiveDataset, MBEIRDataset, NegativeSource, TextRetrievalData

if TYPE_CHECKING:
    from .arguments import TrainArguments

__all__ = ["TaskBatchSampler", "training_data"]

logger = logging.getLogger(__name__)


class TaskBatchSampler:
    """Batch sampler (``DataLoader(dataset, batch_sampler=...)``) whose batches each hold one task.

    Per epoch, each task's examples are shuffled and ``round(ratio * n_task)`` of them are used: a ratio
    of 1 uses every example once, 0.5 a different half each epoch, 2 every example twice (two
    permutations back to back; an example can then appear twice in the batch that straddles them), 0
    drops the task. The tasks' batches are then put in a seeded random order. Everything is a function
    of ``(seed, epoch)`` only: call :meth:`set_epoch` at the start of each epoch.

    Distributed training: a *global* batch of ``batch_size * world_size`` indices is drawn from one task
    and rank ``r`` gets its ``r``-th slice, so at every step all ranks work on the same task (needed
    when embeddings are all-gathered for in-batch negatives), no index is given to two ranks within an
    epoch (for ratios <= 1), and all ranks see the same number of steps.

    ``drop_last``: with ``True`` (the default, and what contrastive training wants), a task's last,
    incomplete global batch is dropped (a different tail each epoch, since tasks are reshuffled). With
    ``False`` it is kept and split as evenly as possible across ranks (per-rank batches then differ in
    size by at most one); a tail smaller than ``world_size`` is still dropped, as some rank would get
    nothing.

    :func:`mmembed_rag.finetune.train.train` wants GLOBAL batches and slices them per process itself: give
    it this sampler with ``rank=0, world_size=1`` and ``batch_size`` the global batch. Likewise with an
    accelerate-prepared DataLoader, either leave rank/world_size at 0/1 and let accelerate split each
    batch (``DataLoaderConfiguration(split_batches=True)``), or pass ``rank``/``world_size`` here and keep
    accelerate from re-sharding the loader.

    Args:
        tasks: the task key of every example, by dataset index (e.g. ``ContrastiveDataset.tasks``).
        batch_size: indices per batch on this rank.
        ratios: task key -> epoch share (default 1.0 for tasks not named). Unknown keys are an error.
        seed: base seed.
        drop_last: see above.
        rank: this process's rank.
        world_size: number of processes.

    Raises:
        ValueError: bad sizes or ranks, negative or non-finite ratios, ratio keys that are no task, or no
            batch at all.

    Example:
        >>> sampler = TaskBatchSampler(data.tasks, 32, ratios={"mscoco_t2i": 1.0, "text": 0.5}, seed=0)
        >>> loader = DataLoader(data, batch_sampler=sampler, collate_fn=list)
        >>> for epoch in range(3):
        ...     sampler.set_epoch(epoch); data.set_epoch(epoch)
        ...     for batch in loader: ...
    """

    def __init__(self, tasks: Sequence[str], batch_size: int, *, ratios: Mapping[str, float] | None = None,
                 seed: int = 0, drop_last: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        groups: dict[str, list[int]] = {}
        for index, task in enumerate(tasks):
            groups.setdefault(task, []).append(index)
        self.groups = {task: np.asarray(groups[task], dtype=np.int64) for task in sorted(groups)}
        ratios = dict(ratios or {})
        unknown = sorted(set(ratios) - set(self.groups))
        if unknown:
            raise ValueError(f"ratios name unknown task(s) {unknown}; tasks are {sorted(self.groups)}")
        bad = {task: r for task, r in ratios.items() if not (math.isfinite(r) and r >= 0)}
        if bad:
            raise ValueError(f"ratios must be finite and >= 0, got {bad}")
        self.ratios = {task: float(ratios.get(task, 1.0)) for task in self.groups}
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        if len(self) == 0:
            raise ValueError(f"no batch of {batch_size} x {world_size} fits the data: per-task sizes "
                             f"{ {t: len(g) for t, g in self.groups.items()} }, ratios {self.ratios}")
        logger.info("task batches per epoch: %s", self.batches_per_task())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches :meth:`__iter__` yields."""
        self.epoch = epoch

    def _draws(self, task: str) -> int:
        return round(self.ratios[task] * len(self.groups[task]))

    def _keeps_tail(self, tail: int) -> bool:
        return not self.drop_last and tail >= self.world_size

    def batches_per_task(self) -> dict[str, int]:
        """Global batches each task contributes per epoch (the same every epoch)."""
        size = self.batch_size * self.world_size
        return {task: self._draws(task) // size + int(self._keeps_tail(self._draws(task) % size))
                for task in self.groups}

    def global_batches(self, epoch: int | None = None) -> list[tuple[str, np.ndarray]]:
        """All ranks' batches of an epoch, in order: ``(task, indices)`` with up to ``batch_size * world_size``."""
        epoch = self.epoch if epoch is None else epoch
        streams = np.random.SeedSequence([self.seed, epoch]).spawn(len(self.groups) + 1)
        size = self.batch_size * self.world_size
        batches: list[tuple[str, np.ndarray]] = []
        for (task, indices), stream in zip(self.groups.items(), streams, strict=False):
            rng, draws = np.random.default_rng(stream), self._draws(task)
            if draws == 0:
                continue
            rounds = -(-draws // len(indices))
            order = np.concatenate([rng.permutation(indices) for _ in range(rounds)])[:draws]
            for start in range(0, draws, size):
                chunk = order[start:start + size]
                if len(chunk) == size or self._keeps_tail(len(chunk)):
                    batches.append((task, chunk))
        order = np.random.default_rng(streams[-1]).permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        for _, chunk in self.global_batches():
            if len(chunk) == self.batch_size * self.world_size:
                part = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            else:
                part = np.array_split(chunk, self.world_size)[self.rank]
            yield part.tolist()

    def __len__(self) -> int:
        return sum(self.batches_per_task().values())


def training_data(args: TrainArguments, *, queries: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  pool: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  instructions: str | os.PathLike | None = None, image_root: str | os.PathLike | None = None,
                  text: str | os.PathLike | None = None, text_task: str = "text",
                  negatives: NegativeSource = "auto", drop_last: bool = True) -> tuple[ContrastiveDataset,
                                                                                      TaskBatchSampler]:
    """The training CLI's ``data_factory``: M-BEIR and/or text data, one task per batch.

    ``--data_factory mmembed_rag.finetune.sampler:training_data`` with ``data_options`` naming the files.
    Uses ``args.seed``, ``args.batch_size`` (the global batch), ``args.task_mixing`` (the ratios) and
    ``args.num_negatives`` (negatives drawn per example; ``None`` draws 1).

    Args:
        args: the training arguments.
        queries, pool, instructions, image_root: M-BEIR files (see :meth:`MBEIRDataset.load`).
        text: a text retrieval jsonl (see :meth:`TextRetrievalData.load`), its examples tagged ``text_task``.
        negatives: where negatives come from (see :meth:`MBEIRDataset.example`).
        drop_last: see :class:`TaskBatchSampler`.

    Raises:
        ValueError: neither M-BEIR nor text data given, or only one of ``queries``/``pool``.
        DataError: the data does not validate.
    """
    if (queries is None) != (pool is None) or (queries is None and text is None):
        raise ValueError("give M-BEIR queries and pool, a text retrieval file, or both")
    sources: list[MBEIRDataset | TextRetrievalData] = []
    if queries is not None and pool is not None:
        sources.append(MBEIRDataset.load(queries, pool, instructions=instructions, image_root=image_root))
    if text is not None:
        sources.append(TextRetrievalData.load(text, task=text_task))
    num_negatives = 1 if args.num_negatives is None else args.num_negatives
    dataset = ContrastiveDataset(sources, seed=args.seed, num_negatives=num_negatives, negatives=negatives)
    sampler = TaskBatchSampler(dataset.tasks, args.batch_size, ratios=args.task_mixing, seed=args.seed,
                               drop_last=drop_last)
    return dataset, sampler
