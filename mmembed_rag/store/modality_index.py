"""An optional per-modality index: each record also lives in a shadow collection of its modality.

Chroma answers a ``where``-filtered query by filtering a whole collection's metadata first (about 150 ms over
100,000 records of 4096-d vectors here, against 8 ms unfiltered: ``benchmarks/search_overhead.py``); a plain
HNSW query of a collection that holds only that modality answers in milliseconds. The main collection stays
the one collection of the store (unfiltered queries, plain Chroma code, the ``mmembed`` embedding function);
the shadows ``{name}.text``, ``{name}.image`` and ``{name}.image-text`` are written alongside it, by the same
all-or-nothing writes, and are rebuilt from the main collection when they disagree with it (e.g. after plain
Chroma code wrote the main collection). The price is twice the storage and write time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from chromadb.api import ClientAPI
from chromadb.errors import ChromaError

from mmembed_rag.modality import MODALITIES, MODALITY_KEY, modalities

from .errors import StoreError

__all__ = ["ModalityIndex", "has_modality_index", "shadow_name"]

logger = logging.getLogger(__name__)


def shadow_name(name: str, modality: str) -> str:
    """The shadow collection of ``modality`` for collection ``name`` (Chroma names allow no comma)."""
    return f"{name}.{modality.replace(',', '-')}"


def has_modality_index(client: ClientAPI, name: str) -> bool:
    """Whether collection ``name`` has shadow collections (it was opened with ``modality_index=True`` before)."""
    try:
        client.get_collection(shadow_name(name, MODALITIES[0]))
    except (ValueError, ChromaError):  # NotFoundError
        return False
    return True


class ModalityIndex:
    """The shadow collections of one main collection, and the writes and queries that keep them in step.

    Args:
        client: the Chroma client of the main collection.
        main: the main collection.
        embedding_function: the main collection's (recorded with each shadow too).
        batch_size: rows per call when rebuilding.
    """

    def __init__(self, client: ClientAPI, main: Any, embedding_function: Any, batch_size: int) -> None:
        self.main = main
        self.batch_size = batch_size
        config = {"hnsw": {"space": (main.configuration_json.get("hnsw") or {}).get("space") or "cosine"}}
        try:
            self.shadows = {m: client.get_or_create_collection(shadow_name(main.name, m), configuration=config,
                                                               embedding_function=embedding_function)
                            for m in MODALITIES}
        except (ValueError, ChromaError) as exc:
            raise StoreError(f"cannot open the modality index of {main.name!r}: {exc}") from exc
        if sum(s.count() for s in self.shadows.values()) != main.count():
            self.rebuild(client, embedding_function)

    @property
    def name(self) -> str:
        return self.main.name

    def rebuild(self, client: ClientAPI, embedding_function: Any) -> None:
        """Copy every record of the main collection into empty shadows."""
        logger.info("rebuilding the modality index of %r from its %d record(s)", self.main.name, self.main.count())
        config = {"hnsw": {"space": (self.main.configuration_json.get("hnsw") or {}).get("space") or "cosine"}}
        for modality, shadow in list(self.shadows.items()):
            client.delete_collection(shadow.name)
            self.shadows[modality] = client.get_or_create_collection(shadow.name, configuration=config,
                                                                     embedding_function=embedding_function)
        offset = 0
        while True:
            rows = self.main.get(limit=self.batch_size, offset=offset,
                                 include=["embeddings", "documents", "metadatas"])
            if not rows["ids"]:
                break
            self._route(rows["ids"], np.asarray(rows["embeddings"]), rows["documents"], rows["metadatas"])
            offset += len(rows["ids"])

    # --- what stream_add calls: the main collection's get/upsert/delete, mirrored -------------------------------

    def get(self, **kwargs: Any) -> Any:
        return self.main.get(**kwargs)

    def upsert(self, *, ids: list[str], embeddings: Any, documents: list[str | None],
               metadatas: list[Mapping[str, Any]]) -> None:
        self.main.upsert(ids=ids, embeddings=embeddings, documents=documents, metadatas=metadatas)
        stored = self.main.get(ids=ids, include=["metadatas"])  # upserts merge metadata: mirror the merged rows
        merged = dict(zip(stored["ids"], stored["metadatas"]))
        self._route(ids, np.asarray(embeddings), documents, [merged.get(i) or m for i, m in zip(ids, metadatas)])

    def delete(self, *, ids: list[str]) -> None:
        self.main.delete(ids=ids)
        for shadow in self.shadows.values():
            shadow.delete(ids=ids)

    def update(self, *, ids: list[str], metadatas: list[Mapping[str, Any]]) -> None:
        self.main.update(ids=ids, metadatas=metadatas)
        stored = self.main.get(ids=ids, include=["metadatas"])
        by_modality: dict[str, list[int]] = {}
        for position, metadata in enumerate(stored["metadatas"]):
            by_modality.setdefault((metadata or {}).get(MODALITY_KEY), []).append(position)
        wanted = dict(zip(ids, metadatas))
        for modality, positions in by_modality.items():
            if modality in self.shadows:
                part = [stored["ids"][p] for p in positions]
                self.shadows[modality].update(ids=part, metadatas=[wanted[i] for i in part])

    def _route(self, ids: Sequence[str], embeddings: np.ndarray, documents: Sequence[str | None],
               metadatas: Sequence[Mapping[str, Any] | None]) -> None:
        """Each row into its modality's shadow (and out of the others: an id may change modality)."""
        for modality, shadow in self.shadows.items():
            keep = [j for j, meta in enumerate(metadatas) if (meta or {}).get(MODALITY_KEY) == modality]
            kept = set(keep)
            other = [ids[j] for j in range(len(ids)) if j not in kept]
            if other:
                shadow.delete(ids=other)
            if keep:
                shadow.upsert(ids=[ids[j] for j in keep], embeddings=embeddings[keep],
                              documents=[documents[j] for j in keep], metadatas=[dict(metadatas[j]) for j in keep])

    # --- queries ------------------------------------------------------------------------------------------------

    def query(self, vector: np.ndarray, k: int, modality: str | Sequence[str], where: Mapping[str, Any] | None,
              include: list[str]) -> dict[str, list[list[Any]]]:
        """Chroma's ``query`` result for one vector, answered by the shadows of ``modality`` and merged by distance."""
        hits: list[tuple[float, str, Any, Any, Any]] = []
        for name in modalities(modality):
            found = self.shadows[name].query(query_embeddings=[vector], n_results=k, where=where, include=include)
            uris = found["uris"][0] if found.get("uris") else [None] * len(found["ids"][0])
            hits += zip(found["distances"][0], found["ids"][0], found["documents"][0], found["metadatas"][0], uris)
        hits.sort(key=lambda hit: hit[0])
        hits = hits[:k]
        columns = ("distances", "ids", "documents", "metadatas", "uris")
        return {column: [[hit[i] for hit in hits]] for i, column in enumerate(columns)}
