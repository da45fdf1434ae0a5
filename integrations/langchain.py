"""LangChain adapter: MM-Embed ``Embeddings``, a multimodal ``BaseRetriever`` over Chroma, and an MLLM reranker.

Install with ``pip install "mmembed-rag[langchain]"``. The classes only translate LangChain objects into
:class:`~mmembed_rag.items.MultimodalItem` and call the :class:`~mmembed_rag.encoder.Encoder` or the
:class:`~mmembed_rag.reranker.MLLMReranker`, which own batching, prompts, image loading, devices and dtypes.

:class:`MMEmbedReranker` is a ``BaseDocumentCompressor``: it works in ``ContextualCompressionRetriever``, but that
class forwards only the query *string*. For image and composed queries give the reranker to the retriever:
``MMEmbedRetriever(..., reranker=MMEmbedReranker(...))`` reranks its hits with the full query.

Upstream ``langchain_chroma.Chroma`` behaviour worth knowing (not changed here):

* ``Chroma.add_images(uris)`` opens each uri itself as a *local file* (``FileNotFoundError`` for a missing
  one, before anything is embedded), stores the file's base64 as the document's ``page_content``, then calls
  :meth:`MMEmbedEmbeddings.embed_image` with the same uris and upserts everything in one call, so more than
  ``client.get_max_batch_size()`` images (5461 with chromadb 1.5) in one call fail, after all are embedded.
  :meth:`MMEmbedRetriever.add_images` also records each uri under ``metadata["image"]``.
* ``Chroma.similarity_search_by_image(uri)`` embeds the query image with ``embed_image``, i.e. as a
  document (no ``Query:`` prompt, no instruction). For instructed image queries use :class:`MMEmbedRetriever`.
* A collection's default space is *squared* L2; upstream's relevance function assumes plain L2, so
  ``similarity_search_with_relevance_scores`` is not cosine. The retriever converts distances exactly.

Example:
    >>> emb = MMEmbedEmbeddings(model="nvidia/MM-Embed", query_instruction="mscoco_t2i")
    >>> retriever = MMEmbedRetriever(vectorstore=Chroma("photos", embedding_function=emb, persist_directory="db"))
    >>> retriever.add_images(["cat.png", "dog.png"])
    >>> docs = retriever.invoke("the same but in red", image="red_car.png", k=1)
    >>> retriever.reranker = MMEmbedReranker(model="llava-hf/llava-v1.6-mistral-7b-hf", top_n=3)
    >>> docs = retriever.invoke("the same but in red", image="red_car.png", k=20)  # 20 retrieved, best 3 kept
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from mmembed_rag.encoder import Encoder
from mmembed_rag.errors import InvalidItemError, MissingDependencyError
from mmembed_rag.images import ImageSource
from mmembed_rag.instructions import resolve_instruction
from mmembed_rag.items import to_item
from mmembed_rag.rerank_templates import RerankTemplate, get_template
from mmembed_rag.reranker import MLLMReranker

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun, Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.vectorstores import VectorStore
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as exc:
    raise MissingDependencyError(
        "mmembed_rag.integrations.langchain needs langchain-core; install it with: "
        'pip install "mmembed-rag[langchain]"'
    ) from exc

__all__ = ["IMAGE_KEY", "RELEVANCE_KEY", "RERANK_KEY", "SCORE_KEY", "MMEmbedEmbeddings", "MMEmbedReranker",
           "MMEmbedRetriever"]

logger = logging.getLogger(__name__)

IMAGE_KEY = "image"
"""Metadata key holding a document's image reference (written by :meth:`MMEmbedRetriever.add_images`)."""
SCORE_KEY = "score"
"""Metadata key holding the cosine similarity of a retrieved document to the query."""
RELEVANCE_KEY = "relevance_score"
"""Metadata key holding :class:`MMEmbedReranker`'s final score (as LangChain's other rerankers name it)."""
RERANK_KEY = "rerank_score"
"""Metadata key holding the reranker's P("True"), before any combination with the retrieval score."""
# File signatures (PNG, JPEG, GIF, WebP, BMP, TIFF) that tell Chroma.add_images' base64 page_content from text.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class MMEmbedEmbeddings(BaseModel, Embeddings):
    """MM-Embed as a LangChain ``Embeddings``: text, image and text+image share one space.

    Documents are embedded without an instruction; queries with ``query_instruction`` (a catalog name
    such as ``"mscoco_t2i"`` or free text). Vectors are L2-normalised, so dot product is cosine.

    Raises:
        ModelNotFoundError, CheckpointError: ``model`` cannot be loaded.
        ValueError: ``encoder`` is given together with ``dtype`` or ``device``.
        InvalidItemError, UnknownTaskError: ``query_instruction`` is empty or a mistyped catalog name.
    """

    model: str | Path = Field(default="nvidia/MM-Embed",
                              description="Hub id or local checkpoint directory; ignored when `encoder` is given.")
    encoder: Encoder | None = Field(default=None, exclude=True, repr=False,
                                    description="An already loaded Encoder to use instead of loading `model`.")
    query_instruction: str | None = Field(default=None, description="Instruction for queries (name or text).")
    dtype: str | None = Field(default=None, description="Weights dtype when loading `model`.")
    device: str | None = Field(default=None, description="Device when loading `model`.")
    batch_size: int = Field(default=8, ge=1, description="Items per forward pass.")

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    def model_post_init(self, context: Any, /) -> None:
        resolve_instruction(self.query_instruction)  # fail now, before loading, on a mistyped catalog name
        if self.encoder is None:
            self.encoder = Encoder.from_pretrained(self.model, device=self.device, dtype=self.dtype)
        elif self.dtype is not None or self.device is not None:
            raise ValueError("dtype and device apply only when loading `model`; "
                             "pass them to Encoder.from_pretrained instead of together with `encoder`")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents, never with an instruction.

        Args:
            texts: the documents (a dict ``{"text": ..., "image": ...}`` in place of a str embeds a
                text+image document).

        Returns:
            One unit vector per document; ``[]`` for ``[]``.

        Raises:
            InvalidItemError: ``texts`` is a single str, or an entry is empty or of the wrong type.
        """
        return self.encoder.encode_documents(texts, batch_size=self.batch_size).tolist()

    def embed_query(self, text: str) -> list[float]:
        """Embed a text query with ``query_instruction``.

        Raises:
            InvalidItemError: ``text`` is not a str, or is empty.
        """
        if not isinstance(text, str):
            raise InvalidItemError(f"embed_query expects a str, got {type(text).__name__}")
        return self.embed_multimodal_query(text)

    def embed_image(self, uris: list[str]) -> list[list[float]]:
        """Embed images as documents; the hook ``Chroma.add_images`` and ``similarity_search_by_image`` call.

        Args:
            uris: image paths (also ``pathlib.Path``, http(s) URLs and data URIs, though ``Chroma`` itself
                only reads local files).

        Raises:
            InvalidItemError: ``uris`` is a single string or an entry is not an image source.
            ImageLoadError: an image cannot be read or decoded (the message names its index).
        """
        if isinstance(uris, (str, bytes, Path)):
            raise InvalidItemError(f"embed_image expects a list of image URIs, got a single {type(uris).__name__}; "
                                   "wrap it in a list: [uri]")
        items = [to_item({"image": uri}, index) for index, uri in enumerate(uris)]
        return self.encoder.encode_documents(items, batch_size=self.batch_size).tolist()

    def embed_multimodal_query(self, text: str | None = None, image: ImageSource | None = None,
                               instruction: str | None = None) -> list[float]:
        """Embed a text, image or composed (image + text) query.

        Args:
            text: query text (``None`` or ``""`` for an image-only query).
            image: path, URL, data URI, bytes, PIL image or array.
            instruction: overrides ``query_instruction`` for this call.

        Raises:
            InvalidItemError: neither text nor image, or a field of the wrong type.
            ImageLoadError: the image cannot be loaded.
        """
        item = to_item({"text": text, "image": image}, 0)
        chosen = self.query_instruction if instruction is None else instruction
        return self.encoder.encode_queries([item], instruction=chosen, batch_size=1)[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """:meth:`embed_documents` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """:meth:`embed_query` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.embed_query, text)


class MMEmbedReranker(BaseDocumentCompressor):
    """Zero-shot MLLM reranking of text and image Documents for a text, image or composed query.

    Each Document becomes one candidate: its image is ``metadata["image"]`` (what :meth:`MMEmbedRetriever.add_images`
    records) or, failing that, the ``page_content`` itself when it is the base64 of an image file (what
    ``Chroma.add_images`` stores); its text is the ``page_content`` unless that is such base64.
    :meth:`MLLMReranker.rerank` scores them; the best ``top_n`` come back as copies whose metadata gains
    ``"rerank_score"`` (P("True")) and ``"relevance_score"``, the final score:

    * ``combine=None`` (default): P("True");
    * ``"multiply"``: P("True") × ``metadata["score"]`` (the retriever's cosine similarity; with negative cosines
      the product favours low P("True"), so prefer ``"weighted"`` there);
    * ``"weighted"``: ``weight * P("True") + (1 - weight) * metadata["score"]``.

    Ties keep the given order. ``callbacks`` is accepted and not used (the model call emits no events).

    Raises:
        ModelNotFoundError: ``model`` cannot be found.
        ValueError: a bad setting, ``reranker`` together with ``dtype`` or ``device``, an unknown template name or
            an unloadable checkpoint (pydantic's ``ValidationError`` carries the TemplateError's or CheckpointError's
            message).
    """

    model: str | Path = Field(default="llava-hf/llava-v1.6-mistral-7b-hf",
                              description="Hub id or local checkpoint directory; ignored when `reranker` is given.")
    reranker: MLLMReranker | None = Field(default=None, exclude=True, repr=False,
                                          description="An already loaded MLLMReranker to use instead of `model`.")
    top_n: int = Field(default=5, ge=1, description="Documents kept (all when fewer).")
    template: str | RerankTemplate | None = Field(default=None, description="Template name or RerankTemplate.")
    combine: Literal["multiply", "weighted"] | None = Field(default=None, description="See the class docstring.")
    weight: float = Field(default=0.5, ge=0.0, le=1.0, description='Weight of P("True") when combine="weighted".')
    batch_size: int = Field(default=16, ge=1, description="Candidates per forward pass.")
    dtype: str | None = Field(default=None, description="Weights dtype when loading `model`.")
    device: str | None = Field(default=None, description="Device when loading `model`.")

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    def model_post_init(self, context: Any, /) -> None:
        if self.template is not None:
            get_template(self.template)  # a mistyped name fails now, not at the first query
        if self.reranker is None:
            self.reranker = MLLMReranker.from_pretrained(self.model, device=self.device, dtype=self.dtype)
        elif self.dtype is not None or self.device is not None:
            raise ValueError("dtype and device apply only when loading `model`; "
                             "pass them to MLLMReranker.from_pretrained instead of together with `reranker`")

    def compress_documents(self, documents: Sequence[Document], query: str | None, callbacks: Callbacks | None = None,
                           *, image: ImageSource | None = None) -> list[Document]:
        """Rerank ``documents`` for the query and keep the best ``top_n``.

        Args:
            documents: the retrieved Documents (not modified).
            query: the query text (``None`` or ``""`` for an image-only query).
            callbacks: unused.
            image: the query image (path, URL, data URI, bytes, PIL image): with ``query``, a composed query.

        Returns:
            Copies of the kept Documents, best first, with the scores in their metadata.

        Raises:
            InvalidItemError: the query or a candidate (named by index) is empty or of the wrong type.
            ImageLoadError: an image cannot be loaded (named by candidate index, or the query).
            ValueError: ``combine`` is set and a Document has no ``metadata["score"]``.
        """
        if isinstance(documents, Document):
            raise InvalidItemError("documents must be a list of Documents, got a single Document")
        documents = list(documents)
        ranked = self.reranker.rerank({"text": query or None, "image": image},
                                      [_candidate(i, doc) for i, doc in enumerate(documents)],
                                      batch_size=self.batch_size, template=self.template)
        scores = [_combine(r.score, documents[r.index].metadata.get(SCORE_KEY), r.index, self.combine, self.weight)
                  for r in ranked]
        order = sorted(range(len(ranked)), key=lambda j: (-scores[j], ranked[j].index))[: self.top_n]
        return [documents[ranked[j].index].model_copy(update={"metadata": {
            **documents[ranked[j].index].metadata, RERANK_KEY: ranked[j].score, RELEVANCE_KEY: scores[j]}})
            for j in order]

    async def acompress_documents(self, documents: Sequence[Document], query: str | None,
                                  callbacks: Callbacks | None = None, *,
                                  image: ImageSource | None = None) -> list[Document]:
        """:meth:`compress_documents` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.compress_documents, documents, query, callbacks, image=image)


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


