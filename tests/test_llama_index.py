"""LlamaIndex adapter: embedding hooks vs the Encoder, one-collection ingest and retrieval over Chroma, upstream
MultiModalVectorStoreIndex, persistence across processes, Chroma's batch limit, and error messages."""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import subprocess
import sys
import threading
import uuid
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed_rag import Encoder
from mmembed_rag.errors import ImageLoadError, InvalidItemError, MissingDependencyError

pytestmark = pytest.mark.both_families  # every test runs once per model family

pytest.importorskip("llama_index.core")
chromadb = pytest.importorskip("chromadb")
pytest.importorskip("llama_index.vector_stores.chroma")

from llama_index.core import StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.embeddings import MockEmbedding  # noqa: E402
from llama_index.core.indices.multi_modal.base import MultiModalVectorStoreIndex  # noqa: E402
from llama_index.core.ingestion import IngestionPipeline  # noqa: E402
from llama_index.core.schema import ImageNode, QueryBundle, TextNode  # noqa: E402
from llama_index.vector_stores.chroma import ChromaVectorStore  # noqa: E402

from mmembed_rag.integrations.llama_index import (  # noqa: E402
    MMEmbedEmbedding,
    MMEmbedRetriever,
    add_nodes,
    build_index,
)

TEXTS = ["a red square", "a green circle on the left", "blue star in the center", "a yellow ring", "dark cat"]
COLOURS = [(220, 20, 20), (20, 200, 40), (30, 40, 220), (240, 220, 10)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (48, 40), colour)
        image.paste((255 - colour[0], 128, 255 - colour[2]), (8 * i, 4, 8 * i + 16, 20))
        image.save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


@pytest.fixture(scope="module")
def embed(tiny_encoder: Encoder, tiny_checkpoint: Path) -> MMEmbedEmbedding:
    return MMEmbedEmbedding(model_name=str(tiny_checkpoint), encoder=tiny_encoder, embed_batch_size=16)


def corpus(images: list[str]) -> tuple[list, list]:
    """Text nodes, image-only nodes (path and base64) and one image+text node, with the Encoder's item for each."""
    b64 = base64.b64encode(Path(images[3]).read_bytes()).decode()
    nodes = [TextNode(text=t, id_=f"t{i}") for i, t in enumerate(TEXTS)]
    nodes += [ImageNode(image_path=p, id_=f"i{i}") for i, p in enumerate(images[:3])]
    nodes += [ImageNode(image=b64, id_="b64"), ImageNode(text="a photo with a caption", image_path=images[1], id_="it")]
    items = TEXTS + [{"image": p} for p in images[:3]]
    items += [{"image": Path(images[3]).read_bytes()}, {"text": "a photo with a caption", "image": images[1]}]
    return nodes, items


def chroma_store(client=None, space: str = "l2") -> ChromaVectorStore:
    client = client or chromadb.EphemeralClient()
    collection = client.create_collection(f"t-{uuid.uuid4().hex}", configuration={"hnsw": {"space": space}})
    return ChromaVectorStore(chroma_collection=collection)


