"""LangChain reranking: MMEmbedReranker against MLLMReranker run directly, combine modes, the retriever's rerank
stage, ContextualCompressionRetriever, async, and error messages."""

from __future__ import annotations

import asyncio
import base64
import importlib
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmembed_rag import Encoder, ImageLoadError, InvalidItemError
from mmembed_rag.reranker import MLLMReranker
from mmembed_rag.testing import make_tiny_reranker

pytest.importorskip("langchain_chroma", reason='needs the langchain extra: pip install "mmembed-rag[langchain]"')

from langchain_chroma import Chroma  # noqa: E402
from langchain_core.documents import Document  # noqa: E402

from mmembed_rag.integrations.langchain import (  # noqa: E402
    MMEmbedEmbeddings,
    MMEmbedReranker,
    MMEmbedRetriever,
)

pytestmark = pytest.mark.both_families  # every test runs once per model family

TEXTS = ["a red circle", "a green square on the left", "photosynthesis stores light energy in glucose"]
RETRIEVAL = [0.9, 0.2, 0.5, -0.1, 0.7, 0.3]  # retrieval cosines, deliberately unlike the rerank order


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy machine they spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("lc-rerank-images")
    paths = []
    for i, colour in enumerate([(220, 20, 20), (20, 200, 40), (30, 40, 230)]):
        image = Image.new("RGB", (48, 40), (255, 255, 255))
        ImageDraw.Draw(image).ellipse((4 + 3 * i, 4, 30 + 3 * i, 34), fill=colour)
        image.save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


@pytest.fixture(scope="module")
def mllm(tmp_path_factory: pytest.TempPathFactory) -> MLLMReranker:
    return MLLMReranker.from_pretrained(make_tiny_reranker(tmp_path_factory.mktemp("rr") / "tiny"), device="cpu")


def b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def corpus(images: list[str]) -> tuple[list[Document], list[dict]]:
    """Text documents; an image as MMEmbedRetriever.add_images stores it (base64 + metadata["image"]); an image as
    plain Chroma.add_images stores it (base64 only); a caption with an image reference. Plus the direct items."""
    docs = [Document(page_content=t, id=f"t{i}") for i, t in enumerate(TEXTS)]
    docs += [Document(page_content=b64(images[0]), metadata={"image": images[0]}, id="i0"),
             Document(page_content=b64(images[1]), id="b64"),
             Document(page_content="a blue photo", metadata={"image": images[2], "tag": "x"}, id="it")]
    for doc, score in zip(docs, RETRIEVAL):
        doc.metadata["score"] = score
    items = [{"text": t} for t in TEXTS]
    items += [{"image": images[0]}, {"image": images[1]}, {"text": "a blue photo", "image": images[2]}]
    return docs, items


@pytest.mark.parametrize("text, image", [("a red circle", None), ("", 0), ("the same but in blue", 0)],
                         ids=["text", "image", "composed"])
def test_order_and_scores_equal_the_reranker(text: str, image: int | None, mllm: MLLMReranker,
                                             images: list[str]) -> None:
    docs, items = corpus(images)
    image = None if image is None else images[image]
    before = [(d.id, d.page_content, dict(d.metadata)) for d in docs]
    expected = mllm.rerank({"text": text or None, "image": image}, items)
    out = MMEmbedReranker(reranker=mllm, top_n=10).compress_documents(docs, text, image=image)
    assert [d.id for d in out] == [docs[e.index].id for e in expected]
    np.testing.assert_allclose([d.metadata["relevance_score"] for d in out], [e.score for e in expected], atol=1e-6)
    assert all(d.metadata["rerank_score"] == d.metadata["relevance_score"] for d in out)
    for d, e in zip(out, expected):  # copies: the stored metadata plus the scores
        assert d is not docs[e.index] and d.page_content == docs[e.index].page_content
        assert {k: v for k, v in d.metadata.items() if "_score" not in k} == docs[e.index].metadata
    assert [(d.id, d.page_content, d.metadata) for d in docs] == before, "inputs are left unchanged"
    if text and image:  # the image reaches the reranker: composed scores are not the text-only ones
        text_only = mllm.score(text, items)
        composed = {d.id: d.metadata["relevance_score"] for d in out}
        assert np.abs(np.array([composed[d.id] for d in docs]) - text_only).max() > 1e-3


def test_top_n_empty_and_template(mllm: MLLMReranker, images: list[str]) -> None:
    docs, items = corpus(images)
    ids = [docs[e.index].id for e in mllm.rerank("a red circle", items)]
    assert [d.id for d in MMEmbedReranker(reranker=mllm, top_n=2).compress_documents(docs, "a red circle")] == ids[:2]
    assert len(MMEmbedReranker(reranker=mllm, top_n=100).compress_documents(docs, "x")) == len(docs)
    assert MMEmbedReranker(reranker=mllm).compress_documents([], "a red circle") == []
    generic = MMEmbedReranker(reranker=mllm, top_n=10, template="generic").compress_documents(docs, "red")
    direct = mllm.score("red", items, template="generic")
    np.testing.assert_allclose([d.metadata["relevance_score"] for d in generic], sorted(direct, reverse=True),
                               atol=1e-6)


