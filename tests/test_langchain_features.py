"""LangChain: modality metadata on every write path and the retriever's modality= filter (in the store), chunked
add_images past Chroma's batch limit with rollback, async twins off the event loop, encoder options, shared model
handles, and deleting through LangChain's own API."""

from __future__ import annotations

import asyncio
import copy
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("langchain_chroma", reason='needs the langchain extra: pip install "mmembed-rag[langchain]"')

from langchain_chroma import Chroma  # noqa: E402
from langchain_core.documents import Document  # noqa: E402

from mmembed_rag import Encoder, ImageLoadError  # noqa: E402
from mmembed_rag.integrations.langchain import MMEmbedEmbeddings, MMEmbedReranker, MMEmbedRetriever  # noqa: E402
from mmembed_rag.modality import UnknownModalityError  # noqa: E402
from mmembed_rag.reranker import MLLMReranker  # noqa: E402
from mmembed_rag.testing import make_tiny_reranker  # noqa: E402

pytestmark = pytest.mark.both_families  # every test runs once per model family


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("lc-features")
    paths = []
    for i, colour in enumerate([(220, 20, 20), (20, 200, 40), (30, 40, 230)]):
        Image.new("RGB", (40, 32), colour).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


@pytest.fixture(scope="module")
def emb(tiny_encoder: Encoder) -> MMEmbedEmbeddings:
    return MMEmbedEmbeddings(encoder=tiny_encoder, query_instruction="mscoco_t2i")


def _retriever(emb: MMEmbedEmbeddings, **kwargs) -> MMEmbedRetriever:
    return MMEmbedRetriever(vectorstore=Chroma(f"lc-{uuid.uuid4().hex[:12]}", embedding_function=emb), **kwargs)


@pytest.fixture()
def filled(emb, images) -> MMEmbedRetriever:
    retriever = _retriever(emb, k=10)
    retriever.add_texts(["a red circle", "a green square"], metadatas=[{"src": "a"}, {"src": "b"}], ids=["t0", "t1"])
    retriever.add_documents([Document(page_content="a blue star", metadata={"src": "a"}, id="d0")])
    retriever.add_images(images, ids=[f"i{i}" for i in range(len(images))])
    return retriever


def test_every_write_path_tags_the_modality(filled, images):
    stored = filled.vectorstore.get(include=["metadatas"])
    modality = dict(zip(stored["ids"], (m["modality"] for m in stored["metadatas"])))
    assert modality == {"t0": "text", "t1": "text", "d0": "text", "i0": "image", "i1": "image", "i2": "image"}
    assert filled.vectorstore.get(ids=["i1"])["metadatas"][0]["image"] == images[1]


def test_modality_filters_in_the_store_and_combines_with_filter(filled, emb):
    assert {d.id for d in filled.invoke("red", modality="image")} == {"i0", "i1", "i2"}
    assert {d.id for d in filled.invoke("red", modality=["text"], filter={"src": "a"})} == {"t0", "d0"}
    only_images = _retriever(emb, k=5, modality="image")
    only_images.add_texts(["text"], ids=["x"])
    assert only_images.invoke("text") == []
    with pytest.raises(ValueError, match="modality must be one of 'text', 'image', 'image,text'.*got 'video'"):
        _retriever(emb, modality="video")  # pydantic wraps the UnknownModalityError in its ValidationError
    with pytest.raises(UnknownModalityError, match="got 'audio'"):
        filled_invoke = _retriever(emb)
        filled_invoke.invoke("x", modality="audio")


def test_scores_are_exact_cosines(filled, tiny_encoder, images):
    docs = filled.invoke("a red circle", k=6)
    query = tiny_encoder.encode_queries(["a red circle"], instruction="mscoco_t2i")[0]
    stored = filled.vectorstore.get(ids=[d.id for d in docs], include=["embeddings"])
    by_id = dict(zip(stored["ids"], np.asarray(stored["embeddings"]) @ query))
    np.testing.assert_allclose([d.metadata["score"] for d in docs], [by_id[d.id] for d in docs], atol=1e-5)
    assert [d.metadata["score"] for d in docs] == sorted((d.metadata["score"] for d in docs), reverse=True)


