"""The MM-Embed bi-encoder network: LLaVA-NeXT front end, bidirectional decoder, pooling head.

Built from transformers' own blocks (any LLaVA-NeXT-family vision tower and language model), so no
remote code runs. Parameter names match the released checkpoint once ``checkpoint.py`` maps the
vision tower prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlavaNextConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

from .pooling import build_pooling

__all__ = ["MMEmbedModel"]


class MMEmbedModel(nn.Module):
    """Vision tower → projector → image tokens spliced into a bidirectional LM → pooled, normalised vector.

    Args:
        config: a LLaVA-NeXT config (vision and text sub-configs, projector settings).
        pooling: ``"latent_attention"`` (MM-Embed), ``"mean"`` or ``"last_token"``.
        pooling_options: sizes for latent attention (``num_latents``, ``heads``, ``head_dim``, ``ff_mult``).
        id_map: token ids replaced before the embedding lookup, e.g. the release's pad 32001 → EOS 2 (its
            embedding has no row for LLaVA-NeXT's pad token).

    Rotary frequencies stay float32 whatever dtype the model is cast to, as in the release (its cos/sin are
    computed in float32 and cast to the activation dtype at the end).
    """

    def __init__(self, config: LlavaNextConfig, pooling: str = "latent_attention",
                 pooling_options: dict | None = None, id_map: Mapping[int, int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.pooling = pooling
        self.id_map = dict(id_map or {})
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        hidden = config.text_config.hidden_size
        self.image_newline = nn.Parameter(torch.randn(hidden) / hidden**0.5)
        self.language_model = AutoModel.from_config(config.text_config)
        for module in self.language_model.modules():  # bidirectional: no causal masking anywhere
            if hasattr(module, "is_causal"):
                module.is_causal = False
        # Named as in the release; mean / last-token pooling have no parameters.
        self.latent_attention_model = build_pooling(pooling, hidden, pooling_options)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        # .to(bfloat16) / .half() would round the rotary inverse frequencies (a bf16 frequency is off by radians
        # at position 2,000); keep them float32 and only follow the device.
        frequencies = {name: buf for name, buf in self.named_buffers() if name.rsplit(".", 1)[-1].endswith("inv_freq")}
        super()._apply(fn, recurse)
        for name, original in frequencies.items():
            owner, _, attr = name.rpartition(".")
            module = self.get_submodule(owner)
            moved = getattr(module, attr)
            if moved.dtype != original.dtype:
                module.register_buffer(attr, original.to(moved.device), persistent=False)
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def image_token_index(self) -> int:
        return self.config.image_token_index

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def tokens_per_image(self) -> int:
        """Projected patch tokens of the global view plus one ``image_newline`` token."""
        patches = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
        if self.config.vision_feature_select_strategy == "full":
            patches += 1
        return patches + 1

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(m, 3, S, S) global views → (m, tokens_per_image, hidden) language-model input embeddings."""
        layers = self.config.vision_feature_layer
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        if isinstance(layers, int):
            features = out.hidden_states[layers]
        else:
            features = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop CLS
        features = self.multi_modal_projector(features)
        newline = self.image_newline.to(features.device, features.dtype).expand(features.shape[0], 1, -1)
        return torch.cat([features, newline], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Embed a batch.

        Args:
            input_ids: (b, n) with ``tokens_per_image`` copies of the image token per image, right padded.
            attention_mask: (b, n) 1 for real tokens.
            pool_mask: (b, n) 1 for the tokens the pooling averages (no instruction prefix, no padding).
            pixel_values: (m, 3, S, S), one global view per image, in order of appearance.

        Returns:
            (b, hidden) L2-normalised embeddings.
        """
        image_slots = input_ids == self.image_token_index
        embed = self.language_model.get_input_embeddings()
        ids = input_ids.masked_fill(image_slots, 0)
        for source, target in self.id_map.items():
            ids = ids.masked_fill(ids == source, target)
        inputs_embeds = embed(ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            features = self.encode_images(pixel_values.to(inputs_embeds.dtype)).reshape(-1, inputs_embeds.shape[-1])
            if features.shape[0] != int(image_slots.sum()):
                raise ValueError(f"{int(image_slots.sum())} image slots but {features.shape[0]} image tokens")
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)  # autocast may hand back bf16/fp16
            inputs_embeds = inputs_embeds.masked_scatter(image_slots.unsqueeze(-1), features)
        mask = create_bidirectional_mask(
            config=self.language_model.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            allow_is_bidirectional_skip=False,
        )
        hidden = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        pooled = self.latent_attention_model(hidden, pool_mask.to(hidden.device))
        return F.normalize(pooled.float(), p=2, dim=-1)
