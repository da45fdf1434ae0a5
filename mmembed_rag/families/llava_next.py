"""The LLaVA-NeXT / MM-Embed family: NV-Embed-v1's Mistral run bidirectionally, one global 577-token image view,
"Instruct: ...\\nQuery: " prompts with the instruction masked out of latent-attention pooling."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import InvalidItemError
from ..items import MultimodalItem
from ..modeling.checkpoint import load_model, save_model
from ..modeling.model import MMEmbedModel
from ..preprocessing import GlobalViewProcessor
from ..prompts import Prompt, PromptBuilder
from ..tokenization import PromptTokenizer
from .base import Batch, EmbeddingFamily, ImageLoader, ImageProbe

__all__ = ["MMEmbedFamily"]


class MMEmbedFamily(EmbeddingFamily):
    """MM-Embed checkpoints (``model_type: llava_next`` with an NV-Embed retriever).

    Args:
        model: the network.
        tokenizer: the checkpoint's tokenizer.
        image_processor: RGB image → the global-view tensor.
        max_length: text tokens per prompt before image expansion (an instruction is never cut).
        add_eos: append EOS to prompts, as the release does.
        prompt_tokenizer: default: built from ``tokenizer``'s backend; ``from_checkpoint`` reads the
            checkpoint's ``tokenizer.json`` verbatim (what reproduces the release).
    """

    name = "llava_next"

    def __init__(self, model: MMEmbedModel, tokenizer: PreTrainedTokenizerBase,
                 image_processor: GlobalViewProcessor, max_length: int = 4096, add_eos: bool = True,
                 prompt_tokenizer: PromptTokenizer | None = None, raw_config: dict[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        tokens = prompt_tokenizer or PromptTokenizer.from_tokenizer(tokenizer)
        self.prompts = PromptBuilder(tokens, model.image_token_index, max_length, add_eos)
        self.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.raw_config = raw_config or {}

    @classmethod
    def from_checkpoint(cls, path: Path, raw: dict[str, Any], dtype: torch.dtype, device: torch.device,
                        device_map: str | dict | None, max_length: int, **options: Any) -> MMEmbedFamily:
        model, raw = load_model(path, dtype=dtype, device=device, device_map=device_map)
        processor = GlobalViewProcessor.from_checkpoint(path, model.image_size)
        options.setdefault("add_eos", bool(raw.get("add_eos_token", True)))
        return cls(model, AutoTokenizer.from_pretrained(str(path)), processor, max_length=max_length,
                   prompt_tokenizer=PromptTokenizer.from_checkpoint(path), raw_config=raw, **options)

    @property
    def max_length(self) -> int:  # type: ignore[override]
        return self.prompts.max_length

    def query_prompts(self, items: list[MultimodalItem], instructions: list[str | None],
                      probe: ImageProbe) -> list[Prompt]:
        prompts = []
        for index, (it, instruction) in enumerate(zip(items, instructions)):
            try:
                prompts.append(self.prompts.query(it.text, it.image is not None, instruction))
            except InvalidItemError as exc:
                raise InvalidItemError(f"item {index}: {exc}") from exc
        return prompts

    def document_prompts(self, items: list[MultimodalItem], probe: ImageProbe) -> list[Prompt]:
        return [self.prompts.document(it.text, it.image is not None) for it in items]

    def token_count(self, prompt: Prompt) -> int:
        return len(prompt.ids) + (self.model.tokens_per_image - 1 if prompt.has_image else 0)

    def collate(self, items: list[MultimodalItem], prompts: list[Prompt], positions: list[int],
                load: ImageLoader, map_images: Any = map) -> Batch:
        per_image = self.model.tokens_per_image
        image_id = self.model.image_token_index
        length = max(self.token_count(prompts[i]) for i in positions)
        input_ids = torch.full((len(positions), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(positions), length), dtype=torch.long)
        with_image = [i for i in positions if prompts[i].has_image]
        pixels = list(map_images(lambda i: self.image_processor(load(items[i], i)), with_image))
        for row, i in enumerate(positions):
            prompt = prompts[i]
            ids = torch.tensor(prompt.ids, dtype=torch.long)
            if prompt.has_image:
                ids = ids.repeat_interleave(torch.where(ids == image_id, per_image, 1))
            input_ids[row, :len(ids)] = ids
            attention[row, :len(ids)] = 1
        pool = attention.clone()
        for row, i in enumerate(positions):
            pool[row, :prompts[i].masked_prefix] = 0
        empty = [positions[row] for row in (pool.sum(dim=1) == 0).nonzero().flatten().tolist()]
        if empty:  # PromptBuilder refuses such prompts; a hand-made Prompt must not pool to a zero vector either
            raise InvalidItemError(f"item {empty[0]}: its prompt has no token left to pool "
                                   f"(masked_prefix {prompts[empty[0]].masked_prefix} >= its length)")
        return Batch(positions, {"input_ids": input_ids, "attention_mask": attention, "pool_mask": pool,
                                 "pixel_values": torch.stack(pixels) if pixels else None})

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        path = Path(path)
        save_model(self.model, path, self.raw_config, max_shard_bytes=max_shard_bytes)
        if not self.prompts.tokens.copy_files(path):
            self.tokenizer.save_pretrained(str(path))
        proc = self.image_processor
        file = path / "preprocessor_config.json"
        preprocessor = json.loads(file.read_text()) if file.is_file() else {}
        preprocessor.update({"image_mean": proc.mean.tolist(), "image_std": proc.std.tolist(),
                             "resample": int(proc.resample), "rescale_factor": float(proc.rescale_factor)})
        file.write_text(json.dumps(preprocessor, indent=2, sort_keys=True))

    def settings_key(self) -> str:
        return f"{self.prompts.max_length}|{self.prompts.document('probe', True).ids}|{self.dtype}"
