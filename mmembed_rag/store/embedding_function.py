"""``MMEmbedEmbeddingFunction``: MM-Embed as a Chroma embedding function (documents and images).

Chroma persists ``name()`` and ``get_config()`` with a collection and, in a later process, rebuilds the
function with ``build_from_config`` -- once per ``collection.configuration`` access, so building is cheap:
the encoder is loaded lazily on first use and shared through an in-process cache keyed by
``(model, dtype, device, encoder options)``. Importing :mod:`mmembed_rag.store` registers the function under
``"mmembed"``; a process that reopens a persisted collection must import it before querying by text.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from chromadb.api.types import Embeddable, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function
from PIL import Image

from mmembed_rag.devices import DTYPES, resolve_dtype
from mmembed_rag.encoder import Encoder
from mmembed_rag.errors import DeviceError, InvalidItemError
from mmembed_rag.hub import DEFAULT_MODEL
from mmembed_rag.instructions import resolve_instruction
from mmembed_rag.items import MultimodalItem, to_item
from mmembed_rag.options import check_load_only, load_options

from .errors import EmbeddingFunctionConfigError

__all__ = ["MMEmbedEmbeddingFunction", "cached_encoder", "clear_encoder_cache"]

logger = logging.getLogger(__name__)

CONFIG_KEYS = ("model", "dtype", "instruction", "batch_size", "encoder_kwargs")

_EncoderKey = tuple[str, str | None, str | None, tuple[tuple[str, Any], ...]]
_ENCODERS: dict[_EncoderKey, Encoder] = {}
# One lock for the whole cache: a second thread asking for a model that is loading waits instead of
# loading it again, and loading two different models at once would only compete for memory anyway.
_ENCODERS_LOCK = threading.Lock()


def model_reference(model: str | os.PathLike) -> str:
    """The string a config stores for ``model``: an absolute path for a local directory, else the hub id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else str(model)


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """``None`` or a name in :data:`~mmembed_rag.devices.DTYPES`; :class:`EmbeddingFunctionConfigError` otherwise."""
    if dtype is None:
        return None
    try:
        resolved = resolve_dtype(dtype)
    except DeviceError:
        raise EmbeddingFunctionConfigError(
            f"dtype must be None or one of {', '.join(DTYPES)}, got {dtype!r}") from None
    return next(name for name, value in DTYPES.items() if value == resolved)


def _options_key(encoder_kwargs: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(load_options(encoder_kwargs).load.items()))


def cached_encoder(model: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype | None = None,
                   device: str | None = None, encoder_kwargs: Mapping[str, Any] | None = None) -> Encoder:
    """Load an encoder once per process for each ``(model, dtype, device, encoder_kwargs)``; thread-safe.

    Args:
        model: hub id or checkpoint directory (directories are keyed by their absolute path).
        dtype: ``None`` (Encoder's default for the device), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``None`` (CUDA when available) or a torch device string.
        encoder_kwargs: Encoder options (``max_length``, ``image_workers``, ``max_image_pixels``,
            ``url_timeout``; a ``batch_size`` key is ignored here).

    Returns:
        The shared :class:`~mmembed_rag.Encoder`.
    """
    key = (model_reference(model), dtype_name(dtype), None if device is None else str(device),
           _options_key(encoder_kwargs))
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            logger.info("loading encoder %s (dtype=%s, device=%s, options=%s)", *key)
            encoder = Encoder.from_pretrained(key[0], dtype=key[1], device=key[2], **dict(key[3]))
            _ENCODERS[key] = encoder
    return encoder


def clear_encoder_cache() -> None:
    """Drop every cached encoder (their memory is freed once no embedding function holds them)."""
    with _ENCODERS_LOCK:
        _ENCODERS.clear()


def _share_encoder(encoder: Encoder, key: _EncoderKey) -> None:
    with _ENCODERS_LOCK:
        _ENCODERS.setdefault(key, encoder)


