"""Qwen3-VL images at dynamic resolution: the official smart-resize bounds, a PIL resize, then transformers'
PIL image processor with ``do_resize=False`` (normalise, patchify) — what Qwen3-VL-Embedding's code does."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ...checkpoint_files import read_json_object
from ...errors import CheckpointError

__all__ = ["QwenImages", "smart_resize", "MIN_PIXELS", "MAX_PIXELS"]

#: The official embedder's and reranker's bounds: 4 to 1800 visual tokens of 32x32 pixels.
MIN_PIXELS = 4 * 32 * 32
MAX_PIXELS = 1800 * 32 * 32
MAX_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with the pixel count within the bounds, aspect kept.

    Raises:
        ValueError: an aspect ratio above 200 (the official code refuses it too).
    """
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is above {MAX_RATIO} "
                         f"({width}x{height})")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class QwenImages:
    """RGB image → (patches, grid) for Qwen3-VL, and the token count an image size gives.

    Args:
        processor: transformers' PIL Qwen2-VL image processor with the checkpoint's mean/std/patch settings.
        min_pixels, max_pixels: the resize bounds (the official defaults: 4 and 1800 tokens' worth).
    """

    def __init__(self, processor: Qwen2VLImageProcessorPil, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> None:
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        self.processor = processor
        self.patch = int(processor.patch_size)
        self.merge = int(processor.merge_size)
        self.factor = self.patch * self.merge
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    @classmethod
    def from_checkpoint(cls, path: Path, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> QwenImages:
        """Read patch, merge and normalisation settings from ``preprocessor_config.json``.

        Raises:
            CheckpointError: the file is missing, unreadable or holds settings the processor refuses.
        """
        cfg = read_json_object(path / "preprocessor_config.json", "no preprocessor_config.json (Qwen3-VL "
                               "checkpoints carry one)")
        keep = ("image_mean", "image_std", "patch_size", "merge_size", "temporal_patch_size", "rescale_factor",
                "do_convert_rgb", "do_rescale", "do_normalize")
        try:
            processor = Qwen2VLImageProcessorPil(**{k: cfg[k] for k in keep if k in cfg})
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path / 'preprocessor_config.json'}: {err}") from err
        return cls(processor, min_pixels, max_pixels)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h

    def tokens(self, width: int, height: int) -> int:
        """Visual tokens the language model sees for an image of this size."""
        w, h = self.target_size(width, height)
        return (h // self.factor) * (w // self.factor)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches (n, 3 * t * p * p) float32, grid (1, 3) as ``image_grid_thw``) for one RGB image."""
        size = self.target_size(*image.size)
        if image.size != size:
            image = image.resize(size, resample=Image.Resampling.BICUBIC)
        out = self.processor(images=[image], do_resize=False, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]
