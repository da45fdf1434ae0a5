"""Modality-aware hard negative mining (MM-Embed, stage 2), with a content-addressed pool-embedding cache.

With the stage-1 model, every training query retrieves its top ``top_k`` (default 50) from the pool:

* **C1**: candidates of the WRONG modality ranked above the (first) positive -- the model's modality
  bias, e.g. a caption returned for a text->image query;
* **C2**: candidates of the RIGHT modality ranked below position ``c2_start`` (default 45), deep
  enough that they are unlikely to be unlabelled positives.

Hard negatives are sampled from C1 | C2 and written into ``neg_cand_list``. ``strategy="topk"`` is plain
top-k mining (every non-positive in the top ``top_k``). The rules are pure functions over one ranking
(:func:`modality_aware_candidates`, :func:`topk_candidates`) so they can be checked on a hand-made list.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mmembed_rag.encoder import Encoder

from .data import MBEIRDataset, MBEIRQuery
from .parallel import data_parallel, encode_documents, encode_queries, is_main_process
from .search import top_k_search

__all__ = ["MiningResult", "encode_pool", "mine_hard_negatives", "model_fingerprint", "modality_aware_candidates",
           "pool_fingerprint", "sample_negatives", "topk_candidates"]

logger = logging.getLogger(__name__)

Strategy = Literal["modality_aware", "topk"]
PoolChoice = Literal["global", "local"]


def modality_aware_candidates(ranking: Sequence[str], modalities: Sequence[str], positives: Collection[str],
                              target_modality: str, *, c2_start: int = 45) -> tuple[list[str], list[str]]:
    """C1 and C2 of one query's ranking.

    Args:
        ranking: candidate ids, best first (the top ``top_k``).
        modalities: the modality of each candidate in ``ranking``.
        positives: the query's positive ids (never returned).
        target_modality: the modality the task asks for (``M_BEIR_TASKS[task_id][1]``).
        c2_start: C2 starts after the first ``c2_start`` positions: 1-based ranks ``c2_start + 1`` onwards,
            i.e. 0-based indices ``>= c2_start`` (the default 45 of a top 50 gives ranks 46-50).

    Returns:
        ``(c1, c2)`` in ranking order. C1: wrong-modality candidates ranked above the first positive (all
        wrong-modality candidates of the ranking when no positive is in it). C2: right-modality,
        non-positive candidates at 0-based index ``>= c2_start``.
    """
    if len(ranking) != len(modalities):
        raise ValueError(f"ranking has {len(ranking)} ids but {len(modalities)} modalities")
    first_positive = next((i for i, did in enumerate(ranking) if did in positives), len(ranking))
    c1 = [did for did, mod in zip(ranking[:first_positive], modalities[:first_positive], strict=True)
          if mod != target_modality]
    c2 = [did for did, mod in zip(ranking[c2_start:], modalities[c2_start:], strict=True)
          if mod == target_modality and did not in positives]
    return c1, c2


def topk_candidates(ranking: Sequence[str], positives: Collection[str], *, skip: int = 0) -> list[str]:
    """Plain top-k mining: the non-positive candidates of ``ranking`` after its first ``skip`` positions."""
    return [did for did in ranking[skip:] if did not in positives]


def sample_negatives(c1: Sequence[str], c2: Sequence[str], rng: random.Random, num_negatives: int, *,
                     num_c1: int | None = None) -> list[str]:
    """Draw hard negatives from C1 | C2.

    Args:
        c1, c2: the candidate sets (C2 empty for top-k mining).
        rng: the random source.
        num_negatives: negatives to draw in all (fewer when C1 | C2 is smaller).
        num_c1: ``None`` draws uniformly from the union; otherwise up to ``num_c1`` from C1 and the rest from
            C2, topping up from whichever set still has candidates.
    """
    union = list(dict.fromkeys([*c1, *c2]))
    n = min(num_negatives, len(union))
    if num_c1 is None:
        return rng.sample(union, n)
    from_c1 = list(dict.fromkeys(c1))
    only_c2 = [did for did in union if did not in set(from_c1)]
    take = min(num_c1, len(from_c1), n)
    chosen = rng.sample(from_c1, take) + rng.sample(only_c2, min(n - take, len(only_c2)))
    spare = [did for did in from_c1 if did not in chosen]  # C2 ran short: top up from C1
    return chosen + rng.sample(spare, n - len(chosen))


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash of a model: names, shapes, dtypes, per-tensor sums and a strided sample.

    Any training step (full or LoRA) changes the sums; hashing every byte of an 8B model would take
    longer than re-encoding a small pool. Pass an explicit ``model_key`` to :func:`encode_pool` to skip it.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if flat.numel():
                digest.update(np.float64(torch.sum(flat, dtype=torch.float64).item()).tobytes())
                step = max(1, flat.numel() // 64)
                digest.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def pool_fingerprint(dataset: MBEIRDataset) -> str:
    """Hash of the pool's content in order (ids, texts, image paths, modalities, image root)."""
    digest = hashlib.sha256(str(dataset.image_root).encode())
    for cand in dataset.pool.values():
        digest.update(json.dumps([cand.did, cand.txt, cand.img_path, cand.modality]).encode() + b"\n")
    return digest.hexdigest()


