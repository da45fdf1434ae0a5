"""Text, image and composed queries against a ``VectorStoreIndex`` or ``MultiModalVectorStoreIndex``, cosine scored."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from llama_index.core import VectorStoreIndex
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import Embedding, mean_agg
from llama_index.core.indices.multi_modal.base import MultiModalVectorStoreIndex
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
)

from mmembed_rag.modality import MODALITY_KEY, modalities
from mmembed_rag.similarity import collection_space, cosine_from_exp_distance

from ._common import index_embed_model, query_item
from .embedding import MMEmbedEmbedding

__all__ = ["MMEmbedRetriever"]


class MMEmbedRetriever(BaseRetriever):
    """Retrieve from a ``VectorStoreIndex`` (one collection) or ``MultiModalVectorStoreIndex`` (both stores).

    The ``QueryBundle`` may carry ``query_str``, ``image_path`` or both (a composed query, embedded as one item
    with the instruction); a bundle that already carries an ``embedding`` is searched as is. Scores are cosine
    similarities (see :mod:`mmembed_rag.integrations.llama_index`); with a ``MultiModalVectorStoreIndex`` both
    stores are searched and merged.

    Args:
        index: the index to search.
        similarity_top_k: results to return.
        instruction: query instruction; default the embedding's ``query_instruction``.
        embed_model: default the index's embedding model when it is an :class:`MMEmbedEmbedding`.
        filters: metadata filters passed to the vector store.
        reranker: a postprocessor (e.g. :class:`MMEmbedRerank`) applied to the ``similarity_top_k`` hits with the
            same ``QueryBundle``, image included; it decides how many are returned (``top_n``).
        modality: keep only nodes of this modality (``"text"``, ``"image"``, ``"image,text"``) or of any in a list:
            filtered in the vector store (with ``filters``, both must hold) on the ``modality`` metadata that
            :func:`build_index` / :func:`add_nodes` write. The inference-time remedy for modality bias.

    Raises:
        UnknownModalityError: an unknown ``modality``. ValueError, TypeError: other bad arguments.
    """

    def __init__(self, index: VectorStoreIndex, similarity_top_k: int = 10, instruction: str | None = None,
                 embed_model: MMEmbedEmbedding | None = None, filters: MetadataFilters | None = None,
                 reranker: BaseNodePostprocessor | None = None, modality: str | Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be >= 1, got {similarity_top_k}")
        embed_model = embed_model or index_embed_model(index)
        if not isinstance(embed_model, MMEmbedEmbedding):
            raise TypeError(f"embed_model must be an MMEmbedEmbedding, got {type(embed_model).__name__}")
        self._index, self._embed_model = index, embed_model
        self._filters = _with_modality(filters, modality)
        if reranker is not None and not isinstance(reranker, BaseNodePostprocessor):
            raise TypeError(f"reranker must be a BaseNodePostprocessor such as MMEmbedRerank, "
                            f"got {type(reranker).__name__}")
        self._top_k, self._instruction, self._reranker = similarity_top_k, instruction, reranker
        self._stores = [index.vector_store]
        if isinstance(index, MultiModalVectorStoreIndex):
            self._stores.append(index.image_vector_store)

    def _query_embedding(self, bundle: QueryBundle) -> Embedding:
        if bundle.embedding is not None:
            return bundle.embedding
        image = bundle.image_path or None
        items = [query_item(t, image, bundle) for t in bundle.embedding_strs] or [query_item(None, image, bundle)]
        vectors = self._embed_model.embed_query_items(items, self._instruction)
        if len(vectors) == 1:
            return vectors[0]
        mean = np.asarray(mean_agg(vectors))  # several custom_embedding_strs: upstream's mean, kept unit-length
        return (mean / np.linalg.norm(mean)).tolist()

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        query = VectorStoreQuery(query_embedding=self._query_embedding(query_bundle),
                                 similarity_top_k=self._top_k, filters=self._filters)
        best: dict[str, NodeWithScore] = {}
        for store in self._stores:
            for hit in self._hits(store, store.query(query)):
                if hit.node.node_id not in best or hit.get_score() > best[hit.node.node_id].get_score():
                    best[hit.node.node_id] = hit
        hits = sorted(best.values(), key=lambda hit: -hit.get_score())[: self._top_k]
        return hits if self._reranker is None else self._reranker.postprocess_nodes(hits, query_bundle)

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)

    def _hits(self, store: BasePydanticVectorStore, result: Any) -> list[NodeWithScore]:
        nodes = result.nodes
        if nodes is None:  # the store keeps ids only: nodes live in the docstore
            nodes = self._index.docstore.get_nodes([self._index.index_struct.nodes_dict[i] for i in result.ids])
        similarities = result.similarities or [None] * len(nodes)
        return [NodeWithScore(node=node, score=_cosine(store, s)) for node, s in zip(nodes, similarities)]


def _with_modality(filters: MetadataFilters | None, modality: str | Sequence[str] | None) -> MetadataFilters | None:
    """``filters`` AND the modality condition (either may be absent)."""
    if modality is None:
        return filters
    values = modalities(modality)
    condition = (MetadataFilter(key=MODALITY_KEY, value=values[0]) if len(values) == 1 else
                 MetadataFilter(key=MODALITY_KEY, value=values, operator=FilterOperator.IN))
    if filters is None:
        return MetadataFilters(filters=[condition])
    return MetadataFilters(filters=[filters, condition], condition=FilterCondition.AND)


def _cosine(store: BasePydanticVectorStore, similarity: float | None) -> float | None:
    """Undo ChromaVectorStore's ``exp(-distance)`` (other stores' similarities pass through)."""
    if similarity is None or store.class_name() != "ChromaVectorStore":
        return similarity
    collection = store.client  # ChromaVectorStore's public handle on its chromadb Collection
    return cosine_from_exp_distance(similarity, collection_space(collection.configuration_json, collection.metadata))
