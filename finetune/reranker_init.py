"""A generative reranker started from a trained bi-encoder: its vision tower, projector and language model carried over.

The MM-Embed paper reranks zero-shot with a pretrained MLLM. Where none fits (the tiny models of the demo and the
benchmarks, or a domain whose images a generic MLLM has not seen), the bi-encoder's own weights already read the
domain's images and texts: :func:`reranker_from_encoder` writes a ``LlavaNextForConditionalGeneration``
checkpoint whose vision tower, projector, ``image_newline`` and language model are the bi-encoder's, and whose
``lm_head`` is the base's (``lm_head_from``: the generative checkpoint the bi-encoder was built from) or starts as a
copy of the input embedding (the bi-encoder has none). A Qwen3-VL-Embedding bi-encoder gives a
``Qwen3VLForConditionalGeneration`` the same way. The bi-encoder's language model may have run bidirectionally
(MM-Embed); the reranker runs it causally, so it is a starting point for
:func:`~mmembed_rag.finetune.reranker_train.train_reranker`, not a zero-shot reranker.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from mmembed_rag.errors import CheckpointError
from mmembed_rag.families import read_family
from mmembed_rag.families.qwen3_vl.checkpoint import copy_support_files
from mmembed_rag.modeling.checkpoint import _shard, load_model, weight_files, write_weights
from mmembed_rag.rerank_templates import PromptEncoder
from mmembed_rag.tokenization import PromptTokenizer

__all__ = ["reranker_from_encoder"]

_CARRIED = ("preprocessor_config.json", "processor_config.json")
_GENERATIVE_FIELDS = ("image_grid_pinpoints", "image_token_index", "projector_hidden_act", "vision_feature_layer",
                      "vision_feature_select_strategy", "multimodal_projector_bias")


@torch.no_grad()
def reranker_from_encoder(encoder_dir: str | os.PathLike, output_dir: str | os.PathLike,
                          answer_tokens: tuple[str, str] = ("True", "False"),
                          lm_head_from: str | os.PathLike | None = None) -> Path:
    """Write a generative checkpoint of the bi-encoder's family initialised from the bi-encoder in ``encoder_dir``.

    Args:
        encoder_dir: a bi-encoder checkpoint (what the finetune pipeline exports), MM-Embed or Qwen3-VL.
        output_dir: target directory (created), loadable by :meth:`MLLMReranker.from_pretrained`.
        answer_tokens: MM-Embed: the reranker's answer words; each must be one token of the tokenizer (a Qwen3-VL
            reranker answers "yes" / "no", the official words).
        lm_head_from: a generative checkpoint of the same family and width whose LM head the reranker takes
            (e.g. the one :func:`~mmembed_rag.finetune.build_base.build_base` built the bi-encoder from);
            ``None``: a copy of the input embedding.

    Returns:
        ``output_dir``.

    Raises:
        ValueError: an answer word is not a single token of the tokenizer.
        CheckpointError: ``encoder_dir`` is not a valid checkpoint, or ``lm_head_from`` has no fitting LM head.
    """
    source, out = Path(encoder_dir), Path(output_dir)
    family, raw = read_family(source)
    head = _lm_head(Path(lm_head_from)) if lm_head_from is not None else None
    if family == "qwen3_vl":
        return _qwen_reranker(source, out, raw, head)
    tokens = PromptTokenizer.from_checkpoint(source)
    probe = PromptEncoder(tokens, image_token_id=-1, tokens_per_image=1, max_length=1)
    for word in answer_tokens:
        probe.answer_token_id(word)  # raises ValueError naming the word
    encoder, raw = load_model(source, dtype="float32")
    text = encoder.language_model.config.to_dict()  # the network that ran, profile applied (rope theta etc.)
    rows = encoder.language_model.get_input_embeddings().weight.shape[0]
    vocab = max(rows, raw["image_token_index"] + 2)  # room for <image> and <pad>, as LLaVA-NeXT has
    text["vocab_size"] = (vocab + 63) // 64 * 64 if head is None else head.shape[0]
    if head is not None and (head.shape[0] < rows or head.shape[1] != text["hidden_size"]):
        raise CheckpointError(f"{lm_head_from}: LM head of shape {tuple(head.shape)} does not fit a {rows}-row, "
                              f"{text['hidden_size']}-wide language model")
    config = LlavaNextConfig(text_config=text, vision_config=encoder.config.vision_config.to_dict(),
                             tie_word_embeddings=False, architectures=["LlavaNextForConditionalGeneration"],
                             **{k: raw[k] for k in _GENERATIVE_FIELDS if k in raw})
    model = LlavaNextForConditionalGeneration(config).eval()
    state = {f"model.{key}": value for key, value in encoder.state_dict().items()
             if not key.startswith("latent_attention_model.")}
    embed = torch.zeros(text["vocab_size"], config.text_config.hidden_size)
    embed[:rows] = encoder.language_model.get_input_embeddings().weight
    state["model.language_model.embed_tokens.weight"] = embed
    # The base's head, or a tied start: the next token scores like its input embedding.
    state["lm_head.weight"] = head.float() if head is not None else embed.clone()
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


def _lm_head(path: Path) -> torch.Tensor:
    """The LM head of a generative checkpoint (any of the layouts build_base reads; a tied one is its embedding)."""
    _, raw = read_family(path)
    tied = raw.get("tie_word_embeddings") or (raw.get("text_config") or {}).get("tie_word_embeddings")
    names = ("lm_head.weight", "language_model.lm_head.weight")
    embeds = ("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight")
    for file in weight_files(path):
        with _shard(file) as handle:
            for name in names + (embeds if tied else ()):
                if name in handle.keys():
                    return handle.get_tensor(name)
    raise CheckpointError(f"{path}: no LM head ({' / '.join(names)}) in the weights")


def _qwen_reranker(source: Path, out: Path, raw: dict, head: torch.Tensor | None) -> Path:
    """Qwen3-VL-Embedding weights (``model.*``) plus an LM head, as ``Qwen3VLForConditionalGeneration``."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(source):
        with _shard(file) as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys()})
    embed = state["model.language_model.embed_tokens.weight"]
    if head is not None and head.shape != embed.shape:
        raise CheckpointError(f"LM head of shape {tuple(head.shape)} does not fit the embedding {tuple(embed.shape)}")
    state["lm_head.weight"] = (head if head is not None else embed).clone()
    config = {**raw, "architectures": ["Qwen3VLForConditionalGeneration"], "tie_word_embeddings": False}
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    write_weights(state, out, config)
    copy_support_files(source, out)
    return out
