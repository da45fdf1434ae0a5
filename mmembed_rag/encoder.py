"""The Encoder: items in, L2-normalised float32 embeddings out, for queries and documents.

Batching (length-sorted, order restored), prompt building, image loading overlapped with the forward
pass, devices and dtypes live here once; every adapter and the finetune pipeline go through it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .arguments import positive_int
from .devices import default_dtype, resolve_device, resolve_dtype
from .errors import InvalidArgumentError, InvalidItemError, NumericalError
from .hub import resolve_checkpoint
from .images import DEFAULT_MAX_PIXELS, load_image
from .instructions import resolve_instruction
from .items import MultimodalItem, check_text, to_items
from .modeling.checkpoint import load_model, save_model
from .modeling.model import MMEmbedModel
from .preprocessing import GlobalViewProcessor
from .prompts import Prompt, PromptBuilder
from .tokenization import PromptTokenizer

logger = logging.getLogger(__name__)

__all__ = ["Encoder", "Batch"]

ItemLike = MultimodalItem | str | dict | Any


@dataclass
class Batch:
    """Model inputs for one batch, ready for ``MMEmbedModel.forward``; ``positions`` index the caller's list."""

    positions: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pool_mask: torch.Tensor
    pixel_values: torch.Tensor | None

    def to(self, device: torch.device) -> Batch:
        move = {"non_blocking": True}
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, **move)
        return Batch(self.positions, self.input_ids.to(device, **move), self.attention_mask.to(device, **move),
                     self.pool_mask.to(device, **move), pixels)


