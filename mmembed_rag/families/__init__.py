"""Model families behind one seam (see :mod:`.base`); the family is read from the checkpoint's config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint_files import read_json_object
from ..errors import CheckpointError
from .base import Batch, EmbeddingFamily, ImageLoader

__all__ = ["Batch", "EmbeddingFamily", "ImageLoader", "family_name", "load_embedding_family", "FAMILIES"]

#: config.json ``model_type`` → family name.
FAMILIES = {"llava_next": "llava_next", "qwen3_vl": "qwen3_vl"}


def family_name(raw: dict[str, Any], where: Path | str = "config.json") -> str:
    """The family of a checkpoint config.

    Raises:
        CheckpointError: a model_type no family handles.
    """
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{where}: model_type is {model_type!r}; supported: "
                              f"{', '.join(repr(t) for t in FAMILIES)} (MM-Embed / LLaVA-NeXT and Qwen3-VL)")
    return FAMILIES[model_type]


def read_family(path: Path) -> tuple[str, dict[str, Any]]:
    """(family name, raw config) of checkpoint directory ``path``."""
    raw = read_json_object(path / "config.json", "no config.json; not a checkpoint directory")
    return family_name(raw, path / "config.json"), raw


def load_embedding_family(path: Path, **kwargs: Any) -> EmbeddingFamily:
    """The bi-encoder family for checkpoint ``path``, its weights loaded (``kwargs``: the family's options)."""
    name, raw = read_family(path)
    if name == "qwen3_vl":
        from .qwen3_vl.embedding import Qwen3VLFamily

        return Qwen3VLFamily.from_checkpoint(path, raw, **kwargs)
    from .llava_next import MMEmbedFamily

    if kwargs.get("max_length") is None:
        kwargs["max_length"] = 4096
    return MMEmbedFamily.from_checkpoint(path, raw, **kwargs)
