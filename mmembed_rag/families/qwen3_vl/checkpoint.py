"""Loading and saving Qwen3-VL checkpoints with transformers' own classes: safetensors only, every key accounted
for (a weight missing from the files would otherwise be randomly initialised with only a warning)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from ...modeling.checkpoint import _preview, weight_files
from ...tokenization import TOKENIZER_FILES

__all__ = ["load_pretrained", "copy_support_files", "SUPPORT_FILES"]

logger = logging.getLogger(__name__)

#: Files besides the weights and config.json that a Qwen3-VL export copies verbatim from its base.
SUPPORT_FILES = TOKENIZER_FILES + ("vocab.json", "merges.txt", "preprocessor_config.json",
                                   "video_preprocessor_config.json", "generation_config.json")


def load_pretrained(cls: type, path: Path, dtype: torch.dtype, device: torch.device,
                    device_map: str | dict | None, generative_hint: bool = False) -> Any:
    """``cls.from_pretrained`` from safetensors, refusing missing, unexpected or mis-shaped weights.

    Raises:
        CheckpointError: no safetensors weights, or weights that do not match the config.
    """
    weight_files(path)  # safetensors present (pickle-only checkpoints are refused with their own message)
    try:
        model, info = cls.from_pretrained(str(path), dtype=dtype, device_map=device_map or device,
                                          use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot load as {cls.__name__} ({type(err).__name__}: {err})") from err
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    mismatched = info.get("mismatched_keys", [])
    if missing or unexpected or mismatched:
        hint = (" (a generative checkpoint with an LM head: an embedder is built from it with "
                "mmembed_rag.finetune.build_base)") if generative_hint and any("lm_head" in k for k in unexpected) \
            else ""
        raise CheckpointError(f"{path}: weights do not match {cls.__name__} built from config.json; missing keys: "
                              f"{_preview(missing)}; unexpected keys: {_preview(unexpected)}; mismatched shapes: "
                              f"{_preview([str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched])}"
                              f"{hint}")
    return model.eval()


def copy_support_files(source: Path | None, target: Path) -> None:
    """Copy tokenizer, chat template and processor files verbatim from ``source`` into ``target``."""
    if source is None or source.resolve() == target.resolve():
        return
    for name in SUPPORT_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
