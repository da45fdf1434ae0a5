"""The demo's visual report: an HTML page and a PNG contact sheet of each query and its top results."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..images import load_image
from ..items import MultimodalItem

__all__ = ["QueryResult", "write_html", "write_contact_sheet"]

THUMB = 96


@dataclass(frozen=True)
class QueryResult:
    """One demo query and its ranked results: ``(item, retrieval score, rerank score or None, relevant?)``."""

    title: str
    query: MultimodalItem
    results: Sequence[tuple[MultimodalItem, float, float | None, bool]]


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


def _cell(item: MultimodalItem, caption: str) -> str:
    thumb = _thumbnail(item)
    picture = f'<img src="{_data_uri(thumb)}" alt="">' if thumb is not None else ""
    text = f"<p>{html.escape(item.text)}</p>" if item.text else ""
    return f'<figure>{picture}{text}<figcaption>{html.escape(caption)}</figcaption></figure>'


def write_html(results: Sequence[QueryResult], path: Path, summary: str) -> Path:
    """Write a self-contained page (thumbnails inlined) with every query and its results."""
    rows = []
    for res in results:
        cells = [_cell(res.query, "query")]
        for rank, (item, score, rerank, relevant) in enumerate(res.results, 1):
            caption = f"#{rank} cos {score:.3f}" + (f" · P(True) {rerank:.2f}" if rerank is not None else "")
            cells.append(_cell(item, caption + (" ✓" if relevant else "")))
        rows.append(f"<h2>{html.escape(res.title)}</h2><div class=row>{''.join(cells)}</div>")
    style = ("body{font-family:sans-serif;margin:2em} .row{display:flex;gap:1em;flex-wrap:wrap}"
             "figure{width:140px;margin:0;border:1px solid #ddd;padding:6px} figure p{font-size:12px}"
             "figcaption{font-size:12px;color:#555}")
    page = (f"<!doctype html><meta charset=utf-8><title>mmembed-rag demo</title><style>{style}</style>"
            f"<h1>mmembed-rag demo</h1><p>{html.escape(summary)}</p>{''.join(rows)}")
    path.write_text(page, encoding="utf-8")
    return path


def write_contact_sheet(results: Sequence[QueryResult], path: Path) -> Path:
    """One row per query: the query, then its results; text-only items are drawn as wrapped text."""
    columns = 1 + max((len(r.results) for r in results), default=0)
    cell = THUMB + 24
    sheet = Image.new("RGB", (columns * cell, len(results) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for row, res in enumerate(results):
        entries = [(res.query, "query")] + [(item, f"#{i} {score:.2f}")
                                            for i, (item, score, _, _) in enumerate(res.results, 1)]
        for col, (item, label) in enumerate(entries):
            x, y = col * cell + 4, row * cell + 4
            thumb = _thumbnail(item)
            if thumb is not None:
                sheet.paste(thumb, (x, y))
            if item.text:
                words, lines = item.text.split(), [""]
                for word in words:
                    lines[-1:] = [lines[-1] + " " + word] if len(lines[-1]) + len(word) < 16 else [lines[-1], word]
                top = y + (THUMB // 2 if thumb is not None else 0)
                draw.multiline_text((x, top), "\n".join(s.strip() for s in lines[:5]), fill="black")
            draw.text((x, y + THUMB + 4), label, fill="gray")
    sheet.save(path)
    return path
