"""LlamaIndex adapter: MM-Embed as a LlamaIndex multimodal embedding, a one-collection ingest path and a retriever.

Which path to use:

* **One collection (recommended).** MM-Embed puts text, images and text+image pairs in ONE space, so one vector
  store holds them all. ``build_index(nodes, embed_model, vector_store)`` (or :func:`add_nodes` on an existing
  ``VectorStoreIndex``) embeds ``TextNode`` / ``Document`` as text and ``ImageNode`` / ``ImageDocument`` as its
  image (plus its text, if any, as one text+image item), then writes chunks no larger than Chroma's
  ``client.get_max_batch_size()``; a failure rolls back what the call wrote. Query with :class:`MMEmbedRetriever`.
* **Upstream two stores.** ``MultiModalVectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(
  vector_store=text_store, image_store=image_store), embed_model=emb, image_embed_model=emb)`` works as documented
  upstream for small corpora, and :class:`MMEmbedRetriever` merges both stores by cosine. But it hands ALL text nodes
  (then all image nodes) to one ``vector_store.add`` call (its ``_add_nodes_to_index`` drops the base class's
  ``insert_batch_size`` loop), and ``ChromaVectorStore.add`` splits only at a hard-coded ``MAX_CHUNK_SIZE = 41665``
  instead of asking the client, whose embedded limit is 5,461 records per call: more than 5,461 nodes of one kind
  fail with ``InternalError: Batch size ... greater than max batch size of 5461``, after every embedding was computed
  and possibly with the text store already written. It also skips nodes whose ``get_content(EMBED)`` is empty, i.e.
  image-only ``ImageNode`` s without metadata.
* Plain ``VectorStoreIndex(nodes, embed_model=emb)`` embeds node *text* only: image-only ``ImageNode`` s are skipped
  or embedded as their metadata text. Use :func:`build_index`.

Reranking: :class:`MMEmbedRerank` is a node postprocessor that scores each retrieved node with the zero-shot MLLM
reranker (:class:`~mmembed_rag.reranker.MLLMReranker`) against the whole ``QueryBundle``: text, ``image_path`` or
both. Query engines hand postprocessors the bundle they were given, but paths that rebuild it from ``query_str``
lose the image; ``MMEmbedRetriever(index, reranker=MMEmbedRerank(...))`` reranks inside the retriever, with the
bundle it searched with.

Scores: ``ChromaVectorStore`` reports ``exp(-distance)``; :class:`MMEmbedRetriever` turns that back into the cosine
similarity for the collection's space (``l2``, ``cosine`` or ``ip``). Other stores' similarities pass through
(``SimpleVectorStore`` already reports cosine).

Images are mapped, not loaded, here: node fields (base64 ``image``, ``image_path``, ``image_url``) and upstream's
``resolve_image()`` results (path str or ``BytesIO``) become item images that the Encoder loads lazily, with its URL
timeout and size limits. We do not call ``ImageNode.resolve_image()`` ourselves: it downloads URLs eagerly with no
size cap and decodes base64 without naming the node.

Example:
    >>> emb = MMEmbedEmbedding(encoder=Encoder.from_pretrained("nvidia/MM-Embed"), query_instruction="mscoco_t2i")
    >>> store = ChromaVectorStore(chroma_collection=chromadb.PersistentClient("db").get_or_create_collection("kb"))
    >>> index = build_index(nodes, emb, store)
    >>> hits = MMEmbedRetriever(index, similarity_top_k=5).retrieve(QueryBundle("the same but red", image_path="a.png"))
    >>> rerank = MMEmbedRerank(model="llava-hf/llava-v1.6-mistral-7b-hf", top_n=3, combine="weighted", weight=0.7)
    >>> retriever = MMEmbedRetriever(index, similarity_top_k=20, reranker=rerank)
    >>> best = retriever.retrieve(QueryBundle("the same but red", image_path="a.png"))
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Sequence
from io import BytesIO
from typing import Any, Literal

import numpy as np

from mmembed_rag.encoder import Encoder
from mmembed_rag.errors import InvalidItemError, MissingDependencyError, MMEmbedError
from mmembed_rag.items import MultimodalItem
from mmembed_rag.rerank_templates import RerankTemplate, get_template
from mmembed_rag.reranker import MLLMReranker

try:
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.embeddings.base import Embedding, mean_agg
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.embeddings.multi_modal_base import MultiModalEmbedding
    from llama_index.core.indices.multi_modal.base import MultiModalVectorStoreIndex
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import BaseNode, ImageNode, ImageType, MetadataMode, Node, NodeWithScore, QueryBundle
    from llama_index.core.vector_stores.types import BasePydanticVectorStore, MetadataFilters, VectorStoreQuery
except ImportError as exc:
    raise MissingDependencyError(
        'mmembed_rag.integrations.llama_index needs llama-index-core; install it with: '
        'pip install "mmembed-rag[llama-index]"'
    ) from exc

__all__ = ["MMEmbedEmbedding", "MMEmbedRerank", "MMEmbedRetriever", "RerankedNode", "add_nodes", "build_index"]

logger = logging.getLogger(__name__)


class MMEmbedEmbedding(MultiModalEmbedding):
    """MM-Embed as a LlamaIndex ``MultiModalEmbedding``: text, images and text+image in one space.

    Queries get ``query_instruction``; documents (text, images, nodes) never do.

    Args:
        model_name: hub id or local checkpoint directory, loaded when ``encoder`` is not given.
        encoder: an already loaded :class:`~mmembed_rag.Encoder` (then ``device``/``dtype`` must be left unset).
        **kwargs: the fields below (``dtype``, ``device``, ``query_instruction``, ``embed_batch_size``, ...).
    """

    model_name: str = Field(default="nvidia/MM-Embed", description="Hub id or local directory of the checkpoint.")
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16; None picks one per device.")
    device: str | None = Field(default=None, description="cpu, cuda, cuda:1...; None picks CUDA when available.")
    query_instruction: str | None = Field(
        default=None, description="Query task instruction: a catalog name such as 'mscoco_t2i' or free text.")
    embed_batch_size: int = Field(default=8, gt=0, le=2048, description="Items per forward pass of the Encoder.")
    _encoder: Any = PrivateAttr()

    def __init__(self, model_name: str = "nvidia/MM-Embed", encoder: Encoder | None = None, **kwargs: Any) -> None:
        super().__init__(model_name=model_name, **kwargs)
        if encoder is None:
            encoder = Encoder.from_pretrained(model_name, device=self.device, dtype=self.dtype)
        elif self.device is not None or self.dtype is not None:
            raise ValueError("device and dtype apply when loading; with encoder=..., set them on the Encoder instead")
        self._encoder = encoder
        self.device, self.dtype = str(encoder.device), str(encoder.dtype).removeprefix("torch.")

    @classmethod
    def class_name(cls) -> str:
        return "MMEmbedEmbedding"

    @property
    def encoder(self) -> Encoder:
        """The wrapped Encoder."""
        return self._encoder

    def _queries(self, items: Sequence[Any], instruction: str | None = None) -> list[Embedding]:
        vectors = self._encoder.encode_queries(items, instruction=instruction or self.query_instruction,
                                               batch_size=self.embed_batch_size)
        return vectors.tolist()

    def _documents(self, items: Sequence[Any], show_progress: bool = False) -> list[Embedding]:
        return self._encoder.encode_documents(items, batch_size=self.embed_batch_size,
                                              show_progress=show_progress).tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._queries([query])[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._documents([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._documents(texts)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    def _get_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return self._get_image_embeddings([img_file_path])[0]

    def _get_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        return self._documents([{"image": _image_source(img)} for img in img_file_paths])

    async def _aget_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return await asyncio.to_thread(self._get_image_embedding, img_file_path)

    async def _aget_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_image_embeddings, img_file_paths)

    def get_query_embedding_multimodal(self, text: str | None = None, image: ImageType | Any = None,
                                       instruction: str | None = None) -> Embedding:
        """Embed a text, image or composed (image + text) query as ONE item.

        Args:
            text: query text (e.g. ``"the same but in red"``), or ``None``.
            image: path, URL, data URI, ``BytesIO``, bytes or PIL image, or ``None``.
            instruction: overrides ``query_instruction`` (catalog name or free text).

        Raises:
            InvalidItemError: neither text nor image. ImageLoadError: the image cannot be loaded.
        """
        return self._queries([_query_item(text, image)], instruction)[0]

    async def aget_query_embedding_multimodal(self, text: str | None = None, image: ImageType | Any = None,
                                              instruction: str | None = None) -> Embedding:
        """Async :meth:`get_query_embedding_multimodal`, run in a worker thread."""
        return await asyncio.to_thread(self.get_query_embedding_multimodal, text, image, instruction)

    def get_node_embeddings(self, nodes: Sequence[BaseNode], show_progress: bool = False) -> list[Embedding]:
        """Document embeddings of nodes in one Encoder call: text as text, images as image (+ their text)."""
        return self._documents([_node_item(node) for node in nodes], show_progress)

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """As an ``IngestionPipeline`` transformation: set ``node.embedding``, images included."""
        for node, vector in zip(nodes, self.get_node_embeddings(nodes, kwargs.get("show_progress", False))):
            node.embedding = vector
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)


class MMEmbedRetriever(BaseRetriever):
    """Retrieve from a ``VectorStoreIndex`` (one collection) or ``MultiModalVectorStoreIndex`` (both stores).

    The ``QueryBundle`` may carry ``query_str``, ``image_path`` or both (a composed query, embedded as one item
    with the instruction); a bundle that already carries an ``embedding`` is searched as is. Scores are cosine
    similarities (see the module docstring); with a ``MultiModalVectorStoreIndex`` both stores are searched and
    merged.

    Args:
        index: the index to search.
        similarity_top_k: results to return.
        instruction: query instruction; default the embedding's ``query_instruction``.
        embed_model: default the index's embedding model when it is an :class:`MMEmbedEmbedding`.
        filters: metadata filters passed to the vector store.
        reranker: a postprocessor (e.g. :class:`MMEmbedRerank`) applied to the ``similarity_top_k`` hits with the
            same ``QueryBundle``, image included; it decides how many are returned (``top_n``).
    """

    def __init__(self, index: VectorStoreIndex, similarity_top_k: int = 10, instruction: str | None = None,
                 embed_model: MMEmbedEmbedding | None = None, filters: MetadataFilters | None = None,
                 reranker: BaseNodePostprocessor | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be >= 1, got {similarity_top_k}")
        embed_model = embed_model or getattr(index, "_embed_model", None)
        if not isinstance(embed_model, MMEmbedEmbedding):
            raise TypeError(f"embed_model must be an MMEmbedEmbedding, got {type(embed_model).__name__}")
        self._index, self._embed_model, self._filters = index, embed_model, filters
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
        items = [_query_item(t, image, bundle) for t in bundle.embedding_strs] or [_query_item(None, image, bundle)]
        vectors = self._embed_model._queries(items, self._instruction)
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


class RerankedNode(NodeWithScore):
    """What :class:`MMEmbedRerank` returns: ``score`` is the final score; ``node`` is the caller's node, unchanged."""

    rerank_score: float = Field(description='The reranker\'s P("True") for the node.')
    retrieval_score: float | None = Field(default=None, description="The score the node came in with.")

    @classmethod
    def class_name(cls) -> str:
        return "RerankedNode"


