"""Zero-shot MLLM reranking of LangChain Documents as a ``BaseDocumentCompressor``."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, PrivateAttr

from mmembed_rag.errors import InvalidItemError
from mmembed_rag.images import ImageSource
from mmembed_rag.options import RERANKER_OPTIONS, Shared, adapter_model
from mmembed_rag.rerank_templates import RerankTemplate, get_template
from mmembed_rag.reranker import MLLMReranker, combine_ranked
from mmembed_rag.reranker_base import Reranker

from ._common import IMAGE_KEY, RELEVANCE_KEY, RERANK_KEY, SCORE_KEY

__all__ = ["MMEmbedReranker"]

# File signatures (PNG, JPEG, GIF, WebP, BMP, TIFF) that tell Chroma.add_images' base64 page_content from text.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class MMEmbedReranker(BaseDocumentCompressor):
    """Zero-shot MLLM reranking of text and image Documents for a text, image or composed query.

    Each Document becomes one candidate: its image is ``metadata["image"]`` (what :meth:`MMEmbedRetriever.add_images`
    records) or, failing that, the ``page_content`` itself when it is the base64 of an image file (what
    ``Chroma.add_images`` stores); its text is the ``page_content`` unless that is such base64.
    :meth:`Reranker.rerank` scores them; the best ``top_n`` come back as copies whose metadata gains
    ``"rerank_score"`` (P("True")) and ``"relevance_score"``, the final score:

    * ``combine=None`` (default): P("True");
    * ``"multiply"``: P("True") × ``metadata["score"]`` (the retriever's cosine similarity; with negative cosines
      the product favours low P("True"), so prefer ``"weighted"`` there);
    * ``"weighted"``: ``weight * P("True") + (1 - weight) * metadata["score"]``.

    Ties keep the given order. ``callbacks`` is accepted and not used (the model call emits no events).

    Args:
        reranker: an already loaded reranker (``MLLMReranker.from_pretrained``) to use instead of loading ``model``;
            held privately and shared by copies (``model_copy(deep=True)`` does not copy the model).
        **data: the fields below.

    Raises:
        ModelNotFoundError: ``model`` cannot be found.
        ValueError: a bad setting, ``reranker`` together with ``dtype``, ``device`` or loading ``encoder_kwargs``,
            an unknown template name or an unloadable checkpoint (pydantic's ``ValidationError`` carries the
            TemplateError's or CheckpointError's message).
    """

    model: str | Path = Field(default="llava-hf/llava-v1.6-mistral-7b-hf",
                              description="Hub id or local checkpoint directory; ignored when `reranker` is given.")
    top_n: int = Field(default=5, ge=1, description="Documents kept (all when fewer).")
    template: str | RerankTemplate | None = Field(default=None, description="LLaVA-NeXT rerankers: template name "
                                                  "or RerankTemplate.")
    instruction: str | None = Field(default=None, description="Qwen3-VL rerankers: the task instruction; None: the "
                                    "checkpoint family's default.")
    combine: Literal["multiply", "weighted"] | None = Field(default=None, description="See the class docstring.")
    weight: float = Field(default=0.5, ge=0.0, le=1.0, description='Weight of P("True") when combine="weighted".')
    batch_size: int = Field(default=16, ge=1, description="Candidates per forward pass.")
    dtype: str | None = Field(default=None, description="Weights dtype when loading `model`.")
    device: str | None = Field(default=None, description="Device when loading `model`.")
    encoder_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Reranker options: max_length, max_image_pixels, url_timeout (when "
        "loading `model`) and batch_size (same as the `batch_size` field).")
    _reranker: Shared[Reranker] = PrivateAttr()

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    def __init__(self, *, reranker: Reranker | None = None, **data: Any) -> None:
        super().__init__(**data)
        if self.template is not None:
            get_template(self.template)  # a mistyped name fails now, not at the first query
        self._reranker, self.batch_size = adapter_model(
            MLLMReranker.from_pretrained, self.model, reranker, self.encoder_kwargs, allowed=RERANKER_OPTIONS,
            batch_size=self.batch_size, batch_size_given="batch_size" in data, what="reranker", device=self.device,
            dtype=self.dtype)

    @property
    def reranker(self) -> Reranker:
        """The wrapped Reranker (shared, never copied, by copies of this compressor)."""
        return self._reranker.value

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
                                      batch_size=self.batch_size, template=self.template,
                                      instruction=self.instruction)
        kept = combine_ranked(ranked, [doc.metadata.get(SCORE_KEY) for doc in documents], self.combine, self.weight,
                              self.top_n, score_field=f"metadata[{SCORE_KEY!r}]")
        return [documents[r.index].model_copy(update={"metadata": {
            **documents[r.index].metadata, RERANK_KEY: r.score, RELEVANCE_KEY: score}}) for r, score in kept]

    async def acompress_documents(self, documents: Sequence[Document], query: str | None,
                                  callbacks: Callbacks | None = None, *,
                                  image: ImageSource | None = None) -> list[Document]:
        """:meth:`compress_documents` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.compress_documents, documents, query, callbacks, image=image)


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