@pytest.mark.parametrize("combine, weight", [("multiply", 0.5), ("weighted", 0.5), ("weighted", 0.1)])
def test_combine_modes(combine: str, weight: float, mllm: MLLMReranker, images: list[str]) -> None:
    docs, items = corpus(images)
    p = mllm.score({"text": "same but blue", "image": images[0]}, items).astype(float)
    r = np.array(RETRIEVAL)
    final = p * r if combine == "multiply" else weight * p + (1 - weight) * r
    order = sorted(range(len(docs)), key=lambda i: (-final[i], i))[:4]
    out = MMEmbedReranker(reranker=mllm, top_n=4, combine=combine, weight=weight).compress_documents(
        docs, "same but blue", image=images[0])
    assert [d.id for d in out] == [docs[i].id for i in order]
    np.testing.assert_allclose([d.metadata["relevance_score"] for d in out], final[order], atol=1e-6)
    np.testing.assert_allclose([d.metadata["rerank_score"] for d in out], p[order], atol=1e-6)
    assert [d.metadata["score"] for d in out] == [RETRIEVAL[i] for i in order]
    if weight == 0.1:  # retrieval dominates: the order is not the pure rerank order
        assert order != sorted(range(len(docs)), key=lambda i: -p[i])[:4]
    del docs[1].metadata["score"]
    with pytest.raises(ValueError, match=rf"candidate 1 has no retrieval score \(metadata\['score'\]\); "
                                         rf"combine='{combine}' needs one"):
        MMEmbedReranker(reranker=mllm, combine=combine).compress_documents(docs, "red")


def test_retriever_rerank_stage(tiny_encoder: Encoder, mllm: MLLMReranker, images: list[str]) -> None:
    store = Chroma(f"lc-rr-{uuid.uuid4().hex[:12]}", embedding_function=MMEmbedEmbeddings(encoder=tiny_encoder))
    retriever = MMEmbedRetriever(vectorstore=store, k=5)
    store.add_texts(TEXTS, ids=[f"t{i}" for i in range(len(TEXTS))])
    retriever.add_images(images, ids=[f"i{i}" for i in range(len(images))])
    item_of = {f"t{i}": {"text": t} for i, t in enumerate(TEXTS)} | {f"i{i}": {"image": p} for i, p in
                                                                      enumerate(images)}
    query = {"text": "the same but in blue", "image": images[0]}
    plain = retriever.invoke(query["text"], image=query["image"], instruction="cirr_it2i")
    candidates = [item_of[d.id] for d in plain]
    p = mllm.score(query, candidates).astype(float)
    cosine = np.array([d.metadata["score"] for d in plain])
    for combine, final in [(None, p), ("weighted", 0.5 * p + 0.5 * cosine)]:
        retriever.reranker = MMEmbedReranker(reranker=mllm, top_n=3, combine=combine)
        got = retriever.invoke(query["text"], image=query["image"], instruction="cirr_it2i")
        order = sorted(range(len(plain)), key=lambda i: (-final[i], i))[:3]
        assert [d.id for d in got] == [plain[i].id for i in order], combine
        np.testing.assert_allclose([d.metadata["relevance_score"] for d in got], final[order], atol=1e-5)
        np.testing.assert_allclose([d.metadata["score"] for d in got], cosine[order], atol=1e-6)
        assert all(d.metadata.get("image") == item_of[d.id].get("image") for d in got)
    # The image reaches the rerank stage: text-only scores of the same candidates differ.
    assert np.abs(np.sort(mllm.score(query["text"], candidates)) - np.sort(p)).max() > 1e-3
    # Async retrieval reranks the same way.
    assert [d.id for d in asyncio.run(retriever.ainvoke(query["text"], image=query["image"],
                                                        instruction="cirr_it2i"))] == [d.id for d in got]


def test_inside_contextual_compression_retriever(tiny_encoder: Encoder, mllm: MLLMReranker) -> None:
    for module in ("langchain_classic.retrievers", "langchain.retrievers", "langchain_core.vectorstores.base"):
        try:
            ContextualCompressionRetriever = importlib.import_module(module).ContextualCompressionRetriever
            break
        except (ImportError, AttributeError):
            continue
    else:
        pytest.skip("ContextualCompressionRetriever is in langchain / langchain-classic, neither is installed")
    store = Chroma(f"lc-cc-{uuid.uuid4().hex[:12]}", embedding_function=MMEmbedEmbeddings(encoder=tiny_encoder))
    store.add_texts(TEXTS)
    base = MMEmbedRetriever(vectorstore=store, k=3)
    compressed = ContextualCompressionRetriever(base_compressor=MMEmbedReranker(reranker=mllm, top_n=2),
                                                base_retriever=base).invoke("a red circle")
    expected = mllm.rerank("a red circle", [d.page_content for d in base.invoke("a red circle")], top_n=2)
    assert [d.page_content for d in compressed] == [e.item.text for e in expected]
    np.testing.assert_allclose([d.metadata["relevance_score"] for d in compressed], [e.score for e in expected],
                               atol=1e-6)


