"""``make demo``: the MM-Embed method on a laptop CPU, modality bias and its cure side by side.

Generates the synthetic M-BEIR-format benchmark, trains a tiny model with the finetune recipe (stage 1 →
modality-aware mining → stage 2 → continual text stage; each step cached in the work directory), indexes
the test split's global pool into embedded Chroma once per model, and shows for the first test query of
every task (a fixed rule, never chosen by results) the top results of the stage-1 model (random negatives)
and of the final model. Writes ``demo.html`` (the main output), ``demo.png`` and ``demo.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..encoder import Encoder
from ..instructions import M_BEIR_TASKS
from . import rerank
from .report import Hit, ShownQuery, write_contact_sheet, write_html, write_json

logger = logging.getLogger(__name__)

K = 5
RULE = "the first test query of each task, in task-id order"


def default_models_dir() -> Path:
    """Where the demo's trained models are cached: ``$MMEMBED_RAG_DEMO_DIR``, else ``~/.cache/mmembed-rag/demo``."""
    return Path(os.environ.get("MMEMBED_RAG_DEMO_DIR") or Path.home() / ".cache" / "mmembed-rag" / "demo")


def train_demo(models_dir: Path | None = None, quick: bool = False, show_progress: bool = False):
    """Train (or reuse) the demo's models: the finetune pipeline's result and the reranker with its validation check.

    The notebooks load the same models. First run about 6 minutes on 2 CPU cores; later runs read the cache.

    Returns:
        ``(pipeline_result, reranker_dir, reranker_check)``.
    """
    from ..finetune.pipeline import run_pipeline

    root = (models_dir or default_models_dir()) / ("quick" if quick else "full")
    result = run_pipeline(root / "pipeline", show_progress=show_progress, **_settings(quick))
    final = Encoder.from_pretrained(result.final_model, device="cpu",
                                    max_length=result.stages["stage3"].args["max_length"])
    reranker_dir, check = rerank.prepare(root, result, final, quick, show_progress)
    return result, reranker_dir, check


def _settings(quick: bool) -> dict[str, Any]:
    """The pipeline's arguments: its tuned tiny-model defaults (as benchmarks/modality_bias.py), or a smoke run."""
    from ..finetune.pipeline import Benchmark

    if not quick:
        return {"benchmark": Benchmark()}
    stage = {"max_steps": 4, "batch_size": 8, "warmup_steps": 1}
    return {"benchmark": Benchmark(n_train=24, n_test=8, n_val=8), "stage1": stage, "stage2": stage, "stage3": stage}


def model_metrics(report) -> dict[str, float]:
    """Global pool, every test query: mean over tasks of Recall@5 and modality accuracy (and cross-modal only)."""
    from ..finetune.pipeline import CROSS_MODAL_TASKS

    rows = [r for r in report.tasks if r.pool == "global"]
    cross = [r for r in rows if r.task_id in CROSS_MODAL_TASKS]
    return {"recall@5": float(np.mean([r.recall[K] for r in rows])),
            "modality_accuracy": float(np.mean([r.modality_accuracy for r in rows])),
            "cross_modal_recall@5": float(np.mean([r.recall[K] for r in cross])),
            "cross_modal_modality_accuracy": float(np.mean([r.modality_accuracy for r in cross]))}


def shown_metrics(queries: Sequence[ShownQuery]) -> dict[str, dict[str, float]]:
    """Per model, over the shown queries: share with a relevant result in the top 5, share with top 1 in the wanted
    modality."""
    out: dict[str, dict[str, float]] = {}
    for model in queries[0].rows:
        out[model] = {"recall@5": float(np.mean([any(h.relevant for h in q.rows[model][:K]) for q in queries])),
                      "modality_accuracy": float(np.mean([q.rows[model][0].modality == q.target_modality
                                                          for q in queries]))}
    return out


def index_pool(encoder: Encoder, dataset, persist_dir: Path, name: str, show_progress: bool):
    """The test split's global pool in one embedded Chroma collection per model (ids are the candidate ids)."""
    from ..store import MultimodalCollection

    kb = MultimodalCollection(encoder=encoder, persist_dir=persist_dir, collection=name)
    dids = sorted(dataset.pool)
    if kb.count() != len(dids):
        kb.add([dataset.candidate_item(d) for d in dids], ids=dids, show_progress=show_progress)
    return kb


def retrieve(kb, dataset, query) -> list[Hit]:
    """The top ``K`` of the collection for one query, with modality and relevance."""
    item = dataset.query_item(query, instruction=dataset.instruction(query))
    positives = dataset.positives(query)
    return [Hit(hit.item, hit.id, hit.score, dataset.pool[hit.id].modality, hit.id in positives)
            for hit in kb.search(item.text, image=item.image, instruction=item.instruction, k=K)]


