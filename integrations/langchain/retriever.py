"""Text, image and composed queries against a ``langchain_chroma.Chroma`` store, cosine scored, optionally reranked."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import Field

from mmembed_rag.errors import MissingDependencyError
from mmembed_rag.images import ImageSource
from mmembed_rag.ingest import pipelined_write
from mmembed_rag.instructions import resolve_instruction
from mmembed_rag.modality import IMAGE, MODALITY_KEY, TEXT, modality_where

from ._common import IMAGE_KEY, SCORE_KEY
from .embeddings import MMEmbedEmbeddings
from .rerank import MMEmbedReranker

__all__ = ["MMEmbedRetriever"]


class MMEmbedRetriever(BaseRetriever):
    """Text, image and composed queries against a ``langchain_chroma.Chroma`` store filled by MM-Embed.

    ``invoke(query, image=None, instruction=None, k=None, filter=None, modality=None)``: ``query`` is the text
    (``""`` for an image-only query). Each returned ``Document`` keeps its stored metadata (the image reference
    under ``"image"`` when added via :meth:`add_images`, the ``"modality"``) plus the query's cosine similarity
    under ``"score"``, computed from the stored vectors (exact in any distance space).

    Write through the retriever (:meth:`add_texts`, :meth:`add_documents`, :meth:`add_images`) so every record
    carries ``metadata["modality"]`` and writes are chunked under Chroma's per-call limit; a call that fails
    removes what it added. Delete with the vector store's own ``vectorstore.delete(ids)``.

    Args:
        vectorstore: the Chroma store (any distance space: ``l2``, ``cosine`` or ``ip``).
        k: default number of documents.
        instruction: default query instruction; overrides the embeddings' ``query_instruction``.
        embeddings: default ``vectorstore.embeddings``, which must then be :class:`MMEmbedEmbeddings`.
        reranker: an :class:`MMEmbedReranker` that reranks the ``k`` hits with the full query (text, image or
            both) and keeps its ``top_n``; it adds ``"relevance_score"`` and ``"rerank_score"``.
        modality: default modality filter: ``"text"``, ``"image"``, ``"image,text"`` or a list, applied in the
            store (with ``filter``, both must hold). The inference-time remedy for modality bias.

    Example:
        >>> retriever = MMEmbedRetriever(vectorstore=db, k=5, modality="image")
        >>> retriever.invoke("", image="query.png", instruction="nights_i2i", k=2)
    """

    vectorstore: VectorStore
    k: int = Field(default=4, ge=1)
    instruction: str | None = None
    embeddings: MMEmbedEmbeddings | None = None
    reranker: MMEmbedReranker | None = None
    modality: str | list[str] | None = None

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
        modality_where(self.modality)  # an unknown name fails now

    def add_texts(self, texts: Sequence[str], metadatas: list[dict] | None = None,
                  ids: list[str] | None = None) -> list[str]:
        """``Chroma.add_texts`` in chunks under the client's limit, each record tagged ``modality="text"``.

        Raises:
            ValueError: more metadatas or ids than texts. InvalidItemError: an empty or non-str text.
        """
        texts = list(texts)
        return self._add(lambda part, meta, part_ids: self.vectorstore.add_texts(part, metadatas=meta, ids=part_ids),
                         texts, metadatas, ids, TEXT)

    def add_documents(self, documents: Sequence[Document]) -> list[str]:
        """Add Documents as text (their ``id`` kept when set), tagged ``modality="text"``; see :meth:`add_texts`."""
        documents = list(documents)
        return self.add_texts([doc.page_content for doc in documents], [dict(doc.metadata) for doc in documents],
                              [doc.id or str(uuid.uuid4()) for doc in documents])

    def add_images(self, uris: Sequence[str | Path], metadatas: list[dict] | None = None,
                   ids: list[str] | None = None) -> list[str]:
        """``Chroma.add_images`` in chunks under the client's limit (upstream fails past 5,461 images per call),
        each record tagged ``metadata["image"] = uri`` and ``modality="image"``.

        Args:
            uris: local image files.
            metadatas: per-image metadata (a shorter list is padded with ``{}``, as upstream does).
            ids: per-image ids (default: random UUIDs).

        Returns:
            The ids; ``[]`` for no uris (where ``Chroma.add_images`` raises ``ValueError``).

        Raises:
            ValueError: more metadatas or ids than uris.
            FileNotFoundError: a file is missing (raised by Chroma before its chunk is embedded).
            ImageLoadError: a file is not a loadable image.
            In every case what this call had added is removed again.
        """
        uris = [str(uri) for uri in uris]
        metadatas = [{**meta, IMAGE_KEY: uri} for meta, uri in zip(_padded(metadatas, len(uris), "uris"), uris)]
        return self._add(lambda part, meta, part_ids: self.vectorstore.add_images(part, metadatas=meta, ids=part_ids),
                         uris, metadatas, ids, IMAGE)

    async def aadd_images(self, uris: Sequence[str | Path], metadatas: list[dict] | None = None,
                          ids: list[str] | None = None) -> list[str]:
        """:meth:`add_images` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.add_images, uris, metadatas, ids)

    async def aadd_texts(self, texts: Sequence[str], metadatas: list[dict] | None = None,
                         ids: list[str] | None = None) -> list[str]:
        """:meth:`add_texts` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.add_texts, texts, metadatas, ids)

    async def aadd_documents(self, documents: Sequence[Document]) -> list[str]:
        """:meth:`add_documents` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.add_documents, documents)

    def _add(self, add: Any, values: list[str], metadatas: list[dict] | None, ids: list[str] | None,
             modality: str) -> list[str]:
        """Chunks under the client's limit through the core's all-or-nothing loop (LangChain embeds inside ``add``)."""
        if not values:
            return []
        metadatas = [{**meta, MODALITY_KEY: modality} for meta in _padded(metadatas, len(values))]
        if ids is not None and len(ids) > len(values):
            raise ValueError(f"got {len(ids)} ids for {len(values)} items")
        ids = [str(uuid.uuid4()) if id_ is None else id_
               for id_ in list(ids or []) + [None] * (len(values) - len(ids or []))]
        from mmembed_rag.store.connection import max_batch_size  # chromadb: imported when writing, not before

        step = max_batch_size(self.vectorstore) or len(values)
        added: list[str] = []

        def write(part: range, _: None) -> None:
            part_ids = ids[part.start:part.stop]
            existing = set(self.vectorstore.get(ids=part_ids, include=[])["ids"])
            add(values[part.start:part.stop], metadatas[part.start:part.stop], part_ids)
            added.extend(id_ for id_ in part_ids if id_ not in existing)

        def rollback() -> None:
            for start in range(0, len(added), step):
                self.vectorstore.delete(added[start:start + step])

        chunks = (range(start, min(start + step, len(values))) for start in range(0, len(values), step))
        pipelined_write(chunks, lambda part: None, write, rollback, overlap=False)
        return ids

    def _get_relevant_documents(self, query: str | None, *, run_manager: CallbackManagerForRetrieverRun,
                                image: ImageSource | None = None, instruction: str | None = None,
                                k: int | None = None, filter: dict | None = None,
                                modality: str | list[str] | None = None) -> list[Document]:
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        where = _and(filter, modality_where(self.modality if modality is None else modality))
        vector = self.embeddings.embed_multimodal_query(query or None, image,
                                                        self.instruction if instruction is None else instruction)
        hits = self.vectorstore.similarity_search_by_vector(vector, k=k, filter=where)
        stored = self.vectorstore.get(ids=[doc.id for doc in hits], include=["embeddings"]) if hits else None
        cosines = {} if stored is None else dict(zip(stored["ids"], np.asarray(stored["embeddings"]) @ vector))
        docs = [Document(page_content=doc.page_content, id=doc.id,
                         metadata={**doc.metadata, SCORE_KEY: float(cosines[doc.id])}) for doc in hits]
        return docs if self.reranker is None else self.reranker.compress_documents(docs, query, image=image)

    async def _aget_relevant_documents(self, query: str | None, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       image: ImageSource | None = None, instruction: str | None = None,
                                       k: int | None = None, filter: dict | None = None,
                                       modality: str | list[str] | None = None) -> list[Document]:
        return await asyncio.to_thread(self._get_relevant_documents, query, run_manager=run_manager.get_sync(),
                                       image=image, instruction=instruction, k=k, filter=filter, modality=modality)


def _padded(metadatas: list[dict] | None, n: int, what: str = "items") -> list[dict]:
    """One metadata dict per item: a shorter list is padded with ``{}`` (as upstream does), a longer one refused."""
    metadatas = list(metadatas or [])
    if len(metadatas) > n:
        raise ValueError(f"got {len(metadatas)} metadatas for {n} {what}")
    return [dict(meta or {}) for meta in metadatas] + [{} for _ in range(n - len(metadatas))]


def _and(where: dict | None, extra: dict | None) -> dict | None:
    parts = [part for part in (where, extra) if part]
    return None if not parts else parts[0] if len(parts) == 1 else {"$and": parts}
