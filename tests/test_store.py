"""Chroma store: the embedding function Chroma persists, and MultimodalCollection's add/search/get/delete.

The tiny model is random, so rankings are checked against brute-force cosine top-k computed with the
encoder itself, never against what a trained model would rank first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.api.collection_configuration import load_collection_configuration_from_json
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.data_loaders import ImageLoader
from chromadb.utils.embedding_functions import register_embedding_function
from PIL import Image

from mmembed_rag import Encoder, ImageLoadError, InvalidItemError, MultimodalItem
from mmembed_rag.instructions import UnknownTaskError
from mmembed_rag.results import RankedItem
from mmembed_rag.store import (
    DimensionMismatchError,
    EmbeddingFunctionConfigError,
    MMEmbedEmbeddingFunction,
    MultimodalCollection,
    StoreError,
    cached_encoder,
    clear_encoder_cache,
)
from mmembed_rag.testing import make_tiny_checkpoint

pytestmark = pytest.mark.both_families  # every test runs once per model family

COLOURS = [(220, 20, 20), (20, 160, 40), (30, 40, 220), (240, 220, 30), (20, 20, 20), (250, 250, 250)]
TEXTS = ["a red square on the left", "photosynthesis converts light energy", "a blue circle in the center",
         "the election rally news", "a green triangle at the top"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (48 + 8 * i, 40), colour)
        image.paste((255 - colour[0], 90, 255 - colour[2]), (4 * i, 4, 4 * i + 16, 24))  # make each distinct
        paths.append(folder / f"img{i}.png")
        image.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def corpus(images: list[Path]) -> list[dict]:
    composed = [{"txt": "the same but in blue", "img": str(images[4])},
                {"txt": "a bright photo", "img": str(images[5])}]
    return [{"txt": t} for t in TEXTS] + [{"img": str(p)} for p in images[:4]] + composed


def _open(tiny_checkpoint: Path, tiny_encoder: Encoder, **kwargs) -> MultimodalCollection:
    kwargs.setdefault("collection", f"t-{uuid.uuid4().hex[:12]}")  # ephemeral clients share one database
    return MultimodalCollection(str(tiny_checkpoint), encoder=tiny_encoder, **kwargs)


@pytest.fixture(scope="module")
def filled(tiny_checkpoint: Path, tiny_encoder: Encoder, corpus: list[dict]) -> tuple[MultimodalCollection, list[str]]:
    col = _open(tiny_checkpoint, tiny_encoder)
    ids = col.add(corpus, metadatas=[{"source": "a" if i % 2 else "b"} for i in range(len(corpus))])
    return col, ids


def _brute_force(encoder: Encoder, corpus: list[dict], query: MultimodalItem, instruction: str | None,
                 allowed: set[int] | None = None) -> list[int]:
    docs = encoder.encode_documents(corpus)
    q = encoder.encode_queries([query], instruction=instruction)[0]
    scores = docs @ q
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    return [i for i in order if allowed is None or i in allowed]


# ---------------------------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("kind", ["text->image", "image->text", "composed", "text->any"])
def test_search_ranks_like_brute_force_cosine(filled, tiny_encoder, corpus, images, kind):
    col, ids = filled
    query, image, modality = {
        "text->image": ("a red square", None, "image"),
        "image->text": (None, images[2], "text"),
        "composed": ("the same but in red", images[4], None),
        "text->any": ("photosynthesis", None, None),
    }[kind]
    wanted = {"image": {i for i, c in enumerate(corpus) if "txt" not in c},
              "text": {i for i, c in enumerate(corpus) if "img" not in c}, None: None}[modality]
    expected = _brute_force(tiny_encoder, corpus, MultimodalItem(text=query, image=image), "mscoco_t2i", wanted)
    hits = col.search(query, image=image, instruction="mscoco_t2i", k=len(corpus), modality=modality)
    assert [h.id for h in hits] == [ids[i] for i in expected]
    assert all(isinstance(h, RankedItem) for h in hits) and [h.index for h in hits] == list(range(len(hits)))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    top = corpus[expected[0]]
    assert hits[0].item.text == top.get("txt") and hits[0].item.image == top.get("img")


def test_stored_vectors_are_the_encoders_and_self_retrieval_is_first(filled, tiny_encoder, corpus):
    col, ids = filled
    stored = col.collection.get(ids=ids, include=["embeddings"])
    by_id = dict(zip(stored["ids"], stored["embeddings"]))
    expected = tiny_encoder.encode_documents(corpus)
    np.testing.assert_allclose(np.stack([by_id[i] for i in ids]), expected, atol=1e-5)
    for i in (0, 6, 9):  # text, image, image+text
        hit = col.search_by_vector(expected[i], k=1)[0]
        assert hit.id == ids[i] and hit.score == pytest.approx(1.0, abs=1e-4)


def test_instruction_changes_the_query_and_the_default_applies(tiny_checkpoint, tiny_encoder, filled):
    col, _ = filled
    plain = col.search("a red square", k=3)
    steered = col.search("a red square", instruction="mscoco_t2i", k=3)
    assert abs(plain[0].score - steered[0].score) > 1e-4
    with_default = _open(tiny_checkpoint, tiny_encoder, collection=col.collection.name, instruction="mscoco_t2i")
    defaulted = with_default.search("a red square", k=3)
    assert [h.id for h in defaulted] == [h.id for h in steered]
    np.testing.assert_allclose([h.score for h in defaulted], [h.score for h in steered], atol=1e-6)
    with pytest.raises(UnknownTaskError, match="mscoco_t2"):
        col.search("x", instruction="mscoco_t2")


def test_modality_filter_combines_with_where(filled, corpus):
    col, ids = filled
    hits = col.search("a photo", k=20, where={"source": "a"}, modality=["image", "image,text"])
    expected = {ids[i] for i, c in enumerate(corpus) if i % 2 and "img" in c}
    assert {h.id for h in hits} == expected and len(hits) == len(expected)
    assert all(h.metadata["source"] == "a" and h.metadata["modality"] in ("image", "image,text") for h in hits)
    assert {h.metadata["modality"] for h in col.search("x", k=20, modality="image,text")} == {"image,text"}
    with pytest.raises(StoreError, match="modality must be one of 'text', 'image', 'image,text'.*got 'video'"):
        col.search("x", modality=["image", "video"])
    with pytest.raises(StoreError, match="got an empty list"):
        col.search("x", modality=[])
    with pytest.raises(StoreError, match="Chroma refused the query"):
        col.search("x", where={"source": {"$bogus": 1}})
    with pytest.raises(StoreError, match="k must be a positive int, got 0"):
        col.search("x", k=0)


def test_get_delete_count_and_idempotent_readd(tiny_checkpoint, tiny_encoder, corpus):
    col = _open(tiny_checkpoint, tiny_encoder)
    ids = col.add(corpus)
    again = col.add(corpus[:3] + corpus[:1], metadatas=[{"v": 2}] * 4)  # duplicate content in one batch too
    assert again == ids[:3] + ids[:1] and col.count() == len(corpus) == len(col)
    got = col.get([ids[9], "missing", ids[0]])
    assert [g.id for g in got] == [ids[9], ids[0]]
    assert got[0].item.text == "the same but in blue" and got[0].item.image == corpus[9]["img"]
    assert got[0].metadata == {"modality": "image,text", "image_uri": corpus[9]["img"]}
    assert got[1].metadata == {"modality": "text", "v": 2}
    col.delete([ids[0], "missing"])
    assert col.count() == len(corpus) - 1 and col.get([ids[0]]) == []
    with pytest.raises(StoreError, match="ids is empty"):
        col.delete([])
    with pytest.raises(StoreError, match=r"ids\[1\] must be a non-empty string, got 3"):
        col.get(["a", 3])


def test_relative_image_paths_are_stored_absolute(tiny_checkpoint, tiny_encoder, images, monkeypatch):
    monkeypatch.chdir(images[0].parent)
    col = _open(tiny_checkpoint, tiny_encoder)
    [id_] = col.add([{"img": images[0].name}])
    assert col.add([{"img": str(images[0])}]) == [id_]  # same file, same id
    assert col.get([id_])[0].metadata["image_uri"] == str(images[0].resolve())


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, error, message", [
    ({"img": "/no/such/file.png"}, ImageLoadError, "item 2: cannot load image '/no/such/file.png': file not found"),
    (Image.new("RGB", (8, 8)), InvalidItemError, "item 2: image <PIL image 8x8> has no path or URL"),
    ({"img": "data:image/png;base64,iVBORw0KGgo="}, InvalidItemError, "item 2: image data:image/png;base64"),
    (42, InvalidItemError, "item 2: expected str, dict, MultimodalItem, PIL.Image.Image or pathlib.Path, got int"),
    ("   ", InvalidItemError, "item 2: text is empty and there is no image"),
])
def test_one_bad_item_writes_nothing(tiny_checkpoint, tiny_encoder, images, bad, error, message):
    col = _open(tiny_checkpoint, tiny_encoder)
    col.add(["already here"])
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        col.add(["good text", {"img": str(images[0])}, bad, "more text"])
    assert col.count() == 1


@pytest.mark.parametrize("kwargs, error, message", [
    ({"metadatas": [{"a": 1}, {"b": {"nested": 1}}, None]}, InvalidItemError, "item 1: invalid metadata"),
    ({"metadatas": [None, {"modality": "x"}, None]}, InvalidItemError, "item 1: metadata key 'modality' is reserved"),
    ({"metadatas": [None, None]}, StoreError, "got 2 metadatas for 3 items"),
    ({"metadatas": {"a": 1}}, StoreError, "metadatas must be a list"),
    ({"ids": ["a", "b", "a"]}, StoreError, "ids repeat 'a' (items 0 and 2)"),
    ({"ids": ["a", "b"]}, StoreError, "got 2 ids for 3 items"),
    ({"ids": "abc"}, StoreError, "ids must be a list of strings, got str"),
    ({"chunk_size": 0}, StoreError, "chunk_size must be a positive int or None, got 0"),
])
def test_bad_ids_or_metadata_write_nothing(tiny_checkpoint, tiny_encoder, kwargs, error, message):
    col = _open(tiny_checkpoint, tiny_encoder)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        col.add(["one", "two", "three"], **kwargs)
    assert col.count() == 0


def test_empty_inputs_are_clear_errors(tiny_checkpoint, tiny_encoder):
    col = _open(tiny_checkpoint, tiny_encoder)
    with pytest.raises(InvalidItemError, match=r"add\(\) got no items; nothing was written"):
        col.add([])
    with pytest.raises(InvalidItemError, match="expected a list of items, got a single str"):
        col.add("just one string")
    with pytest.raises(InvalidItemError, match=r"search\(\) needs a query text, an image, or both"):
        col.search()
    with pytest.raises(InvalidItemError, match="query: text is empty and there is no image"):
        col.search("  ")
    with pytest.raises(InvalidItemError, match="nothing to embed: the input list is empty"):
        col.embedding_function([])
    assert col.count() == 0 and col.search("anything") == []


def test_dimension_mismatch_is_refused_before_writing(tmp_path, tiny_checkpoint, tiny_encoder):
    narrow = make_tiny_checkpoint(tmp_path / "narrow", seed=1, hidden_size=32)
    col = _open(tiny_checkpoint, tiny_encoder, persist_dir=tmp_path / "db", collection="dims")
    col.add(["stored with the 64-d model"])
    other = MultimodalCollection(str(narrow), persist_dir=tmp_path / "db", collection="dims", device="cpu",
                                 allow_model_change=True)
    assert other.encoder.dim == 32 and other.encoder is cached_encoder(narrow, device="cpu")
    message = "collection 'dims' holds 64-dimensional vectors but model .* gives 32-dimensional ones"
    with pytest.raises(DimensionMismatchError, match=message):
        other.add(["a 32-d vector"])
    with pytest.raises(DimensionMismatchError, match=message):
        other.search("a query")
    assert col.count() == 1


def test_connection_arguments_are_checked(tmp_path, tiny_checkpoint, tiny_encoder):
    with pytest.raises(StoreError, match="either persist_dir .* or host/port"):
        _open(tiny_checkpoint, tiny_encoder, persist_dir=tmp_path, host="localhost")
    with pytest.raises(StoreError, match="either client or persist_dir/host/port"):
        _open(tiny_checkpoint, tiny_encoder, client=chromadb.EphemeralClient(), persist_dir=tmp_path)
    with pytest.raises(StoreError, match="cannot open Chroma collection 'x'"):
        _open(tiny_checkpoint, tiny_encoder, collection="x")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StoreError, match=f"cannot reach a Chroma server at 127.0.0.1:{port}"):
        _open(tiny_checkpoint, tiny_encoder, host="127.0.0.1", port=port)


# ------------------------------------------------------------------------------ Chroma embedding function


def test_embedding_function_config_round_trip_shares_the_encoder(tiny_checkpoint, tiny_encoder):
    clear_encoder_cache()  # other tests (the CLI's) may have cached their own encoder for this checkpoint
    ef = MMEmbedEmbeddingFunction(str(tiny_checkpoint), encoder=tiny_encoder, instruction="mscoco_t2i",
                                  batch_size=4)
    assert MMEmbedEmbeddingFunction.name() == "mmembed" and ef.default_space() == "cosine"
    assert set(ef.supported_spaces()) == {"cosine", "ip", "l2"} and not ef.is_legacy()
    config = ef.get_config()
    assert config == {"model": str(tiny_checkpoint.resolve()), "dtype": None, "instruction": "mscoco_t2i",
                      "batch_size": 4}
    assert json.loads(json.dumps(config)) == config
    rebuilt = MMEmbedEmbeddingFunction.build_from_config(config)
    assert rebuilt.get_config() == config and rebuilt.encoder is tiny_encoder
    persisted = {"hnsw": None, "spann": None,
                 "embedding_function": {"type": "known", "name": "mmembed", "config": config}}
    assert load_collection_configuration_from_json(persisted)["embedding_function"].encoder is tiny_encoder


@pytest.mark.parametrize("config, message", [
    ({"model": "m", "pooling": "mean"}, "unknown key(s) 'pooling'; known keys: model, dtype, instruction"),
    ({"dtype": "float32"}, "needs 'model' (a hub id or a path), got None"),
    ({"model": "m", "dtype": "int8"}, "dtype must be None or one of float32, bfloat16, float16, got 'int8'"),
    ({"model": "m", "batch_size": 0}, "'batch_size' must be a positive int, got 0"),
    ({"model": "m", "instruction": 3}, "'instruction' must be a string or null, got int"),
    ({"model": "m", "instruction": "  "}, "mmembed config: instruction is empty"),
])
def test_bad_embedding_function_config(config, message):
    escaped = message.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(EmbeddingFunctionConfigError, match=escaped):
        MMEmbedEmbeddingFunction.build_from_config(config)
    # the same error, wrapped, when Chroma loads a persisted collection configuration
    persisted = {"hnsw": None, "spann": None, "embedding_function": {"type": "known", "name": "mmembed",
                                                                     "config": config}}
    with pytest.raises(ValueError, match="Could not build embedding function mmembed"):
        load_collection_configuration_from_json(persisted)


def test_model_change_and_foreign_embedding_function_are_refused(tiny_checkpoint, tiny_encoder):
    ef = MMEmbedEmbeddingFunction(str(tiny_checkpoint), encoder=tiny_encoder)
    with pytest.raises(EmbeddingFunctionConfigError, match="cannot change the model of a collection"):
        ef.validate_config_update(ef.get_config(), {"model": "other"})
    ef.validate_config_update(ef.get_config(), {"batch_size": 2})
    col = _open(tiny_checkpoint, tiny_encoder)
    with pytest.raises(EmbeddingFunctionConfigError, match="cannot change the model .* use a new collection"):
        col.collection.modify(configuration={"embedding_function": MMEmbedEmbeddingFunction("elsewhere/model")})
    assert col.collection.configuration_json["embedding_function"]["config"]["model"] == ef.model

    @register_embedding_function
    class Other(EmbeddingFunction[Documents]):
        def __init__(self) -> None:
            pass

        def __call__(self, input: Documents) -> Embeddings:
            return [np.ones(3, dtype=np.float32) for _ in input]

        @staticmethod
        def name() -> str:
            return "mmembed-test-other"

        def get_config(self) -> dict:
            return {}

        @staticmethod
        def build_from_config(config: dict) -> Other:
            return Other()

    client = chromadb.EphemeralClient()
    client.get_or_create_collection("foreign-ef", embedding_function=Other())
    with pytest.raises(StoreError, match="cannot open Chroma collection 'foreign-ef'.*conflict"):
        _open(tiny_checkpoint, tiny_encoder, client=client, collection="foreign-ef")


def test_plain_chroma_with_image_loader_uris_and_query_texts(tmp_path, tiny_checkpoint, tiny_encoder, images):
    ef = MMEmbedEmbeddingFunction(str(tiny_checkpoint), encoder=tiny_encoder, instruction="mscoco_t2i")
    rgba, gray16 = tmp_path / "rgba.png", tmp_path / "gray16.png"
    Image.new("RGBA", (30, 20), (10, 200, 30, 128)).save(rgba)
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(gray16)
    paths = [str(p) for p in (images[0], images[1], rgba, gray16)]
    col = chromadb.EphemeralClient().get_or_create_collection(
        f"plain-{uuid.uuid4().hex[:8]}", embedding_function=ef, data_loader=ImageLoader())
    col.add(ids=["red", "green", "rgba", "gray16"], uris=paths)
    col.add(ids=["text"], documents=["a red square"])
    stored = col.get(ids=["red", "green", "rgba", "gray16", "text"], include=["embeddings"])
    by_id = dict(zip(stored["ids"], stored["embeddings"]))
    expected = tiny_encoder.encode_documents([{"img": p} for p in paths] + ["a red square"])
    got = np.stack([by_id[i] for i in ["red", "green", "rgba", "gray16", "text"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Chroma embeds query_texts with embed_query, i.e. with the instruction
    q = tiny_encoder.encode_queries(["a red square"], instruction="mscoco_t2i")[0]
    found = col.query(query_texts=["a red square"], n_results=5, include=["distances"])
    want = sorted(zip(1 - expected @ q, ["red", "green", "rgba", "gray16", "text"]))
    assert found["ids"][0] == [name for _, name in want]
    np.testing.assert_allclose(found["distances"][0], [d for d, _ in want], atol=1e-4)
    # mixed documents and images in one call; float32 out
    mixed = ef(["a red square", np.asarray(Image.open(images[0]).convert("RGB"))])
    assert all(v.dtype == np.float32 for v in mixed)
    np.testing.assert_allclose(np.stack(mixed), expected[[4, 0]], atol=1e-5)
    with pytest.raises(InvalidItemError, match=r"item 1: no document or image \(None"):
        ef(["text", None])
    with pytest.raises(InvalidItemError, match="got a single str; wrap it in a list"):
        ef("text")


def test_cached_encoder_loads_once_across_threads(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "cache-probe", seed=2, hidden_size=32)
    with ThreadPoolExecutor(4) as pool:
        encoders = list(pool.map(lambda _: cached_encoder(path, "float32", "cpu"), range(4)))
    assert all(e is encoders[0] for e in encoders)
    ef = MMEmbedEmbeddingFunction.build_from_config({"model": str(path), "dtype": "float32"})
    assert ef._encoder is None  # building from config loads nothing


# --------------------------------------------------------------------------------- robustness and scale


def test_concurrent_searches_match_sequential(filled, images):
    col, _ = filled
    queries = [("a red square", None), (None, images[1]), ("the same but in green", images[4]), ("news", None)] * 4

    def run(q):
        hits = col.search(q[0], image=q[1], k=5)
        return [h.id for h in hits], [h.score for h in hits]

    sequential = [run(q) for q in queries]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(run, queries))
    assert [ids for ids, _ in concurrent] == [ids for ids, _ in sequential]
    np.testing.assert_allclose([s for _, s in concurrent], [s for _, s in sequential], atol=1e-5)


def test_writes_are_chunked_under_the_client_limit(tiny_checkpoint, tiny_encoder, monkeypatch):
    col = _open(tiny_checkpoint, tiny_encoder)
    monkeypatch.setattr(col.client, "get_max_batch_size", lambda: 3)
    sizes = []
    upsert = col.collection.upsert
    monkeypatch.setattr(col.collection, "upsert", lambda **kw: (sizes.append(len(kw["ids"])), upsert(**kw)))
    col.add([f"text {i}" for i in range(10)])
    assert sizes == [3, 3, 3, 1] and col.count() == 10
    sizes.clear()
    col.add([f"text {i}" for i in range(10, 15)], chunk_size=2)
    assert sizes == [2, 2, 1] and col.count() == 15


@pytest.mark.slow
def test_more_than_chroma_max_batch_items(tiny_checkpoint, tiny_encoder):
    col = _open(tiny_checkpoint, tiny_encoder, batch_size=64)
    n = col.client.get_max_batch_size() + 539
    ids = col.add([f"t{i}" for i in range(n)], show_progress=False)
    assert col.count() == n == len(set(ids))


# One fresh process (imports cost seconds) checks both what survives a process: it reopens a persisted
# collection with nothing but Chroma and the config, then starts an ingest that is SIGKILLed half-way.
_FRESH_PROCESS = """
import json, sys, time
from pathlib import Path
import chromadb
from mmembed_rag.store import MMEmbedEmbeddingFunction, MultimodalCollection
path, name, query, marker, n, chunk = sys.argv[1:7]
col = chromadb.PersistentClient(path=path).get_collection(name)  # no embedding function given
ef = col.configuration["embedding_function"]
assert type(ef) is MMEmbedEmbeddingFunction, type(ef)
raw = col.query(query_texts=[query], n_results=4)["ids"][0]
reopened = MultimodalCollection(ef.model, persist_dir=path, collection=name, instruction=ef.instruction)
hits = [h.id for h in reopened.search(query, k=4)]
print(json.dumps({"config": ef.get_config(), "raw": raw, "search": hits}), flush=True)

