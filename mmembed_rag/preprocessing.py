"""Image preprocessing for the global view: the whole image squashed to the vision tower's square size.

Same arithmetic as LLaVA-NeXT's image processor for its first AnyRes patch (PIL resize, rescale,
normalise) without computing the high-resolution tiles MM-Embed never uses.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint_files import read_json_object
from .errors import CheckpointError

__all__ = ["GlobalViewProcessor"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class GlobalViewProcessor:
    """RGB PIL image → float32 tensor (3, size, size), normalised.

    Raises:
        ValueError: a mean or std that is not 3 finite numbers (std > 0), a rescale factor that is not a finite
            positive number, or an unknown resampling filter: each would give NaN or meaningless pixels silently.
    """

    def __init__(self, size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
                 resample: int = Image.Resampling.BICUBIC, rescale_factor: float = 1 / 255) -> None:
        self.size = size
        self.mean = _channels(mean, "image_mean", positive=False)
        self.std = _channels(std, "image_std", positive=True)
        if not _finite_number(rescale_factor) or rescale_factor <= 0:
            raise ValueError(f"rescale_factor must be a finite number > 0, got {rescale_factor!r}")
        try:
            self.resample = Image.Resampling(resample)
        except (ValueError, TypeError) as err:
            raise ValueError(f"resample must be a PIL resampling filter (0-5), got {resample!r}") from err
        self.rescale_factor = np.float32(rescale_factor)

    @classmethod
    def from_checkpoint(cls, path: str | Path, size: int) -> GlobalViewProcessor:
        """Read mean, std, resampling and rescale factor from ``preprocessor_config.json`` when present.

        Raises:
            CheckpointError: the file is unreadable, not a JSON object, or holds invalid values (e.g. a zero std).
        """
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return cls(size)
        cfg = read_json_object(file, "no preprocessor_config.json")
        try:
            return cls(size, cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD),
                       cfg.get("resample", Image.Resampling.BICUBIC), cfg.get("rescale_factor", 1 / 255))
        except ValueError as err:
            raise CheckpointError(f"{file}: {err}") from err

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=self.resample, reducing_gap=None)
        array = np.asarray(image, dtype=np.float32) * self.rescale_factor
        array = (array - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _channels(values: Any, name: str, positive: bool) -> np.ndarray:
    """Three finite per-channel numbers (> 0 for a std, which divides) as float32."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 3 \
            or not all(_finite_number(v) for v in values) or (positive and not all(v > 0 for v in values)):
        need = "3 finite numbers > 0" if positive else "3 finite numbers"
        raise ValueError(f"{name} must be {need} (one per RGB channel), got {values!r}")
    return np.asarray(values, dtype=np.float32)
