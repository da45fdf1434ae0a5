"""Image preprocessing for the global view: the whole image squashed to the vision tower's square size.

Same arithmetic as LLaVA-NeXT's image processor for its first AnyRes patch (PIL resize, rescale,
normalise) without computing the high-resolution tiles MM-Embed never uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["GlobalViewProcessor"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class GlobalViewProcessor:
    """RGB PIL image → float32 tensor (3, size, size), normalised."""

    def __init__(self, size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
                 resample: int = Image.Resampling.BICUBIC, rescale_factor: float = 1 / 255) -> None:
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.resample = Image.Resampling(resample)
        self.rescale_factor = np.float32(rescale_factor)

    @classmethod
    def from_checkpoint(cls, path: str | Path, size: int) -> GlobalViewProcessor:
        """Read mean, std, resampling and rescale factor from ``preprocessor_config.json`` when present."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return cls(size)
        cfg = json.loads(file.read_text())
        return cls(size, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD)),
                   cfg.get("resample", Image.Resampling.BICUBIC), cfg.get("rescale_factor", 1 / 255))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=self.resample, reducing_gap=None)
        array = np.asarray(image, dtype=np.float32) * self.rescale_factor
        array = (array - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
