"""The ``mmembed-rag`` command line: ``index``, ``search`` and ``rerank``, plus the fine-tuning commands
(``synth``, ``train``, ``mine``, ``eval``, ``export``) and ``demo``, which it hands to their own modules.

Run ``mmembed-rag --help``, ``python -m mmembed_rag.cli``, or call :func:`main` with a list of arguments.
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
