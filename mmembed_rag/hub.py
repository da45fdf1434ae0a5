"""Resolving a model name or path to a local checkpoint directory, with a clear error when offline."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ModelNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["resolve_checkpoint", "DEFAULT_MODEL"]

DEFAULT_MODEL = "nvidia/MM-Embed"
# Everything a checkpoint needs, and nothing executable: the release's remote code is never fetched.
# chat_template.jinja: transformers 5 writes chat templates there; the reranker's prompts are built from it.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None,
                       local_files_only: bool = False, timeout: float = 10.0) -> Path:
    """Return a local directory for ``name_or_path``: the directory itself, or a Hugging Face Hub snapshot.

    Raises:
        ModelNotFoundError: the path does not exist and the hub has no usable copy (offline, unknown repo).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"model {name!r}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelNotFoundError(f"model {name!r}: not a local directory and huggingface_hub is missing") from err
    try:
        local = snapshot_download(name, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                  local_files_only=local_files_only, etag_timeout=timeout)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ModelNotFoundError(
            f"model {name!r}: not a local directory and it could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}). On a machine with network run `hf download {name} --local-dir DIR` "
            f"(safetensors and json files suffice), then pass Encoder.from_pretrained('DIR'); or set "
            f"HF_HUB_OFFLINE=1 if the model is already in your Hugging Face cache."
        ) from err
    logger.info("resolved %s to %s", name, local)
    return Path(local)
