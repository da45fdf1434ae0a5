"""Modality bias and its cure: the three-stage recipe on the synthetic benchmark, stage by stage.

Runs :func:`mmembed_rag.finetune.pipeline.run_pipeline` with its defaults (a tiny random LLaVA-NeXT-shaped
checkpoint; the generated M-BEIR-format benchmark: 8 tasks x 200 training queries (160 for NIGHTS), 50 test
queries per task, a 1,150-candidate global test pool holding text, image and image+text candidates; stage-1
random negatives from each task's own pool, so nothing in stage 1 teaches modality) and reports, per stage,
on the split ``--split`` names: ``val`` (50 queries per task, generated apart from test) to tune settings,
``test`` (the default) to report them:

* ``recall@5`` and ``modality_accuracy``: global pool, mean over the cross-modal tasks (query and
  candidate modalities differ: t->i, t->(i,t), i->t, (i,t)->t, (i,t)->i);
* ``multimodal_recall@5``: global pool, mean over all eight M-BEIR tasks;
* ``text_ndcg@10``: the text-to-text set over its text-only pool;
* ``per_task``: Recall@5 and modality accuracy of every task on the local and the global pool.

A control (on by default, ``--no-control`` skips it) trains stage 2's steps from the same start with stage
1's random negatives instead of the mined ones, to separate the hard negatives' effect from more steps.

Claims checked:

1. stage 2 (modality-aware hard negatives) beats stage 1 on cross-modal global-pool modality accuracy and
   Recall@5;
2. stage 3 (continual text-to-text fine-tuning) raises text nDCG@10 over stage 2 while the multimodal
   average Recall@5 drops by at most 1 point.

``--base-from-parts llava_next|qwen3_vl`` starts instead from a base built by
:func:`mmembed_rag.finetune.build_base` out of tiny pretrained-format parts written by the factories: a LLaVA-NeXT
generative checkpoint plus an NV-Embed-format text embedder (their language model and latent-attention head), or
a Qwen3-VL Instruct checkpoint (last-token pooling); the tiny recipe defaults apply to both.

Budget: under 15 minutes of wall time on a 2-core CPU; wall and CPU time are both reported (the machine
may be shared). Steps are cached in ``--workdir``: a rerun with the same settings only re-reads them.

Usage: ``python benchmarks/modality_bias.py --out bias.json [--workdir DIR] [--threads 1] [--quick]
[--stage1 max_steps=300 --stage2 learning_rate=5e-4 ...] [--stage2-init base] [--text-fraction 0.5]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from mmembed_rag.encoder import Encoder
from mmembed_rag.finetune.arguments import load_arguments
from mmembed_rag.finetune.build_base import build_base
from mmembed_rag.finetune.evaluate import evaluate
from mmembed_rag.finetune.pipeline import (
    TINY_STAGE_DEFAULTS,
    Benchmark,
    MiningOptions,
    PipelineResult,
    TinyModel,
    run_pipeline,
    stage_summary,
)
from mmembed_rag.finetune.sampler import training_data
from mmembed_rag.finetune.synthetic import load_benchmark, load_text_benchmark
from mmembed_rag.finetune.train import train

logger = logging.getLogger("modality_bias")

STAGES = ("stage1", "stage2", "stage3")


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: expected KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


# Stage 3 for the Qwen3-VL base from parts, chosen on the validation split: the tiny default's 100 steps lost 2.75
# points of multimodal Recall@5 there, 50 steps none (results/modality_bias_parts_qwen3_vl_tuning_val.json).
PARTS_OVERRIDES = {"llava_next": {}, "qwen3_vl": {"stage3": {"max_steps": 50}}}


def parts_base(family: str, root: Path, seed: int, sizes: TinyModel = TinyModel()) -> Path:
    """A tiny base built from pretrained-format parts (cached in ``root``), the pipeline's tiny sizes."""
    from mmembed_rag.testing import make_tiny_nv_embed, make_tiny_qwen3_vl, make_tiny_reranker

    base = root / f"parts-{family}-{seed}" / "base"
    if (base / "config.json").is_file():
        return base
    parts = base.parent
    if family == "qwen3_vl":
        generative = make_tiny_qwen3_vl(parts / "generative", kind="instruct", seed=seed, dtype=torch.float32,
                                        hidden_size=sizes.hidden_size, layers=sizes.layers,
                                        vision_hidden=sizes.vision_hidden, vision_layers=sizes.vision_layers)
        return build_base(base, generative=generative)
    generative = make_tiny_reranker(parts / "generative", seed=seed, dtype=torch.float32,
                                    hidden_size=sizes.hidden_size, layers=sizes.layers,
                                    vision_hidden=sizes.vision_hidden, vision_layers=sizes.vision_layers)
    rows = json.loads((generative / "config.json").read_text())["image_token_index"]  # no rows for <image>, <pad>
    embedder = make_tiny_nv_embed(parts / "embedder", seed=seed + 1, vocab_size=rows, hidden_size=sizes.hidden_size,
                                  layers=sizes.layers, num_latents=sizes.num_latents, heads=sizes.latent_heads)
    return build_base(base, generative=generative, text_embedder=embedder)


