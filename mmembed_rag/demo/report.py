"""The demo's outputs: a self-contained HTML page, a PNG contact sheet and a JSON of every figure shown.

Each shown query gets one row per model (stage 1, final): its top results, relevant ones outlined, so the
modality bias of stage 1 and its cure are visible side by side; the metric table comes first.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..images import load_image
from ..items import MultimodalItem

__all__ = ["Hit", "ShownQuery", "write_html", "write_contact_sheet", "write_json"]

THUMB = 96
MODEL_NAMES = {"stage1": "stage 1 (random negatives)", "final": "final (mined negatives + continual text)"}
METRIC_NAMES = {"recall@5": "Recall@5", "modality_accuracy": "modality accuracy",
                "cross_modal_recall@5": "Recall@5, cross-modal", "cross_modal_modality_accuracy":
                "modality accuracy, cross-modal"}


@dataclass(frozen=True)
class Hit:
    """One retrieved candidate as shown: its score, modality, relevance and (when reranked) P("True")."""

    item: MultimodalItem
    id: str
    score: float
    modality: str
    relevant: bool
    rerank: float | None = None


@dataclass(frozen=True)
class ShownQuery:
    """One demo query and, per model name, its top results in rank order."""

    task: str
    title: str
    query: MultimodalItem
    target_modality: str
    rows: Mapping[str, Sequence[Hit]]


def _thumbnail(item: MultimodalItem) -> Image.Image | None:
    if item.image is None:
        return None
    image = load_image(item.image).copy()
    image.thumbnail((THUMB, THUMB))
    return image


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(item: MultimodalItem, caption: str, css: str = "") -> str:
    thumb = _thumbnail(item)
    picture = f'<img src="{_data_uri(thumb)}" alt="">' if thumb is not None else ""
    text = f"<p>{html.escape(item.text)}</p>" if item.text else ""
    return f'<figure class="{css}">{picture}{text}<figcaption>{html.escape(caption)}</figcaption></figure>'


def _caption(rank: int, hit: Hit) -> str:
    caption = f"#{rank} cos {hit.score:.3f} · {hit.modality}"
    return caption + (f" · P(True) {hit.rerank:.2f}" if hit.rerank is not None else "")


def _metric_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    names = list(next(iter(metrics.values())))
    head = "".join(f"<th>{html.escape(METRIC_NAMES.get(n, n))}</th>" for n in names)
    rows = "".join(f"<tr><th>{html.escape(MODEL_NAMES.get(model, model))}</th>"
                   + "".join(f"<td>{values[n]:.3f}</td>" for n in names) + "</tr>" for model, values in metrics.items())
    return f"<table><tr><th></th>{head}</tr>{rows}</table>"


def write_html(queries: Sequence[ShownQuery], path: Path, metrics: Mapping[str, Mapping[str, float]],
               notes: Sequence[str]) -> Path:
    """Write one self-contained page (thumbnails inlined): metric table, notes, then per query a row per model."""
    blocks = []
    for shown in queries:
        rows = []
        for model, hits in shown.rows.items():
            cells = [_cell(h.item, _caption(rank, h), "relevant" if h.relevant else "")
                     for rank, h in enumerate(hits, 1)]
            rows.append(f"<div class=row><div class=label>{html.escape(MODEL_NAMES.get(model, model))}</div>"
                        f"{''.join(cells)}</div>")
        blocks.append(f"<h2>{html.escape(shown.title)}</h2><p class=target>wanted: {html.escape(shown.target_modality)}"
                      f"</p><div class=query>{_cell(shown.query, 'query')}</div>{''.join(rows)}")
    style = ("body{font-family:sans-serif;margin:2em} .row{display:flex;gap:.6em;align-items:flex-start;margin:.4em 0}"
             ".label{width:11em;font-size:13px;font-weight:bold} figure{width:120px;margin:0;border:3px solid #ddd;"
             "padding:4px} figure.relevant{border-color:#1a9c3a} figure p{font-size:11px;margin:2px 0}"
             "figcaption{font-size:11px;color:#555} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right} .target{color:#555;font-size:13px}")
    notes_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    page = (f"<!doctype html><meta charset=utf-8><title>mmembed-rag demo</title><style>{style}</style>"
            f"<h1>mmembed-rag demo: modality bias and its cure</h1>{_metric_table(metrics)}{notes_html}"
            f"<p>Green outline: a relevant result.</p>{''.join(blocks)}")
    path.write_text(page, encoding="utf-8")
    return path


def write_contact_sheet(queries: Sequence[ShownQuery], path: Path) -> Path:
    """Per query and model one row: the query, then its results (relevant ones framed green)."""
    lines = [(shown, model, hits) for shown in queries for model, hits in shown.rows.items()]
    columns = 1 + max((len(hits) for _, _, hits in lines), default=0)
    cell = THUMB + 24
    sheet = Image.new("RGB", (columns * cell, len(lines) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (shown, model, hits) in enumerate(lines):
        entries = [(shown.query, f"{model}: query", False)]
        entries += [(h.item, f"#{i} {h.score:.2f}", h.relevant) for i, h in enumerate(hits, 1)]
        for col, (item, label, relevant) in enumerate(entries):
            x, y = col * cell + 4, row * cell + 4
            if relevant:
                draw.rectangle((x - 3, y - 3, x + THUMB + 2, y + THUMB + 2), outline=(26, 156, 58), width=3)
            thumb = _thumbnail(item)
            if thumb is not None:
                sheet.paste(thumb, (x, y))
            if item.text:
                words, text_lines = item.text.split(), [""]
                for word in words:
                    text_lines[-1:] = [text_lines[-1] + " " + word] if len(text_lines[-1]) + len(word) < 16 \
                        else [text_lines[-1], word]
                top = y + (THUMB // 2 if thumb is not None else 0)
                draw.multiline_text((x, top), "\n".join(s.strip() for s in text_lines[:5]), fill="black")
            draw.text((x, y + THUMB + 4), label, fill="gray")
    sheet.save(path)
    return path


def write_json(queries: Sequence[ShownQuery], path: Path, metrics: Mapping[str, Mapping[str, float]],
               extra: Mapping[str, Any]) -> Path:
    """``{"models": metrics, "queries": [{"task", "results": {model: [{rank, score, modality, relevant}]}}], ...}``."""
    def hit(rank: int, h: Hit) -> dict[str, Any]:
        record = {k: v for k, v in asdict(h).items() if k != "item"}
        return {"rank": rank, **record}

    payload = {"models": metrics, **extra, "queries": [
        {"task": q.task, "title": q.title, "target_modality": q.target_modality,
         "query": {"text": q.query.text, "image": None if q.query.image is None else str(q.query.image)},
         "results": {model: [hit(rank, h) for rank, h in enumerate(hits, 1)] for model, hits in q.rows.items()}}
        for q in queries]}
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return path
