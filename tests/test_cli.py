"""The ``mmembed-rag`` command line, run in-process through ``main([...])`` on tiny checkpoints.

One module-scoped corpus (images in nested folders, text, Markdown, JSON Lines in both spellings, an
unsupported and a hidden file) is indexed once; searches, reranking and errors run against it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed_rag import Encoder
from mmembed_rag.cli import delegate, main
from mmembed_rag.cli.sources import item_from_json, split_passages
from mmembed_rag.instructions import get_instruction

pytestmark = pytest.mark.both_families  # every test runs once per model family

GUIDE = ["Buses in London are red and have two decks, a design that dates back many decades.",
         "The underground railway opened in 1863 and is the oldest metro system of the world.",
         "Black cabs must pass a test of street knowledge that takes years to prepare for."]
EXPECTED_FILES = {"image": 3, "text": 2, "jsonl": 1}
EXPECTED_MODALITIES = {"text": 5, "image": 4, "image,text": 1}  # 1 + 3 passages + 1 JSON text; 3 + 1 images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    folder = root / "corpus"
    (folder / "photos" / "more").mkdir(parents=True)
    Image.new("RGB", (48, 40), (220, 20, 20)).save(folder / "photos" / "red.png")
    Image.new("RGB", (40, 48), (20, 160, 40)).save(folder / "photos" / "green.jpg")
    Image.new("RGB", (44, 44), (30, 40, 220)).save(folder / "photos" / "more" / "blue.webp")
    (folder / "notes.txt").write_text("A red square on the left.\n\nPhotosynthesis turns light into sugar.\n")
    (folder / "guide.md").write_text("\n\n".join(GUIDE) + "\n")
    assets = root / "assets"  # referenced by the JSON lines only, so not indexed twice
    assets.mkdir()
    Image.new("RGB", (36, 36), (240, 220, 30)).save(assets / "yellow.png")
    Image.new("RGB", (36, 30), (20, 20, 20)).save(assets / "black.png")
    lines = [{"text": "a caption without an image", "year": 2020},
             {"txt": "", "img_path": "../assets/yellow.png", "modality": "image", "did": "9:1"},
             {"text": "the same scene at night", "image": "../assets/black.png"}]
    (folder / "items.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    (folder / "report.pdf").write_bytes(b"%PDF-1.4")
    (folder / ".DS_Store").write_bytes(b"\0")
    return folder


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture, *argv: object) -> dict:
    code, out, err = run_cli(capsys, "--json", "--no-progress", *argv)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def indexed(corpus: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("db") / "chroma"
    code = main(["--model", str(tiny_checkpoint), "--no-progress", "index", str(corpus), "--persist-dir", str(db),
                 "--max-chars", "120"])
    assert code == 0
    return db


# ------------------------------------------------------------------------------------------------ index


def test_index_counts_skips_and_is_idempotent(corpus, tiny_checkpoint, tmp_path, capsys):
    db = tmp_path / "db"
    report = run_json(capsys, "--model", tiny_checkpoint, "index", corpus, "--persist-dir", db, "--max-chars", 120)
    assert report["files"] == EXPECTED_FILES and report["modalities"] == EXPECTED_MODALITIES
    assert report["items"] == report["distinct"] == report["count"] == 10
    assert report["skipped"] == 1 and report["skipped_files"] == [str((corpus / "report.pdf").resolve())]
    assert report["world_size"] == 1 and len(report["ranks"][0]["ids"]) == 10

    code, out, err = run_cli(capsys, "index", corpus, "--model", tiny_checkpoint, "--persist-dir", db,
                             "--max-chars", 120)  # global options after the command; progress bar on
    assert code == 0 and "indexing" in err
    assert "indexed 10 item(s)" in out and "skipped 1 unsupported file(s): report.pdf" in out
    assert "now holds 10 item(s)" in out  # a re-run upserts the same ids


def test_index_without_model_reuses_the_collections_model(indexed, corpus, capsys):
    db = indexed
    report = run_json(capsys, "index", corpus / "notes.txt", "--persist-dir", db, "--max-chars", 120)
    assert report["model"] == str(Path(report["model"]).resolve()) and report["count"] == 10


def test_text_files_become_passages_and_json_lines_keep_their_fields(tmp_path):
    text = "# Title\n\nshort one\n\n" + "x" * 25 + "\n\n" + " ".join(["word"] * 12)
    passages = split_passages(text, max_chars=20)
    assert all(len(p) <= 20 for p in passages)
    assert passages[0] == "# Title\n\nshort one"  # short paragraphs merge, a heading stays with its text
    assert "".join(passages[1:3]) == "x" * 25  # a word longer than the limit is cut
    assert split_passages(text, 0) == [text.strip()] and split_passages(" \n\n ", 50) == []
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    item, extra = item_from_json('{"txt": "", "img_path": "a.png", "modality": "image", "did": "1:2"}', "f:1",
                                 tmp_path)
    assert item.text is None and item.image == (tmp_path / "a.png").resolve() and extra == {"did": "1:2"}


# ----------------------------------------------------------------------------------------------- search


def _check_scores(results: list[dict], encoder: Encoder, query: dict, instruction: str | None) -> None:
    """The printed scores are the cosine similarities the encoder gives, best first."""
    docs = encoder.encode_documents([{"text": r["text"], "image": r["image"]} for r in results])
    expected = encoder.encode_queries([query], instruction=instruction) @ docs.T
    np.testing.assert_allclose([r["score"] for r in results], expected[0], atol=1e-4)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


def test_search_text_image_and_composed(indexed, tiny_encoder, corpus, capsys):
    db = indexed
    found = run_json(capsys, "search", "a red square", "--persist-dir", db, "--k", 4)
    assert len(found["results"]) == 4 and found["query"]["instruction"] is None
    _check_scores(found["results"], tiny_encoder, {"text": "a red square"}, None)

    red = corpus / "photos" / "red.png"
    found = run_json(capsys, "search", "--image", red, "--persist-dir", db, "--k", 3)
    assert found["query"] == {"text": None, "image": str(red.resolve()), "instruction": None}
    _check_scores(found["results"], tiny_encoder, {"image": red}, None)

    found = run_json(capsys, "search", "the same but blue", "--image", red, "--task", "cirr_it2i",
                     "--persist-dir", db, "--k", 3)
    assert found["query"]["instruction"] == get_instruction("cirr_it2i")
    _check_scores(found["results"], tiny_encoder, {"text": "the same but blue", "image": red},
                  get_instruction("cirr_it2i"))

    code, out, _ = run_cli(capsys, "search", "a bus", "--instruction", "Find a passage.", "--persist-dir", db,
                           "--k", 2)
    assert code == 0 and out.splitlines()[0].split()[:2] == ["#", "score"] and len(out.splitlines()) == 3


def test_search_modality_filter(indexed, capsys):
    db = indexed
    found = run_json(capsys, "search", "a bus", "--persist-dir", db, "--k", 20, "--modality", "image")
    assert [r["modality"] for r in found["results"]] == ["image"] * EXPECTED_MODALITIES["image"]
    found = run_json(capsys, "search", "a bus", "--persist-dir", db, "--k", 20, "--modality", "text",
                     "--modality", "image,text")
    assert sorted(r["modality"] for r in found["results"]) == ["image,text"] + ["text"] * 5
    by_text = {r["text"]: r for r in found["results"]}
    assert by_text["a caption without an image"]["metadata"]["year"] == 2020  # JSON fields become metadata
    assert by_text[GUIDE[0]]["metadata"]["source"].endswith("guide.md")


def test_search_rerank(indexed, reranker_dir, capsys):
    db = indexed
    plain = run_json(capsys, "search", "a red square", "--persist-dir", db, "--k", 4)
    found = run_json(capsys, "search", "a red square", "--persist-dir", db, "--k", 4, "--rerank",
                     "--reranker", reranker_dir, "--top-n", 2)
    assert found["reranker"] == str(reranker_dir) and len(found["results"]) == 2
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    retrieved = {r["id"]: r["score"] for r in plain["results"]}
    assert all(retrieved[r["id"]] == pytest.approx(r["retrieval_score"]) for r in found["results"])


def test_rerank_command(corpus, reranker_dir, tmp_path, capsys):
    red = corpus / "photos" / "red.png"
    found = run_json(capsys, "rerank", "--query", "a red square", red, "a green circle", "a red square",
                     "--reranker", reranker_dir)
    assert sorted(r["index"] for r in found["results"]) == [0, 1, 2]
    by_index = {r["index"]: r for r in found["results"]}
    assert by_index[0]["image"] == str(red.resolve()) and by_index[2]["text"] == "a red square"

    candidates = tmp_path / "candidates.jsonl"
    lines = [{"text": "a red square", "id": "c1"}, {"img_path": str(red), "id": "c2"}]
    candidates.write_text("\n".join(map(json.dumps, lines)))
    code, out, _ = run_cli(capsys, "rerank", "--query-image", red, "--candidates", candidates, "--top-n", 1,
                           "--reranker", reranker_dir, "--no-progress")
    assert code == 0 and len(out.splitlines()) == 2  # header + the best one


# ----------------------------------------------------------------------------------------------- errors


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_input_errors_are_one_line_with_status_2(indexed, corpus, tmp_path, tiny_checkpoint, capsys):
    db = indexed
    cases = [
        (["index", tmp_path / "missing", "--persist-dir", tmp_path / "a"], "no such file or directory"),
        (["--model", tmp_path / "no-model", "index", corpus, "--persist-dir", tmp_path / "b"],
         "no such checkpoint directory"),
        (["--model", tmp_path, "index", corpus, "--persist-dir", tmp_path / "c"], "no config.json"),
        (["search", "x", "--persist-dir", tmp_path / "none"], "no index at"),
        (["search", "x", "--persist-dir", db, "--collection", "other"], "no collection 'other'"),
        (["search", "x", "--persist-dir", db, "--task", "mscoco_t2"], "Did you mean 'mscoco_t2i'"),
        (["search", "--persist-dir", db], "search needs a query"),
        (["search", "x", "--image", tmp_path / "nope.png", "--persist-dir", db], "no such file"),
        (["search", "x", "--k", "0"], "argument --k: must be at least 1"),
        (["search", "x", "--persist-dir", db, "--top-n", "2"], "--top-n applies to reranked results"),
        (["search", "x", "--persist-dir", db, "--host", "h"], "exclude each other"),
        (["rerank", "--query", "x"], "rerank needs candidates"),
        (["bogus"], "invalid choice: 'bogus'"),
    ]
    for argv, expected in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and expected in _one_error_line(err), (argv, err)
    assert not (tmp_path / "b").exists()  # a bad --model fails before the database is created

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("fine")
    (bad / "lines.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "index", bad, "--persist-dir", tmp_path / "d")
    assert code == 2 and f"{bad / 'lines.jsonl'}:2: not valid JSON" in _one_error_line(err)
    assert not (tmp_path / "d").exists()  # validated before anything is written


def test_verbose_shows_the_traceback(corpus, tmp_path, capsys):
    code, _, err = run_cli(capsys, "-v", "--model", tmp_path / "no-model", "index", corpus,
                           "--persist-dir", tmp_path / "db")
    assert code == 2 and "Traceback" in err and "ModelNotFoundError" in err
    assert err.strip().splitlines()[-1].startswith("error: model ")


def test_several_processes_refuse_the_embedded_database(corpus, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "index", corpus, "--persist-dir", tmp_path / "db")
    assert code == 2 and "single writer" in _one_error_line(err) and "--host/--port" in err
    assert not (tmp_path / "db").exists()


def test_unavailable_finetune_module_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(delegate, "_FINETUNE_MODULE", "mmembed_rag.finetune.no_such_cli")
    code, _, err = run_cli(capsys, "train", "--help")
    assert code == 1 and "needs mmembed_rag.finetune.no_such_cli" in _one_error_line(err)


# ------------------------------------------------------------------------------------------------- help


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and out.startswith("usage: mmembed-rag")
    for command in ("index", "search", "rerank", "synth", "train", "mine", "eval", "export", "pipeline", "demo"):
        assert f"    {command}" in out


@pytest.mark.parametrize("command", ["index", "search", "rerank", "demo"])
def test_command_help(command, capsys):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "usage:" in out
    if command != "demo":
        assert f"usage: mmembed-rag {command}" in out and "--persist-dir" in out


@pytest.mark.skipif(importlib.util.find_spec("mmembed_rag.finetune.__main__") is None,
                    reason="mmembed_rag.finetune.__main__ is not written yet")
@pytest.mark.parametrize("command", sorted(delegate.FINETUNE_COMMANDS))
def test_finetune_command_help(command, capsys):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "usage:" in out
