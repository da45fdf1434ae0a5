"""The staged MM-Embed recipe as one reusable function, each stage cached by a hash of its inputs.

:func:`run_pipeline` chains what the other modules do one step at a time:

1. stage 1: InfoNCE, in-batch + random negatives, instructions sampled per task (:mod:`.train`);
2. modality-aware hard negative mining with the stage-1 model on the global pool (:mod:`.mining`);
3. stage 2: retrain with the mined negatives, from the stage-1 model (default) or from the base;
4. stage 3: continual text-to-text fine-tuning from the stage-2 model, text pairs mixed with the
   multimodal data, one task per batch (:class:`~.sampler.TaskBatchSampler`);
5. evaluation after every stage (local and global Recall@k, modality accuracy, text nDCG@10);
6. export of the stage-3 model in the released format, with a model card.

Every step writes into ``workdir/<step>-<key>/`` and a ``stage.json`` marker last; ``key`` hashes the
step's inputs (the upstream keys, the data's content, the arguments), so a rerun skips every step
whose inputs did not change and redoes the rest. Without ``base_model`` a tiny randomly initialised
checkpoint is built (:class:`TinyModel`), which is what tests, notebooks and the modality-bias benchmark
train; without ``data_dir`` the synthetic benchmark is generated (:class:`Benchmark`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmembed_rag.encoder import Encoder
from mmembed_rag.instructions import M_BEIR_TASKS
from mmembed_rag.modeling.checkpoint import load_model, save_model
from mmembed_rag.modeling.pooling import LatentAttentionPooling
from mmembed_rag.testing import make_tiny_checkpoint

from .arguments import TrainArguments, load_arguments
from .data import MBEIRDataset, MBEIRQuery
from .evaluate import EvaluationReport, TaskResult, evaluate
from .export import export_model
from .mining import PoolChoice, Strategy, mine_hard_negatives
from .sampler import training_data
from .synthetic import generate_benchmark, load_benchmark, load_text_benchmark
from .train import train

__all__ = ["Benchmark", "MiningOptions", "PipelineResult", "StageResult", "TinyModel", "TINY_STAGE_DEFAULTS",
           "build_tiny_base", "report_from_dict", "run_pipeline", "stage_summary",
           "summary_table"]

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parent / "recipes"
VERSION = "pipeline-v1"  # bump when a step's behaviour changes, to invalidate every cached step
STAGES = ("stage1", "stage2", "stage3")
CROSS_MODAL_TASKS = frozenset(t for t, (query, cand) in M_BEIR_TASKS.items() if query != cand)

# What learns on the tiny random model within minutes of CPU (tuned with benchmarks/modality_bias.py; stage 2's
# 400 steps chosen on the validation split: cross-modal Recall@5 62.0 vs 49.6 with 200 steps and 48.0 with 8
# mined negatives per query, see benchmarks/results/modality_bias_tuning_val.json):
# full fine-tuning (LoRA adapters on a randomly initialised decoder have nothing to adapt); stage 1 at
# 5e-4 (at 1e-3 and above, mixed-task batches collapsed every image to one embedding) takes off after
# ~400 steps; stage 3 short and gentle, so text gains do not cost multimodal recall. Applied only when
# the pipeline builds the tiny base itself; the caller's overrides come on top.
_TINY_COMMON: dict[str, Any] = {"lora.enabled": False, "full_finetune": True, "batch_size": 32,
                                "gradient_cache_chunk_size": None, "temperature": 0.05, "warmup_steps": 20,
                                "save_every": 0, "keep_checkpoints": 1, "max_length": 128, "log_every": 50}
TINY_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "stage1": {**_TINY_COMMON, "learning_rate": 5e-4, "max_steps": 600, "num_negatives": 1},
    "stage2": {**_TINY_COMMON, "learning_rate": 3e-4, "max_steps": 400, "num_negatives": 3},
    "stage3": {**_TINY_COMMON, "learning_rate": 1e-4, "max_steps": 100, "num_negatives": 3, "warmup_steps": 5},
}


@dataclass(frozen=True)
class TinyModel:
    """Sizes of the default base: :func:`make_tiny_checkpoint` plus a smaller latent-attention head.

    The factory's head (512 latents, 8 heads of the model width) costs most of a training step at width
    64; 32 latents and 4 heads of 16 learn as well at a quarter of the step time.
    """

    hidden_size: int = 64
    layers: int = 2
    vision_hidden: int = 64
    vision_layers: int = 3
    num_latents: int = 32
    latent_heads: int = 4
    latent_head_dim: int = 16


@dataclass(frozen=True)
class Benchmark:
    """Arguments of :func:`~.synthetic.generate_benchmark` when no ``data_dir`` is given."""

    n_train: int = 200
    n_test: int = 50
    n_val: int = 50
    image_size: int = 64
    distractors: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class MiningOptions:
    """Arguments of :func:`~.mining.mine_hard_negatives`: depths, negatives per query, strategy, pool."""

    top_k: int = 50
    c2_start: int = 45
    num_negatives: int = 4
    num_c1: int | None = None
    strategy: Strategy = "modality_aware"
    pool: PoolChoice = "global"


@dataclass
class StageResult:
    """One trained stage: its model, evaluation, arguments, training data files, and (first) training time."""

    name: str
    key: str
    model_dir: Path
    report: EvaluationReport
    cached: bool
    args: dict[str, Any]
    data: dict[str, str]
    train_time: dict[str, float]

    def summary(self) -> dict[str, Any]:
        """:func:`stage_summary` of this stage's report."""
        return stage_summary(self.report)


