"""A tiny NV-Embed-format text embedder (``embedding_model.*``, ``latent_attention_model.*``, a config with
``text_config`` and ``latent_attention_config``), the part MM-Embed took its language model and pooling from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import MistralConfig, MistralModel

from ..modeling.checkpoint import load_model, write_weights
from ..modeling.pooling import LatentAttentionPooling

__all__ = ["make_tiny_nv_embed"]


def make_tiny_nv_embed(path: str | os.PathLike, from_checkpoint: str | os.PathLike | None = None, seed: int = 0,
                       vocab_size: int = 1003, hidden_size: int = 64, layers: int = 2, num_latents: int = 16,
                       heads: int = 8, dtype: torch.dtype = torch.float32) -> Path:
    """Write an NV-Embed-format checkpoint to ``path`` and return the path.

    Args:
        path: target directory (created).
        from_checkpoint: an MM-Embed checkpoint whose language model (as it runs: its text settings) and
            latent-attention head this embedder holds; ``None``: random weights of the given sizes.
        seed, vocab_size, hidden_size, layers, num_latents, heads: sizes of a random embedder.
        dtype: stored weight dtype.
    """
    path = Path(path)
    if from_checkpoint is not None:
        model, _ = load_model(from_checkpoint, dtype="float32")
        text = model.language_model.config.to_dict()
        pooling = model.latent_attention_model
        state = {**{f"embedding_model.{k}": v for k, v in model.language_model.state_dict().items()},
                 **{f"latent_attention_model.{k}": v for k, v in pooling.state_dict().items()}}
        num_latents, hidden_size = pooling.latents.shape
        heads = pooling.cross_attend_blocks[0].fn.heads
    else:
        torch.manual_seed(seed)
        config = MistralConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096)
        lm = MistralModel(config)
        head = LatentAttentionPooling(hidden_size, num_latents=num_latents, heads=heads)
        text = config.to_dict()
        state = {**{f"embedding_model.{k}": v for k, v in lm.state_dict().items()},
                 **{f"latent_attention_model.{k}": v for k, v in head.state_dict().items()}}
    text = {k: v for k, v in text.items() if k not in ("architectures", "transformers_version", "dtype")}
    text.update({"model_type": "bidir_mistral", "_name_or_path": "tiny-nv-embed"})
    raw = {"architectures": ["NVEmbedModel"], "model_type": "nvembed", "add_eos": True, "add_pad_token": True,
           "is_mask_instruction": True, "padding_side": "right", "text_config": text,
           "latent_attention_config": {"model_type": "latent_attention", "num_latents_value": int(num_latents),
                                       "num_cross_heads": int(heads), "hidden_dim": int(hidden_size),
                                       "latent_dim": int(hidden_size), "cross_dim_head": int(hidden_size),
                                       "output_normalize": True}}
    write_weights(state, path, raw, dtype=dtype)
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    return path
