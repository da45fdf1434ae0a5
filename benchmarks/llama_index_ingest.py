"""Ingest benchmark: our one-collection LlamaIndex path vs upstream ``MultiModalVectorStoreIndex``, both into Chroma.

Both paths use the same :class:`~mmembed_rag.integrations.llama_index.MMEmbedEmbedding` (same Encoder, same
``embed_batch_size``). Two measurements:

1. throughput: items/s ingesting ``--throughput-n`` mixed nodes (text + small images), median of ``--repeats``
   runs alternating between the paths;
2. capacity: the largest ingest each path survives, over ``--sizes`` text-only nodes (text-only so that one kind
   crosses Chroma's per-call limit, 5,461 for the embedded client); failures are recorded with their error type,
   the seconds spent before failing and what was left in the stores.

Usage::

    python benchmarks/llama_index_ingest.py --quick
    python benchmarks/llama_index_ingest.py --checkpoint /path/to/ckpt --sizes 1000 5461 5462 10000

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import chromadb
import torch
from llama_index.core import StorageContext
from llama_index.core.indices.multi_modal.base import MultiModalVectorStoreIndex
from llama_index.core.schema import BaseNode, ImageNode, TextNode
from llama_index.vector_stores.chroma import ChromaVectorStore
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from mmembed_rag import Encoder  # noqa: E402
from mmembed_rag.integrations.llama_index import MMEmbedEmbedding, build_index
from mmembed_rag.testing import make_tiny_checkpoint

logger = logging.getLogger("llama_index_ingest")

WORDS = "red green blue yellow square circle star ring left right top bottom small large".split()


def make_nodes(n: int, image_fraction: float, image_paths: list[str]) -> list[BaseNode]:
    """Cheap nodes: short captions and small images (image nodes carry file_path metadata, as readers set it)."""
    n_images = int(round(n * image_fraction))
    nodes: list[BaseNode] = [TextNode(text=f"{WORDS[i % 14]} {WORDS[(i // 14) % 14]} number {i}")
                             for i in range(n - n_images)]
    for i in range(n_images):
        path = image_paths[i % len(image_paths)]
        nodes.append(ImageNode(image_path=path, metadata={"file_path": path}))
    return nodes


def new_store(client: Any) -> ChromaVectorStore:
    return ChromaVectorStore(chroma_collection=client.create_collection(f"bench-{uuid.uuid4().hex}"))


def ingest(path: str, nodes: list[BaseNode], embed: MMEmbedEmbedding, client: Any) -> dict[str, Any]:
    """Ingest ``nodes`` by ``path`` ("ours" or "upstream"); return timing, outcome and store counts."""
    text_store, image_store = new_store(client), new_store(client)
    start = time.perf_counter()
    error = None
    try:
        if path == "ours":
            build_index(nodes, embed, text_store)
        else:
            context = StorageContext.from_defaults(vector_store=text_store, image_store=image_store)
            MultiModalVectorStoreIndex(nodes, storage_context=context, embed_model=embed, image_embed_model=embed)
    except Exception as exc:  # recorded, not hidden: the point is to find where each path breaks
        error = f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:160]}"
        logger.info("%s failed at %d nodes: %s", path, len(nodes), error)
    seconds = time.perf_counter() - start
    stored = text_store.client.count() + image_store.client.count()
    for store in (text_store, image_store):
        client.delete_collection(store.client.name)
    return {"path": path, "n": len(nodes), "ok": error is None, "seconds": round(seconds, 3),
            "items_per_s": round(len(nodes) / seconds, 1) if error is None else None,
            "stored_vectors": stored, "error": error}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time (runs alternate between paths, so machine load hits both alike)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "all_seconds": [r["seconds"] for r in runs]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a tiny random checkpoint)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--embed-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--throughput-n", type=int, default=2000)
    parser.add_argument("--image-fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3, help="alternating throughput runs per path (median kept)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5461, 5462, 10000])
    parser.add_argument("--quick", action="store_true", help="throughput on 256 nodes, capacity at 5,462 only")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result JSON (date, machine) to PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.throughput_n, args.sizes = 256, [5462]

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="mmembed-bench-"))
    checkpoint = args.checkpoint or make_tiny_checkpoint(workdir / "tiny", seed=0)
    encoder = Encoder.from_pretrained(checkpoint, device=args.device, dtype=args.dtype)
    embed = MMEmbedEmbedding(model_name=str(checkpoint), encoder=encoder, embed_batch_size=args.embed_batch_size)
    image_paths = []
    for i in range(8):
        image_paths.append(str(workdir / f"img{i}.png"))
        Image.new("RGB", (32, 32), (30 * i, 255 - 30 * i, 90)).save(image_paths[-1])
    client = chromadb.EphemeralClient()
    embed.get_text_embedding_batch(["warm up"] * 4)

    mixed = make_nodes(args.throughput_n, args.image_fraction, image_paths)
    runs = [ingest(path, mixed, embed, client) for _ in range(args.repeats) for path in ("ours", "upstream")]
    throughput = [median_run([r for r in runs if r["path"] == path]) for path in ("ours", "upstream")]
    capacity = [ingest(path, make_nodes(n, 0.0, image_paths), embed, client)
                for n in args.sizes for path in ("ours", "upstream")]

    ours, upstream = throughput
    ratio = ours["items_per_s"] / upstream["items_per_s"] if ours["ok"] and upstream["ok"] else None
    largest = {p: max([r["n"] for r in capacity if r["path"] == p and r["ok"]], default=None)
               for p in ("ours", "upstream")}
    print(f"{'run':<11}{'path':<10}{'nodes':>7}{'ok':>5}{'seconds':>9}{'items/s':>9}{'stored':>8}  error")
    for label, rows in (("throughput", throughput), ("capacity", capacity)):
        for r in rows:
            print(f"{label:<11}{r['path']:<10}{r['n']:>7}{'yes' if r['ok'] else 'NO':>5}{r['seconds']:>9.2f}"
                  f"{r['items_per_s'] or 0:>9.1f}{r['stored_vectors']:>8}  {r['error'] or ''}")
    summary = {"device": str(encoder.device), "dtype": str(encoder.dtype).removeprefix("torch."),
               "checkpoint": str(checkpoint),
               "torch_threads": torch.get_num_threads(), "embed_batch_size": args.embed_batch_size,
               "chroma_max_batch_size": client.get_max_batch_size(),
               "throughput_ratio_ours_over_upstream": round(ratio, 3) if ratio else None,
               "largest_ok": largest, "throughput": throughput, "capacity": capacity}
    emit(summary, args.json)
    return summary


if __name__ == "__main__":
    main()
