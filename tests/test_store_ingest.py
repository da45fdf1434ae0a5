"""MultimodalCollection writes: streaming any iterable, encoding overlapped with writing, all-or-nothing calls,
delete/update, the model-change guard, unwritable databases, symlink loops and encoder options."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed_rag import Encoder, ImageLoadError, InvalidItemError
from mmembed_rag.store import (
    EmbeddingFunctionConfigError,
    MMEmbedEmbeddingFunction,
    ModelMismatchError,
    MultimodalCollection,
    StoreError,
    cached_encoder,
    clear_encoder_cache,
)
from mmembed_rag.testing import make_tiny_checkpoint

pytestmark = pytest.mark.both_families  # every test runs once per model family


@pytest.fixture(autouse=True)
def _forget_stand_in_encoders():
    """A collection shares the encoder it was given with later loads by path: drop the stand-ins after each test."""
    yield
    clear_encoder_cache()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (32, 24), (220, 20, 20)).save(path)
    return path


def _open(tiny_checkpoint: Path, encoder, **kwargs) -> MultimodalCollection:
    kwargs.setdefault("collection", f"t-{uuid.uuid4().hex[:12]}")
    return MultimodalCollection(str(tiny_checkpoint), encoder=encoder, **kwargs)


def _rows(col: MultimodalCollection) -> dict[str, tuple]:
    got = col.collection.get(include=["documents", "metadatas", "embeddings"])
    return {i: (d, m, np.round(np.asarray(e), 6).tolist())
            for i, d, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"])}


class SlowEncoder:
    """Stands in for a fast GPU encoder with a known cost: ``delay`` seconds per chunk, random unit vectors."""

    def __init__(self, dim: int = 16, delay: float = 0.0) -> None:
        self.dim, self.delay, self.events = dim, delay, []
        self.rng = np.random.default_rng(0)

    def encode_documents(self, items, batch_size=8, show_progress=None):
        self.events.append(("encode-start", time.perf_counter(), len(items)))
        time.sleep(self.delay)
        vectors = self.rng.standard_normal((len(items), self.dim)).astype(np.float32)
        self.events.append(("encode-end", time.perf_counter(), len(items)))
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------- streaming


def test_a_generator_is_streamed_chunk_by_chunk(tiny_checkpoint):
    col = _open(tiny_checkpoint, SlowEncoder())
    pulled = []

    def items():
        for i in range(60):
            pulled.append(i)
            yield f"text {i}"

    seen_at_write = []
    upsert = col.collection.upsert
    col.collection.upsert = lambda **kw: (seen_at_write.append(len(pulled)), upsert(**kw))
    ids = col.add(items(), chunk_size=8)
    assert len(ids) == 60 and col.count() == 60
    # the first write happens after at most two chunks were pulled: the input is never materialised
    assert seen_at_write[0] <= 16 and len(seen_at_write) == 8


def test_encoding_the_next_chunk_overlaps_writing_this_one(tiny_checkpoint):
    encoder = SlowEncoder(delay=0.15)
    col = _open(tiny_checkpoint, encoder)
    writes = []
    upsert = col.collection.upsert

    def slow_upsert(**kw):
        start = time.perf_counter()
        time.sleep(0.15)
        upsert(**kw)
        writes.append((start, time.perf_counter()))

    col.collection.upsert = slow_upsert
    started = time.perf_counter()
    col.add((f"doc {i}" for i in range(30)), chunk_size=6)  # 5 chunks: 1.5 s back to back
    elapsed = time.perf_counter() - started
    encode_starts = [t for kind, t, _ in encoder.events if kind == "encode-start"]
    # chunk k+1's encoding starts before chunk k's write has finished
    assert all(encode_starts[k + 1] < writes[k][1] for k in range(len(writes) - 1))
    assert elapsed < 1.3, elapsed


def test_ids_and_metadatas_may_be_iterables_too(tiny_checkpoint):
    col = _open(tiny_checkpoint, SlowEncoder())
    ids = col.add((f"t{i}" for i in range(5)), ids=(f"id{i}" for i in range(5)),
                  metadatas=({"n": i} for i in range(5)), chunk_size=2)
    assert ids == [f"id{i}" for i in range(5)] and col.get(["id3"])[0].metadata == {"n": 3, "modality": "text"}
    with pytest.raises(StoreError, match="got 2 ids for more items"):
        col.add((f"u{i}" for i in range(5)), ids=iter(["a", "b"]), chunk_size=1)
    with pytest.raises(StoreError, match="got more metadatas than the 2 items"):
        col.add(iter(["v0", "v1"]), metadatas=iter([{}, {}, {}]), chunk_size=1)
    with pytest.raises(StoreError, match=r"ids repeat 'x' \(items 0 and 3\)"):
        col.add(iter(["w0", "w1", "w2", "w3"]), ids=iter(["x", "y", "z", "x"]), chunk_size=2)
    assert col.count() == 5  # every failed call was undone


# ------------------------------------------------------------------------------- all-or-nothing


def test_a_failure_in_a_later_chunk_undoes_the_whole_call(tiny_checkpoint, tiny_encoder, image, tmp_path):
    col = _open(tiny_checkpoint, tiny_encoder)
    col.add(["already here", "kept as is"], ids=["a", "k"], metadatas=[{"v": 1}, {"v": 1}])
    before = _rows(col)
    writes = []
    upsert = col.collection.upsert
    col.collection.upsert = lambda **kw: (writes.append(kw["ids"]), upsert(**kw))
    items = ["overwrites a", "new 1", {"img": str(image)}, "new 2", "new 3", {"img": str(tmp_path / "gone.png")}]
    with pytest.raises(ImageLoadError, match=r"^item 5: cannot load image .*gone\.png"):
        col.add(items, ids=["a", "n1", "n2", "n3", "n4", "bad"], metadatas=[{"v": 2}] * 6, chunk_size=2)
    assert writes[:2] == [["a", "n1"], ["n2", "n3"]]  # two chunks were written before the failure...
    assert _rows(col) == before  # ...and undone: new ids deleted, "a" restored (vector, text, metadata)


def test_a_bad_item_found_while_streaming_names_its_position_and_writes_nothing(tiny_checkpoint):
    col = _open(tiny_checkpoint, SlowEncoder())
    col.add(["seed"])
    items = (f"t{i}" if i != 10 else 42 for i in range(20))
    with pytest.raises(InvalidItemError, match=r"^item 10: expected str, dict"):
        col.add(items, chunk_size=4)
    assert col.count() == 1 and col.get(col.add(["seed"]))[0].item.text == "seed"


def test_a_refused_write_undoes_the_chunks_before_it(tiny_checkpoint):
    col = _open(tiny_checkpoint, SlowEncoder())
    upsert, calls = col.collection.upsert, []

    def flaky(**kw):
        calls.append(len(kw["ids"]))
        if len(calls) == 3:
            raise OSError("disk full")
        upsert(**kw)

    col.collection.upsert = flaky
    with pytest.raises(OSError, match="disk full"):
        col.add((f"x{i}" for i in range(10)), chunk_size=3)
    col.collection.upsert = upsert
    assert calls[:3] == [3, 3, 3] and col.count() == 0


# --------------------------------------------------------------------------------- update/delete


def test_delete_by_ids_by_filter_and_by_modality(tiny_checkpoint, tiny_encoder, image):
    col = _open(tiny_checkpoint, tiny_encoder)
    ids = col.add(["a text", {"img": str(image)}, {"txt": "a caption", "img": str(image)}, "old one"],
                  metadatas=[{"src": "new"}, {"src": "new"}, {"src": "new"}, {"src": "old"}])
    assert col.delete(where={"src": "old"}) == [ids[3]] and col.count() == 3
    assert col.delete(modality="image") == [ids[1]]
    assert sorted(col.delete(where={"src": "new"}, modality=["text", "image,text"])) == sorted([ids[0], ids[2]])
    assert col.count() == 0 and col.delete(ids=["missing"]) == []
    with pytest.raises(StoreError, match="exactly one of them"):
        col.delete()
    with pytest.raises(StoreError, match="exactly one of them"):
        col.delete(ids=["x"], where={"src": "new"})
    with pytest.raises(StoreError, match="modality must be one of"):
        col.delete(modality="video")


def test_update_replaces_user_metadata_and_keeps_the_stores(tiny_checkpoint, tiny_encoder, image):
    col = _open(tiny_checkpoint, tiny_encoder)
    ids = col.add([{"txt": "a caption", "img": str(image)}, "text"], metadatas=[{"a": 1, "b": 2}, None])
    vectors = col.collection.get(ids=ids, include=["embeddings"])["embeddings"]
    col.update(ids, metadatas=[{"a": 3}, {"tag": "x"}])
    got = col.get(ids)
    assert dict(got[0].metadata) == {"a": 3, "modality": "image,text", "image_uri": str(image.resolve())}
    assert dict(got[1].metadata) == {"tag": "x", "modality": "text"} and got[0].item.text == "a caption"
    np.testing.assert_array_equal(col.collection.get(ids=ids, include=["embeddings"])["embeddings"], vectors)
    assert col.search_by_vector(np.asarray(vectors[0]), k=1, where={"a": 3})[0].id == ids[0]
    with pytest.raises(StoreError, match="no record with id 'nope'; nothing was updated"):
        col.update([ids[0], "nope"], metadatas=[{"a": 9}, {}])
    with pytest.raises(InvalidItemError, match="item 0: metadata key 'modality' is reserved"):
        col.update([ids[0]], metadatas=[{"modality": "text"}])
    assert col.get([ids[0]])[0].metadata["a"] == 3


# ----------------------------------------------------------------------------------- bad input


def test_another_model_of_the_same_dimension_is_refused(tmp_path, tiny_checkpoint, tiny_encoder):
    twin = make_tiny_checkpoint(tmp_path / "twin", seed=7)  # same shapes, other weights: another space
    col = _open(tiny_checkpoint, tiny_encoder, persist_dir=tmp_path / "db", collection="spaces")
    col.add(["written with the first model"])
    with pytest.raises(ModelMismatchError, match="collection 'spaces' was built with model .* different embedding "
                                                 "spaces even when their dimensions agree.*allow_model_change=True"):
        MultimodalCollection(str(twin), persist_dir=tmp_path / "db", collection="spaces", device="cpu")
    other = MultimodalCollection(str(twin), persist_dir=tmp_path / "db", collection="spaces", device="cpu",
                                 allow_model_change=True)
    assert other.encoder.dim == tiny_encoder.dim
    other.add(["explicitly allowed"])
    assert col.count() == 2


@pytest.mark.skipif(not hasattr(os, "seteuid"), reason="needs POSIX user ids")
def test_a_read_only_database_directory_is_a_store_error_naming_it(tiny_checkpoint, tiny_encoder):
    folder = Path(tempfile.mkdtemp(prefix="mmembed-ro-"))  # under /tmp: searchable by every user
    folder.chmod(0o555)
    as_root = os.geteuid() == 0
    if as_root:  # root writes anywhere: become "nobody" for the attempt
        os.seteuid(65534)
    try:
        for _ in range(2):  # a retry in the same process gives the same error, not AttributeError
            with pytest.raises(StoreError, match=f"cannot write the Chroma database at {folder / 'db'}: the "
                                                 f"directory {folder} is read-only"):
                _open(tiny_checkpoint, tiny_encoder, persist_dir=folder / "db")
    finally:
        if as_root:
            os.seteuid(0)
        folder.chmod(0o755)
        shutil.rmtree(folder)


def test_a_symlink_loop_is_named(tmp_path, tiny_checkpoint, tiny_encoder):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    col = _open(tiny_checkpoint, tiny_encoder)
    with pytest.raises(InvalidItemError, match=r"item 1: image path '.*a\.png' cannot be resolved \(a symlink loop"):
        col.add(["fine", {"img": str(tmp_path / "a.png")}])
    assert col.count() == 0


# ------------------------------------------------------------------------------- encoder options


def test_encoder_kwargs_load_the_encoder_and_persist_with_the_collection(tmp_path, tiny_checkpoint):
    options = {"max_length": 64, "url_timeout": 3.5, "image_workers": 1}
    col = MultimodalCollection(str(tiny_checkpoint), persist_dir=tmp_path / "db", collection="opts", device="cpu",
                               encoder_kwargs={**options, "batch_size": 3})
    assert col.encoder.url_timeout == 3.5 and col.embedding_function.batch_size == 3
    assert col.encoder is cached_encoder(tiny_checkpoint, device="cpu", encoder_kwargs=options)
    assert col.encoder is not cached_encoder(tiny_checkpoint, device="cpu")
    config = col.collection.configuration_json["embedding_function"]["config"]
    assert config["encoder_kwargs"] == options and config["batch_size"] == 3
    rebuilt = MMEmbedEmbeddingFunction.build_from_config(config)
    assert rebuilt.encoder_kwargs == options and rebuilt.get_config() == config
    with pytest.raises(EmbeddingFunctionConfigError, match=r"unknown key\(s\) 'pooling'"):
        MMEmbedEmbeddingFunction(str(tiny_checkpoint), encoder_kwargs={"pooling": "mean"})
    with pytest.raises(EmbeddingFunctionConfigError, match=r"encoder_kwargs\['max_length'\] must be an int"):
        MMEmbedEmbeddingFunction.build_from_config({"model": "m", "encoder_kwargs": {"max_length": "64"}})
    with pytest.raises(EmbeddingFunctionConfigError, match="encoder_kwargs applies only when loading"):
        MMEmbedEmbeddingFunction(str(tiny_checkpoint), encoder=col.encoder, encoder_kwargs={"max_length": 8})


def test_concurrent_adds_from_threads_each_stay_whole(tiny_checkpoint):
    col = _open(tiny_checkpoint, SlowEncoder(delay=0.01))
    errors = []

    def worker(n: int) -> None:
        try:
            col.add((f"w{n}-{i}" for i in range(20)), chunk_size=5)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and col.count() == 60


def test_encoder_stand_in_matches_the_real_encoders_contract(tiny_encoder: Encoder):
    vectors = SlowEncoder(dim=tiny_encoder.dim).encode_documents(["a", "b"])
    assert vectors.shape == tiny_encoder.encode_documents(["a", "b"]).shape


# ------------------------------------------------------------------------------------ modality index


def test_the_modality_index_answers_filtered_searches_like_the_filter(tiny_checkpoint, tiny_encoder, image, tmp_path):
    other = tmp_path / "blue.png"
    Image.new("RGB", (30, 30), (20, 40, 220)).save(other)
    items = ["a red bus", "a blue tram", {"img": str(image)}, {"img": str(other)},
             {"txt": "a red square", "img": str(image)}, "a green field"]
    name = f"mi-{uuid.uuid4().hex[:8]}"
    plain = _open(tiny_checkpoint, tiny_encoder, persist_dir=tmp_path / "db", collection=name + "-plain")
    indexed = _open(tiny_checkpoint, tiny_encoder, persist_dir=tmp_path / "db", collection=name, modality_index=True)
    plain.add(items, metadatas=[{"n": i} for i in range(6)])
    indexed.add(items, metadatas=[{"n": i} for i in range(6)])
    shadow = {m: indexed.client.get_collection(f"{name}.{m.replace(',', '-')}").count()
              for m in ("text", "image", "image,text")}
    assert shadow == {"text": 3, "image": 2, "image,text": 1} and indexed.count() == 6
    for modality, where in (("image", None), (["text", "image,text"], None), ("text", {"n": {"$gte": 1}})):
        want = plain.search("a red picture", modality=modality, where=where, k=4)
        got = indexed.search("a red picture", modality=modality, where=where, k=4)
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    calls = []
    query = indexed.collection.query
    indexed.collection.query = lambda **kw: (calls.append(kw), query(**kw))[1]
    indexed.search("x", modality="image")
    assert calls == []  # a filtered search never filters the main collection
    assert len(indexed.search("x", k=10)) == 6 and len(calls) == 1  # unfiltered: the one main collection
    # deletes, updates and rolled-back adds keep the shadows in step
    indexed.delete(modality="image")
    indexed.update([indexed.get(indexed.add(["a blue tram"]))[0].id], metadatas=[{"n": 42}])
    with pytest.raises(ImageLoadError):
        indexed.add(["fresh text", {"img": str(tmp_path / "gone.png")}], chunk_size=1)
    counts = {m: indexed.client.get_collection(f"{name}.{m.replace(',', '-')}").count()
              for m in ("text", "image", "image,text")}
    assert counts == {"text": 3, "image": 0, "image,text": 1} and indexed.count() == 4
    assert indexed.search("tram", modality="text", where={"n": 42}, k=1)[0].item.text == "a blue tram"
    # a reopened index that disagrees with the main collection (written by plain Chroma) is rebuilt
    indexed.collection.delete(ids=[indexed.search("field", modality="text", k=1)[0].id])
    again = _open(tiny_checkpoint, tiny_encoder, persist_dir=tmp_path / "db", collection=name)  # found, rebuilt
    assert again.modality_index and len(again.search("x", modality="text", k=10)) == 2
    reopened = _open(tiny_checkpoint, tiny_encoder, persist_dir=tmp_path / "db", collection=name + "-plain")
    assert reopened.modality_index is False


def test_a_read_racing_a_concurrent_segment_creation_is_retried_other_errors_are_not(monkeypatch):
    """Two processes writing one new collection on a Chroma server: a read can meet the other's half-made segment."""
    from chromadb.errors import InternalError

    from mmembed_rag.store import writer

    monkeypatch.setattr(writer.time, "sleep", lambda seconds: None)

    class Racing:
        name = "racing"

        def __init__(self, failures: int, message: str) -> None:
            self.failures, self.message, self.calls = failures, message, 0

        def get(self, **query):
            self.calls += 1
            if self.calls <= self.failures:
                raise InternalError(self.message)
            return {"ids": query.get("ids", [])}

    race = "Error executing plan: Internal error: Error creating hnsw segment reader: Nothing found on disk"
    collection = Racing(3, race)
    assert writer.read(collection, ids=["a"]) == {"ids": ["a"]} and collection.calls == 4
    with pytest.raises(InternalError, match="Nothing found on disk"):
        writer.read(Racing(100, race), ids=["a"])  # bounded
    other = Racing(1, "Error executing plan: something else")
    with pytest.raises(InternalError, match="something else"):
        writer.read(other, ids=["a"])
    assert other.calls == 1
