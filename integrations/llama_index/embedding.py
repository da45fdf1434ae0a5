"""MM-Embed as a LlamaIndex ``MultiModalEmbedding``: text, images and text+image in one space."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.embeddings.base import Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.embeddings.multi_modal_base import MultiModalEmbedding
from llama_index.core.schema import BaseNode, ImageType

from mmembed_rag.encoder import Encoder
from mmembed_rag.options import Shared, adapter_model

from ._common import image_source, node_item, query_item

__all__ = ["MMEmbedEmbedding"]


class MMEmbedEmbedding(MultiModalEmbedding):
    """MM-Embed as a LlamaIndex ``MultiModalEmbedding``: text, images and text+image in one space.

    Queries get ``query_instruction``; documents (text, images, nodes) never do.

    Args:
        model_name: hub id or local checkpoint directory, loaded when ``encoder`` is not given.
        encoder: an already loaded :class:`~mmembed_rag.Encoder` (then ``device``, ``dtype`` and the loading keys of
            ``encoder_kwargs`` must be left unset). Held privately and shared by copies of this object.
        **kwargs: the fields below (``dtype``, ``device``, ``query_instruction``, ``embed_batch_size``,
            ``encoder_kwargs``...).

    Raises:
        ValueError: loading options together with ``encoder``, or a bad ``encoder_kwargs`` key or value.
    """

    model_name: str = Field(default="nvidia/MM-Embed", description="Hub id or local directory of the checkpoint.")
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16; None picks one per device.")
    device: str | None = Field(default=None, description="cpu, cuda, cuda:1...; None picks CUDA when available.")
    query_instruction: str | None = Field(
        default=None, description="Query task instruction: a catalog name such as 'mscoco_t2i' or free text.")
    embed_batch_size: int = Field(default=8, gt=0, le=2048, description="Items per forward pass of the Encoder.")
    encoder_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Encoder options: max_length, image_workers, max_image_pixels, url_timeout "
        "(when loading `model_name`) and batch_size (same as `embed_batch_size`).")
    _encoder: Shared[Encoder] = PrivateAttr()

    def __init__(self, model_name: str = "nvidia/MM-Embed", encoder: Encoder | None = None, **kwargs: Any) -> None:
        super().__init__(model_name=model_name, **kwargs)
        self._encoder, self.embed_batch_size = adapter_model(
            Encoder.from_pretrained, model_name, encoder, self.encoder_kwargs, batch_size=self.embed_batch_size,
            batch_field="embed_batch_size", batch_size_given="embed_batch_size" in kwargs, device=self.device,
            dtype=self.dtype)
        loaded = self._encoder.value
        self.device, self.dtype = str(loaded.device), str(loaded.dtype).removeprefix("torch.")

    @classmethod
    def class_name(cls) -> str:
        return "MMEmbedEmbedding"

    @property
    def encoder(self) -> Encoder:
        """The wrapped Encoder (shared, never copied, by copies of this object)."""
        return self._encoder.value

    def embed_query_items(self, items: Sequence[Any], instruction: str | None = None) -> list[Embedding]:
        """Query embeddings of items (text, image or both each) with ``instruction`` or ``query_instruction``."""
        vectors = self.encoder.encode_queries(items, instruction=instruction or self.query_instruction,
                                              batch_size=self.embed_batch_size)
        return vectors.tolist()

    def embed_document_items(self, items: Sequence[Any], show_progress: bool = False) -> list[Embedding]:
        """Document embeddings of items (text, image or both each), never with an instruction."""
        return self.encoder.encode_documents(items, batch_size=self.embed_batch_size,
                                             show_progress=show_progress).tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self.embed_query_items([query])[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self.embed_document_items([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self.embed_document_items(texts)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    def _get_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return self._get_image_embeddings([img_file_path])[0]

    def _get_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        return self.embed_document_items([{"image": image_source(img)} for img in img_file_paths])

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
        return self.embed_query_items([query_item(text, image)], instruction)[0]

    async def aget_query_embedding_multimodal(self, text: str | None = None, image: ImageType | Any = None,
                                              instruction: str | None = None) -> Embedding:
        """Async :meth:`get_query_embedding_multimodal`, run in a worker thread."""
        return await asyncio.to_thread(self.get_query_embedding_multimodal, text, image, instruction)

    def get_node_embeddings(self, nodes: Sequence[BaseNode], show_progress: bool = False) -> list[Embedding]:
        """Document embeddings of nodes in one Encoder call: text as text, images as image (+ their text)."""
        return self.embed_document_items([node_item(node) for node in nodes], show_progress)

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """As an ``IngestionPipeline`` transformation: set ``node.embedding``, images included."""
        for node, vector in zip(nodes, self.get_node_embeddings(nodes, kwargs.get("show_progress", False))):
            node.embedding = vector
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)
