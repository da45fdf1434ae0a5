"""The one input item type, :class:`MultimodalItem`, and the conversions from user-facing inputs.

A query or document is text, an image, or both. Images are stored as given (a path, URL, bytes, PIL
image or array) and only loaded when encoded, via :func:`mmembed_rag.images.load_image`.

Accepted by :func:`to_item`:

* ``MultimodalItem`` -- returned as-is;
* ``str`` -- always a text item, even when it looks like a path or URL;
* ``PIL.Image.Image`` or ``pathlib.Path`` -- an image item;
* ``dict`` -- ``{"txt": ..., "img": ...}`` (model-card form) or ``{"text": ..., "image": ...}``,
  optionally with ``"instruction"``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmembed_rag.errors import InvalidItemError
from mmembed_rag.images import IMAGE_SOURCE_TYPES, ImageSource, describe_source

__all__ = ["ImageSource", "MultimodalItem", "check_text", "to_item", "to_items"]

logger = logging.getLogger(__name__)

_DICT_KEYS = {"txt": "text", "text": "text", "img": "image", "image": "image", "instruction": "instruction"}
_ACCEPTED = "str, dict, MultimodalItem, PIL.Image.Image or pathlib.Path"


@dataclass(frozen=True, eq=False)
class MultimodalItem:
    """A query or document made of text, an image, or both.

    Equality is identity (``eq=False``): images such as numpy arrays have no boolean equality.

    Attributes:
        text: The text, or ``None``. Empty text alongside an image is normalised to ``None``.
        image: An image source (PIL image, path, URL or data URI string, bytes, numpy array), or ``None``.
            It is not opened here; a bad image is reported when the item is encoded.
        instruction: Optional per-query instruction; ignored when the item is encoded as a document.

    Raises:
        InvalidItemError: On construction, if a field has the wrong type or the item is empty.
    """

    text: str | None = None
    image: ImageSource | None = None
    instruction: str | None = None

    def __post_init__(self) -> None:
        if self.text is not None and not isinstance(self.text, str):
            raise InvalidItemError(f"text must be a str or None, got {type(self.text).__name__}")
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise InvalidItemError(
                f"instruction must be a str or None, got {type(self.instruction).__name__}"
            )
        check_text(self.text, "text")
        check_text(self.instruction, "instruction")
        if self.image is not None:
            if not isinstance(self.image, IMAGE_SOURCE_TYPES):
                raise InvalidItemError(
                    f"unsupported image type {type(self.image).__name__}; expected a PIL.Image.Image, "
                    "str (path, URL or data URI), pathlib.Path, bytes or numpy array"
                )
            if isinstance(self.image, (str, bytes, bytearray)) and not self.image:
                raise InvalidItemError("image is empty")
        if self.image is None:
            if self.text is None:
                raise InvalidItemError("item has neither text nor image")
            if not self.text.strip():
                raise InvalidItemError("text is empty and there is no image")
        elif self.text is not None and not self.text.strip():
            object.__setattr__(self, "text", None)

    def __repr__(self) -> str:
        parts = []
        if self.text is not None:
            text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
            parts.append(f"text={text!r}")
        if self.image is not None:
            parts.append(f"image={describe_source(self.image)!r}")
        if self.instruction is not None:
            parts.append(f"instruction={self.instruction[:40]!r}")
        return f"MultimodalItem({', '.join(parts)})"


def check_text(value: str | None, field: str) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (``"\\ud800"``) cannot be tokenised or stored.

    Such strings come from ``surrogateescape`` decoding of bytes that are not UTF-8, or from a JSON ``\\ud800``
    escape; the tokenizer would fail later with a ``TypeError`` that names no item.

    Args:
        value: the text (``None`` passes).
        field: its name in the message (``"text"``, ``"instruction"``).

    Raises:
        InvalidItemError: ``value`` contains a lone surrogate code point; the message gives its position.
    """
    if value is None or value.isascii():  # isascii reads a flag of the string: free for the common case
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidItemError(
            f"{field} is not valid Unicode: lone surrogate {value[exc.start]!r} at character {exc.start} "
            "(decode the source as UTF-8, or with errors='replace')"
        ) from exc


def to_item(obj: object, index: int) -> MultimodalItem:
    """Convert one user input to a :class:`MultimodalItem`.

    Args:
        obj: A ``MultimodalItem``, ``str`` (text), ``PIL.Image.Image`` or ``pathlib.Path`` (image), or a
            dict with keys ``txt``/``text``, ``img``/``image`` and optionally ``instruction``.
        index: Position of ``obj`` in its batch, used in error messages.

    Returns:
        The item.

    Raises:
        InvalidItemError: ``obj`` has an unsupported type, unknown or conflicting dict keys, or invalid
            fields. The message starts with ``"item {index}: "``.
    """
    if isinstance(obj, MultimodalItem):
        return obj
    try:
        if isinstance(obj, str):
            return MultimodalItem(text=obj)
        if isinstance(obj, (Image.Image, Path)):
            return MultimodalItem(image=obj)
        if isinstance(obj, Mapping):
            return MultimodalItem(**_dict_fields(obj))
    except InvalidItemError as exc:
        raise InvalidItemError(f"item {index}: {exc}") from exc
    raise InvalidItemError(f"item {index}: expected {_ACCEPTED}, got {type(obj).__name__}")


def _dict_fields(obj: Mapping) -> dict[str, object]:
    unknown = [key for key in obj if key not in _DICT_KEYS]
    if unknown:
        raise InvalidItemError(
            f"unknown dict key(s) {', '.join(sorted(map(repr, unknown)))}; "
            "allowed: 'txt'/'text', 'img'/'image', 'instruction'"
        )
    fields: dict[str, object] = {}
    for key, value in obj.items():
        field = _DICT_KEYS[key]
        if field in fields:
            raise InvalidItemError(f"dict has both spellings of {field!r}; use either one, not both")
        fields[field] = value
    return fields


def to_items(objs: Iterable[object]) -> list[MultimodalItem]:
    """Convert a batch of inputs with :func:`to_item`.

    Args:
        objs: An iterable (list, tuple, generator...) of inputs accepted by :func:`to_item`.

    Returns:
        The items, in order.

    Raises:
        InvalidItemError: ``objs`` is a single item rather than a collection, is not iterable, or one of
            its elements is invalid (the message names its index).
    """
    if isinstance(objs, (str, bytes, bytearray, MultimodalItem, Mapping, Image.Image, Path)):
        raise InvalidItemError(
            f"expected a list of items, got a single {type(objs).__name__}; wrap it in a list: [item]"
        )
    try:
        iterator = iter(objs)
    except TypeError as exc:
        raise InvalidItemError(f"expected a list of items, got {type(objs).__name__}") from exc
    return [to_item(obj, index) for index, obj in enumerate(iterator)]
