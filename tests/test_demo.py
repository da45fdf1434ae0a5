"""The demo runs offline end to end (quick settings) and writes its report."""

from __future__ import annotations

from PIL import Image

from mmembed_rag.demo import main
from mmembed_rag.demo.report import QueryResult, write_contact_sheet, write_html
from mmembed_rag.items import MultimodalItem


def test_demo_end_to_end_quick(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "--quick", "--no-progress", "--k", "3"]) == 0
    out = capsys.readouterr().out
    for title in ("text → image", "image → text", "composed: image + edit → image"):
        assert title in out
    assert "mean Recall@5" in out and "modality accuracy" in out
    assert (tmp_path / "demo.html").read_text().count("<figure>") == 3 * 4
    assert Image.open(tmp_path / "demo.png").size[0] > 0
    # A second run reuses the trained model and the index.
    assert main(["--workdir", str(tmp_path), "--quick", "--no-progress", "--k", "3"]) == 0
    assert "training" not in capsys.readouterr().out


def test_report_escapes_user_text(tmp_path, image_file):
    item = MultimodalItem(text="<script>alert(1)</script>", image=str(image_file))
    results = [QueryResult("q <b>", item, [(MultimodalItem(text="a & b"), 0.5, None, True)])]
    page = write_html(results, tmp_path / "r.html", "summary").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "a &amp; b" in page
    assert Image.open(write_contact_sheet(results, tmp_path / "r.png")).size == (2 * 120, 120)
