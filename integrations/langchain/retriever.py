"""Text, image and composed queries against a ``langchain_chroma.Chroma`` store, cosine scored, optionally reranked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import Field

from mmembed_rag.errors import MissingDependencyError
from mmembed_rag.images import ImageSource
from mmembed_rag.instructions import resolve_instruction

from ._common import IMAGE_KEY, SCORE_KEY
from .embeddings import MMEmbedEmbeddings
from .rerank import MMEmbedReranker

__all__ = ["MMEmbedRetriever"]


class MMEmbedRetriever(BaseRetriever):
    """Text, image and composed queries against a ``langchain_chroma.Chroma`` store filled by MM-Embed.

    ``invoke(query, image=None, instruction=None, k=None, filter=None)``: ``query`` is the text (``""`` for an
    image-only query). Each returned ``Document`` keeps its stored metadata (the image reference under
    ``"image"`` when added via :meth:`add_images`) plus the query's cosine similarity under ``"score"``.

    Args:
        vectorstore: the Chroma store (any distance space: ``l2``, ``cosine`` or ``ip``).
        k: default number of documents.
        instruction: default query instruction; overrides the embeddings' ``query_instruction``.
        embeddings: default ``vectorstore.embeddings``, which must then be :class:`MMEmbedEmbeddings`.
        reranker: an :class:`MMEmbedReranker` that reranks the ``k`` hits with the full query (text, image or
            both) and keeps its ``top_n``; it adds ``"relevance_score"`` and ``"rerank_score"``.

    Example:
        >>> retriever.invoke("", image="query.png", instruction="nights_i2i", k=2)
    """

    vectorstore: VectorStore
    k: int = Field(default=4, ge=1)
    instruction: str | None = None
    embeddings: MMEmbedEmbeddings | None = None
    reranker: MMEmbedReranker | None = None

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        try:
            from langchain_chroma import Chroma
        except ImportError as exc:
            raise MissingDependencyError('MMEmbedRetriever needs langchain-chroma; install it with: '
                                         'pip install "mmembed-rag[langchain]"') from exc
        if not isinstance(self.vectorstore, Chroma):
            raise TypeError(f"vectorstore must be a langchain_chroma.Chroma, got {type(self.vectorstore).__name__}")
        if self.embeddings is None:
            if not isinstance(self.vectorstore.embeddings, MMEmbedEmbeddings):
                raise TypeError("the vectorstore's embedding_function is "
                                f"{type(self.vectorstore.embeddings).__name__}, not MMEmbedEmbeddings; "
                                "pass embeddings=MMEmbedEmbeddings(...)")
            self.embeddings = self.vectorstore.embeddings
        resolve_instruction(self.instruction)

    def add_images(self, uris: Sequence[str | Path], metadatas: list[dict] | None = None,
                   ids: list[str] | None = None) -> list[str]:
        """``Chroma.add_images`` that also stores each uri under ``metadata["image"]``.

        Args:
            uris: local image files.
            metadatas: per-image metadata (a shorter list is padded with ``{}``, as upstream does).
            ids: per-image ids (default: random UUIDs).

        Returns:
            The ids; ``[]`` for no uris (where ``Chroma.add_images`` raises ``ValueError``).

        Raises:
            ValueError: more metadatas than uris.
            FileNotFoundError: a file is missing (raised by Chroma before anything is embedded).
            ImageLoadError: a file is not a loadable image; nothing is written.
        """
        uris = [str(uri) for uri in uris]
        if metadatas is not None and len(metadatas) > len(uris):
            raise ValueError(f"got {len(metadatas)} metadatas for {len(uris)} uris")
        if not uris:
            return []
        metadatas = list(metadatas or []) + [{}] * (len(uris) - len(metadatas or []))
        tagged = [{**meta, IMAGE_KEY: uri} for meta, uri in zip(metadatas, uris)]
        return self.vectorstore.add_images(uris, metadatas=tagged, ids=ids)

    def _get_relevant_documents(self, query: str | None, *, run_manager: CallbackManagerForRetrieverRun,
                                image: ImageSource | None = None, instruction: str | None = None,
                                k: int | None = None, filter: dict | None = None) -> list[Document]:
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        vector = self.embeddings.embed_multimodal_query(query or None, image,
                                                        self.instruction if instruction is None else instruction)
        hits = self.vectorstore.similarity_search_by_vector_with_relevance_scores(vector, k=k, filter=filter)
        to_cosine = _distance_to_cosine(self.vectorstore)
        docs = [Document(page_content=doc.page_content, id=doc.id,
                         metadata={**doc.metadata, SCORE_KEY: to_cosine(distance)}) for doc, distance in hits]
        return docs if self.reranker is None else self.reranker.compress_documents(docs, query, image=image)

    async def _aget_relevant_documents(self, query: str | None, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       image: ImageSource | None = None, instruction: str | None = None,
                                       k: int | None = None, filter: dict | None = None) -> list[Document]:
        return await asyncio.to_thread(self._get_relevant_documents, query, run_manager=run_manager.get_sync(),
                                       image=image, instruction=instruction, k=k, filter=filter)


def _distance_to_cosine(store: Any) -> Callable[[float], float]:
    """Exact cosine from a Chroma distance for unit vectors (``l2`` is squared L2 = 2 - 2cos)."""
    config = store._collection.configuration_json or {}  # langchain_chroma exposes the space nowhere else
    space = ((config.get("hnsw") or {}).get("space") or (config.get("spann") or {}).get("space") or "l2")
    if space == "l2":
        return lambda distance: 1.0 - distance / 2.0
    if space in ("cosine", "ip"):
        return lambda distance: 1.0 - distance
    raise ValueError(f"unsupported Chroma distance space {space!r}; expected 'l2', 'cosine' or 'ip'")
