"""The training loop: contrastive fine-tuning of the MM-Embed bi-encoder through accelerate.

One code path for one CPU, one GPU, several GPUs and several nodes::

    python -m mmembed_rag.finetune.train --config finetune/recipes/stage1.yaml --model_path ckpt --output_dir run
    accelerate launch --num_processes 8 -m mmembed_rag.finetune.train --config stage1.yaml ...

LoRA (peft) on the language model or full fine-tuning, the pooling head trainable, gradient
checkpointing, mixed precision, gradient caching, checkpoints every N steps, and exact resumption
(weights, optimizer, scheduler, RNG and data position). Every process reads the same global batches
and takes its own slice; checkpoints assume an output directory all processes share.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import random
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from mmembed_rag.encoder import Encoder

from .arguments import ArgumentsError, RunArguments, TrainArguments, load_arguments
from .collator import ContrastiveBatch, ContrastiveCollator
from .examples import ContrastiveExample
from .export import export_model
from .gradcache import cached_backward, embed
from .loss import InfoNCELoss

logger = logging.getLogger(__name__)

# The loop's parts, public so the reranker's trainer (reranker_train.py) runs the same loop.
__all__ = ["train", "build_model", "contrastive_backward", "latest_checkpoint", "main", "make_accelerator",
           "checkpoint_to_resume", "trainable_parameters", "save_checkpoint", "load_checkpoint", "global_batches",
           "local_batches", "prefetch"]

CHECKPOINTS, MODEL = "checkpoints", "model"


class ExampleSource(Protocol):
    """A sequence of examples (a list, or a map-style dataset; ``set_epoch`` is called when present)."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> ContrastiveExample: ...


def build_model(args: TrainArguments, device: torch.device | str | None = None,
                frozen_dtype: torch.dtype = torch.float32) -> tuple[Encoder, torch.nn.Module]:
    """Load ``args.model_path`` onto ``device`` and make the parameters ``args`` asks for trainable.

    Works for either family (MM-Embed or Qwen3-VL-Embedding). LoRA adapters wrap the language model
    (``model.language_model`` becomes a peft model whose targets are ``args.lora.target_modules`` inside it);
    a pooling head with weights (MM-Embed's ``latent_attention_model``) stays trainable with ``train_pooling``;
    ``full_finetune`` trains everything.

    Args:
        args: the run's settings.
        device: where the weights are read to (default CPU).
        frozen_dtype: dtype of the weights that stay frozen (ignored with ``full_finetune``): bfloat16 under
            bf16 mixed precision keeps an 8.2B base at 16 GB instead of 33 GB. Trained parameters are float32.

    Returns:
        The encoder (tokenizer, prompts, image processor; its ``model`` is the returned model) and the
        model in train mode.
    """
    dtype = torch.float32 if args.full_finetune else frozen_dtype
    encoder = Encoder.from_pretrained(args.model_path, device=str(device or "cpu"), dtype=dtype,
                                      max_length=args.max_length)
    model = encoder.model
    model.requires_grad_(args.full_finetune)
    model.language_model.config.use_cache = False
    if args.gradient_checkpointing:
        towers = [model.language_model] + ([model.vision_tower] if args.full_finetune else [])
        for tower in towers:
            enable = getattr(tower, "activation_checkpointing_enable", None) or tower.gradient_checkpointing_enable
            enable({"use_reentrant": False})
    if args.lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise ImportError('LoRA training needs peft: pip install "mmembed-rag[finetune]"') from err
        config = LoraConfig(r=args.lora.rank, lora_alpha=args.lora.alpha, lora_dropout=args.lora.dropout,
                            target_modules=list(args.lora.target_modules))
        model.language_model = get_peft_model(model.language_model, config)
    pooling = getattr(model, "latent_attention_model", None)  # Qwen3-VL pools the last token: no weights
    if args.train_pooling and pooling is not None:
        pooling.requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:  # optimiser state and updates in float32
            param.data = param.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("no trainable parameters (pooling without weights and no LoRA or full fine-tuning)")
    logger.info("trainable parameters: %d of %d", trainable, sum(p.numel() for p in model.parameters()))
    return encoder, model.train()


