"""Chroma ingest efficiency of ``MultimodalCollection.add``: does the store keep up with a fast encoder?

The encoder is replaced by a replay of precomputed vectors at a fixed rate (10, 50 and 200 items/s: a small GPU
to a large one for MM-Embed's 8B model): ``encode_documents`` sleeps ``1 / rate`` per item and returns the stored
4096-d unit vectors (MM-Embed's dimension) of those items. Everything else is the real store path: validation,
record building, the pipelined write (chunk k+1 encoded while chunk k is written), the snapshot reads behind the
all-or-nothing promise, HNSW insertion and SQLite in an embedded persistent Chroma database.

Measured side by side for each rate, on fresh collections, best of ``--rounds`` (the modes interleaved):

1. encode-only: the replay encoder over the same chunks (what the encoder alone takes);
2. ingest: ``MultimodalCollection.add(items)`` (pipelined). Goal: ingest rate / encode rate >= 0.90 at 50 items/s;
3. sequential: the same write path with encode and write back to back (``overlap=False``), for comparison.

Usage: ``python benchmarks/chroma_ingest.py [--quick] [--seconds 10] [--chunk-size 64] [--rounds 3] [--json PATH]``
(a full run writes ``benchmarks/results/chroma_ingest.json`` unless ``--json`` names another file).
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
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, emit, goal, print_table, setup_logging  # noqa: E402

from mmembed_rag.store import MultimodalCollection  # noqa: E402
from mmembed_rag.store.writer import stream_add  # noqa: E402

logger = logging.getLogger("chroma_ingest")

RESULT = Path(__file__).resolve().parent / "results" / "chroma_ingest.json"
RATES = (10, 50, 200)


class ReplayEncoder:
    """Stands in for the encoder: ``1 / rate`` seconds per item, then the precomputed vectors of those items."""

    def __init__(self, vectors: dict[str, np.ndarray], rate: float) -> None:
        self.vectors, self.rate = vectors, rate
        self.dim = len(next(iter(vectors.values())))
        self.busy = 0.0

    def encode_documents(self, items: list[Any], batch_size: int = 8, show_progress: bool | None = None) -> np.ndarray:
        started = time.perf_counter()
        deadline = started + len(items) / self.rate
        out = np.stack([self.vectors[item.text] for item in items])
        time.sleep(max(0.0, deadline - time.perf_counter()))
        self.busy += time.perf_counter() - started
        return out


def corpus(n: int, dim: int, seed: int = 0) -> tuple[list[str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    texts = [f"document {i}: {' '.join(rng.choice(['red', 'bus', 'tram', 'city', 'night'], 8))}" for i in range(n)]
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return texts, dict(zip(texts, vectors))


def _encode_only(texts: list[str], vectors: dict[str, np.ndarray], rate: float, chunk: int) -> float:
    from mmembed_rag.items import MultimodalItem

    encoder = ReplayEncoder(vectors, rate)
    items = [MultimodalItem(text=t) for t in texts]
    started = time.perf_counter()
    for start in range(0, len(items), chunk):
        encoder.encode_documents(items[start:start + chunk])
    return time.perf_counter() - started


def _ingest(client: Any, texts: list[str], vectors: dict[str, np.ndarray], rate: float, chunk: int,
            overlap: bool) -> tuple[float, float]:
    """Seconds for the whole call, and the part of it the encoder was not busy (the store's own cost)."""
    encoder = ReplayEncoder(vectors, rate)
    col = MultimodalCollection("replay/encoder", encoder=encoder, client=client, collection=f"b-{uuid.uuid4().hex}")
    started = time.perf_counter()
    if overlap:
        col.add(texts, chunk_size=chunk, show_progress=False)
    else:  # the same write path, encode and write back to back
        stream_add(col.collection, encoder, texts, None, None, chunk_size=min(chunk, col.max_batch_size),
                   batch_size=8, show_progress=False, overlap=False)
    elapsed = time.perf_counter() - started
    assert col.count() == len(texts)
    return elapsed, elapsed - encoder.busy


def measure(client: Any, texts: list[str], vectors: dict[str, np.ndarray], rate: float, chunk: int,
            rounds: int) -> dict[str, Any]:
    """Best of ``rounds`` for each mode, the modes interleaved so that load from other processes hits all three."""
    encode, ingest, sequential, store = [], [], [], []
    for _ in range(rounds):
        encode.append(_encode_only(texts, vectors, rate, chunk))
        total, _ = _ingest(client, texts, vectors, rate, chunk, overlap=True)
        ingest.append(total)
        total, outside = _ingest(client, texts, vectors, rate, chunk, overlap=False)
        sequential.append(total)
        store.append(outside)
    encode_s, ingest_s, sequential_s = min(encode), min(ingest), min(sequential)
    return {"rate": rate, "items": len(texts), "encode_s": round(encode_s, 3), "ingest_s": round(ingest_s, 3),
            "sequential_s": round(sequential_s, 3), "ratio": round(encode_s / ingest_s, 4),
            "sequential_ratio": round(encode_s / sequential_s, 4),
            "store_ms_per_item": round(min(store) / len(texts) * 1000, 3),
            "all_ingest_s": [round(x, 3) for x in ingest], "all_sequential_s": [round(x, 3) for x in sequential]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, help="encode time per rate (default 10, --quick 1)")
    parser.add_argument("--dim", type=int, help="vector dimension (default 4096, --quick 256)")
    parser.add_argument("--chunk-size", type=int, help="items per encode/write step (default 64, --quick 16)")
    parser.add_argument("--rounds", type=int, help="repetitions per rate, best kept (default 3, --quick 1)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("mmembed_rag").setLevel(logging.WARNING)
    seconds = args.seconds or (1.0 if args.quick else 10.0)
    args.chunk_size = args.chunk_size or (16 if args.quick else 64)
    dim = args.dim or (256 if args.quick else 4096)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        client = chromadb.PersistentClient(path=str(Path(tmp) / "db"))
        for rate in RATES:
            texts, vectors = corpus(max(args.chunk_size, int(rate * seconds)), dim, seed=rate)
            rows.append(measure(client, texts, vectors, rate, args.chunk_size, args.rounds or (1 if args.quick else 3)))
            logger.info("rate %d/s: %s", rate, rows[-1])
    print_table(["items/s", "items", "encode s", "ingest s", "ingest/encode", "sequential/encode", "store ms/item"],
                [[r["rate"], r["items"], r["encode_s"], r["ingest_s"], r["ratio"], r["sequential_ratio"],
                  r["store_ms_per_item"]] for r in rows])
    at_50 = next(r for r in rows if r["rate"] == 50)
    result = {"benchmark": "chroma_ingest", "quick": args.quick, "dim": dim, "chunk_size": args.chunk_size,
              "rounds": args.rounds or (1 if args.quick else 3),
              "seconds_per_rate": seconds, "rates": rows, "goal_at_50": goal(at_50["ratio"], 0.90, True)}
    emit(result, args.json if args.json is not None else (None if args.quick else RESULT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
