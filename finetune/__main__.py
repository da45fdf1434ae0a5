"""Command line: ``python -m mmembed_rag.finetune {synth,build-base,train,mine,eval,export,pipeline} ...``.

A thin front end over the package's functions::

    python -m mmembed_rag.finetune synth --out data
    python -m mmembed_rag.finetune build-base --output base --generative llava-next --text-embedder nv-embed
    python -m mmembed_rag.finetune train --config finetune/recipes/stage1.yaml --model_path ckpt --output_dir run ...
    python -m mmembed_rag.finetune mine --model run/model --data data --output data/train_hardneg.jsonl
    python -m mmembed_rag.finetune eval --model run/model --data data --json report.json --markdown report.md
    python -m mmembed_rag.finetune export --run run --output exported --dtype float16
    python -m mmembed_rag.finetune pipeline --workdir runs/pipeline --stage1 max_steps=300
    python -m mmembed_rag.finetune pipeline --workdir runs/mine --generative Qwen3-VL-2B-Instruct

Errors are reported as one line on stderr with exit code 2; ``-v`` adds the stack trace (and debug logs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

__all__ = ["main"]

logger = logging.getLogger("mmembed_rag.finetune")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    text = "; ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__
    return text.replace(":;", ":")


def _key_values(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def _dataset(args: argparse.Namespace, split: str) -> Any:
    """The M-BEIR data of ``--data`` (a generated benchmark) or of the explicit ``--queries``/``--pool`` files."""
    from .data import MBEIRDataset
    from .synthetic import load_benchmark

    if args.data is not None:
        return load_benchmark(args.data, split)
    if args.queries is None or args.pool is None:
        raise ValueError("give --data DIR (a generated benchmark) or --queries FILE and --pool FILE")
    return MBEIRDataset.load(args.queries, args.pool, instructions=args.instructions,
                             qrels=getattr(args, "qrels", None), image_root=args.image_root)


def _encoder(path: str, max_length: int) -> Any:
    """The encoder on this process's device: under torchrun / accelerate, each rank's own accelerator."""
    from mmembed_rag.cli.distributed import join_processes
    from mmembed_rag.encoder import Encoder

    return Encoder.from_pretrained(path, max_length=max_length, device=join_processes(None).device)


def _synth(args: argparse.Namespace, _: list[str]) -> int:
    from .synthetic import generate_benchmark

    manifest = generate_benchmark(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                                  image_size=args.image_size, distractors=args.distractors)
    for split, files in manifest["splits"].items():
        print(f"{split}: {files['n_queries']} queries, {files['n_candidates']} candidates in the global pool")
    print(f"written to {args.out}")
    return 0


def _train(_: argparse.Namespace, rest: list[str]) -> int:
    from .arguments import load_arguments
    from .train import main as train_main

    if "-h" not in rest and "--help" not in rest:  # check the recipe here, so a bad key is one line
        config = _Parser(add_help=False)
        config.add_argument("--config", type=Path)
        known, overrides = config.parse_known_args(rest)
        arguments = load_arguments(known.config, overrides)
        if arguments.data_factory is None:
            raise ValueError("no training data: set data_factory in the recipe ('package.module:function')")
    return train_main(rest)


def _mine(args: argparse.Namespace, _: list[str]) -> int:
    from .mining import mine_hard_negatives
    from .parallel import is_main_process

    dataset = _dataset(args, args.split)
    result = mine_hard_negatives(_encoder(args.model, args.max_length), dataset, output=args.output,
                                 top_k=args.top_k, c2_start=args.c2_start, num_negatives=args.num_negatives,
                                 num_c1=args.num_c1, strategy=args.strategy, pool=args.search_pool, seed=args.seed,
                                 batch_size=args.batch_size, cache_dir=args.cache_dir)
    if not is_main_process():  # data-parallel: every rank holds the same result; one reports it
        return 0
    print("| task | queries | C1 | C2 | negatives | without |\n|---|---|---|---|---|---|")
    for task, c in sorted(result.counts.items()):
        print(f"| {task} | {c['queries']} | {c['c1']} | {c['c2']} | {c['negatives']} | {c['empty']} |")
    print(f"\nqueries with hard negatives written to {result.path}")
    return 0


def _eval(args: argparse.Namespace, _: list[str]) -> int:
    from .data import TextRetrievalData, read_jsonl
    from .evaluate import evaluate
    from .parallel import is_main_process
    from .synthetic import load_text_benchmark

    text = corpus = None
    if args.text is not None:
        if args.corpus is None:
            raise ValueError("--text needs --corpus (a jsonl of {did, txt} passages)")
        text = TextRetrievalData.load(args.text)
        corpus = {r["did"]: r["txt"] for _, r in read_jsonl(args.corpus)}
    elif args.data is not None and not args.no_text:
        text, corpus = load_text_benchmark(args.data, args.split)
    dataset = _dataset(args, args.split) if (args.data is not None or args.queries is not None) else None
    if dataset is None and text is None:
        raise ValueError("nothing to evaluate: give --data DIR, --queries/--pool, or --text/--corpus")
    report = evaluate(_encoder(args.model, args.max_length), dataset, text, corpus, pools=args.pools, ks=args.ks,
                      batch_size=args.batch_size, cache_dir=args.cache_dir)
    if not is_main_process():  # data-parallel: every rank holds the same report; one writes it
        return 0
    if args.json is not None:
        report.to_json(args.json)
    markdown = report.to_markdown()
    if args.markdown is not None:
        args.markdown.write_text(markdown)
    print(markdown)
    return 0


def _build_base(args: argparse.Namespace, _: list[str]) -> int:
    from .build_base import build_base

    pooling: Any = args.pooling
    sizes = {k: v for k, v in (("num_latents", args.latents), ("heads", args.latent_heads)) if v is not None}
    if sizes:
        if pooling != "latent_attention":
            raise ValueError("--latents and --latent-heads size a fresh head: add --pooling latent_attention")
        pooling = sizes
    out = build_base(args.output, generative=args.generative, text_embedder=args.text_embedder, pooling=pooling,
                     seed=args.seed)
    print(json.dumps({"output": str(out), **json.loads((out / "base_parts.json").read_text())}, indent=2))
    return 0


def _export(args: argparse.Namespace, _: list[str]) -> int:
    from .export import export_model
    from .pipeline import report_from_dict

    metrics = None
    if args.metrics is not None:
        raw = args.metrics.read_text()
        metrics = report_from_dict(json.loads(raw)).to_markdown() if args.metrics.suffix == ".json" else raw
    if (args.model is None) == (args.run is None):
        raise ValueError("give exactly one of --model DIR (a model to re-export) or --run DIR (a training run)")
    if args.run is not None:
        encoder, model, training_args = _checkpoint_model(args.run, args.checkpoint)
        base = training_args["model_path"]
    else:
        encoder = _encoder(args.model, 4096)
        model, training_args, base = encoder.model, None, args.model
    out = export_model(model, encoder, args.output, dtype=args.dtype, base_model=base, metrics=metrics,
                       training_args=training_args, inplace=True)
    print(f"exported to {out}")
    return 0


def _checkpoint_model(run: Path, checkpoint: str) -> tuple[Any, Any, dict[str, Any]]:
    """Rebuild a training run's model (its train_args.yaml) and load a checkpoint's trainable weights."""
    import torch
    from safetensors.torch import load_file

    from .arguments import TrainArguments
    from .train import build_model, latest_checkpoint

    path = latest_checkpoint(run) if checkpoint == "latest" else Path(checkpoint)
    if path is None or not (path / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"{run}: no complete checkpoint ({checkpoint})")
    args = TrainArguments.from_yaml(run / "train_args.yaml")
    encoder, model = build_model(args)
    weights = load_file(str(path / "trainable.safetensors"))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise ValueError(f"{path}: its weights do not match the model train_args.yaml describes")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    logger.info("loaded %s", path)
    return encoder, model.eval(), args.to_dict()


def _pipeline(args: argparse.Namespace, _: list[str]) -> int:
    from .pipeline import Benchmark, MiningOptions, run_pipeline, summary_table

    base_model = args.base_model
    if args.generative is not None:  # from pretrained parts: build the base first (reused when already built)
        if base_model is not None:
            raise ValueError("give --base-model or --generative (a base built from parts), not both")
        from .build_base import build_base

        target = args.workdir / "base-from-parts"
        base_model = target if (target / "config.json").is_file() else build_base(
            target, generative=args.generative, text_embedder=args.text_embedder, pooling=args.pooling)
    result = run_pipeline(args.workdir, base_model=base_model, data_dir=args.data_dir,
                          stage1=_key_values(args.stage1), stage2=_key_values(args.stage2),
                          stage3=_key_values(args.stage3), stage2_init=args.stage2_init,
                          stage1_negatives=args.stage1_negatives, text_fraction=args.text_fraction,
                          mining=MiningOptions(top_k=args.top_k, c2_start=args.c2_start,
                                               num_negatives=args.num_negatives, num_c1=args.num_c1),
                          benchmark=Benchmark(n_train=args.n_train, n_test=args.n_test), seed=args.seed,
                          export_dtype=args.dtype, show_progress=not args.no_progress)
    print(summary_table(result.summary()))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    print(f"\nfinal model: {result.final_model}")
    return 0


def _data_args(parser: argparse.ArgumentParser, split: str) -> None:
    group = parser.add_argument_group("data (a generated benchmark, or M-BEIR files)")
    group.add_argument("--data", type=Path, help="benchmark directory with manifest.json (see `synth`)")
    group.add_argument("--split", default=split, help=f"benchmark split (default {split})")
    group.add_argument("--queries", type=Path, help="M-BEIR queries jsonl (instead of --data)")
    group.add_argument("--pool", type=Path, help="candidate pool jsonl (instead of --data)")
    group.add_argument("--instructions", type=Path, help="UniIR-style instruction tsv (default: the catalog)")
    group.add_argument("--image-root", type=Path, help="directory image paths are relative to")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory in the released format")
    parser.add_argument("--batch-size", type=int, default=32, help="encoding batch size")
    parser.add_argument("--max-length", type=int, default=512, help="text tokens per prompt")
    parser.add_argument("--cache-dir", type=Path, help="pool-embedding cache directory")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (every subcommand's options)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and stack traces")
    parser = _Parser(prog="python -m mmembed_rag.finetune", parents=[common],
                     description="Fine-tuning tools: synthetic data, training, mining, evaluation, export, "
                                 "and the whole staged recipe.")
    parser.set_defaults(verbose=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def add(name: str, text: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, parents=[common], **kw)

    synth = add("synth", "write the synthetic M-BEIR-format benchmark")
    synth.add_argument("--out", type=Path, required=True, help="target directory")
    synth.add_argument("--n-train", type=int, default=200, help="training queries per task")
    synth.add_argument("--n-test", type=int, default=50, help="test queries per task")
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--distractors", type=float, default=1.0, help="extra candidates per local pool (x queries)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)

    base = add("build-base", "build a bi-encoder base from a generative checkpoint (and an NV-Embed-format embedder)")
    base.add_argument("--output", type=Path, required=True, help="new or empty directory")
    base.add_argument("--generative", type=Path, required=True, help="LLaVA-NeXT or Qwen3-VL generative checkpoint")
    base.add_argument("--text-embedder", type=Path, help="NV-Embed-format checkpoint (LLaVA-NeXT bases)")
    base.add_argument("--pooling", choices=("latent_attention", "mean", "last_token"),
                      help="a fresh pooling head (LLaVA-NeXT bases without --text-embedder)")
    base.add_argument("--latents", type=int, help="with --pooling latent_attention: latents (default 512)")
    base.add_argument("--latent-heads", type=int, help="with --pooling latent_attention: heads (default 8)")
    base.add_argument("--seed", type=int, default=0, help="initialisation of a fresh pooling head")
    base.set_defaults(func=_build_base)

    add("train", "contrastive training: --config RECIPE plus --key value overrides (see `train --help`)",
        add_help=False).set_defaults(func=_train)

    mine = add("mine", "mine modality-aware hard negatives and write a queries file")
    _model_args(mine)
    _data_args(mine, "train")
    mine.add_argument("--output", type=Path, required=True, help="queries jsonl to write")
    mine.add_argument("--top-k", type=int, default=50)
    mine.add_argument("--c2-start", type=int, default=45)
    mine.add_argument("--num-negatives", type=int, default=4)
    mine.add_argument("--num-c1", type=int, help="negatives taken from C1 (default: uniform over C1 | C2)")
    mine.add_argument("--strategy", choices=("modality_aware", "topk"), default="modality_aware")
    mine.add_argument("--search-pool", choices=("global", "local"), default="global",
                      help="retrieve from the global pool or from each task's local pool")
    mine.add_argument("--seed", type=int, default=0)
    mine.set_defaults(func=_mine)

    ev = add("eval", "M-BEIR Recall@k, modality accuracy and text nDCG@10, as Markdown and JSON")
    _model_args(ev)
    _data_args(ev, "test")
    ev.add_argument("--qrels", type=Path, help="qrels file (with --queries)")
    ev.add_argument("--text", type=Path, help="text retrieval jsonl (query, positives)")
    ev.add_argument("--corpus", type=Path, help="text-only pool jsonl (did, txt), with --text")
    ev.add_argument("--no-text", action="store_true", help="skip the benchmark's text set")
    ev.add_argument("--pools", nargs="+", choices=("local", "global"), default=["local", "global"])
    ev.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10], help="Recall@k cut-offs")
    ev.add_argument("--json", type=Path, help="write the report as JSON")
    ev.add_argument("--markdown", type=Path, help="write the report as Markdown")
    ev.set_defaults(func=_eval)

    export = add("export", "write a model (or a training run's checkpoint) in the released format")
    export.add_argument("--model", help="a model directory to re-export (e.g. to another dtype)")
    export.add_argument("--run", type=Path, help="a training output_dir: export one of its checkpoints")
    export.add_argument("--checkpoint", default="latest", help="with --run: 'latest' or a checkpoint directory")
    export.add_argument("--output", type=Path, required=True)
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    export.add_argument("--metrics", type=Path, help="evaluation for the model card (eval's .json or .md)")
    export.set_defaults(func=_export)

    pipe = add("pipeline", "the staged recipe: stage 1, mining, stage 2, stage 3, evaluation, export (cached)")
    pipe.add_argument("--workdir", type=Path, required=True)
    pipe.add_argument("--base-model", help="released-format checkpoint (default: a tiny random one)")
    pipe.add_argument("--generative", type=Path, help="build the base from this generative checkpoint (see build-base)")
    pipe.add_argument("--text-embedder", type=Path, help="with --generative: an NV-Embed-format text embedder")
    pipe.add_argument("--pooling", choices=("latent_attention", "mean", "last_token"),
                      help="with --generative and no --text-embedder: a fresh pooling head")
    pipe.add_argument("--data-dir", type=Path, help="benchmark directory (default: generated)")
    for stage in ("stage1", "stage2", "stage3"):
        pipe.add_argument(f"--{stage}", action="append", default=[], metavar="KEY=VALUE",
                          help=f"{stage} recipe override, repeatable (e.g. max_steps=300, lora.rank=4)")
    pipe.add_argument("--stage2-init", choices=("stage1", "base"), default="stage1")
    pipe.add_argument("--stage1-negatives", choices=("local", "global"), default="local")
    pipe.add_argument("--text-fraction", type=float, default=0.2, help="share of stage-3 batches that are text")
    pipe.add_argument("--top-k", type=int, default=50)
    pipe.add_argument("--c2-start", type=int, default=45)
    pipe.add_argument("--num-negatives", type=int, default=4, help="mined negatives per query")
    pipe.add_argument("--num-c1", type=int)
    pipe.add_argument("--n-train", type=int, default=200, help="generated data: training queries per task")
    pipe.add_argument("--n-test", type=int, default=50, help="generated data: test queries per task")
    pipe.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="exported weights' dtype")
    pipe.add_argument("--seed", type=int, default=0)
    pipe.add_argument("--no-progress", action="store_true")
    pipe.add_argument("--json", type=Path, help="write the full result as JSON")
    pipe.set_defaults(func=_pipeline)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 on any error)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args, rest)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's contract: any failure is one line and exit code 2
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
