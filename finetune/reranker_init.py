"""A generative reranker started from a trained bi-encoder: its vision tower, projector and language model carried over.

The MM-Embed paper reranks zero-shot with a pretrained MLLM. Where none fits (the tiny models of the demo and the
benchmarks, or a domain whose images a generic MLLM has not seen), the bi-encoder's own weights already read the
domain's images and texts: :func:`reranker_from_encoder` writes a ``LlavaNextForConditionalGeneration``
checkpoint whose vision tower, projector, ``image_newline`` and language model are the bi-encoder's, and whose
``lm_head`` starts as a copy of the input embedding (the bi-encoder has none). The bi-encoder's language model
ran bidirectionally; the reranker runs it causally, so it is a starting point for
:func:`~mmembed_rag.finetune.reranker_train.train_reranker`, not a zero-shot reranker.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from mmembed_rag.modeling.checkpoint import load_model
from mmembed_rag.rerank_templates import PromptEncoder
from mmembed_rag.tokenization import PromptTokenizer

__all__ = ["reranker_from_encoder"]

_CARRIED = ("preprocessor_config.json", "processor_config.json")
_GENERATIVE_FIELDS = ("image_grid_pinpoints", "image_token_index", "projector_hidden_act", "vision_feature_layer",
                      "vision_feature_select_strategy", "multimodal_projector_bias")


@torch.no_grad()
def reranker_from_encoder(encoder_dir: str | os.PathLike, output_dir: str | os.PathLike,
                          answer_tokens: tuple[str, str] = ("True", "False")) -> Path:
    """Write a LLaVA-NeXT generative checkpoint initialised from the bi-encoder in ``encoder_dir``.

    Args:
        encoder_dir: a checkpoint in the MM-Embed format (what the finetune pipeline exports).
        output_dir: target directory (created), loadable by :meth:`MLLMReranker.from_pretrained`.
        answer_tokens: the reranker's answer words; each must be one token of the bi-encoder's tokenizer.

    Returns:
        ``output_dir``.

    Raises:
        ValueError: an answer word is not a single token of the tokenizer.
        CheckpointError: ``encoder_dir`` is not a valid checkpoint.
    """
    source, out = Path(encoder_dir), Path(output_dir)
    tokens = PromptTokenizer.from_checkpoint(source)
    probe = PromptEncoder(tokens, image_token_id=-1, tokens_per_image=1, max_length=1)
    for word in answer_tokens:
        probe.answer_token_id(word)  # raises ValueError naming the word
    encoder, raw = load_model(source, dtype="float32")
    text = encoder.language_model.config.to_dict()  # the network that ran, profile applied (rope theta etc.)
    rows = encoder.language_model.get_input_embeddings().weight.shape[0]
    vocab = max(rows, raw["image_token_index"] + 2)  # room for <image> and <pad>, as LLaVA-NeXT has
    text["vocab_size"] = (vocab + 63) // 64 * 64
    config = LlavaNextConfig(text_config=text, vision_config=encoder.config.vision_config.to_dict(),
                             tie_word_embeddings=False, architectures=["LlavaNextForConditionalGeneration"],
                             **{k: raw[k] for k in _GENERATIVE_FIELDS if k in raw})
    model = LlavaNextForConditionalGeneration(config).eval()
    state = {f"model.{key}": value for key, value in encoder.state_dict().items()
             if not key.startswith("latent_attention_model.")}
    embed = torch.zeros(text["vocab_size"], config.text_config.hidden_size)
    embed[:rows] = encoder.language_model.get_input_embeddings().weight
    state["model.language_model.embed_tokens.weight"] = embed
    state["lm_head.weight"] = embed.clone()  # a tied start: the next token scores like its input embedding
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"carry-over does not cover the generative model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokens.copy_files(out)
    for name in _CARRIED:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out
