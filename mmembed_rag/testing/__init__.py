"""Tiny checkpoints in the released formats (MM-Embed, LLaVA-NeXT rerankers, Qwen3-VL), built in seconds."""

from __future__ import annotations

from .checkpoint import make_tiny_checkpoint, tiny_config
from .nv_embed import make_tiny_nv_embed
from .qwen3_vl import make_tiny_qwen3_vl
from .reranker import make_tiny_reranker

__all__ = ["make_tiny_checkpoint", "make_tiny_nv_embed", "make_tiny_qwen3_vl", "make_tiny_reranker", "tiny_config"]
