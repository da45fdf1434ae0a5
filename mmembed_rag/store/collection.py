"""``MultimodalCollection``: add and search text, image and text+image items in a Chroma collection."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from chromadb.api import ClientAPI
from chromadb.errors import ChromaError
from chromadb.utils.data_loaders import ImageLoader

from mmembed_rag.encoder import Encoder
from mmembed_rag.errors import InvalidItemError
from mmembed_rag.hub import DEFAULT_MODEL
from mmembed_rag.images import ImageSource
from mmembed_rag.items import MultimodalItem
from mmembed_rag.results import RankedItem
from mmembed_rag.similarity import collection_space, cosine_from_distance

from .connection import make_client
from .embedding_function import MMEmbedEmbeddingFunction
from .errors import DimensionMismatchError, ModelMismatchError, StoreError
from .modality_index import ModalityIndex, has_modality_index
from .records import (
    IMAGE_URI_KEY,
    MODALITY_KEY,
    check_ids,
    combine_where,
    item_from_record,
    modality_filter,
    user_metadata,
)
from .writer import read, replacing, stream_add

__all__ = ["MultimodalCollection", "SearchResult", "StoredItem"]

logger = logging.getLogger(__name__)

#: Items per encode/write step of :meth:`MultimodalCollection.add` by default: small enough that encoding the next
#: chunk hides writing this one from the first seconds of a call, large enough to amortise Chroma's per-call cost.
DEFAULT_CHUNK_SIZE = 256

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
        client: any Chroma client (e.g. built with your own ``Settings``); excludes ``persist_dir``, ``host``,
            ``port`` and the server options.
        ssl, headers, auth_token, auth_header: for a server: HTTPS, extra HTTP headers, and a token for chromadb's
            token authentication sent in ``auth_header`` (``"Authorization"`` as a bearer token, or
            ``"X-Chroma-Token"``). Never logged.
        instruction: default query instruction (catalog name or free text).
        batch_size: items per forward pass.
        dtype, device: how ``model`` is loaded when ``encoder`` is not given.
        encoder_kwargs: Encoder options when ``model`` is loaded here (``max_length``, ``image_workers``,
            ``max_image_pixels``, ``url_timeout``, ``batch_size``); recorded with the collection.
        allow_model_change: open a collection that was built with another model anyway. Vectors of two models
            live in different spaces even when their dimensions agree, so by default this is refused.
        modality_index: also keep one shadow collection per modality (see :mod:`mmembed_rag.store.modality_index`),
            so that ``modality=`` searches are plain HNSW queries instead of Chroma's metadata-filtered ones;
            unfiltered searches still use the one main collection. Costs twice the storage and write time.
            ``None`` (default): use it when the collection already has one.

    With neither ``persist_dir``, ``host``/``port`` nor ``client``, the database lives in memory.

    Raises:
        StoreError: conflicting connection arguments, an unwritable ``persist_dir``, no server, or Chroma refuses
            the collection (bad name, a collection created with another embedding function).
        ModelMismatchError: the collection was built with another model (see ``allow_model_change``).

    Example:
        >>> col = MultimodalCollection("nvidia/MM-Embed", persist_dir="db", instruction="mscoco_t2i")
        >>> col.add(["a cat on a mat", {"img": "cat.png"}, {"txt": "my cat", "img": "cat2.png"}])
        >>> hits = col.search("a photo of a cat", k=3, modality="image")
        >>> hits[0].item.image, hits[0].score
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, encoder: Encoder | None = None,
                 persist_dir: str | os.PathLike | None = None, collection: str = "mmembed",
                 host: str | None = None, port: int | None = None, client: ClientAPI | None = None,
                 ssl: bool = False, headers: Mapping[str, str] | None = None, auth_token: str | None = None,
                 auth_header: str = "Authorization", instruction: str | None = None, batch_size: int = 8,
                 dtype: str | torch.dtype | None = None, device: str | None = None,
                 encoder_kwargs: Mapping[str, Any] | None = None, allow_model_change: bool = False,
                 modality_index: bool | None = None) -> None:
        self.client = make_client(client, persist_dir, host, port, ssl=ssl, headers=headers, auth_token=auth_token,
                                  auth_header=auth_header)
        self.embedding_function = MMEmbedEmbeddingFunction(model, encoder=encoder, dtype=dtype, device=device,
                                                           instruction=instruction, batch_size=batch_size,
                                                           encoder_kwargs=encoder_kwargs)
        self._refuse_other_model(collection, allow_model_change)
        try:
            self.collection = self.client.get_or_create_collection(
                collection, embedding_function=self.embedding_function, data_loader=ImageLoader())
        except (ValueError, ChromaError) as exc:
            raise StoreError(f"cannot open Chroma collection {collection!r}: {exc}") from exc
        self._space = collection_space(self.collection.configuration_json, self.collection.metadata)
        self._dim: int | None = None
        if modality_index is None:
            modality_index = has_modality_index(self.client, collection)
        self._index = (ModalityIndex(self.client, self.collection, self.embedding_function, self.max_batch_size)
                       if modality_index else None)

    def _refuse_other_model(self, name: str, allow: bool) -> None:
        try:
            existing = self.client.get_collection(name)
        except (ValueError, ChromaError):  # no such collection yet (NotFoundError), or a bad name: reported below
            return
        persisted = (existing.configuration_json.get("embedding_function") or {}).get("config") or {}
        stored = persisted.get("model")
        if stored in (None, self.embedding_function.model):
            return
        if not allow:
            raise ModelMismatchError(
                f"collection {name!r} was built with model {stored!r}, not {self.embedding_function.model!r}: two "
                "models' vectors live in different embedding spaces even when their dimensions agree. Use the "
                "collection's model, a new collection name, or allow_model_change=True (--allow-model-change) "
                "if the two are the same weights (e.g. a moved checkpoint)")
        logger.warning("collection %r was built with model %r; opening it with %r (allow_model_change=True)",
                       name, stored, self.embedding_function.model)

    @property
    def encoder(self) -> Encoder:
        """The encoder (loaded on first use)."""
        return self.embedding_function.encoder

    @property
    def modality_index(self) -> bool:
        """Whether ``modality=`` searches use the per-modality shadow collections."""
        return self._index is not None

    @property
    def max_batch_size(self) -> int:
        """The most records the client accepts in one write (5,461 for embedded Chroma 1.5)."""
        return self.client.get_max_batch_size()

    def add(self, items: Iterable[Any], ids: Iterable[str] | None = None,
            metadatas: Iterable[Mapping[str, Any] | None] | None = None, show_progress: bool | None = None,
            chunk_size: int | None = None) -> list[str]:
        """Validate, encode and upsert items from any iterable; a call that fails writes nothing.

        Items are pulled one chunk at a time (a generator of a million items streams with bounded memory); each
        chunk is validated (records built, images loaded) before it is written, and the next chunk is encoded
        while this one is written. On any failure -- a bad item in a later chunk, an encoder error, a refused
        write -- the call is undone: ids it added are deleted and rows it overwrote are restored.

        Args:
            items: an iterable of anything :func:`~mmembed_rag.items.to_item` accepts (str, dicts,
                MultimodalItem, Path...). Images must be paths or URLs (see :mod:`mmembed_rag.store.records`).
            ids: one id per item (any iterable); by default a hash of the text and image reference, so adding the
                same item again overwrites it instead of duplicating it (a re-run after a crash is safe).
            metadatas: one dict (or None) per item (any iterable); ``modality`` and ``image_uri`` are reserved.
            show_progress: a progress bar (default: for 256 items or more, or an input of unknown length).
            chunk_size: items per encode/upsert step (default :data:`DEFAULT_CHUNK_SIZE`), capped at the client's
                ``get_max_batch_size()``.

        Returns:
            The ids, one per item, in order.

        Raises:
            InvalidItemError: no items, a malformed item, an in-memory image or bad metadata (named by its index
                in ``items``).
            ImageLoadError: an image cannot be read (named by its index in ``items``).
            StoreError: bad ``ids``, ``metadatas`` or ``chunk_size``.
            DimensionMismatchError: the collection holds vectors of another dimension.
        """
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise StoreError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self._check_dim(self.encoder.dim)
        size = min(self.max_batch_size, chunk_size or DEFAULT_CHUNK_SIZE)
        target = self.collection if self._index is None else self._index
        return stream_add(target, self.encoder, items, ids, metadatas, chunk_size=size,
                          batch_size=self.embedding_function.batch_size, show_progress=show_progress)

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
        indexed = self._index is not None and modality is not None
        where = combine_where(where, None if indexed else modality_filter(modality))
        stored = self._stored_dim()
        if stored is None:
            return []
        self._check_dim(vector.shape[0])
        include = ["documents", "metadatas", "distances", "uris"]
        try:
            if indexed:  # the shadow collection(s) of these modalities: no metadata filter to evaluate
                modality_filter(modality)  # an unknown name is a StoreError here too
                found = self._index.query(vector, k, modality, where, include)
            else:
                found = self.collection.query(query_embeddings=[vector], n_results=k, where=where, include=include)
        except (ValueError, ChromaError) as exc:
            raise StoreError(f"Chroma refused the query (where={where!r}): {exc}") from exc
        ids, documents, metadatas = found["ids"][0], found["documents"][0], found["metadatas"][0]
        uris = found["uris"][0] if found.get("uris") else [None] * len(ids)
        return [RankedItem(index=rank, score=cosine_from_distance(distance, self._space),
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

    def delete(self, ids: Sequence[str] | None = None, *, where: Mapping[str, Any] | None = None,
               modality: str | Sequence[str] | None = None) -> list[str]:
        """Delete by id, or every record matching a metadata filter (ids not in the collection are ignored).

        Args:
            ids: the ids to delete.
            where: a Chroma metadata filter (e.g. ``{"source": "old.jsonl"}``), combined with ``modality``.
            modality: delete only records of these modalities.

        Returns:
            The ids that were deleted (those found).

        Raises:
            StoreError: none or both of ``ids`` and a filter, empty or bad ``ids``, a bad filter.
        """
        condition = combine_where(where, modality_filter(modality))
        if (ids is None) == (condition is None):
            raise StoreError("delete() takes ids=... or a filter (where=..., modality=...), exactly one of them")
        if ids is not None:
            ids = check_ids(ids)
            found = self.collection.get(ids=ids, include=[])["ids"]
        else:
            try:
                found = self.collection.get(where=condition, include=[])["ids"]
            except (ValueError, ChromaError) as exc:
                raise StoreError(f"Chroma refused the filter (where={condition!r}): {exc}") from exc
        size = self.max_batch_size
        target = self.collection if self._index is None else self._index
        for start in range(0, len(found), size):
            target.delete(ids=found[start:start + size])
        return list(found)

    def update(self, ids: Sequence[str], *, metadatas: Sequence[Mapping[str, Any]]) -> None:
        """Replace the user metadata of stored records (vectors, text and images stay as they are).

        Args:
            ids: records to update; every one must exist.
            metadatas: one dict per id; ``modality`` and ``image_uri`` are kept by the store and may not be set.

        Raises:
            StoreError: bad or missing ids, or a length mismatch. InvalidItemError: bad metadata (named by index).
        """
        ids = check_ids(ids)
        if isinstance(metadatas, Mapping) or not isinstance(metadatas, Sequence) or len(metadatas) != len(ids):
            raise StoreError("update() needs one metadata dict per id")
        if len(set(ids)) != len(ids):
            raise StoreError("update() ids must be unique")
        fresh = [user_metadata(meta, index) for index, meta in enumerate(metadatas)]
        found = self.collection.get(ids=ids, include=["metadatas"])
        stored = dict(zip(found["ids"], found["metadatas"]))
        missing = [id_ for id_ in ids if id_ not in stored]
        if missing:
            raise StoreError(f"update(): no record with id {missing[0]!r}; nothing was updated")
        merged = []
        for id_, meta in zip(ids, fresh):
            keep = {key: value for key, value in (stored[id_] or {}).items() if key in (MODALITY_KEY, IMAGE_URI_KEY)}
            merged.append(replacing(stored[id_], {**meta, **keep}))  # Chroma merges keys: drop the old ones
        size = self.max_batch_size
        target = self.collection if self._index is None else self._index
        for start in range(0, len(ids), size):
            target.update(ids=ids[start:start + size], metadatas=merged[start:start + size])

    def count(self) -> int:
        """Number of stored items."""
        return self.collection.count()

    def __len__(self) -> int:
        return self.count()

    def __repr__(self) -> str:
        return (f"MultimodalCollection(collection={self.collection.name!r}, "
                f"model={self.embedding_function.model!r}, space={self._space!r})")

    def check_model(self) -> None:
        """Raise :class:`DimensionMismatchError` if the stored vectors do not fit the model (read once, cached).

        :meth:`add` checks this itself; processes that write one collection concurrently call it before any
        of them writes, so no reader races a writer on a collection that is still being created.
        """
        self._check_dim(self.encoder.dim)

    def _stored_dim(self) -> int | None:
        if self._dim is None:
            sample = read(self.collection, limit=1, include=["embeddings"])
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
