"""Export a trained model in the released MM-Embed format, loadable by ``Encoder.from_pretrained``.

LoRA adapters are merged into the base weights (peft ``merge_and_unload``); the weights, tokenizer and
image settings are written by the core's own :meth:`~mmembed_rag.Encoder.save_pretrained`, and a model
card (README.md) records the base model, the training arguments and an evaluation table.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from mmembed_rag.devices import resolve_dtype
from mmembed_rag.encoder import Encoder
from mmembed_rag.modeling.model import MMEmbedModel

from .build_base import BASE_PARTS_FILE, base_parts_section

logger = logging.getLogger(__name__)

__all__ = ["merge_lora", "export_model", "write_model_card", "metrics_table"]

# Files of the base checkpoint that the export carries over unchanged when present.
_CARRIED = ("preprocessor_config.json", "processor_config.json", "instructions.json", "generation_config.json",
            BASE_PARTS_FILE)


def _is_peft(module: torch.nn.Module) -> bool:
    return hasattr(module, "merge_and_unload") and hasattr(module, "peft_config")


def merge_lora(model: MMEmbedModel, inplace: bool = False) -> MMEmbedModel:
    """The model with its language model's LoRA adapters merged into the base weights.

    Args:
        model: a model whose ``language_model`` may be a peft model (as :func:`~.train.build_model` makes).
        inplace: merge into ``model`` itself (no copy: use when training is over); otherwise a deep copy
            is merged and ``model`` keeps its adapters.

    Returns:
        An :class:`MMEmbedModel` with plain modules and the released parameter names.
    """
    if not _is_peft(model.language_model):
        return model if inplace else copy.deepcopy(model)
    target = model if inplace else copy.deepcopy(model)
    target.language_model = target.language_model.merge_and_unload()
    return target


def metrics_table(metrics: str | Mapping[str, Any]) -> str:
    """Markdown table from ``{metric: value}`` or ``{task: {metric: value}}`` (a string is returned as is)."""
    if isinstance(metrics, str):
        return metrics.strip()
    if not metrics:
        return "_no evaluation recorded_"

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    if all(isinstance(v, Mapping) for v in metrics.values()):
        columns = list(dict.fromkeys(k for row in metrics.values() for k in row))
        lines = ["| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {task} | " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |"
                  for task, row in metrics.items()]
        return "\n".join(lines)
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in metrics.items()]
    return "\n".join(lines)


def write_model_card(output_dir: str | os.PathLike, base_model: str | None = None,
                     metrics: str | Mapping[str, Any] | None = None,
                     training_args: Mapping[str, Any] | None = None) -> Path:
    """Write ``README.md`` (model card) into ``output_dir`` and return its path.

    Args:
        output_dir: the exported model directory.
        base_model: what was fine-tuned.
        metrics: evaluation results, as markdown or a dict (see :func:`metrics_table`).
        training_args: the run's arguments (``TrainArguments.to_dict()``), recorded as YAML.
    """
    path = Path(output_dir) / "README.md"
    parts = ["---", "library_name: mmembed-rag", "tags: [mm-embed, multimodal-retrieval, embeddings]"]
    if base_model:
        parts.append(f"base_model: {base_model}")
    parts += ["---", "", f"# {Path(output_dir).name}", "",
              "An MM-Embed-format bi-encoder for universal multimodal retrieval (text, image and text+image "
              "queries and documents), fine-tuned with mmembed-rag" + (f" from `{base_model}`." if base_model else "."),
              "", "```python", "from mmembed_rag import Encoder", "",
              f'encoder = Encoder.from_pretrained("{Path(output_dir).name}")',
              'q = encoder.encode_queries(["a red square"], instruction="mscoco_t2i")',
              'd = encoder.encode_documents([{"img": "red.png"}, "a red square"])',
              "scores = q @ d.T", "```", "", "## Evaluation", "",
              metrics_table(metrics) if metrics is not None else "_no evaluation recorded_", ""]
    provenance = Path(output_dir) / BASE_PARTS_FILE  # carried from a base built from parts
    if provenance.is_file():
        parts += base_parts_section(json.loads(provenance.read_text()))
    if training_args:
        parts += ["## Training", "", "```yaml", yaml.safe_dump(dict(training_args), sort_keys=False).strip(),
                  "```", ""]
    path.write_text("\n".join(parts))
    return path


def export_model(model: MMEmbedModel, encoder: Encoder, output_dir: str | os.PathLike, *,
                 dtype: str | torch.dtype | None = None, base_model: str | os.PathLike | None = None,
                 metrics: str | Mapping[str, Any] | None = None, training_args: Mapping[str, Any] | None = None,
                 inplace: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Merge LoRA and write ``model`` in the released format, with tokenizer, image settings and card.

    Args:
        model: the trained network (adapters merged here; unwrap data-parallel wrappers first).
        encoder: the encoder training used: its tokenizer, image processor and raw config are written.
        output_dir: target directory (created; existing files of the same names are replaced).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``; default: the weights' dtype.
        base_model: the base checkpoint; a local directory's processor/instruction files are carried over.
        metrics: evaluation table for the model card.
        training_args: recorded in the model card.
        inplace: merge into ``model`` itself instead of a copy (saves memory at the end of training).
        max_shard_bytes: safetensors shard size.

    Returns:
        ``output_dir``, ready for ``Encoder.from_pretrained``.

    Example:
        >>> export_model(model, encoder, "runs/stage1/model", dtype="float16", metrics={"recall@5": 0.61})
        >>> Encoder.from_pretrained("runs/stage1/model")
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = merge_lora(model, inplace=inplace)
    if dtype is not None:
        merged = merged.to(resolve_dtype(dtype))
    merged.eval()
    raw = dict(encoder.raw_config)
    raw["torch_dtype"] = str(next(merged.parameters()).dtype).removeprefix("torch.")
    if base_model is not None and Path(base_model).is_dir():
        for name in _CARRIED:  # before saving: save_pretrained updates preprocessor_config.json in place
            if (Path(base_model) / name).is_file():
                shutil.copyfile(Path(base_model) / name, out / name)
    saver = copy.copy(encoder.family)  # the family's layout and files (tokenizer copied verbatim), merged weights
    saver.model, saver.raw_config = merged, raw
    saver.save_pretrained(out, max_shard_bytes=max_shard_bytes)
    write_model_card(out, str(base_model) if base_model is not None else None, metrics, training_args)
    logger.info("exported %s (%s) to %s", type(merged).__name__, raw["torch_dtype"], out)
    return out
