"""The one result type every ranking call returns (store search, reranking, adapters' translations)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .items import MultimodalItem

__all__ = ["RankedItem"]


@dataclass(frozen=True)
class RankedItem:
    """One ranked candidate.

    Attributes:
        index: position of the candidate in the list it was ranked from (the candidates given to a
            reranker; for a store search, the rank in the result list).
        score: higher is better (cosine similarity for retrieval, P("True") for the reranker).
        item: the candidate itself.
        id: the store id, when the candidate came from a store.
        metadata: the store metadata, when any.
    """

    index: int
    score: float
    item: MultimodalItem
    id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
