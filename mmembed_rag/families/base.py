"""The model-family seam: what the Encoder, the finetune collator and the store need from a bi-encoder family.

A family turns items into prompts (its template, its image placeholders), prompts and images into model inputs
(:class:`Batch`), and runs its network's forward and pooling; the Encoder keeps everything family-independent
(item parsing, instructions, length-sorted batching, image loading overlapped with the forward, progress, checks).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from ..items import MultimodalItem

__all__ = ["Batch", "EmbeddingFamily", "ImageLoader", "ImageProbe"]

#: Loads item ``index``'s image as RGB (the Encoder's loader: bounds, timeouts, EXIF handling).
ImageLoader = Callable[[MultimodalItem, int], Image.Image]
#: Item ``index``'s image size as loading would give it, and the image when probing had to load it.
ImageProbe = Callable[[MultimodalItem, int], tuple[tuple[int, int], Image.Image | None]]


@dataclass
class Batch:
    """Model inputs for one batch: ``model(**inputs)`` gives its embeddings; ``positions`` index the caller's list."""

    positions: list[int]
    inputs: dict[str, torch.Tensor]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.positions, {k: v if v is None else v.to(device, non_blocking=True)
                                      for k, v in self.inputs.items()})

    @property
    def tokens(self) -> int:
        """Tokens the forward computes (padding included): rows x padded length."""
        return int(self.inputs["attention_mask"].numel())


class EmbeddingFamily(ABC):
    """One bi-encoder family: prompts, model inputs and forward for its checkpoints.

    Attributes:
        model: the network; ``model(**batch.inputs)`` returns (b, dim) L2-normalised float32 embeddings.
        tokenizer: the checkpoint's tokenizer.
        raw_config: the checkpoint's config.json.
        max_length: token budget per prompt (see each family for what it counts).
    """

    name: ClassVar[str]
    #: Whether embeddings may be cut to a prefix (Matryoshka-trained checkpoints).
    matryoshka: ClassVar[bool] = False

    model: torch.nn.Module
    tokenizer: Any
    raw_config: dict[str, Any]
    max_length: int

    @abstractmethod
    def query_prompts(self, items: list[MultimodalItem], instructions: list[str | None],
                      probe: ImageProbe) -> list[Any]:
        """Tokenised query prompts, ``instructions[i]`` (resolved text, or ``None``) for item ``i``.

        ``probe`` gives an item's image size where the family's token count depends on it.

        Raises:
            InvalidItemError: an item cannot be prompted (named by its index).
            ImageLoadError: probing an image failed.
        """

    @abstractmethod
    def document_prompts(self, items: list[MultimodalItem], probe: ImageProbe) -> list[Any]:
        """Tokenised document prompts."""

    @abstractmethod
    def token_count(self, prompt: Any) -> int:
        """Sequence length the model computes for ``prompt`` (images expanded)."""

    @abstractmethod
    def collate(self, items: list[MultimodalItem], prompts: list[Any], positions: list[int],
                load: ImageLoader, map_images: Callable = map) -> Batch:
        """Model inputs for ``items[positions]`` (right padded; images loaded with ``load``, over ``map_images``)."""

    @abstractmethod
    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the checkpoint in the family's released layout (tokenizer files copied verbatim)."""

    @abstractmethod
    def settings_key(self) -> str:
        """A string that changes whenever prompts or inputs would (caches of embeddings key on it)."""

    @property
    def dim(self) -> int:
        return self.model.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def truncated(self, prompt: Any) -> bool:
        """Whether ``prompt``'s text was cut to fit ``max_length``."""
        return bool(prompt.truncated)