@dataclass
class PipelineResult:
    """Everything :func:`run_pipeline` produced.

    Attributes:
        workdir, data_dir, base_model: where things are.
        stages: ``stage1``, ``stage2``, ``stage3`` results, in order.
        mining: per-task C1/C2 counts and the mined queries file.
        final_model: the exported stage-3 model (``Encoder.from_pretrained`` loads it).
        timings: wall and CPU seconds of every step (``{"stage1": {"wall": .., "cpu": ..}, ...}``).
    """

    workdir: Path
    data_dir: Path
    base_model: Path
    stages: dict[str, StageResult]
    mining: dict[str, Any]
    final_model: Path
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """``{stage: stage_summary(...)}`` for the three stages."""
        return {name: stage.summary() for name, stage in self.stages.items()}

    def to_dict(self) -> dict[str, Any]:
        stages = {name: {**asdict(s), "report": s.report.to_dict()} for name, s in self.stages.items()}
        paths = {k: str(getattr(self, k)) for k in ("workdir", "data_dir", "base_model", "final_model")}
        return {**paths, "mining": self.mining, "timings": self.timings, "summary": self.summary(), "stages": stages}


def stage_summary(report: EvaluationReport, k: int = 5) -> dict[str, Any]:
    """The headline numbers of one evaluation.

    Returns:
        ``recall@k`` and ``modality_accuracy``: global pool, mean over the cross-modal tasks (query and
        candidate modalities differ); ``multimodal_recall@k``: global pool, mean over all M-BEIR tasks;
        ``local_recall@k``: the same on the local pools; ``text_ndcg@10``; ``per_task``: ``{task: {pool:
        {"recall@k", "modality_accuracy"}}}``.
    """
    def mean(rows: list[TaskResult], metric: str) -> float:
        values = [r.recall[k] if metric == "recall" else r.modality_accuracy for r in rows]
        return float(np.mean(values)) if values else float("nan")

    glob = [r for r in report.tasks if r.pool == "global"]
    cross = [r for r in glob if r.task_id in CROSS_MODAL_TASKS]
    per_task: dict[str, dict[str, dict[str, float]]] = {}
    for r in report.tasks:
        per_task.setdefault(r.task, {})[r.pool] = {f"recall@{k}": r.recall[k], "modality_accuracy": r.modality_accuracy}
    return {f"recall@{k}": mean(cross, "recall"), "modality_accuracy": mean(cross, "modality"),
            f"multimodal_recall@{k}": mean(glob, "recall"),
            f"local_recall@{k}": mean([r for r in report.tasks if r.pool == "local"], "recall"),
            "text_ndcg@10": float(report.text.get("ndcg@10", float("nan"))), "per_task": per_task}