def encode_pool(encoder: Encoder, dataset: MBEIRDataset, *, batch_size: int = 8,
                cache_dir: str | os.PathLike | None = None, model_key: str | None = None,
                show_progress: bool | None = None) -> tuple[list[str], np.ndarray]:
    """Embeddings of the whole pool as documents, cached under ``cache_dir`` by content hash.

    The cache key covers the model (``model_key``, e.g. checkpoint path + mtime, or
    :func:`model_fingerprint`), the prompt settings and :func:`pool_fingerprint`, so a changed model or
    pool never reuses stale vectors. Under a process group every rank encodes its share
    (:mod:`~mmembed_rag.finetune.parallel`), gets the whole array, and rank 0 alone writes the cache.

    Returns:
        ``(dids, embeddings)``: pool ids in pool order and a float32 (n, dim) array.
    """
    dids = list(dataset.pool)
    group = data_parallel(getattr(encoder, "device", None))
    path = None
    if cache_dir is not None:
        # A probe prompt's ids capture the tokenizer, BOS/EOS handling and the image token.
        settings = f"{encoder.family.settings_key()}|{encoder.dim}"
        key = hashlib.sha256(f"v1|{model_key or model_fingerprint(encoder.model)}|{settings}|"
                             f"{pool_fingerprint(dataset)}".encode()).hexdigest()[:40]
        path = Path(cache_dir) / f"pool-{key}.npy"
        if all(group.all_gather_object(path.is_file())):  # every rank reads it, or every rank encodes
            logger.info("pool embeddings from cache %s", path)
            return dids, np.load(path)
    emb = encode_documents(encoder, [dataset.candidate_item(c) for c in dataset.pool.values()], batch_size=batch_size,
                           show_progress=show_progress, what="pool candidates")
    if path is not None:
        group.on_main(lambda: _save_array(path, emb), str(path))
    return dids, emb


def _save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (temp file + ``os.replace``): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class MiningResult:
    """What :func:`mine_hard_negatives` produced.

    Attributes:
        dataset: the input dataset with every query's ``neg_cand_list`` replaced by the mined negatives.
        counts: per task key: ``queries``, ``c1`` and ``c2`` (candidates found in all), ``positive_in_top_k``
            (queries whose positive was retrieved), ``negatives`` (sampled in all), ``empty`` (queries that
            got no negative).
        path: the queries file written, if any.
    """

    dataset: MBEIRDataset
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    path: Path | None = None


