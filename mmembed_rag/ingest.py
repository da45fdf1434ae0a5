"""Streaming, pipelined, all-or-nothing writes: the one ingest loop of the store and the LlamaIndex adapter.

A call hands over chunks (lists) of prepared input. Each chunk is encoded in a background thread while the
previous one is written in the calling thread, so a fast encoder (a GPU) is not kept waiting by the database.
Any failure -- a bad item found while preparing a later chunk, an encoder error, a refused write -- stops the
loop, undoes what the call wrote (the caller's ``rollback``) and re-raises: a call that fails writes nothing.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import MMEmbedError

__all__ = ["chunked", "pipelined_write", "relabel_item", "shift_item_index"]

logger = logging.getLogger(__name__)

C = TypeVar("C")
E = TypeVar("E")
T = TypeVar("T")

_ITEM_RE = re.compile(r"^item (\d+)(?=[: ])")


def chunked(iterable: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` consecutive elements (the last may be shorter), pulled lazily: memory stays bounded."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"chunk size must be a positive int, got {size!r}")
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def shift_item_index(exc: BaseException, offset: int | Sequence[int]) -> BaseException:
    """``exc`` with an ``"item i: ..."`` message renumbered to the caller's position (same type, chained).

    Errors raised for one chunk count items within the chunk; the caller sees the position in its own input:
    ``offset + i`` for an int ``offset``, ``offset[i]`` for a sequence of positions. Exceptions without such a
    message, or whose type cannot be rebuilt from a message, come back unchanged.
    """
    if isinstance(offset, int):
        return relabel_item(exc, lambda i: f"item {i + offset}")
    positions = list(offset)
    return relabel_item(exc, lambda i: f"item {positions[i]}" if 0 <= i < len(positions) else None)


def relabel_item(exc: BaseException, label: Callable[[int], str | None]) -> BaseException:
    """``exc`` with the ``"item i"`` that starts its message replaced by ``label(i)`` (same type, chained).

    Returns ``exc`` itself when it has no such message, ``label`` returns ``None`` or the same text, or its type
    cannot be rebuilt from a message.
    """
    if not isinstance(exc, MMEmbedError) or not exc.args or not isinstance(exc.args[0], str):
        return exc
    message = exc.args[0]
    match = _ITEM_RE.match(message)
    if match is None:
        return exc
    replacement = label(int(match.group(1)))
    if replacement is None or replacement == match.group(0):
        return exc
    try:
        relabelled = type(exc)(replacement + message[match.end():], *exc.args[1:])
    except TypeError:  # an error class with another constructor: keep the original
        return exc
    relabelled.__cause__ = exc
    return relabelled


def pipelined_write(chunks: Iterable[C], encode: Callable[[C], E], write: Callable[[C, E], None],
                    rollback: Callable[[], None], *, overlap: bool = True) -> int:
    """Encode chunk k+1 (worker thread) while chunk k is written (calling thread); on failure roll back and re-raise.

    Args:
        chunks: prepared chunks, pulled lazily in the calling thread (preparing a chunk -- validating its items --
            happens while the previous chunk is being encoded).
        encode: computes a chunk's vectors; runs in one worker thread, one chunk at a time, in order.
        write: stores a chunk with its vectors; runs in the calling thread, in order.
        rollback: undoes every write of this call; called once, on any exception, before it propagates.
        overlap: ``False`` runs encode and write back to back in the calling thread (for comparison).

    Returns:
        The number of chunks written.
    """
    written = 0
    pending: tuple[C, Future[E]] | None = None
    pool = ThreadPoolExecutor(1, thread_name_prefix="mmembed-encode") if overlap else None
    try:
        for chunk in chunks:
            if pool is None:
                write(chunk, encode(chunk))
                written += 1
                continue
            future = pool.submit(encode, chunk)
            if pending is not None:
                write(pending[0], pending[1].result())
                written += 1
            pending = (chunk, future)
        if pending is not None:
            chunk, future = pending
            pending = None
            write(chunk, future.result())
            written += 1
    except BaseException:
        if pending is not None:
            pending[1].cancel()
        if pool is not None:
            pool.shutdown(wait=True)  # let a running encode finish before the rollback touches the store
            pool = None
        _rollback(rollback)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return written


def _rollback(rollback: Callable[[], Any]) -> None:
    try:
        rollback()
    except Exception:  # the original error is the one to raise; say loudly that the rollback failed too
        logger.exception("rolling back a failed write failed as well; the store may hold part of the call")