def test_async_runs_off_the_event_loop(mllm: MLLMReranker, images: list[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    docs, _ = corpus(images)
    reranker = MMEmbedReranker(reranker=mllm, top_n=3)
    expected = reranker.compress_documents(docs, "blue", image=images[1])
    original, released, worker = mllm.rerank, threading.Event(), []

    def gated(*args: object, **kwargs: object) -> object:
        worker.append(threading.get_ident())
        # Only a free event loop can set the event: reranking on the loop thread would time out here.
        assert released.wait(10), "the event loop was blocked while reranking"
        return original(*args, **kwargs)

    monkeypatch.setattr(mllm, "rerank", gated)

    async def main() -> tuple[list[Document], int]:
        task = asyncio.ensure_future(reranker.acompress_documents(docs, "blue", image=images[1]))
        while not worker:
            await asyncio.sleep(0.005)
        released.set()
        return await task, threading.get_ident()

    got, loop_thread = asyncio.run(main())
    assert worker and worker[0] != loop_thread
    assert [(d.id, d.metadata) for d in got] == [(d.id, d.metadata) for d in expected]


def test_loads_from_a_path(tmp_path: Path, images: list[str]) -> None:
    path = make_tiny_reranker(tmp_path / "rr")
    reranker = MMEmbedReranker(model=path, device="cpu", top_n=1)
    direct = MLLMReranker.from_pretrained(path, device="cpu").rerank("a red circle", TEXTS, top_n=1)[0]
    got = reranker.compress_documents([Document(page_content=t) for t in TEXTS], "a red circle")
    assert [d.page_content for d in got] == [TEXTS[direct.index]]
    assert got[0].metadata["relevance_score"] == pytest.approx(direct.score, abs=1e-6)
    assert MMEmbedReranker.model_fields["model"].default == "llava-hf/llava-v1.6-mistral-7b-hf"


def test_bad_inputs_are_named(mllm: MLLMReranker, images: list[str], tmp_path: Path) -> None:
    reranker = MMEmbedReranker(reranker=mllm)
    good = Document(page_content="ok")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    cases = [
        ([good, Document(page_content="", metadata={"image": "/no/such.png"})], "red", ImageLoadError,
         "candidate 1: cannot load image '/no/such.png': file not found"),
        ([Document(page_content="x", metadata={"image": str(corrupt)})], "red", ImageLoadError,
         f"candidate 0: cannot load image '{corrupt}': unknown or unsupported image format"),
        ([good, good, Document(page_content="x", metadata={"image": 5})], "red", InvalidItemError,
         "candidate 2: unsupported image type int"),
        ([good, Document(page_content=" ")], "red", InvalidItemError,
         "candidate 1: text is empty and there is no image"),
        ([good, "a plain string"], "red", InvalidItemError, "candidate 1: expected a langchain Document, got str"),
        (good, "red", InvalidItemError, "documents must be a list of Documents, got a single Document"),
        ([good], "", InvalidItemError, "query: item has neither text nor image"),
        ([good], ["red"], InvalidItemError, "query: text must be a str or None, got list"),
    ]
    for documents, query, error, message in cases:
        with pytest.raises(error) as info:
            reranker.compress_documents(documents, query)
        assert message in str(info.value), (message, str(info.value))
    with pytest.raises(ImageLoadError, match="query: cannot load image '/no/q.png': file not found"):
        reranker.compress_documents([good], "red", image="/no/q.png")
    # Text that merely looks like base64 stays text.
    hexdigest = "0f" * 40
    scores = reranker.compress_documents([Document(page_content=hexdigest)], "red")[0].metadata["relevance_score"]
    assert scores == pytest.approx(float(mllm.score("red", [hexdigest])[0]), abs=1e-6)


def test_bad_settings(mllm: MLLMReranker) -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        MMEmbedReranker(reranker=mllm, top_n=0)
    with pytest.raises(ValueError, match="'multiply' or 'weighted'"):
        MMEmbedReranker(reranker=mllm, combine="sum")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        MMEmbedReranker(reranker=mllm, weight=-0.5)
    with pytest.raises(ValueError, match="unknown template 'txt2txt'"):  # pydantic wraps the TemplateError
        MMEmbedReranker(reranker=mllm, template="txt2txt")
    with pytest.raises(ValueError, match="device applies only when loading"):
        MMEmbedReranker(reranker=mllm, device="cpu")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        MMEmbedReranker(reranker=mllm, top_k=3)
