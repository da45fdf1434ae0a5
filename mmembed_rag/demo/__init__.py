"""The offline end-to-end demo (``make demo`` / ``python -m mmembed_rag.demo``)."""

from __future__ import annotations

from .run import default_models_dir, main, train_demo

__all__ = ["main", "train_demo", "default_models_dir"]
