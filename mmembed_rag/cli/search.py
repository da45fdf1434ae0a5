"""``mmembed-rag search``: text, image or composed (image + text) queries against a collection, optionally reranked."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from mmembed_rag.instructions import TASK_INSTRUCTIONS, get_instruction

from .common import (
    DEFAULT_RERANKER,
    MODALITIES,
    UsageError,
    emit_json,
    item_json,
    local_image,
    make_client,
    positive_int,
    print_ranked,
    require_collection,
    resolve_model,
    store_location,
)

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``search`` command."""
    parser = subparsers.add_parser(
        "search", parents=parents, help="search a collection with text, an image, or both",
        description="Retrieve the K items nearest to a text, image or composed (image + text) query.",
        epilog="Task names (--task): " + ", ".join(sorted(TASK_INSTRUCTIONS)))
    parser.add_argument("text", nargs="?", metavar="TEXT", help="query text (optional with --image)")
    parser.add_argument("--image", metavar="PATH", help="query image: alone, or composed with TEXT")
    instruction = parser.add_mutually_exclusive_group()
    instruction.add_argument("--instruction", metavar="TEXT", help="task instruction (free text or a task name)")
    instruction.add_argument("--task", metavar="NAME", help="use the M-BEIR instruction of this task, e.g. mscoco_t2i")
    parser.add_argument("--k", type=positive_int, default=10, help="number of results (default 10)")
    parser.add_argument("--modality", action="append", choices=MODALITIES,
                        help="only results of this modality; repeat for several")
    parser.add_argument("--rerank", action="store_true", help="rerank the K results with an MLLM reranker")
    parser.add_argument("--reranker", metavar="PATH",
                        help=f"reranker checkpoint (implies --rerank; default {DEFAULT_RERANKER})")
    parser.add_argument("--top-n", type=positive_int, metavar="N", help="keep the best N after reranking")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run one query; print the ranked results (or one JSON document with ``--json``)."""
    from mmembed_rag.items import MultimodalItem
    from mmembed_rag.store import MultimodalCollection

    if args.text is None and args.image is None:
        raise UsageError("search needs a query: TEXT, --image PATH, or both")
    image = None if args.image is None else local_image(args.image, "--image")
    instruction = get_instruction(args.task) if args.task else args.instruction
    rerank = args.rerank or args.reranker is not None
    if args.top_n is not None and not rerank:
        raise UsageError("--top-n applies to reranked results: add --rerank (or use --k)")
    location = store_location(args)
    client = make_client(location, must_exist=True)
    require_collection(client, args.collection, location)
    collection = MultimodalCollection(resolve_model(args.model, client, args.collection), client=client,
                                      collection=args.collection, device=args.device, dtype=args.dtype,
                                      allow_model_change=args.allow_model_change)
    hits = collection.search(args.text, image=image, instruction=instruction, k=args.k, modality=args.modality)
    rows = [{"rank": rank, "score": hit.score, **item_json(hit)} for rank, hit in enumerate(hits, start=1)]
    reranker = args.reranker or DEFAULT_RERANKER
    if rerank and hits:
        from mmembed_rag.reranker import MLLMReranker

        model = MLLMReranker.from_pretrained(reranker, device=args.device, dtype=args.dtype)
        query = MultimodalItem(text=args.text, image=image)
        ranked = model.rerank(query, [hit.item for hit in hits], top_n=args.top_n,
                              show_progress=False if args.no_progress else None)
        rows = [{"rank": rank, "score": r.score, "retrieval_score": hits[r.index].score, **item_json(hits[r.index])}
                for rank, r in enumerate(ranked, start=1)]
    if args.json:
        emit_json({"query": {"text": args.text, "image": image, "instruction": instruction},
                   "collection": args.collection, "model": collection.embedding_function.model, "k": args.k,
                   "modality": args.modality, "reranker": reranker if rerank else None, "results": rows})
    else:
        print_ranked(rows, extra="retrieval_score" if rerank else None)
    return 0