def summary_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`stage_summary` results, one row per stage."""
    rows = ["| stage | R@5 cross-modal (global) | modality acc. | R@5 all (global) | R@5 (local) | text nDCG@10 |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {name} | {s['recall@5']:.3f} | {s['modality_accuracy']:.3f} | {s['multimodal_recall@5']:.3f} | "
             f"{s['local_recall@5']:.3f} | {s['text_ndcg@10']:.3f} |" for name, s in summaries.items()]
    return "\n".join(rows)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tree_fingerprint(root: Path, content: tuple[str, ...] = (".jsonl", ".json", ".tsv", ".txt", ".yaml")) -> str:
    """Hash of a directory: the bytes of its small text files, the name and size of everything else."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        digest.update(f"{rel}|{path.stat().st_size}|".encode())
        if path.suffix in content:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_tiny_base(path: str | os.PathLike, sizes: TinyModel = TinyModel(), seed: int = 0) -> Path:
    """A randomly initialised checkpoint in the released format, sized by ``sizes``, stored in float32."""
    path = Path(path)
    make_tiny_checkpoint(path, seed=seed, dtype=torch.float32, hidden_size=sizes.hidden_size, layers=sizes.layers,
                         vision_hidden=sizes.vision_hidden, vision_layers=sizes.vision_layers)
    model, raw = load_model(path)
    torch.manual_seed(seed)
    model.latent_attention_model = LatentAttentionPooling(sizes.hidden_size, num_latents=sizes.num_latents,
                                                          heads=sizes.latent_heads, head_dim=sizes.latent_head_dim)
    raw["latent_attention_heads"] = sizes.latent_heads  # the loader reads the other sizes off the weights
    for old in path.glob("*.safetensors"):
        old.unlink()
    save_model(model, path, raw, max_shard_bytes=50_000_000)
    return path


def _stage_args(name: str, base_model: str, output_dir: Path, tiny: bool, overrides: Mapping[str, Any] | None,
                seed: int, show_progress: bool) -> TrainArguments:
    """Recipe ``finetune/recipes/<stage>.yaml``, then the tiny defaults, the caller's overrides, the pipeline's."""
    recipe = RECIPES / ("stage3_text.yaml" if name == "stage3" else f"{name}.yaml")
    merged: dict[str, Any] = {"seed": seed + STAGES.index(name) + 1}
    if tiny:
        merged.update(TINY_STAGE_DEFAULTS[name])
    merged.update(overrides or {})
    merged.update({"model_path": base_model, "output_dir": str(output_dir), "overwrite_output_dir": True,
                   "resume_from": None, "show_progress": show_progress, "data_factory": None, "data_options": {}})
    return load_arguments(recipe, merged)


def _key_args(args: TrainArguments) -> dict[str, Any]:
    """The arguments that decide a stage's result (paths and display settings left out)."""
    skip = {"model_path", "output_dir", "overwrite_output_dir", "resume_from", "show_progress", "log_every",
            "save_every", "keep_checkpoints"}
    return {k: v for k, v in args.to_dict().items() if k not in skip}


def _read_marker(directory: Path, key: str) -> dict[str, Any] | None:
    marker = directory / "stage.json"
    data = json.loads(marker.read_text()) if marker.is_file() else {}
    return data if data.get("key") == key else None


def _write_marker(directory: Path, data: dict[str, Any]) -> None:
    tmp = directory / ".stage.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, directory / "stage.json")


def report_from_dict(data: Mapping[str, Any]) -> EvaluationReport:
    """The inverse of :meth:`EvaluationReport.to_dict` (what ``eval --json`` and ``stage.json`` hold)."""
    tasks = [TaskResult(**{**t, "recall": {int(k): v for k, v in t["recall"].items()}}) for t in data["tasks"]]
    return EvaluationReport(tasks, dict(data.get("text", {})))


def _local_negatives(dataset: MBEIRDataset, per_query: int, seed: int) -> list[MBEIRQuery]:
    """Queries whose ``neg_cand_list`` holds ``per_query`` random candidates of their task's local pool.

    Stage 1's random negatives: same-task candidates, as M-BEIR's training negatives are. The data loader
    samples ``num_negatives`` of them per epoch, so they rotate.
    """
    out = []
    for query in dataset.queries:
        rng = random.Random(f"{seed}:local-negatives:{query.qid}")
        pool = [did for did in dataset.local_pool(query.task) if did not in set(query.pos_cand_list)]
        out.append(replace(query, neg_cand_list=tuple(rng.sample(pool, min(per_query, len(pool))))))
    return out


