"""The Qwen3-VL-Embedding family: transformers' Qwen3-VL run causally, the chat template with the instruction as
the system message, dynamic-resolution images, last-token pooling, L2 normalisation (as the official embedder)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, Qwen3VLModel

from ...errors import InvalidItemError
from ...items import MultimodalItem
from ...modeling.checkpoint import write_weights
from ...tokenization import PromptTokenizer
from ..base import Batch, EmbeddingFamily, ImageLoader, ImageProbe
from .chat import ChatPrompt, ChatTemplate, load_chat_template, with_period
from .checkpoint import copy_support_files, load_pretrained
from .vision import MAX_PIXELS, MIN_PIXELS, QwenImages

__all__ = ["Qwen3VLEmbeddingModel", "Qwen3VLFamily", "DEFAULT_INSTRUCTION"]

#: The official embedder's default instruction (documents get it; queries get their task's).
DEFAULT_INSTRUCTION = "Represent the user's input."


class Qwen3VLEmbeddingModel(nn.Module):
    """Qwen3-VL's backbone under ``model`` (the released key names), pooled at the last real token."""

    def __init__(self, model: Qwen3VLModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def __setattr__(self, name: str, value: object) -> None:
        if name == "language_model":  # LoRA wraps it where the backbone holds it (the released key names)
            self.model.language_model = value
            return
        super().__setattr__(name, value)

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.visual

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(b, hidden) L2-normalised embeddings of right-padded prompts (image tokens expanded)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
                            use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1  # right padding: the last real token
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
        return F.normalize(pooled.float(), p=2, dim=-1)


class Qwen3VLFamily(EmbeddingFamily):
    """Qwen3-VL-Embedding checkpoints (``model_type: qwen3_vl``, no LM head).

    Args:
        model: the network.
        tokenizer: the checkpoint's tokenizer (renders the chat template).
        images: the dynamic-resolution image processor.
        template: the chat template.
        tokens: the prompt tokenizer (the checkpoint's ``tokenizer.json``).
        max_length: tokens per sequence, images included (the official 8192); longer ones are cut at the end.
        default_instruction: the instruction of documents and of queries without one.
        source: the checkpoint directory (exports copy its tokenizer and processor files).
    """

    name = "qwen3_vl"
    matryoshka = True

    def __init__(self, model: Qwen3VLEmbeddingModel, tokenizer: Any, images: QwenImages, template: str,
                 tokens: PromptTokenizer, max_length: int = 8192, default_instruction: str = DEFAULT_INSTRUCTION,
                 source: Path | None = None, raw_config: dict[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.images = images
        self.chat = ChatTemplate(template, tokenizer, tokens)
        self.tokens = tokens
        self.max_length = max_length
        self.default_instruction = default_instruction
        self.source = source
        self.raw_config = raw_config or {}
        self.image_pad_id = model.config.image_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_checkpoint(cls, path: Path, raw: dict[str, Any], dtype: torch.dtype, device: torch.device,
                        device_map: str | dict | None, max_length: int | None, min_pixels: int = MIN_PIXELS,
                        max_pixels: int = MAX_PIXELS, **options: Any) -> Qwen3VLFamily:
        backbone = load_pretrained(Qwen3VLModel, path, dtype, device, device_map, generative_hint=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(Qwen3VLEmbeddingModel(backbone), tokenizer, QwenImages.from_checkpoint(path, min_pixels, max_pixels),
                   load_chat_template(path, tokenizer), PromptTokenizer.from_checkpoint(path),
                   max_length=max_length or 8192, source=path, raw_config=raw, **options)

    def query_prompts(self, items: list[MultimodalItem], instructions: list[str | None],
                      probe: ImageProbe) -> list[ChatPrompt]:
        return [self._prompt(index, it, instruction, probe)
                for index, (it, instruction) in enumerate(zip(items, instructions))]

    def document_prompts(self, items: list[MultimodalItem], probe: ImageProbe) -> list[ChatPrompt]:
        return [self._prompt(index, it, None, probe) for index, it in enumerate(items)]

    def _prompt(self, index: int, item: MultimodalItem, instruction: str | None, probe: ImageProbe) -> ChatPrompt:
        user: list[tuple[str, str | None]] = []
        tokens, loaded = 0, None
        if item.image is not None:
            (width, height), loaded = probe(item, index)
            try:
                tokens = self.images.tokens(width, height)
            except ValueError as err:
                raise InvalidItemError(f"item {index}: image {err}") from err
            user.append(("image", None))
        if item.text is not None:
            user.append(("text", item.text))
        system = with_period(instruction) if instruction else self.default_instruction
        ids = self.tokens.encode(self.chat.render(system, user))
        full = len(ids) + max(tokens - 1, 0)
        length = min(full, self.max_length)
        if tokens and length < full:
            slot = ids.index(self.image_pad_id)
            if slot + tokens > length:
                raise InvalidItemError(f"item {index}: its image needs {tokens} tokens after {slot} prompt tokens, "
                                       f"more than max_length={self.max_length}")
        return ChatPrompt(tuple(ids), tokens, length, length < full, loaded)

    def token_count(self, prompt: ChatPrompt) -> int:
        return prompt.length

    def collate(self, items: list[MultimodalItem], prompts: list[ChatPrompt], positions: list[int],
                load: ImageLoader, map_images: Any = map) -> Batch:
        length = max(prompts[i].length for i in positions)
        input_ids = torch.full((len(positions), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(positions), length), dtype=torch.long)
        with_image = [i for i in positions if prompts[i].has_image]
        processed = list(map_images(lambda i: self._pixels(items[i], prompts[i], i, load), with_image))
        for row, i in enumerate(positions):
            prompt = prompts[i]
            ids = torch.tensor(prompt.ids, dtype=torch.long)
            if prompt.has_image:
                ids = ids.repeat_interleave(torch.where(ids == self.image_pad_id, prompt.image_tokens, 1))
            input_ids[row, :prompt.length] = ids[:prompt.length]
            attention[row, :prompt.length] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention,
                  "mm_token_type_ids": (input_ids == self.image_pad_id).to(torch.int32) * attention.to(torch.int32)}
        if processed:
            inputs["pixel_values"] = torch.cat([p for p, _ in processed])
            inputs["image_grid_thw"] = torch.cat([g for _, g in processed])
        return Batch(positions, inputs)

    def _pixels(self, item: MultimodalItem, prompt: ChatPrompt, index: int,
                load: ImageLoader) -> tuple[torch.Tensor, torch.Tensor]:
        image = prompt.image if prompt.image is not None else load(item, index)
        if self.images.tokens(*image.size) != prompt.image_tokens:
            raise InvalidItemError(f"item {index}: the image's size changed between planning and loading "
                                   f"({image.size[0]}x{image.size[1]} now)")
        return self.images(image)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        path = Path(path)
        write_weights(self.model.state_dict(), path, self.raw_config, max_shard_bytes)
        copy_support_files(self.source, path)
        if self.source is None:
            self.tokenizer.save_pretrained(str(path))

    def settings_key(self) -> str:
        probe = self.tokens.encode(self.chat.render(self.default_instruction, [("image", None), ("text", "probe")]))
        return f"{self.name}|{self.max_length}|{probe}|{self.images.min_pixels}|{self.images.max_pixels}|{self.dtype}"
