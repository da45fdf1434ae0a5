"""``make demo``: the whole product offline on a laptop CPU.

Generates the synthetic M-BEIR-format benchmark, trains a small model with the finetune recipe
(stage 1 → modality-aware mining → stage 2 → continual text stage; cached in the work directory, so
later runs skip it), indexes the test pool into embedded Chroma, runs text→image, image→text and
composed queries with reranking, prints them with scores, writes an HTML page and a PNG contact sheet,
and prints global-pool Recall@5 and modality accuracy.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..encoder import Encoder
from ..results import RankedItem
from .report import QueryResult, write_contact_sheet, write_html

logger = logging.getLogger(__name__)

DEMO_TASKS = (("text → image", "mscoco_t2i"), ("image → text", "mscoco_i2t"),
              ("composed: image + edit → image", "cirr_it2i"))
# Small enough for a first run within minutes on 2 cores; the pipeline caches every stage. ``--quick``
# (the test suite) only checks the plumbing.
SETTINGS = {
    "full": {"n_train": 150, "n_test": 40, "steps": (250, 120, 40), "batch_size": 32},
    "quick": {"n_train": 24, "n_test": 8, "steps": (8, 4, 2), "batch_size": 8},
}


def train_model(workdir: Path, quick: bool, show_progress: bool):
    """Run (or reuse) the staged recipe on the generated benchmark; returns the pipeline result."""
    from ..finetune.pipeline import Benchmark, run_pipeline

    setting = SETTINGS["quick" if quick else "full"]
    stages = {f"stage{i}": {"max_steps": steps, "batch_size": setting["batch_size"]}
              for i, steps in enumerate(setting["steps"], 1)}
    benchmark = Benchmark(n_train=setting["n_train"], n_test=setting["n_test"])
    return run_pipeline(workdir / "pipeline", benchmark=benchmark, show_progress=show_progress, **stages)


def index_pool(encoder: Encoder, dataset, persist_dir: Path, show_progress: bool):
    """Index the test split's global pool into embedded Chroma once (ids are the candidate ids)."""
    from ..store import MultimodalCollection

    kb = MultimodalCollection(encoder=encoder, persist_dir=persist_dir, collection="demo")
    dids = sorted(dataset.pool)
    if kb.count() != len(dids):
        kb.add([dataset.candidate_item(d) for d in dids], ids=dids, show_progress=show_progress)
    return kb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmembed_rag.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo_output"),
                        help="cache and outputs (default: %(default)s)")
    parser.add_argument("--k", type=int, default=5, help="results per query")
    parser.add_argument("--quick", action="store_true", help="tiny data and a few steps: checks the plumbing")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..finetune.evaluate import evaluate_mbeir
    from ..finetune.synthetic import load_benchmark
    from ..reranker import MLLMReranker
    from ..testing import make_tiny_reranker

    started = time.perf_counter()
    show = not args.no_progress
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = train_model(args.workdir, args.quick, show)
    encoder = Encoder.from_pretrained(result.final_model, device="cpu")
    test = load_benchmark(result.data_dir, "test")
    kb = index_pool(encoder, test, args.workdir / "chroma", show)
    reranker_dir = args.workdir / "tiny-reranker"
    if not (reranker_dir / "config.json").is_file():
        make_tiny_reranker(reranker_dir, seed=0)
    reranker = MLLMReranker.from_pretrained(reranker_dir, device="cpu")

    shown: list[QueryResult] = []
    for title, task in DEMO_TASKS:
        query = next(q for q in test.queries if q.task == task)
        item = test.query_item(query)
        hits: list[RankedItem] = kb.search(item.text, image=item.image, instruction=item.instruction, k=args.k)
        rerank = reranker.score(item, [h.item for h in hits], show_progress=False)
        positives = test.positives(query)
        rows = [(h.item, h.score, float(r), h.id in positives) for h, r in zip(hits, rerank)]
        rows.sort(key=lambda row: -row[2])
        shown.append(QueryResult(f"{title} ({task}): {item.text or ''}".strip(), item, rows))
        print(f"\n{title} [{task}]  query: {item.text or ''}{'  + image' if item.image is not None else ''}")
        for rank, (cand, cos, p_true, relevant) in enumerate(rows, 1):
            what = cand.text or Path(str(cand.image)).name
            print(f"  {rank}. cos={cos:.3f}  P(True)={p_true:.2f}  {'*' if relevant else ' '} {what[:70]}")

    report = evaluate_mbeir(encoder, test, pools=("global",), cache_dir=args.workdir / "embedding-cache",
                            batch_size=32, show_progress=show)
    rows = [r for r in report.tasks if r.pool == "global"]
    recall = sum(r.headline for r in rows) / len(rows)
    modality = sum(r.modality_accuracy for r in rows) / len(rows)
    summary = (f"global pool ({len(test.pool)} candidates), {len(rows)} tasks: mean Recall@5 {recall:.3f}, "
               f"modality accuracy {modality:.3f}. Reranker: an untrained tiny LLaVA-NeXT (its P(True) shows the "
               "plumbing, not quality; benchmarks/rerank_quality.py trains one).")
    page = write_html(shown, args.workdir / "demo.html", summary)
    sheet = write_contact_sheet(shown, args.workdir / "demo.png")
    print(f"\n{summary}\n* = a relevant result\nwrote {page} and {sheet} in {time.perf_counter() - started:.0f} s")
    return 0
