"""How an item is written to and read back from a Chroma record: ids, documents, metadata, filters.

A record holds the item's text in ``documents`` and, in its metadata, ``modality`` (``"text"``,
``"image"`` or ``"image,text"``, M-BEIR's spelling) and ``image_uri``: an absolute path or a URL.
Images are stored by reference only. In-memory images (PIL images, bytes, arrays, data URIs) have no
reference that could be shown later, so they are refused with a message saying to save them to a file;
storing their pixels as base64 text in the database is exactly what this layout avoids.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chromadb.api.types import validate_metadata

from mmembed_rag.errors import InvalidItemError
from mmembed_rag.images import describe_source
from mmembed_rag.items import MultimodalItem
from mmembed_rag.modality import MODALITIES, MODALITY_KEY, UnknownModalityError, modality, modality_where

from .errors import StoreError

__all__ = ["MODALITIES", "Record", "build_record", "build_records", "check_id_list", "item_from_record",
           "modality_filter", "combine_where"]

IMAGE_URI_KEY = "image_uri"
RESERVED_KEYS = (MODALITY_KEY, IMAGE_URI_KEY)
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


@dataclass(frozen=True)
class Record:
    """One row to upsert (the embedding is computed separately)."""

    id: str
    document: str | None
    metadata: dict[str, Any]


def image_reference(item: MultimodalItem, index: int) -> str | None:
    """The stored reference of the item's image: an absolute path or the URL as given; ``None`` without image.

    Raises:
        InvalidItemError: the image is in memory (PIL, bytes, array) or a data URI, or its path is a symlink loop.
    """
    image = item.image
    if image is None:
        return None
    if isinstance(image, str) and _SCHEME_RE.match(image):
        return image
    if isinstance(image, Path) or (isinstance(image, str) and image[:5].lower() != "data:"):
        try:
            return str(Path(image).expanduser().resolve())
        except (RuntimeError, OSError) as exc:  # Python raises RuntimeError for a symlink loop
            raise InvalidItemError(f"item {index}: image path {str(image)!r} cannot be resolved "
                                   f"(a symlink loop?): {exc}") from exc
    raise InvalidItemError(
        f"item {index}: image {describe_source(image)} has no path or URL. A collection stores images by "
        "reference (never as pixels), so an in-memory image could not be shown later: save it to a file "
        "and pass its path (or an http(s) URL)")


def content_id(text: str | None, image_ref: str | None) -> str:
    """Id derived from content (text and image reference), so re-adding the same item is an idempotent upsert."""
    payload = json.dumps([text, image_ref], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def build_records(items: Sequence[MultimodalItem], ids: Sequence[str] | None,
                  metadatas: Sequence[Mapping[str, Any] | None] | None) -> list[Record]:
    """Validate everything and build one record per item, in order (before anything is encoded).

    Raises:
        StoreError: ``ids`` or ``metadatas`` has the wrong length or type, or ``ids`` repeats an id.
        InvalidItemError: an item's image has no reference or its metadata is invalid (message names the item).
    """
    n = len(items)
    if ids is not None:
        ids = check_id_list(ids)
        if len(ids) != n:
            raise StoreError(f"got {len(ids)} ids for {n} items; pass one id per item (or none)")
        seen: dict[str, int] = {}
        for index, id_ in enumerate(ids):
            if id_ in seen:
                raise StoreError(f"ids repeat {id_!r} (items {seen[id_]} and {index}); ids must be unique")
            seen[id_] = index
    if metadatas is not None:
        if isinstance(metadatas, Mapping) or not isinstance(metadatas, Sequence):
            raise StoreError(f"metadatas must be a list with one dict (or None) per item, "
                             f"got {type(metadatas).__name__}")
        if len(metadatas) != n:
            raise StoreError(f"got {len(metadatas)} metadatas for {n} items; pass one per item (or none)")
    return [build_record(item, index, ids[index] if ids is not None else None,
                         metadatas[index] if metadatas is not None else None) for index, item in enumerate(items)]


def build_record(item: MultimodalItem, index: int, id_: str | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Record:
    """One item's record: its text, ``modality`` and ``image_uri`` metadata, and its id (content-derived by default).

    Raises:
        InvalidItemError: the image has no reference or the metadata is invalid (the message names ``index``).
    """
    ref = image_reference(item, index)
    stored = user_metadata(metadata, index)
    stored[MODALITY_KEY] = modality(item)
    if ref is not None:
        stored[IMAGE_URI_KEY] = ref
    return Record(id_ if id_ is not None else content_id(item.text, ref), item.text, stored)


def check_id_list(ids: Any) -> list[str]:
    """A list of non-empty strings (possibly empty), or :class:`StoreError` naming the bad entry."""
    return _check_ids(ids, what="ids")


def user_metadata(metadata: Mapping[str, Any] | None, index: int) -> dict[str, Any]:
    """A copy of the caller's metadata, checked: a dict of Chroma-storable values without the reserved keys.

    Raises:
        InvalidItemError: naming ``index``.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidItemError(f"item {index}: metadata must be a dict or None, got {type(metadata).__name__}")
    reserved = [key for key in RESERVED_KEYS if key in metadata]
    if reserved:
        raise InvalidItemError(f"item {index}: metadata key {reserved[0]!r} is reserved (the store sets "
                               f"{', '.join(map(repr, RESERVED_KEYS))} itself)")
    out = dict(metadata)
    if out:
        try:
            validate_metadata(out)
        except (TypeError, ValueError) as exc:
            raise InvalidItemError(f"item {index}: invalid metadata: {exc}") from exc
    return out


def _check_ids(ids: Any, what: str) -> list[str]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise StoreError(f"{what} must be a list of strings, got {type(ids).__name__}")
    bad = [(i, id_) for i, id_ in enumerate(ids) if not isinstance(id_, str) or not id_]
    if bad:
        index, id_ = bad[0]
        raise StoreError(f"{what}[{index}] must be a non-empty string, got {id_!r}")
    return list(ids)


def check_ids(ids: Any) -> list[str]:
    """A non-empty list of non-empty strings, or :class:`StoreError`."""
    ids = _check_ids(ids, what="ids")
    if not ids:
        raise StoreError("ids is empty; pass at least one id")
    return ids


def item_from_record(id_: str, document: str | None, metadata: Mapping[str, Any] | None,
                     uri: str | None = None) -> MultimodalItem:
    """Rebuild the stored item: text from ``documents``, image from ``image_uri`` (or Chroma's own ``uris``).

    Raises:
        StoreError: the record has neither (it was not written by :class:`MultimodalCollection`).
    """
    image = (metadata or {}).get(IMAGE_URI_KEY) or uri
    text = document if document else None
    if text is None and image is None:
        raise StoreError(f"record {id_!r} has no document and no image reference; it was not written by "
                         "MultimodalCollection")
    return MultimodalItem(text=text, image=image)


def modality_filter(value: str | Sequence[str] | None) -> dict[str, Any] | None:
    """``where`` clause restricting results to one or more modalities.

    Raises:
        StoreError: an unknown modality or an empty list.
    """
    try:
        return modality_where(value)
    except UnknownModalityError as exc:
        raise StoreError(str(exc)) from exc


def combine_where(where: Mapping[str, Any] | None, extra: dict[str, Any] | None) -> dict[str, Any] | None:
    """``where`` AND ``extra``, either of which may be absent."""
    if where is not None and not isinstance(where, Mapping):
        raise StoreError(f"where must be a dict (a Chroma filter), got {type(where).__name__}")
    parts = [dict(p) for p in (where, extra) if p]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else {"$and": parts}
