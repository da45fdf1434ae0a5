"""MM-Embed as a LangChain ``Embeddings``: text, image and text+image share one space."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from mmembed_rag.encoder import Encoder
from mmembed_rag.errors import InvalidItemError
from mmembed_rag.images import ImageSource
from mmembed_rag.instructions import resolve_instruction
from mmembed_rag.items import to_item
from mmembed_rag.options import Shared, adapter_model

__all__ = ["MMEmbedEmbeddings"]


class MMEmbedEmbeddings(BaseModel, Embeddings):
    """MM-Embed as a LangChain ``Embeddings``: text, image and text+image share one space.

    Documents are embedded without an instruction; queries with ``query_instruction`` (a catalog name
    such as ``"mscoco_t2i"`` or free text). Vectors are L2-normalised, so dot product is cosine.

    Args:
        encoder: an already loaded :class:`~mmembed_rag.Encoder` to use instead of loading ``model``; held
            privately and shared by copies (``model_copy(deep=True)`` does not copy the model).
        **data: the fields below.

    Raises:
        ModelNotFoundError, CheckpointError: ``model`` cannot be loaded.
        ValueError: ``encoder`` is given together with ``dtype``, ``device`` or loading ``encoder_kwargs``; a bad
            ``encoder_kwargs`` key or value.
        InvalidItemError, UnknownTaskError: ``query_instruction`` is empty or a mistyped catalog name.
    """

    model: str | Path = Field(default="nvidia/MM-Embed",
                              description="Hub id or local checkpoint directory; ignored when `encoder` is given.")
    query_instruction: str | None = Field(default=None, description="Instruction for queries (name or text).")
    dtype: str | None = Field(default=None, description="Weights dtype when loading `model`.")
    device: str | None = Field(default=None, description="Device when loading `model`.")
    batch_size: int = Field(default=8, ge=1, description="Items per forward pass.")
    encoder_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Encoder options: max_length, image_workers, max_image_pixels, url_timeout "
        "(when loading `model`) and batch_size (same as the `batch_size` field).")
    _encoder: Shared[Encoder] = PrivateAttr()

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    def __init__(self, *, encoder: Encoder | None = None, **data: Any) -> None:
        super().__init__(**data)
        resolve_instruction(self.query_instruction)  # fail now, before loading, on a mistyped catalog name
        self._encoder, self.batch_size = adapter_model(
            Encoder.from_pretrained, self.model, encoder, self.encoder_kwargs, batch_size=self.batch_size,
            batch_size_given="batch_size" in data, device=self.device, dtype=self.dtype)

    @property
    def encoder(self) -> Encoder:
        """The wrapped Encoder (shared, never copied, by copies of this object)."""
        return self._encoder.value

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

    async def aembed_image(self, uris: list[str]) -> list[list[float]]:
        """:meth:`embed_image` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.embed_image, uris)

    async def aembed_multimodal_query(self, text: str | None = None, image: ImageSource | None = None,
                                      instruction: str | None = None) -> list[float]:
        """:meth:`embed_multimodal_query` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.embed_multimodal_query, text, image, instruction)
