"""Commands that belong to other entry points: the fine-tuning pipeline and the offline demo.

Everything after the command name is passed on untouched (``--help`` included), so
``mmembed-rag train --config recipe.yaml`` is ``python -m mmembed_rag.finetune train --config recipe.yaml``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mmembed_rag.errors import MissingDependencyError, MMEmbedError

__all__ = ["FINETUNE_COMMANDS", "DELEGATED", "add_parsers", "run"]

logger = logging.getLogger(__name__)

FINETUNE_COMMANDS = {
    "synth": "write the procedural M-BEIR-format benchmark (fine-tuning data)",
    "train": "contrastive fine-tuning (stage 1 or 2, continual text fine-tuning)",
    "mine": "modality-aware hard negative mining",
    "eval": "M-BEIR Recall@k, nDCG@10 and modality accuracy",
    "export": "merge adapters into a checkpoint in the released format",
    "pipeline": "the whole recipe: synth, train, mine, train again, eval, export",
}
DELEGATED = {**FINETUNE_COMMANDS, "demo": "offline demo on a tiny checkpoint built on the spot"}
_FINETUNE_MODULE = "mmembed_rag.finetune.__main__"
_FINETUNE_EXTRAS = {"peft", "yaml", "ir_measures"}


class CommandUnavailableError(MMEmbedError, RuntimeError):
    """The module a delegated command runs is not installed."""


def add_parsers(subparsers: Any) -> None:
    """List the delegated commands in ``mmembed-rag --help`` (their arguments are parsed by their own modules)."""
    for name, summary in DELEGATED.items():
        subparsers.add_parser(name, help=summary if name == "demo" else f"fine-tuning: {summary}", add_help=False)


def run(command: str, argv: Sequence[str]) -> int:
    """Run a delegated ``command`` with its own arguments; returns its exit status.

    Raises:
        CommandUnavailableError: the fine-tuning command line is not part of this installation.
        MissingDependencyError: the ``finetune`` extra is not installed.
    """
    if command == "demo":
        from mmembed_rag.demo import main as demo_main

        return _call(demo_main, list(argv))
    try:
        module = importlib.import_module(_FINETUNE_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name in _FINETUNE_EXTRAS:
            raise MissingDependencyError(f'`mmembed-rag {command}` needs the finetune extra ({exc.name} is '
                                         'missing): pip install "mmembed-rag[finetune]"') from exc
        if exc.name in (_FINETUNE_MODULE, "mmembed_rag.finetune"):
            raise CommandUnavailableError(f"`mmembed-rag {command}` needs {_FINETUNE_MODULE}, which this "
                                          "installation lacks") from exc
        raise
    return _call(module.main, [command, *argv])


def _call(entry: Callable[[list[str]], Any], argv: list[str]) -> int:
    """Call ``entry(argv)``, turning its ``SystemExit`` (argparse's ``--help`` and errors) into a status."""
    try:
        result = entry(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