class MMEmbedRerank(BaseNodePostprocessor):
    """Zero-shot MLLM reranking of text, image and text+image nodes for a text, image or composed query.

    Each node becomes one candidate as it does for embedding (text; ``ImageNode`` image from ``image``
    (base64), ``image_path`` or ``image_url``, plus its text when it has any); the query is the bundle's
    ``query_str`` and ``image_path`` (both: a composed query). :meth:`MLLMReranker.rerank` scores them.

    Scores: ``combine=None`` (default): P("True"). ``"multiply"``: P("True") × the node's incoming score (with a
    negative incoming score the product favours low P("True"), so prefer ``"weighted"`` there).
    ``"weighted"``: ``weight * P("True") + (1 - weight) * incoming score`` (from :class:`MMEmbedRetriever`,
    the cosine similarity). Ties keep the incoming order. Each result is a :class:`RerankedNode` holding the
    caller's node object (neither copied nor modified) with ``rerank_score`` and ``retrieval_score``.

    Args:
        model: hub id or local directory of a LLaVA-NeXT generative checkpoint, loaded when ``reranker`` is not given.
        reranker: an already loaded :class:`~mmembed_rag.reranker.MLLMReranker` (then leave ``device``/``dtype`` unset).
        **kwargs: the fields below (``top_n``, ``template``, ``combine``, ``weight``, ``batch_size``, ...).

    Raises:
        TemplateError: unknown template name. ValueError: ``device``/``dtype`` given with ``reranker``.
    """

    model: str = Field(default="llava-hf/llava-v1.6-mistral-7b-hf", description="Hub id or local directory.")
    top_n: int = Field(default=5, ge=1, description="Nodes kept (all when fewer).")
    template: str | RerankTemplate | None = Field(
        default=None, description="Built-in template name or RerankTemplate; None: the reranker's own choice.")
    combine: Literal["multiply", "weighted"] | None = Field(
        default=None, description="How to mix P(True) with the incoming score; None keeps P(True).")
    weight: float = Field(default=0.5, ge=0.0, le=1.0, description='Weight of P("True") when combine="weighted".')
    batch_size: int = Field(default=16, ge=1, description="Candidates per forward pass.")
    device: str | None = Field(default=None, description="Device when loading `model`.")
    dtype: str | None = Field(default=None, description="Weights dtype when loading `model`.")
    _reranker: MLLMReranker = PrivateAttr()

    def __init__(self, model: str | os.PathLike = "llava-hf/llava-v1.6-mistral-7b-hf",
                 reranker: MLLMReranker | None = None, **kwargs: Any) -> None:
        super().__init__(model=str(model), **kwargs)
        if self.template is not None:
            get_template(self.template)  # a mistyped name fails now, not at the first query
        if reranker is None:
            reranker = MLLMReranker.from_pretrained(self.model, device=self.device, dtype=self.dtype)
        elif self.device is not None or self.dtype is not None:
            raise ValueError("device and dtype apply when loading; with reranker=..., set them when loading it")
        self._reranker = reranker

    @classmethod
    def class_name(cls) -> str:
        return "MMEmbedRerank"

    @property
    def reranker(self) -> MLLMReranker:
        """The wrapped MLLMReranker."""
        return self._reranker

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[RerankedNode]:
        if query_bundle is None:
            raise ValueError("MMEmbedRerank needs the query: pass query_bundle=QueryBundle(...) or query_str=...")
        if isinstance(nodes, NodeWithScore):
            raise InvalidItemError("nodes must be a list of NodeWithScore, got a single NodeWithScore")
        nodes = list(nodes)
        query = _query_item(query_bundle.query_str, query_bundle.image_path or None, query_bundle)
        ranked = self._reranker.rerank(query, [_candidate(i, hit) for i, hit in enumerate(nodes)],
                                       batch_size=self.batch_size, template=self.template)
        out = [RerankedNode(node=nodes[r.index].node, rerank_score=r.score, retrieval_score=nodes[r.index].score,
                            score=_combine(r.score, nodes[r.index].score, r.index, self.combine, self.weight))
               for r in ranked]
        order = sorted(range(len(out)), key=lambda j: (-out[j].score, ranked[j].index))
        return [out[j] for j in order[: self.top_n]]


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
    items = {id(node): _node_item(node) for node in nodes if node.embedding is None}  # validate before writing
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


