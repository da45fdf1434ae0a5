"""LangChain adapter: vectors equal the Encoder's, Chroma round trips, retriever scores and errors."""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("langchain_chroma", reason='needs the langchain extra: pip install "mmembed-rag[langchain]"')

from langchain_chroma import Chroma  # noqa: E402

from mmembed_rag import Encoder, ImageLoadError, InvalidItemError, MissingDependencyError  # noqa: E402
from mmembed_rag.instructions import UnknownTaskError, get_instruction  # noqa: E402
from mmembed_rag.integrations.langchain import MMEmbedEmbeddings, MMEmbedRetriever  # noqa: E402

pytestmark = pytest.mark.both_families  # every test runs once per model family

TEXTS = ["a red circle", "a green square on the left", "a blue star", "two yellow triangles"]
INSTRUCTION = "mscoco_t2i"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("lc-images")
    paths = []
    for i, colour in enumerate([(220, 20, 20), (20, 200, 40), (30, 40, 230), (240, 220, 30), (90, 90, 90)]):
        image = Image.new("RGB", (48, 40), (255, 255, 255))
        ImageDraw.Draw(image).ellipse((4 + 3 * i, 4, 30 + 3 * i, 34), fill=colour)
        image.save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


@pytest.fixture(scope="module")
def emb(tiny_encoder: Encoder) -> MMEmbedEmbeddings:
    return MMEmbedEmbeddings(encoder=tiny_encoder, query_instruction=INSTRUCTION)


def _store(emb: MMEmbedEmbeddings, **kwargs: object) -> Chroma:
    return Chroma(f"lc-{uuid.uuid4().hex[:12]}", embedding_function=emb, **kwargs)


@pytest.fixture()
def filled(emb: MMEmbedEmbeddings, images: list[str]) -> MMEmbedRetriever:
    """Four texts and five images, tagged by modality."""
    retriever = MMEmbedRetriever(vectorstore=_store(emb), k=3)
    retriever.vectorstore.add_texts(TEXTS, metadatas=[{"modality": "text"}] * len(TEXTS), ids=[f"t{i}" for i in
                                                                                               range(len(TEXTS))])
    retriever.add_images(images, metadatas=[{"modality": "image"}] * len(images),
                         ids=[f"i{i}" for i in range(len(images))])
    return retriever


def _corpus(encoder: Encoder, images: list[str]) -> tuple[list[str], np.ndarray]:
    ids = [f"t{i}" for i in range(len(TEXTS))] + [f"i{i}" for i in range(len(images))]
    return ids, encoder.encode_documents(TEXTS + [{"image": p} for p in images])


def _brute_force(encoder: Encoder, images: list[str], query: dict, instruction: str | None, k: int,
                 modality: str | None = None) -> tuple[list[str], np.ndarray]:
    ids, docs = _corpus(encoder, images)
    keep = [i for i, name in enumerate(ids) if modality is None or name[0] == modality[0]]
    scores = docs[keep] @ encoder.encode_queries([query], instruction=instruction)[0]
    order = np.argsort(-scores)[:k]
    return [ids[keep[j]] for j in order], scores[order]


# --- embeddings --------------------------------------------------------------------------------------------------

def test_vectors_equal_the_encoder(emb: MMEmbedEmbeddings, tiny_encoder: Encoder, images: list[str]) -> None:
    np.testing.assert_allclose(emb.embed_documents(TEXTS), tiny_encoder.encode_documents(TEXTS), atol=1e-6)
    np.testing.assert_allclose(emb.embed_image(images), tiny_encoder.encode_documents([{"img": p} for p in images]),
                               atol=1e-6)
    np.testing.assert_allclose(emb.embed_query(TEXTS[0]),
                               tiny_encoder.encode_queries([TEXTS[0]], instruction=INSTRUCTION)[0], atol=1e-6)
    composed = tiny_encoder.encode_queries([{"txt": "same but green", "img": images[0]}], instruction="cirr_it2i")
    np.testing.assert_allclose(emb.embed_multimodal_query("same but green", images[0], "cirr_it2i"), composed[0],
                               atol=1e-6)
    vector = emb.embed_query("foo")
    assert isinstance(vector, list) and isinstance(vector[0], float) and len(vector) == tiny_encoder.dim
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_instruction_only_on_queries(emb: MMEmbedEmbeddings, tiny_encoder: Encoder) -> None:
    plain = MMEmbedEmbeddings(encoder=tiny_encoder)
    np.testing.assert_array_equal(emb.embed_documents(TEXTS), plain.embed_documents(TEXTS))
    assert not np.allclose(emb.embed_query(TEXTS[0]), plain.embed_query(TEXTS[0]), atol=1e-4)
    free_text = MMEmbedEmbeddings(encoder=tiny_encoder, query_instruction=get_instruction(INSTRUCTION))
    np.testing.assert_allclose(free_text.embed_query(TEXTS[0]), emb.embed_query(TEXTS[0]), atol=1e-6)
    # A per-call instruction wins over the default one.
    np.testing.assert_allclose(plain.embed_multimodal_query(TEXTS[0], instruction=INSTRUCTION),
                               emb.embed_query(TEXTS[0]), atol=1e-6)


