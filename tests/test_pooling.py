"""Pooling heads on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from mmembed_rag.modeling.pooling import LastTokenPooling, LatentAttentionPooling, MeanPooling


def test_mean_ignores_masked_positions():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    out = MeanPooling()(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0]]))


def test_last_token_takes_the_last_unmasked_row():
    hidden = torch.arange(12.0).reshape(2, 3, 2)
    out = LastTokenPooling()(hidden, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    torch.testing.assert_close(out, torch.stack([hidden[0, 1], hidden[1, 2]]))


def test_latent_attention_matches_a_hand_written_reference():
    torch.manual_seed(0)
    pool = LatentAttentionPooling(dim=8, num_latents=5, heads=2, head_dim=8, ff_mult=4)
    hidden, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    attend, feed_forward = pool.cross_attend_blocks
    x = attend.norm(hidden)
    ctx = attend.norm_context(pool.latents)
    q = attend.fn.to_q(x).reshape(2, 4, 2, 8).transpose(1, 2)
    k, v = (t.reshape(5, 2, 8).transpose(0, 1) for t in attend.fn.to_kv(ctx).chunk(2, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    h = attend.fn.to_out((weights @ v).transpose(1, 2).reshape(2, 4, 16)) + hidden
    proj = feed_forward.fn.net[0](feed_forward.norm(h))
    value, gate = proj.chunk(2, dim=-1)
    h = feed_forward.fn.net[2](value * torch.nn.functional.gelu(gate)) + h
    expected = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pool(hidden, mask), expected, atol=1e-5, rtol=1e-5)


def _pass_through(pool: LatentAttentionPooling) -> LatentAttentionPooling:
    """Zero both blocks' output layers: the residuals then hand the token states to the mean unchanged."""
    attend, feed_forward = pool.cross_attend_blocks
    with torch.no_grad():
        attend.fn.to_out.weight.zero_()
        feed_forward.fn.net[2].weight.zero_()
        feed_forward.fn.net[2].bias.zero_()
    return pool


@pytest.mark.parametrize("pool", [MeanPooling(), _pass_through(LatentAttentionPooling(dim=16, num_latents=4, heads=2))])
def test_the_mean_over_long_inputs_is_float32_like_the_release(pool):
    # A bf16 running sum stops growing after a few hundred tokens; NV-Embed's mean promotes to float32.
    torch.manual_seed(0)
    hidden = (torch.rand(2, 3000, 16) + 1.0).bfloat16()
    mask = torch.ones(2, 3000, dtype=torch.long)
    mask[1, 2500:] = 0
    out = pool.to(torch.bfloat16)(hidden, mask)
    expected = torch.stack([hidden[0].float().mean(0), hidden[1, :2500].float().mean(0)])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
