"""The procedural M-BEIR benchmark: determinism, sizes, coverage of every task, the modality-bias setup."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmembed_rag.finetune.data import MBEIRDataset, read_jsonl
from mmembed_rag.finetune.synthetic import ALL_SHAPES, generate_benchmark, load_benchmark, load_text_benchmark, render
from mmembed_rag.instructions import M_BEIR_TASKS

N_TRAIN, N_TEST = 6, 4


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    generate_benchmark(root, seed=3, n_train=N_TRAIN, n_test=N_TEST, image_size=48)
    return root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(bench: Path, tmp_path: Path) -> None:
    generate_benchmark(tmp_path / "same", seed=3, n_train=N_TRAIN, n_test=N_TEST, image_size=48)
    assert digest(tmp_path / "same") == digest(bench)
    generate_benchmark(tmp_path / "other", seed=4, n_train=N_TRAIN, n_test=N_TEST, image_size=48)
    other = digest(tmp_path / "other")
    assert other.keys() == digest(bench).keys() and other != digest(bench)


def test_manifest_sizes_and_all_task_types(bench: Path) -> None:
    manifest = json.loads((bench / "manifest.json").read_text())
    assert {task["task_id"] for task in manifest["tasks"].values()} == set(M_BEIR_TASKS) == {0, 1, 2, 3, 4, 6, 7, 8}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        data = load_benchmark(bench, split)  # passes validation: ids, modalities, images, instructions
        counts = Counter(q.task_id for q in data.queries)
        assert counts == {task: n for task in M_BEIR_TASKS}
        assert manifest["splits"][split]["n_queries"] == len(data.queries) == 8 * n
        assert manifest["splits"][split]["n_candidates"] == len(data.pool)
        for key, task in manifest["tasks"].items():
            files = task[split]
            assert sum(1 for _ in read_jsonl(bench / files["queries"])) == files["n_queries"] == n
            local = data.local_pool(key)
            assert len(local) == files["n_candidates"] >= n
            assert all(q.pos_cand_list[0] in local for q in data.queries if q.task == key)
            modalities = {data.pool[did].modality for did in local}
            assert modalities == {M_BEIR_TASKS[task["task_id"]][1]}
            assert {q.query_modality for q in data.queries if q.task == key} == {M_BEIR_TASKS[task["task_id"]][0]}
        assert len(data.instructions[(9, 0)]) == 3 and data.instructions[(9, 0)][0].startswith("Find the picture")
    with Image.open(bench / data.pool[data.queries[0].pos_cand_list[0]].img_path) as img:
        assert img.size == (48, 48)


def test_global_pool_mixes_modalities_and_holds_the_captions(bench: Path) -> None:
    data = load_benchmark(bench, "test")
    assert {c.modality for c in data.pool.values()} == {"text", "image", "image,text"}
    texts = {c.txt for c in data.pool.values() if c.modality == "text"}
    t2i = [q for q in data.queries if q.task_id == 0]
    assert t2i and all(q.query_txt in texts for q in t2i)  # the captions themselves are TEXT candidates
    positives = [q.pos_cand_list[0] for q in data.queries]
    assert len(positives) == len(set(positives))


def test_one_right_answer_per_query(bench: Path) -> None:
    data = load_benchmark(bench, "train")
    for key in set(data.tasks):
        attrs = [data.pool[did].src_content for did in data.local_pool(key) if data.pool[did].modality == "image"]
        assert len(attrs) == len(set(attrs))  # no two images of a local pool share every attribute
    edits = [q for q in data.queries if q.task_id == 7]
    assert all(json.loads(q.query_src_content) != json.loads(data.pool[q.pos_cand_list[0]].src_content)
               for q in edits)


def test_text_set(bench: Path) -> None:
    text, corpus = load_text_benchmark(bench, "test")
    assert len(text.queries) == N_TEST and set(corpus.values()) >= {p for q in text.queries for p in q.positives}
    assert all(q.negatives and not set(q.negatives) & set(q.positives) for q in text.queries)
    train, _ = load_text_benchmark(bench, "train")
    assert len(train.queries) == N_TRAIN


def test_render_draws_every_shape() -> None:
    rng = random.Random(0)
    for shape in {s.shape: s for s in ALL_SHAPES}.values():
        img = render(shape, rng, 32)
        colours = img.getcolors(32 * 32)
        assert img.size == (32, 32) and colours is not None and len(colours) > 1


def test_too_many_queries_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct shapes"):
        generate_benchmark(tmp_path, n_train=5000, n_test=1)


def test_loaded_dataset_type(bench: Path) -> None:
    assert isinstance(load_benchmark(bench, "test", check_images=False), MBEIRDataset)


def test_validation_split_is_separate_and_leaves_train_and_test_unchanged(tmp_path: Path) -> None:
    with_val = generate_benchmark(tmp_path / "a", n_train=6, n_test=4, n_val=3)
    without = generate_benchmark(tmp_path / "b", n_train=6, n_test=4, n_val=0)
    assert set(with_val["splits"]) == {"train", "val", "test"} and set(without["splits"]) == {"train", "test"}
    for split in ("train", "test"):
        for key in ("queries", "global_pool", "qrels"):
            name = with_val["splits"][split][key]
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), (split, key)
    val, test = load_benchmark(tmp_path / "a", "val"), load_benchmark(tmp_path / "a", "test")
    assert len(val.queries) == 3 * len(set(val.tasks)) and set(val.tasks) == set(test.tasks)
    captions = {c.txt for c in val.pool.values() if c.txt} & {c.txt for c in test.pool.values() if c.txt}
    assert len(captions) < len({c.txt for c in val.pool.values() if c.txt})  # drawn apart, not a copy of test
