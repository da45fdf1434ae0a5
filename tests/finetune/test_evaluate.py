"""Evaluation: hand-computed Recall@k, modality accuracy and nDCG@10; the report; a real run on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed_rag.finetune.data import MBEIRDataset, TextRetrievalData
from mmembed_rag.finetune.evaluate import (
    EvaluationReport,
    default_k,
    evaluate,
    evaluate_mbeir,
    evaluate_text,
    hit_rate,
    modality_accuracy,
    ndcg_at_k,
)
from mmembed_rag.finetune.synthetic import generate_benchmark, load_benchmark, load_text_benchmark
from mmembed_rag.items import MultimodalItem


def test_hit_rate_and_modality_accuracy_by_hand() -> None:
    rankings = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    positives = [{"b"}, {"x", "f"}, {"z"}]
    assert hit_rate(rankings, positives, 1) == 0.0
    assert hit_rate(rankings, positives, 2) == pytest.approx(1 / 3)
    assert hit_rate(rankings, positives, 3) == pytest.approx(2 / 3)
    assert math.isnan(hit_rate([], [], 5))
    assert modality_accuracy(["image", "text", "image", "image"], "image") == 0.75
    assert default_k(1) == default_k(7) == 10 and default_k(9) == default_k(0) == 5


def test_ndcg_matches_a_hand_computation() -> None:
    run = {"q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.6}, "q2": {"d5": 0.5, "d6": 0.4}}
    qrels = {"q1": {"d2": 1, "d4": 1}, "q2": {"d5": 1}}
    q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(run, qrels, 10) == pytest.approx((q1 + 1.0) / 2)
    graded = ndcg_at_k({"q": {"a": 2.0, "b": 1.0}}, {"q": {"a": 1, "b": 2}}, 10)
    assert graded == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))  # trec_eval: linear gain
    assert ndcg_at_k({}, {"q": {"a": 1}}, 10) == 0.0  # a query missing from the run counts as zero


class TableEncoder:
    """Stand-in encoder whose embeddings are given per item (keyed by text or image file name)."""

    def __init__(self, documents: dict[str, list[float]], queries: dict[str, list[float]]) -> None:
        self.documents, self.queries = documents, queries

    @staticmethod
    def _lookup(table: dict[str, list[float]], items) -> np.ndarray:
        assert all(isinstance(it, MultimodalItem) for it in items)
        return np.asarray([table[it.text if it.image is None else Path(it.image).name] for it in items],
                          dtype=np.float32)

    def encode_queries(self, items, instruction=None, batch_size=8, show_progress=None) -> np.ndarray:
        assert all(it.instruction for it in items)  # queries carry their task instruction
        return self._lookup(self.queries, items)

    def encode_documents(self, items, batch_size=8, show_progress=None) -> np.ndarray:
        assert all(it.instruction is None for it in items)  # documents never do
        return self._lookup(self.documents, items)


@pytest.fixture()
def toy(tmp_path: Path) -> MBEIRDataset:
    """Two text->image queries; a pool of 3 images and 2 captions (dims: c1 i1 i2 i3 c2)."""
    for name in ("i1", "i2", "i3"):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    pool = [{"did": "9:1", "img_path": "i1.png", "modality": "image"}, {"did": "9:2", "img_path": "i2.png",
                                                                         "modality": "image"},
            {"did": "9:3", "img_path": "i3.png", "modality": "image"},
            {"did": "9:4", "txt": "cap one", "modality": "text"}, {"did": "9:5", "txt": "cap two", "modality": "text"}]
    queries = [{"qid": "9:1", "query_txt": "cap one", "query_modality": "text", "pos_cand_list": ["9:1"], "task_id": 0},
               {"qid": "9:2", "query_txt": "cap two", "query_modality": "text", "pos_cand_list": ["9:2"], "task_id": 0}]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    return MBEIRDataset.load(tmp_path / "q.jsonl", tmp_path / "pool.jsonl", image_root=tmp_path)


def test_recall_and_modality_accuracy_on_local_and_global_pools(toy: MBEIRDataset) -> None:
    # Documents are basis vectors; a query's vector is its score for each document.
    basis = {"cap one": 0, "i1.png": 1, "i2.png": 2, "i3.png": 3, "cap two": 4}
    docs = {key: list(np.eye(5)[i]) for key, i in basis.items()}
    # q1 global ranking: c1, i1(pos), i2, c2, i3 -> local: i1, i2, i3.
    # q2 global ranking: i3, c2, i2(pos), i1, c1 -> local: i3, i2, i1.
    encoder = TableEncoder(docs, {"cap one": [0.9, 0.8, 0.5, 0.1, 0.2], "cap two": [0.0, 0.1, 0.7, 0.9, 0.8]})
    report = evaluate_mbeir(encoder, toy, ks=[1, 2])
    by_pool = {r.pool: r for r in report.tasks}
    local, glob = by_pool["local"], by_pool["global"]
    assert local.task == "mscoco_t2i" and local.k == 5 and local.num_queries == 2
    assert local.recall == {1: 0.5, 2: 1.0, 5: 1.0} and local.modality_accuracy == 1.0
    assert glob.recall == {1: 0.0, 2: 0.5, 5: 1.0} and glob.modality_accuracy == 0.5
    assert report.average("local") == 1.0 and report.average("global") == 1.0
    table = report.to_markdown()
    assert "| task | dataset | task id | pool | queries | R@1 | R@2 | R@5 | modality acc. |" in table
    assert "| mscoco_t2i | MSCOCO | 0 | global | 2 | 0.0 | 50.0 | 100.0* | 50.0 |" in table
    data = json.loads(report.to_json())
    assert data["tasks"][1]["recall"] == {"1": 0.0, "2": 0.5, "5": 1.0} and data["average"]["global"] == 1.0


def test_text_ndcg_through_the_encoder(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(json.dumps({"qid": "q", "query": "star", "positives": ["p2", "p4"]}) + "\n"
                                      + json.dumps({"qid": "lost", "query": "none", "positives": ["absent"]}) + "\n")
    data = TextRetrievalData.load(tmp_path / "t.jsonl")
    corpus = ["p1", "p2", "p3", "p4"]
    encoder = TableEncoder({p: list(np.eye(4)[i]) for i, p in enumerate(corpus)},
                           {"star": [0.9, 0.8, 0.7, 0.6], "none": [0, 0, 0, 1]})
    metrics = evaluate_text(encoder, data, corpus)
    assert metrics["num_queries"] == 1  # "lost" has no relevant passage in the corpus
    assert metrics["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def test_full_evaluation_on_the_synthetic_benchmark(tiny_encoder, tmp_path: Path) -> None:
    generate_benchmark(tmp_path, seed=1, n_train=1, n_test=3, image_size=32)
    test = load_benchmark(tmp_path, "test")
    text, corpus = load_text_benchmark(tmp_path, "test")
    report = evaluate(tiny_encoder, test, text, corpus, batch_size=16, cache_dir=tmp_path / "cache")
    assert isinstance(report, EvaluationReport) and len(report.tasks) == 16  # 8 tasks x 2 pools
    assert {r.k for r in report.tasks} == {5}
    for r in report.tasks:
        assert r.num_queries == 3 and 0.0 <= r.headline <= 1.0 and 0.0 <= r.modality_accuracy <= 1.0
        if r.pool == "local":
            assert r.modality_accuracy == 1.0  # local pools hold only the target modality
    assert 0.0 <= report.text["ndcg@10"] <= 1.0 and report.text["num_queries"] == 3
    assert report.to_markdown().count("\n| ") == 17 and "Text retrieval: ndcg@10" in report.to_markdown()
    report.to_json(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["text"]["num_queries"] == 3
    with pytest.raises(ValueError, match="corpus"):
        evaluate(tiny_encoder, None, text)
    with pytest.raises(ValueError, match="pools"):
        evaluate_mbeir(tiny_encoder, test, pools=("everywhere",))
