"""Modality names (M-BEIR's spelling) and the one function that tells an item's modality.

Importable without chromadb or any framework: the store, the CLI and both adapters write and filter on
these names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import MMEmbedError

__all__ = ["MODALITY_KEY", "MODALITIES", "TEXT", "IMAGE", "IMAGE_TEXT", "UnknownModalityError", "modality",
           "modalities", "modality_where"]

#: Metadata key under which every stored record carries its modality.
MODALITY_KEY = "modality"
TEXT = "text"
IMAGE = "image"
IMAGE_TEXT = "image,text"
#: The three modalities, in M-BEIR's spelling.
MODALITIES = (TEXT, IMAGE, IMAGE_TEXT)


class UnknownModalityError(MMEmbedError, ValueError):
    """A ``modality=`` argument names no known modality (or is an empty list)."""


def modality(item: Any) -> str:
    """``"text"``, ``"image"`` or ``"image,text"`` for anything with ``text`` and ``image`` attributes.

    Example:
        >>> modality(MultimodalItem(text="a caption", image="cat.png"))
        'image,text'
    """
    if getattr(item, "image", None) is None:
        return TEXT
    return IMAGE if getattr(item, "text", None) is None else IMAGE_TEXT


def modalities(value: str | Sequence[str]) -> list[str]:
    """One modality or a list of them, checked, without repeats (order kept).

    Raises:
        UnknownModalityError: an unknown name, an empty list or a value of the wrong type.
    """
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, Sequence) or isinstance(values, bytes):
        raise UnknownModalityError(f"modality must be a string or a list of strings, got {type(value).__name__}")
    unknown = [v for v in values if v not in MODALITIES]
    if unknown or not values:
        got = repr(unknown[0]) if unknown else "an empty list"
        raise UnknownModalityError(
            f"modality must be one of {', '.join(map(repr, MODALITIES))} or a list of them, got {got}")
    return list(dict.fromkeys(values))


def modality_where(value: str | Sequence[str] | None) -> dict[str, Any] | None:
    """A Chroma ``where`` clause keeping only these modalities (``None``: no clause).

    Raises:
        UnknownModalityError: see :func:`modalities`.
    """
    if value is None:
        return None
    values = modalities(value)
    return {MODALITY_KEY: values[0]} if len(values) == 1 else {MODALITY_KEY: {"$in": values}}
