"""What ``index`` reads: a deterministic file list, and the items each file holds.

* images (``.png .jpg .jpeg .webp .gif .bmp .tif .tiff``): one image item per file;
* text and Markdown (``.txt .md .markdown``): passages cut at blank lines, short paragraphs merged and long
  ones split at word boundaries, up to ``max_chars`` characters each;
* JSON Lines (``.jsonl``): one item per line, ``{"text": ..., "image": ...}`` or M-BEIR candidate form
  ``{"txt": ..., "img_path": ..., "modality": ..., "did": ...}``; other scalar fields become metadata.

Hidden files and folders (``.git``...) are ignored; any other file is skipped and counted. Items are numbered
in a fixed order (sorted absolute paths, then position in the file), which is what sharding relies on. A folder
or file that cannot be read, a symlink loop or a dangling symlink is an error (exit status 2), never skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed_rag.errors import InvalidItemError
from mmembed_rag.items import MultimodalItem

from .common import UsageError

__all__ = ["IMAGE_SUFFIXES", "TEXT_SUFFIXES", "Entry", "Scan", "scan_paths", "iter_entries", "split_passages",
           "item_from_json", "file_kind", "read_text"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})
JSONL_SUFFIXES = frozenset({".jsonl"})
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# Keys of a JSON line that make the item; M-BEIR's "modality" is recomputed from the item itself.
_TEXT_KEYS = ("text", "txt")
_IMAGE_KEYS = ("image", "img", "img_path")
_DROPPED_KEYS = frozenset({"modality", "image_uri"})


@dataclass
class Scan:
    """Supported files in indexing order, and the unsupported ones that were skipped."""

    files: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Entry:
    """One item to index, its metadata (``source`` file, ``line`` or ``passage``) and its file's kind."""

    item: MultimodalItem
    metadata: dict[str, Any]
    kind: str


def file_kind(path: Path) -> str | None:
    """``"image"``, ``"text"``, ``"jsonl"``, or ``None`` for an unsupported file."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return "jsonl" if suffix in JSONL_SUFFIXES else None


def scan_paths(paths: Sequence[str]) -> Scan:
    """Walk files and folders (recursively) into a sorted, de-duplicated list of absolute file paths.

    Raises:
        UsageError: a path does not exist, is a symlink loop or dangling symlink, or a folder cannot be read.
    """
    found: set[Path] = set()
    skipped: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            if path.is_symlink():
                raise UsageError(f"{raw}: a symlink loop or a dangling symlink ({_resolve_error(path)})")
            raise UsageError(f"no such file or directory: {raw}")
        candidates = [path] if path.is_file() else _walk(path)
        for file in candidates:
            resolved = _resolve(file)
            (found if file_kind(resolved) else skipped).add(resolved)
    return Scan(files=sorted(found, key=str), skipped=sorted(skipped, key=str))


def _resolve(file: Path) -> Path:
    try:
        resolved = file.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # Python < 3.13 raises RuntimeError for a symlink loop
        raise UsageError(f"{file}: cannot be resolved: a symlink loop or a dangling symlink ({exc})") from exc
    if not resolved.is_file():
        raise UsageError(f"{file}: not a regular file")
    return resolved


def _resolve_error(path: Path) -> str:
    try:
        path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        return str(exc)
    return "unresolvable"


def _walk(folder: Path) -> Iterator[Path]:
    def unreadable(exc: OSError) -> None:
        raise UsageError(f"cannot read folder {exc.filename}: {exc.strerror or exc}") from exc

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def iter_entries(files: Sequence[Path], max_chars: int = 1000, image_root: Path | None = None) -> Iterator[Entry]:
    """Every item of ``files``, in order.

    Args:
        files: supported files, as :func:`scan_paths` lists them.
        max_chars: longest text passage; 0 keeps each text file whole.
        image_root: folder that relative image paths of JSON lines start from (default: the file's folder).

    Raises:
        UsageError: a file cannot be decoded or a JSON line is malformed (named as ``file:line``).
    """
    for path in files:
        kind = file_kind(path)
        source = str(path)
        if kind == "image":
            yield Entry(MultimodalItem(image=path), {"source": source}, kind)
        elif kind == "text":
            for number, passage in enumerate(split_passages(read_text(path), max_chars)):
                yield Entry(MultimodalItem(text=passage), {"source": source, "passage": number}, kind)
        elif kind == "jsonl":
            root = image_root if image_root is not None else path.parent
            for number, line in enumerate(read_text(path).splitlines(), start=1):
                if line.strip():
                    item, extra = item_from_json(line, f"{path}:{number}", root)
                    yield Entry(item, {**extra, "source": source, "line": number}, kind)


def read_text(path: Path) -> str:
    """A UTF-8 text file's content.

    Raises:
        UsageError: the file cannot be read or is not UTF-8 (naming it).
    """
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def split_passages(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at blank lines into passages of at most ``max_chars`` characters (0: one passage).

    Consecutive short paragraphs are joined (so a heading stays with its paragraph); a paragraph longer than
    ``max_chars`` is split at whitespace, and a single longer word is cut.
    """
    if max_chars <= 0:
        return [text.strip()] if text.strip() else []
    passages: list[str] = []
    current = ""
    for paragraph in _PARAGRAPH_BREAK.split(text):
        for piece in _cut(paragraph.strip(), max_chars):
            if current and len(current) + 2 + len(piece) <= max_chars:
                current += "\n\n" + piece
            else:
                if current:
                    passages.append(current)
                current = piece
    if current:
        passages.append(current)
    return passages


def _cut(paragraph: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    current = ""
    for word in paragraph.split():
        while len(word) > max_chars:  # no whitespace to split at
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:max_chars])
            word = word[max_chars:]
        if current and len(current) + 1 + len(word) > max_chars:
            pieces.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        pieces.append(current)
    if len(pieces) == 1 and len(paragraph) <= max_chars:
        return [paragraph]  # keep the paragraph's own line breaks when it fits
    return pieces


