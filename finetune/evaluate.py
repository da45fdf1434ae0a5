"""Retrieval evaluation: M-BEIR Recall@k (hit rate) on local and global pools, modality accuracy, nDCG@10.

* Recall@k is M-BEIR's hit rate: 1 for a query when any positive is in its top k. The headline k is 5,
  and 10 for Fashion200K (dataset 1) and FashionIQ (dataset 7); other ks can be asked for.
* Modality accuracy: the share of queries whose top-1 result has the modality the task asks for
  (``M_BEIR_TASKS[task_id][1]``); on the global pool it measures modality bias.
* nDCG@10 for text-to-text retrieval, computed by ``ir_measures`` (pytrec_eval).

Queries are encoded with their task's first instruction, the pool as documents (once; cached by content
hash when ``cache_dir`` is given), and ranked with the chunked :func:`~mmembed_rag.finetune.search.top_k_search`
that mining uses too. Under ``torchrun`` / ``accelerate launch`` each process encodes a share of the pool and
queries (:mod:`~mmembed_rag.finetune.parallel`) and computes the whole report, the same on every rank.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from mmembed_rag.encoder import Encoder
from mmembed_rag.errors import MissingDependencyError
from mmembed_rag.instructions import M_BEIR_DATASETS
from mmembed_rag.items import MultimodalItem

from .data import MBEIRDataset, TextRetrievalData
from .mining import encode_pool
from .parallel import encode_documents, encode_queries, is_main_process
from .search import top_k_search

__all__ = ["EvaluationReport", "TaskResult", "default_k", "evaluate", "evaluate_mbeir", "evaluate_text",
           "hit_rate", "modality_accuracy", "ndcg_at_k"]

logger = logging.getLogger(__name__)

RECALL_AT_10_DATASETS = frozenset({1, 7})  # Fashion200K and FashionIQ


def default_k(dataset_id: int) -> int:
    """M-BEIR's headline k: 10 for Fashion200K and FashionIQ, else 5."""
    return 10 if dataset_id in RECALL_AT_10_DATASETS else 5


def hit_rate(rankings: Sequence[Sequence[str]], positives: Sequence[Collection[str]], k: int) -> float:
    """Share of queries with at least one positive in their top ``k`` (M-BEIR's Recall@k)."""
    if len(rankings) != len(positives):
        raise ValueError(f"{len(rankings)} rankings but {len(positives)} positive sets")
    if not rankings:
        return float("nan")
    return sum(any(did in pos for did in ranking[:k]) for ranking, pos in zip(rankings, positives, strict=True)) \
        / len(rankings)


def modality_accuracy(top1_modalities: Sequence[str], target_modality: str) -> float:
    """Share of top-1 results whose modality is ``target_modality``."""
    if not top1_modalities:
        return float("nan")
    return sum(m == target_modality for m in top1_modalities) / len(top1_modalities)


def ndcg_at_k(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], k: int = 10) -> float:
    """Mean nDCG@k over the queries of ``qrels`` (via ``ir_measures``; graded relevance uses trec_eval's linear gain).

    Args:
        run: qid -> {doc id: score}.
        qrels: qid -> {doc id: relevance}.
        k: cut-off.

    Raises:
        MissingDependencyError: ``ir_measures`` is not installed.
    """
    try:
        import ir_measures
    except ImportError as exc:
        raise MissingDependencyError('nDCG needs ir_measures: pip install "mmembed-rag[finetune]"') from exc
    measure = ir_measures.nDCG @ k
    # Queries without a run entry would be skipped by pytrec_eval; give them an empty ranking (score 0).
    run = {qid: dict(run.get(qid, {})) or {"__none__": 0.0} for qid in qrels}
    return float(ir_measures.calc_aggregate([measure], qrels, run)[measure])


@dataclass
class TaskResult:
    """Metrics of one M-BEIR (dataset, task) pair on one pool.

    Attributes:
        task: task key (``"mscoco_t2i"``).
        dataset_id, task_id: the M-BEIR pair.
        pool: ``"local"`` or ``"global"``.
        num_queries: queries evaluated.
        recall: k -> hit rate.
        k: the headline k (:func:`default_k`).
        modality_accuracy: share of top-1 results in the task's target modality.
    """

    task: str
    dataset_id: int
    task_id: int
    pool: str
    num_queries: int
    recall: dict[int, float]
    k: int
    modality_accuracy: float

    @property
    def headline(self) -> float:
        """Recall at the headline k."""
        return self.recall[self.k]


