"""The unit of contrastive training data: one query, its positive, and optional negatives, tagged by task."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmembed_rag.items import MultimodalItem

__all__ = ["ContrastiveExample"]


@dataclass(frozen=True)
class ContrastiveExample:
    """A training triple.

    Attributes:
        query: the query item; its ``instruction`` field carries the task instruction (sampled per example).
        positive: the positive candidate (a document item, never with an instruction).
        negatives: hard or random negatives (may be empty: in-batch negatives still apply).
        task: the task key batches are grouped by (e.g. ``"mscoco_t2i"`` or ``"text:msmarco"``).
        qid: the query id in the source data, for mining and evaluation bookkeeping.
    """

    query: MultimodalItem
    positive: MultimodalItem
    negatives: tuple[MultimodalItem, ...] = field(default_factory=tuple)
    task: str = "default"
    qid: str = ""