def on_threads(monkeypatch: pytest.MonkeyPatch, encoder: Encoder) -> list[int]:
    """Record the thread of every Encoder call (a spy on the Encoder, not on the adapter)."""
    seen: list[int] = []
    for name in ("encode_queries", "encode_documents"):
        original = getattr(encoder, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(threading.get_ident())
            return _original(*args, **kwargs)

        monkeypatch.setattr(encoder, name, spy)
    return seen


def test_settings_and_class_name(embed: MMEmbedEmbedding, tiny_encoder: Encoder) -> None:
    assert MMEmbedEmbedding.class_name() == "MMEmbedEmbedding"
    assert MMEmbedEmbedding.model_fields["model_name"].default == "nvidia/MM-Embed"
    assert (embed.device, embed.dtype, embed.embed_batch_size) == ("cpu", "float32", 16)
    assert embed.to_dict()["class_name"] == "MMEmbedEmbedding" and embed.encoder is tiny_encoder
    with pytest.raises(ValueError, match="device applies only when loading"):
        MMEmbedEmbedding(encoder=tiny_encoder, device="cuda")


def test_every_hook_matches_encoder(embed: MMEmbedEmbedding, tiny_encoder: Encoder, images: list[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    enc = tiny_encoder
    close = np.testing.assert_allclose
    close(embed.get_query_embedding("red square"), enc.encode_queries(["red square"])[0], atol=1e-6)
    close(embed.get_text_embedding(TEXTS[0]), enc.encode_documents([TEXTS[0]])[0], atol=1e-6)
    close(embed.get_text_embedding_batch(TEXTS), enc.encode_documents(TEXTS), atol=1e-6)
    raw = Path(images[0]).read_bytes()
    expected = enc.encode_documents([{"image": images[0]}])[0]
    data_uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    for source in (images[0], BytesIO(raw), data_uri):
        close(embed.get_image_embedding(source), expected, atol=1e-6)
    close(embed.get_query_embedding_multimodal("the same but red", images[1], instruction="cirr_it2i"),
          enc.encode_queries([{"text": "the same but red", "image": images[1]}], instruction="cirr_it2i")[0], atol=1e-6)
    calls = on_threads(monkeypatch, enc)
    batch = embed._get_image_embeddings(images)
    assert len(calls) == 1, "an image batch is one Encoder call, not a loop"
    close(batch, enc.encode_documents([{"image": p} for p in images]), atol=1e-6)
    close(embed.get_image_embedding_batch(images), batch, atol=1e-6)


def test_query_instruction_only_on_query_path(tiny_encoder: Encoder) -> None:
    embed = MMEmbedEmbedding(encoder=tiny_encoder, query_instruction="mscoco_t2i")
    with_instruction = tiny_encoder.encode_queries(["a red square"], instruction="mscoco_t2i")[0]
    np.testing.assert_allclose(embed.get_query_embedding("a red square"), with_instruction, atol=1e-6)
    assert not np.allclose(with_instruction, tiny_encoder.encode_queries(["a red square"])[0], atol=1e-4)
    np.testing.assert_allclose(embed.get_text_embedding("a red square"),
                               tiny_encoder.encode_documents(["a red square"])[0], atol=1e-6)


@pytest.mark.asyncio
async def test_async_hooks_match_and_run_off_the_loop(embed: MMEmbedEmbedding, tiny_encoder: Encoder,
                                                      images: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    expected = {
        "query": embed.get_query_embedding("red"), "text": embed.get_text_embedding("red"),
        "texts": embed.get_text_embedding_batch(TEXTS), "image": embed.get_image_embedding(images[0]),
        "images": embed.get_image_embedding_batch(images),
        "composed": embed.get_query_embedding_multimodal("red", images[0]),
    }
    threads = on_threads(monkeypatch, tiny_encoder)
    got = {
        "query": await embed.aget_query_embedding("red"), "text": await embed.aget_text_embedding("red"),
        "texts": await embed.aget_text_embedding_batch(TEXTS), "image": await embed.aget_image_embedding(images[0]),
        "images": await embed.aget_image_embedding_batch(images),
        "composed": await embed.aget_query_embedding_multimodal("red", images[0]),
    }
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, err_msg=key)
    assert threads and threading.get_ident() not in threads, "async hooks must not run the model on the event loop"


def test_node_embeddings_and_ingestion_pipeline(embed: MMEmbedEmbedding, tiny_encoder: Encoder,
                                                images: list[str]) -> None:
    nodes, items = corpus(images)
    expected = tiny_encoder.encode_documents(items)
    np.testing.assert_allclose(embed.get_node_embeddings(nodes), expected, atol=1e-6)
    embedded = IngestionPipeline(transformations=[embed]).run(nodes=[n.model_copy() for n in nodes])
    np.testing.assert_allclose([n.embedding for n in embedded], expected, atol=1e-6)


@pytest.mark.parametrize("space", ["l2", "cosine", "ip"])
def test_one_collection_retrieval_scores_are_cosine(embed: MMEmbedEmbedding, tiny_encoder: Encoder,
                                                    images: list[str], space: str) -> None:
    nodes, items = corpus(images)
    index = build_index(nodes, embed, chroma_store(space=space))
    assert index.vector_store.client.count() == len(nodes)
    docs = tiny_encoder.encode_documents(items)
    ids = [n.node_id for n in nodes]
    retriever = MMEmbedRetriever(index=index, similarity_top_k=4, instruction="mscoco_t2i")
    queries = {  # text -> image, image -> text, composed image + text
        "t2i": (QueryBundle("a red square"), {"text": "a red square"}),
        "i2t": (QueryBundle("", image_path=images[2]), {"image": images[2]}),
        "it2i": (QueryBundle("the same but green", image_path=images[0]),
                 {"text": "the same but green", "image": images[0]}),
    }
    for name, (bundle, item) in queries.items():
        scores = docs @ tiny_encoder.encode_queries([item], instruction="mscoco_t2i")[0]
        order = np.argsort(-scores)[:4]
        hits = retriever.retrieve(bundle)
        assert [h.node.node_id for h in hits] == [ids[i] for i in order], name
        np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-4, err_msg=name)
    hits = retriever.retrieve(QueryBundle("", image_path=images[0]))
    image_hit = next(h.node for h in hits if h.node.node_id == "i0")
    assert isinstance(image_hit, ImageNode) and image_hit.image_path == images[0]


@pytest.mark.asyncio
async def test_async_retrieve_matches_and_runs_off_the_loop(embed: MMEmbedEmbedding, tiny_encoder: Encoder,
                                                            images: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    index = build_index(corpus(images)[0], embed, chroma_store())
    retriever = MMEmbedRetriever(index, similarity_top_k=3)
    bundle = QueryBundle("the same but blue", image_path=images[1])
    expected = [(h.node.node_id, h.score) for h in retriever.retrieve(bundle)]
    threads = on_threads(monkeypatch, tiny_encoder)
    got = [(h.node.node_id, h.score) for h in await retriever.aretrieve(bundle)]
    assert got == expected and threads and threading.get_ident() not in threads


def test_upstream_multimodal_index_with_two_chroma_stores(embed: MMEmbedEmbedding, tiny_encoder: Encoder,
                                                          images: list[str]) -> None:
    text_store, image_store = chroma_store(), chroma_store()
    nodes = [TextNode(text=t, id_=f"t{i}") for i, t in enumerate(TEXTS)]
    # upstream drops nodes whose get_content(EMBED) is empty: give images the metadata readers give them
    nodes += [ImageNode(image_path=p, id_=f"i{i}", metadata={"file_path": p}) for i, p in enumerate(images)]
    context = StorageContext.from_defaults(vector_store=text_store, image_store=image_store)
    index = MultiModalVectorStoreIndex(nodes, storage_context=context, embed_model=embed, image_embed_model=embed)
    stored = image_store.client.get(ids=["i0"], include=["embeddings"])["embeddings"][0]
    np.testing.assert_allclose(stored, tiny_encoder.encode_documents([{"image": images[0]}])[0], atol=1e-6)
    upstream = index.as_retriever(similarity_top_k=2, image_similarity_top_k=2).retrieve("a red square")
    assert sorted(h.node.node_id[0] for h in upstream) == ["i", "i", "t", "t"]
    hits = MMEmbedRetriever(index, similarity_top_k=5).retrieve("a red square")  # both stores, merged by cosine
    docs = tiny_encoder.encode_documents(TEXTS + [{"image": p} for p in images])
    scores = docs @ tiny_encoder.encode_queries(["a red square"])[0]
    order = np.argsort(-scores)[:5]
    assert [h.node.node_id for h in hits] == [[n.node_id for n in nodes][i] for i in order]
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-4)


REOPEN = """
import json, sys
import chromadb
from llama_index.core import VectorStoreIndex
from llama_index.core.schema import QueryBundle
from llama_index.vector_stores.chroma import ChromaVectorStore
from mmembed_rag import Encoder
from mmembed_rag.integrations.llama_index import MMEmbedEmbedding, MMEmbedRetriever
ckpt, db, name, image = sys.argv[1:]
embed = MMEmbedEmbedding(encoder=Encoder.from_pretrained(ckpt, device="cpu"))
store = ChromaVectorStore(chroma_collection=chromadb.PersistentClient(path=db).get_collection(name))
index = VectorStoreIndex.from_vector_store(store, embed_model=embed)
hits = MMEmbedRetriever(index, similarity_top_k=4).retrieve(QueryBundle("the same but red", image_path=image))
print(json.dumps([[h.node.node_id, type(h.node).__name__, h.score] for h in hits]))
"""


def test_persistence_round_trip_in_a_new_process(embed: MMEmbedEmbedding, images: list[str], tmp_path: Path,
                                                 tiny_checkpoint: Path) -> None:
    client = chromadb.PersistentClient(path=str(tmp_path / "db"))
    store = chroma_store(client)
    index = build_index(corpus(images)[0], embed, store)
    bundle = QueryBundle("the same but red", image_path=images[2])
    expected = [[h.node.node_id, type(h.node).__name__, h.score] for h in MMEmbedRetriever(index, 4).retrieve(bundle)]
    out = subprocess.run([sys.executable, "-c", REOPEN, str(tiny_checkpoint), str(tmp_path / "db"),
                          store.client.name, images[2]], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    np.testing.assert_allclose([g[2] for g in got], [e[2] for e in expected], atol=1e-5)


def limit_chroma(monkeypatch: pytest.MonkeyPatch, store: ChromaVectorStore, limit: int) -> list[int]:
    """Make the collection's client report ``limit`` and enforce it the way Chroma does; return the add sizes."""
    collection, sizes = store.client, []
    monkeypatch.setattr(collection._client, "get_max_batch_size", lambda: limit)
    original = type(collection).add

    def add(self, ids, *args, **kwargs):
        sizes.append(len(ids))
        if len(ids) > limit:
            raise ValueError(f"Batch size of {len(ids)} is greater than max batch size of {limit}")
        return original(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(collection), "add", add)
    return sizes


def test_ingest_chunks_under_the_clients_max_batch_size(embed: MMEmbedEmbedding, tiny_encoder: Encoder,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = chroma_store()
    sizes = limit_chroma(monkeypatch, store, 7)
    nodes = [TextNode(text=f"{TEXTS[i % 5]} {i}", id_=f"n{i}") for i in range(40)]
    index = build_index(nodes, embed, store)
    assert sum(sizes) == 40 and max(sizes) <= 7 and store.client.count() == 40
    hits = MMEmbedRetriever(index, similarity_top_k=1).retrieve(nodes[13].text)
    stored = store.client.get(ids=["n13"], include=["embeddings"])["embeddings"][0]
    np.testing.assert_allclose(stored, tiny_encoder.encode_documents([nodes[13].text])[0], atol=1e-6)
    assert len(hits) == 1


def test_more_than_5461_precomputed_nodes_fit_chromas_real_limit(embed: MMEmbedEmbedding,
                                                                 tiny_encoder: Encoder) -> None:
    store = chroma_store()
    assert store.client._client.get_max_batch_size() == 5461
    vectors = tiny_encoder.encode_documents(TEXTS).tolist()
    nodes = [TextNode(text=f"n{i}", id_=f"n{i}", embedding=vectors[i % 5]) for i in range(6000)]
    index = build_index(nodes, embed, store)
    assert store.client.count() == 6000
    assert MMEmbedRetriever(index, similarity_top_k=3).retrieve(TEXTS[0])


@pytest.mark.slow
def test_more_than_5461_nodes_through_the_model(embed: MMEmbedEmbedding) -> None:
    store = chroma_store()
    nodes = [TextNode(text=f"n{i}") for i in range(5600)]
    build_index(nodes, MMEmbedEmbedding(encoder=embed.encoder, embed_batch_size=256), store)
    assert store.client.count() == 5600


def test_bad_node_is_named_and_nothing_is_written(embed: MMEmbedEmbedding, images: list[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = chroma_store()
    with pytest.raises(InvalidItemError, match="node 'empty'"):
        build_index([TextNode(text="fine"), ImageNode(id_="empty")], embed, store)
    assert store.client.count() == 0
    limit_chroma(monkeypatch, store, 4)  # the bad image is in the third chunk: two chunks are rolled back
    missing = str(tmp_path / "missing.png")
    nodes = [TextNode(text=f"ok {i}") for i in range(9)] + [ImageNode(image_path=missing, id_="bad")]
    with pytest.raises(ImageLoadError, match="missing.png") as info:
        build_index(nodes, embed, store)
    assert str(info.value).startswith("nodes[9] (id 'bad'): cannot load image") and "file not found" in str(info.value)
    assert store.client.count() == 0


def test_bad_queries_are_named(embed: MMEmbedEmbedding, images: list[str], tmp_path: Path) -> None:
    retriever = MMEmbedRetriever(build_index(corpus(images)[0][:3], embed, chroma_store()), similarity_top_k=2)
    with pytest.raises(InvalidItemError, match=r"QueryBundle\(query_str='', image_path=None\).*neither text nor image"):
        retriever.retrieve(QueryBundle(""))
    with pytest.raises(ImageLoadError, match="nope.png.*file not found"):
        retriever.retrieve(QueryBundle("red", image_path=str(tmp_path / "nope.png")))
    with pytest.raises(ImageLoadError, match="nope.png"):
        embed.get_image_embedding(str(tmp_path / "nope.png"))
    with pytest.raises(TypeError, match="must be an MMEmbedEmbedding"):
        MMEmbedRetriever(VectorStoreIndex([], embed_model=MockEmbedding(embed_dim=8)))
    with pytest.raises(TypeError, match="MultiModalVectorStoreIndex"):
        add_nodes(MultiModalVectorStoreIndex([], embed_model=embed, image_embed_model=embed), [], embed)


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "llama_index" or m.startswith("llama_index.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import raise ImportError
    monkeypatch.setitem(sys.modules, "llama_index.core", None)
    monkeypatch.delitem(sys.modules, "mmembed_rag.integrations.llama_index")
    with pytest.raises(MissingDependencyError, match=r'pip install "mmembed-rag\[llama-index\]"'):
        importlib.import_module("mmembed_rag.integrations.llama_index")


def test_async_hooks_do_not_block_concurrent_work(embed: MMEmbedEmbedding, images: list[str]) -> None:
    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = ticks
        await embed.aget_image_embedding_batch(images * 4)
        task.cancel()
        return ticks - start

    assert asyncio.run(main()) > 5
