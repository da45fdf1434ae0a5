"""Reading and writing checkpoints in the released MM-Embed format (config.json + safetensors shards).

Safetensors only, no remote code. Key names are mapped between the release (which has the vision
tower's ``vision_model.`` level) and current transformers (which does not); any missing or unexpected
key is an error, never a silently random-initialised weight.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlavaNextConfig

from ..errors import CheckpointError
from .model import MMEmbedModel

logger = logging.getLogger(__name__)

__all__ = ["load_model", "save_model", "read_config", "WEIGHTS_INDEX", "WEIGHTS_FILE"]

WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Latent-attention sizes the release took from NV-Embed-v1's config; only `heads` cannot be read off shapes.
DEFAULT_LATENT_HEADS = 8

_RELEASE_VISION = re.compile(r"^vision_tower\.vision_model\.")
_NATIVE_VISION = re.compile(r"^vision_tower\.(?!vision_model\.)")


def _to_native(key: str) -> str:
    return _RELEASE_VISION.sub("vision_tower.", key)


def _to_release(key: str) -> str:
    return _NATIVE_VISION.sub("vision_tower.vision_model.", key)


def read_config(path: Path) -> tuple[LlavaNextConfig, dict[str, Any]]:
    """Parse ``config.json`` into a LLaVA-NeXT config plus the raw dict (for MM-Embed's extra fields)."""
    file = path / "config.json"
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: no config.json; not a checkpoint directory") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: invalid JSON ({err})") from err
    if raw.get("model_type") != "llava_next":
        raise CheckpointError(f"{file}: model_type is {raw.get('model_type')!r}, expected 'llava_next'")
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "transformers_version")}
    return LlavaNextConfig(**fields), raw


def _weight_files(path: Path) -> list[Path]:
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (*.bin/*.pt) found; mmembed-rag loads safetensors only")
    raise CheckpointError(f"{path}: no {WEIGHTS_INDEX} or {WEIGHTS_FILE}")


def _read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: weight shard listed in the index is missing")
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[_to_native(key)] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _pooling_from(raw: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> tuple[str, dict[str, int]]:
    """Pooling kind from config (default: latent attention) and its sizes from the weight shapes."""
    kind = raw.get("pooling", "latent_attention")
    if kind != "latent_attention":
        return kind, {}
    prefix = "latent_attention_model."
    try:
        num_latents, _ = shapes[prefix + "latents"]
        inner, _ = shapes[prefix + "cross_attend_blocks.0.fn.to_q.weight"]
        ff_width, dim = shapes[prefix + "cross_attend_blocks.1.fn.net.0.weight"]
    except KeyError as err:
        raise CheckpointError(f"latent-attention weight {err.args[0]} missing from the checkpoint") from err
    heads = int(raw.get("latent_attention_heads", DEFAULT_LATENT_HEADS))
    return kind, {"num_latents": num_latents, "heads": heads, "head_dim": inner // heads,
                  "ff_mult": ff_width // (2 * dim)}


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None) -> tuple[MMEmbedModel, dict[str, Any]]:
    """Build the network for checkpoint directory ``path`` and load its weights strictly.

    Args:
        path: a local directory in the released format.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or a torch dtype); default: float32.
        device: where to put the weights (default CPU).

    Returns:
        The model in eval mode and the raw config dict.

    Raises:
        CheckpointError: bad config, missing shards, missing or unexpected keys, shape mismatch.
    """
    path = Path(path)
    config, raw = read_config(path)
    torch_dtype = _resolve_dtype(dtype)
    files = _weight_files(path)
    shapes = _read_shapes(files)
    pooling, options = _pooling_from(raw, shapes)
    with init_empty_weights(include_buffers=False):
        model = MMEmbedModel(config, pooling=pooling, pooling_options=options)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model built from config.json; "
            f"missing keys: {_preview(missing)}; unexpected keys: {_preview(unexpected)}"
        )
    wrong = [k for k in expected if tuple(expected[k].shape) != shapes[k]]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: {len(wrong)} weights have the wrong shape, e.g. {k}: "
                              f"checkpoint {shapes[k]}, model {tuple(expected[k].shape)}")
    state: dict[str, torch.Tensor] = {}
    target = torch.device(device) if device is not None else torch.device("cpu")
    for file in files:
        with safe_open(str(file), framework="pt", device=str(target)) as handle:
            for key in handle.keys():
                state[_to_native(key)] = handle.get_tensor(key).to(torch_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=target, dtype=torch_dtype)  # buffers (rotary, position ids) follow the weights
    return model.eval(), raw


def save_model(model: MMEmbedModel, path: str | os.PathLike, raw_config: dict[str, Any],
               max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` in the released format: config.json, safetensors shards and their index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {_to_release(k): v.detach().to(dtype or v.dtype).contiguous().cpu()
             for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    (path / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    (path / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True))


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
