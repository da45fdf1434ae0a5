"""Options the adapters pass through to the core: ``encoder_kwargs``, load-only settings, shared model handles.

Every adapter (LlamaIndex, LangChain, the Chroma embedding function) takes ``encoder_kwargs`` and, when it loads
the model itself, ``device``/``dtype``; the checks live here once.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["ENCODER_OPTIONS", "RERANKER_OPTIONS", "LoadOptions", "adapter_model", "adapter_options", "load_options",
           "check_load_only", "Shared"]

#: Keys of ``encoder_kwargs`` for an embedding adapter (``batch_size`` is per call, the rest are load options).
ENCODER_OPTIONS = ("max_length", "image_workers", "max_image_pixels", "url_timeout", "dim", "batch_size")
#: Keys of ``encoder_kwargs`` for a rerank adapter.
RERANKER_OPTIONS = ("max_length", "max_image_pixels", "url_timeout", "batch_size")

T = TypeVar("T")


class LoadOptions:
    """``encoder_kwargs`` split into what ``from_pretrained`` takes and the per-call ``batch_size``.

    Attributes:
        load: keyword arguments for ``Encoder.from_pretrained`` / ``MLLMReranker.from_pretrained``.
        batch_size: the ``batch_size`` given, or ``None``.
    """

    def __init__(self, load: dict[str, Any], batch_size: int | None) -> None:
        self.load = load
        self.batch_size = batch_size


def load_options(kwargs: Mapping[str, Any] | None, allowed: tuple[str, ...] = ENCODER_OPTIONS) -> LoadOptions:
    """Check ``encoder_kwargs`` (keys and value types) and split it.

    Raises:
        TypeError: not a dict, or a value of the wrong type.
        ValueError: an unknown key or an out-of-range value (the message names the key).
    """
    if kwargs is None:
        return LoadOptions({}, None)
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"encoder_kwargs must be a dict, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"encoder_kwargs has unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"known keys: {', '.join(allowed)}")
    for key, value in kwargs.items():
        _check(key, value)
    load = {key: value for key, value in kwargs.items() if key != "batch_size"}
    return LoadOptions(load, kwargs.get("batch_size"))


def _check(key: str, value: Any) -> None:
    if key == "max_image_pixels" and value is None:
        return
    if key == "url_timeout":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"encoder_kwargs['url_timeout'] must be a positive number of seconds, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"encoder_kwargs[{key!r}] must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"encoder_kwargs[{key!r}] must be at least 1, got {value}")


def check_load_only(given: str, **options: Any) -> None:
    """Refuse loading options together with an already loaded model.

    Args:
        given: the argument that carried the loaded model (``"encoder"``, ``"reranker"``).
        **options: the loading options as passed (``device=..., dtype=..., encoder_kwargs=...``); ``None`` and
            empty values count as not given.

    Raises:
        ValueError: naming the options that were given.
    """
    named = [name for name, value in options.items() if value is not None and value != {}]
    if named:
        verb = "applies" if len(named) == 1 else "apply"
        raise ValueError(f"{' and '.join(named)} {verb} only when loading; with {given}=..., set "
                         f"{'it' if len(named) == 1 else 'them'} when loading the {given} instead")


def adapter_options(encoder_kwargs: Mapping[str, Any] | None, *, batch_size: int, batch_size_given: bool,
                    loaded: Any = None, what: str = "encoder", device: str | None = None, dtype: str | None = None,
                    allowed: tuple[str, ...] = ENCODER_OPTIONS, batch_field: str = "batch_size") -> LoadOptions:
    """An adapter's loading options, checked once for every adapter.

    Args:
        encoder_kwargs: the adapter's ``encoder_kwargs``.
        batch_size: the adapter's own batch-size field.
        batch_size_given: whether the caller set that field explicitly.
        loaded: the already loaded model the caller passed, or ``None`` (the adapter loads it).
        what: the argument that carries it (``"encoder"``, ``"reranker"``), for messages.
        device, dtype: the adapter's loading fields.
        allowed: the keys ``encoder_kwargs`` may have.
        batch_field: the name of the batch-size field, for messages.

    Returns:
        ``load`` for ``from_pretrained`` and the ``batch_size`` to use (``encoder_kwargs``' when it has one).

    Raises:
        TypeError, ValueError: see :func:`load_options` and :func:`check_load_only`; both batch sizes given and
            different.
    """
    options = load_options(encoder_kwargs, allowed)
    if options.batch_size is not None and batch_size_given and batch_size != options.batch_size:
        raise ValueError(f"{batch_field} and encoder_kwargs['batch_size'] differ; give it once")
    if loaded is not None:
        check_load_only(what, device=device, dtype=dtype, encoder_kwargs=options.load)
    return LoadOptions(options.load, options.batch_size if options.batch_size is not None else batch_size)


def adapter_model(loader: Callable[..., T], name_or_path: Any, loaded: T | None,
                  encoder_kwargs: Mapping[str, Any] | None, **checks: Any) -> tuple[Shared[T], int]:
    """An adapter's model -- the one the caller passed, or ``loader(name_or_path, ...)`` with the checked options --
    and the batch size to use.

    Args:
        loader: ``Encoder.from_pretrained`` or ``MLLMReranker.from_pretrained``.
        name_or_path: what to load when ``loaded`` is ``None``.
        loaded: the already loaded model the caller passed, or ``None``.
        encoder_kwargs: the adapter's ``encoder_kwargs``.
        **checks: :func:`adapter_options`' keyword arguments (``batch_size``, ``batch_size_given``, ``device``,
            ``dtype``, ``what``, ``allowed``, ``batch_field``).

    Raises:
        TypeError, ValueError: see :func:`adapter_options`.
    """
    options = adapter_options(encoder_kwargs, loaded=loaded, **checks)
    model = loaded if loaded is not None else loader(name_or_path, device=checks.get("device"),
                                                     dtype=checks.get("dtype"), **options.load)
    return Shared(model), options.batch_size


class Shared(Generic[T]):
    """Holds a model handle that copies of the adapter share: ``copy.deepcopy`` (pydantic's ``model_copy(deep=True)``)
    returns the same holder, so a 7B model is never duplicated in memory."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict[int, Any]) -> Shared[T]:
        return self

    def __repr__(self) -> str:
        return f"Shared({type(self.value).__name__})"
