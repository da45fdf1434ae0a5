"""The one-collection ingest path: embed text, image and text+image nodes and write them in store-sized chunks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.indices.multi_modal.base import MultiModalVectorStoreIndex
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import BasePydanticVectorStore

from mmembed_rag.errors import MMEmbedError
from mmembed_rag.ingest import chunked, pipelined_write, relabel_item
from mmembed_rag.modality import MODALITY_KEY

from ._common import index_embed_model, node_item, node_modality
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

    Every node is checked before anything is written; chunk k+1 is embedded while chunk k is written. Each stored
    node carries ``metadata["modality"]`` (``"text"``, ``"image"`` or ``"image,text"``, excluded from the text
    that is embedded or shown to an LLM) for :class:`MMEmbedRetriever`'s ``modality=`` filter. Nodes that already
    carry an ``embedding`` are written with it (as upstream does). The caller's nodes are not modified.

    Args:
        index: a ``VectorStoreIndex`` (not a ``MultiModalVectorStoreIndex``).
        nodes: the nodes.
        embed_model: default the index's embedding model.
        batch_size: nodes embedded and written per step.
        max_batch_size: the store's per-call limit; default ``client.get_max_batch_size()`` for Chroma.
        show_progress: show the Encoder's progress bar.

    Returns:
        The ids written.

    Raises:
        InvalidItemError: a node has neither text nor image (named by id). ImageLoadError: an image cannot be
            loaded (named by position and id).
    """
    if isinstance(index, MultiModalVectorStoreIndex):
        raise TypeError("add_nodes writes one collection; MultiModalVectorStoreIndex keeps its own insert path")
    embed_model = embed_model or index_embed_model(index)
    if not isinstance(embed_model, MMEmbedEmbedding):
        raise TypeError(f"embed_model must be an MMEmbedEmbedding, got {type(embed_model).__name__}")
    nodes = list(nodes)
    items = {id(node): node_item(node) for node in nodes if node.embedding is None}  # validate before writing
    step = min(batch_size, max_batch_size or _max_batch_size(index.vector_store) or batch_size)
    written: list[str] = []

    def encode(chunk: tuple[int, list[BaseNode]]) -> list[list[float]]:
        start, part = chunk
        fresh = [(start + i, node) for i, node in enumerate(part) if node.embedding is None]
        try:
            return embed_model.embed_document_items([items[id(node)] for _, node in fresh], show_progress)
        except MMEmbedError as exc:
            raise relabel_item(exc, lambda i: f"nodes[{fresh[i][0]}] (id {fresh[i][1].node_id!r})") from exc

    def write(chunk: tuple[int, list[BaseNode]], vectors: list[list[float]]) -> None:
        fresh = iter(vectors)
        copies = [_stored_copy(node, next(fresh) if node.embedding is None else node.embedding) for node in chunk[1]]
        index.insert_nodes(copies)
        written.extend(copy.node_id for copy in copies)

    chunks = ((i * step, part) for i, part in enumerate(chunked(nodes, step)))
    pipelined_write(chunks, encode, write, lambda: _rollback(index, written, step))
    return written


def _stored_copy(node: BaseNode, embedding: list[float]) -> BaseNode:
    """A copy of ``node`` with its embedding and modality (the modality kept out of embedded and LLM text)."""
    copy = node.model_copy()
    copy.embedding = embedding
    copy.metadata = {**node.metadata, MODALITY_KEY: node_modality(node)}
    for keys in ("excluded_embed_metadata_keys", "excluded_llm_metadata_keys"):
        setattr(copy, keys, list(dict.fromkeys([*getattr(node, keys), MODALITY_KEY])))
    return copy


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
    """Chroma's per-call record limit (5,461 for the embedded client); ``None`` for other stores."""
    if store.class_name() != "ChromaVectorStore":
        return None
    from mmembed_rag.store.connection import max_batch_size

    return max_batch_size(store)
