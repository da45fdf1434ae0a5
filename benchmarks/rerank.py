"""Zero-shot MLLM reranker: candidates per second with the shared query cache versus the naive loop.

Model: a random LLaVA-NeXT generative checkpoint (``make_tiny_reranker``) of about 20M parameters
(Mistral-style decoder, hidden 512, 4 layers, 8 heads / 4 KV heads; CLIP ViT hidden 256, 4 layers, at the
released 336 px with patch 14, so an image is 576 patch tokens + 1 newline = 577 tokens), float32 on CPU.
Small enough for a laptop, large enough that the forward pass, not Python, dominates.

Scenarios (deterministic synthetic inputs), each scoring the same text candidates (passages of 20 to 60
words) for one query:

* text query (text_to_text template): the shared query part is short, so little can be saved;
* image query (image_to_text template): the query part holds the 577 image tokens.

Measured per scenario, interleaved rounds after a warm-up, best of ``--rounds``:

* cached: ``reranker.score(query, candidates, batch_size=B)`` -- the query part's key/value cache is
  computed once and expanded over each batch of right-padded candidates;
* naive: ``reranker.score(query, candidates, use_cache=False)`` -- every pair as one full sequence, one
  pair at a time (the query image's vision features recomputed for each pair, as a per-pair loop does).

* batched pairs: the same batches of whole (query + candidate) sequences, right-padded, without sharing --
  separates the gain of batching from the gain of computing the query part once.

Goal: cached / naive candidates per second >= 1.5 for the image query. The largest difference between the
paths' scores is reported as a check (it should be float rounding, ~1e-6).

Usage: ``python benchmarks/rerank.py [--quick] [--candidates 32] [--batch-size 16] [--rounds 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_output_args,
    clip_vision_config,
    emit,
    goal,
    mistral_config,
    print_table,
    random_text,
    setup_logging,
    synthetic_image,
)

from mmembed_rag.images import load_image  # noqa: E402
from mmembed_rag.items import to_item  # noqa: E402
from mmembed_rag.rerank_templates import select_template  # noqa: E402
from mmembed_rag.reranker import MLLMReranker  # noqa: E402
from mmembed_rag.testing import make_tiny_reranker  # noqa: E402

logger = logging.getLogger("benchmarks.rerank")

GOAL_IMAGE_SPEEDUP = 1.5


def build_reranker(root: Path, device: str = "cpu") -> MLLMReranker:
    """Write the random checkpoint under ``root`` and load it on ``device`` in float32."""
    # make_tiny_reranker appends the answer words, <image> and <pad> to a 1000-token BPE: 1024 rows suffice.
    text = mistral_config(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536, vocab=1024)
    vision = clip_vision_config(hidden=256, layers=4, heads=4, intermediate=1024, image_size=336, patch_size=14)
    path = make_tiny_reranker(root / "model", seed=0, dtype=torch.float32, image_size=336,
                              text_config=text, vision_config=vision)
    return MLLMReranker.from_pretrained(path, device=device, dtype="float32")


def scenarios(n_candidates: int, seed: int = 0) -> dict[str, tuple[Any, list[str]]]:
    """{name: (query, candidates)}; both queries score the same passages."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    candidates = [random_text(rng, rng.randint(20, 60)) for _ in range(n_candidates)]
    return {"text query": (random_text(rng, 12), candidates),
            "image query": (synthetic_image(np_rng, 640, 480), candidates)}


def score_batched_pairs(reranker: MLLMReranker, query: Any, candidates: list[str], batch_size: int) -> np.ndarray:
    """Baseline without sharing: batches of whole (query + candidate) sequences, right-padded.

    Built from the reranker's own pieces (same prompts, image features and read-out), so the only difference
    from the cached path is that every row recomputes the query part (and its image).
    """
    query_item = to_item(query, 0)
    items = [to_item(c, i) for i, c in enumerate(candidates)]
    out = np.zeros(len(items), dtype=np.float32)
    pixels = [reranker.image_processor(load_image(query_item.image))] if query_item.image is not None else []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = range(start, min(start + batch_size, len(items)))
            rows = []
            for i in chunk:
                template = select_template(query_item, items[i])
                rows.append(reranker.prompts.query_ids(template, query_item)
                            + reranker.prompts.candidate_ids(template, items[i]))
            features = reranker._image_features(pixels * len(rows)) if pixels else [None] * len(rows)
            embeds, lengths = reranker._embed(rows, features)
            mask = (torch.arange(embeds.shape[1], device=embeds.device) < lengths[:, None]).long()
            hidden = reranker.model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            out[list(chunk)] = reranker._p_true(hidden[torch.arange(len(rows), device=hidden.device), lengths - 1])
    return out


