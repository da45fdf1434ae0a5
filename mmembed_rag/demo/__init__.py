"""The offline end-to-end demo (``make demo`` / ``python -m mmembed_rag.demo``)."""

from __future__ import annotations

from .run import main

__all__ = ["main"]