@pytest.mark.parametrize("call", ["aembed_documents", "aembed_query", "ainvoke"])
def test_async_runs_off_the_event_loop(call: str, emb: MMEmbedEmbeddings, tiny_encoder: Encoder,
                                       images: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    target = "encode_documents" if call == "aembed_documents" else "encode_queries"
    original = getattr(tiny_encoder, target)
    released, worker = threading.Event(), []

    def gated(*args: object, **kwargs: object) -> np.ndarray:
        worker.append(threading.get_ident())
        # Only a free event loop can set the event: encoding on the loop thread would time out here.
        assert released.wait(10), "the event loop was blocked while encoding"
        return original(*args, **kwargs)

    retriever = MMEmbedRetriever(vectorstore=_store(emb))
    retriever.add_images(images[:2])
    monkeypatch.setattr(tiny_encoder, target, gated)

    async def main() -> tuple[object, int]:
        coro = {"aembed_documents": lambda: emb.aembed_documents(TEXTS),
                "aembed_query": lambda: emb.aembed_query("foo"),
                "ainvoke": lambda: retriever.ainvoke("red", image=images[0], k=1)}[call]()
        task = asyncio.ensure_future(coro)
        while not worker:
            await asyncio.sleep(0.005)
        released.set()
        return await task, threading.get_ident()

    result, loop_thread = asyncio.run(main())
    assert worker and worker[0] != loop_thread
    monkeypatch.undo()
    if call == "ainvoke":
        assert [d.id for d in result] == [d.id for d in retriever.invoke("red", image=images[0], k=1)]
    elif call == "aembed_query":
        np.testing.assert_allclose(result, emb.embed_query("foo"), atol=1e-6)
    else:
        np.testing.assert_allclose(result, emb.embed_documents(TEXTS), atol=1e-6)


# --- langchain_chroma.Chroma ---------------------------------------------------------------------------------------

def test_chroma_add_images_and_search_by_image(emb: MMEmbedEmbeddings, images: list[str]) -> None:
    store = _store(emb)
    ids = store.add_images(images)
    stored = store.get(ids=ids, include=["documents", "embeddings"])
    by_id = dict(zip(stored["ids"], zip(stored["documents"], stored["embeddings"])))
    for i, path in zip(ids, images):
        document, vector = by_id[i]
        # Upstream behaviour: the stored document is the base64 of the image file.
        assert document == base64.b64encode(Path(path).read_bytes()).decode()
        np.testing.assert_allclose(vector, emb.embed_image([path])[0], atol=1e-6)
    hit = store.similarity_search_by_image(images[3], k=1)[0]
    assert hit.page_content == base64.b64encode(Path(images[3]).read_bytes()).decode()


@pytest.mark.parametrize("space", [{}, {"collection_configuration": {"hnsw": {"space": "cosine"}}},
                                   {"collection_metadata": {"hnsw:space": "ip"}}], ids=["l2", "cosine", "ip"])
def test_retriever_scores_are_brute_force_cosine(space: dict, emb: MMEmbedEmbeddings, tiny_encoder: Encoder,
                                                 images: list[str]) -> None:
    retriever = MMEmbedRetriever(vectorstore=_store(emb, **space), k=4)
    retriever.vectorstore.add_texts(TEXTS, ids=[f"t{i}" for i in range(len(TEXTS))])
    retriever.add_images(images, ids=[f"i{i}" for i in range(len(images))])
    docs = retriever.invoke("a red circle", image=images[1])
    ids, scores = _brute_force(tiny_encoder, images, {"txt": "a red circle", "img": images[1]}, INSTRUCTION, 4)
    assert [d.id for d in docs] == ids
    np.testing.assert_allclose([d.metadata["score"] for d in docs], scores, atol=1e-5)


def test_retriever_text_to_image(filled: MMEmbedRetriever, tiny_encoder: Encoder, images: list[str]) -> None:
    docs = filled.invoke("a blue star", filter={"modality": "image"})
    ids, scores = _brute_force(tiny_encoder, images, {"txt": "a blue star"}, INSTRUCTION, 3, "image")
    assert [d.id for d in docs] == ids
    np.testing.assert_allclose([d.metadata["score"] for d in docs], scores, atol=1e-5)
    assert all(d.metadata["image"] == images[int(d.id[1:])] for d in docs)


@pytest.mark.parametrize("query", ["", None])
def test_retriever_image_to_text(query: str | None, filled: MMEmbedRetriever, tiny_encoder: Encoder,
                                 images: list[str]) -> None:
    docs = filled.invoke(query, image=images[2], instruction="mscoco_i2t", k=2, filter={"modality": "text"})
    ids, scores = _brute_force(tiny_encoder, images, {"img": images[2]}, "mscoco_i2t", 2, "text")
    assert [d.id for d in docs] == ids
    assert [d.page_content for d in docs] == [TEXTS[int(i[1:])] for i in ids]
    np.testing.assert_allclose([d.metadata["score"] for d in docs], scores, atol=1e-5)


def test_retriever_composed_query_and_instruction(filled: MMEmbedRetriever, tiny_encoder: Encoder,
                                                  images: list[str]) -> None:
    query = {"txt": "the same but in green", "img": images[0]}
    docs = filled.invoke("the same but in green", image=images[0], instruction="cirr_it2i", k=9)
    ids, scores = _brute_force(tiny_encoder, images, query, "cirr_it2i", 9)
    assert [d.id for d in docs] == ids
    np.testing.assert_allclose([d.metadata["score"] for d in docs], scores, atol=1e-5)
    # The retriever's default instruction is used when the call names none, and differs from the per-call one.
    default = MMEmbedRetriever(vectorstore=filled.vectorstore, instruction="cirr_it2i")
    assert [d.metadata["score"] for d in default.invoke("the same but in green", image=images[0], k=9)] == \
        pytest.approx([d.metadata["score"] for d in docs], abs=1e-6)
    other = filled.invoke("the same but in green", image=images[0], k=9)
    assert not np.allclose(sorted(d.metadata["score"] for d in other), sorted(scores), atol=1e-4)


_REOPEN = """
import json, sys
from langchain_chroma import Chroma
from mmembed_rag.integrations.langchain import MMEmbedEmbeddings, MMEmbedRetriever
ckpt, db, image = sys.argv[1:]
store = Chroma("persisted", embedding_function=MMEmbedEmbeddings(model=ckpt, device="cpu",
               query_instruction="mscoco_t2i"), persist_directory=db)
retriever = MMEmbedRetriever(vectorstore=store, k=4)
out = {name: [(d.id, d.metadata["score"], d.metadata.get("image")) for d in retriever.invoke(q, image=img)]
       for name, q, img in [("text", "a blue star", None), ("image", "", image), ("composed", "green", image)]}
print(json.dumps(out))
"""


def test_persistence_round_trip_in_a_new_process(tiny_encoder: Encoder, tiny_checkpoint: Path, images: list[str],
                                                 tmp_path: Path) -> None:
    emb = MMEmbedEmbeddings(encoder=tiny_encoder, query_instruction="mscoco_t2i")
    db = tmp_path / "chroma"
    retriever = MMEmbedRetriever(vectorstore=Chroma("persisted", embedding_function=emb, persist_directory=str(db)),
                                 k=4)
    retriever.vectorstore.add_texts(TEXTS)
    retriever.add_images(images)
    here = {name: [(d.id, d.metadata["score"], d.metadata.get("image")) for d in retriever.invoke(q, image=img)]
            for name, q, img in [("text", "a blue star", None), ("image", "", images[4]),
                                 ("composed", "green", images[4])]}
    done = subprocess.run([sys.executable, "-c", _REOPEN, str(tiny_checkpoint), str(db), images[4]],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    there = json.loads(done.stdout.strip().splitlines()[-1])
    for name, hits in here.items():
        assert [(i, img) for i, _, img in there[name]] == [(i, img) for i, _, img in hits], name
        np.testing.assert_allclose([s for _, s, _ in there[name]], [s for _, s, _ in hits], atol=1e-5)


# --- missing extra ---------------------------------------------------------------------------------------------

def test_missing_langchain_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "langchain_core" or m.startswith("langchain_core.")]:
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes `import name` raise ImportError
    monkeypatch.delitem(sys.modules, "mmembed_rag.integrations.langchain")
    with pytest.raises(MissingDependencyError, match=r'pip install "mmembed-rag\[langchain\]"') as info:
        importlib.import_module("mmembed_rag.integrations.langchain")
    assert isinstance(info.value, ImportError) and "langchain-core" in str(info.value)


def test_core_imports_without_langchain() -> None:
    code = ("import sys; sys.modules['langchain_core'] = None; import mmembed_rag, mmembed_rag.integrations; "
            "assert not any(m.startswith('langchain') for m in sys.modules if sys.modules[m] is not None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


# --- bad input ---------------------------------------------------------------------------------------------------

def test_empty_lists(emb: MMEmbedEmbeddings) -> None:
    assert emb.embed_documents([]) == []
    assert emb.embed_image([]) == []
    retriever = MMEmbedRetriever(vectorstore=_store(emb))
    assert retriever.add_images([]) == []
    assert retriever.invoke("anything") == []  # an empty collection has no hits
    with pytest.raises(ValueError, match="non-empty"):  # upstream: chromadb refuses an empty upsert
        retriever.vectorstore.add_images([])
    with pytest.raises(ValueError, match="got 2 metadatas for 1 uris"):
        retriever.add_images(["a.png"], metadatas=[{}, {}])


@pytest.mark.parametrize("call, error, message", [
    (lambda e: e.embed_documents("one text"), InvalidItemError, "got a single str; wrap it in a list"),
    (lambda e: e.embed_documents(["ok", 5]), InvalidItemError, "item 1: expected str, dict"),
    (lambda e: e.embed_query(["a list"]), InvalidItemError, "embed_query expects a str, got list"),
    (lambda e: e.embed_query("  "), InvalidItemError, "item 0: text is empty and there is no image"),
    (lambda e: e.embed_image("one.png"), InvalidItemError, "got a single str; wrap it in a list: [uri]"),
    (lambda e: e.embed_image([3]), InvalidItemError, "item 0: unsupported image type int"),
    (lambda e: e.embed_image(["/no/such/image.png"]), ImageLoadError,
     "item 0: cannot load image '/no/such/image.png': file not found"),
    (lambda e: e.embed_multimodal_query(), InvalidItemError, "item 0: item has neither text nor image"),
    (lambda e: e.embed_multimodal_query("x", instruction="mscoco_t2"), UnknownTaskError, "Did you mean 'mscoco_t2i'"),
])
def test_bad_embedding_inputs(call, error: type[Exception], message: str, emb: MMEmbedEmbeddings) -> None:
    with pytest.raises(error) as info:
        call(emb)
    assert message in str(info.value)


def test_bad_image_in_add_images_writes_nothing(emb: MMEmbedEmbeddings, images: list[str], tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    store = _store(emb)
    with pytest.raises(ImageLoadError, match=r"item 1: cannot load image '.*corrupt\.png': unknown or unsupported"):
        store.add_images([images[0], str(corrupt), images[1]])
    with pytest.raises(FileNotFoundError):  # upstream reads the files itself, before embedding
        store.add_images([images[0], str(tmp_path / "missing.png")])
    assert store.get()["ids"] == []


def test_bad_retriever_inputs(filled: MMEmbedRetriever, emb: MMEmbedEmbeddings, tiny_encoder: Encoder) -> None:
    with pytest.raises(InvalidItemError, match="item 0: item has neither text nor image"):
        filled.invoke("")
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        filled.invoke("red", k=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'top_k'"):
        filled.invoke("red", top_k=2)
    with pytest.raises(ImageLoadError, match="item 0: cannot load image '/no/such.png': file not found"):
        filled.invoke("red", image="/no/such.png")
    with pytest.raises(TypeError, match="embedding_function is NoneType, not MMEmbedEmbeddings"):
        MMEmbedRetriever(vectorstore=Chroma(f"lc-{uuid.uuid4().hex[:12]}"))
    with pytest.raises(UnknownTaskError, match="mscoco_t2"):
        MMEmbedRetriever(vectorstore=filled.vectorstore, instruction="mscoco_t2")
    with pytest.raises(ValueError, match="device applies only when loading"):
        MMEmbedEmbeddings(encoder=tiny_encoder, device="cpu")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        MMEmbedEmbeddings(encoder=tiny_encoder, instructions="mscoco_t2i")