def _cosine(store: BasePydanticVectorStore, similarity: float | None) -> float | None:
    """Undo ChromaVectorStore's ``exp(-distance)``: unit vectors have l2 = 2 - 2cos, cosine/ip = 1 - cos."""
    if similarity is None or store.class_name() != "ChromaVectorStore":
        return similarity
    collection = store.client
    config = getattr(collection, "configuration", None) or {}
    space = next((c["space"] for c in (config.get("hnsw"), config.get("spann")) if c and c.get("space")),
                 (collection.metadata or {}).get("hnsw:space", "l2"))
    return 1.0 + (0.5 if space == "l2" else 1.0) * math.log(similarity)


def _image_source(image: Any) -> Any:
    """``BytesIO`` (upstream's resolve_image result) to bytes; paths, URLs, data URIs pass through."""
    return image.getvalue() if isinstance(image, BytesIO) else image


def _query_item(text: str | None, image: Any, bundle: QueryBundle | None = None) -> MultimodalItem:
    try:
        return MultimodalItem(text=text or None, image=_image_source(image) if image is not None else None)
    except InvalidItemError as exc:
        what = f"QueryBundle(query_str={bundle.query_str!r}, image_path={bundle.image_path!r})" if bundle else (
            f"query (text={text!r}, image={image!r})")
        raise InvalidItemError(f"{what}: {exc}") from exc


