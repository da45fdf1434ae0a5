"""The demo runs offline and prints a similarity matrix."""

from __future__ import annotations

from mmembed_rag.demo import main


def test_demo_prints_similarities(capsys, tiny_checkpoint):
    main(["--model", str(tiny_checkpoint)])
    out = capsys.readouterr().out
    assert "dim=64" in out
    assert "composed: square -> blue" in out
    assert len(out.strip().splitlines()) == 4
