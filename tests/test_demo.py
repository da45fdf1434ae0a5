"""The demo runs offline end to end (quick settings) and writes its report: page, contact sheet and figures."""

from __future__ import annotations

import json

from PIL import Image

from mmembed_rag.demo import main
from mmembed_rag.demo.report import Hit, ShownQuery, write_contact_sheet, write_html, write_json
from mmembed_rag.items import MultimodalItem

MODELS = ("stage1", "final")


def test_demo_end_to_end_quick(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "--models", str(tmp_path / "models"), "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "global Recall@5" in out and "modality accuracy" in out and "Reranker" in out
    figures = json.loads((tmp_path / "demo.json").read_text())
    assert set(figures["models"]) == set(MODELS)
    for metrics in figures["models"].values():
        assert 0.0 <= metrics["recall@5"] <= 1.0 and 0.0 <= metrics["modality_accuracy"] <= 1.0
    # The fixed rule: the first test query of each of the eight tasks, each with a top 5 per model.
    assert [q["task"] for q in figures["queries"]] == ["mscoco_t2i", "webqa_t2t", "webqa_t2it", "mscoco_i2t",
                                                       "nights_i2i", "infoseek_it2t", "cirr_it2i", "infoseek_it2it"]
    for query in figures["queries"]:
        for model in MODELS:
            results = query["results"][model]
            assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
            assert all({"score", "modality", "relevant"} <= set(r) for r in results)
            if model == "final":
                assert all(r["rerank"] is not None for r in results)
        if not figures["reranker"]["helps"]:  # shown, not reordered
            scores = [r["score"] for r in query["results"]["final"]]
            assert scores == sorted(scores, reverse=True)
    check = figures["reranker"]
    assert check["split"] == "val" and check["queries"] > 0
    page = (tmp_path / "demo.html").read_text()
    assert page.count("<figure") == 8 * (1 + 2 * 5) and "<table>" in page
    assert Image.open(tmp_path / "demo.png").size[1] == 8 * 2 * 120
    # A second run reuses the trained models, the reranker and the indexes.
    assert main(["--workdir", str(tmp_path), "--models", str(tmp_path / "models"), "--quick", "--no-progress"]) == 0
    assert "training" not in capsys.readouterr().out


def test_report_escapes_user_text_and_outlines_relevant_results(tmp_path, image_file):
    item = MultimodalItem(text="<script>alert(1)</script>", image=str(image_file))
    hits = [Hit(MultimodalItem(text="a & b"), "c1", 0.5, "text", True), Hit(MultimodalItem(text="x"), "c2", 0.4,
                                                                             "text", False)]
    shown = [ShownQuery("t2t", "q <b>", item, "text", {"stage1": hits, "final": hits[::-1]})]
    metrics = {"stage1": {"recall@5": 0.5}, "final": {"recall@5": 0.75}}
    page = write_html(shown, tmp_path / "r.html", metrics, ["note <i>"]).read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "a &amp; b" in page and "note &lt;i&gt;" in page
    assert page.count('class="relevant"') == 2
    assert Image.open(write_contact_sheet(shown, tmp_path / "r.png")).size == (3 * 120, 2 * 120)
    figures = json.loads(write_json(shown, tmp_path / "r.json", metrics, {"rule": "r"}).read_text())
    assert figures["queries"][0]["results"]["final"][0] == {"rank": 1, "id": "c2", "score": 0.4, "modality": "text",
                                                             "relevant": False, "rerank": None}