class Encoder:
    """MM-Embed bi-encoder: text, image and text+image items share one embedding space.

    Args:
        model: the network (see :meth:`from_pretrained`).
        tokenizer: the checkpoint's tokenizer.
        image_processor: turns an RGB image into the global-view tensor.
        max_length: text tokens per prompt before image expansion (longer text is cut, with a warning; an
            instruction is never cut: one that leaves no room for the query is an ``InvalidItemError``).
        add_eos: append EOS to prompts, as the release does.
        max_image_pixels: decompression-bomb bound for image loading (``None`` disables it).
        url_timeout: seconds an image URL's whole fetch may take (connect, headers and body together).
        image_workers: threads that load and preprocess a batch's images in parallel (decoding large
            photos is the bottleneck in front of a GPU); 1 loads them serially.
        release_compatible_images: convert images exactly as the release's image processor does (no EXIF
            orientation, alpha dropped) instead of upright and composited on white; see :func:`load_image`.
        prompt_tokenizer: tokenises prompts; default: built from ``tokenizer``'s backend.
            :meth:`from_pretrained` reads the checkpoint's ``tokenizer.json`` verbatim instead, which is what
            reproduces the release (transformers 5 rebuilds legacy Mistral tokenizers differently).

    Example:
        >>> enc = Encoder.from_pretrained("nvidia/MM-Embed", dtype="bfloat16", device="cuda")
        >>> q = enc.encode_queries(["a red square"], instruction="mscoco_t2i")
        >>> d = enc.encode_documents([{"img": "cat.png"}, "a cat on a mat"])
        >>> scores = q @ d.T
    """

    def __init__(self, model: MMEmbedModel, tokenizer: PreTrainedTokenizerBase,
                 image_processor: GlobalViewProcessor, max_length: int = 4096, add_eos: bool = True,
                 max_image_pixels: int | None = DEFAULT_MAX_PIXELS, url_timeout: float = 10.0,
                 image_workers: int = 4, release_compatible_images: bool = False,
                 prompt_tokenizer: PromptTokenizer | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        tokens = prompt_tokenizer or PromptTokenizer.from_tokenizer(tokenizer)
        self.prompts = PromptBuilder(tokens, model.image_token_index, max_length, add_eos)
        self.max_image_pixels = max_image_pixels
        self.url_timeout = url_timeout
        self.release_compatible_images = release_compatible_images
        self.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.raw_config: dict[str, Any] = {}
        self._image_pool = ThreadPoolExecutor(image_workers, "mmembed-image") if image_workers > 1 else None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "nvidia/MM-Embed", device: str | None = None,
                        dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
                        max_length: int = 4096, revision: str | None = None, local_files_only: bool = False,
                        **kwargs: Any) -> Encoder:
        """Load a checkpoint in the released MM-Embed format (a local directory or a hub name).

        Args:
            name_or_path: hub id (``"nvidia/MM-Embed"``) or a local directory.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
            dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default float32 on CPU, bfloat16 on CUDA.
            device_map: ``"auto"`` spreads the model over all visible GPUs, each weight read straight onto
                its device (decoder and CLIP layers kept whole); or an explicit ``{module: device}`` map.
            max_length: text tokens per prompt (the model card uses 4096).
            revision, local_files_only: passed to the hub download.
            **kwargs: further :class:`Encoder` options (``max_image_pixels``, ``url_timeout``, ``add_eos``,
                ``release_compatible_images``).

        Raises:
            ModelNotFoundError: no such directory and the hub cannot be reached.
            CheckpointError: the directory is not a valid checkpoint.
            DeviceError: an unsupported dtype, or CUDA asked for where there is none.
        """
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, default=default_dtype(target))
        path = resolve_checkpoint(name_or_path, revision=revision, local_files_only=local_files_only)
        model, raw = load_model(path, dtype=torch_dtype, device=target, device_map=device_map)
        tokens = PromptTokenizer.from_checkpoint(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        processor = GlobalViewProcessor.from_checkpoint(path, model.image_size)
        kwargs.setdefault("add_eos", bool(raw.get("add_eos_token", True)))
        encoder = cls(model, tokenizer, processor, max_length=max_length, prompt_tokenizer=tokens, **kwargs)
        encoder.raw_config = raw
        return encoder

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the model, tokenizer and image settings in the released format.

        The tokenizer files are copied verbatim from the checkpoint the prompts were read from (re-saving
        through transformers 5 would rewrite a legacy tokenizer.json in a form that tokenises differently).
        """
        path = Path(path)
        save_model(self.model, path, self.raw_config, max_shard_bytes=max_shard_bytes)
        if not self.prompts.tokens.copy_files(path):
            self.tokenizer.save_pretrained(str(path))
        proc = self.image_processor
        preprocessor = json.loads((path / "preprocessor_config.json").read_text()) if (
            path / "preprocessor_config.json").is_file() else {}
        preprocessor.update({"image_mean": proc.mean.tolist(), "image_std": proc.std.tolist(),
                             "resample": int(proc.resample), "rescale_factor": float(proc.rescale_factor)})
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True))

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.model.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.language_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.get_input_embeddings().weight.dtype

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
        """Embed documents (never with an instruction). Returns float32 (n, dim), rows L2-normalised.

        Raises:
            InvalidItemError, ImageLoadError, InvalidArgumentError, NumericalError: as :meth:`encode_queries`.
        """
        batch_size = positive_int(batch_size, "batch_size")
        items = to_items(items)
        return self._encode(items, self.document_prompts(items), batch_size, show_progress)

    def query_prompts(self, items: list[MultimodalItem], instruction: str | None = None) -> list[Prompt]:
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
        prompts = []
        for index, it in enumerate(items):
            try:
                prompts.append(self.prompts.query(it.text, it.image is not None,
                                                  resolve_instruction(it.instruction) if it.instruction else default))
            except InvalidItemError as exc:
                raise InvalidItemError(f"item {index}: {exc}") from exc
        return prompts

    def document_prompts(self, items: list[MultimodalItem]) -> list[Prompt]:
        """Tokenised document prompts (never an instruction)."""
        return [self.prompts.document(it.text, it.image is not None) for it in items]

    def batches(self, items: list[MultimodalItem], prompts: list[Prompt], batch_size: int) -> Iterator[Batch]:
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

    def token_count(self, prompt: Prompt) -> int:
        """Sequence length the model computes for ``prompt`` (image expanded)."""
        return len(prompt.ids) + (self.model.tokens_per_image - 1 if prompt.has_image else 0)

    def _encode(self, items: list[MultimodalItem], prompts: list[Prompt], batch_size: int,
                show_progress: bool | None) -> np.ndarray:
        truncated = [i for i, p in enumerate(prompts) if p.truncated]
        if truncated:
            logger.warning("%d item(s) longer than max_length=%d were truncated (first: item %d)",
                           len(truncated), self.prompts.max_length, truncated[0])
        out = np.empty((len(items), self.dim), dtype=np.float32)
        device = self.device
        bar = tqdm(total=len(items), desc="encoding", unit="item",
                   disable=not show_progress if show_progress is not None else len(items) < 256)
        with bar, torch.inference_mode():
            for batch in self.batches(items, prompts, batch_size):
                batch = batch.to(device)
                emb = self.model(batch.input_ids, batch.attention_mask, batch.pool_mask, batch.pixel_values)
                _check_finite(emb, batch.positions)
                out[batch.positions] = emb.float().cpu().numpy()
                bar.update(len(batch.positions))
        return out

    def collate(self, items: list[MultimodalItem], prompts: list[Prompt], positions: list[int]) -> Batch:
        """Model inputs for `items[positions]` (images loaded and preprocessed); training uses this too."""
        per_image = self.model.tokens_per_image
        image_id = self.model.image_token_index
        length = max(self.token_count(prompts[i]) for i in positions)
        input_ids = torch.full((len(positions), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(positions), length), dtype=torch.long)
        with_image = [i for i in positions if prompts[i].has_image]
        mapper = self._image_pool.map if self._image_pool is not None and len(with_image) > 1 else map
        pixels = list(mapper(lambda i: self._pixels(items[i], i), with_image))
        for row, i in enumerate(positions):
            prompt = prompts[i]
            ids = torch.tensor(prompt.ids, dtype=torch.long)
            if prompt.has_image:
                ids = ids.repeat_interleave(torch.where(ids == image_id, per_image, 1))
            input_ids[row, :len(ids)] = ids
            attention[row, :len(ids)] = 1
        pool = attention.clone()
        for row, i in enumerate(positions):
            pool[row, :prompts[i].masked_prefix] = 0
        empty = [positions[row] for row in (pool.sum(dim=1) == 0).nonzero().flatten().tolist()]
        if empty:  # PromptBuilder refuses such prompts; a hand-made Prompt must not pool to a zero vector either
            raise InvalidItemError(f"item {empty[0]}: its prompt has no token left to pool "
                                   f"(masked_prefix {prompts[empty[0]].masked_prefix} >= its length)")
        return Batch(positions, input_ids, attention, pool, torch.stack(pixels) if pixels else None)

    def _pixels(self, item: MultimodalItem, index: int) -> torch.Tensor:
        image = load_image(item.image, index=index, max_pixels=self.max_image_pixels, timeout=self.url_timeout,
                           release_compatible=self.release_compatible_images)
        return self.image_processor(image)



def _check_finite(emb: torch.Tensor, positions: list[int]) -> None:
    """Raise naming the items whose embedding has a NaN/inf (one reduction per batch, one sync)."""
    finite = torch.isfinite(emb).all(dim=1)
    if bool(finite.all()):
        return
    bad = [positions[row] for row in (~finite).nonzero().flatten().tolist()]
    shown = ", ".join(map(str, sorted(bad)[:10])) + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
    raise NumericalError(f"item(s) {shown}: the model produced non-finite (NaN/inf) embeddings; the checkpoint's "
                         "weights or its image normalisation (preprocessor_config.json) are broken")
