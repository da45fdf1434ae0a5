"""The demo's reranker: started from the final bi-encoder, trained on its mined negatives, judged on validation.

The reranker's vision tower, projector and language model are the final bi-encoder's
(:func:`~mmembed_rag.finetune.reranker_init.reranker_from_encoder`); it is fine-tuned with the reranker recipe on
the training split, negatives from the bi-encoder's global top 10. It reorders the demo's results only if its
Recall@1 over the bi-encoder's top ``K`` beats the bi-encoder's own on the validation split (never the test split
the demo shows); otherwise the demo shows its P("True") without reordering by it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..encoder import Encoder
from ..items import MultimodalItem
from ..reranker import MLLMReranker

logger = logging.getLogger(__name__)

K = 5
#: Changes to finetune/recipes/reranker.yaml: every weight trains (the carried-over weights were trained for
#: retrieval, not for answering), negatives from the global pool the demo searches.
OVERRIDES: dict[str, Any] = {"lora": {"enabled": False}, "full_finetune": True, "learning_rate": 5e-4,
                             "mining_pool": "global", "max_steps": 300, "warmup_steps": 10, "log_every": 50}
QUICK_OVERRIDES: dict[str, Any] = {**OVERRIDES, "max_steps": 4, "warmup_steps": 1, "batch_size": 4, "log_every": 2}


def _query(item: MultimodalItem) -> MultimodalItem:
    """The reranker's prompts carry no task instruction."""
    return MultimodalItem(text=item.text, image=item.image)


def validate(reranker: MLLMReranker, encoder: Encoder, dataset, batch_size: int = 32) -> dict[str, Any]:
    """Recall@1 of the bi-encoder and of the reranker over its top ``K``, on every query of ``dataset``."""
    from ..finetune.mining import encode_pool

    dids, pool = encode_pool(encoder, dataset, batch_size=batch_size, show_progress=False)
    queries = encoder.encode_queries([dataset.query_item(q) for q in dataset.queries], batch_size=batch_size,
                                     show_progress=False)
    top = np.argsort(-(queries @ pool.T), axis=1)[:, :K]
    before, after = [], []
    for query, row in zip(dataset.queries, top):
        ranking = [dids[i] for i in row]
        scores = reranker.score(_query(dataset.query_item(query)), [dataset.candidate_item(d) for d in ranking])
        positives = dataset.positives(query)
        before.append(ranking[0] in positives)
        after.append(ranking[int(np.argmax(scores))] in positives)  # argmax: ties keep the bi-encoder's order
    return {"split": "val", "queries": len(before), "depth": K, "bi_encoder_recall@1": float(np.mean(before)),
            "reranker_recall@1": float(np.mean(after))}


def prepare(workdir: Path, result, encoder: Encoder, quick: bool, show_progress: bool) -> tuple[Path, dict[str, Any]]:
    """The trained reranker's directory and its validation check, built once per final model and settings."""
    from ..finetune.pipeline import RECIPES
    from ..finetune.reranker_init import reranker_from_encoder
    from ..finetune.reranker_train import load_reranker_arguments, train_reranker
    from ..finetune.synthetic import load_benchmark

    overrides = QUICK_OVERRIDES if quick else OVERRIDES
    key = hashlib.sha256(json.dumps([result.stages["stage3"].key, overrides], sort_keys=True).encode()).hexdigest()
    directory = workdir / f"reranker-{key[:16]}"
    check_file = directory / "validation.json"
    if not check_file.is_file():
        base = reranker_from_encoder(result.final_model, directory / "init")
        args = load_reranker_arguments(RECIPES / "reranker.yaml", {
            **overrides, "model_path": str(base), "output_dir": str(directory), "overwrite_output_dir": True,
            "show_progress": show_progress})
        train_reranker(args, load_benchmark(result.data_dir, "train"), encoder)
        reranker = MLLMReranker.from_pretrained(directory / "model", device="cpu")
        check = validate(reranker, encoder, load_benchmark(result.data_dir, "val"))
        check["helps"] = check["reranker_recall@1"] > check["bi_encoder_recall@1"]
        check_file.write_text(json.dumps(check, indent=2))
    check = json.loads(check_file.read_text())
    logger.info("reranker on validation: Recall@1 %.3f vs the bi-encoder's %.3f over its top %d",
                check["reranker_recall@1"], check["bi_encoder_recall@1"], K)
    return directory / "model", check


def rerank_scores(reranker: MLLMReranker, query: MultimodalItem, candidates: list[MultimodalItem]) -> np.ndarray:
    """P("True") of each candidate for ``query`` (instruction dropped)."""
    return reranker.score(_query(query), candidates, show_progress=False)
