"""Tiny checkpoints in the released formats, built in well under a second, for tests, notebooks and demos."""

from __future__ import annotations

from .checkpoint import make_tiny_checkpoint, tiny_config
from .reranker import make_tiny_reranker

__all__ = ["make_tiny_checkpoint", "make_tiny_reranker", "tiny_config"]
