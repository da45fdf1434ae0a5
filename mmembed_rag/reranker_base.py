"""What every reranker family shares: item conversion, the ``score`` / ``rerank`` contract and its result type."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from .errors import InvalidItemError, NumericalError
from .items import MultimodalItem, to_item
from .results import RankedItem

__all__ = ["Reranker", "check_finite", "convert"]


class Reranker(ABC):
    """A pointwise reranker: a relevance probability per (query, candidate), the same results for every family."""

    model: torch.nn.Module

    def score(self, query: Any, candidates: Iterable[Any], batch_size: int = 16, show_progress: bool | None = None,
              template: Any = None, use_cache: bool = True, instruction: str | None = None) -> np.ndarray:
        """The relevance probability of each candidate given the query.

        Args:
            query: anything :func:`mmembed_rag.items.to_item` accepts (text, image, text+image).
            candidates: a list of the same.
            batch_size: candidates per forward pass (cached path).
            show_progress: tqdm bar; default on for 256 candidates or more.
            template: LLaVA-NeXT rerankers: the prompt template for this call (see :class:`MLLMReranker`).
            use_cache: share the query part's key/value cache (default); ``False`` runs the naive reference,
                each pair as one full sequence, one pair at a time.
            instruction: Qwen3-VL rerankers: the task instruction (default: the checkpoint family's own).

        Returns:
            float32 array (len(candidates),), in the given order.

        Raises:
            InvalidItemError: the query or a candidate (named by index) is invalid or does not fit.
            ImageLoadError: an image cannot be loaded (the message names the candidate index or the query).
            InvalidArgumentError: ``batch_size`` is not an int >= 1, or an option this family does not take.
            NumericalError: the model produced NaN/inf scores (named by candidate index).
        """
        query_item, items = self._items(query, candidates)
        return self._score(query_item, items, batch_size, show_progress, template, use_cache, instruction)

    def rerank(self, query: Any, candidates: Iterable[Any], top_n: int | None = None, batch_size: int = 16,
               show_progress: bool | None = None, template: Any = None,
               instruction: str | None = None) -> list[RankedItem]:
        """Candidates sorted by score, best first (ties keep the given order).

        Args:
            query, candidates, batch_size, show_progress, template, instruction: as in :meth:`score`.
            top_n: keep the best ``top_n`` (all when ``None`` or larger than the list).

        Returns:
            ``RankedItem(index, score, item)`` per kept candidate; ``index`` is its position in ``candidates``.

        Raises:
            ValueError: ``top_n`` < 1. Otherwise as :meth:`score`.
        """
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise ValueError(f"top_n must be a positive int or None, got {top_n!r}")
        query_item, items = self._items(query, candidates)
        scores = self._score(query_item, items, batch_size, show_progress, template, True, instruction)
        order = sorted(range(len(items)), key=lambda i: (-scores[i], i))[:top_n]
        return [RankedItem(index=i, score=float(scores[i]), item=items[i]) for i in order]

    @abstractmethod
    def _score(self, query: MultimodalItem, items: list[MultimodalItem], batch_size: int,
               show_progress: bool | None, template: Any, use_cache: bool, instruction: str | None) -> np.ndarray:
        """Scores of converted items (see :meth:`score`)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the model runs."""

    def _items(self, query: Any, candidates: Iterable[Any]) -> tuple[MultimodalItem, list[MultimodalItem]]:
        query_item = convert(query, "query", 0)
        single = isinstance(candidates, (str, bytes, bytearray, Mapping, MultimodalItem))
        if single or not isinstance(candidates, Iterable):
            raise InvalidItemError(f"candidates must be a list of items, got a single {type(candidates).__name__}")
        return query_item, [convert(obj, "candidate", i) for i, obj in enumerate(candidates)]


def convert(obj: Any, label: str, index: int) -> MultimodalItem:
    """``to_item`` with errors naming the query or the candidate's index."""
    try:
        return to_item(obj, index)
    except InvalidItemError as exc:
        message = str(exc).removeprefix(f"item {index}: ")
        name = "query" if label == "query" else f"candidate {index}"
        raise InvalidItemError(f"{name}: {message}") from exc


def check_finite(scores: np.ndarray) -> np.ndarray:
    """``scores``, or a NumericalError naming the candidates whose score is NaN/inf (broken weights or images)."""
    bad = np.flatnonzero(~np.isfinite(scores))  # one cheap pass over the whole call's scores
    if bad.size:
        shown = ", ".join(map(str, bad[:10].tolist())) + (f" (+{bad.size - 10} more)" if bad.size > 10 else "")
        raise NumericalError(f"candidate(s) {shown}: the reranker produced non-finite (NaN/inf) scores; the "
                             "checkpoint's weights or its image normalisation (preprocessor_config.json) are broken")
    return scores