def mine_hard_negatives(encoder: Encoder, dataset: MBEIRDataset, *, output: str | os.PathLike | None = None,
                        top_k: int = 50, c2_start: int = 45, num_negatives: int = 4, num_c1: int | None = None,
                        strategy: Strategy = "modality_aware", pool: PoolChoice = "global", seed: int = 0,
                        batch_size: int = 8, chunk_size: int = 50_000, cache_dir: str | os.PathLike | None = None,
                        model_key: str | None = None, device: str | torch.device | None = None,
                        show_progress: bool | None = None) -> MiningResult:
    """Mine hard negatives for every query of ``dataset`` and (optionally) write the new queries file.

    Queries are encoded with their task's first instruction, the pool once as documents (cached). Under
    ``torchrun`` / ``accelerate launch`` each process encodes a share of both and ranks and samples everything
    (the same result on every rank, and as in one process); rank 0 alone writes ``output``.

    Args:
        encoder: the stage-1 model.
        dataset: training queries and pool (see :meth:`MBEIRDataset.load`).
        output: queries jsonl to write, atomically (temp file + ``os.replace``); ``None`` writes nothing.
        top_k: retrieval depth.
        c2_start: C2 begins after this many positions (see :func:`modality_aware_candidates`).
        num_negatives: hard negatives per query.
        num_c1: how many of them to take from C1 (``None``: uniform over C1 | C2).
        strategy: ``"modality_aware"`` (C1 | C2) or ``"topk"`` (every non-positive in the top ``top_k``).
        pool: ``"global"`` (the whole pool; where C1 exists) or ``"local"`` (each task's local pool).
        seed: sampling seed (negatives are drawn per qid, independent of order).
        batch_size: encoding batch size.
        chunk_size: pool candidates scored at a time.
        cache_dir: pool-embedding cache directory (``None``: no cache).
        model_key: cache key of the model (default: :func:`model_fingerprint`).
        device: where to score (default CPU).
        show_progress: encoding progress bars (``None``: only for long runs).

    Returns:
        A :class:`MiningResult`; per-task C1/C2 counts are also logged.

    Raises:
        ValueError: bad depths or counts.
    """
    if top_k < 1 or not 0 <= c2_start < top_k or num_negatives < 0:
        raise ValueError(f"need top_k >= 1, 0 <= c2_start < top_k, num_negatives >= 0; got {top_k}, {c2_start}, "
                         f"{num_negatives}")
    dids, pool_emb = encode_pool(encoder, dataset, batch_size=batch_size, cache_dir=cache_dir, model_key=model_key,
                                 show_progress=show_progress)
    query_emb = encode_queries(encoder, [dataset.query_item(q) for q in dataset.queries], batch_size=batch_size,
                               show_progress=show_progress, what="mining queries")
    rankings = _rankings(dataset, dids, pool_emb, query_emb, top_k, pool, chunk_size, device)
    mined: list[MBEIRQuery] = []
    counts: dict[str, dict[str, int]] = {}
    for query, ranking in zip(dataset.queries, rankings, strict=True):
        positives = set(query.pos_cand_list) | dataset.positives(query)
        if strategy == "modality_aware":
            modalities = [dataset.pool[did].modality for did in ranking]
            c1, c2 = modality_aware_candidates(ranking, modalities, positives, query.target_modality, c2_start=c2_start)
        else:
            c1, c2 = [], topk_candidates(ranking, positives)
        negatives = sample_negatives(c1, c2, random.Random(f"{seed}:{query.qid}"), num_negatives, num_c1=num_c1)
        mined.append(replace(query, neg_cand_list=tuple(negatives)))
        task = counts.setdefault(query.task, dict.fromkeys(
            ("queries", "c1", "c2", "positive_in_top_k", "negatives", "empty"), 0))
        task["queries"] += 1
        task["c1"] += len(c1)
        task["c2"] += len(c2)
        task["positive_in_top_k"] += any(did in positives for did in ranking)
        task["negatives"] += len(negatives)
        task["empty"] += not negatives
    for key, task in sorted(counts.items()):
        if is_main_process():  # every rank has the same counts
            logger.info("%s: %d queries, C1 %d, C2 %d, %d negatives, %d without", key, task["queries"], task["c1"],
                        task["c2"], task["negatives"], task["empty"])
    result = MiningResult(replace(dataset, queries=mined), counts)
    if output is not None:
        result.path = Path(output)
        group = data_parallel(getattr(encoder, "device", None))
        group.on_main(lambda: dataset.write_queries(result.path, mined), str(result.path))
    return result


def _rankings(dataset: MBEIRDataset, dids: list[str], pool_emb: np.ndarray, query_emb: np.ndarray, top_k: int,
              pool: PoolChoice, chunk_size: int, device: str | torch.device | None) -> list[list[str]]:
    """Top ``top_k`` candidate ids of every query, in the global pool or in its task's local pool."""
    if pool == "global":
        _, index = top_k_search(query_emb, pool_emb, top_k, chunk_size=chunk_size, device=device)
        return [[dids[j] for j in row] for row in index]
    if pool != "local":
        raise ValueError(f"pool must be 'global' or 'local', got {pool!r}")
    position = {did: i for i, did in enumerate(dids)}
    rankings: list[list[str]] = [[] for _ in dataset.queries]
    by_task: dict[str, list[int]] = {}
    for i, query in enumerate(dataset.queries):
        by_task.setdefault(query.task, []).append(i)
    for task, rows in by_task.items():
        local = np.asarray([position[did] for did in dataset.local_pool(task)], dtype=np.int64)
        _, index = top_k_search(query_emb[rows], pool_emb[local], top_k, chunk_size=chunk_size, device=device)
        for row, found in zip(rows, index, strict=True):
            rankings[row] = [dids[local[j]] for j in found]
    return rankings
