"""Gradient caching (GradCache, Gao et al. 2021): a contrastive batch larger than fits in memory at once.

1. Embed every chunk without building a graph, remembering each chunk's RNG state.
2. Compute the loss on the assembled embeddings and its gradient with respect to them (cheap: no model).
3. Re-embed each chunk with a graph, under the RNG state of step 1 (so dropout draws the same masks),
   and backpropagate the cached embedding gradient through it (``sum(emb * grad)`` is the surrogate).

Parameter gradients equal those of one forward/backward over the whole batch; peak activation memory is
one chunk's. This file is the only place that knows about it; the loss is the ordinary :class:`InfoNCELoss`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from .collator import ContrastiveBatch

__all__ = ["RandState", "embed", "cached_backward"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RandState:
    """The CPU and accelerator RNG states at one moment, to replay a forward pass's random draws."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block under the captured states; the outer RNG streams are left as they were."""
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices, device_type="cuda" if self.cuda else "cpu"):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


def _forward(model: nn.Module, chunk) -> torch.Tensor:
    return model(**chunk.inputs)


def _restore_order(batch: ContrastiveBatch) -> torch.Tensor:
    """Index that puts the rows of the concatenated chunks back in item order."""
    positions = torch.tensor([p for chunk in batch.chunks for p in chunk.positions])
    return torch.argsort(positions)


def embed(model: nn.Module, batch: ContrastiveBatch) -> torch.Tensor:
    """Embeddings (n, d) of every item of ``batch`` in item order ([queries; positives; negatives]).

    With a graph when grad is enabled: this is the plain, uncached training path and the reference
    the cached one is tested against.
    """
    out = torch.cat([_forward(model, chunk) for chunk in batch.chunks])
    return out[_restore_order(batch).to(out.device)]


def cached_backward(model: nn.Module, batch: ContrastiveBatch, loss_fn: LossFn,
                    backward: Callable[[torch.Tensor], None] | None = None,
                    no_sync: Callable[[], AbstractContextManager] | None = None) -> torch.Tensor:
    """Accumulate into ``.grad`` the parameter gradients of ``loss_fn`` over ``batch``, one chunk at a time.

    Args:
        model: maps (input_ids, attention_mask, pool_mask, pixel_values) to (n, d) embeddings; may be
            wrapped for data parallelism.
        batch: the chunks to embed (``batch.chunks``, each one forward).
        loss_fn: (queries, candidates) -> scalar, e.g. :class:`~.loss.InfoNCELoss`.
        backward: runs backward on a scalar (``accelerator.backward`` to get loss scaling under fp16);
            default ``Tensor.backward``.
        no_sync: context manager factory that suspends data-parallel gradient synchronisation
            (``lambda: accelerator.no_sync(model)``); all chunks but the last run under it, so the
            gradients are reduced once per step.

    Returns:
        The loss (detached).
    """
    backward = backward or torch.Tensor.backward
    states: list[RandState] = []
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in batch.chunks:
            states.append(RandState(chunk.inputs["input_ids"].device))
            parts.append(_forward(model, chunk))
    order = _restore_order(batch).to(parts[0].device)
    emb = torch.cat(parts)[order].detach().requires_grad_()
    loss = loss_fn(emb[: batch.num_queries], emb[batch.num_queries:])
    loss.backward()  # only to the embeddings: they are leaves; under DDP this is the gather's all-reduce
    # Gradient rows of the concatenated chunks, in chunk order (inverse of `order`).
    grads = torch.empty_like(emb.grad)
    grads[order] = emb.grad
    start = 0
    last = len(batch.chunks) - 1
    for i, (chunk, state) in enumerate(zip(batch.chunks, states)):
        rows = grads[start:start + len(chunk.positions)]
        start += len(chunk.positions)
        sync = no_sync() if no_sync is not None and i < last else nullcontext()
        with sync, state.replay():
            surrogate = (_forward(model, chunk) * rows).sum()
            backward(surrogate)
    return loss.detach()
