"""The ``mmembed-rag`` command: parser, dispatch, logging and error reporting.

Global options may come before or after the command. Errors end the run with one ``error: ...`` line on
stderr and exit status 2 (wrong usage or input: a missing path, a bad model path, a malformed item) or 1
(anything else); ``-v`` adds the stack trace and DEBUG logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from mmembed_rag.devices import DTYPES
from mmembed_rag.errors import CheckpointError, ImageLoadError, InvalidItemError, ModelNotFoundError
from mmembed_rag.instructions import UnknownTaskError

from . import delegate, index, rerank, search
from .common import DEFAULT_PERSIST_DIR, TOKEN_ENV, UsageError, positive_int

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

# Global options that take a value: needed to find the command word before handing the rest to a delegate.
_VALUE_OPTIONS = {"--model", "--device", "--dtype", "--persist-dir", "--collection", "--host", "--port",
                  "--token-env", "--auth-header"}
_INPUT_ERRORS = (UsageError, InvalidItemError, ImageLoadError, UnknownTaskError, ModelNotFoundError,
                 CheckpointError)
# Also input errors, from modules that import heavy extras: recognised by name so they need not be imported.
_INPUT_ERROR_NAMES = {"StoreError", "DimensionMismatchError", "EmbeddingFunctionConfigError", "TemplateError",
                      "DeviceError", "UnknownModalityError"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error: ...`` line (raised, reported by :func:`main`), and options are
    never abbreviated (``--token SECRET`` must not become ``--token-env SECRET``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes; with ``suppress`` they only override when given (after the command)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    group.add_argument("--model", default=default(None),
                       help="embedding model: hub id or checkpoint folder (default: the collection's own, else "
                            "nvidia/MM-Embed)")
    group.add_argument("--device", default=default(None), help="torch device, e.g. cpu, cuda, cuda:1")
    group.add_argument("--dtype", choices=tuple(DTYPES), default=default(None),
                       help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    group.add_argument("--persist-dir", default=default(None),
                       help=f"embedded Chroma database folder (default {DEFAULT_PERSIST_DIR})")
    group.add_argument("--collection", default=default("mmembed"), help="collection name (default mmembed)")
    group.add_argument("--host", default=default(None), help="Chroma server host (instead of --persist-dir)")
    group.add_argument("--port", type=positive_int, default=default(None), help="Chroma server port (default 8000)")
    group.add_argument("--ssl", action="store_true", default=default(False), help="connect to the server over HTTPS")
    group.add_argument("--token-env", metavar="VAR", default=default(None),
                       help=f"environment variable holding the server's auth token (default {TOKEN_ENV}); the token "
                            "itself is never taken from the command line")
    group.add_argument("--auth-header", choices=("Authorization", "X-Chroma-Token"), default=default(None),
                       help="header the token is sent in (default Authorization: Bearer)")
    group.add_argument("--allow-model-change", action="store_true", default=default(False),
                       help="open a collection built with another model (e.g. the same weights moved elsewhere)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="print one JSON document on stdout")
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="DEBUG logging and full stack traces")
    group.add_argument("--no-progress", action="store_true", default=default(False), help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The full ``mmembed-rag`` parser."""
    from mmembed_rag import __version__

    parser = _Parser(prog="mmembed-rag", description="Universal multimodal retrieval (MM-Embed): index, search "
                     "and rerank text, images and both; fine-tune and evaluate encoders.")
    parser.add_argument("--version", action="version", version=f"mmembed-rag {__version__}")
    _global_options(parser, suppress=False)
    shared = _Parser(add_help=False)
    _global_options(shared, suppress=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (index, search, rerank):
        module.add_parser(commands, [shared])
    delegate.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mmembed-rag`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        _refuse_secrets(argv)
        parser = build_parser()
        prefix, command, rest = _split_delegated(argv)
        if command is not None:
            _configure_logging(parser.parse_args(prefix).verbose)
            return delegate.run(command, rest)
        args = parser.parse_args(argv)
        _configure_logging(args.verbose)
        if args.no_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if args.command is None:
            parser.print_help()
            return 2
        return args.run(args)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place every failure becomes a one-line message
        return _report_error(exc, verbose)


def _refuse_secrets(argv: list[str]) -> None:
    """A token on the command line would land in shell history and ``ps``; refuse it without echoing it."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in ("--token", "--auth-token", "--api-key", "--password"):
            raise UsageError(f"{name} is not an option: the Chroma server token is read from the environment "
                             f"variable {TOKEN_ENV} (or the one --token-env names), never from the command line")


def _split_delegated(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """``(global options, command, its arguments)`` when the command is delegated, else ``(argv, None, [])``."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _VALUE_OPTIONS else 1
    if i < len(argv) and argv[i] in delegate.DELEGATED:
        return argv[:i], argv[i], argv[i + 1:]
    return argv, None, []


def _report_error(exc: Exception, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    input_error = isinstance(exc, _INPUT_ERRORS) or any(cls.__name__ in _INPUT_ERROR_NAMES
                                                        for cls in type(exc).__mro__)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if not input_error and not message.startswith(type(exc).__name__):
        message = f"{type(exc).__name__}: {message}"
    print(f"error: {message}", file=sys.stderr)
    return 2 if input_error else 1


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (in-process callers may swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    """WARNING and up on stderr; with ``-v`` DEBUG for mmembed_rag and INFO for the libraries below it."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("mmembed_rag").setLevel(logging.DEBUG if verbose else logging.NOTSET)


if __name__ == "__main__":
    sys.exit(main())
