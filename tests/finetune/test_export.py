"""Export: LoRA merged, released format, loadable by Encoder.from_pretrained with the same embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmembed_rag import Encoder
from mmembed_rag.finetune.arguments import LoraArguments, TrainArguments
from mmembed_rag.finetune.collator import ContrastiveCollator
from mmembed_rag.finetune.export import export_model, merge_lora, metrics_table
from mmembed_rag.finetune.loss import InfoNCELoss
from mmembed_rag.finetune.train import build_model, contrastive_backward

from .test_train import tiny_examples


@pytest.fixture(scope="module")
def trained(tiny_checkpoint: Path):
    """A LoRA model after a few optimizer steps (in memory)."""
    torch.manual_seed(0)
    args = TrainArguments(model_path=str(tiny_checkpoint), output_dir="unused", lora=LoraArguments(rank=4, alpha=8))
    encoder, model = build_model(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    collator = ContrastiveCollator(encoder, num_negatives=1)
    examples = tiny_examples(16)
    for step in range(3):
        contrastive_backward(model, collator(examples[step * 4:(step + 1) * 4 + 4]), InfoNCELoss())
        optimizer.step()
        optimizer.zero_grad()
    return encoder, model.eval()


def _embed(encoder: Encoder) -> np.ndarray:
    examples = tiny_examples(6)
    queries = encoder.encode_queries([ex.query for ex in examples])
    docs = encoder.encode_documents([ex.positive for ex in examples])
    return np.concatenate([queries, docs])


def test_export_loads_with_same_embeddings(trained, tiny_checkpoint: Path, tmp_path: Path) -> None:
    encoder, model = trained
    expected = _embed(encoder)
    out = export_model(model, encoder, tmp_path / "model", base_model=tiny_checkpoint,
                       metrics={"mscoco_t2i": {"recall@5": 0.5, "recall@10": 0.75}, "text": {"ndcg@10": 0.4}},
                       training_args={"learning_rate": 0.01})
    loaded = Encoder.from_pretrained(out, device="cpu", dtype="float32")
    np.testing.assert_allclose(_embed(loaded), expected, atol=1e-5, rtol=0)
    # Released format: the base checkpoint's key names, no adapter weights; the in-memory model keeps its adapters.
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    base = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(base)
    assert hasattr(model.language_model, "peft_config")
    untrained = _embed(Encoder.from_pretrained(tiny_checkpoint, device="cpu"))
    assert not np.allclose(untrained, expected, atol=1e-3)  # training moved the embeddings
    card = (out / "README.md").read_text()
    assert "| mscoco_t2i | 0.5000 | 0.7500 |  |" in card and "learning_rate: 0.01" in card
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()


def test_export_in_half_precision(trained, tmp_path: Path) -> None:
    encoder, model = trained
    out = export_model(model, encoder, tmp_path / "fp16", dtype="float16", metrics="| a | b |\n|---|---|")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    loaded = Encoder.from_pretrained(out, device="cpu", dtype="float32")
    np.testing.assert_allclose(_embed(loaded), _embed(encoder), atol=5e-3)
    assert next(model.parameters()).dtype == torch.float32  # the trained model was copied, not cast


def test_merge_lora_returns_a_plain_copy(trained) -> None:
    encoder, model = trained
    merged = merge_lora(model)
    assert merged is not model and hasattr(model.language_model, "peft_config")
    assert not hasattr(merged.language_model, "peft_config")
    assert not any("lora" in name for name in merged.state_dict())


def test_metrics_table() -> None:
    table = metrics_table({"recall@5": 0.61234, "n": 50})
    assert table == "| metric | value |\n|---|---|\n| recall@5 | 0.6123 |\n| n | 50 |"
    assert metrics_table("already markdown\n") == "already markdown"
