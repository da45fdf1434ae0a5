"""Contrastive examples → model inputs, through the Encoder's own prompt and collate code.

One batch of ``b`` examples becomes the item list ``[queries; positives; negatives]`` (negatives
example by example), prompts built by ``encoder.query_prompts`` / ``encoder.document_prompts`` exactly as
:meth:`~mmembed_rag.Encoder.encode_queries` / ``encode_documents`` build them, and model inputs made by
:meth:`~mmembed_rag.Encoder.collate`: there is no second implementation of encoding. Items are sorted
by length and cut into a few chunks (one model call each, see :func:`plan_chunks`): never one call per
item, and each chunk runs its images through the vision tower in one call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmembed_rag.encoder import Batch, Encoder
from mmembed_rag.items import MultimodalItem

from .examples import ContrastiveExample

logger = logging.getLogger(__name__)

__all__ = ["ContrastiveBatch", "ContrastiveCollator", "plan_chunks"]


@dataclass
class ContrastiveBatch:
    """Model inputs of one contrastive batch.

    Attributes:
        chunks: model input batches; ``chunk.positions`` index the item list
            ``[queries (num_queries); positives (num_queries); negatives]``.
        num_queries: queries in the batch (= positives).
        num_items: items in all (queries, positives and negatives).
    """

    chunks: list[Batch]
    num_queries: int
    num_items: int

    def to(self, device: torch.device) -> ContrastiveBatch:
        return ContrastiveBatch([chunk.to(device) for chunk in self.chunks], self.num_queries, self.num_items)


class ContrastiveCollator:
    """Turns a list of :class:`ContrastiveExample` into a :class:`ContrastiveBatch`.

    Args:
        encoder: supplies prompts (tokenizer, max_length, EOS handling), image loading and collation.
        num_negatives: cap on the negatives used per example (the first ones the example lists);
            ``None`` uses all. Examples may carry different numbers.
        chunk_size: at most this many items per model call (gradient caching); ``None``: no cap.

    Example:
        >>> collator = ContrastiveCollator(encoder, num_negatives=1)
        >>> batch = collator(examples)  # batch.chunks[0] feeds MMEmbedModel.forward
    """

    def __init__(self, encoder: Encoder, num_negatives: int | None = None, chunk_size: int | None = None) -> None:
        if num_negatives is not None and num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.encoder = encoder
        self.num_negatives = num_negatives
        self.chunk_size = chunk_size

    def items(self, examples: Sequence[ContrastiveExample]) -> tuple[list[MultimodalItem], list]:
        """The item list ``[queries; positives; negatives]`` and its prompts."""
        if not examples:
            raise ValueError("cannot collate an empty batch")
        for i, ex in enumerate(examples):
            if not isinstance(ex, ContrastiveExample):
                raise TypeError(f"example {i}: expected ContrastiveExample, got {type(ex).__name__}")
        cap = self.num_negatives
        negatives = [neg for ex in examples for neg in (ex.negatives if cap is None else ex.negatives[:cap])]
        queries = [ex.query for ex in examples]
        docs = [ex.positive for ex in examples] + negatives
        return queries + docs, self.encoder.query_prompts(queries) + self.encoder.document_prompts(docs)

    def __call__(self, examples: Sequence[ContrastiveExample]) -> ContrastiveBatch:
        """Collate ``examples`` (images are loaded and preprocessed here)."""
        items, prompts = self.items(examples)
        truncated = sum(p.truncated for p in prompts)
        if truncated:
            logger.warning("%d item(s) in a training batch were truncated to max_length=%d",
                           truncated, self.encoder.max_length)
        lengths = [self.encoder.token_count(p) for p in prompts]
        chunks = [self.encoder.collate(items, prompts, group) for group in plan_chunks(lengths, self.chunk_size)]
        return ContrastiveBatch(chunks, len(examples), len(items))


def plan_chunks(lengths: Sequence[int], chunk_size: int | None = None) -> list[list[int]]:
    """Group item indices into model calls: longest first, at most ``chunk_size`` per call, and a new
    call whenever an item is at most half as long as its call's longest.

    Padding then never doubles an item's cost: a text negative is not padded to the length of an image
    item (hundreds of image tokens for the real model), at the price of a few calls per batch (about
    log2 of the longest/shortest ratio), each still batched, images in one vision call per chunk.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if not groups or len(groups[-1]) == chunk_size or 2 * lengths[i] <= lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(i)
    return groups