def _candidate(index: int, doc: Any) -> dict[str, Any]:
    if not isinstance(doc, Document):
        raise InvalidItemError(f"candidate {index}: expected a langchain Document, got {type(doc).__name__}")
    stored = _stored_image(doc.page_content)
    return {"text": None if stored else doc.page_content, "image": doc.metadata.get(IMAGE_KEY) or stored}


def _stored_image(text: str) -> str | None:
    """``text`` as a data URI when it is the base64 of an image file, as ``Chroma.add_images`` stores images."""
    if not isinstance(text, str) or len(text) < 64:  # the smallest image files take ~90 base64 characters
        return None
    try:
        head = base64.b64decode(text[:64], validate=True)
    except (binascii.Error, ValueError):
        return None
    return f"data:image;base64,{text}" if head.startswith(_IMAGE_MAGIC) else None


def _combine(rerank: float, retrieval: float | None, index: int, how: str | None, weight: float) -> float:
    """The final rerank score; see :class:`MMEmbedReranker`."""
    if how is None:
        return rerank
    if retrieval is None:
        raise ValueError(f"candidate {index} has no retrieval score (metadata[{SCORE_KEY!r}]); "
                         f"combine={how!r} needs one")
    return rerank * retrieval if how == "multiply" else weight * rerank + (1.0 - weight) * retrieval
