"""Chroma storage for MM-Embed: an embedding function Chroma can persist, and a high-level collection.

Needs chromadb (``pip install "mmembed-rag[chroma]"``, also part of the llama-index and langchain
extras). Importing this package registers the ``"mmembed"`` embedding function
with Chroma, which a process must do before it queries a persisted collection by text or URI.
"""

from __future__ import annotations

from mmembed_rag.errors import MissingDependencyError

try:
    import chromadb  # noqa: F401
except ImportError as exc:  # the core installs without chromadb
    raise MissingDependencyError(
        'mmembed_rag.store needs chromadb: pip install "mmembed-rag[chroma]"') from exc

from .collection import MultimodalCollection, SearchResult, StoredItem  # noqa: E402
from .embedding_function import MMEmbedEmbeddingFunction, cached_encoder, clear_encoder_cache  # noqa: E402
from .errors import DimensionMismatchError, EmbeddingFunctionConfigError, ModelMismatchError, StoreError  # noqa: E402
from .records import MODALITIES  # noqa: E402

__all__ = [
    "MultimodalCollection",
    "MMEmbedEmbeddingFunction",
    "SearchResult",
    "StoredItem",
    "StoreError",
    "DimensionMismatchError",
    "ModelMismatchError",
    "EmbeddingFunctionConfigError",
    "MODALITIES",
    "cached_encoder",
    "clear_encoder_cache",
]