def timed(fn: Any) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, help="candidates per query (default 32, quick 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="cached-path batch size (default 16)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 3, quick 1)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    add_output_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    n = args.candidates or (8 if args.quick else 32)

    with tempfile.TemporaryDirectory(prefix="mmembed-bench-rerank-") as tmp:
        logger.info("building the random checkpoint in %s", tmp)
        reranker = build_reranker(Path(tmp), args.device)
    params = sum(p.numel() for p in reranker.model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, float32, CPU, {torch.get_num_threads()} threads, "
          f"{reranker.tokens_per_image} tokens per image, {n} candidates, batch size {args.batch_size}")

    results: dict[str, dict[str, Any]] = {}
    for name, (query, candidates) in scenarios(n).items():
        prompt = reranker.format_prompt(query, candidates[0])
        query_item = to_item(query, 0)
        template = select_template(query_item, to_item(candidates[0], 0))
        prefix = len(reranker.prompts.query_ids(template, query_item))
        logger.info("%s: %s template, query part %d tokens; first prompt ends %r", name, template.name, prefix,
                    prompt[-60:])
        runs = {
            "cached": lambda q=query, c=candidates: reranker.score(q, c, batch_size=args.batch_size),
            "naive": lambda q=query, c=candidates: reranker.score(q, c, use_cache=False),
            "batched_pairs": lambda q=query, c=candidates: score_batched_pairs(reranker, q, c, args.batch_size),
        }
        scores = {k: fn() for k, fn in runs.items()}  # warm-up, and the agreement check
        seconds: dict[str, list[float]] = {k: [] for k in runs}
        order = list(runs)
        for r in range(rounds):  # rotate the order so drift in machine speed favours no run
            for key in order[r % 3:] + order[:r % 3]:
                elapsed, _ = timed(runs[key])
                seconds[key].append(elapsed)
            logger.info("%s round %d/%d: %s", name, r + 1, rounds,
                        ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()))
        best = {k: min(v) for k, v in seconds.items()}
        results[name] = {"query_part_tokens": prefix,
                         "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
                         "cand_per_s": {k: round(n / v, 3) for k, v in best.items()},
                         "speedup": round(best["naive"] / best["cached"], 3),
                         "speedup_vs_batched_pairs": round(best["batched_pairs"] / best["cached"], 3),
                         "max_abs_score_diff": max(float(np.abs(scores["cached"] - scores[k]).max())
                                                   for k in ("naive", "batched_pairs"))}

    goals = {"image_query_speedup": goal(results["image query"]["speedup"], GOAL_IMAGE_SPEEDUP, True)}
    print()
    print_table([f"scenario (best of {rounds})", "query part tokens", "cached cand/s", "naive cand/s",
                 "batched pairs cand/s", "speedup vs naive", "vs batched pairs", "max |score diff|"], [
        [name, r["query_part_tokens"], r["cand_per_s"]["cached"], r["cand_per_s"]["naive"],
         r["cand_per_s"]["batched_pairs"], r["speedup"], r["speedup_vs_batched_pairs"],
         f"{r['max_abs_score_diff']:.1e}"] for name, r in results.items()])
    missed = [k for k, g in goals.items() if not g["met"]]
    print("\n" + (f"GOAL MISSED: {', '.join(missed)}" if missed else
                  f"all goals met (image-query speedup >= {GOAL_IMAGE_SPEEDUP})"))
    emit({"benchmark": "rerank", "date": date.today().isoformat(), "device": "cpu",
          "threads": torch.get_num_threads(), "params": params, "candidates": n, "batch_size": args.batch_size,
          "rounds": rounds, "quick": args.quick, "tokens_per_image": reranker.tokens_per_image,
          "scenarios": results, "goals": goals, "all_goals_met": not missed}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
