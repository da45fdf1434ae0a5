"""M-BEIR and text-retrieval loading: validation problems with file and line, items, examples, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mmembed_rag.errors import MMEmbedError
from mmembed_rag.finetune.data import (
    ContrastiveDataset,
    DataError,
    MBEIRDataset,
    TextRetrievalData,
    load_instructions,
    read_jsonl,
    task_key,
    write_jsonl_atomic,
)
from mmembed_rag.finetune.examples import ContrastiveExample
from mmembed_rag.finetune.sampler import TaskBatchSampler
from mmembed_rag.instructions import instructions_for


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def query(n: int, txt: str | None = "a red circle", img: str | None = None, pos: tuple = ("9:1",),
          neg: tuple = (), task: int = 0, modality: str = "text", dataset: int = 9) -> dict:
    return {"qid": f"{dataset}:{n}", "query_txt": txt, "query_img_path": img, "query_modality": modality,
            "query_src_content": None, "pos_cand_list": list(pos), "neg_cand_list": list(neg), "task_id": task}


def cand(did: str, txt: str | None = None, img: str | None = None, modality: str = "image") -> dict:
    return {"did": did, "txt": txt, "img_path": img, "modality": modality, "src_content": None}


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "img" / f"{name}.png")
    return tmp_path


@pytest.fixture()
def pool_file(root: Path) -> Path:
    return write_jsonl(root / "pool.jsonl", [cand("9:1", img="img/a.png"), cand("9:2", img="img/b.png"),
                                             cand("9:3", txt="a red circle", modality="text"),
                                             cand("9:4", txt="a blue star", img="img/c.png", modality="image,text")])


def load(root: Path, queries: list, pool_file: Path, **kwargs) -> MBEIRDataset:
    return MBEIRDataset.load(write_jsonl(root / "queries.jsonl", queries), pool_file, image_root=root, **kwargs)


def test_load_valid_dataset_items_and_catalog_instructions(root: Path, pool_file: Path) -> None:
    data = load(root, [query(1), query(2, txt=None, img="img/c.png", modality="image", task=3, pos=("9:3",))],
                pool_file)
    assert [q.qid for q in data.queries] == ["9:1", "9:2"]
    assert data.tasks == ["mscoco_t2i", "mscoco_i2t"] == [task_key(9, 0), task_key(9, 3)]
    assert data.instructions[(9, 0)] == instructions_for(9, 0).variants
    item = data.query_item(data.queries[1])
    assert item.text is None and item.image == root / "img/c.png"
    assert item.instruction == instructions_for(9, 3).instruction
    both = data.candidate_item("9:4")
    assert both.text == "a blue star" and both.image == root / "img/c.png" and both.instruction is None
    assert data.local_pool("mscoco_t2i") == ("9:1", "9:2")
    assert data.positives(data.queries[0]) == {"9:1"}


def test_instruction_tsv_and_qrels(root: Path, pool_file: Path) -> None:
    tsv = root / "instr.tsv"
    tsv.write_text("dataset\tdataset_id\tquery_modality\tcand_modality\tprompt_1\tprompt_2\n"
                   "MSCOCO\t9\ttext\timage\tFind the shape.\tShow the shape.\n")
    qrels = root / "qrels.txt"
    qrels.write_text("9:1 0 9:2 1 0\n9:1 0 9:1 1 0\n")
    data = load(root, [query(1)], pool_file, instructions=tsv, qrels=qrels)
    assert data.instructions[(9, 0)] == ("Find the shape.", "Show the shape.")
    assert data.positives(data.queries[0]) == {"9:1", "9:2"}
    assert load_instructions(tsv) == {(9, 0): ("Find the shape.", "Show the shape.")}


@pytest.mark.parametrize(("records", "line", "message"), [
    ([query(1), query(2, neg=("9:99",))], 2, "query 9:2: unknown candidate id '9:99' in neg_cand_list"),
    ([query(1, modality="txt")], 1, "query 9:1: bad query_modality 'txt'"),
    ([query(1, txt=None, img="img/nope.png", modality="image", task=3, pos=("9:3",))], 1, "missing image file"),
    ([query(1), query(2, txt="  ", img=None)], 2, "query 9:2: empty, no text and no image"),
    ([query(1, pos=("9:42",))], 1, "query 9:1: positive '9:42' is not in the candidate pool"),
    ([query(1), "", query(3), '{"qid": "9:4", oops}'], 4, "malformed JSON"),
    ([query(1), "[1, 2]"], 2, "expected a JSON object, got list"),
    ([query(1, modality="image", txt=None, img="img/a.png")], 1, "does not match task 0 (text -> image)"),
    ([query(1, task=5)], 1, "task_id 5 is no M-BEIR task"),
    ([{**query(1), "qid": "one"}], 1, "qid must be 'datasetid:n', got 'one'"),
    ([query(1, pos=())], 1, "pos_cand_list is empty"),
    ([query(1, task=1, pos=("9:3",))], 1, "no instructions for dataset 9, task 1"),
    ([query(1), query(1)], 2, "duplicate qid '9:1' (first at "),
])
def test_query_validation_problems(root: Path, pool_file: Path, records: list, line: int, message: str) -> None:
    with pytest.raises(DataError) as err:
        load(root, records, pool_file)
    assert isinstance(err.value, MMEmbedError) and isinstance(err.value, ValueError)
    problem = err.value.problems[0]
    assert (problem.file, problem.line) == (str(root / "queries.jsonl"), line)
    assert message in problem.message
    assert f"queries.jsonl:{line}: " in str(err.value) and message in str(err.value)


@pytest.mark.parametrize(("record", "message"), [
    (cand("9:9", img="img/a.png", modality="picture"), "candidate 9:9: bad modality 'picture'"),
    (cand("9:9", img="img/missing.png"), "candidate 9:9: missing image file"),
    (cand("9:9", txt="caption", modality="image"), "modality 'image' but no image"),
    (cand("9:9"), "candidate 9:9: empty, no text and no image"),
    (cand("9:1", img="img/a.png"), "duplicate candidate id '9:1'"),
    ("not json", "malformed JSON"),
])
def test_pool_validation_problems(root: Path, pool_file: Path, record: dict | str, message: str) -> None:
    lines = pool_file.read_text().splitlines() + [record if isinstance(record, str) else json.dumps(record)]
    pool_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as err:
        load(root, [query(1)], pool_file)
    assert (err.value.problems[0].file, err.value.problems[0].line) == (str(pool_file), 5)


def test_problems_are_collected_up_to_the_limit(root: Path, pool_file: Path) -> None:
    records = [query(i, pos=(f"9:{100 + i}",)) for i in range(25)]
    with pytest.raises(DataError, match="25 problem") as err:
        load(root, records, pool_file)
    assert len(err.value.problems) == 20 and err.value.total == 25
    assert [p.line for p in err.value.problems] == list(range(1, 21))
    assert "showing the first 20" in str(err.value)
    with pytest.raises(DataError) as err:
        load(root, records, pool_file, max_problems=3)
    assert len(err.value.problems) == 3


def test_qrels_and_instruction_file_problems(root: Path, pool_file: Path) -> None:
    qrels = root / "qrels.txt"
    qrels.write_text("9:1 0 9:1 1 0\n9:1 0 9:77 1 0\nbroken line\n")
    with pytest.raises(DataError) as err:
        load(root, [query(1)], pool_file, qrels=qrels)
    assert [(p.line, p.message) for p in err.value.problems] == [
        (3, "expected 'qid 0 did relevance task_id', got 'broken line'"),
        (None, "query 9:1: unknown candidate id '9:77'")]
    tsv = root / "bad.tsv"
    tsv.write_text("dataset_id\tquery_modality\tcand_modality\tprompt_1\n9\ttext\tvideo\tFind it.\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: modalities 'text' -> 'video' are no M-BEIR task"):
        load_instructions(tsv)
    (root / "nocol.tsv").write_text("dataset_id\tprompt_1\n9\tx\n")
    with pytest.raises(DataError, match="missing column"):
        load_instructions(root / "nocol.tsv")


def test_read_jsonl_raises_on_first_malformed_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", ['{"a": 1}', "", "{bad"])
    with pytest.raises(DataError, match=r"x.jsonl:3: malformed JSON"):
        list(read_jsonl(path))


def test_examples_are_deterministic_and_rotate_per_epoch(root: Path, pool_file: Path) -> None:
    data = load(root, [query(1, neg=("9:2", "9:3", "9:4")), query(2, pos=("9:2",))], pool_file)
    first = data.example(0, seed=1, epoch=0, num_negatives=2)
    assert isinstance(first, ContrastiveExample) and first.task == "mscoco_t2i" and first.qid == "9:1"
    assert first.query.instruction in instructions_for(9, 0).variants
    assert first.positive.image == root / "img/a.png" and first.positive.instruction is None
    again = data.example(0, seed=1, epoch=0, num_negatives=2)
    assert repr(first) == repr(again)
    listed = {repr(data.candidate_item(d)) for d in ("9:2", "9:3", "9:4")}
    epochs = [data.example(0, seed=1, epoch=e, num_negatives=2) for e in range(8)]
    assert all(len(ex.negatives) == 2 and {repr(n) for n in ex.negatives} <= listed for ex in epochs)
    assert len({repr(ex.negatives) + repr(ex.query) for ex in epochs}) > 1  # rotates
    randoms = [data.example(1, epoch=e, num_negatives=3) for e in range(5)]  # no neg_cand_list: random pool
    positive = repr(data.candidate_item("9:2"))
    assert all(len(ex.negatives) == 3 and positive not in map(repr, ex.negatives) for ex in randoms)
    assert data.example(0, negatives="none").negatives == ()
    assert len(data.example(0, negatives="random", num_negatives=3).negatives) == 3
    assert data.example(1, negatives="listed").negatives == ()
    assert len(data.examples(seed=3)) == 2


def test_write_jsonl_atomic_leaves_original_on_failure(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"a": 1}])

    def records():
        yield {"b": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_jsonl_atomic(path, records())
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["q.jsonl"]
    write_jsonl_atomic(path, [{"c": 3}])
    assert path.read_text() == '{"c": 3}\n'


def test_text_retrieval_data(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"qid": "a", "query": "what is a star", "positives": ["A star has points."], "negatives": ["A circle."]},
        {"query": "what is a square", "positives": ["A square has four corners.", "Squares are boxy."]},
    ])
    data = TextRetrievalData.load(path, task="text:toy")
    assert [q.qid for q in data.queries] == ["a", "text:2"] and data.tasks == ["text:toy"] * 2
    ex = data.example(0, num_negatives=2)
    assert ex.task == "text:toy" and ex.positive.text == "A star has points."
    assert [n.text for n in ex.negatives] == ["A circle."] and ex.query.instruction == data.instructions[0]
    random_negs = data.example(1, num_negatives=5).negatives
    assert {n.text for n in random_negs} == {"A star has points.", "A circle."}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "positives": ["p"]}, {"query": "q2", "positives": []},
                                               {"query": "", "positives": ["p"]}, {"query": "q", "positives": "p"},
                                               "{nope"])
    with pytest.raises(DataError) as err:
        TextRetrievalData.load(bad)
    assert [(p.line, p.message) for p in err.value.problems] == [
        (2, "query text:2: no positives"), (3, "query text:3: empty query text"),
        (4, "query text:4: positives must be a list of non-empty strings"),
        (5, "malformed JSON (Expecting property name enclosed in double quotes at column 2)")]


def test_contrastive_dataset_with_task_sampler(root: Path, pool_file: Path, tmp_path: Path) -> None:
    mm = load(root, [query(i, pos=("9:1",)) for i in range(1, 5)], pool_file)
    text = TextRetrievalData.load(write_jsonl(tmp_path / "t.jsonl", [
        {"query": f"question {i}", "positives": [f"passage {i}"]} for i in range(6)]))
    dataset = ContrastiveDataset([mm, text], seed=0, num_negatives=1)
    assert len(dataset) == 10 and dataset.tasks == ["mscoco_t2i"] * 4 + ["text"] * 6
    assert dataset[5].qid == text.queries[1].qid
    with pytest.raises(IndexError):
        dataset[10]
    sampler = TaskBatchSampler(dataset.tasks, 2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=list)
    batches = list(loader)
    assert len(batches) == len(sampler) == 5
    assert all(len({ex.task for ex in batch}) == 1 for batch in batches)
    def drawn(epoch: int) -> list[str]:
        dataset.set_epoch(epoch)
        return [repr(dataset[i]) for i in range(len(dataset))]

    assert drawn(0) == drawn(0) != drawn(1)  # a pure function of (seed, epoch)
