"""Bi-encoder bases from pretrained parts, as the MM-Embed paper built its own.

:func:`build_base` turns a generative checkpoint into a checkpoint that :class:`~mmembed_rag.Encoder` loads and
:func:`~mmembed_rag.finetune.pipeline.run_pipeline` trains:

* LLaVA-NeXT (the layouts users have: llava-hf's, written by transformers 4.x — ``language_model.model.*``,
  ``language_model.lm_head.*``, ``vision_tower.vision_model.*`` — and transformers 5's — ``vision_tower.*`` or
  ``model.vision_tower.*``, ``model.language_model.*``, ``lm_head.*``) → the MM-Embed release layout. Optionally an
  NV-Embed-format text embedder (``embedding_model.*``, ``latent_attention_model.*``, a config with
  ``text_config`` and ``latent_attention_config``) supplies the language model and the pooling head, as the paper
  took NV-Embed-v1's; its vocabulary may be smaller than the LLaVA tokenizer's (NV-Embed-v1: 32000 rows): ``<image>``
  never reaches the embedding (its slots take the image features) and the Encoder pads with EOS, as the release
  does. Or a fresh pooling head: latent attention of stated sizes, mean, or last token.
* Qwen3-VL (an Instruct checkpoint: ``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``) → the
  Qwen3-VL-Embedding layout (no LM head, last-token pooling, the chat template).

Every key of every input is accounted for: taken (and logged with its destination), or dropped for a stated reason
(an LM head; a language model the embedder replaces). A key no rule covers, or a part missing, is an error. The
result carries ``base_parts.json`` and a model card naming its parts; exports of models trained from it carry them on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmembed_rag.checkpoint_files import read_json_object
from mmembed_rag.errors import CheckpointError
from mmembed_rag.families import read_family
from mmembed_rag.modeling.checkpoint import _shard, weight_files, write_weights
from mmembed_rag.modeling.pooling import POOLINGS, build_pooling
from mmembed_rag.tokenization import TOKENIZER_FILES

__all__ = ["build_base", "BASE_PARTS_FILE"]

logger = logging.getLogger(__name__)

#: Provenance of a built base: which part came from where, and what was dropped.
BASE_PARTS_FILE = "base_parts.json"

# (source prefix, destination prefix, part) for LLaVA-NeXT generative keys; longer prefixes first.
_LLAVA_RULES = (
    ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "vision tower"),
    ("vision_tower.vision_model.", "vision_tower.vision_model.", "vision tower"),
    ("model.vision_tower.", "vision_tower.vision_model.", "vision tower"),
    ("vision_tower.", "vision_tower.vision_model.", "vision tower"),
    ("model.multi_modal_projector.", "multi_modal_projector.", "projector"),
    ("multi_modal_projector.", "multi_modal_projector.", "projector"),
    ("model.image_newline", "image_newline", "image newline"),
    ("image_newline", "image_newline", "image newline"),
    ("language_model.model.", "language_model.", "language model"),
    ("model.language_model.", "language_model.", "language model"),
    ("language_model.lm_head.", None, "LM head"),
    ("lm_head.", None, "LM head"),
)
_EMBEDDER_RULES = (
    ("embedding_model.", "language_model.", "language model"),
    ("latent_attention_model.", "latent_attention_model.", "pooling head"),
)
_QWEN_RULES = (
    ("model.visual.", "model.visual.", "vision tower"),
    ("visual.", "model.visual.", "vision tower"),
    ("model.language_model.", "model.language_model.", "language model"),
    ("lm_head.", None, "LM head"),
    ("model.", "model.language_model.", "language model"),  # the pre-4.52 form of the language model's keys
)
_LLAVA_FIELDS = ("image_grid_pinpoints", "image_token_index", "projector_hidden_act", "multimodal_projector_bias",
                 "vision_config", "vision_feature_layer", "vision_feature_select_strategy", "text_config")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                    "vocab.json", "merges.txt")


def build_base(output_dir: str | os.PathLike, generative: str | os.PathLike,
               text_embedder: str | os.PathLike | None = None,
               pooling: str | Mapping[str, Any] | None = None, seed: int = 0) -> Path:
    """Write a bi-encoder base built from a generative checkpoint (and a text embedder) to ``output_dir``.

    Args:
        output_dir: target directory (created; if it exists it must be empty).
        generative: a LLaVA-NeXT or Qwen3-VL generative checkpoint directory (safetensors).
        text_embedder: LLaVA-NeXT only: an NV-Embed-format checkpoint whose language model and pooling head
            replace the LLaVA ones.
        pooling: LLaVA-NeXT only, without ``text_embedder``: ``"latent_attention"`` (NV-Embed's sizes: 512 latents,
            8 heads of the hidden width, GEGLU x4), ``{"kind": "latent_attention", "num_latents": ..., "heads": ...,
            "head_dim": ..., "ff_mult": ...}``, ``"mean"`` or ``"last_token"``; a fresh head, seeded by ``seed``.
            Qwen3-VL pools the last token (``None`` or ``"last_token"``).
        seed: initialisation of a fresh pooling head.

    Returns:
        ``output_dir``, loadable by ``Encoder.from_pretrained`` and trainable by ``run_pipeline(base_model=...)``.

    Raises:
        CheckpointError: an input is not a supported checkpoint, a key no rule covers, a part missing, or parts
            whose sizes do not fit together.
        ValueError: ``pooling`` is unknown, missing where needed, or given together with ``text_embedder``.
        FileExistsError: ``output_dir`` exists and is not an empty directory.
    """
    out, source = Path(output_dir), Path(generative)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new or empty one")
    family, raw = read_family(source)
    if family == "qwen3_vl":
        if text_embedder is not None or pooling not in (None, "last_token"):
            raise ValueError("a Qwen3-VL embedder pools the last token and keeps its own language model: "
                             "text_embedder= and pooling= apply to LLaVA-NeXT bases only")
        state, parts, dropped = _map(_read(source), _QWEN_RULES, source)
        _require(parts, ("vision tower", "language model"), source)
        config = {**raw, "architectures": ["Qwen3VLForEmbedding"]}
        pooling_name = "last_token"
    else:
        state, parts, dropped, config, pooling_name = _llava(source, raw, text_embedder, pooling, seed)
    record = {"generative": str(source), "family": family, "text_embedder": None if text_embedder is None
              else str(text_embedder), "pooling": pooling_name, "taken": parts, "dropped": dropped}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:  # written aside and moved in whole: a failure leaves nothing half-written
        write_weights(state, staging, config, max_shard_bytes=2 * 2**30)
        for name in TOKENIZER_FILES + _PROCESSOR_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        (staging / BASE_PARTS_FILE).write_text(json.dumps(record, indent=2))
        (staging / "README.md").write_text(_card(out, record))
        from mmembed_rag import Encoder

        Encoder.from_pretrained(staging, device="cpu", dtype="float32")  # it loads: every key where it belongs
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("built %s base in %s", family, out)
    return out


def _llava(source: Path, raw: dict[str, Any], text_embedder: str | os.PathLike | None,
           pooling: str | Mapping[str, Any] | None, seed: int) -> tuple[dict, dict, dict, dict, str]:
    state, parts, dropped = _map(_read(source), _LLAVA_RULES, source)
    _require(parts, ("vision tower", "projector", "image newline"), source)
    config = {k: raw[k] for k in _LLAVA_FIELDS if k in raw}
    config.update({"model_type": "llava_next", "architectures": ["NVMMEmbedModel"], "add_eos_token": True,
                   "global_image_patch_only": True, "padding_side": "right", "tie_word_embeddings": False,
                   "use_image_newline_parameter": True})
    if text_embedder is not None:
        if pooling is not None:
            raise ValueError("pooling= makes a fresh pooling head; with text_embedder= its own head is used")
        embedder = Path(text_embedder)
        emb_raw = read_json_object(embedder / "config.json", "no config.json; not an NV-Embed-format checkpoint")
        if not isinstance(emb_raw.get("text_config"), dict):
            raise CheckpointError(f"{embedder / 'config.json'}: no text_config; not an NV-Embed-format checkpoint")
        emb_state, emb_parts, emb_dropped = _map(_read(embedder), _EMBEDDER_RULES, embedder)
        _require(emb_parts, ("language model", "pooling head"), embedder)
        replaced = [k for k in state if k.startswith("language_model.")]
        for key in replaced:
            del state[key]
        if replaced:
            dropped[f"{source}: language model"] = f"{len(replaced)} tensors, replaced by the text embedder's"
            parts.pop("language model", None)
        state.update(emb_state)
        parts.update(emb_parts)
        dropped.update(emb_dropped)
        config["text_config"] = _text_config(emb_raw["text_config"], emb_state)
        heads = (emb_raw.get("latent_attention_config") or {}).get("num_cross_heads", 8)
        config["latent_attention_heads"] = heads
        name = "latent_attention (the text embedder's)"
    else:
        _require(parts, ("language model",), source)
        if pooling is None:
            raise ValueError("pooling= is needed without text_embedder=: 'latent_attention', 'mean', 'last_token' or "
                             "a dict of latent-attention sizes")
        kind, options = _pooling_spec(pooling)
        hidden = state["language_model.embed_tokens.weight"].shape[1]
        config["text_config"] = _text_config(raw.get("text_config") or {}, state)
        if kind == "latent_attention":
            torch.manual_seed(seed)
            head = build_pooling(kind, hidden, options)
            state.update({f"latent_attention_model.{k}": v for k, v in head.state_dict().items()})
            parts["pooling head"] = f"fresh latent attention {options or 'with NV-Embed-v1 sizes'} (seed {seed})"
            config["latent_attention_heads"] = options.get("heads", 8)
        else:
            config["pooling"] = kind
            parts["pooling head"] = f"{kind} (no weights)"
        name = kind
    width = state["multi_modal_projector.linear_2.weight"].shape[0]
    hidden = state["language_model.embed_tokens.weight"].shape[1]
    if width != hidden:
        raise CheckpointError(f"the projector maps images to width {width} but the language model is {hidden} wide")
    return state, parts, dropped, config, name


def _read(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise CheckpointError(f"{file}: weight shard listed in the index is missing")
        with _shard(file) as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys()})
    return state


def _map(state: dict[str, torch.Tensor], rules: tuple, path: Path) -> tuple[dict, dict[str, str], dict[str, str]]:
    """Keys renamed by the first matching rule; per part where it came from; what was dropped and why."""
    out: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    dropped: dict[str, str] = {}
    unknown = []
    for key, tensor in state.items():
        rule = next((r for r in rules if key.startswith(r[0])), None)
        if rule is None:
            unknown.append(key)
            continue
        prefix, target, part = rule
        if target is None:
            dropped[f"{path}: {key}"] = f"the {part} (an embedder has none)"
            continue
        out[target + key[len(prefix):]] = tensor
        counts[part] = counts.get(part, 0) + 1
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} weight(s) no rule covers, e.g. {', '.join(sorted(unknown)[:3])}")
    parts = {part: f"{path} ({n} tensors)" for part, n in counts.items()}
    for part, origin in parts.items():
        logger.info("%s: %s", part, origin)
    return out, parts, dropped


def _require(parts: Mapping[str, str], needed: tuple[str, ...], path: Path) -> None:
    missing = [p for p in needed if p not in parts]
    if missing:
        raise CheckpointError(f"{path}: no weights for the {', '.join(missing)}")


def _text_config(text: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A Mistral text_config for the bidirectional LM: its own settings, rows from the weights, no window."""
    skip = ("architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "dtype")
    config = {k: v for k, v in text.items() if k not in skip}
    config.update({"model_type": "mistral", "vocab_size": int(state["language_model.embed_tokens.weight"].shape[0]),
                   "sliding_window": None})
    return config


def _pooling_spec(pooling: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(pooling, str):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)} or a dict, got {pooling!r}")
        return pooling, {}
    if not isinstance(pooling, Mapping) or pooling.get("kind", "latent_attention") != "latent_attention":
        raise ValueError(f"a pooling dict describes latent attention (kind, num_latents, heads, head_dim, ff_mult), "
                         f"got {pooling!r}")
    allowed = {"kind", "num_latents", "heads", "head_dim", "ff_mult"}
    unknown = sorted(set(pooling) - allowed)
    if unknown:
        raise ValueError(f"pooling has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    options = {k: v for k, v in pooling.items() if k != "kind"}
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"pooling[{key!r}] must be a positive int, got {value!r}")
    return "latent_attention", options


def _card(out: Path, record: Mapping[str, Any]) -> str:
    lines = ["---", "library_name: mmembed-rag", "tags: [multimodal-retrieval, embeddings, base-model]", "---", "",
             f"# {out.name}", "", f"A {record['family']} bi-encoder base built with `mmembed_rag.finetune.build_base` "
             "from pretrained parts; untrained as a retriever until fine-tuned.", ""]
    lines += base_parts_section(record)
    return "\n".join(lines)


def base_parts_section(record: Mapping[str, Any]) -> list[str]:
    """Model-card lines naming a built base's parts (used by its card and by the cards of models trained from it)."""
    lines = ["## Base parts", "", f"- pooling: {record['pooling']}"]
    lines += [f"- {part}: {origin}" for part, origin in record["taken"].items()]
    lines += [f"- dropped {what}: {why}" for what, why in record["dropped"].items()]
    return lines + [""]
