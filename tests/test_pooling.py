"""Pooling heads on hand-made tensors."""

from __future__ import annotations

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
