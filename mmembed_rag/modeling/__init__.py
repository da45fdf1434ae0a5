"""The native MM-Embed network and its checkpoint format."""

from __future__ import annotations

from .checkpoint import load_model, save_model
from .model import MMEmbedModel
from .pooling import LastTokenPooling, LatentAttentionPooling, MeanPooling

__all__ = ["MMEmbedModel", "load_model", "save_model", "LatentAttentionPooling", "MeanPooling", "LastTokenPooling"]