def control(result: PipelineResult, show_progress: bool, split: str) -> dict[str, Any]:
    """Stage 2's training (same arguments, same start) with stage 1's random negatives instead of mined ones.

    Separates what the hard negatives do from what 200 more steps do. Cached next to the pipeline's steps: the
    model once, its evaluation per split.
    """
    first, second = result.stages["stage1"], result.stages["stage2"]
    directory = result.workdir / f"control-{second.key}"
    summary_file = directory / f"summary-{split}.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    args = load_arguments(None, {**second.args, "output_dir": str(directory),  # model_path: stage 2's start
                                 "overwrite_output_dir": True, "show_progress": show_progress})
    wall, cpu = time.perf_counter(), time.process_time()
    model_dir = directory / "model"
    if not (model_dir / "config.json").is_file():
        model_dir = train(args, *training_data(args, **{**first.data, "negatives": "auto"}))
    encoder = Encoder.from_pretrained(model_dir, max_length=args.max_length)
    report = evaluate(encoder, load_benchmark(result.data_dir, split), *load_text_benchmark(result.data_dir, split),
                      ks=(1, 5, 10), batch_size=32, show_progress=None if show_progress else False)
    summary = {**stage_summary(report), "time": {"wall": round(time.perf_counter() - wall, 1),
                                                 "cpu": round(time.process_time() - cpu, 1)}}
    summary_file.write_text(json.dumps(summary, indent=2))
    return summary


