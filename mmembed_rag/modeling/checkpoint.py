"""Reading and writing checkpoints in the released MM-Embed format (config.json + safetensors shards).

Safetensors only, no remote code. Key names are mapped between the release (which has the vision
tower's ``vision_model.`` level) and current transformers (which does not); any missing or unexpected
key is an error, never a silently random-initialised weight. A damaged checkpoint (unreadable or corrupt file,
wrong JSON type, impossible shape) is a :class:`~mmembed_rag.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint_files import read_json_object
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError
from .model import MMEmbedModel
from .profiles import build_config, check_shapes, profile_for

logger = logging.getLogger(__name__)

__all__ = ["load_model", "save_model", "write_weights", "weight_files", "read_config", "no_split_modules",
           "WEIGHTS_INDEX", "WEIGHTS_FILE"]

WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"

_RELEASE_VISION = re.compile(r"^vision_tower\.vision_model\.")
_NATIVE_VISION = re.compile(r"^vision_tower\.(?!vision_model\.)")


def _to_native(key: str) -> str:
    return _RELEASE_VISION.sub("vision_tower.", key)


def _to_release(key: str) -> str:
    return _NATIVE_VISION.sub("vision_tower.vision_model.", key)


def read_config(path: Path) -> dict[str, Any]:
    """Parse ``config.json`` (the raw dict, with MM-Embed's extra fields) and check it is a LLaVA-NeXT config."""
    file = path / "config.json"
    raw = read_json_object(file, "no config.json; not a checkpoint directory")
    if raw.get("model_type") != "llava_next":
        raise CheckpointError(f"{file}: model_type is {raw.get('model_type')!r}, expected 'llava_next'")
    return raw


def weight_files(path: Path) -> list[Path]:
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(err).__name__}: {err})") from err
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{index}: unreadable ({err})") from err
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map weight names to shard file names")
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (*.bin/*.pt) found; mmembed-rag loads safetensors only")
    raise CheckpointError(f"{path}: no {WEIGHTS_INDEX} or {WEIGHTS_FILE}")


def _read_shapes(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, Path]]:
    """Shape of every weight (native key names) and the shard file that holds it, from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    origin: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: weight shard listed in the index is missing")
        with _shard(file) as handle:
            for key in handle.keys():
                shapes[_to_native(key)] = tuple(handle.get_slice(key).get_shape())
                origin[_to_native(key)] = file
    return shapes, origin


@contextlib.contextmanager
def _shard(file: Path) -> Iterator[Any]:
    """``safe_open`` whose failures (corrupt header, unreadable file, bad tensor data) name the shard."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors shard ({err})") from err


def _pooling_from(raw: dict[str, Any], shapes: dict[str, tuple[int, ...]], origin: dict[str, Path],
                  heads: int) -> tuple[str, dict[str, int]]:
    """Pooling kind from config (default: latent attention), its sizes from the weight shapes and ``heads``."""
    kind = raw.get("pooling", "latent_attention")
    if kind != "latent_attention":
        return kind, {}
    prefix = "latent_attention_model."
    sizes = []
    for name in ("latents", "cross_attend_blocks.0.fn.to_q.weight", "cross_attend_blocks.1.fn.net.0.weight"):
        key = prefix + name
        if key not in shapes:
            raise CheckpointError(f"latent-attention weight {key} missing from the checkpoint")
        if len(shapes[key]) != 2 or 0 in shapes[key]:
            raise CheckpointError(f"{origin[key]}: latent-attention weight {key} has shape {shapes[key]}, "
                                  "expected a non-empty 2-D matrix")
        sizes.append(shapes[key])
    (num_latents, _), (inner, _), (ff_width, dim) = sizes
    if inner % heads or ff_width % (2 * dim):
        raise CheckpointError(f"{origin[prefix + 'latents']}: latent-attention sizes do not fit {heads} heads "
                              f"(query width {inner}) or a GEGLU of width {dim} (feed-forward width {ff_width})")
    return kind, {"num_latents": num_latents, "heads": heads, "head_dim": inner // heads,
                  "ff_mult": ff_width // (2 * dim)}


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None,
               device_map: str | dict[str, Any] | None = None) -> tuple[MMEmbedModel, dict[str, Any]]:
    """Build the network for checkpoint directory ``path`` and load its weights strictly.

    The language model's settings follow the checkpoint's profile (see :mod:`.profiles`); every tensor is
    read straight onto its device in the target dtype, so a 16 GB checkpoint never sits on the CPU first.

    Args:
        path: a local directory in the released format.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or a torch dtype); default: float32.
        device: where to put the weights (default CPU); ignored with ``device_map``.
        device_map: ``"auto"`` (or another accelerate strategy such as ``"balanced"``) or an explicit
            ``{module prefix: device}`` map spreading the model over several devices.

    Returns:
        The model in eval mode and the raw config dict.

    Raises:
        CheckpointError: bad config, missing shards, missing or unexpected keys, shape mismatch.
        DeviceError: unsupported dtype or unavailable device.
    """
    path = Path(path)
    raw = read_config(path)
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device) if device is not None else torch.device("cpu")
    files = weight_files(path)
    shapes, origin = _read_shapes(files)
    embed = shapes.get("language_model.embed_tokens.weight")
    if embed is None or len(embed) != 2:
        where = origin.get("language_model.embed_tokens.weight", path)
        raise CheckpointError(f"{where}: language_model.embed_tokens.weight missing or not 2-D ({embed})")
    try:
        config = build_config(raw, embedding_rows=embed[0])
        check_shapes(config, shapes)
        profile = profile_for(raw)
    except CheckpointError as err:  # the profile helpers say "config.json"; name the file itself
        raise CheckpointError(f"{path / 'config.json'}: {str(err).removeprefix('config.json: ')}") from err
    pooling, options = _pooling_from(raw, shapes, origin, profile.latent_heads)
    try:
        with init_empty_weights(include_buffers=False):
            model = MMEmbedModel(config, pooling=pooling, pooling_options=options, id_map=profile.id_map)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, IndexError) as err:
        raise CheckpointError(f"{path / 'config.json'}: the network it describes cannot be built "
                              f"({type(err).__name__}: {err})") from err
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
    placement = _device_map(model, device_map, torch_dtype) if device_map is not None else {"": target}
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with _shard(file) as handle:
            for key in handle.keys():
                native = _to_native(key)
                state[native] = handle.get_tensor(key).to(_placed(native, placement), torch_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if device_map is None:
        model.to(target)  # buffers (rotary frequencies stay float32, see MMEmbedModel._apply)
    else:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=placement)
    return model.eval(), raw


def no_split_modules(model: MMEmbedModel) -> list[str]:
    """Module classes a device map must keep whole: decoder and CLIP layers, and the pooling head."""
    names = {type(model.latent_attention_model).__name__}
    for tower in (model.language_model, model.vision_tower):
        names |= set(getattr(tower, "_no_split_modules", None) or ())
    return sorted(names)


def _device_map(model: MMEmbedModel, device_map: str | dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    if isinstance(device_map, dict):
        return device_map
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split_modules(model)) \
        if device_map in ("auto", "balanced") else None
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split_modules(model),
                                 dtype=dtype)


def _placed(key: str, placement: dict[str, Any]) -> torch.device:
    """Device of parameter ``key`` under a ``{module prefix: device}`` map (longest prefix wins)."""
    best = max((p for p in placement if p == "" or key == p or key.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise CheckpointError(f"device_map does not place weight {key}")
    device = placement[best]
    if device == "disk":
        raise CheckpointError(f"device_map puts {key} on 'disk'; offloading is not supported, give more memory")
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def save_model(model: MMEmbedModel, path: str | os.PathLike, raw_config: dict[str, Any],
               max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` in the released format: config.json, safetensors shards and their index."""
    state = {_to_release(k): v for k, v in model.state_dict().items()}
    write_weights(state, path, raw_config, max_shard_bytes, dtype)


def write_weights(state: dict[str, torch.Tensor], path: str | os.PathLike, raw_config: dict[str, Any],
                  max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> None:
    """Write ``state`` (already in the released key names) as safetensors shards, their index and config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in state.items()}
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


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
