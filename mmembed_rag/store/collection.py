"""``MultimodalCollection``: add and search text, image and text+image items in a Chroma collection."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import chromadb
import numpy as np
import torch
from chromadb.api import ClientAPI
from chromadb.errors import ChromaError
from chromadb.utils.data_loaders import ImageLoader
from tqdm.auto import tqdm

from mmembed_rag.encoder import Encoder
from mmembed_rag.errors import InvalidItemError
from mmembed_rag.hub import DEFAULT_MODEL
from mmembed_rag.images import ImageSource
from mmembed_rag.items import MultimodalItem, to_items
from mmembed_rag.results import RankedItem

from .embedding_function import MMEmbedEmbeddingFunction
from .errors import DimensionMismatchError, StoreError
from .records import Record, build_records, check_ids, combine_where, item_from_record, modality_filter

__all__ = ["MultimodalCollection", "SearchResult", "StoredItem"]

logger = logging.getLogger(__name__)

#: What :meth:`MultimodalCollection.search` returns: the project's one ranking result type.
SearchResult = RankedItem


@dataclass(frozen=True)
class StoredItem:
    """A record read back by id: the item (text and image reference) and its metadata."""

    id: str
    item: MultimodalItem
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


class MultimodalCollection:
    """A Chroma collection of MM-Embed vectors for text, image and text+image items.

    Images are stored by reference (``image_uri`` metadata: absolute path or URL), text in ``documents``,
    and ``modality`` (``"text"``, ``"image"``, ``"image,text"``) in the metadata for filtering. The
    collection records the ``mmembed`` embedding function, so plain Chroma code that reopens it (after
    ``import mmembed_rag.store``) can query it by text or by image URI.

    Args:
        model: hub id or checkpoint directory (recorded with the collection).
        encoder: an already loaded encoder of ``model``.
        persist_dir: directory of an embedded, persistent Chroma database.
        collection: collection name (3-512 characters of ``[a-zA-Z0-9._-]``).
        host, port: a Chroma server (``HttpClient``) instead of an embedded database.
        client: any Chroma client; excludes ``persist_dir``, ``host`` and ``port``.
        instruction: default query instruction (catalog name or free text).
        batch_size: items per forward pass.
        dtype, device: how ``model`` is loaded when ``encoder`` is not given.

    With neither ``persist_dir``, ``host``/``port`` nor ``client``, the database lives in memory.

    Raises:
        StoreError: conflicting connection arguments, or Chroma refuses the collection (bad name, a
            collection created with another embedding function).

    Example:
        >>> col = MultimodalCollection("nvidia/MM-Embed", persist_dir="db", instruction="mscoco_t2i")
        >>> col.add(["a cat on a mat", {"img": "cat.png"}, {"txt": "my cat", "img": "cat2.png"}])
        >>> hits = col.search("a photo of a cat", k=3, modality="image")
        >>> hits[0].item.image, hits[0].score
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, encoder: Encoder | None = None,
                 persist_dir: str | os.PathLike | None = None, collection: str = "mmembed",
                 host: str | None = None, port: int | None = None, client: ClientAPI | None = None,
                 instruction: str | None = None, batch_size: int = 8, dtype: str | torch.dtype | None = None,
                 device: str | None = None) -> None:
        self.client = _make_client(client, persist_dir, host, port)
        self.embedding_function = MMEmbedEmbeddingFunction(model, encoder=encoder, dtype=dtype, device=device,
                                                           instruction=instruction, batch_size=batch_size)
        try:
            self.collection = self.client.get_or_create_collection(
                collection, embedding_function=self.embedding_function, data_loader=ImageLoader())
        except (ValueError, ChromaError) as exc:
            raise StoreError(f"cannot open Chroma collection {collection!r}: {exc}") from exc
        self._space = _space(self.collection)
        self._dim: int | None = None
        persisted = (self.collection.configuration_json.get("embedding_function") or {}).get("config") or {}
        if persisted.get("model") not in (None, self.embedding_function.model):
            logger.warning("collection %r was built with model %r; searching it with %r", collection,
                           persisted["model"], self.embedding_function.model)

    @property
    def encoder(self) -> Encoder:
        """The encoder (loaded on first use)."""
        return self.embedding_function.encoder

    def add(self, items: Iterable[Any], ids: Sequence[str] | None = None,
            metadatas: Sequence[Mapping[str, Any] | None] | None = None, show_progress: bool | None = None,
            chunk_size: int | None = None) -> list[str]:
        """Validate, encode, then upsert items; a batch with one bad item writes nothing.

        Every vector of the batch is held in memory until written (n x dim float32): feed a large corpus in
        batches of a few thousand items, each of which is all-or-nothing.

        Args:
            items: anything :func:`~mmembed_rag.items.to_items` accepts (str, dicts, MultimodalItem, Path...).
                Images must be paths or URLs (see :mod:`mmembed_rag.store.records`).
            ids: one id per item; by default a hash of the text and image reference, so adding the same
                item again overwrites it instead of duplicating it (a re-run after a crash is safe).
            metadatas: one dict (or None) per item; ``modality`` and ``image_uri`` are reserved.
            show_progress: progress bars for encoding and writing (default: for 256 items or more).
            chunk_size: rows per upsert call, capped at the client's ``get_max_batch_size()``.

        Returns:
            The ids, one per item, in order.

        Raises:
            InvalidItemError: no items, a malformed item, an in-memory image or bad metadata.
            ImageLoadError: an image cannot be read.
            StoreError: bad ``ids``, ``metadatas`` or ``chunk_size``.
            DimensionMismatchError: the collection holds vectors of another dimension.
        """
        items = to_items(items)
        if not items:
            raise InvalidItemError("add() got no items; nothing was written")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise StoreError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        records = build_records(items, ids, metadatas)
        self._check_dim(self.encoder.dim)
        # The same content twice gets one id: upsert it once, the later metadata winning as upserts do.
        last = {record.id: index for index, record in enumerate(records)}
        keep = sorted(last.values())
        vectors = self.encoder.encode_documents([items[i] for i in keep],
                                                batch_size=self.embedding_function.batch_size,
                                                show_progress=show_progress)
        self._write([records[i] for i in keep], vectors, chunk_size, show_progress)
        return [record.id for record in records]

    def search(self, query: str | None = None, image: ImageSource | None = None, instruction: str | None = None,
               k: int = 10, where: Mapping[str, Any] | None = None,
               modality: str | Sequence[str] | None = None) -> list[RankedItem]:
        """Retrieve the ``k`` items nearest to a text, image or composed (image + text) query.

        Args:
            query: query text.
            image: query image (path, URL, PIL image, bytes or array: queries are not stored).
            instruction: task instruction (catalog name or text); ``None`` uses the collection's default.
            k: number of results.
            where: a Chroma metadata filter, combined with ``modality`` by ``$and``.
            modality: ``"text"``, ``"image"``, ``"image,text"`` or a list of them.

        Returns:
            Best first: ``RankedItem(index=rank, score=cosine similarity, item, id, metadata)``.

        Raises:
            InvalidItemError: neither query nor image, or an invalid one.
            ImageLoadError: the query image cannot be read.
            StoreError: bad ``k``, ``where`` or ``modality``.
            DimensionMismatchError: the collection holds vectors of another dimension.
        """
        if query is None and image is None:
            raise InvalidItemError("search() needs a query text, an image, or both")
        try:
            item = MultimodalItem(text=query, image=image)
        except InvalidItemError as exc:
            raise InvalidItemError(f"query: {exc}") from exc
        instruction = self.embedding_function.instruction if instruction is None else instruction
        vector = self.encoder.encode_queries([item], instruction=instruction, batch_size=1, show_progress=False)
        return self.search_by_vector(vector[0], k=k, where=where, modality=modality)

    def search_by_vector(self, vector: np.ndarray, k: int = 10, where: Mapping[str, Any] | None = None,
                         modality: str | Sequence[str] | None = None) -> list[RankedItem]:
        """:meth:`search` with a query vector computed elsewhere (e.g. ``encoder.encode_queries``)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise StoreError(f"k must be a positive int, got {k!r}")
        vector = np.asarray(vector, dtype=np.float32)
        if vector.ndim != 1:
            raise StoreError(f"expected one query vector (1-D), got shape {vector.shape}")
        where = combine_where(where, modality_filter(modality))
        stored = self._stored_dim()
        if stored is None:
            return []
        self._check_dim(vector.shape[0])
        try:
            found = self.collection.query(query_embeddings=[vector], n_results=k, where=where,
                                          include=["documents", "metadatas", "distances", "uris"])
        except (ValueError, ChromaError) as exc:
            raise StoreError(f"Chroma refused the query (where={where!r}): {exc}") from exc
        ids, documents, metadatas = found["ids"][0], found["documents"][0], found["metadatas"][0]
        uris = found["uris"][0] if found.get("uris") else [None] * len(ids)
        return [RankedItem(index=rank, score=self._score(distance),
                           item=item_from_record(id_, document, metadata, uri), id=id_,
                           metadata=MappingProxyType(dict(metadata or {})))
                for rank, (id_, document, metadata, uri, distance)
                in enumerate(zip(ids, documents, metadatas, uris, found["distances"][0]))]

    def get(self, ids: Sequence[str]) -> list[StoredItem]:
        """The stored items with these ids, in the order asked; ids not in the collection are left out."""
        ids = check_ids(ids)
        found = self.collection.get(ids=ids, include=["documents", "metadatas", "uris"])
        uris = found.get("uris") or [None] * len(found["ids"])
        by_id = {id_: StoredItem(id_, item_from_record(id_, document, metadata, uri),
                                 MappingProxyType(dict(metadata or {})))
                 for id_, document, metadata, uri in zip(found["ids"], found["documents"], found["metadatas"], uris)}
        return [by_id[id_] for id_ in dict.fromkeys(ids) if id_ in by_id]

    def delete(self, ids: Sequence[str]) -> None:
        """Delete these ids (ids not in the collection are ignored)."""
        self.collection.delete(ids=check_ids(ids))

    def count(self) -> int:
        """Number of stored items."""
        return self.collection.count()

    def __len__(self) -> int:
        return self.count()

    def __repr__(self) -> str:
        return (f"MultimodalCollection(collection={self.collection.name!r}, "
                f"model={self.embedding_function.model!r}, space={self._space!r})")

    def _write(self, records: list[Record], vectors: np.ndarray, chunk_size: int | None,
               show_progress: bool | None) -> None:
        size = self.client.get_max_batch_size()
        if chunk_size is not None:
            size = min(size, chunk_size)
        quiet = not show_progress if show_progress is not None else len(records) < 256
        with tqdm(total=len(records), desc="writing", unit="item", disable=quiet) as bar:
            for start in range(0, len(records), size):
                part = records[start:start + size]
                self.collection.upsert(ids=[r.id for r in part], embeddings=vectors[start:start + size],
                                       documents=[r.document for r in part], metadatas=[r.metadata for r in part])
                bar.update(len(part))
        logger.info("upserted %d item(s) into %r in chunks of %d", len(records), self.collection.name, size)

    def check_model(self) -> None:
        """Raise :class:`DimensionMismatchError` if the stored vectors do not fit the model (read once, cached).

        :meth:`add` checks this itself; processes that write one collection concurrently call it before any
        of them writes, so no reader races a writer on a collection that is still being created.
        """
        self._check_dim(self.encoder.dim)

    def _stored_dim(self) -> int | None:
        if self._dim is None:
            sample = self.collection.get(limit=1, include=["embeddings"])
            if sample["ids"]:
                self._dim = len(sample["embeddings"][0])
        return self._dim

    def _check_dim(self, dim: int) -> None:
        stored = self._stored_dim()
        if stored is not None and stored != dim:
            raise DimensionMismatchError(
                f"collection {self.collection.name!r} holds {stored}-dimensional vectors but model "
                f"{self.embedding_function.model!r} gives {dim}-dimensional ones; use the model that built "
                "the collection or a new collection name. Nothing was written")

    def _score(self, distance: float) -> float:
        # Vectors are unit length: cosine and ip distances are 1 - cos, Chroma's l2 is squared, 2 - 2 cos.
        return 1.0 - distance / 2.0 if self._space == "l2" else 1.0 - distance


def _make_client(client: ClientAPI | None, persist_dir: str | os.PathLike | None, host: str | None,
                 port: int | None) -> ClientAPI:
    remote = host is not None or port is not None
    if client is not None and (persist_dir is not None or remote):
        raise StoreError("pass either client or persist_dir/host/port, not both")
    if persist_dir is not None and remote:
        raise StoreError("pass either persist_dir (embedded database) or host/port (Chroma server), not both")
    if client is not None:
        return client
    if remote:
        host, port = host or "localhost", port or 8000
        try:
            return chromadb.HttpClient(host=host, port=port)
        except ValueError as exc:  # raised when no server answers
            raise StoreError(f"cannot reach a Chroma server at {host}:{port}: {exc}") from exc
    if persist_dir is not None:
        return chromadb.PersistentClient(path=str(persist_dir))
    return chromadb.EphemeralClient()


def _space(collection: Any) -> str:
    config = collection.configuration_json or {}
    index = config.get("hnsw") or config.get("spann") or {}
    return index.get("space") or (collection.metadata or {}).get("hnsw:space") or "l2"
