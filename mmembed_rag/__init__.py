"""mmembed-rag: universal multimodal retrieval (MM-Embed) for RAG pipelines.

Text, image and text+image queries and documents share one embedding space; task instructions steer
the query side.
"""

from __future__ import annotations

from .encoder import Encoder
from .errors import (
    CheckpointError,
    ImageLoadError,
    InvalidItemError,
    MissingDependencyError,
    MMEmbedError,
    ModelNotFoundError,
)
from .instructions import TASK_INSTRUCTIONS, TaskInstruction, get_instruction
from .items import MultimodalItem

__version__ = "0.1.0"

__all__ = [
    "Encoder",
    "MultimodalItem",
    "TASK_INSTRUCTIONS",
    "TaskInstruction",
    "get_instruction",
    "MMEmbedError",
    "InvalidItemError",
    "ImageLoadError",
    "ModelNotFoundError",
    "CheckpointError",
    "MissingDependencyError",
    "__version__",
]
