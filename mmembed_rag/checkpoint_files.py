"""Reading a checkpoint's JSON files: one function, every failure a CheckpointError naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = ["read_json_object"]


def read_json_object(file: Path, missing: str) -> dict[str, Any]:
    """The JSON object in ``file``.

    Args:
        file: the file to read.
        missing: the message when it does not exist (e.g. "no config.json; not a checkpoint directory").

    Raises:
        CheckpointError: the file is missing, unreadable (permissions, a directory, not UTF-8), not valid JSON,
            or holds something other than an object.
    """
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{file.parent}: {missing}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: invalid JSON ({err})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data
