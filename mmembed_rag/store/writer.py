"""The streaming, all-or-nothing write behind :meth:`MultimodalCollection.add`.

Items come from any iterable and are pulled one chunk (at most the client's max batch size) at a time, so a
generator of a million items streams with bounded memory. Each chunk is validated (records built, images
loaded by the encoder) before it is written; chunk k+1 is encoded while chunk k is written
(:func:`~mmembed_rag.ingest.pipelined_write`). On any failure the call is undone: ids it newly added are deleted,
rows it overwrote are put back as they were, and rows it did not touch stay as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mmembed_rag.errors import InvalidItemError, MMEmbedError
from mmembed_rag.ingest import chunked, pipelined_write, shift_item_index
from mmembed_rag.items import MultimodalItem, to_item, to_items

from .errors import StoreError
from .records import IMAGE_URI_KEY, Record, build_record, content_id

__all__ = ["read", "replacing", "stream_add"]

logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class _Chunk:
    records: list[Record]
    items: list[MultimodalItem]
    positions: list[int]  # each record's index in the caller's input


@dataclass
class _Undo:
    """What this call changed: ids it created, and the previous state of rows it overwrote."""

    created: set[str] = field(default_factory=set)
    saved: dict[str, tuple[Any, str | None, dict[str, Any] | None]] = field(default_factory=dict)


def stream_add(collection: Any, encoder: Any, items: Iterable[Any], ids: Iterable[str] | None,
               metadatas: Iterable[Mapping[str, Any] | None] | None, *, chunk_size: int, batch_size: int,
               show_progress: bool | None, overlap: bool = True) -> list[str]:
    """Validate, encode and upsert ``items`` chunk by chunk; on any failure undo the whole call and re-raise.

    Args:
        collection: the Chroma collection.
        encoder: anything with ``encode_documents(items, batch_size=, show_progress=)``.
        items, ids, metadatas: as :meth:`MultimodalCollection.add` takes them (any iterables).
        chunk_size: items per encode/upsert step (at most the client's max batch size).
        batch_size: items per forward pass.
        show_progress: a progress bar over items (default: for 256 items or more, or an input of unknown length).
        overlap: encode the next chunk while writing this one.

    Returns:
        One id per item, in order.
    """
    _check_inputs(items, ids, metadatas)
    total = len(items) if isinstance(items, Sized) else None
    quiet = not show_progress if show_progress is not None else (total is not None and total < 256)
    out: list[str] = []
    undo = _Undo()
    with tqdm(total=total, desc="indexing", unit="item", disable=quiet) as bar:

        def encode(chunk: _Chunk) -> np.ndarray:
            try:
                return encoder.encode_documents(chunk.items, batch_size=batch_size, show_progress=False)
            except MMEmbedError as exc:
                raise shift_item_index(exc, chunk.positions) from exc.__cause__

        def write(chunk: _Chunk, vectors: np.ndarray) -> None:
            _upsert(collection, chunk.records, vectors, undo)
            bar.update(len(chunk.positions))

        chunks = _chunks(items, ids, metadatas, chunk_size, out)
        pipelined_write(chunks, encode, write, lambda: _undo(collection, undo, chunk_size), overlap=overlap)
    logger.info("upserted %d item(s) into %r in chunks of %d", len(out), collection.name, chunk_size)
    return out


def _check_inputs(items: Any, ids: Any, metadatas: Any) -> None:
    if isinstance(items, (str, bytes, bytearray, MultimodalItem, Mapping, Image.Image, Path)):
        to_items(items)  # raises the Encoder's own "a single ...; wrap it in a list" error
    if ids is not None and (isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable)):
        raise StoreError(f"ids must be a list of strings, got {type(ids).__name__}")
    if metadatas is not None and (isinstance(metadatas, (Mapping, str, bytes)) or not isinstance(metadatas, Iterable)):
        raise StoreError(f"metadatas must be a list with one dict (or None) per item, got {type(metadatas).__name__}")
    if isinstance(items, Sized):
        for name, values in (("ids", ids), ("metadatas", metadatas)):
            if isinstance(values, Sized) and len(values) != len(items):
                per = "one id per item" if name == "ids" else "one per item"
                raise StoreError(f"got {len(values)} {name} for {len(items)} items; pass {per} (or none)")


def _rows(items: Iterable[Any], ids: Iterable[str] | None,
          metadatas: Iterable[Any] | None) -> Iterator[tuple[int, Any, str | None, Any]]:
    """``(index, item, id, metadata)`` lazily; a length mismatch is found when the shorter input ends."""
    try:
        source = iter(items)
    except TypeError as exc:
        raise InvalidItemError(f"expected a list of items, got {type(items).__name__}") from exc
    id_iter = iter(ids) if ids is not None else None
    meta_iter = iter(metadatas) if metadatas is not None else None
    n = 0
    for n, raw in enumerate(source, start=1):
        id_ = next(id_iter, _MISSING) if id_iter is not None else None
        meta = next(meta_iter, _MISSING) if meta_iter is not None else None
        for name, value in (("ids", id_), ("metadatas", meta)):
            if value is _MISSING:
                per = "one id per item" if name == "ids" else "one per item"
                raise StoreError(f"got {n - 1} {name} for more items; pass {per} (or none)")
        yield n - 1, raw, id_, meta
    for name, rest in (("ids", id_iter), ("metadatas", meta_iter)):
        if rest is not None and next(rest, _MISSING) is not _MISSING:
            raise StoreError(f"got more {name} than the {n} items; pass one per item (or none)")
    if n == 0:
        raise InvalidItemError("add() got no items; nothing was written")


def _chunks(items: Iterable[Any], ids: Iterable[str] | None, metadatas: Iterable[Any] | None, size: int,
            out: list[str]) -> Iterator[_Chunk]:
    """Validated chunks; ``out`` receives every item's id. Explicit ids must be unique across the call; the same
    content twice (one content id) is upserted once per chunk, the later metadata winning as upserts do."""
    explicit: dict[str, int] = {}
    for rows in chunked(_rows(items, ids, metadatas), size):
        by_id: dict[str, int] = {}
        records: list[Record] = []
        chunk_items: list[MultimodalItem] = []
        for index, raw, id_, meta in rows:
            item = to_item(raw, index)
            if id_ is not None:
                if not isinstance(id_, str) or not id_:
                    raise StoreError(f"ids[{index}] must be a non-empty string, got {id_!r}")
                if id_ in explicit:
                    raise StoreError(f"ids repeat {id_!r} (items {explicit[id_]} and {index}); ids must be unique")
                explicit[id_] = index
            record = build_record(item, index, id_, meta)
            out.append(record.id)
            by_id[record.id] = len(records)
            records.append(record)
            chunk_items.append(item)
        keep = sorted(by_id.values())
        yield _Chunk([records[i] for i in keep], [chunk_items[i] for i in keep], [rows[i][0] for i in keep])


#: A Chroma server reading a collection whose vector segment another process is creating fails with this
#: transient message (seen with two processes writing one new collection); such a read is retried briefly.
_SEGMENT_RACE = "Nothing found on disk"
_READ_ATTEMPTS = 20


def read(collection: Any, **query: Any) -> dict[str, Any]:
    """``collection.get(**query)``, retried for a bounded time while a concurrent writer creates the segment."""
    from chromadb.errors import InternalError

    for attempt in range(_READ_ATTEMPTS):
        try:
            return collection.get(**query)
        except InternalError as exc:
            if _SEGMENT_RACE not in str(exc) or attempt == _READ_ATTEMPTS - 1:
                raise
            logger.info("collection %r: its vector segment is still being created by another writer; retrying",
                        collection.name)
            time.sleep(0.25)
    raise AssertionError("unreachable")


def _upsert(collection: Any, records: list[Record], vectors: np.ndarray, undo: _Undo) -> None:
    ids = [r.id for r in records]
    by_id = {r.id: r for r in records}
    before = read(collection, ids=ids, include=["metadatas", "documents"])
    changed = []
    for id_, document, metadata in zip(before["ids"], before["documents"], before["metadatas"]):
        if id_ in undo.created or id_ in undo.saved:
            continue  # this call's own row, or already saved in its first state
        new = by_id[id_]
        if document != new.document or dict(metadata or {}) != new.metadata or not _content_id(new):
            changed.append(id_)
    if changed:  # only rows whose stored state would change are saved (a re-run of the same data saves none)
        old = read(collection, ids=changed, include=["embeddings", "documents", "metadatas"])
        for id_, embedding, document, metadata in zip(old["ids"], old["embeddings"], old["documents"],
                                                      old["metadatas"]):
            undo.saved[id_] = (np.asarray(embedding, dtype=np.float32), document, metadata)
    existing = set(before["ids"])
    collection.upsert(ids=ids, embeddings=vectors, documents=[r.document for r in records],
                      metadatas=[r.metadata for r in records])
    undo.created.update(id_ for id_ in ids if id_ not in existing)


def _content_id(record: Record) -> bool:
    # Content ids: the same id means the same text and image, so the vector is the same too.
    return record.id == content_id(record.document, record.metadata.get(IMAGE_URI_KEY))


def _undo(collection: Any, undo: _Undo, size: int) -> None:
    created = sorted(undo.created)
    if not created and not undo.saved:
        return
    logger.warning("add() failed; removing the %d item(s) it added and restoring the %d it overwrote",
                   len(created), len(undo.saved))
    for start in range(0, len(created), size):
        collection.delete(ids=created[start:start + size])
    saved = list(undo.saved.items())
    for start in range(0, len(saved), size):
        part = saved[start:start + size]
        ids = [id_ for id_, _ in part]
        now = dict(zip(*(lambda got: (got["ids"], got["metadatas"]))(collection.get(ids=ids, include=["metadatas"]))))
        collection.upsert(ids=ids, embeddings=np.stack([row[0] for _, row in part]),
                          documents=[row[1] for _, row in part],
                          metadatas=[replacing(now.get(id_), row[2]) for id_, row in part])


def replacing(current: Mapping[str, Any] | None, wanted: Mapping[str, Any] | None) -> dict[str, Any]:
    """The metadata to upsert so that a row ends up with exactly ``wanted``: Chroma's upsert and update merge
    metadata keys, and a ``None`` value removes a key."""
    out: dict[str, Any] = {key: None for key in (current or {}) if key not in (wanted or {})}
    out.update(wanted or {})
    return out
