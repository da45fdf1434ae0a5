"""Project exceptions: one base class, specific subclasses that also derive from the builtin they refine."""

from __future__ import annotations

__all__ = [
    "MMEmbedError",
    "InvalidItemError",
    "ImageLoadError",
    "ModelNotFoundError",
    "CheckpointError",
    "MissingDependencyError",
    "DeviceError",
    "NumericalError",
    "InvalidArgumentError",
]


class MMEmbedError(Exception):
    """Base class of every error raised on purpose by mmembed-rag."""


class InvalidItemError(MMEmbedError, ValueError):
    """An input item (query or document) is malformed: wrong type, empty, or with an unusable field."""


class ImageLoadError(MMEmbedError, ValueError):
    """An item's image could not be read, decoded, fetched, or is too large to decode safely."""


class ModelNotFoundError(MMEmbedError, OSError):
    """A model name or path resolves to nothing loadable (no local directory, hub unreachable)."""


class CheckpointError(MMEmbedError, ValueError):
    """A checkpoint directory exists but its config or weights do not match the expected format."""


class MissingDependencyError(MMEmbedError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class DeviceError(MMEmbedError, ValueError):
    """An unsupported dtype, or a device this machine does not have."""


class NumericalError(MMEmbedError, ValueError):
    """The model produced non-finite outputs (NaN or infinity) for the named items: broken weights or settings."""


class InvalidArgumentError(MMEmbedError, TypeError, ValueError):
    """A call argument (not an item) has the wrong type or value, e.g. ``batch_size=2.5``.

    It is both a ``TypeError`` and a ``ValueError`` so that either ``except`` clause catches it.
    """