def _title(task_id: int, task: str, item) -> str:
    query, target = M_BEIR_TASKS[task_id]
    text = f" “{item.text}”" if item.text else ""
    return f"{task} ({query} → {target}):{text}{' + image' if item.image is not None else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmembed_rag.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo_output"),
                        help="outputs and the Chroma indexes (default: %(default)s)")
    parser.add_argument("--models", type=Path, default=None,
                        help="trained models' cache (default: $MMEMBED_RAG_DEMO_DIR or ~/.cache/mmembed-rag/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny data and a few steps: checks the plumbing")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..finetune.synthetic import load_benchmark
    from ..reranker import MLLMReranker

    started = time.perf_counter()
    show = not args.no_progress
    args.workdir.mkdir(parents=True, exist_ok=True)
    result, reranker_dir, check = train_demo(args.models, args.quick, show)
    test = load_benchmark(result.data_dir, "test")
    models = {"stage1": (result.stages["stage1"].model_dir, result.stages["stage1"]),
              "final": (result.final_model, result.stages["stage3"])}
    first = {}
    for query in test.queries:
        first.setdefault(query.task_id, query)
    picked = [first[t] for t in sorted(first)]
    rows: dict[str, list[list[Hit]]] = {}
    for name, (model_dir, stage) in models.items():
        encoder = Encoder.from_pretrained(model_dir, device="cpu", max_length=stage.args["max_length"])
        kb = index_pool(encoder, test, args.workdir / "chroma", f"{name}-{stage.key[:16]}", show)
        rows[name] = [retrieve(kb, test, q) for q in picked]
    reranker = MLLMReranker.from_pretrained(reranker_dir, device="cpu")
    for i, query in enumerate(picked):
        hits = rows["final"][i]
        scores = rerank.rerank_scores(reranker, test.query_item(query), [h.item for h in hits])
        hits = [replace(h, rerank=float(p)) for h, p in zip(hits, scores)]
        if check["helps"]:
            hits = [hits[j] for j in sorted(range(len(hits)), key=lambda j: (-scores[j], j))]
        rows["final"][i] = hits
    shown = []
    for i, query in enumerate(picked):
        item = test.query_item(query)
        shown.append(ShownQuery(query.task, _title(query.task_id, query.task, item), item, query.target_modality,
                                {name: rows[name][i] for name in models}))
    metrics = {name: model_metrics(stage.report) for name, (_, stage) in models.items()}
    on_shown = shown_metrics(shown)
    notes = [f"Metrics: global pool of {len(test.pool)} candidates (text, image and image+text), all "
             f"{len(test.queries)} test queries, mean over {len(set(test.tasks))} tasks (cross-modal: the five whose "
             f"query and candidate modalities differ). Shown: {RULE}.",
             "Over the shown queries: " + "; ".join(
                 f"{name} Recall@5 {m['recall@5']:.2f}, modality accuracy {m['modality_accuracy']:.2f}"
                 for name, m in on_shown.items()) + ".",
             f"Reranker (started from the final bi-encoder, fine-tuned on its mined negatives): Recall@1 "
             f"{check['reranker_recall@1']:.3f} over the bi-encoder's top {rerank.K} on the {check['queries']} "
             f"validation queries, vs the bi-encoder's {check['bi_encoder_recall@1']:.3f}: "
             + ("the final row is reordered by its P(True)." if check["helps"] else
                "it does not help, so its P(True) is shown but the final row keeps the bi-encoder's order.")]
    outputs = [write_html(shown, args.workdir / "demo.html", metrics, notes),
               write_contact_sheet(shown, args.workdir / "demo.png"),
               write_json(shown, args.workdir / "demo.json", metrics,
                          {"shown": on_shown, "rule": RULE, "reranker": check})]
    for q in shown:
        print(f"\n{q.title}  [wanted: {q.target_modality}]")
        for name, hits in q.rows.items():
            marks = " ".join(f"{'*' if h.relevant else '.'}{h.modality}" for h in hits)
            print(f"  {name:>6}: {marks}")
    for name, m in metrics.items():
        print(f"{name}: global Recall@5 {m['recall@5']:.3f}, modality accuracy {m['modality_accuracy']:.3f}")
    print(notes[-1])
    print(f"* = a relevant result\nwrote {', '.join(map(str, outputs))} in {time.perf_counter() - started:.0f} s")
    return 0