@dataclass
class _Context:
    """What every step of one run shares, and the wall/CPU seconds of the steps that ran."""

    workdir: Path
    data: Path
    data_key: str
    tiny: bool
    seed: int
    show_progress: bool
    eval_batch_size: int
    eval_split: str
    test: MBEIRDataset
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def progress(self) -> bool | None:
        return None if self.show_progress else False  # None: the encoder's own rule (bars for long runs)

    def file(self, split: str, kind: str) -> Path:
        manifest = json.loads((self.data / "manifest.json").read_text())
        return self.data / (manifest["text"][split]["queries"] if kind == "text" else manifest["splits"][split][kind])

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.timings[name] = {"wall": round(time.perf_counter() - wall, 2), "cpu": round(time.process_time() - cpu, 2)}


def _evaluated(ctx: _Context, directory: Path, marker: dict[str, Any], max_length: int) -> EvaluationReport:
    """The stage's evaluation on the evaluation split, from its marker when the model and data are unchanged."""
    eval_key = _hash("eval", marker["key"], ctx.data_key, ctx.eval_split)
    if marker.get("eval_key") == eval_key:
        return report_from_dict(marker["report"])
    with ctx.timed(f"{marker['name']}_eval"):
        encoder = Encoder.from_pretrained(directory / "model", max_length=max_length)
        report = evaluate(encoder, ctx.test, *load_text_benchmark(ctx.data, ctx.eval_split), pools=("local", "global"),
                          ks=(1, 5, 10), batch_size=ctx.eval_batch_size, cache_dir=ctx.workdir / "cache",
                          model_key=marker["key"], show_progress=ctx.progress)
    (directory / "eval.md").write_text(report.to_markdown())
    marker.update(eval_key=eval_key, report=report.to_dict())
    _write_marker(directory, marker)
    return report


def _run_stage(ctx: _Context, name: str, init: Path, init_key: str, overrides: Mapping[str, Any] | None,
               data: dict[str, Any]) -> StageResult:
    """Train one stage (unless cached under the same key) and evaluate it."""
    args = _stage_args(name, str(init), ctx.workdir, ctx.tiny, overrides, ctx.seed, ctx.show_progress)
    # The data directory's content is ctx.data_key; the queries files are written by earlier steps.
    files = {k: hashlib.sha256(Path(data[k]).read_bytes()).hexdigest() for k in ("queries", "text") if k in data}
    key = _hash(name, init_key, ctx.data_key, _key_args(args), files, data.get("negatives"))
    directory = ctx.workdir / f"{name}-{key}"
    args.output_dir = str(directory)
    marker, cached = _read_marker(directory, key), True
    if marker is None or not (directory / "model" / "config.json").is_file():
        cached = False
        logger.info("%s: training %d steps from %s (%s)", name, args.max_steps, init, directory)
        with ctx.timed(name):
            train(args, *training_data(args, **data))
        marker = {"key": key, "name": name, "init": str(init), "args": args.to_dict(),
                  "data": {k: str(v) for k, v in data.items()}, "train_time": ctx.timings[name]}
        _write_marker(directory, marker)
    else:
        logger.info("%s: cached (%s)", name, directory)
    report = _evaluated(ctx, directory, marker, args.max_length)
    return StageResult(name, key, directory / "model", report, cached, marker["args"], marker["data"],
                       marker["train_time"])


def _mine(ctx: _Context, stage1: StageResult, options: MiningOptions, fallback: list[MBEIRQuery] | None,
          train_set: MBEIRDataset) -> tuple[Path, dict[str, Any]]:
    """Mine with the stage-1 model; returns the stage-2 queries file and the mining record."""
    key = _hash("mining", stage1.key, ctx.data_key, asdict(options), ctx.seed, fallback is not None)
    directory = ctx.workdir / f"mining-{key}"
    queries = directory / "stage2_queries.jsonl"
    marker = _read_marker(directory, key)
    if marker is None or not queries.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        with ctx.timed("mining"):
            encoder = Encoder.from_pretrained(stage1.model_dir, max_length=stage1.args["max_length"])
            result = mine_hard_negatives(encoder, train_set, output=directory / "train_hardneg.jsonl",
                                         **asdict(options), seed=ctx.seed, batch_size=ctx.eval_batch_size,
                                         cache_dir=ctx.workdir / "cache", model_key=stage1.key,
                                         show_progress=ctx.progress)
        mined = result.dataset.queries
        if fallback is not None:  # a query with no mined negative keeps its stage-1 random ones
            mined = [m if m.neg_cand_list else f for m, f in zip(mined, fallback, strict=True)]
        train_set.write_queries(queries, mined)
        marker = {"key": key, "name": "mining", "options": asdict(options), "counts": result.counts,
                  "mined": str(result.path)}
        _write_marker(directory, marker)
    return queries, {k: marker[k] for k in ("counts", "mined", "options")} | {"queries": str(queries)}


