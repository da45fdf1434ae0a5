"""Search latency beyond query encoding: ``MultimodalCollection.search_by_vector`` over a large collection.

``MultimodalCollection.search`` is ``encode_queries`` followed by ``search_by_vector`` (filter building,
``collection.query(query_embeddings=...)``, rebuilding items and scores); this benchmark times the second
part, which is everything the store adds to a query, with no model involved.

Collection: ``--n`` random unit vectors of dimension ``--dim`` (default 100,000 x 4096, MM-Embed's
dimension; quick 10,000), written straight into the Chroma collection a ``MultimodalCollection`` opened
(cosine space, Chroma's default HNSW settings), each with a short document and ``modality`` /
``image_uri`` metadata as ``add`` writes them (a third each text, image, image+text). Building it takes
long (HNSW insertion at 4096-d); ``--persist-dir`` keeps it for later runs, which then skip the build.

Timed over ``--queries`` random unit query vectors, after 10 warm-up queries, k = ``--k``:

1. raw ``collection.query(query_embeddings=[q], n_results=k, include=[...])``, as ``search_by_vector`` calls it;
2. ``search_by_vector(q, k)``: the search overhead. Goal p50 <= 20 ms;
3. ``search_by_vector(q, k, modality="image")`` (a metadata-filtered search in the one collection);
4. the per-modality layout (``--layouts``): the same records also written to one collection per modality, so a
   filtered search is a plain HNSW query of the modality's collection, and an unfiltered search over that layout
   alone would be three queries merged by score (what a collection-per-modality layout costs unfiltered queries).
   Keeping the one collection next to it (a shadow index per modality) keeps unfiltered queries at (2).

Usage: ``python benchmarks/search_overhead.py [--quick] [--n 100000] [--layouts] [--persist-dir DIR] [--json PATH]``
(a full run writes ``benchmarks/results/search_overhead.json`` unless ``--json`` names another file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, emit, goal, print_table, setup_logging  # noqa: E402

from mmembed_rag.modality import MODALITIES  # noqa: E402
from mmembed_rag.store import MultimodalCollection  # noqa: E402

logger = logging.getLogger("search_overhead")

RESULT = Path(__file__).resolve().parent / "results" / "search_overhead.json"

# Never loaded: search_by_vector needs no model; the name is only recorded with the collection.
MODEL = "nvidia/MM-Embed"


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def fill(col: MultimodalCollection, n: int, dim: int, progress: bool, seed: int = 0,
         by_modality: dict[str, Any] | None = None) -> float:
    """Write ``n`` records as ``add`` would lay them out (documents, modality, image_uri), also into the
    per-modality collections ``by_modality`` when given; returns seconds."""
    rng = np.random.default_rng(seed)
    chunk = min(col.client.get_max_batch_size(), 2000)
    start = time.perf_counter()
    done = min([col.count()] + [c.count() * 3 for c in (by_modality or {}).values()])
    done -= done % chunk
    with tqdm(total=n, initial=done, desc="building collection", unit="vec", disable=not progress) as bar:
        for first in range(0, n, chunk):
            ids = [f"v{i:07d}" for i in range(first, min(first + chunk, n))]
            vectors = unit_vectors(rng, len(ids), dim)  # drawn for every chunk: the same vectors on a re-run
            if first < done:
                continue
            modalities = [MODALITIES[int(i[1:]) % 3] for i in ids]
            metadatas = [{"modality": m} | ({"image_uri": f"/data/images/{i}.jpg"} if m != "text" else {})
                         for i, m in zip(ids, modalities)]
            documents = [None if m == "image" else f"caption of record {i}" for i, m in zip(ids, modalities)]
            col.collection.upsert(ids=ids, embeddings=vectors, documents=documents, metadatas=metadatas)
            for name, target in (by_modality or {}).items():
                keep = [j for j, m in enumerate(modalities) if m == name]
                target.upsert(ids=[ids[j] for j in keep], embeddings=vectors[keep],
                              documents=[documents[j] for j in keep], metadatas=[metadatas[j] for j in keep])
            bar.update(len(ids))
    return time.perf_counter() - start


def latencies(fn: Callable[[np.ndarray], Any], queries: np.ndarray, warmup: int = 10) -> np.ndarray:
    """Milliseconds per call, one call per query vector, after ``warmup`` untimed calls."""
    for q in queries[:warmup]:
        fn(q)
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        start = time.perf_counter()
        fn(q)
        out[i] = (time.perf_counter() - start) * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, help="stored vectors (default 100000, quick 10000)")
    parser.add_argument("--dim", type=int, default=4096, help="vector dimension (default 4096)")
    parser.add_argument("--queries", type=int, help="timed queries (default 300, quick 100)")
    parser.add_argument("-k", "--k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--persist-dir", type=Path, help="keep (and reuse) the built collection here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while building")
    parser.add_argument("--layouts", action="store_true", help="also build and time the per-modality layout")
    parser.add_argument("--collection", help="collection name in --persist-dir (default overhead-N-DIM); its first "
                                             "--n records are used (a build that was stopped can be measured)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    n = args.n or (10_000 if args.quick else 100_000)
    n_queries = args.queries or (100 if args.quick else 300)

    with tempfile.TemporaryDirectory(prefix="search-overhead-") as tmp:
        persist = args.persist_dir or Path(tmp)
        name = args.collection or f"overhead-{n}-{args.dim}"
        col = MultimodalCollection(MODEL, persist_dir=persist, collection=name, modality_index=False)
        by_modality = None
        if args.layouts:
            by_modality = {m: col.client.get_or_create_collection(
                f"{name}-{m.replace(',', '-')}", configuration={"hnsw": {"space": "cosine"}})
                for m in MODALITIES}
        existing = col.count()
        build_s = fill(col, n, args.dim, progress=not args.no_progress, by_modality=by_modality)
        if col.count() < n:
            raise RuntimeError(f"collection holds {col.count()} vectors, expected {n}")
        n = col.count()  # a stopped build may hold a chunk more than --n: that many are searched
        logger.info("collection of %d x %d ready (%d were already stored; built in %.0fs)", n, args.dim, existing,
                    build_s)
        queries = unit_vectors(np.random.default_rng(1), n_queries + 10, args.dim)
        include = ["documents", "metadatas", "distances", "uris"]
        raw = latencies(lambda q: col.collection.query(query_embeddings=[q], n_results=args.k, include=include),
                        queries)
        overhead = latencies(lambda q: col.search_by_vector(q, k=args.k), queries)
        filtered = latencies(lambda q: col.search_by_vector(q, k=args.k, modality="image"), queries)
        hits = col.search_by_vector(queries[0], k=args.k, modality="image")
        if len(hits) != args.k or any(h.metadata["modality"] != "image" for h in hits):
            raise RuntimeError("filtered search returned wrong results")
        layout: dict[str, np.ndarray] = {}
        recall = None
        if by_modality is not None:
            image = by_modality["image"]
            layout["per_modality_filtered"] = latencies(
                lambda q: image.query(query_embeddings=[q], n_results=args.k, include=include), queries)
            layout["per_modality_unfiltered"] = latencies(
                lambda q: sorted((d, i) for c in by_modality.values() for d, i in zip(
                    *(lambda r: (r["distances"][0], r["ids"][0]))(
                        c.query(query_embeddings=[q], n_results=args.k, include=include))))[: args.k], queries)
            same = {i for i in image.query(query_embeddings=[queries[0]], n_results=args.k)["ids"][0]}
            recall = len(same & {h.id for h in hits}) / args.k
            logger.info("per-modality collection vs filtered one-collection top-%d overlap: %.2f", args.k, recall)

    def stats(ms: np.ndarray) -> list[float]:
        return [float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), float(ms.mean())]

    rows = [["collection.query (raw Chroma)", *stats(raw)], ["search_by_vector", *stats(overhead)],
            ["search_by_vector, modality='image'", *stats(filtered)]]
    if layout:
        rows += [["per-modality layout: image collection query", *stats(layout["per_modality_filtered"])],
                 ["per-modality layout: 3 queries merged (unfiltered)", *stats(layout["per_modality_unfiltered"])]]
    print_table(["path", "p50 ms", "p95 ms", "mean ms"], rows)
    p50 = stats(overhead)[0]
    print(f"\nsearch overhead beyond encoding: p50 {p50:.2f} ms (goal <= 20), p95 {stats(overhead)[1]:.2f} ms; "
          f"{n} x {args.dim} vectors, k={args.k}, {n_queries} queries, {os.cpu_count()} CPUs, "
          f"1-min load average {os.getloadavg()[0]:.1f}")
    emit({
        "benchmark": "search_overhead", "date": date.today().isoformat(), "quick": args.quick, "n": n,
        "layouts": args.layouts,
        "dim": args.dim, "k": args.k, "queries": n_queries, "chromadb": chromadb.__version__,
        "cpus": os.cpu_count(), "build_s": round(build_s, 1), "reused_vectors": existing,
        "raw_query_ms": dict(zip(("p50", "p95", "mean"), map(lambda v: round(v, 3), stats(raw)))),
        "search_by_vector_ms": dict(zip(("p50", "p95", "mean"), map(lambda v: round(v, 3), stats(overhead)))),
        "filtered_search_ms": dict(zip(("p50", "p95", "mean"), map(lambda v: round(v, 3), stats(filtered)))),
        "search_overhead_p50_ms": goal(p50, 20.0, higher_is_better=False),
        "filtered_over_unfiltered_p50": round(stats(filtered)[0] / p50, 2),
        "per_modality_top_k_overlap_with_filtered": recall,
        **{f"{name}_ms": dict(zip(("p50", "p95", "mean"), (round(v, 3) for v in stats(ms))))
           for name, ms in layout.items()},
        **({"per_modality_filtered_p50_ms": goal(stats(layout["per_modality_filtered"])[0], 20.0, False)}
           if layout else {}),
    }, args.json if args.json is not None else (None if args.quick else RESULT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