def test_add_images_chunks_under_the_client_limit_and_rolls_back(emb, images, monkeypatch, tmp_path):
    retriever = _retriever(emb)
    collection = retriever.vectorstore._collection
    monkeypatch.setattr(collection._client, "get_max_batch_size", lambda: 2)
    sizes = []
    upsert = type(collection).upsert

    def limited(self, ids, *args, **kwargs):
        sizes.append(len(ids))
        if len(ids) > 2:
            raise ValueError(f"Batch size of {len(ids)} is greater than max batch size of 2")
        return upsert(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(collection), "upsert", limited)
    ids = retriever.add_images(images + images[:2])
    assert sizes == [2, 2, 1] and retriever.vectorstore.get()["ids"] and len(set(ids)) == 5
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        retriever.add_images(images + [str(broken)])  # the third chunk fails: the first two are removed again
    assert sorted(retriever.vectorstore.get()["ids"]) == sorted(ids)


def test_async_twins_run_off_the_event_loop(emb, images, monkeypatch, tiny_encoder):
    retriever = _retriever(emb)
    threads = []
    encode = tiny_encoder.encode_documents
    monkeypatch.setattr(tiny_encoder, "encode_documents",
                        lambda *a, **kw: (threads.append(threading.current_thread()), encode(*a, **kw))[1])

    async def run():
        vectors = await emb.aembed_image(images[:2])
        ids = await retriever.aadd_images(images[:2])
        await retriever.aadd_texts(["async text"])
        return vectors, ids

    vectors, ids = asyncio.run(run())
    np.testing.assert_allclose(vectors, encode([{"image": p} for p in images[:2]]), atol=1e-6)
    assert len(ids) == 2 and len(threads) == 3 and all(t is not threading.main_thread() for t in threads)


def test_deleting_through_langchain_removes_documents(filled):
    filled.vectorstore.delete(["t0", "i0"])
    ids = {d.id for d in filled.invoke("red")}
    assert "t0" not in ids and "i0" not in ids and len(ids) == 4


def test_encoder_kwargs_and_private_shared_handles(tiny_checkpoint, tiny_encoder, tmp_path_factory):
    loaded = MMEmbedEmbeddings(model=str(tiny_checkpoint), device="cpu",
                               encoder_kwargs={"url_timeout": 2.5, "max_length": 32, "batch_size": 3})
    assert loaded.encoder.url_timeout == 2.5 and loaded.batch_size == 3
    emb = MMEmbedEmbeddings(encoder=tiny_encoder)
    assert "encoder" not in emb.model_dump() and "encoder" not in MMEmbedEmbeddings.model_fields
    assert emb.model_copy(deep=True).encoder is tiny_encoder and copy.deepcopy(emb).encoder is tiny_encoder
    with pytest.raises(ValueError, match="encoder_kwargs applies only when loading"):
        MMEmbedEmbeddings(encoder=tiny_encoder, encoder_kwargs={"max_length": 8})
    with pytest.raises(ValueError, match=r"encoder_kwargs\['url_timeout'\] must be a positive number"):
        MMEmbedEmbeddings(encoder=tiny_encoder, encoder_kwargs={"url_timeout": 0})
    rr = MLLMReranker.from_pretrained(make_tiny_reranker(tmp_path_factory.mktemp("rr") / "t", seed=0), device="cpu")
    reranker = MMEmbedReranker(reranker=rr, encoder_kwargs={"batch_size": 4})
    assert reranker.batch_size == 4 and reranker.model_copy(deep=True).reranker is rr
    assert "reranker" not in reranker.model_dump()


@pytest.mark.slow
def test_add_images_past_chromas_real_limit(emb, images):
    retriever = _retriever(emb)
    limit = retriever.vectorstore._collection._client.get_max_batch_size()
    ids = retriever.add_images([images[i % 3] for i in range(limit + 1)])
    assert len(retriever.vectorstore.get(ids=ids)["ids"]) == limit + 1
    assert Path(images[0]).exists()
