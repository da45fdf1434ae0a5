"""LlamaIndex: modality metadata on every stored node and the retriever's modality= filter (in the store),
encoder options, shared (never copied) model handles, deleting through LlamaIndex's own API."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed_rag import Encoder
from mmembed_rag.modality import UnknownModalityError
from mmembed_rag.reranker import MLLMReranker

pytestmark = pytest.mark.both_families  # every test runs once per model family

pytest.importorskip("llama_index.core")
chromadb = pytest.importorskip("chromadb")
pytest.importorskip("llama_index.vector_stores.chroma")

from llama_index.core.schema import ImageNode, MetadataMode, TextNode  # noqa: E402
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters  # noqa: E402
from llama_index.vector_stores.chroma import ChromaVectorStore  # noqa: E402

from mmembed_rag.integrations.llama_index import MMEmbedEmbedding, MMEmbedRerank, MMEmbedRetriever, build_index  # noqa: E402,E501


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("li-features")
    paths = []
    for i, colour in enumerate([(220, 20, 20), (20, 200, 40), (30, 40, 220)]):
        Image.new("RGB", (40, 32), colour).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


@pytest.fixture(scope="module")
def embed(tiny_encoder: Encoder, tiny_checkpoint: Path) -> MMEmbedEmbedding:
    return MMEmbedEmbedding(model_name=str(tiny_checkpoint), encoder=tiny_encoder)


@pytest.fixture(scope="module")
def tiny_reranker_model(reranker_dir: Path) -> MLLMReranker:
    return MLLMReranker.from_pretrained(reranker_dir, device="cpu")


def _nodes(images: list[str]) -> list:
    return ([TextNode(text=f"a text about colour {i}", id_=f"t{i}", metadata={"src": "a" if i % 2 else "b"})
             for i in range(4)]
            + [ImageNode(image_path=p, id_=f"i{i}", metadata={"src": "a"}) for i, p in enumerate(images)]
            + [ImageNode(text="a captioned photo", image_path=images[0], id_="it", metadata={"src": "b"})])


@pytest.fixture()
def index(embed: MMEmbedEmbedding, images: list[str]):
    collection = chromadb.EphemeralClient().create_collection(f"li-{uuid.uuid4().hex[:12]}")
    return build_index(_nodes(images), embed, ChromaVectorStore(chroma_collection=collection))


def test_every_stored_node_carries_its_modality_outside_embedded_and_llm_text(index, images):
    stored = index.vector_store.client.get(include=["metadatas"])
    modality = dict(zip(stored["ids"], (m["modality"] for m in stored["metadatas"])))
    assert modality == {**{f"t{i}": "text" for i in range(4)}, **{f"i{i}": "image" for i in range(3)},
                        "it": "image,text"}
    hits = MMEmbedRetriever(index, similarity_top_k=10).retrieve("colour")
    node = next(h.node for h in hits if h.node.node_id == "t1")
    assert node.metadata["modality"] == "text"
    assert "modality" not in node.get_content(MetadataMode.EMBED) and "modality" not in node.get_content(
        MetadataMode.LLM)
    original = _nodes(images)[0]
    assert "modality" not in original.metadata  # the caller's nodes are not modified


@pytest.mark.parametrize("modality, expected", [
    ("image", {"i0", "i1", "i2"}), (["image", "image,text"], {"i0", "i1", "i2", "it"}), ("text", {"t0", "t1", "t2",
                                                                                                  "t3"})])
def test_the_retriever_filters_by_modality_in_the_store(index, modality, expected):
    calls = []
    query = index.vector_store.client.query
    index.vector_store.client.query = lambda **kw: (calls.append(kw.get("where")), query(**kw))[1]
    hits = MMEmbedRetriever(index, similarity_top_k=10, modality=modality).retrieve("a red picture")
    assert {h.node.node_id for h in hits} == expected
    assert calls and calls[0] is not None and "modality" in str(calls[0])  # filtered by Chroma, not afterwards


def test_modality_combines_with_metadata_filters(index):
    filters = MetadataFilters(filters=[MetadataFilter(key="src", value="a")])
    hits = MMEmbedRetriever(index, similarity_top_k=10, modality="text", filters=filters).retrieve("colour")
    assert {h.node.node_id for h in hits} == {"t1", "t3"}
    with pytest.raises(UnknownModalityError, match="modality must be one of 'text', 'image', 'image,text'.*'video'"):
        MMEmbedRetriever(index, modality="video")


def test_deleting_through_llama_index_removes_nodes_from_results(index):
    index.delete_nodes(["i0", "t0"], delete_from_docstore=True)
    ids = {h.node.node_id for h in MMEmbedRetriever(index, similarity_top_k=20).retrieve("colour")}
    assert "i0" not in ids and "t0" not in ids and len(ids) == 6
    index.vector_store.delete_nodes(["i1"])
    assert "i1" not in {h.node.node_id for h in MMEmbedRetriever(index, similarity_top_k=20).retrieve("x")}


def test_encoder_kwargs_reach_the_encoder(tiny_checkpoint, tiny_encoder):
    embed = MMEmbedEmbedding(model_name=str(tiny_checkpoint), device="cpu",
                             encoder_kwargs={"max_length": 48, "url_timeout": 2.0, "batch_size": 5})
    assert embed.encoder.url_timeout == 2.0 and embed.embed_batch_size == 5
    np.testing.assert_allclose(embed.get_text_embedding("a red square"),
                               tiny_encoder.encode_documents(["a red square"])[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"encoder_kwargs has unknown key\(s\) 'pooling'"):
        MMEmbedEmbedding(encoder=tiny_encoder, encoder_kwargs={"pooling": "mean"})
    with pytest.raises(ValueError, match="encoder_kwargs applies only when loading"):
        MMEmbedEmbedding(encoder=tiny_encoder, encoder_kwargs={"max_length": 8})
    with pytest.raises(ValueError, match=r"embed_batch_size and encoder_kwargs\['batch_size'\] differ"):
        MMEmbedEmbedding(encoder=tiny_encoder, embed_batch_size=4, encoder_kwargs={"batch_size": 5})


def test_copies_share_the_model(embed, tiny_encoder, tiny_reranker_model):
    assert embed.model_copy(deep=True).encoder is tiny_encoder and copy.deepcopy(embed).encoder is tiny_encoder
    rerank = MMEmbedRerank(reranker=tiny_reranker_model, encoder_kwargs={"batch_size": 3})
    assert rerank.batch_size == 3 and rerank.model_copy(deep=True).reranker is tiny_reranker_model
    with pytest.raises(ValueError, match="encoder_kwargs applies only when loading"):
        MMEmbedRerank(reranker=tiny_reranker_model, encoder_kwargs={"max_length": 64})


def test_rerank_encoder_kwargs_reach_the_reranker(reranker_dir):
    rerank = MMEmbedRerank(model=reranker_dir, device="cpu", encoder_kwargs={"url_timeout": 4.0, "batch_size": 2})
    assert rerank.reranker.url_timeout == 4.0 and rerank.batch_size == 2
    assert rerank.to_dict()["encoder_kwargs"] == {"url_timeout": 4.0, "batch_size": 2}
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'image_workers'"):
        MMEmbedRerank(model=reranker_dir, encoder_kwargs={"image_workers": 2})
