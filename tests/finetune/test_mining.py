"""Hard negative mining: C1/C2 rules on a constructed ranking, chunked search, caching, atomic output."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mmembed_rag.finetune import data as data_module
from mmembed_rag.finetune.data import MBEIRDataset
from mmembed_rag.finetune.mining import (
    encode_pool,
    mine_hard_negatives,
    modality_aware_candidates,
    pool_fingerprint,
    sample_negatives,
    topk_candidates,
)
from mmembed_rag.finetune.search import top_k_search
from mmembed_rag.finetune.synthetic import generate_benchmark, load_benchmark

#            0        1        2       3        4        5       6        7        8       9
RANKING = ["t1", "i1", "t2", "it1", "POS", "i2", "t3", "i3", "POS2", "i4"]
MODALITIES = ["text", "image", "text", "image,text", "image", "image", "text", "image", "image", "image"]


def test_c1_is_wrong_modality_above_the_first_positive_and_c2_right_modality_deep() -> None:
    c1, c2 = modality_aware_candidates(RANKING, MODALITIES, {"POS", "POS2"}, "image", c2_start=6)
    assert c1 == ["t1", "t2", "it1"]  # above POS (index 4), not images
    assert c2 == ["i3", "i4"]  # 0-based index >= 6 (ranks 7..10), images, positives excluded
    c1, c2 = modality_aware_candidates(RANKING, MODALITIES, {"POS", "POS2"}, "image", c2_start=0)
    assert c2 == ["i1", "i2", "i3", "i4"]


def test_c1_without_a_retrieved_positive_and_with_a_top_positive() -> None:
    c1, _ = modality_aware_candidates(RANKING, MODALITIES, {"elsewhere"}, "image", c2_start=9)
    assert c1 == ["t1", "t2", "it1", "t3"]  # the positive ranks below everything retrieved
    c1, c2 = modality_aware_candidates(RANKING, MODALITIES, {"t1"}, "text", c2_start=5)
    assert c1 == [] and c2 == ["t3"]
    with pytest.raises(ValueError, match="modalities"):
        modality_aware_candidates(RANKING, MODALITIES[:3], set(), "text")


def test_topk_candidates_skip_positives() -> None:
    assert topk_candidates(RANKING, {"POS", "POS2"}) == [d for d in RANKING if not d.startswith("POS")]
    assert topk_candidates(RANKING, {"POS"}, skip=5) == ["i2", "t3", "i3", "POS2", "i4"]


def test_sample_negatives_counts() -> None:
    c1, c2 = ["a", "b", "c"], ["x", "y", "z", "w"]
    picked = sample_negatives(c1, c2, random.Random(0), 4)
    assert len(picked) == len(set(picked)) == 4 and set(picked) <= set(c1 + c2)
    assert picked == sample_negatives(c1, c2, random.Random(0), 4)
    split = sample_negatives(c1, c2, random.Random(1), 4, num_c1=1)
    assert len(set(split) & set(c1)) == 1 and len(set(split) & set(c2)) == 3
    topped = sample_negatives(c1, ["x"], random.Random(2), 3, num_c1=1)  # C2 too small: top up from C1
    assert len(topped) == 3 and "x" in topped
    assert sorted(sample_negatives(c1, c2, random.Random(3), 50)) == sorted(c1 + c2)
    assert sample_negatives([], [], random.Random(0), 3) == []


@pytest.mark.parametrize(("chunk", "query_batch"), [(1, 1), (7, 3), (64, 100), (1000, 5)])
def test_chunked_search_equals_full_search(chunk: int, query_batch: int) -> None:
    rng = np.random.default_rng(0)
    queries, pool = rng.standard_normal((13, 8)).astype(np.float32), rng.standard_normal((64, 8)).astype(np.float32)
    full = queries @ pool.T
    expected = np.argsort(-full, axis=1)[:, :10]
    scores, index = top_k_search(queries, pool, 10, chunk_size=chunk, query_batch=query_batch)
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=1e-5)
    scores, index = top_k_search(queries, pool[:4], 10, chunk_size=chunk)  # k larger than the pool
    assert index.shape == (13, 4)


def test_search_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k, chunk_size"):
        top_k_search(np.zeros((1, 2)), np.zeros((3, 2)), 0)
    with pytest.raises(ValueError, match="embeddings"):
        top_k_search(np.zeros((1, 2)), np.zeros((3, 4)), 1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    generate_benchmark(root, seed=0, n_train=4, n_test=1, image_size=32, distractors=2.0)
    return root


@pytest.fixture(scope="module")
def train_set(bench: Path) -> MBEIRDataset:
    return load_benchmark(bench, "train")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pool-cache")


def test_mining_end_to_end_with_cache(tiny_encoder, bench: Path, train_set: MBEIRDataset, tmp_path: Path,
                                      monkeypatch) -> None:
    out = tmp_path / "mined.jsonl"
    result = mine_hard_negatives(tiny_encoder, train_set, output=out, top_k=12, c2_start=8, num_negatives=3,
                                 batch_size=16, cache_dir=tmp_path / "cache", seed=1)
    assert result.path == out and len(list((tmp_path / "cache").glob("pool-*.npy"))) == 1
    assert set(result.counts) == set(train_set.tasks)
    assert all(c["queries"] == 4 for c in result.counts.values())
    assert sum(c["c1"] for c in result.counts.values()) > 0  # an untrained model shows modality bias
    reloaded = MBEIRDataset.load(out, bench / "cand_pool/global/mbeir_union_train_cand_pool.jsonl", image_root=bench)
    assert [q.neg_cand_list for q in reloaded.queries] == [q.neg_cand_list for q in result.dataset.queries]
    for before, after in zip(train_set.queries, reloaded.queries, strict=True):
        assert after.pos_cand_list == before.pos_cand_list and after.neg_cand_list
        assert not set(after.neg_cand_list) & set(after.pos_cand_list)
    # Every negative comes from C1 | C2 of the query's own ranking.
    dids, pool_emb = encode_pool(tiny_encoder, train_set, cache_dir=tmp_path / "cache")
    query_emb = tiny_encoder.encode_queries([train_set.query_item(q) for q in train_set.queries], batch_size=16)
    _, index = top_k_search(query_emb, pool_emb, 12)
    for query, row in zip(result.dataset.queries, index, strict=True):
        ranking = [dids[j] for j in row]
        c1, c2 = modality_aware_candidates(ranking, [train_set.pool[d].modality for d in ranking],
                                           set(query.pos_cand_list), query.target_modality, c2_start=8)
        assert set(query.neg_cand_list) <= set(c1) | set(c2)
        assert len(query.neg_cand_list) == min(3, len(set(c1) | set(c2)))

    def no_encoding(*args, **kwargs):
        raise AssertionError("pool re-encoded despite the cache")

    monkeypatch.setattr(tiny_encoder, "encode_documents", no_encoding)
    again = mine_hard_negatives(tiny_encoder, train_set, top_k=12, c2_start=8, num_negatives=3, batch_size=16,
                                cache_dir=tmp_path / "cache", seed=1)
    assert [q.neg_cand_list for q in again.dataset.queries] == [q.neg_cand_list for q in result.dataset.queries]
    assert again.path is None


def test_local_pool_and_topk_strategy(tiny_encoder, train_set: MBEIRDataset, shared_cache: Path) -> None:
    local = mine_hard_negatives(tiny_encoder, train_set, top_k=6, c2_start=3, num_negatives=2, pool="local",
                                batch_size=16, cache_dir=shared_cache)
    assert all(c["c1"] == 0 for c in local.counts.values())  # local pools hold only the target modality
    for query in local.dataset.queries:
        assert set(query.neg_cand_list) <= set(train_set.local_pool(query.task))
    topk = mine_hard_negatives(tiny_encoder, train_set, top_k=5, c2_start=0, num_negatives=5, strategy="topk",
                               batch_size=16, cache_dir=shared_cache)
    assert all(len(q.neg_cand_list) >= 4 for q in topk.dataset.queries)
    with pytest.raises(ValueError, match="c2_start"):
        mine_hard_negatives(tiny_encoder, train_set, top_k=5, c2_start=5)


def test_interrupted_write_leaves_the_original_file(tiny_encoder, train_set: MBEIRDataset, tmp_path: Path,
                                                    shared_cache: Path, monkeypatch) -> None:
    out = tmp_path / "queries.jsonl"
    out.write_text("original\n")
    calls = {"n": 0}
    real = data_module.MBEIRQuery.to_record

    def failing(self):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(data_module.MBEIRQuery, "to_record", failing)
    with pytest.raises(KeyboardInterrupt):
        mine_hard_negatives(tiny_encoder, train_set, output=out, top_k=5, c2_start=2, batch_size=16,
                            cache_dir=shared_cache)
    assert out.read_text() == "original\n"
    assert [p.name for p in tmp_path.iterdir()] == ["queries.jsonl"]


def test_pool_fingerprint_tracks_content(train_set: MBEIRDataset) -> None:
    first = next(iter(train_set.pool))
    changed = dict(train_set.pool)
    changed[first] = replace(changed[first], txt="something else", modality="text", img_path=None)
    assert pool_fingerprint(train_set) == pool_fingerprint(replace(train_set))
    assert pool_fingerprint(train_set) != pool_fingerprint(replace(train_set, pool=changed))
