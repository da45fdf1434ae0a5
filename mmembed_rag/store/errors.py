"""Errors raised by the Chroma store: all derive from MMEmbedError and ValueError."""

from __future__ import annotations

from mmembed_rag.errors import MMEmbedError

__all__ = ["StoreError", "DimensionMismatchError", "ModelMismatchError", "EmbeddingFunctionConfigError"]


class StoreError(MMEmbedError, ValueError):
    """A store operation was refused (bad ids, filters or arguments, or an unusable collection); nothing was written."""


class DimensionMismatchError(StoreError):
    """The model's embedding dimension differs from the vectors already stored in the collection."""


class ModelMismatchError(StoreError):
    """The collection was built with another model: its vectors live in another embedding space."""


class EmbeddingFunctionConfigError(StoreError):
    """A persisted ``mmembed`` embedding-function config is malformed or cannot be applied."""
