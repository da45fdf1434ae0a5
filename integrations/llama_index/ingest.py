"""The one-collection ingest path: embed text, image and text+image nodes and write them in store-sized chunks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.indices.multi_modal.base import MultiModalVectorStoreIndex
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import BasePydanticVectorStore

from mmembed_rag.errors import MMEmbedError

from ._common import node_item
from .embedding import MMEmbedEmbedding

__all__ = ["add_nodes", "build_index"]

logger = logging.getLogger(__name__)


def build_index(nodes: Sequence[BaseNode], embed_model: MMEmbedEmbedding,
                vector_store: BasePydanticVectorStore | None = None, *, storage_context: StorageContext | None = None,
                batch_size: int = 2048, max_batch_size: int | None = None,
                show_progress: bool = False) -> VectorStoreIndex:
    """Build a one-collection ``VectorStoreIndex`` of text, image and text+image nodes.

    Args:
        nodes: nodes or documents (already chunked); ``ImageNode`` / ``ImageDocument`` are embedded as images.
        embed_model: the embedding.
        vector_store: e.g. a ``ChromaVectorStore``; or pass ``storage_context`` instead; neither: in memory.
        batch_size, max_batch_size, show_progress: see :func:`add_nodes`.

    Returns:
        The index, ready for :class:`MMEmbedRetriever`.
    """
    if vector_store is not None and storage_context is not None:
        raise ValueError("pass vector_store or storage_context, not both")
    storage_context = storage_context or StorageContext.from_defaults(vector_store=vector_store)
    index = VectorStoreIndex(nodes=[], storage_context=storage_context, embed_model=embed_model)
    add_nodes(index, nodes, embed_model, batch_size=batch_size, max_batch_size=max_batch_size,
              show_progress=show_progress)
    return index


def add_nodes(index: VectorStoreIndex, nodes: Sequence[BaseNode], embed_model: MMEmbedEmbedding | None = None, *,
              batch_size: int = 2048, max_batch_size: int | None = None, show_progress: bool = False) -> list[str]:
    """Embed and insert nodes in chunks the store accepts; on any failure remove what this call wrote.

    Nodes that already carry an ``embedding`` are written as they are (as upstream does).

    Args:
        index: a ``VectorStoreIndex`` (not a ``MultiModalVectorStoreIndex``).
        nodes: the nodes; every one is checked before anything is written.
        embed_model: default the index's embedding model.
        batch_size: nodes embedded and written per step.
        max_batch_size: the store's per-call limit; default ``client.get_max_batch_size()`` for Chroma.
        show_progress: show the Encoder's progress bar.

    Returns:
        The ids written.

    Raises:
        InvalidItemError: a node has neither text nor image (named by id). ImageLoadError: an image cannot be loaded.
    """
    if isinstance(index, MultiModalVectorStoreIndex):
        raise TypeError("add_nodes writes one collection; MultiModalVectorStoreIndex keeps its own insert path")
    embed_model = embed_model or getattr(index, "_embed_model", None)
    if not isinstance(embed_model, MMEmbedEmbedding):
        raise TypeError(f"embed_model must be an MMEmbedEmbedding, got {type(embed_model).__name__}")
    nodes = list(nodes)
    items = {id(node): node_item(node) for node in nodes if node.embedding is None}  # validate before writing
    step = min(batch_size, max_batch_size or _max_batch_size(index.vector_store) or batch_size)
    written: list[str] = []
    try:
        for start in range(0, len(nodes), step):
            chunk = nodes[start:start + step]
            fresh = [node for node in chunk if node.embedding is None]
            try:
                vectors = iter(embed_model._documents([items[id(node)] for node in fresh], show_progress))
            except MMEmbedError as exc:
                raise type(exc)(f"nodes[{start}:{start + len(chunk)}]: {exc}") from exc
            copies = [node.model_copy() for node in chunk]
            for copy in copies:
                copy.embedding = copy.embedding if copy.embedding is not None else next(vectors)
            index.insert_nodes(copies)
            written += [copy.node_id for copy in copies]
    except Exception:
        _rollback(index, written, step)
        raise
    return written


def _rollback(index: VectorStoreIndex, ids: list[str], step: int) -> None:
    if not ids:
        return
    logger.warning("ingest failed; removing the %d node(s) this call had written", len(ids))
    for start in range(0, len(ids), step):
        index.vector_store.delete_nodes(ids[start:start + step])
    for node_id in ids:
        index.index_struct.nodes_dict.pop(node_id, None)
        index.docstore.delete_document(node_id, raise_error=False)
    index.storage_context.index_store.add_index_struct(index.index_struct)


def _max_batch_size(store: BasePydanticVectorStore) -> int | None:
    """Chroma's per-call record limit (5,461 for the embedded client), read from the collection's client."""
    if store.class_name() != "ChromaVectorStore":
        return None
    client = getattr(store.client, "_client", None)  # chromadb keeps its client on the collection
    return client.get_max_batch_size() if client is not None else None