def _claims(stages: dict[str, dict[str, Any]], ctrl: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    s1, s2, s3 = (stages[name] for name in STAGES)
    drop = 100 * (s2["multimodal_recall@5"] - s3["multimodal_recall@5"])
    extra = {}
    if ctrl is not None:
        extra["stage2_above_control_random_negatives"] = {
            "control_recall@5": ctrl["recall@5"], "control_modality_accuracy": ctrl["modality_accuracy"],
            "holds": s2["recall@5"] > ctrl["recall@5"] and s2["modality_accuracy"] > ctrl["modality_accuracy"]}
    return {**extra,
        "stage2_modality_accuracy_above_stage1": {"stage1": s1["modality_accuracy"], "stage2": s2["modality_accuracy"],
                                                  "holds": s2["modality_accuracy"] > s1["modality_accuracy"]},
        "stage2_recall@5_above_stage1": {"stage1": s1["recall@5"], "stage2": s2["recall@5"],
                                         "holds": s2["recall@5"] > s1["recall@5"]},
        "stage3_text_ndcg@10_above_stage2": {"stage2": s2["text_ndcg@10"], "stage3": s3["text_ndcg@10"],
                                             "holds": s3["text_ndcg@10"] > s2["text_ndcg@10"]},
        "stage3_multimodal_recall@5_drop_at_most_1_point": {"drop_points": round(drop, 2), "holds": drop <= 1.0},
    }


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown(stages: dict[str, dict[str, Any]]) -> str:
    """Averages per stage, then Recall@5 / modality accuracy of every task on the global and local pools."""
    names = [name for name in (*STAGES, "control") if name in stages]
    lines = ["| stage | R@5 cross-modal (global) | modality acc. cross-modal (global) | R@5 all tasks (global) "
             "| R@5 all tasks (local) | text nDCG@10 |", "|---|---|---|---|---|---|"]
    for name in names:
        s = stages[name]
        lines.append(f"| {name} | {_pct(s['recall@5'])} | {_pct(s['modality_accuracy'])} | "
                     f"{_pct(s['multimodal_recall@5'])} | {_pct(s['local_recall@5'])} | {s['text_ndcg@10']:.3f} |")
    tasks = list(stages["stage1"]["per_task"])
    head = " | ".join(f"{name} R@5 / mod. acc." for name in names)
    for pool in ("global", "local"):
        lines += ["", f"| task ({pool} pool) | {head} |", "|---|" + "---|" * len(names)]
        for task in tasks:
            cells = [stages[name]["per_task"][task][pool] for name in names]
            lines.append(f"| {task} | " + " | ".join(f"{_pct(c['recall@5'])} / {_pct(c['modality_accuracy'])}"
                                                      for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--workdir", type=Path, help="pipeline directory, reused across runs (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the tiny model's ops are too small to split, and "
                             "spinning threads lose badly on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data, a few steps per stage")
    for stage in STAGES:
        parser.add_argument(f"--{stage}", action="append", default=[], metavar="KEY=VALUE",
                            help=f"{stage} recipe override (repeatable), e.g. max_steps=300")
    parser.add_argument("--stage2-init", choices=("stage1", "base"), default="stage1")
    parser.add_argument("--stage1-negatives", choices=("local", "global"), default="local")
    parser.add_argument("--text-fraction", type=float, default=0.2)
    parser.add_argument("--c2-start", type=int, default=45)
    parser.add_argument("--hard-negatives", type=int, default=4, help="mined negatives per query")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("val", "test"), default="test",
                        help="where every stage is evaluated: tune settings on 'val', report on 'test' (default)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control run (stage 2's training with stage 1's random negatives)")
    parser.add_argument("--base-from-parts", choices=("llava_next", "qwen3_vl"),
                        help="start from a base built with build_base out of tiny pretrained-format parts")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    overrides = {stage: _overrides(getattr(args, stage)) for stage in STAGES}
    benchmark = Benchmark()
    if args.quick:
        benchmark = Benchmark(n_train=24, n_test=10, n_val=10)
        for stage in STAGES:
            overrides[stage] = {"max_steps": 4, "batch_size": 8, "warmup_steps": 1, **overrides[stage]}
    wall, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="modality-bias-") as tmp:
        base, parts = None, None
        if args.base_from_parts:  # the tiny recipe, which the pipeline applies only to the base it builds itself
            base = parts_base(args.base_from_parts, Path(args.workdir or tmp), args.seed)
            parts = json.loads((base / "base_parts.json").read_text())
            tuned = PARTS_OVERRIDES[args.base_from_parts]
            overrides = {stage: {**TINY_STAGE_DEFAULTS[stage], **tuned.get(stage, {}), **overrides[stage]}
                         for stage in STAGES}
        result = run_pipeline(args.workdir or tmp, base_model=base, stage1=overrides["stage1"],
                              stage2=overrides["stage2"],
                              stage3=overrides["stage3"], stage2_init=args.stage2_init,
                              stage1_negatives=args.stage1_negatives, text_fraction=args.text_fraction,
                              mining=MiningOptions(c2_start=args.c2_start, num_negatives=args.hard_negatives),
                              benchmark=benchmark, seed=args.seed, eval_split=args.split,
                              show_progress=args.progress)
        stages = result.summary()
        ctrl = None if args.no_control else control(result, args.progress, args.split)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    usage = resource.getrusage(resource.RUSAGE_SELF)
    output = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              **stages, "claims": _claims(stages, ctrl), **({"control": ctrl} if ctrl is not None else {}),
              "timing": {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                         "process_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                         "torch_threads": args.threads, "steps": result.timings},
              "mining": result.mining["counts"],
              **({"base_parts": parts} if parts is not None else {}),
              "settings": {"stage_args": {n: s.args for n, s in result.stages.items()}, "stage2_init": args.stage2_init,
                           "stage1_negatives": args.stage1_negatives, "text_fraction": args.text_fraction,
                           "c2_start": args.c2_start, "hard_negatives": args.hard_negatives, "seed": args.seed,
                           "split": args.split,
                           "benchmark": asdict(benchmark)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2, default=str) + "\n")
    print(markdown({**stages, **({"control": ctrl} if ctrl is not None else {})}))
    print()
    for name, claim in output["claims"].items():
        print(f"- {name}: {'HOLDS' if claim['holds'] else 'does not hold'} "
              f"({', '.join(f'{k} {v:.4g}' for k, v in claim.items() if k != 'holds')})")
    print(f"\nwall {wall:.0f} s, CPU {cpu:.0f} s ({output['timing']['process_cpu_seconds']:.0f} s with start-up; "
          f"torch threads: {args.threads}); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
