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

from ._common import image_source, node_item, query_item

__all__ = ["MMEmbedEmbedding"]


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
        return self._documents([{"image": image_source(img)} for img in img_file_paths])

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
        return self._queries([query_item(text, image)], instruction)[0]

    async def aget_query_embedding_multimodal(self, text: str | None = None, image: ImageType | Any = None,
                                              instruction: str | None = None) -> Embedding:
        """Async :meth:`get_query_embedding_multimodal`, run in a worker thread."""
        return await asyncio.to_thread(self.get_query_embedding_multimodal, text, image, instruction)

    def get_node_embeddings(self, nodes: Sequence[BaseNode], show_progress: bool = False) -> list[Embedding]:
        """Document embeddings of nodes in one Encoder call: text as text, images as image (+ their text)."""
        return self._documents([node_item(node) for node in nodes], show_progress)

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """As an ``IngestionPipeline`` transformation: set ``node.embedding``, images included."""
        for node, vector in zip(nodes, self.get_node_embeddings(nodes, kwargs.get("show_progress", False))):
            node.embedding = vector
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)
