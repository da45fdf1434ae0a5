"""``mmembed-rag rerank``: order candidates (texts, image paths, or a JSON Lines file) for a query with an MLLM."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mmembed_rag.modality import modality

from .common import DEFAULT_RERANKER, UsageError, emit_json, local_image, positive_int, print_ranked
from .sources import IMAGE_SUFFIXES, item_from_json, read_text

__all__ = ["add_parser", "run", "candidate_item"]

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``rerank`` command."""
    parser = subparsers.add_parser(
        "rerank", parents=parents, help="rerank candidates for a query with an MLLM reranker",
        description="Score each candidate with P(\"True\") from a LLaVA-NeXT-family reranker and print them best "
                    "first. A candidate ending in an image suffix (.png, .jpg...) is an image path; any other "
                    "is text.")
    parser.add_argument("candidates", nargs="*", metavar="CANDIDATE", help="candidate text or image path")
    parser.add_argument("--query", metavar="TEXT", help="query text")
    parser.add_argument("--query-image", metavar="PATH", help="query image (alone or with --query)")
    parser.add_argument("--candidates", dest="candidates_file", type=Path, metavar="FILE.jsonl",
                        help='more candidates, one JSON object a line: {"text", "image"} or {"txt", "img_path"}')
    parser.add_argument("--reranker", metavar="PATH", default=DEFAULT_RERANKER,
                        help=f"reranker checkpoint (default {DEFAULT_RERANKER})")
    parser.add_argument("--top-n", type=positive_int, metavar="N", help="print the best N only")
    parser.add_argument("--template", metavar="NAME", help="prompt template (default: chosen per modality)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="candidates per forward pass")
    parser.set_defaults(run=run)


def candidate_item(text: str) -> Any:
    """A command-line candidate: an image when it names an image file, else text.

    Raises:
        UsageError: it looks like an image path (image suffix, no spaces) but the file does not exist.
    """
    from mmembed_rag.items import MultimodalItem

    if Path(text).suffix.lower() in IMAGE_SUFFIXES and not any(c.isspace() for c in text):
        return MultimodalItem(image=local_image(text, "candidate image"))
    return MultimodalItem(text=text)


def _read_candidates(path: Path) -> list[tuple[Any, dict[str, Any]]]:
    if not path.is_file():
        raise UsageError(f"--candidates {path}: no such file")
    lines = read_text(path).splitlines()
    return [item_from_json(line, f"{path}:{number}", path.parent)
            for number, line in enumerate(lines, start=1) if line.strip()]


def run(args: argparse.Namespace) -> int:
    """Rerank the candidates; print them best first (or one JSON document with ``--json``)."""
    from mmembed_rag.items import MultimodalItem
    from mmembed_rag.reranker import MLLMReranker

    if args.query is None and args.query_image is None:
        raise UsageError("rerank needs a query: --query TEXT, --query-image PATH, or both")
    image = None if args.query_image is None else local_image(args.query_image, "--query-image")
    query = MultimodalItem(text=args.query, image=image)
    candidates = [(candidate_item(text), {}) for text in args.candidates]
    if args.candidates_file is not None:
        candidates += _read_candidates(args.candidates_file)
    if not candidates:
        raise UsageError("rerank needs candidates: CANDIDATE... and/or --candidates FILE.jsonl")
    reranker = MLLMReranker.from_pretrained(args.reranker, device=args.device, dtype=args.dtype)
    ranked = reranker.rerank(query, [item for item, _ in candidates], top_n=args.top_n, batch_size=args.batch_size,
                             show_progress=False if args.no_progress else None, template=args.template)
    rows = []
    for rank, hit in enumerate(ranked, start=1):
        row = {"rank": rank, "index": hit.index, "score": hit.score, "modality": modality(hit.item),
               "text": hit.item.text, "image": None if hit.item.image is None else str(hit.item.image)}
        if candidates[hit.index][1]:
            row["metadata"] = candidates[hit.index][1]
        rows.append(row)
    if args.json:
        emit_json({"query": {"text": args.query, "image": image}, "reranker": args.reranker, "results": rows})
    else:
        print_ranked(rows)
    return 0
