"""The metadata keys the LangChain adapter reads and writes, shared by the retriever and the reranker."""

from __future__ import annotations

__all__ = ["IMAGE_KEY", "RELEVANCE_KEY", "RERANK_KEY", "SCORE_KEY"]

IMAGE_KEY = "image"
"""Metadata key holding a document's image reference (written by :meth:`MMEmbedRetriever.add_images`)."""
SCORE_KEY = "score"
"""Metadata key holding the cosine similarity of a retrieved document to the query."""
RELEVANCE_KEY = "relevance_score"
"""Metadata key holding :class:`MMEmbedReranker`'s final score (as LangChain's other rerankers name it)."""
RERANK_KEY = "rerank_score"
"""Metadata key holding the reranker's P("True"), before any combination with the retrieval score."""
