"""Pooling heads that turn token states into one vector: NV-Embed latent attention, mean, last token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LatentAttentionPooling", "MeanPooling", "LastTokenPooling", "build_pooling", "POOLINGS"]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 mean of ``hidden`` (b, n, d) over the positions where ``mask`` (b, n) is 1.

    Float32 whatever the hidden dtype, as NV-Embed's ``hiddens * mask.float()`` promotes: a bf16 running sum
    stops growing after a few hundred tokens.
    """
    mask = mask.float().unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class _CrossAttention(nn.Module):
    """Token states attend to the latents (keys/values); no mask, as in NV-Embed."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if k.shape[0] != b:  # latents are shared by the batch: broadcast without copying
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _GEGLU(nn.Module):
    """``value * gelu(gate)``, value being the first half of the projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), _GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, with_context: bool) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if with_context else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_context is None:
            return self.fn(self.norm(x))
        return self.fn(self.norm(x), self.norm_context(context))


class LatentAttentionPooling(nn.Module):
    """NV-Embed latent attention: cross-attend to trainable latents, GEGLU MLP, masked mean (in float32).

    Both blocks are pre-norm with residuals on the un-normed token states; parameter names follow the
    released checkpoint (``latents``, ``cross_attend_blocks.{0,1}``).
    """

    def __init__(self, dim: int, num_latents: int = 512, heads: int = 8, head_dim: int | None = None,
                 ff_mult: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.cross_attend_blocks = nn.ModuleList([
            _PreNorm(dim, _CrossAttention(dim, heads, head_dim or dim), with_context=True),
            _PreNorm(dim, _FeedForward(dim, ff_mult), with_context=False),
        ])

    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        # Tokens never attend to each other here, so only the pooled ones (no padding, no instruction)
        # need the two blocks: run them packed as one sequence, then average per row.
        keep = pool_mask.bool()
        rows = keep.nonzero()[:, 0]
        tokens = hidden[keep].unsqueeze(0)
        attend, feed_forward = self.cross_attend_blocks
        latents = self.latents.unsqueeze(0).to(hidden.dtype)
        tokens = attend(tokens, context=latents) + tokens
        tokens = feed_forward(tokens) + tokens
        # Float32 sums and mean, as the release's ``hiddens * mask.float()`` promotes (see masked_mean).
        sums = hidden.new_zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float32)
        sums = sums.index_add(0, rows, tokens[0].float())
        return sums / keep.sum(dim=1, keepdim=True).clamp(min=1).float()


class MeanPooling(nn.Module):
    """Masked mean over the pooled tokens."""

    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(hidden, pool_mask)


class LastTokenPooling(nn.Module):
    """State of the last pooled token of each row (right padding)."""

    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(pool_mask.shape[1], device=pool_mask.device)
        last = (positions * (pool_mask > 0)).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLINGS = ("latent_attention", "mean", "last_token")


def build_pooling(kind: str, dim: int, options: dict | None = None) -> nn.Module:
    """Build the pooling head named ``kind`` for hidden width ``dim``; ``options`` feed latent attention."""
    if kind == "latent_attention":
        return LatentAttentionPooling(dim, **(options or {}))
    if kind == "mean":
        return MeanPooling()
    if kind == "last_token":
        return LastTokenPooling()
    raise ValueError(f"unknown pooling {kind!r}; expected one of {', '.join(POOLINGS)}")
