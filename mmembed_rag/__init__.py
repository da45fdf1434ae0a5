"""mmembed-rag: universal multimodal retrieval (MM-Embed) for RAG pipelines.

Text, image and text+image queries and documents share one embedding space; task instructions steer
the query side.
"""

from __future__ import annotations

from .encoder import Encoder
from .errors import (
    CheckpointError,
    DeviceError,
    ImageLoadError,
    InvalidArgumentError,
    InvalidItemError,
    MissingDependencyError,
    MMEmbedError,
    ModelNotFoundError,
    NumericalError,
)
from .instructions import TASK_INSTRUCTIONS, TaskInstruction, get_instruction
from .items import MultimodalItem
from .reranker import MLLMReranker
from .results import RankedItem

__version__ = "0.1.0"

__all__ = [
    "Encoder",
    "MultimodalItem",
    "MLLMReranker",
    "RankedItem",
    "MultimodalCollection",
    "MMEmbedEmbeddingFunction",
    "TASK_INSTRUCTIONS",
    "TaskInstruction",
    "get_instruction",
    "MMEmbedError",
    "InvalidItemError",
    "ImageLoadError",
    "ModelNotFoundError",
    "CheckpointError",
    "MissingDependencyError",
    "DeviceError",
    "NumericalError",
    "InvalidArgumentError",
    "__version__",
]

# The Chroma store needs chromadb (an extra); import it only when one of its names is used.
_STORE_NAMES = {"MultimodalCollection", "MMEmbedEmbeddingFunction"}


def __getattr__(name: str):
    if name in _STORE_NAMES:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