def _prepare_data(workdir: Path, data_dir: str | os.PathLike | None, benchmark: Benchmark) -> Path:
    path = Path(data_dir) if data_dir is not None else workdir / f"data-{_hash('data', asdict(benchmark))}"
    if data_dir is not None and not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}: no manifest.json; the pipeline reads the layout generate_benchmark "
                                "writes (python -m mmembed_rag.finetune synth --out DIR)")
    if not (path / "manifest.json").is_file():  # written last: a complete benchmark
        logger.info("generating the synthetic benchmark in %s", path)
        generate_benchmark(path, **asdict(benchmark))
    return path


def _prepare_base(workdir: Path, base_model: str | os.PathLike | None, sizes: TinyModel,
                  seed: int) -> tuple[Path, str]:
    if base_model is None:
        key = _hash("tiny", asdict(sizes), seed)
        path = workdir / f"base-{key}"
        if _read_marker(path, key) is None:
            shutil.rmtree(path, ignore_errors=True)
            build_tiny_base(path, sizes, seed)
            _write_marker(path, {"key": key, "name": "base", "sizes": asdict(sizes), "seed": seed})
        return path, key
    path = Path(base_model)  # for a hub id the name is the best key there is
    return path, _hash("base", str(path.resolve()), _tree_fingerprint(path)) if path.is_dir() else _hash("base", path)


