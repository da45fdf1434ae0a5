"""LlamaIndex reranking: MMEmbedRerank against MLLMReranker run directly, combine modes, the retriever's rerank
stage, a query engine, async, and error messages."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmembed_rag import Encoder, ImageLoadError, InvalidItemError
from mmembed_rag.errors import InvalidArgumentError
from mmembed_rag.rerank_templates import TemplateError
from mmembed_rag.reranker import MLLMReranker

pytest.importorskip("llama_index.core")

from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.response_synthesizers.no_text import NoText  # noqa: E402
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle, TextNode  # noqa: E402

from mmembed_rag.integrations.llama_index import (  # noqa: E402
    MMEmbedEmbedding,
    MMEmbedRerank,
    MMEmbedRetriever,
    RerankedNode,
    build_index,
)

pytestmark = pytest.mark.both_families  # every test runs once per model family

TEXTS = ["a red square", "a blue circle on the left", "photosynthesis stores light energy in glucose"]
COLOURS = [(220, 20, 20), (20, 40, 220), (30, 200, 40)]
RETRIEVAL = [0.9, 0.2, 0.5, -0.1, 0.7, 0.3]  # incoming scores, deliberately unlike the rerank order


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy machine they spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("rerank-images")
    paths = []
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (48, 40), colour)
        image.paste((255 - colour[0], 128, 255 - colour[2]), (8 * i, 4, 8 * i + 16, 20))
        image.save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


@pytest.fixture(scope="module")
def mllm(reranker_dir: Path) -> MLLMReranker:
    return MLLMReranker.from_pretrained(reranker_dir, device="cpu")


def corpus(images: list[str]) -> tuple[list[NodeWithScore], list[dict]]:
    """Text nodes, image nodes (path and base64) and an image+text node with retrieval scores, and the items
    MLLMReranker gets for them when called directly."""
    b64 = base64.b64encode(Path(images[1]).read_bytes()).decode()
    nodes = [TextNode(text=t, id_=f"t{i}") for i, t in enumerate(TEXTS)]
    nodes += [ImageNode(image_path=images[0], id_="i0"), ImageNode(image=b64, id_="b64"),
              ImageNode(text="a green photo", image_path=images[2], id_="it")]
    items = [{"text": t} for t in TEXTS]
    items += [{"image": images[0]}, {"image": Path(images[1]).read_bytes()},
              {"text": "a green photo", "image": images[2]}]
    return [NodeWithScore(node=n, score=s) for n, s in zip(nodes, RETRIEVAL)], items


QUERIES = {  # name -> (bundle fields, the same query as an item)
    "text": (("a red square", None), {"text": "a red square"}),
    "image": (("", 0), {"image": 0}),
    "composed": (("the same but in blue", 0), {"text": "the same but in blue", "image": 0}),
}


def query(name: str, images: list[str]) -> tuple[QueryBundle, dict]:
    (text, image), item = QUERIES[name]
    item = {k: images[v] if k == "image" else v for k, v in item.items()}
    return QueryBundle(text, image_path=None if image is None else images[image]), item


@pytest.mark.parametrize("name", list(QUERIES))
def test_order_and_scores_equal_the_reranker(name: str, mllm: MLLMReranker, images: list[str]) -> None:
    hits, items = corpus(images)
    bundle, item = query(name, images)
    before = [(h.node.node_id, h.score, dict(h.node.metadata)) for h in hits]
    expected = mllm.rerank(item, items)
    out = MMEmbedRerank(reranker=mllm, top_n=10).postprocess_nodes(hits, bundle)
    assert [r.node.node_id for r in out] == [hits[e.index].node.node_id for e in expected]
    np.testing.assert_allclose([r.score for r in out], [e.score for e in expected], atol=1e-6)
    assert all(isinstance(r, RerankedNode) and r.rerank_score == r.score for r in out)
    assert [r.retrieval_score for r in out] == [RETRIEVAL[e.index] for e in expected]
    assert all(r.node is hits[e.index].node for r, e in zip(out, expected)), "the caller's nodes, not copies"
    assert [(h.node.node_id, h.score, h.node.metadata) for h in hits] == before, "inputs are left unchanged"


def test_image_and_composed_queries_reach_the_reranker(mllm: MLLMReranker, images: list[str]) -> None:
    hits, items = corpus(images)
    rerank = MMEmbedRerank(reranker=mllm, top_n=10)
    by_id = {}
    for name in QUERIES:
        bundle, item = query(name, images)
        by_id[name] = {r.node.node_id: r.score for r in rerank.postprocess_nodes(hits, bundle)}
        direct = mllm.score(item, items)
        np.testing.assert_allclose([by_id[name][h.node.node_id] for h in hits], direct, atol=1e-6, err_msg=name)
    ids = [h.node.node_id for h in hits]
    text_only = mllm.score("the same but in blue", items)
    assert np.abs(np.array([by_id["composed"][i] for i in ids]) - text_only).max() > 1e-3
    assert np.abs(np.array([by_id["composed"][i] for i in ids]) -
                  np.array([by_id["image"][i] for i in ids])).max() > 1e-3


def test_top_n_empty_query_str_and_template(mllm: MLLMReranker, images: list[str], family: str) -> None:
    hits, items = corpus(images)
    expected = mllm.rerank("a red square", items)
    ids = [hits[e.index].node.node_id for e in expected]
    assert [r.node.node_id for r in MMEmbedRerank(reranker=mllm, top_n=2).postprocess_nodes(
        hits, query_str="a red square")] == ids[:2]
    assert len(MMEmbedRerank(reranker=mllm, top_n=100).postprocess_nodes(hits, query_str="x")) == len(hits)
    assert MMEmbedRerank(reranker=mllm).postprocess_nodes([], QueryBundle("a red square")) == []
    if family == "qwen3_vl":  # its prompt is the official one; the instruction steers it
        with pytest.raises(InvalidArgumentError, match="template= is for LLaVA-NeXT rerankers"):
            MMEmbedRerank(reranker=mllm, template="generic").postprocess_nodes(hits, query_str="red")
        steered = MMEmbedRerank(reranker=mllm, top_n=10, instruction="Find the red one.").postprocess_nodes(
            hits, query_str="red")
        direct = mllm.score("red", items, instruction="Find the red one.")
        np.testing.assert_allclose([r.score for r in steered], sorted(direct, reverse=True), atol=1e-6)
        assert not np.allclose(mllm.score_logits("red", items, instruction="Find the red one."),
                               mllm.score_logits("red", items), atol=1e-3)
        return
    generic = MMEmbedRerank(reranker=mllm, top_n=10, template="generic").postprocess_nodes(hits, query_str="red")
    direct = mllm.score("red", items, template="generic")
    np.testing.assert_allclose([r.score for r in generic], sorted(direct, reverse=True), atol=1e-6)
    assert not np.allclose(sorted(direct), sorted(mllm.score("red", items)), atol=1e-3)


@pytest.mark.parametrize("combine, weight", [("multiply", 0.5), ("weighted", 0.5), ("weighted", 0.1)])
def test_combine_modes(combine: str, weight: float, mllm: MLLMReranker, images: list[str]) -> None:
    hits, items = corpus(images)
    bundle, item = query("composed", images)
    p = mllm.score(item, items).astype(float)
    r = np.array(RETRIEVAL)
    final = p * r if combine == "multiply" else weight * p + (1 - weight) * r
    order = sorted(range(len(hits)), key=lambda i: (-final[i], i))[:4]
    out = MMEmbedRerank(reranker=mllm, top_n=4, combine=combine, weight=weight).postprocess_nodes(hits, bundle)
    assert [o.node.node_id for o in out] == [hits[i].node.node_id for i in order]
    np.testing.assert_allclose([o.score for o in out], final[order], atol=1e-6)
    np.testing.assert_allclose([o.rerank_score for o in out], p[order], atol=1e-6)
    assert [o.retrieval_score for o in out] == [RETRIEVAL[i] for i in order]
    if weight == 0.1:  # retrieval dominates: the order is not the pure rerank order
        assert order != sorted(range(len(hits)), key=lambda i: -p[i])[:4]
    hits[1] = NodeWithScore(node=hits[1].node)
    with pytest.raises(ValueError, match=f"candidate 1 has no retrieval score; combine='{combine}' needs one"):
        MMEmbedRerank(reranker=mllm, combine=combine).postprocess_nodes(hits, bundle)


def test_retriever_rerank_stage(tiny_encoder: Encoder, mllm: MLLMReranker, images: list[str]) -> None:
    embed = MMEmbedEmbedding(encoder=tiny_encoder)
    hits, items = corpus(images)
    index = build_index([h.node for h in hits], embed)
    bundle, item = query("composed", images)
    plain = MMEmbedRetriever(index, similarity_top_k=5).retrieve(bundle)
    item_of = {h.node.node_id: it for h, it in zip(hits, items)}
    candidates = [item_of[h.node.node_id] for h in plain]
    p = mllm.score(item, candidates).astype(float)
    cosine = np.array([h.score for h in plain])
    for combine, final in [(None, p), ("weighted", 0.5 * p + 0.5 * cosine)]:
        rerank = MMEmbedRerank(reranker=mllm, top_n=3, combine=combine)
        got = MMEmbedRetriever(index, similarity_top_k=5, reranker=rerank).retrieve(bundle)
        order = sorted(range(len(plain)), key=lambda i: (-final[i], i))[:3]
        assert [g.node.node_id for g in got] == [plain[i].node.node_id for i in order], combine
        np.testing.assert_allclose([g.score for g in got], final[order], atol=1e-5)
        np.testing.assert_allclose([g.retrieval_score for g in got], cosine[order], atol=1e-6)
    # The image reaches the rerank stage: text-only scores of the same candidates differ.
    assert np.abs(np.sort(mllm.score(bundle.query_str, candidates)) - np.sort(p)).max() > 1e-3
    # As a query engine's node postprocessor, the bundle (image included) reaches it too.
    engine = RetrieverQueryEngine(MMEmbedRetriever(index, similarity_top_k=5), NoText(llm=MockLLM()),
                                  node_postprocessors=[MMEmbedRerank(reranker=mllm, top_n=3)])
    order = sorted(range(len(plain)), key=lambda i: (-p[i], i))[:3]
    np.testing.assert_allclose([n.score for n in engine.query(bundle).source_nodes], p[order], atol=1e-5)


@pytest.mark.asyncio
async def test_async_matches_and_runs_off_the_loop(mllm: MLLMReranker, images: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    hits, _ = corpus(images)
    bundle, _ = query("composed", images)
    rerank = MMEmbedRerank(reranker=mllm, top_n=3)
    expected = [(r.node.node_id, r.score) for r in rerank.postprocess_nodes(hits, bundle)]
    threads: list[int] = []
    original = mllm.rerank

    def spy(*args: object, **kwargs: object) -> object:  # records the thread of the model call
        threads.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(mllm, "rerank", spy)
    got = [(r.node.node_id, r.score) for r in await rerank.apostprocess_nodes(hits, bundle)]
    assert got == expected and threads and threading.get_ident() not in threads


def test_loads_from_a_path_and_settings(reranker_dir: Path, mllm: MLLMReranker, images: list[str]) -> None:
    hits, _ = corpus(images)
    loaded = MMEmbedRerank(model=reranker_dir, device="cpu", top_n=3)
    assert loaded.model == str(reranker_dir) and loaded.reranker is not mllm
    assert MMEmbedRerank.class_name() == "MMEmbedRerank" and loaded.to_dict()["class_name"] == "MMEmbedRerank"
    assert MMEmbedRerank.model_fields["model"].default == "llava-hf/llava-v1.6-mistral-7b-hf"
    same = MMEmbedRerank(reranker=mllm, top_n=3)
    got, expected = loaded.postprocess_nodes(hits, query_str="red"), same.postprocess_nodes(hits, query_str="red")
    assert [r.node.node_id for r in got] == [r.node.node_id for r in expected]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in expected], atol=1e-6)


def test_bad_inputs_are_named(mllm: MLLMReranker, images: list[str], tmp_path: Path) -> None:
    rerank = MMEmbedRerank(reranker=mllm)
    good = NodeWithScore(node=TextNode(text="ok", id_="ok"), score=0.5)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    cases = [
        ([good, NodeWithScore(node=ImageNode(image_path="/no/such.png"))], QueryBundle("red"), ImageLoadError,
         "candidate 1: cannot load image '/no/such.png': file not found"),
        ([NodeWithScore(node=ImageNode(image_path=str(corrupt))), good], QueryBundle("red"), ImageLoadError,
         f"candidate 0: cannot load image '{corrupt}': unknown or unsupported image format"),
        ([good, NodeWithScore(node=ImageNode(image="!!not base64!!"))], QueryBundle("red"), ImageLoadError,
         "candidate 1: cannot load image 'data:image;base64,... (32 chars)': invalid base64 in data URI"),
        ([good, good, NodeWithScore(node=ImageNode(id_="blank"))], QueryBundle("red"), InvalidItemError,
         "candidate 2: node 'blank': text is empty and there is no image"),
        ([good, TextNode(text="bare")], QueryBundle("red"), InvalidItemError,
         "candidate 1: expected a NodeWithScore, got TextNode"),
        (good, QueryBundle("red"), InvalidItemError, "nodes must be a list of NodeWithScore, got a single"),
        ([good], QueryBundle(""), InvalidItemError,
         "QueryBundle(query_str='', image_path=None): item has neither text nor image"),
        ([good], QueryBundle("red", image_path="/no/q.png"), ImageLoadError,
         "query: cannot load image '/no/q.png': file not found"),
        ([good], None, ValueError, "MMEmbedRerank needs the query"),
    ]
    for nodes, bundle, error, message in cases:
        with pytest.raises(error) as info:
            rerank.postprocess_nodes(nodes, bundle)
        assert message in str(info.value), (message, str(info.value))


def test_bad_settings(mllm: MLLMReranker, tiny_encoder: Encoder) -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        MMEmbedRerank(reranker=mllm, top_n=0)
    with pytest.raises(ValueError, match="'multiply' or 'weighted'"):
        MMEmbedRerank(reranker=mllm, combine="sum")
    with pytest.raises(ValueError, match="less than or equal to 1"):
        MMEmbedRerank(reranker=mllm, combine="weighted", weight=1.5)
    with pytest.raises(TemplateError, match="unknown template 'txt2txt'"):
        MMEmbedRerank(reranker=mllm, template="txt2txt")
    with pytest.raises(ValueError, match="device applies only when loading"):
        MMEmbedRerank(reranker=mllm, device="cpu")
    index = build_index([TextNode(text="a")], MMEmbedEmbedding(encoder=tiny_encoder))
    with pytest.raises(TypeError, match="reranker must be a BaseNodePostprocessor such as MMEmbedRerank, got str"):
        MMEmbedRetriever(index, reranker="llava")
