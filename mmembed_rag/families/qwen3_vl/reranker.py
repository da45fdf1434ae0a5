"""The Qwen3-VL-Reranker, native: the official pointwise score, sigmoid of the "yes" minus "no" logit at the last
position of the official judge prompt, with the query part's key/value cache shared across candidates.

Prompt (the official one, through the checkpoint's chat template): a fixed system message asking for "yes" or
"no", then a user turn ``<Instruct>: {instruction}<Query>:{query images}{query text}\\n<Document>:{document
images}{document text}``, then the generation prompt. Sequences longer than ``max_length`` keep every special
token (image tokens included), the last five tokens and the first non-special tokens that fit, as the official.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DynamicCache, Qwen3VLForConditionalGeneration

from ...arguments import positive_int
from ...devices import default_dtype, resolve_device, resolve_dtype
from ...errors import ImageLoadError, InvalidArgumentError, InvalidItemError
from ...hub import resolve_checkpoint
from ...images import DEFAULT_MAX_PIXELS, load_image
from ...items import MultimodalItem
from ...reranker_base import Reranker, check_finite
from ...tokenization import PromptTokenizer
from .chat import ChatTemplate, load_chat_template
from .checkpoint import load_pretrained
from .vision import MAX_PIXELS, MIN_PIXELS, QwenImages

__all__ = ["Qwen3VLReranker", "DEFAULT_RERANK_INSTRUCTION", "JUDGE_SYSTEM"]

logger = logging.getLogger(__name__)

#: The official reranker's default instruction.
DEFAULT_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
#: The official reranker's system message.
JUDGE_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                'Note that the answer can only be "yes" or "no".')
_KEPT_TAIL = 5  # "<|im_end|>\n<|im_start|>assistant\n": never truncated


class Qwen3VLReranker(Reranker):
    """Qwen3-VL-Reranker checkpoints (``Qwen3VLForConditionalGeneration`` weights).

    Args:
        model: the generative model (its backbone runs; ``lm_head`` gives the yes/no direction).
        tokenizer: the checkpoint's tokenizer (renders the chat template).
        images: the dynamic-resolution image processor.
        template: the chat template.
        tokens: the prompt tokenizer (the checkpoint's ``tokenizer.json``).
        max_length: tokens per pair before the kept tail (the official 10240).
        default_instruction: the instruction when a call gives none.
        max_image_pixels: decompression-bomb bound for image loading (``None`` disables it).
        url_timeout: seconds an image URL's whole fetch may take.

    Example:
        >>> reranker = MLLMReranker.from_pretrained("Qwen/Qwen3-VL-Reranker-2B")  # this class, from its config
        >>> reranker.rerank("a red square", [{"img": "red.png"}, "a blue circle"], instruction="Find the picture.")
    """

    def __init__(self, model: Qwen3VLForConditionalGeneration, tokenizer: Any, images: QwenImages, template: str,
                 tokens: PromptTokenizer, max_length: int = 10240,
                 default_instruction: str = DEFAULT_RERANK_INSTRUCTION,
                 max_image_pixels: int | None = DEFAULT_MAX_PIXELS, url_timeout: float = 10.0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.images = images
        self.chat = ChatTemplate(template, tokenizer, tokens)
        self.tokens = tokens
        self.max_length = positive_int(max_length, "max_length")
        self.default_instruction = default_instruction
        self.max_image_pixels = max_image_pixels
        self.url_timeout = url_timeout
        vocab = tokenizer.get_vocab()
        if "yes" not in vocab or "no" not in vocab:
            raise InvalidArgumentError("the tokenizer has no single 'yes' / 'no' tokens; not a Qwen3-VL reranker")
        self.answer_ids = (vocab["yes"], vocab["no"])
        self.image_pad_id = model.config.image_token_id
        self.special_ids = set(tokens.special_ids)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | None = None,
                        dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
                        max_length: int = 10240, revision: str | None = None, local_files_only: bool = False,
                        min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, **kwargs: Any) -> Qwen3VLReranker:
        """Load a Qwen3-VL reranker (safetensors, transformers' own classes, no remote code).

        Raises:
            ModelNotFoundError, CheckpointError, DeviceError: as :meth:`MLLMReranker.from_pretrained`.
        """
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, default=default_dtype(target))
        path = resolve_checkpoint(name_or_path, revision=revision, local_files_only=local_files_only)
        model = load_pretrained(Qwen3VLForConditionalGeneration, path, torch_dtype, target, device_map)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(model, tokenizer, QwenImages.from_checkpoint(path, min_pixels, max_pixels),
                   load_chat_template(path, tokenizer), PromptTokenizer.from_checkpoint(path),
                   max_length=max_length, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def direction(self) -> torch.Tensor:
        """The "yes" minus "no" row of the LM head (read each time: training moves it), float32."""
        weight = self.model.lm_head.weight
        return (weight[self.answer_ids[0]] - weight[self.answer_ids[1]]).detach().float()

    def answer_logits(self, queries: Any, candidates: Any, template: Any = None,
                      instruction: str | None = None) -> torch.Tensor:
        """Logits of "yes" and "no" at the last position for (query, candidate) pairs, differentiable.

        The training-side view of :meth:`score`: the same prompts, truncation and images, each pair one full
        right-padded sequence; ``softmax(logits, -1)[:, 0]`` is the official score, sigmoid(yes - no).

        Returns:
            float32 tensor (n_pairs, 2).

        Raises:
            ValueError: ``queries`` and ``candidates`` differ in length or are empty. InvalidItemError,
            ImageLoadError: a pair (named by index) is invalid. InvalidArgumentError: ``template`` given.
        """
        if template is not None:
            raise InvalidArgumentError("template= is for LLaVA-NeXT rerankers; a Qwen3-VL reranker's prompt is the "
                                       "official one, steered by instruction=")
        if len(queries) != len(candidates) or not len(queries):
            raise ValueError(f"need as many queries as candidates (at least one), got {len(queries)} and "
                             f"{len(candidates)}")
        sequences, images = [], []
        for i, (query, candidate) in enumerate(zip(queries, candidates)):
            try:
                query_item, (item,) = self._items(query, [candidate])
            except InvalidItemError as exc:
                raise InvalidItemError(f"pair {i}: " + str(exc).replace("candidate 0:", "candidate:", 1)) from exc
            sides = ((query_item, "query"), (item, "candidate"))
            own = [self._image(side, f"pair {i} {label}") for side, label in sides if side.image is not None]
            ids = self.tokens.encode(self.chat.render(JUDGE_SYSTEM, self._user(query_item, item, instruction)))
            sequences.append(self._sequence(ids, [g for _, g in own])[0])
            images.extend(own)
        full, mask = self._padded(sequences)
        hidden = self.model.model(**self._inputs(full, mask, images), use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(sequences), device=hidden.device), mask.sum(dim=1) - 1]
        return self.model.lm_head(last).float()[:, list(self.answer_ids)]

    def format_prompt(self, query: Any, candidate: Any, instruction: str | None = None) -> str:
        """The decoded prompt of one pair (images as their pad tokens), to check what the model sees."""
        query_item, (item,) = self._items(query, [candidate])
        ids = self.tokens.encode(self.chat.render(JUDGE_SYSTEM, self._user(query_item, item, instruction)))
        return self.tokenizer.decode(ids)

    # -- inputs -----------------------------------------------------------------------------------------

    def _user(self, query: MultimodalItem, item: MultimodalItem, instruction: str | None) -> list[tuple[str, Any]]:
        parts: list[tuple[str, Any]] = [("text", "<Instruct>: " + (instruction or self.default_instruction))]
        for prefix, side in (("<Query>:", query), ("\n<Document>:", item)):
            parts.append(("text", prefix))
            if side.image is not None:
                parts.append(("image", None))
            if side.text is not None:
                parts.append(("text", side.text))
        return parts

    def _image(self, item: MultimodalItem, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            image = load_image(item.image, max_pixels=self.max_image_pixels, timeout=self.url_timeout)
        except ImageLoadError as exc:
            raise ImageLoadError(f"{label}: {exc}") from exc
        try:
            return self.images(image)
        except ValueError as exc:  # an aspect ratio the official code refuses too
            raise InvalidItemError(f"{label}: image {exc}") from exc

    def _sequence(self, ids: list[int], grids: list[torch.Tensor]) -> tuple[list[int], bool]:
        """Image pads expanded, then the official truncation; returns (ids, truncated)."""
        counts = iter(int(g.prod()) // self.images.merge ** 2 for g in grids)
        full: list[int] = []
        for token in ids:
            full.extend([token] * next(counts) if token == self.image_pad_id else [token])
        if len(full) <= self.max_length:
            return full, False
        head, tail = full[:-_KEPT_TAIL], full[-_KEPT_TAIL:]
        budget = self.max_length - sum(t in self.special_ids for t in head)
        kept = []
        for token in head:
            if token in self.special_ids:
                kept.append(token)
            elif budget > 0:
                kept.append(token)
                budget -= 1
        return kept + tail, True

    # -- scoring ----------------------------------------------------------------------------------------

    def score_logits(self, query: Any, candidates: Any, batch_size: int = 16, show_progress: bool | None = None,
                     use_cache: bool = True, instruction: str | None = None) -> np.ndarray:
        """The official score before its sigmoid: the "yes" minus "no" logit, float32 (len(candidates),).

        Near 0 or 1 the sigmoid hides differences; compare and combine these instead. Raises as :meth:`score`.
        """
        query_item, items = self._items(query, candidates)
        return self._margins(query_item, items, batch_size, show_progress, None, use_cache, instruction)

    def _score(self, query: MultimodalItem, items: list[MultimodalItem], batch_size: int,
               show_progress: bool | None, template: Any, use_cache: bool, instruction: str | None) -> np.ndarray:
        margins = self._margins(query, items, batch_size, show_progress, template, use_cache, instruction)
        return torch.sigmoid(torch.from_numpy(margins)).numpy()

    def _margins(self, query: MultimodalItem, items: list[MultimodalItem], batch_size: int,
                 show_progress: bool | None, template: Any, use_cache: bool, instruction: str | None) -> np.ndarray:
        batch_size = positive_int(batch_size, "batch_size")
        if template is not None:
            raise InvalidArgumentError("template= is for LLaVA-NeXT rerankers; a Qwen3-VL reranker's prompt is the "
                                       "official one, steered by instruction=")
        out = np.zeros(len(items), dtype=np.float32)
        if not items:
            return out
        query_image = [self._image(query, "query")] if query.image is not None else []
        sequences, images, cut = [], [], 0
        for i, item in enumerate(items):
            own = query_image + ([self._image(item, f"candidate {i}")] if item.image is not None else [])
            ids = self.tokens.encode(self.chat.render(JUDGE_SYSTEM, self._user(query, item, instruction)))
            full, was_cut = self._sequence(ids, [g for _, g in own])
            sequences.append(full)
            images.append(own)
            cut += was_cut
        if cut:
            logger.warning("%d pair(s) longer than max_length=%d tokens were truncated", cut, self.max_length)
        bar = tqdm(total=len(items), desc="reranking", unit="cand",
                   disable=not show_progress if show_progress is not None else len(items) < 256)
        with bar, torch.inference_mode():
            prefix = self._shared_prefix(sequences, len(query_image)) if use_cache else 0
            if prefix:
                self._score_cached(sequences, images, prefix, len(query_image), batch_size, out, bar)
            else:
                for i, (ids, own) in enumerate(zip(sequences, images)):
                    out[i] = self._logits([ids], own)[0]
                    bar.update(1)
        return check_finite(out)

    def _shared_prefix(self, sequences: list[list[int]], query_images: int) -> int:
        """Tokens every pair starts with, ending before any candidate image and leaving each pair one token."""
        first = sequences[0]
        limit = min(len(s) for s in sequences) - 1
        length = 0
        while length < limit and all(s[length] == first[length] for s in sequences):
            length += 1
        runs = _pad_runs(first, self.image_pad_id)
        if len(runs) > query_images:  # a candidate image in the first pair starts where the prefix must stop
            length = min(length, runs[query_images][0])
        if query_images and (not runs or runs[0][1] > length):
            return 0  # the query image is not whole inside the prefix (truncation cut differently): no sharing
        return length

    def _score_cached(self, sequences: list[list[int]], images: list[list[tuple[torch.Tensor, torch.Tensor]]],
                      prefix: int, query_images: int, batch_size: int, out: np.ndarray, bar: tqdm) -> None:
        backbone = self.model.model
        head_images = images[0][:query_images]
        ids = torch.tensor([sequences[0][:prefix]], device=self.device)
        cache = backbone(**self._inputs(ids, torch.ones_like(ids), head_images), use_cache=True).cache
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            full, mask = self._padded([sequences[i] for i in rows])
            grids = [g for i in rows for _, g in images[i]]
            types = (full == self.image_pad_id).int() * mask.int()
            positions, _ = backbone.get_rope_index(full, mm_token_type_ids=types,
                                                   image_grid_thw=torch.cat(grids) if grids else None,
                                                   attention_mask=mask)
            tail_images = [img for i in rows for img in images[i][query_images:]]
            inputs = self._inputs(full[:, prefix:], mask, tail_images)
            hidden = backbone(**inputs, position_ids=positions[:, :, prefix:], cache=self._repeat(cache, len(rows)),
                              use_cache=True).last_hidden_state
            last = mask[:, prefix:].sum(dim=1) - 1
            out[rows] = (hidden[torch.arange(len(rows), device=hidden.device), last].float()
                         @ self.direction).cpu().numpy()
            bar.update(len(rows))

    def _logits(self, sequences: list[list[int]], images: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
        """Naive reference: whole sequences, images encoded afresh; the yes-minus-no logit per row."""
        full, mask = self._padded(sequences)
        hidden = self.model.model(**self._inputs(full, mask, images), use_cache=False).last_hidden_state
        last = mask.sum(dim=1) - 1
        rows = torch.arange(len(sequences), device=hidden.device)
        return (hidden[rows, last].float() @ self.direction).cpu().numpy()

    def _repeat(self, cache: DynamicCache, batch: int) -> DynamicCache:
        """A fresh cache holding the prefix keys/values once per row (the forward appends to it)."""
        data = [(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)) for keys, values, *_ in cache]
        return DynamicCache(data, config=self.model.config.text_config)

    def _padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _inputs(self, ids: torch.Tensor, mask: torch.Tensor,
                images: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                  "mm_token_type_ids": (ids == self.image_pad_id).int()}
        if images:
            inputs["pixel_values"] = torch.cat([p for p, _ in images]).to(self.device)
            inputs["image_grid_thw"] = torch.cat([g for _, g in images]).to(self.device)
        return inputs


def _pad_runs(ids: list[int], pad: int) -> list[tuple[int, int]]:
    """(start, end) of each run of image pads."""
    runs, start = [], None
    for i, token in enumerate(ids + [None]):
        if token == pad and start is None:
            start = i
        elif token != pad and start is not None:
            runs.append((start, i))
            start = None
    return runs
