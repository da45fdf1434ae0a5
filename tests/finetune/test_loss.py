"""InfoNCE: value against the formula, gradients, layouts and errors (cross-process: test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmembed_rag.finetune.loss import InfoNCELoss, gather_with_grad


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def _reference(q: torch.Tensor, c: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log softmax of each query's positive among all candidates, written out row by row."""
    losses = []
    for i in range(q.shape[0]):
        scores = torch.stack([q[i] @ c[j] for j in range(c.shape[0])]) / temperature
        losses.append(-(scores[i] - torch.logsumexp(scores, dim=0)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("negatives", [0, 1, 7])
def test_matches_formula(negatives: int) -> None:
    q, c = _unit(4, 16, seed=0), _unit(4 + negatives, 16, seed=1)
    loss = InfoNCELoss(temperature=0.05)(q, c)
    torch.testing.assert_close(loss, _reference(q, c, 0.05))


def test_gradients_match_formula() -> None:
    q, c = _unit(3, 8, seed=2).requires_grad_(), _unit(9, 8, seed=3).requires_grad_()
    InfoNCELoss(0.1)(q, c).backward()
    q2, c2 = q.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    _reference(q2, c2, 0.1).backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(c.grad, c2.grad)


def test_lower_temperature_sharpens() -> None:
    q = _unit(4, 16, seed=4)
    c = torch.cat([q + 0.1 * _unit(4, 16, seed=5), _unit(4, 16, seed=6)])
    c = F.normalize(c, dim=-1)
    assert InfoNCELoss(0.01)(q, c) < InfoNCELoss(1.0)(q, c)


def test_negative_order_does_not_matter() -> None:
    q, c = _unit(2, 8, seed=7), _unit(6, 8, seed=8)
    shuffled = torch.cat([c[:2], c[2:].flip(0)])
    torch.testing.assert_close(InfoNCELoss()(q, c), InfoNCELoss()(q, shuffled))


def test_errors() -> None:
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0)
    with pytest.raises(ValueError, match="positives"):
        InfoNCELoss()(_unit(4, 8, seed=0), _unit(3, 8, seed=1))


def test_gather_is_identity_in_one_process() -> None:
    x = torch.randn(3, 4)
    out, offset = gather_with_grad(x)
    assert out is x and offset == 0
