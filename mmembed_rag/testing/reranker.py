"""A tiny LLaVA-NeXT generative checkpoint for the zero-shot reranker's tests, notebooks and benchmark.

``make_tiny_reranker`` writes a randomly initialised ``LlavaNextForConditionalGeneration`` in the layout
of the llava-hf releases (config.json, safetensors, a Llama-style tokenizer with ``<image>`` and single
tokens for ``"▁True"`` / ``"▁False"``, a Mistral-style ``[INST] ... [/INST]`` chat template, LLaVA-NeXT
processor files). Nothing is downloaded; it builds in about a second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, PreTrainedTokenizerFast

from .checkpoint import (
    ANSWER_WORDS,
    _add_words,
    _patch_tokenizer_config,
    _processor_files,
    _train_tokenizer,
    tiny_config,
)

__all__ = ["make_tiny_reranker", "TINY_CHAT_TEMPLATE"]

#: Mistral-instruct style, as in llava-hf/llava-v1.6-mistral-7b-hf (text-only messages).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
)
# Fields of MM-Embed's config that a generative LLaVA-NeXT checkpoint does not have.
_ENCODER_ONLY_FIELDS = ("add_eos_token", "architectures", "auto_map", "global_image_patch_only", "retriever",
                        "padding_side", "transformers_version", "torch_dtype", "use_image_newline_parameter")


@torch.no_grad()
def _spread_answers(model: LlavaNextForConditionalGeneration, backend: Tokenizer, answer_ids: list[int],
                    scale: float) -> None:
    """Make the True-vs-False logit vary around 0 with the input, by ~``scale`` times the random spread."""
    prompts = ["[INST] Query: a red square\nPassage: a blue circle [/INST]",
               "[INST] Image: the cat\nCaption: energy stored in glucose [/INST]"]
    last = [model.model.language_model(input_ids=torch.tensor([[1, *backend.encode(p).ids]])).last_hidden_state[0, -1]
            for p in prompts]
    typical = torch.stack(last).mean(0)
    weight = model.lm_head.weight
    true_id, false_id = answer_ids
    direction = weight[true_id] - weight[false_id]
    direction -= (direction @ typical) / (typical @ typical) * typical
    weight[true_id] = weight[false_id] + scale * direction


def make_tiny_reranker(path: str | os.PathLike, seed: int = 0, vocab_size: int = 1000,
                       dtype: torch.dtype = torch.float16, answer_scale: float = 30.0,
                       vision_from: str | os.PathLike | None = None, **config_overrides: Any) -> Path:
    """Write a randomly initialised LLaVA-NeXT generative checkpoint to ``path`` and return the path.

    Args:
        path: target directory (created).
        seed: weights are a function of the seed and sizes only.
        vocab_size: BPE vocabulary before the answer words, ``<image>`` and ``<pad>`` are appended.
        dtype: stored weight dtype (llava-hf stores float16).
        answer_scale: the "▁True" - "▁False" direction of ``lm_head`` is scaled by this (after removing its
            component along a typical final hidden state), so that a random model's P("True") spreads over
            (0, 1) instead of sitting near one value: equality tests of scores stay meaningful.
        vision_from: an MM-Embed checkpoint of the same sizes whose vision tower, projector and image newline
            this model takes (a generative checkpoint "whose vision side equals" it, for building bases from parts).
        **config_overrides: sizes passed to :func:`mmembed_rag.testing.tiny_config` (``hidden_size``,
            ``layers``, ``image_size``, ``vision_hidden``, ``vision_layers``...).

    Example:
        >>> from mmembed_rag.reranker import MLLMReranker
        >>> reranker = MLLMReranker.from_pretrained(make_tiny_reranker(tmp_path / "rr"), device="cpu")
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = _add_words(_train_tokenizer(vocab_size), ANSWER_WORDS)
    answer_ids = [backend.token_to_id("▁True"), backend.token_to_id("▁False")]
    image_id = backend.get_vocab_size()
    backend.add_special_tokens(["<image>", "<pad>"])
    model_vocab = (image_id + 2 + 63) // 64 * 64
    raw = tiny_config(image_id, model_vocab, **config_overrides)
    for key in _ENCODER_ONLY_FIELDS:
        raw.pop(key, None)
    raw["text_config"]["tie_word_embeddings"] = False
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(**raw)).eval()
    _spread_answers(model, backend, answer_ids, answer_scale)
    if vision_from is not None:
        _take_vision(model, Path(vision_from))
    model.to(dtype).save_pretrained(str(path), safe_serialization=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", additional_special_tokens=["<image>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    _patch_tokenizer_config(path)
    _processor_files(path, raw["vision_config"]["image_size"], raw["image_grid_pinpoints"])
    return path


@torch.no_grad()
def _take_vision(model: LlavaNextForConditionalGeneration, source: Path) -> None:
    from ..modeling.checkpoint import load_model

    encoder, _ = load_model(source, dtype="float32")
    inner = model.model
    inner.vision_tower.load_state_dict(encoder.vision_tower.state_dict())
    inner.multi_modal_projector.load_state_dict(encoder.multi_modal_projector.state_dict())
    inner.image_newline.copy_(encoder.image_newline)
