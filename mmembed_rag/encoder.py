"""The Encoder: items in, L2-normalised float32 embeddings out, for queries and documents.

Batching (length-sorted, order restored), image loading overlapped with the forward pass, devices and dtypes
live here once; prompts, image preprocessing and the forward are the checkpoint family's (``families``). Every
adapter and the finetune pipeline go through it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .arguments import positive_int
from .devices import default_dtype, resolve_device, resolve_dtype
from .errors import InvalidArgumentError, InvalidItemError, NumericalError
from .families import Batch, EmbeddingFamily, load_embedding_family
from .hub import resolve_checkpoint
from .image_probe import probe_image
from .images import DEFAULT_MAX_PIXELS, load_image
from .instructions import resolve_instruction
from .items import MultimodalItem, check_text, to_items

logger = logging.getLogger(__name__)

__all__ = ["Encoder", "Batch"]

ItemLike = MultimodalItem | str | dict | Any


class Encoder:
    """Multimodal bi-encoder: text, image and text+image items share one embedding space.

    The checkpoint's family (MM-Embed / LLaVA-NeXT, or Qwen3-VL-Embedding) is read from its config.json and
    does the prompts, image preprocessing and forward; batching, image loading and checks live here.

    Args:
        family: the loaded model family (see :meth:`from_pretrained`).
        max_image_pixels: decompression-bomb bound for image loading (``None`` disables it).
        url_timeout: seconds an image URL's whole fetch may take (connect, headers and body together).
        image_workers: threads that load and preprocess a batch's images in parallel (decoding large
            photos is the bottleneck in front of a GPU); 1 loads them serially.
        release_compatible_images: convert images exactly as the MM-Embed release's image processor does (no EXIF
            orientation, alpha dropped) instead of upright and composited on white; see :func:`load_image`.
        dim: output dimension, for Matryoshka-trained families (Qwen3-VL-Embedding): embeddings are cut to their
            first ``dim`` values and renormalised. ``None``: the model's full width.

    Example:
        >>> enc = Encoder.from_pretrained("nvidia/MM-Embed", dtype="bfloat16", device="cuda")
        >>> q = enc.encode_queries(["a red square"], instruction="mscoco_t2i")
        >>> d = enc.encode_documents([{"img": "cat.png"}, "a cat on a mat"])
        >>> scores = q @ d.T
    """

    def __init__(self, family: EmbeddingFamily, max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
                 url_timeout: float = 10.0, image_workers: int = 4, release_compatible_images: bool = False,
                 dim: int | None = None) -> None:
        self.family = family
        self.max_image_pixels = max_image_pixels
        self.url_timeout = url_timeout
        self.release_compatible_images = release_compatible_images
        self.output_dim = _output_dim(dim, family)
        self._image_pool = ThreadPoolExecutor(image_workers, "mmembed-image") if image_workers > 1 else None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "nvidia/MM-Embed", device: str | None = None,
                        dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
                        max_length: int | None = None, revision: str | None = None, local_files_only: bool = False,
                        **kwargs: Any) -> Encoder:
        """Load a checkpoint (a local directory or a hub name) in a released layout of a supported family.

        Args:
            name_or_path: hub id (``"nvidia/MM-Embed"``, ``"Qwen/Qwen3-VL-Embedding-2B"``) or a local directory.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
            dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default float32 on CPU, bfloat16 on CUDA.
            device_map: ``"auto"`` spreads the model over all visible GPUs, each weight read straight onto
                its device (decoder and vision layers kept whole); or an explicit ``{module: device}`` map.
            max_length: tokens per prompt; default the family's (MM-Embed: 4096 text tokens before the image,
                as its model card; Qwen3-VL: 8192 tokens in all, as the official embedder).
            revision, local_files_only: passed to the hub download.
            **kwargs: :class:`Encoder` options (``max_image_pixels``, ``url_timeout``, ``image_workers``,
                ``release_compatible_images``, ``dim``) and the family's (MM-Embed: ``add_eos``; Qwen3-VL:
                ``min_pixels``, ``max_pixels``, ``default_instruction``).

        Raises:
            ModelNotFoundError: no such directory and the hub cannot be reached.
            CheckpointError: the directory is not a valid checkpoint of a supported family.
            DeviceError: an unsupported dtype, or CUDA asked for where there is none.
            InvalidArgumentError: ``dim`` is not valid for this checkpoint.
        """
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, default=default_dtype(target))
        own = {k: kwargs.pop(k) for k in ("max_image_pixels", "url_timeout", "image_workers",
                                          "release_compatible_images", "dim") if k in kwargs}
        path = resolve_checkpoint(name_or_path, revision=revision, local_files_only=local_files_only)
        family = load_embedding_family(path, dtype=torch_dtype, device=target, device_map=device_map,
                                       max_length=max_length, **kwargs)
        return cls(family, **own)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the model, tokenizer and processor settings in the family's released layout.

        The tokenizer files are copied verbatim from the checkpoint the prompts were read from (re-saving
        through transformers 5 would rewrite a legacy tokenizer.json in a form that tokenises differently).
        """
        self.family.save_pretrained(path, max_shard_bytes=max_shard_bytes)

    @property
    def model(self) -> torch.nn.Module:
        """The network: ``model(**batch.inputs)`` gives a batch's full-width embeddings."""
        return self.family.model

    @property
    def tokenizer(self) -> Any:
        return self.family.tokenizer

    @property
    def raw_config(self) -> dict[str, Any]:
        """The checkpoint's config.json."""
        return self.family.raw_config

    @property
    def max_length(self) -> int:
        return self.family.max_length

    @property
    def dim(self) -> int:
        """Embedding dimension (``dim`` when set)."""
        return self.output_dim or self.family.dim

    @property
    def device(self) -> torch.device:
        return self.family.device

    @property
    def dtype(self) -> torch.dtype:
        return self.family.dtype

    def encode_queries(self, items: Iterable[ItemLike], instruction: str | None = None, batch_size: int = 8,
                       show_progress: bool | None = None) -> np.ndarray:
        """Embed queries; ``instruction`` is a catalog task name or free text (an item's own wins).

        Returns:
            float32 array (n, dim), rows L2-normalised.

        Raises:
            InvalidItemError: an item is malformed, or its instruction leaves no room for it within ``max_length``.
            ImageLoadError: an item's image cannot be loaded.
            InvalidArgumentError: ``batch_size`` is not an int >= 1, or ``instruction`` is not valid Unicode.
            NumericalError: the model produced NaN/inf for some items (broken weights or image settings).
        """
        batch_size = positive_int(batch_size, "batch_size")
        items = to_items(items)
        return self._encode(items, self.query_prompts(items, instruction), batch_size, show_progress)

    def encode_documents(self, items: Iterable[ItemLike], batch_size: int = 8,
                         show_progress: bool | None = None) -> np.ndarray:
        """Embed documents (never with a task instruction). Returns float32 (n, dim), rows L2-normalised.

        Raises:
            InvalidItemError, ImageLoadError, InvalidArgumentError, NumericalError: as :meth:`encode_queries`.
        """
        batch_size = positive_int(batch_size, "batch_size")
        items = to_items(items)
        return self._encode(items, self.document_prompts(items), batch_size, show_progress)

    def query_prompts(self, items: list[MultimodalItem], instruction: str | None = None) -> list[Any]:
        """Tokenised query prompts; an item's own instruction wins over ``instruction`` (name or text).

        Raises:
            InvalidItemError: an item's instruction leaves no room for it within ``max_length`` (named by index).
            InvalidArgumentError: ``instruction`` is not valid Unicode (a lone surrogate).
        """
        try:
            check_text(instruction, "instruction")
        except InvalidItemError as exc:
            raise InvalidArgumentError(str(exc)) from exc
        default = resolve_instruction(instruction)
        chosen = [resolve_instruction(it.instruction) if it.instruction else default for it in items]
        return self.family.query_prompts(items, chosen, self._probe)

    def document_prompts(self, items: list[MultimodalItem]) -> list[Any]:
        """Tokenised document prompts."""
        return self.family.document_prompts(items, self._probe)

    def batches(self, items: list[MultimodalItem], prompts: list[Any], batch_size: int) -> Iterator[Batch]:
        """Length-sorted batches of model inputs, prepared one batch ahead in a background thread."""
        batch_size = positive_int(batch_size, "batch_size")
        lengths = [self.token_count(p) for p in prompts]
        order = sorted(range(len(items)), key=lambda i: -lengths[i])
        groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if not groups:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmembed-prep") as pool:
            pending: Future = pool.submit(self.collate, items, prompts, groups[0])
            for nxt in groups[1:] + [None]:
                batch = pending.result()
                pending = pool.submit(self.collate, items, prompts, nxt) if nxt is not None else None
                yield batch

    def token_count(self, prompt: Any) -> int:
        """Sequence length the model computes for ``prompt`` (images expanded)."""
        return self.family.token_count(prompt)

    def embed(self, batch: Batch) -> torch.Tensor:
        """A batch's embeddings on the model's device: (b, dim), L2-normalised (cut to ``dim`` when set)."""
        return self.cut(self.model(**batch.inputs))

    def cut(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Full-width embeddings cut to ``dim`` and renormalised (unchanged without ``dim``)."""
        if self.output_dim is None:
            return embeddings
        return torch.nn.functional.normalize(embeddings[:, :self.output_dim], p=2, dim=-1)

    def _encode(self, items: list[MultimodalItem], prompts: list[Any], batch_size: int,
                show_progress: bool | None) -> np.ndarray:
        truncated = [i for i, p in enumerate(prompts) if self.family.truncated(p)]
        if truncated:
            logger.warning("%d item(s) longer than max_length=%d were truncated (first: item %d)",
                           len(truncated), self.max_length, truncated[0])
        out = np.empty((len(items), self.dim), dtype=np.float32)
        device = self.device
        bar = tqdm(total=len(items), desc="encoding", unit="item",
                   disable=not show_progress if show_progress is not None else len(items) < 256)
        with bar, torch.inference_mode():
            for batch in self.batches(items, prompts, batch_size):
                emb = self.embed(batch.to(device))
                _check_finite(emb, batch.positions)
                out[batch.positions] = emb.float().cpu().numpy()
                bar.update(len(batch.positions))
        return out

    def collate(self, items: list[MultimodalItem], prompts: list[Any], positions: list[int]) -> Batch:
        """Model inputs for `items[positions]` (images loaded and preprocessed); training uses this too."""
        parallel = self._image_pool is not None and sum(1 for i in positions if prompts[i].has_image) > 1
        return self.family.collate(items, prompts, positions, self._load,
                                   self._image_pool.map if parallel else map)

    def _load(self, item: MultimodalItem, index: int) -> Any:
        return load_image(item.image, index=index, max_pixels=self.max_image_pixels, timeout=self.url_timeout,
                          release_compatible=self.release_compatible_images)

    def _probe(self, item: MultimodalItem, index: int) -> Any:
        return probe_image(item.image, index=index, max_pixels=self.max_image_pixels, timeout=self.url_timeout,
                           release_compatible=self.release_compatible_images)


def _output_dim(dim: int | None, family: EmbeddingFamily) -> int | None:
    """Validate a Matryoshka output dimension against the family and its width."""
    if dim is None:
        return None
    if not family.matryoshka:
        raise InvalidArgumentError(f"dim={dim!r}: {family.name} checkpoints are not trained for Matryoshka "
                                   f"truncation; their embeddings are {family.dim}-dimensional")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= family.dim:
        raise InvalidArgumentError(f"dim must be an int in [1, {family.dim}], got {dim!r}")
    return None if dim == family.dim else dim


def _check_finite(emb: torch.Tensor, positions: list[int]) -> None:
    """Raise naming the items whose embedding has a NaN/inf (one reduction per batch, one sync)."""
    finite = torch.isfinite(emb).all(dim=1)
    if bool(finite.all()):
        return
    bad = [positions[row] for row in (~finite).nonzero().flatten().tolist()]
    shown = ", ".join(map(str, sorted(bad)[:10])) + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
    raise NumericalError(f"item(s) {shown}: the model produced non-finite (NaN/inf) embeddings; the checkpoint's "
                         "weights or its image normalisation (preprocessor_config.json) are broken")
