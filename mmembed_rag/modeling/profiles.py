"""Checkpoint profiles: hyper-parameters a checkpoint's network takes from somewhere other than its config.json.

The MM-Embed release does not build its language model from config.json's ``text_config`` (LLaVA-NeXT's
Mistral-7B-Instruct-v0.2: vocab 32064, rope theta 1e6). Its ``NVMMEmbedModel.__init__`` runs
``AutoConfig.from_pretrained(config.retriever)`` (``nvidia/NV-Embed-v1``) and takes that model's
``embedding_model`` and ``latent_attention_model``. The retriever's config is pinned here, never fetched.
The embedding's row count always comes from the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import LlavaNextConfig

from ..errors import CheckpointError

__all__ = ["CheckpointProfile", "NV_EMBED_V1", "profile_for", "build_config", "check_shapes"]

LM = "language_model."
# What transformers' config classes raise on a field of the wrong type or value (strict dataclasses: not ValueError).
_CONFIG_ERRORS = (TypeError, ValueError, KeyError, AttributeError, StrictDataclassError)


@dataclass(frozen=True)
class CheckpointProfile:
    """What a checkpoint's network takes from outside its ``text_config``.

    Attributes:
        name: the retriever the release took its language model from (``None``: config.json alone).
        text_overrides: language-model config fields that replace ``text_config``'s.
        latent_heads: latent-attention heads (the only pooling size the weights' shapes cannot tell).
        id_map: token ids replaced before the embedding lookup (ids the embedding has no row for).
    """

    name: str | None
    text_overrides: Mapping[str, Any] = field(default_factory=dict)
    latent_heads: int = 8
    id_map: Mapping[int, int] = field(default_factory=dict)


# nvidia/NV-Embed-v1's config.json (Mistral-7B-v0.1 shapes): rope theta 1e4, 32768 positions, 32000-row embedding
# (taken from the weights), sliding window 4096 -- which its bidirectional mask never applies, so none here (a
# flash-attention backend would otherwise window the attention). Latent attention: 512 latents, 8 heads of
# dimension = hidden, GEGLU mult 4 (sizes read from the weights except the heads). The release's forward maps
# LLaVA-NeXT's pad id 32001 to EOS 2 before the lookup ("We use tokenizer from Llava-Next but later replace PAD
# with EOS Token"); the image id is replaced by the image features anyway.
NV_EMBED_V1 = CheckpointProfile(
    name="nvidia/NV-Embed-v1",
    text_overrides={"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                    "max_position_embeddings": 32768, "sliding_window": None},
    latent_heads=8,
    id_map={32001: 2},
)
_PROFILES = {NV_EMBED_V1.name: NV_EMBED_V1}


def profile_for(raw: Mapping[str, Any]) -> CheckpointProfile:
    """The profile of a raw config.json: by its ``retriever`` field; config.json alone when there is none.

    Raises:
        CheckpointError: ``retriever`` names a model no profile describes (it is never fetched).
    """
    retriever = raw.get("retriever")
    if retriever is None:
        heads = raw.get("latent_attention_heads", 8)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise CheckpointError(f"config.json: latent_attention_heads must be a positive int, got {heads!r}")
        return CheckpointProfile(name=None, latent_heads=heads)
    if not isinstance(retriever, str) or retriever not in _PROFILES:
        raise CheckpointError(f"config.json: retriever {retriever!r} is not a known checkpoint profile "
                              f"({', '.join(_PROFILES)}); its language-model settings cannot be pinned")
    return _PROFILES[retriever]


def build_config(raw: Mapping[str, Any], embedding_rows: int) -> LlavaNextConfig:
    """The LLaVA-NeXT config of the network that runs: ``text_config`` with the profile's fields applied.

    Args:
        raw: config.json's contents.
        embedding_rows: rows of ``language_model.embed_tokens`` (from the weights).

    Raises:
        CheckpointError: a field has the wrong type or value (transformers' own error in the message).
    """
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "transformers_version")}
    overrides = profile_for(raw).text_overrides
    try:
        config = LlavaNextConfig(**fields)
        text = config.text_config.to_dict()
        text.update(overrides)
        text["vocab_size"] = embedding_rows
        config.text_config = type(config.text_config)(**text)
    except _CONFIG_ERRORS as err:
        raise CheckpointError(f"config.json: not a valid LLaVA-NeXT config ({type(err).__name__}: "
                              f"{' '.join(str(err).split())})") from err
    return config


def check_shapes(config: LlavaNextConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Fail naming the config field when the language-model weights disagree with ``config.text_config``.

    Raises:
        CheckpointError: a width, depth or head count of ``text_config`` does not match the weights.
    """
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    where = f"head_dim {head_dim}: text_config.head_dim, else hidden_size / num_attention_heads"
    attn = LM + "layers.0.self_attn."
    expected = {  # field: (value the config gives, weight, its dimension that must equal the value)
        "hidden_size": (text.hidden_size, LM + "embed_tokens.weight", 1),
        "intermediate_size": (text.intermediate_size, LM + "layers.0.mlp.gate_proj.weight", 0),
        f"num_attention_heads × head_dim ({where})": (text.num_attention_heads * head_dim, attn + "q_proj.weight", 0),
        f"num_key_value_heads × head_dim ({where})": (text.num_key_value_heads * head_dim, attn + "k_proj.weight", 0),
    }
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith(LM + "layers.")}
    if layers and len(layers) != text.num_hidden_layers:
        raise CheckpointError(f"config.json: text_config.num_hidden_layers is {text.num_hidden_layers} but the "
                              f"weights have {len(layers)} language-model layers")
    for name, (value, key, dim) in expected.items():
        if key in shapes and len(shapes[key]) == 2 and shapes[key][dim] != value:
            raise CheckpointError(f"config.json: text_config.{name} gives {value} but {key} has shape {shapes[key]}")
