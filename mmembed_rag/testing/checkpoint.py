"""Tiny checkpoints in the released MM-Embed format, for tests, notebooks and the demo.

``make_tiny_checkpoint`` writes a randomly initialised model with the release's files and field names
(config.json with the release's extra fields, sharded safetensors with the release's key names,
LLaVA-NeXT processor files, a Llama-style tokenizer with ``<image>``), small enough to build in
seconds and run on a laptop CPU. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from ..modeling.checkpoint import save_model
from ..modeling.model import MMEmbedModel
from ..modeling.profiles import build_config, profile_for

__all__ = ["make_tiny_checkpoint", "tiny_config", "ANSWER_WORDS"]

_SPECIALS = ["<unk>", "<s>", "</s>"]
#: Single tokens in every tiny tokenizer, as "▁True" / "▁False" are in Llama's and Mistral's vocabularies:
#: a reranker started from a tiny bi-encoder answers with them.
ANSWER_WORDS = ("True", "False")
_CORPUS_WORDS = (
    "a an the this that same but in on of with and or to for from is are was be it its as at by "
    "red green blue yellow purple orange black white gray pink brown colour color bright dark "
    "circle square triangle star cross ring diamond shape shapes small large big tiny huge "
    "left right top bottom center middle corner above below next picture image photo chart "
    "find show me everyday news caption query instruct document passage question answer which "
    "what where how why who when animal cat dog bird fish tree house car table chair light "
    "energy chemical glucose photosynthesis converts stored plant water sun one two three "
    "identify retrieve match matches given described event wikipedia snippet evidence election rally"
).split()


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """A Llama-style BPE (prepend '▁', spaces as '▁', byte fallback) trained on a small built-in corpus.

    Ids follow Llama's layout: ``<unk> <s> </s>``, then the 256 byte-fallback tokens, then the merges.
    """
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 3 - 256, initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyz"),
                                  show_progress=False)
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizer
    words = _CORPUS_WORDS
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]
    learner.train_from_iterator(lines + [w.capitalize() for w in words], trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(_SPECIALS)
    return tok


def _add_words(backend: Tokenizer, words: tuple[str, ...]) -> Tokenizer:
    """Append BPE merges so each word (with its leading "▁") becomes one token, as in Llama's vocabulary."""
    spec = json.loads(backend.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    for word in words:
        pieces = backend.encode(word, add_special_tokens=False).tokens  # e.g. ["▁T", "ru", "e"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append([merged, piece])  # lowest priority: only joins what the old merges left apart
            merged += piece
            vocab.setdefault(merged, len(vocab))
    # Added tokens keep their ids; the new pieces go after the learned vocabulary.
    return Tokenizer.from_str(json.dumps(spec))


def tiny_config(image_token_index: int, vocab_size: int, image_size: int = 56, patch_size: int = 14,
                hidden_size: int = 64, layers: int = 2, vision_hidden: int = 32, vision_layers: int = 3,
                **overrides: Any) -> dict[str, Any]:
    """config.json contents with the release's fields and tiny sizes (text_config as LLaVA-NeXT's: rope theta 1e6)."""
    step = image_size
    config = {
        "add_eos_token": True,
        "architectures": ["NVMMEmbedModel"],
        "auto_map": {"AutoModel": "modeling_nvmmembed.NVMMEmbedModel"},
        "global_image_patch_only": True,
        "ignore_index": -100,
        "image_grid_pinpoints": [[step, 2 * step], [2 * step, step], [2 * step, 2 * step],
                                 [3 * step, step], [step, 3 * step]],
        "image_token_index": image_token_index,
        "model_type": "llava_next",
        "padding_side": "right",
        "projector_hidden_act": "gelu",
        "retriever": "nvidia/NV-Embed-v1",
        "text_config": {
            "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "max_position_embeddings": 4096,
            "model_type": "mistral", "num_attention_heads": 4, "num_hidden_layers": layers,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
            "vocab_size": vocab_size,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.42.4",
        "use_image_newline_parameter": True,
        "vision_config": {
            "hidden_size": vision_hidden, "image_size": image_size, "intermediate_size": 2 * vision_hidden,
            "model_type": "clip_vision_model", "num_attention_heads": 2, "num_hidden_layers": vision_layers,
            "patch_size": patch_size, "projection_dim": vision_hidden,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }
    config.update(overrides)
    return config


def _processor_files(path: Path, image_size: int, grid: list[list[int]]) -> None:
    preprocessor = {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True, "image_grid_pinpoints": grid,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "LlavaNextImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaNextProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": image_size},
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True))
    (path / "processor_config.json").write_text(json.dumps({"chat_template": None,
                                                            "processor_class": "LlavaNextProcessor"}, indent=2))


def make_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, vocab_size: int = 1000,
                         pooling: str | None = None, dtype: torch.dtype = torch.float16,
                         max_shard_bytes: int = 500_000, **config_overrides: Any) -> Path:
    """Write a randomly initialised MM-Embed-format checkpoint to ``path`` and return the path.

    Args:
        path: target directory (created).
        seed: weights and tokenizer are a function of the seed and sizes only.
        vocab_size: BPE vocabulary before ``<image>`` and ``<pad>`` are appended.
        pooling: ``None`` (the release's latent attention, no config field) or ``"mean"`` / ``"last_token"``.
        dtype: stored weight dtype (the release stores float16).
        max_shard_bytes: shard size; the default gives several shards and an index, as the release has.
        **config_overrides: passed to :func:`tiny_config` (sizes such as ``hidden_size``, ``image_size``).

    Example:
        >>> from mmembed_rag import Encoder
        >>> enc = Encoder.from_pretrained(make_tiny_checkpoint(tmp_path / "tiny"))
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = _add_words(_train_tokenizer(vocab_size), ANSWER_WORDS)
    image_id = backend.get_vocab_size()
    backend.add_special_tokens(["<image>", "<pad>"])
    model_vocab = (image_id + 2 + 63) // 64 * 64  # padded like the release's 32064
    raw = tiny_config(image_id, model_vocab, **config_overrides)
    if pooling is not None:
        raw["pooling"] = pooling
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", additional_special_tokens=["<image>"])
    tokenizer.save_pretrained(str(path))
    _patch_tokenizer_config(path)
    _processor_files(path, raw["vision_config"]["image_size"], raw["image_grid_pinpoints"])
    torch.manual_seed(seed)
    # As the release's code builds it: with the NV-Embed-v1 retriever the language model follows that profile and
    # its embedding has no rows for <image> and <pad> (text_config's padded vocab and rope theta are not what runs).
    profile = profile_for(raw)
    config = build_config(raw, embedding_rows=image_id if profile.name else model_vocab)
    model = MMEmbedModel(config, pooling=raw.get("pooling", "latent_attention"), id_map=profile.id_map)
    save_model(model, path, raw, max_shard_bytes=max_shard_bytes, dtype=dtype)
    return path


def _patch_tokenizer_config(path: Path) -> None:
    """Make tokenizer_config.json read like the release's (LlamaTokenizer, BOS added, EOS via the config)."""
    file = path / "tokenizer_config.json"
    cfg = json.loads(file.read_text())
    cfg.update({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                "legacy": False, "padding_side": "right", "processor_class": "LlavaNextProcessor",
                "clean_up_tokenization_spaces": False})
    file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
