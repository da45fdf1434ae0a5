"""Chroma ingest efficiency: ``MultimodalCollection.add`` items/s over encode-only items/s on the same items.

Model: the ~100M-parameter random MM-Embed-format checkpoint of ``encode_pipeline.py`` (Mistral-style
decoder hidden 768, 8 layers; CLIP ViT hidden 384, 6 layers at 336 px), float32 on CPU, built with the
config helpers of ``_common.py``.

Corpus (deterministic, in a temporary directory): short texts, long texts, JPEG/PNG image files and
text+image items, shuffled. Images are passed as paths: decoding is part of both timings.

Measured, interleaved over ``--rounds`` rounds (best of each kept, after a warm-up):

1. encode-only: ``encoder.encode_documents(items, batch_size=B)``;
2. ingest: ``MultimodalCollection.add(items)`` into a fresh collection of an embedded persistent Chroma
   database (validation, encoding, HNSW insertion, SQLite log). Goal: ingest rate / encode rate >= 0.90.
   The part of each ingest spent outside the encoder is reported too: unlike the ratio, it does not
   swing with other processes' load on the encoder's CPU time.
3. context, no goal: Chroma's write rate for random 4096-d unit vectors (MM-Embed's dimension) upserted
   directly, i.e. what a collection of the released model pays per item on this machine's CPUs.

Usage: ``python benchmarks/chroma_ingest.py [--quick] [--batch-size 8] [--rounds 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_output_args,
    build_cpu_checkpoint,
    emit,
    goal,
    print_table,
    random_text,
    setup_logging,
    synthetic_image,
)

from mmembed_rag import Encoder  # noqa: E402
from mmembed_rag.items import MultimodalItem  # noqa: E402
from mmembed_rag.store import MultimodalCollection  # noqa: E402

logger = logging.getLogger("chroma_ingest")

# (short texts, long texts, images, text+image) items.
CORPUS = {"default": (40, 8, 8, 8), "quick": (6, 2, 2, 2)}
IMAGE_SIZES = [(640, 480), (1024, 768), (480, 640), (800, 800)]


def build_corpus(root: Path, counts: tuple[int, int, int, int], seed: int = 0) -> list[MultimodalItem]:
    """Deterministic mixed corpus; images are files referenced by path (as the store requires)."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    n_short, n_long, n_image, n_composed = counts
    paths = []
    for i in range(n_image + n_composed):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        path = root / f"img{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
        synthetic_image(np_rng, width, height).save(path)
        paths.append(str(path))
    items = [MultimodalItem(text=random_text(rng, rng.randint(3, 12))) for _ in range(n_short)]
    items += [MultimodalItem(text=random_text(rng, rng.randint(120, 260))) for _ in range(n_long)]
    items += [MultimodalItem(image=p) for p in paths[:n_image]]
    items += [MultimodalItem(text=random_text(rng, rng.randint(8, 40)), image=p) for p in paths[n_image:]]
    rng.shuffle(items)
    return items


def time_encode(encoder: Encoder, items: list[MultimodalItem], batch_size: int) -> float:
    start = time.perf_counter()
    encoder.encode_documents(items, batch_size=batch_size, show_progress=False)
    return time.perf_counter() - start


def time_ingest(client: Any, model: Path, encoder: Encoder, items: list[MultimodalItem],
                batch_size: int) -> tuple[float, float]:
    """(seconds for opening a fresh collection and ``add``, seconds of that spent inside the encoder)."""
    inside = []
    encode = encoder.encode_documents

    def timed_encode(*args: Any, **kwargs: Any) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            return encode(*args, **kwargs)
        finally:
            inside.append(time.perf_counter() - t0)

    encoder.encode_documents = timed_encode  # instance attribute: instrumentation only, removed below
    try:
        start = time.perf_counter()
        col = MultimodalCollection(str(model), encoder=encoder, client=client,
                                   collection=f"ingest-{uuid.uuid4().hex[:8]}", batch_size=batch_size)
        col.add(items, show_progress=False)
        elapsed = time.perf_counter() - start
    finally:
        del encoder.encode_documents
    if col.count() != len(items):
        raise RuntimeError(f"ingest wrote {col.count()} of {len(items)} items")
    return elapsed, sum(inside)