def item_from_json(line: str, where: str, image_root: Path) -> tuple[MultimodalItem, dict[str, Any]]:
    """Parse one JSON line into an item and the metadata its other scalar fields carry.

    Args:
        line: ``{"text"|"txt": ..., "image"|"img"|"img_path": ...}`` plus optional fields.
        where: ``file:line``, for messages.
        image_root: folder a relative image path starts from.

    Raises:
        UsageError: not a JSON object, both spellings of a field, an empty item, or a missing image file.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}")
    text = _one_of(record, _TEXT_KEYS, where)
    image = _one_of(record, _IMAGE_KEYS, where)
    if text is not None and not isinstance(text, str):
        raise UsageError(f"{where}: text must be a string, got {type(text).__name__}")
    if image is not None:
        image = _image_reference(image, where, image_root)
    try:
        item = MultimodalItem(text=text or None, image=image)
    except InvalidItemError as exc:
        raise UsageError(f"{where}: {exc}") from exc
    known = set(_TEXT_KEYS) | set(_IMAGE_KEYS) | _DROPPED_KEYS
    extra = {key: value for key, value in record.items()
             if key not in known and isinstance(value, (str, int, float, bool)) and value != ""}
    return item, extra


def _one_of(record: dict[str, Any], keys: Sequence[str], where: str) -> Any:
    present = [key for key in keys if record.get(key) not in (None, "")]
    if len(present) > 1:
        raise UsageError(f"{where}: both {present[0]!r} and {present[1]!r} are set; use one of them")
    return record[present[0]] if present else None


def _image_reference(image: Any, where: str, image_root: Path) -> str | Path:
    if not isinstance(image, str):
        raise UsageError(f"{where}: image must be a path or URL string, got {type(image).__name__}")
    if _URL.match(image):
        return image
    path = Path(image).expanduser()
    if not path.is_absolute():
        path = image_root / path
    if not path.is_file():
        raise UsageError(f"{where}: image file {path} does not exist (relative image paths start from "
                         f"{image_root}; see --image-root)")
    return path.resolve()