def contrastive_backward(model: torch.nn.Module, batch: ContrastiveBatch, loss_fn: InfoNCELoss,
                         accelerator: Accelerator | None = None, gradient_cache: bool = False) -> torch.Tensor:
    """Forward and backward of one contrastive batch; returns the (detached) loss.

    Args:
        model: the (possibly accelerate-prepared) model.
        batch: its chunks on the model's device.
        loss_fn: the loss (the same module on both paths).
        accelerator: supplies ``backward`` (loss scaling) and ``no_sync``; ``None`` for plain autograd.
        gradient_cache: embed chunk by chunk with cached gradients instead of all at once.
    """
    backward = accelerator.backward if accelerator is not None else torch.Tensor.backward
    if gradient_cache:
        no_sync = (lambda: accelerator.no_sync(model)) if accelerator is not None else None
        return cached_backward(model, batch, loss_fn, backward=backward, no_sync=no_sync)
    emb = embed(model, batch)
    loss = loss_fn(emb[: batch.num_queries], emb[batch.num_queries:])
    backward(loss)
    return loss.detach()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (``None`` when there is none)."""
    done = [p for p in (Path(output_dir) / CHECKPOINTS).glob("step-*")
            if p.name.removeprefix("step-").isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.removeprefix("step-")), default=None)


def global_batches(source: ExampleSource, sampler: Iterable[Sequence[int]] | None, batch_size: int,
                   seed: int) -> Iterator[list[int]]:
    """Index lists forever, epoch after epoch; a pure function of the seed and the sampler."""
    for epoch in itertools.count():
        for obj in (source, sampler):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        if sampler is None:
            order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            batches: Iterable[Sequence[int]] = (order[i:i + batch_size]
                                                for i in range(0, len(order) - batch_size + 1, batch_size))
        else:
            batches = sampler
        empty = True
        for indices in batches:
            empty = False
            yield [int(i) for i in indices]
        if empty:
            raise ValueError("the batch sampler yielded no batches" if sampler is not None else
                             f"{len(source)} examples cannot fill one batch of batch_size={batch_size}")


def local_batches(source: ExampleSource, batches: Iterable[list[int]], rank: int, world: int,
                  collator: ContrastiveCollator) -> Iterator[ContrastiveBatch]:
    """This process's contiguous slice of each global batch, collated."""
    for indices in batches:
        if len(indices) < world:
            raise ValueError(f"a batch of {len(indices)} examples cannot be split over {world} processes")
        share = np.array_split(np.asarray(indices), world)[rank]
        yield collator([source[int(i)] for i in share])


def prefetch(iterator: Iterator[Any]) -> Iterator[Any]:
    """Produce the next item in a background thread while the caller works on the current one."""
    end = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmembed-train-data") as pool:
        pending = pool.submit(next, iterator, end)
        while (item := pending.result()) is not end:
            pending = pool.submit(next, iterator, end)
            yield item


def _rng_state() -> dict[str, Any]:
    version, py_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": [version, list(py_state), gauss],
            "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (``requires_grad``), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    step: int, args: RunArguments) -> Path:
    """Write trainable weights, optimizer, scheduler, RNG (per process) and step; atomically (tmp + rename)."""
    final = Path(args.output_dir) / CHECKPOINTS / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        trained = trainable_parameters(accelerator.unwrap_model(model))
        weights = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        state = {"step": step, "num_processes": accelerator.num_processes, "seed": args.seed}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kept = sorted((p for p in final.parent.glob("step-*") if p.suffix != ".tmp"), key=lambda p: p.name)
        for old in kept[: -args.keep_checkpoints] if args.keep_checkpoints else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any,
                    scheduler: Any) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the step to continue from."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = trainable_parameters(accelerator.unwrap_model(model))
    if set(weights) != set(params):
        raise ValueError(f"{path}: its trainable parameters differ from this run's (lora / full_finetune / "
                         f"train_pooling changed?): {len(weights)} saved, {len(params)} expected")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text())
    rng = path / f"rng-{accelerator.process_index}.pt"
    if state["num_processes"] == accelerator.num_processes and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        logger.warning("%s was written by %d process(es), this run has %d: RNG streams are not restored",
                       path, state["num_processes"], accelerator.num_processes)
    logger.info("resumed from %s (step %d)", path, state["step"])
    return int(state["step"])


def checkpoint_to_resume(args: RunArguments, accelerator: Accelerator) -> Path | None:
    """Apply the output-directory policy; returns the checkpoint to resume from, if any."""
    out = Path(args.output_dir)
    ckpt, clear = None, False
    if args.resume_from is not None:
        ckpt = latest_checkpoint(out) if args.resume_from == "latest" else Path(args.resume_from)
        if ckpt is not None and not (ckpt / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume_from={args.resume_from!r}: {ckpt} is not a complete checkpoint")
        if ckpt is None:
            logger.info("no checkpoint under %s: starting from step 0", out)
    elif out.is_dir() and any(out.iterdir()):
        if not args.overwrite_output_dir:
            raise FileExistsError(f"output_dir {out} exists and is not empty; set overwrite_output_dir: true to "
                                  "replace its checkpoints/ and model/, or resume_from: latest to continue")
        clear = True
    accelerator.wait_for_everyone()  # every process has looked at output_dir before the main one writes to it
    if clear and accelerator.is_main_process:
        for name in (CHECKPOINTS, MODEL):
            shutil.rmtree(out / name, ignore_errors=True)
    return ckpt


def make_accelerator(mixed_precision: str, find_unused_parameters: bool = False) -> Accelerator:
    """An ``Accelerator`` for ``mixed_precision`` (``"no"``, ``"bf16"``, ``"fp16"``; falling back where unsupported).

    Args:
        mixed_precision: the run's ``mixed_precision`` argument.
        find_unused_parameters: let DDP tolerate parameters without gradients in a step (e.g. a vision tower that
            text-only batches leave untouched).
    """
    precision = mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        logger.warning("fp16 mixed precision needs a GPU; training in float32")
        precision = "no"
    elif precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU has no bf16; using fp16 mixed precision")
        precision = "fp16"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    try:
        return Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], step_scheduler_with_optimizer=False)
    except ValueError as err:  # an earlier train() in this process (a notebook) used another precision
        if "already been initialized" not in str(err):
            raise
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], step_scheduler_with_optimizer=False)


