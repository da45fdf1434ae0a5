"""Gradient caching gives the loss and parameter gradients of one full-batch forward/backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mmembed_rag.encoder import Batch
from mmembed_rag.finetune.arguments import LoraArguments, TrainArguments
from mmembed_rag.finetune.collator import ContrastiveBatch, ContrastiveCollator
from mmembed_rag.finetune.gradcache import cached_backward, embed
from mmembed_rag.finetune.loss import InfoNCELoss
from mmembed_rag.finetune.train import build_model, contrastive_backward

from .test_train import tiny_examples

# float32 and different matmul shapes (one call vs chunks): agreement to 1e-5 of each gradient's scale.
TOL = 1e-5


def _model(ckpt: Path, **kw):
    torch.manual_seed(0)
    encoder, model = build_model(TrainArguments(model_path=str(ckpt), output_dir="unused", **kw))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient: randomise it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return encoder, model


def _grads(model: nn.Module, batch: ContrastiveBatch, cached: bool, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = contrastive_backward(model, batch, InfoNCELoss(0.05), gradient_cache=cached)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=TOL, atol=TOL)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, ref in grads_b.items():
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(grads_a[name], ref, rtol=0, atol=TOL * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_cached_equals_full_batch(tiny_checkpoint: Path, mode: str) -> None:
    kw = {"lora": LoraArguments(rank=4, dropout=0.0)} if mode == "lora" else \
        {"lora": LoraArguments(enabled=False), "full_finetune": True}
    encoder, model = _model(tiny_checkpoint, **kw)
    examples = tiny_examples(6, negatives=2)
    whole = ContrastiveCollator(encoder, num_negatives=2)(examples)
    chunked = ContrastiveCollator(encoder, num_negatives=2, chunk_size=5)(examples)
    assert len(chunked.chunks) > len(whole.chunks) and max(len(c.positions) for c in chunked.chunks) <= 5
    reference = _grads(model, whole, cached=False)
    _assert_same(_grads(model, chunked, cached=True), reference)
    if mode == "full":
        assert any(name.startswith("vision_tower") for name in reference[1])


def test_dropout_is_replayed(tiny_checkpoint: Path) -> None:
    """With LoRA dropout the re-forward must draw the masks of the first pass (RNG state replayed)."""
    encoder, model = _model(tiny_checkpoint, lora=LoraArguments(rank=4, dropout=0.3))
    batch = ContrastiveCollator(encoder, num_negatives=1, chunk_size=4)(tiny_examples(6))
    # Reference: the same chunks embedded with a graph, in the same order, from the same seed.
    reference = _grads(model, batch, cached=False, seed=3)
    _assert_same(_grads(model, batch, cached=True, seed=3), reference)
    other = _grads(model, batch, cached=True, seed=4)
    assert not torch.allclose(other[0], reference[0])  # dropout is live: the seed matters


def test_gradient_checkpointing_gives_same_gradients(tiny_checkpoint: Path) -> None:
    examples = tiny_examples(4)
    kw = {"lora": LoraArguments(rank=4, dropout=0.0)}
    encoder, plain = _model(tiny_checkpoint, **kw)
    _, checkpointed = _model(tiny_checkpoint, gradient_checkpointing=True, **kw)
    batch = ContrastiveCollator(encoder, num_negatives=1, chunk_size=3)(examples)
    _assert_same(_grads(checkpointed, batch, cached=True), _grads(plain, batch, cached=False))


class _ToyEncoder(nn.Module):
    """Embedding bag with dropout: the model contract (ids, mask, pool mask, pixels) -> unit vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.drop = nn.Dropout(0.2)

    def forward(self, input_ids, attention_mask, pool_mask, pixel_values=None) -> torch.Tensor:
        h = self.drop(self.embed(input_ids)) * pool_mask.unsqueeze(-1)
        return torch.nn.functional.normalize(h.sum(1), dim=-1)


def test_cached_twin_of_the_loss_on_a_toy_model() -> None:
    torch.manual_seed(0)
    model = _ToyEncoder()
    ids = torch.randint(1, 50, (14, 5))
    mask = torch.ones_like(ids)
    positions = list(torch.randperm(14).tolist())
    chunks = [Batch(rows, {"input_ids": ids[rows], "attention_mask": mask[rows], "pool_mask": mask[rows]})
              for rows in (positions[i:i + 4] for i in range(0, 14, 4))]
    batch = ContrastiveBatch(chunks, num_queries=4, num_items=14)
    loss_fn = InfoNCELoss(0.1)

    torch.manual_seed(5)
    emb = embed(model, batch)
    expected = loss_fn(emb[:4], emb[4:])
    expected.backward()
    ref = model.embed.weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(5)
    got = cached_backward(model, batch, loss_fn)
    torch.testing.assert_close(got, expected.detach())
    torch.testing.assert_close(model.embed.weight.grad, ref)
