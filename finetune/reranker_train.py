"""Fine-tuning the MLLM reranker: LoRA (or every weight) of its LLaVA-NeXT model, "True"/"False" as targets.

Beyond the paper, which uses the reranker zero-shot. Each training query contributes its positive (target
"True") and ``num_negatives`` negatives (target "False"). With a bi-encoder the negatives are drawn from its
top ``mining_top_k`` (:func:`~mmembed_rag.finetune.mining.mine_hard_negatives`, plain top-k), the very
candidates the reranker will reorder; without one they are random pool candidates. The loss reads the same
two logits :meth:`MLLMReranker.score` turns into P("True") (:meth:`MLLMReranker.answer_logits`)::

    python -m mmembed_rag.finetune.reranker_train --config finetune/recipes/reranker.yaml \\
        --model_path rr-ckpt --output_dir runs/rerank --queries q.jsonl --pool pool.jsonl --encoder runs/stage1/model

The loop is the bi-encoder's (:mod:`~mmembed_rag.finetune.train`): accelerate, seeded global batches sliced
per process, checkpoints and exact resumption, the same output-directory rules. The result,
``output_dir/model``, holds merged weights that :meth:`MLLMReranker.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from mmembed_rag.devices import resolve_dtype
from mmembed_rag.encoder import Encoder
from mmembed_rag.hub import resolve_checkpoint
from mmembed_rag.items import MultimodalItem
from mmembed_rag.rerank_templates import RerankTemplate, TemplateError, get_template
from mmembed_rag.reranker import MLLMReranker

from . import arguments, train
from .arguments import ArgumentsError, RunArguments, parse_overrides
from .data import ContrastiveDataset, MBEIRDataset
from .examples import ContrastiveExample
from .export import _is_peft
from .mining import mine_hard_negatives

_help = arguments._help  # the recipes' field helper; the training loop's parts come from train

__all__ = ["AnswerLogits", "RerankBatch", "RerankCollator", "RerankLoss", "RerankerTrainArguments", "build_reranker",
           "export_reranker", "load_reranker_arguments", "reranker_examples", "train_reranker", "main"]

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("config.json", "README.md", "model.safetensors.index.json")  # written anew by the export


@dataclass
class RerankerTrainArguments(RunArguments):
    """One reranker training run (a LLaVA-NeXT generative checkpoint as ``model_path``): the shared
    :class:`~mmembed_rag.finetune.arguments.RunArguments` plus the fields below; YAML recipe keys
    (``finetune/recipes/reranker.yaml``) or ``--key value``."""

    what: ClassVar[str] = "reranker training arguments"

    batch_size: int = _help("queries per step, all processes together (each brings 1 + num_negatives pairs)", 8)
    max_steps: int = _help("optimisation steps", 500)
    train_projector: bool = _help("train the vision-to-text projector and image_newline too", True)
    template: str | dict[str, str] | None = _help(
        "a built-in template name, or {query: ..., candidate: ...} (a RerankTemplate; pass the same one at inference), "
        "for every pair; null: the built-in template chosen by the pair's modalities", None)
    loss: Literal["pointwise", "listwise"] = _help(
        "'pointwise': cross-entropy over the (True, False) logits of each pair; 'listwise': cross-entropy of the "
        "positive among its query's pairs, scored by logit(True) - logit(False)", "pointwise")
    num_negatives: int = _help("negatives per query and step", 3)
    mining_top_k: int = _help("with a bi-encoder: negatives come from its top k (the depth it hands over)", 10)
    mining_pool: Literal["local", "global"] = _help("pool mined with the bi-encoder", "local")
    tasks: list[str] = _help("task keys to train on (e.g. cirr_it2i); empty: all", factory=list)

    def problems(self) -> list[str]:
        problems = super().problems()
        problems += [f"{name} must be >= 1, got {getattr(self, name)}" for name in ("mining_top_k", "num_negatives")
                     if getattr(self, name) < 1]
        if not (self.lora.enabled or self.full_finetune or self.train_projector):
            problems.append("nothing to train: enable lora, full_finetune or train_projector")
        try:
            self.rerank_template()
        except (TemplateError, TypeError) as err:
            problems.append(f"template: {err}")
        return problems

    def rerank_template(self) -> str | RerankTemplate | None:
        """``template`` as :class:`MLLMReranker` takes it (a mapping becomes a :class:`RerankTemplate`)."""
        if isinstance(self.template, dict):
            return RerankTemplate(**{"name": "custom", **self.template})
        return get_template(self.template) if self.template is not None else None


def load_reranker_arguments(path: str | Path | None, overrides: Mapping[str, Any] | Sequence[str] | None = None
                            ) -> RerankerTrainArguments:
    """Read a YAML recipe (or start empty with ``path=None``) and apply dotted-key overrides.

    The same rules as :func:`~mmembed_rag.finetune.arguments.load_arguments`: unknown keys (with the valid ones
    listed), missing required keys and wrong types are :class:`ArgumentsError` naming the file.
    """
    data: dict[str, Any] = {}
    source = "arguments"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ArgumentsError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(data, dict):
            raise ArgumentsError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    if overrides:
        for key, value in (overrides if isinstance(overrides, Mapping) else parse_overrides(list(overrides))).items():
            arguments._apply(data, key, value)
        source += " + overrides"
    return arguments._build(RerankerTrainArguments, data, source, prefix="")


def reranker_examples(args: RerankerTrainArguments, dataset: MBEIRDataset, encoder: Encoder | None = None,
                      ) -> ContrastiveDataset:
    """The training examples: ``dataset[i]`` is query i with its positive and ``args.num_negatives`` negatives.

    Negatives rotate per epoch (``set_epoch``). With ``encoder`` they come from its top ``args.mining_top_k``
    of ``args.mining_pool`` (positives excluded), else at random from the whole pool.

    Raises:
        ValueError: no training query (none at all, or none of ``args.tasks``), or unknown task keys.
    """
    queries = dataset.queries
    if args.tasks:
        unknown = sorted(set(args.tasks) - {q.task for q in queries})
        if unknown:
            raise ValueError(f"tasks {unknown} have no training queries; tasks in the data: "
                             f"{sorted({q.task for q in queries})}")
        queries = [q for q in queries if q.task in args.tasks]
    if not queries:
        raise ValueError("no training data: the dataset has no queries")
    dataset = replace(dataset, queries=queries)
    if encoder is None:
        return ContrastiveDataset([dataset], seed=args.seed, num_negatives=args.num_negatives, negatives="random")
    mined = mine_hard_negatives(encoder, dataset, top_k=args.mining_top_k, c2_start=0, strategy="topk",
                                num_negatives=args.mining_top_k, pool=args.mining_pool, seed=args.seed,
                                show_progress=args.show_progress)
    # "auto": the mined list, or random pool candidates for a query whose top k was all positives.
    return ContrastiveDataset([mined.dataset], seed=args.seed, num_negatives=args.num_negatives, negatives="auto")


@dataclass
class RerankBatch:
    """(query, candidate) pairs of one step grouped by query, positive first; per pair a label (0: the answer
    is "True", 1: "False") and the index of its query in the batch (``groups``)."""

    queries: list[MultimodalItem]
    candidates: list[MultimodalItem]
    labels: torch.Tensor
    groups: torch.Tensor


class RerankCollator:
    """:class:`~mmembed_rag.finetune.examples.ContrastiveExample` list → :class:`RerankBatch`.

    The query's task instruction is dropped: the reranker's templates say what is asked.
    """

    def __call__(self, examples: Sequence[ContrastiveExample]) -> RerankBatch:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        queries, candidates, labels, groups = [], [], [], []
        for g, example in enumerate(examples):
            query = MultimodalItem(text=example.query.text, image=example.query.image)
            for label, candidate in enumerate(((example.positive,), example.negatives)):
                queries += [query] * len(candidate)
                candidates += candidate
                labels += [label] * len(candidate)
                groups += [g] * len(candidate)
        return RerankBatch(queries, candidates, torch.tensor(labels), torch.tensor(groups))


class RerankLoss(torch.nn.Module):
    """Loss over the (True, False) answer logits of a :class:`RerankBatch`.

    Args:
        kind: ``"pointwise"``: mean cross-entropy of each pair's two logits against its label (the same as BCE
            on P("True")); ``"listwise"``: per query, cross-entropy of its positive among its pairs, each
            scored by logit(True) - logit(False) (the log-odds the ranking sorts by).
    """

    def __init__(self, kind: Literal["pointwise", "listwise"] = "pointwise") -> None:
        super().__init__()
        if kind not in ("pointwise", "listwise"):
            raise ValueError(f"kind must be 'pointwise' or 'listwise', got {kind!r}")
        self.kind = kind

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        if self.kind == "pointwise":
            return torch.nn.functional.cross_entropy(logits, labels)
        margin = logits[:, 0] - logits[:, 1]
        sizes = torch.bincount(groups).tolist()
        table = torch.nn.utils.rnn.pad_sequence(list(margin.split(sizes)), batch_first=True, padding_value=-torch.inf)
        return torch.nn.functional.cross_entropy(table, torch.zeros(len(sizes), dtype=torch.long,
                                                                    device=table.device))


class AnswerLogits(torch.nn.Module):
    """The reranker's model as a module whose forward is :meth:`MLLMReranker.answer_logits`.

    accelerate (and DDP's gradient hooks) need a module to wrap; its only parameters are the reranker's model's.
    """

    def __init__(self, reranker: MLLMReranker) -> None:
        super().__init__()
        self.model = reranker.model
        self._reranker = [reranker]  # a list: not registered as a submodule (it is no Module)

    def forward(self, queries: list[MultimodalItem], candidates: list[MultimodalItem]) -> torch.Tensor:
        return self._reranker[0].answer_logits(queries, candidates)


def build_reranker(args: RerankerTrainArguments) -> MLLMReranker:
    """Load ``args.model_path`` in float32 on CPU and make trainable what ``args`` asks for (train mode).

    LoRA wraps the language model only (``model.model.language_model`` becomes a peft model): the vision
    tower's same-named projections keep their weights.
    """
    reranker = MLLMReranker.from_pretrained(args.model_path, device="cpu", dtype="float32",
                                            template=args.rerank_template(), max_length=args.max_length)
    model = reranker.model
    model.requires_grad_(args.full_finetune)
    if args.lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise ImportError('LoRA training needs peft: pip install "mmembed-rag[finetune]"') from err
        config = LoraConfig(r=args.lora.rank, lora_alpha=args.lora.alpha, lora_dropout=args.lora.dropout,
                            target_modules=list(args.lora.target_modules))
        model.model.language_model = get_peft_model(model.model.language_model, config)
    if args.train_projector:  # LLaVA-NeXT: projector and image_newline; Qwen3-VL: the vision mergers
        for name in ("multi_modal_projector", "image_newline"):
            part = getattr(model.model, name, None)
            if part is not None:
                part.requires_grad_(True)
        visual = getattr(model.model, "visual", None)
        if visual is not None:
            visual.merger.requires_grad_(True)
            visual.deepstack_merger_list.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %d of %d", trainable, sum(p.numel() for p in model.parameters()))
    model.train()
    return reranker


def export_reranker(reranker: MLLMReranker, output_dir: str | Path, *, base_model: str | Path | None = None,
                    dtype: str | torch.dtype | None = None, training_args: Mapping[str, Any] | None = None,
                    inplace: bool = False) -> Path:
    """Merge LoRA and write a checkpoint :meth:`MLLMReranker.from_pretrained` loads.

    Args:
        reranker: the trained reranker (its model may carry peft adapters).
        output_dir: target directory (created; files of the same names replaced).
        base_model: the checkpoint trained from; its tokenizer, chat template and processor files are carried
            over unchanged (default: the reranker's own tokenizer files, copied verbatim).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``; default: the weights' dtype.
        training_args: recorded in ``reranker_train_args.yaml``.
        inplace: merge into the reranker's own model (end of training) instead of a copy.

    Returns:
        ``output_dir``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = reranker.model if inplace else copy.deepcopy(reranker.model)
    if _is_peft(model.model.language_model):
        model.model.language_model = model.model.language_model.merge_and_unload()
    if dtype is not None:
        model.to(resolve_dtype(dtype))
    if base_model is not None:
        base = resolve_checkpoint(base_model)
        for file in base.iterdir():
            if file.is_file() and file.suffix not in (".safetensors", ".bin") and file.name not in _WEIGHT_FILES:
                shutil.copyfile(file, out / file.name)
    elif not reranker.tokens.copy_files(out):
        reranker.tokenizer.save_pretrained(str(out))
    model.eval().save_pretrained(str(out), safe_serialization=True)
    if training_args is not None:
        (out / "reranker_train_args.yaml").write_text(yaml.safe_dump(dict(training_args), sort_keys=False))
    logger.info("exported the reranker to %s", out)
    return out


def train_reranker(args: RerankerTrainArguments, dataset: MBEIRDataset, encoder: Encoder | None = None) -> Path:
    """Fine-tune the reranker ``args.model_path`` on ``dataset`` and export it.

    Args:
        args: the run's settings.
        dataset: M-BEIR training queries and their pool (:meth:`MBEIRDataset.load`).
        encoder: a bi-encoder whose top ``args.mining_top_k`` supplies the negatives; ``None``: random ones.

    Returns:
        ``output_dir/model``, for :meth:`MLLMReranker.from_pretrained`.

    Raises:
        ValueError: no training data (see :func:`reranker_examples`), or fewer queries than ``batch_size``.
        FileExistsError: ``output_dir`` is not empty and neither overwrite nor resume is set.
    """
    examples = reranker_examples(args, dataset, encoder)
    if len(examples) < args.batch_size:
        raise ValueError(f"{len(examples)} training queries cannot fill one batch of batch_size={args.batch_size}")
    # DDP must tolerate unused parameters when the vision side trains: text-only batches leave it without gradients.
    accelerator = train.make_accelerator(args.mixed_precision,
                                         find_unused_parameters=args.full_finetune or args.train_projector)
    resume = train.checkpoint_to_resume(args, accelerator)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_args.yaml").write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))
    set_seed(args.seed)
    reranker = build_reranker(args)
    module = AnswerLogits(reranker)
    params = list(train.trainable_parameters(module).values())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    name = "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    start = train.load_checkpoint(resume, accelerator, module, optimizer, scheduler) if resume is not None else 0
    loss_fn = RerankLoss(args.loss)
    remaining = itertools.islice(train.global_batches(examples, None, args.batch_size, args.seed), start, None)
    batches = train.prefetch(train.local_batches(examples, remaining, accelerator.process_index,
                                                 accelerator.num_processes, RerankCollator()))
    bar = tqdm(total=args.max_steps, initial=start, desc="reranker training", unit="step",
               disable=not (args.show_progress and accelerator.is_local_main_process))
    with bar:
        for step in range(start + 1, args.max_steps + 1):
            batch = next(batches)
            logits = module(batch.queries, batch.candidates)
            loss = loss_fn(logits, batch.labels.to(logits.device), batch.groups.to(logits.device))
            accelerator.backward(loss)
            if args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            if step % args.log_every == 0 or step == args.max_steps:
                value = accelerator.reduce(loss.detach(), reduction="mean").item()
                bar.set_postfix(loss=f"{value:.4f}")
                if accelerator.is_main_process:
                    logger.info("step %d/%d loss %.4f lr %.3g", step, args.max_steps, value,
                                scheduler.get_last_lr()[0])
            if args.save_every and step % args.save_every == 0:
                train.save_checkpoint(accelerator, module, optimizer, scheduler, step, args)
    batches.close()
    target = out / train.MODEL
    if accelerator.is_main_process:
        export_reranker(reranker, target, base_model=args.model_path, dtype=args.export_dtype,
                        training_args=args.to_dict(), inplace=True)
    accelerator.wait_for_everyone()
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--config recipe.yaml``, the data files, and ``--key value`` overrides of the recipe."""
    parser = argparse.ArgumentParser(
        prog="python -m mmembed_rag.finetune.reranker_train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune an MLLM reranker (LLaVA-NeXT checkpoint) on M-BEIR data.",
        epilog="recipe keys (YAML or --key value):\n" + "\n".join(
            f"  {key}: {text}" for key, text in arguments._keys(RerankerTrainArguments, "").items()))
    parser.add_argument("--config", type=Path, help="YAML recipe (finetune/recipes/reranker.yaml)")
    parser.add_argument("--queries", required=True, nargs="+", help="M-BEIR training queries jsonl")
    parser.add_argument("--pool", required=True, nargs="+", help="M-BEIR candidate pool jsonl")
    parser.add_argument("--instructions", help="instruction tsv (default: the built-in catalog)")
    parser.add_argument("--image-root", help="directory img_path values are relative to")
    parser.add_argument("--encoder", help="bi-encoder checkpoint whose top k supplies the negatives")
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = load_reranker_arguments(known.config, rest)
    except ArgumentsError as err:
        parser.error(str(err))
    dataset = MBEIRDataset.load(known.queries, known.pool, instructions=known.instructions,
                                image_root=known.image_root)
    encoder = Encoder.from_pretrained(known.encoder, device="cpu") if known.encoder else None
    logger.info("trained reranker: %s", train_reranker(args, dataset, encoder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