def train(args: TrainArguments, examples: ExampleSource,
          batch_sampler: Iterable[Sequence[int]] | None = None) -> Path:
    """Fine-tune ``args.model_path`` on ``examples`` and export the result.

    Args:
        args: the run's settings.
        examples: a list of :class:`ContrastiveExample` or a map-style dataset of them (``set_epoch``
            is called at each epoch when it has one).
        batch_sampler: any iterable of index lists, one list per step, each the GLOBAL batch (all
            processes together; process r takes the r-th contiguous slice), e.g.
            ``TaskBatchSampler(dataset.tasks, args.batch_size, ratios=args.task_mixing, seed=args.seed)``
            (one task per batch); re-iterated each epoch (after ``set_epoch`` when present); must be
            deterministic for exact resumption. Default: shuffled batches of ``args.batch_size``, seeded
            per epoch (``task_mixing`` then does not apply).

    Returns:
        ``output_dir/model``: the trained model in the released format (``Encoder.from_pretrained``).

    Raises:
        FileExistsError: ``output_dir`` is not empty and neither overwrite nor resume is set.
    """
    if getattr(batch_sampler, "world_size", 1) != 1:
        raise ValueError("batch_sampler must yield GLOBAL batches (world_size=1, batch_size = the global batch): "
                         "train() gives each process its slice")
    if batch_sampler is None and args.task_mixing:
        logger.warning("task_mixing is set but no batch_sampler was given: the default sampler ignores it")
    # Full fine-tuning on text-only batches leaves the vision tower without gradients.
    accelerator = make_accelerator(args.mixed_precision, find_unused_parameters=args.full_finetune)
    resume = checkpoint_to_resume(args, accelerator)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_args.yaml").write_text(yaml.safe_dump(args.to_dict(), sort_keys=False))
    set_seed(args.seed)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision), torch.float32)
    encoder, model = build_model(args, accelerator.device, frozen_dtype=half)
    params = list(trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    name = "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = load_checkpoint(resume, accelerator, model, optimizer, scheduler) if resume is not None else 0
    collator = ContrastiveCollator(encoder, args.num_negatives, args.gradient_cache_chunk_size)
    loss_fn = InfoNCELoss(args.temperature)
    remaining = itertools.islice(global_batches(examples, batch_sampler, args.batch_size, args.seed), start, None)
    batches = prefetch(local_batches(examples, remaining, accelerator.process_index, accelerator.num_processes,
                                     collator))
    bar = tqdm(total=args.max_steps, initial=start, desc="training", unit="step",
               disable=not (args.show_progress and accelerator.is_local_main_process))
    with bar:
        for step in range(start + 1, args.max_steps + 1):
            batch = next(batches).to(accelerator.device)
            loss = contrastive_backward(model, batch, loss_fn, accelerator, args.gradient_cache_chunk_size is not None)
            if args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            if step % args.log_every == 0 or step == args.max_steps:
                value = accelerator.reduce(loss, reduction="mean").item()
                bar.set_postfix(loss=f"{value:.4f}")
                if accelerator.is_main_process:
                    logger.info("step %d/%d loss %.4f lr %.3g", step, args.max_steps, value,
                                scheduler.get_last_lr()[0])
            if (args.save_every and step % args.save_every == 0) or step == args.max_steps:
                save_checkpoint(accelerator, model, optimizer, scheduler, step, args)
    batches.close()
    target = out / MODEL
    if accelerator.is_main_process:
        export_model(accelerator.unwrap_model(model), encoder, target, dtype=args.export_dtype,
                     base_model=args.model_path, training_args=args.to_dict(), inplace=True)
    accelerator.wait_for_everyone()
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--config recipe.yaml`` plus ``--key value`` overrides (nested keys dotted: ``--lora.rank 8``)."""
    parser = argparse.ArgumentParser(
        prog="python -m mmembed_rag.finetune.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Contrastive fine-tuning of an MM-Embed-format checkpoint (also under `accelerate launch`).",
        epilog="keys (YAML recipe or --key value):\n" + TrainArguments.describe())
    parser.add_argument("--config", type=Path, help="YAML recipe (finetune/recipes/*.yaml)")
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = load_arguments(known.config, rest)
    except ArgumentsError as err:
        parser.error(str(err))
    if args.data_factory is None:
        parser.error("no training data: set data_factory ('package.module:function' returning the examples)")
    module, _, name = args.data_factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        parser.error(f"data_factory {args.data_factory!r} cannot be loaded: {err}")
    data = factory(args, **args.data_options)  # the examples, or (examples, batch_sampler)
    examples, sampler = data if isinstance(data, tuple) and len(data) == 2 else (data, None)
    path = train(args, examples, sampler)
    logger.info("trained model: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
