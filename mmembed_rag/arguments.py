"""Validation of call arguments (not items) shared by the Encoder and the reranker."""

from __future__ import annotations

import numbers

from .errors import InvalidArgumentError

__all__ = ["positive_int"]


def positive_int(value: object, name: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1, else raise naming the argument.

    Integral numbers (``int``, ``numpy.int64``) are accepted; ``bool`` is refused although it is an ``int``
    subclass (``batch_size=True`` is a mistake, not 1), and so are floats and strings, even ``2.0`` or ``"4"``:
    a silent conversion would hide a mix-up of arguments.

    Args:
        value: the argument as the caller gave it.
        name: its name, for the message (e.g. ``"batch_size"``).

    Returns:
        ``value`` as a plain ``int``.

    Raises:
        InvalidArgumentError: ``value`` is not an integer, or is < 1 (a ``TypeError`` and a ``ValueError``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise InvalidArgumentError(f"{name} must be >= 1, got {value}")
    return int(value)