crash = MultimodalCollection(ef.model, persist_dir=path, collection="crash")
upsert = crash.collection.upsert
def upsert_then_stall(**kwargs):
    upsert(**kwargs)
    Path(marker).write_text("first chunk written")
    time.sleep(600)  # killed here, half-way through the ingest
crash.collection.upsert = upsert_then_stall
crash.add([f"document {i}" for i in range(int(n))], chunk_size=int(chunk))
"""
CRASH_N, CRASH_CHUNK = 12, 4


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory, tiny_checkpoint, tiny_encoder, corpus) -> dict:
    """Persist a collection, run ``_FRESH_PROCESS`` on it, SIGKILL it after its first ingest chunk."""
    root = tmp_path_factory.mktemp("fresh")
    db, marker = root / "db", root / "marker"
    col = _open(tiny_checkpoint, tiny_encoder, persist_dir=db, collection="persisted", instruction="mscoco_t2i",
                batch_size=4)
    col.add(corpus)
    expected = [h.id for h in col.search("a red square", k=4)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", _FRESH_PROCESS, str(db), "persisted", "a red square", str(marker),
                             str(CRASH_N), str(CRASH_CHUNK)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert marker.exists(), f"the fresh process never wrote its first chunk:\n{stderr[-3000:]}"
    return {"db": db, "collection": col, "expected": expected, "returncode": proc.returncode,
            "result": json.loads(stdout.strip().splitlines()[0])}


def test_persisted_collection_rebuilds_in_a_new_process(fresh_process):
    result, col = fresh_process["result"], fresh_process["collection"]
    assert result["config"] == col.embedding_function.get_config()
    assert result["raw"] == fresh_process["expected"] and result["search"] == fresh_process["expected"]


def test_killed_ingest_rerun_leaves_every_item_exactly_once(fresh_process, tiny_checkpoint, tiny_encoder):
    assert fresh_process["returncode"] == -signal.SIGKILL
    col = _open(tiny_checkpoint, tiny_encoder, persist_dir=fresh_process["db"], collection="crash")
    assert col.count() == CRASH_CHUNK  # the first chunk survived the kill, the rest never arrived
    ids = col.add([f"document {i}" for i in range(CRASH_N)], chunk_size=CRASH_CHUNK)
    stored = col.collection.get(include=["documents"])
    assert col.count() == CRASH_N and sorted(stored["ids"]) == sorted(ids) and len(set(ids)) == CRASH_N
    assert sorted(stored["documents"]) == sorted(f"document {i}" for i in range(CRASH_N))


def test_search_is_thread_safe_while_adding(tiny_checkpoint, tiny_encoder):
    col = _open(tiny_checkpoint, tiny_encoder)
    col.add([f"seed {i}" for i in range(5)])
    errors: list[BaseException] = []

    def searcher() -> None:
        try:
            for _ in range(5):
                assert len(col.search("seed", k=3)) == 3
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    col.add([f"more {i}" for i in range(10)])
    for t in threads:
        t.join()
    assert not errors and col.count() == 15


def test_store_is_lazily_exported_and_names_its_extra(monkeypatch):
    import importlib
    import sys

    import mmembed_rag
    from mmembed_rag import MissingDependencyError

    assert mmembed_rag.MultimodalCollection is MultimodalCollection
    monkeypatch.setitem(sys.modules, "chromadb", None)  # as if chromadb were not installed
    monkeypatch.delitem(sys.modules, "mmembed_rag.store")
    with pytest.raises(MissingDependencyError, match=r'pip install "mmembed-rag\[chroma\]"'):
        importlib.import_module("mmembed_rag.store")