def run_pipeline(workdir: str | os.PathLike, *, base_model: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None, stage1: Mapping[str, Any] | None = None,
                 stage2: Mapping[str, Any] | None = None, stage3: Mapping[str, Any] | None = None,
                 mining: MiningOptions = MiningOptions(), stage2_init: Literal["stage1", "base"] = "stage1",
                 stage1_negatives: Literal["local", "global"] = "local", text_fraction: float = 0.2,
                 tiny_model: TinyModel = TinyModel(), benchmark: Benchmark = Benchmark(), eval_batch_size: int = 32,
                 export_dtype: str | None = None, seed: int = 0, eval_split: Literal["test", "val"] = "test",
                 show_progress: bool = True) -> PipelineResult:
    """Run (or resume) the staged recipe in ``workdir``; cached steps are reused.

    Args:
        workdir: where every step's directory, the embedding cache and ``final-model/`` go.
        base_model: checkpoint in the released format (directory or hub id); ``None`` builds a tiny one
            (``tiny_model``) and applies :data:`TINY_STAGE_DEFAULTS` to the recipes.
        data_dir: a benchmark directory as :func:`~.synthetic.generate_benchmark` lays it out (manifest.json);
            ``None`` generates one (``benchmark``).
        stage1, stage2, stage3: dotted-key overrides of ``finetune/recipes/stage{1,2,3_text}.yaml``
            (``{"max_steps": 100, "lora.rank": 4}``).
        mining: hard negative mining settings.
        stage2_init: ``"stage1"`` continues from the stage-1 model; ``"base"`` retrains the base model with
            the mined negatives, as the MM-Embed paper does. On the tiny random base that needs stage 1's
            600 steps again (3x the CPU of continuing for 200) for a similar cross-modal gain.
        stage1_negatives: ``"local"``: random negatives from the query's own task pool (same modality, as
            M-BEIR's training negatives); ``"global"``: random candidates of the whole pool, any modality.
        text_fraction: share of stage-3 batches drawn from the text pairs (the rest: the multimodal tasks,
            with their mined negatives); ignored when ``stage3`` sets ``task_mixing``.
        tiny_model, benchmark: sizes of the default base model and data.
        eval_batch_size: encoding batch size for mining and evaluation.
        export_dtype: dtype of the exported final model (default: the training dtype).
        seed: training, sampling and tiny-model seed (stage k trains with ``seed + k``).
        eval_split: the split every stage is evaluated on: ``"val"`` while tuning settings, ``"test"`` to report.
        show_progress: progress bars.

    Returns:
        A :class:`PipelineResult`; also written to ``workdir/pipeline_result.json``.

    Raises:
        FileNotFoundError: ``data_dir`` has no manifest.json.
        ValueError: ``text_fraction`` outside [0, 1].
        ArgumentsError: an override names an unknown key or has a bad value.
    """
    if not 0.0 <= text_fraction <= 1.0:
        raise ValueError(f"text_fraction must be in [0, 1], got {text_fraction}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    data = _prepare_data(workdir, data_dir, benchmark)
    base, base_key = _prepare_base(workdir, base_model, tiny_model, seed)
    ctx = _Context(workdir, data, _tree_fingerprint(data), base_model is None, seed, show_progress, eval_batch_size,
                   eval_split, load_benchmark(data, eval_split))
    train_set = load_benchmark(data, "train")
    ctx.timings["setup"] = {"wall": round(time.perf_counter() - wall, 2), "cpu": round(time.process_time() - cpu, 2)}
    common = {"pool": ctx.file("train", "global_pool"), "instructions": data / "instructions/query_instructions.tsv",
              "image_root": data}
    fallback = None
    if stage1_negatives == "local":
        fallback = _local_negatives(train_set, 16, seed)
        queries = workdir / f"stage1_queries-{_hash('local-negatives', ctx.data_key, seed)}.jsonl"
        if not queries.is_file():
            train_set.write_queries(queries, fallback)
        first = _run_stage(ctx, "stage1", base, base_key, stage1, {**common, "queries": queries, "negatives": "auto"})
    elif stage1_negatives == "global":
        first = _run_stage(ctx, "stage1", base, base_key, stage1,
                           {**common, "queries": ctx.file("train", "queries"), "negatives": "random"})
    else:
        raise ValueError(f"stage1_negatives must be 'local' or 'global', got {stage1_negatives!r}")
    mined, mining_record = _mine(ctx, first, mining, fallback, train_set)
    init, init_key = (first.model_dir, first.key) if stage2_init == "stage1" else (base, base_key)
    second = _run_stage(ctx, "stage2", init, init_key, stage2, {**common, "queries": mined, "negatives": "auto"})
    stage3 = dict(stage3 or {})
    if "task_mixing" not in stage3:
        stage3["task_mixing"] = _text_mixing(train_set, ctx.file("train", "text"), text_fraction)
    third = _run_stage(ctx, "stage3", second.model_dir, second.key, stage3,
                       {**common, "queries": mined, "text": ctx.file("train", "text"), "negatives": "auto"})
    stages = {"stage1": first, "stage2": second, "stage3": third}
    final = _export(ctx, base, stages, export_dtype)
    result = PipelineResult(workdir, data, base, stages, mining_record, final, ctx.timings)
    (workdir / "pipeline_result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def _text_mixing(train_set: MBEIRDataset, text_file: Path, fraction: float) -> dict[str, float]:
    """Per-task epoch shares (``task_mixing``) that make ``fraction`` of the stage-3 examples text pairs."""
    n_text = sum(1 for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip())
    tasks = sorted(set(train_set.tasks))
    if fraction <= 0.0:
        return {"text": 0.0}
    share = n_text * (1.0 - fraction) / (fraction * len(train_set.queries))
    return {"text": 1.0, **dict.fromkeys(tasks, round(share, 4))}


def _export(ctx: _Context, base: Path, stages: dict[str, StageResult], dtype: str | None) -> Path:
    """Write the stage's model to ``workdir/final-model`` with a model card of every stage's evaluation."""
    stage = stages["stage3"]
    key = _hash("export", stage.key, dtype)
    final = ctx.workdir / "final-model"
    if _read_marker(final, key) is not None:
        return final
    shutil.rmtree(final, ignore_errors=True)
    encoder = Encoder.from_pretrained(stage.model_dir, device="cpu", dtype="float32",
                                      max_length=stage.args["max_length"])
    card = summary_table({n: s.summary() for n, s in stages.items()}) + "\n\nFinal model, per task:\n\n" \
        + stage.report.to_markdown()
    with ctx.timed("export"):
        export_model(encoder.model, encoder, final, dtype=dtype, base_model=base, metrics=card,
                     training_args=stage.args, inplace=True)
    _write_marker(final, {"key": key, "name": "export", "from": str(stage.model_dir)})
    return final
