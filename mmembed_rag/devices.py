"""Device and dtype arguments, parsed in one place for the encoder, the reranker, the store and training."""

from __future__ import annotations

import torch

from .errors import DeviceError

__all__ = ["DTYPES", "resolve_dtype", "resolve_device", "default_dtype"]

#: Weight dtypes a model can be loaded in, by name.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` / ``None`` (``default``) → a torch dtype.

    Raises:
        DeviceError: not one of :data:`DTYPES`.
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise DeviceError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU; a CUDA device this machine lacks is refused up front.

    Raises:
        DeviceError: not a device name, or CUDA (or that CUDA index) is not available here.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"invalid device {device!r} ({err})") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} requested but this machine has no CUDA device "
                              "(torch.cuda.is_available() is False); use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA "
                              "device(s) are visible")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (what the 8B release is run in), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