@dataclass
class EvaluationReport:
    """All results of one evaluation.

    Attributes:
        tasks: one :class:`TaskResult` per (task, pool).
        text: text retrieval metrics (``{"ndcg@10": ..., "num_queries": ...}``), empty when not run.
    """

    tasks: list[TaskResult] = field(default_factory=list)
    text: dict[str, float] = field(default_factory=dict)

    def average(self, pool: str = "local") -> float:
        """Mean headline recall over the tasks evaluated on ``pool`` (M-BEIR's average)."""
        values = [r.headline for r in self.tasks if r.pool == pool]
        return float(np.mean(values)) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        tasks = [{**asdict(r), "recall": {str(k): v for k, v in r.recall.items()}} for r in self.tasks]
        averages = {pool: self.average(pool) for pool in sorted({r.pool for r in self.tasks})}
        return {"tasks": tasks, "average": averages, "text": dict(self.text)}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as JSON (NaN for metrics without queries), also written to ``path`` when given.

        Under a process group only rank 0 writes (every rank holds the same report); it joins no collective,
        so rank 0 may call it alone.
        """
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None and is_main_process():
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    def to_markdown(self) -> str:
        """A Markdown table: one row per task and pool, one column per k, then modality accuracy."""
        ks = sorted({k for r in self.tasks for k in r.recall})
        head = ["task", "dataset", "task id", "pool", "queries", *(f"R@{k}" for k in ks), "modality acc."]
        rows = [head, ["---"] * len(head)]
        for r in self.tasks:
            recall = [f"{100 * r.recall[k]:.1f}" + ("*" if k == r.k and len(ks) > 1 else "") if k in r.recall
                      else "-" for k in ks]
            rows.append([r.task, M_BEIR_DATASETS.get(r.dataset_id, str(r.dataset_id)), str(r.task_id), r.pool,
                         str(r.num_queries), *recall, f"{100 * r.modality_accuracy:.1f}"])
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        for pool in sorted({r.pool for r in self.tasks}):
            lines.append(f"\nAverage headline recall ({pool} pool): {100 * self.average(pool):.1f}")
        if len(ks) > 1:
            lines.append("\n\\* the task's headline k")
        if self.text:
            lines.append("\nText retrieval: " + ", ".join(f"{k} {v:.4g}" for k, v in self.text.items()))
        return "\n".join(lines) + "\n"


def evaluate_mbeir(encoder: Encoder, dataset: MBEIRDataset, *, pools: Sequence[str] = ("local", "global"),
                   ks: Sequence[int] | None = None, batch_size: int = 8, chunk_size: int = 50_000,
                   cache_dir: str | os.PathLike | None = None, model_key: str | None = None,
                   device: str | torch.device | None = None, show_progress: bool | None = None) -> EvaluationReport:
    """M-BEIR metrics of every task in ``dataset`` on the requested pools.

    Args:
        encoder: the model to evaluate.
        dataset: test queries, their global pool and (optional) qrels and local pools.
        pools: ``"local"`` and/or ``"global"``.
        ks: extra recall cut-offs for every task; each task's headline k (:func:`default_k`) is always included.
        batch_size: encoding batch size.
        chunk_size: candidates scored at a time.
        cache_dir, model_key: pool-embedding cache (see :func:`~mmembed_rag.finetune.mining.encode_pool`).
        device: where to score (default CPU).
        show_progress: encoding progress bars.

    Returns:
        An :class:`EvaluationReport` with one row per task and pool.
    """
    bad = [p for p in pools if p not in ("local", "global")]
    if bad:
        raise ValueError(f"pools must be 'local' and/or 'global', got {bad}")
    dids, pool_emb = encode_pool(encoder, dataset, batch_size=batch_size, cache_dir=cache_dir, model_key=model_key,
                                 show_progress=show_progress)
    query_emb = encode_queries(encoder, [dataset.query_item(q) for q in dataset.queries], batch_size=batch_size,
                               show_progress=show_progress, what="evaluation queries")
    unjudged = [q.qid for q in dataset.queries if not dataset.positives(q)]
    if unjudged and is_main_process():
        logger.warning("%d queries have no positive in the qrels and count as misses (first: %s)", len(unjudged),
                       unjudged[0])
    position = {did: i for i, did in enumerate(dids)}
    by_task: dict[str, list[int]] = {}
    for i, query in enumerate(dataset.queries):
        by_task.setdefault(query.task, []).append(i)
    report = EvaluationReport()
    for pool in pools:
        for task, rows in by_task.items():
            first = dataset.queries[rows[0]]
            headline = default_k(first.dataset_id)
            cuts = sorted(set(ks or ()) | {headline})
            if pool == "local":
                subset = np.asarray([position[d] for d in dataset.local_pool(task)], dtype=np.int64)
                candidates, names = pool_emb[subset], [dids[j] for j in subset]
            else:  # the whole pool, without copying it
                candidates, names = pool_emb, dids
            _, index = top_k_search(query_emb[rows], candidates, max(cuts), chunk_size=chunk_size, device=device)
            rankings = [[names[j] for j in found] for found in index]
            positives = [dataset.positives(dataset.queries[i]) for i in rows]
            top1 = [dataset.pool[r[0]].modality for r in rankings if r]
            report.tasks.append(TaskResult(task, first.dataset_id, first.task_id, pool, len(rows),
                                           {k: hit_rate(rankings, positives, k) for k in cuts}, headline,
                                           modality_accuracy(top1, first.target_modality)))
    for r in report.tasks:
        if is_main_process():  # every rank has the same report
            logger.info("%s (%s pool): R@%d %.3f, modality accuracy %.3f", r.task, r.pool, r.k, r.headline,
                        r.modality_accuracy)
    return report


def evaluate_text(encoder: Encoder, data: TextRetrievalData, corpus: Mapping[str, str] | Sequence[str], *,
                  k: int = 10, batch_size: int = 8, chunk_size: int = 50_000, device: str | torch.device | None = None,
                  show_progress: bool | None = None) -> dict[str, float]:
    """nDCG@k of text-to-text retrieval over a text-only pool.

    A passage of ``corpus`` is relevant to a query when its text equals one of the query's positives.
    Queries are encoded with ``data.instructions[0]``.

    Args:
        encoder: the model.
        data: the queries.
        corpus: doc id -> passage, or a list of passages (ids ``"0"``, ``"1"``, ...).
        k: nDCG cut-off.
        batch_size, chunk_size, device, show_progress: as in :func:`evaluate_mbeir`.

    Returns:
        ``{"ndcg@{k}": value, "num_queries": n}``; queries with no relevant passage in the corpus are
        skipped (with a warning).
    """
    docs = dict(corpus) if isinstance(corpus, Mapping) else {str(i): text for i, text in enumerate(corpus)}
    ids = list(docs)
    by_text: dict[str, list[str]] = {}
    for did, text in docs.items():
        by_text.setdefault(text, []).append(did)
    qrels = {q.qid: {did: 1 for p in q.positives for did in by_text.get(p, [])} for q in data.queries}
    missing = [qid for qid, rel in qrels.items() if not rel]
    if missing and is_main_process():
        logger.warning("%d text queries have no relevant passage in the corpus and are skipped (first: %s)",
                       len(missing), missing[0])
    queries = [q for q in data.queries if qrels[q.qid]]
    if not queries:
        return {f"ndcg@{k}": float("nan"), "num_queries": 0}
    doc_emb = encode_documents(encoder, [MultimodalItem(text=docs[d]) for d in ids], batch_size=batch_size,
                               show_progress=show_progress, what="text passages")
    query_emb = encode_queries(encoder, [data.query_item(q) for q in queries], batch_size=batch_size,
                               show_progress=show_progress, what="text queries")
    scores, index = top_k_search(query_emb, doc_emb, k, chunk_size=chunk_size, device=device)
    run = {q.qid: {ids[j]: float(s) for j, s in zip(found, row, strict=True)}
           for q, found, row in zip(queries, index, scores, strict=True)}
    value = ndcg_at_k(run, {q.qid: qrels[q.qid] for q in queries}, k)
    if is_main_process():
        logger.info("text retrieval: nDCG@%d %.4f over %d queries", k, value, len(queries))
    return {f"ndcg@{k}": value, "num_queries": len(queries)}


def evaluate(encoder: Encoder, dataset: MBEIRDataset | None = None, text: TextRetrievalData | None = None,
             corpus: Mapping[str, str] | Sequence[str] | None = None, **options: Any) -> EvaluationReport:
    """:func:`evaluate_mbeir` and/or :func:`evaluate_text` in one report (``options`` go to both where they apply).

    Raises:
        ValueError: ``text`` without ``corpus``.
    """
    shared = {key: options[key] for key in ("batch_size", "chunk_size", "device", "show_progress") if key in options}
    report = evaluate_mbeir(encoder, dataset, **options) if dataset is not None else EvaluationReport()
    if text is not None:
        if corpus is None:
            raise ValueError("text evaluation needs the corpus (the text-only pool)")
        report.text = evaluate_text(encoder, text, corpus, **shared)
    return report