def write_rate_4096(client: Any, n: int, chunk: int = 1000) -> float:
    """Items/s for upserting ``n`` random 4096-d unit vectors (with documents and metadata) directly."""
    col = client.get_or_create_collection(f"write-{uuid.uuid4().hex[:8]}", embedding_function=None,
                                          configuration={"hnsw": {"space": "cosine"}})
    rng = np.random.default_rng(0)
    elapsed = 0.0
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        vectors = rng.standard_normal((size, 4096), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"v{i}" for i in range(start, start + size)]
        t0 = time.perf_counter()
        col.upsert(ids=ids, embeddings=vectors, documents=[f"doc {i}" for i in ids],
                   metadatas=[{"modality": "text"}] * size)
        elapsed += time.perf_counter() - t0
    return n / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="encode batch size (default 8)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 2, quick 1)")
    parser.add_argument("--write-probe", type=int, help="4096-d vectors for the write-rate probe "
                                                        "(default 2000, quick 300; 0 skips it)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 2)
    probe = args.write_probe if args.write_probe is not None else (300 if quick else 2000)

    with tempfile.TemporaryDirectory(prefix="chroma-ingest-") as tmp:
        root = Path(tmp)
        model = build_cpu_checkpoint(root)
        encoder = Encoder.from_pretrained(model, device="cpu", dtype="float32", max_length=1024)
        params = sum(p.numel() for p in encoder.model.parameters())
        items = build_corpus(root, CORPUS["quick" if quick else "default"])
        client = chromadb.PersistentClient(path=str(root / "db"))
        logger.info("model %.0fM parameters, dim %d; %d items; %d round(s)", params / 1e6, encoder.dim, len(items),
                    rounds)
        time_encode(encoder, items[:4], args.batch_size)  # warm-up: allocator, thread pools, first-call paths
        load_before = os.getloadavg()[0]
        encode_s, ingest_s, store_s = [], [], []
        for r in range(rounds):
            encode_s.append(time_encode(encoder, items, args.batch_size))
            total, inside = time_ingest(client, model, encoder, items, args.batch_size)
            ingest_s.append(total)
            store_s.append(total - inside)
            logger.info("round %d: encode %.2fs, ingest %.2fs (%.3fs outside the encoder)", r + 1, encode_s[-1],
                        total, store_s[-1])
        load_after = os.getloadavg()[0]
        encode_rate, ingest_rate = len(items) / min(encode_s), len(items) / min(ingest_s)
        ratio = ingest_rate / encode_rate
        write_rate = write_rate_4096(client, probe) if probe else float("nan")

    rows = [["encode only (encode_documents)", len(items), min(encode_s), encode_rate],
            ["ingest (MultimodalCollection.add)", len(items), min(ingest_s), ingest_rate],
            ["  of which outside the encoder", len(items), min(store_s), len(items) / min(store_s)]]
    print_table(["path", "items", "best s", "items/s"], rows)
    print(f"\ningest / encode = {ratio:.3f} (goal >= 0.90); store work outside the encoder "
          f"{1000 * min(store_s) / len(items):.2f} ms/item; Chroma write rate at 4096-d: {write_rate:.0f} items/s "
          f"({1000 / write_rate:.2f} ms/item); {torch.get_num_threads()} torch thread(s); "
          f"1-min load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} CPUs")
    emit({
        "benchmark": "chroma_ingest", "date": date.today().isoformat(), "quick": quick, "items": len(items),
        "rounds": rounds, "batch_size": args.batch_size, "model_params_m": round(params / 1e6, 1),
        "dim": encoder.dim, "torch_threads": torch.get_num_threads(), "chromadb": chromadb.__version__,
        "encode_items_per_s": round(encode_rate, 3), "ingest_items_per_s": round(ingest_rate, 3),
        "encode_s": [round(s, 3) for s in encode_s], "ingest_s": [round(s, 3) for s in ingest_s],
        "ingest_outside_encoder_s": [round(s, 4) for s in store_s],
        "load_average": [round(load_before, 2), round(load_after, 2)], "cpus": os.cpu_count(),
        "write_probe_4096d_items": probe, "write_4096d_items_per_s": round(write_rate, 1),
        "ingest_over_encode": goal(ratio, 0.90, higher_is_better=True),
    }, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