def _candidate(index: int, hit: Any) -> MultimodalItem:
    if not isinstance(hit, NodeWithScore):
        raise InvalidItemError(f"candidate {index}: expected a NodeWithScore, got {type(hit).__name__}")
    try:
        return _node_item(hit.node)
    except InvalidItemError as exc:
        raise InvalidItemError(f"candidate {index}: {exc}") from exc


def _combine(rerank: float, retrieval: float | None, index: int, how: str | None, weight: float) -> float:
    """The final rerank score; see :class:`MMEmbedRerank`."""
    if how is None:
        return rerank
    if retrieval is None:
        raise ValueError(f"candidate {index} has no retrieval score; combine={how!r} needs one")
    return rerank * retrieval if how == "multiply" else weight * rerank + (1.0 - weight) * retrieval


def _node_item(node: BaseNode) -> MultimodalItem:
    image = _node_image(node)
    has_text = image is None or bool(node.get_content(metadata_mode=MetadataMode.NONE).strip())
    text = node.get_content(metadata_mode=MetadataMode.EMBED) if has_text else None
    try:
        return MultimodalItem(text=text, image=image)
    except InvalidItemError as exc:
        raise InvalidItemError(f"node {node.node_id!r}: {exc}") from exc


def _node_image(node: BaseNode) -> str | None:
    if isinstance(node, ImageNode):
        data, path, url, mime = node.image, node.image_path, node.image_url, node.image_mimetype
    elif isinstance(node, Node) and node.image_resource is not None:
        res = node.image_resource
        data, mime = (res.data.decode("ascii") if res.data else None), res.mimetype
        path, url = (str(res.path) if res.path else None), (str(res.url) if res.url else None)
    else:
        return None
    if data:
        return f"data:{mime or 'image'};base64,{data}"
    return path or url