@register_embedding_function
class MMEmbedEmbeddingFunction(EmbeddingFunction[Embeddable]):
    """MM-Embed for Chroma: ``documents`` (text) and ``images`` (numpy arrays, e.g. from ``ImageLoader``).

    Args:
        model: hub id or checkpoint directory; it is what a persisted collection records and reloads.
        encoder: an already loaded encoder of ``model`` (then ``model`` must name where its weights live,
            so that another process can rebuild the function). It is shared with later
            ``build_from_config`` calls in this process.
        dtype: weights dtype (``None``: bfloat16 on CUDA, float32 on CPU). Recorded in the config.
        device: torch device (``None``: CUDA when available). Not recorded: a reopened collection picks
            the device of the machine that opens it.
        instruction: query instruction for :meth:`embed_query` (a catalog name such as
            ``"mscoco_t2i"`` or free text); documents never get one.
        batch_size: items per forward pass.
        encoder_kwargs: Encoder options (``max_length``, ``image_workers``, ``max_image_pixels``, ``url_timeout``,
            ``batch_size``), recorded in the config so a reopened collection loads the encoder the same way.
            A ``batch_size`` key sets ``batch_size``.

    Raises:
        EmbeddingFunctionConfigError: bad ``dtype``, ``batch_size`` or ``encoder_kwargs``.
        InvalidItemError, UnknownTaskError: bad ``instruction``.

    Example:
        >>> import chromadb
        >>> from chromadb.utils.data_loaders import ImageLoader
        >>> ef = MMEmbedEmbeddingFunction("nvidia/MM-Embed", instruction="mscoco_t2i")
        >>> col = chromadb.PersistentClient("db").get_or_create_collection(
        ...     "photos", embedding_function=ef, data_loader=ImageLoader())
        >>> col.add(ids=["cat"], uris=["cat.png"])
        >>> col.query(query_texts=["a cat on a mat"], n_results=1)
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, encoder: Encoder | None = None,
                 dtype: str | torch.dtype | None = None, device: str | None = None,
                 instruction: str | None = None, batch_size: int = 8,
                 encoder_kwargs: Mapping[str, Any] | None = None) -> None:
        try:
            options = load_options(encoder_kwargs)
        except (TypeError, ValueError) as exc:
            raise EmbeddingFunctionConfigError(str(exc)) from exc
        if options.batch_size is not None:
            batch_size = options.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EmbeddingFunctionConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        resolve_instruction(instruction)  # fail now on a mistyped catalog name, not at the first query
        self.model = model_reference(model)
        self.dtype = dtype_name(dtype)
        self.device = None if device is None else str(device)
        self.instruction = instruction
        self.batch_size = batch_size
        self.encoder_kwargs: dict[str, Any] = dict(options.load)
        self._encoder = encoder
        self._lock = threading.Lock()
        if encoder is not None:
            try:
                check_load_only("encoder", encoder_kwargs=self.encoder_kwargs)
            except ValueError as exc:
                raise EmbeddingFunctionConfigError(str(exc)) from exc
            _share_encoder(encoder, (self.model, self.dtype, self.device, _options_key(self.encoder_kwargs)))

    @property
    def encoder(self) -> Encoder:
        """The encoder, loaded (or taken from the process cache) on first use."""
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    self._encoder = cached_encoder(self.model, self.dtype, self.device, self.encoder_kwargs)
        return self._encoder

    def __call__(self, input: Embeddable) -> Embeddings:
        """Embed Chroma documents (str) and/or images (numpy arrays) as documents, in order.

        Returns:
            One float32 L2-normalised vector per input (Chroma's ``Embeddings``: a list of 1-D arrays).

        Raises:
            InvalidItemError: an empty list, an empty text, a ``None`` (an unloadable URI) or an unsupported type.
            ImageLoadError: an image array of the wrong dtype or shape.
        """
        vectors = self.encoder.encode_documents(chroma_items(input), batch_size=self.batch_size)
        return list(vectors)

    def embed_query(self, input: Embeddable) -> Embeddings:
        """Embed query texts and/or images with the configured instruction (Chroma calls this for queries)."""
        vectors = self.encoder.encode_queries(chroma_items(input), instruction=self.instruction,
                                              batch_size=self.batch_size)
        return list(vectors)

    @staticmethod
    def name() -> str:
        return "mmembed"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        # Vectors are L2-normalised, so all three spaces rank identically.
        return ["cosine", "ip", "l2"]

    def get_config(self) -> dict[str, Any]:
        config = {"model": self.model, "dtype": self.dtype, "instruction": self.instruction,
                  "batch_size": self.batch_size}
        if self.encoder_kwargs:
            config["encoder_kwargs"] = dict(self.encoder_kwargs)
        return config

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MMEmbedEmbeddingFunction:
        """Rebuild from :meth:`get_config` output (cheap: the encoder loads on first use)."""
        MMEmbedEmbeddingFunction.validate_config(config)
        try:
            return MMEmbedEmbeddingFunction(config["model"], dtype=config.get("dtype"),
                                            instruction=config.get("instruction"),
                                            batch_size=config.get("batch_size", 8),
                                            encoder_kwargs=config.get("encoder_kwargs"))
        except InvalidItemError as exc:  # the instruction: report it as the config problem it is
            raise EmbeddingFunctionConfigError(f"mmembed config: {exc}") from exc

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        """Check a persisted config's keys and types.

        Raises:
            EmbeddingFunctionConfigError: naming the offending key.
        """
        if not isinstance(config, Mapping):
            raise EmbeddingFunctionConfigError(f"mmembed config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise EmbeddingFunctionConfigError(
                f"mmembed config has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(CONFIG_KEYS)}")
        model = config.get("model")
        if not isinstance(model, str) or not model.strip():
            raise EmbeddingFunctionConfigError(f"mmembed config needs 'model' (a hub id or a path), got {model!r}")
        dtype_name(config.get("dtype"))
        instruction = config.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise EmbeddingFunctionConfigError(
                f"mmembed config 'instruction' must be a string or null, got {type(instruction).__name__}")
        batch_size = config.get("batch_size", 8)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EmbeddingFunctionConfigError(
                f"mmembed config 'batch_size' must be a positive int, got {batch_size!r}")
        try:
            load_options(config.get("encoder_kwargs"))
        except (TypeError, ValueError) as exc:
            raise EmbeddingFunctionConfigError(f"mmembed config 'encoder_kwargs': {exc}") from exc

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        """Refuse a model change: vectors already stored would live in another embedding space."""
        if "model" in new_config and new_config["model"] != old_config.get("model"):
            raise EmbeddingFunctionConfigError(
                f"cannot change the model of a collection from {old_config.get('model')!r} to "
                f"{new_config['model']!r}: its stored vectors come from the old model; use a new collection")

    def __repr__(self) -> str:
        return (f"MMEmbedEmbeddingFunction(model={self.model!r}, dtype={self.dtype!r}, "
                f"instruction={self.instruction!r}, batch_size={self.batch_size}, "
                f"encoder_kwargs={self.encoder_kwargs!r})")


def chroma_items(inputs: Sequence[Any]) -> list[MultimodalItem]:
    """Turn Chroma's ``documents`` / ``images`` (or a mix) into items; text is always text, never a path.

    Raises:
        InvalidItemError: empty input, a single value instead of a list, ``None`` or an unsupported element.
    """
    if isinstance(inputs, (str, np.ndarray)):
        raise InvalidItemError(
            f"expected a list of documents or images, got a single {type(inputs).__name__}; wrap it in a list")
    items = []
    for index, value in enumerate(inputs):
        if value is None:
            raise InvalidItemError(f"item {index}: no document or image (None: a URI the data loader could "
                                   "not resolve?)")
        if isinstance(value, np.ndarray):
            try:
                items.append(MultimodalItem(image=_pil_for_wide_array(value)))
            except InvalidItemError as exc:
                raise InvalidItemError(f"item {index}: {exc}") from exc
        else:
            items.append(to_item(value, index))
    if not items:
        raise InvalidItemError("nothing to embed: the input list is empty")
    return items


def _pil_for_wide_array(array: np.ndarray) -> np.ndarray | Image.Image:
    """ImageLoader gives ``np.array(PIL.Image.open(uri))``: 16-bit and float grayscale become PIL images
    again so that image loading scales them to 8 bits; uint8 arrays (and bad arrays, reported later) pass."""
    if array.ndim == 2 and array.dtype in (np.uint16, np.int32, np.float32):
        return Image.fromarray(array)
    return array
