"""Chroma distances to cosine similarity for unit vectors: the one conversion every reader of a store uses."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SPACES", "collection_space", "cosine_from_distance", "cosine_from_exp_distance"]

#: Chroma's distance spaces.
SPACES = ("l2", "cosine", "ip")


def collection_space(configuration: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None = None) -> str:
    """The distance space of a Chroma collection from its ``configuration_json`` (and legacy ``hnsw:space``).

    Chroma's default is ``"l2"`` (squared Euclidean).

    Raises:
        ValueError: the collection uses a space this library cannot convert.
    """
    configuration = configuration or {}
    index = configuration.get("hnsw") or configuration.get("spann") or {}
    space = index.get("space") or (metadata or {}).get("hnsw:space") or "l2"
    if space not in SPACES:
        raise ValueError(f"unsupported Chroma distance space {space!r}; expected one of {', '.join(SPACES)}")
    return space


def cosine_from_distance(distance: float, space: str) -> float:
    """Cosine similarity from a Chroma distance between unit vectors.

    ``cosine`` and ``ip`` distances are ``1 - cos``; Chroma's ``l2`` is squared, ``2 - 2 cos``.

    Raises:
        ValueError: an unknown space.

    Example:
        >>> cosine_from_distance(0.5, "l2")
        0.75
    """
    if space == "l2":
        return 1.0 - distance / 2.0
    if space in ("cosine", "ip"):
        return 1.0 - distance
    raise ValueError(f"unsupported Chroma distance space {space!r}; expected one of {', '.join(SPACES)}")


def cosine_from_exp_distance(similarity: float, space: str) -> float:
    """Cosine from LlamaIndex's ``ChromaVectorStore`` similarity, which reports ``exp(-distance)``."""
    return cosine_from_distance(-math.log(similarity), space)
