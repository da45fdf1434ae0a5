"""Zero-shot multimodal reranking with a LLaVA-NeXT-family generative model: P("True") per candidate.

The model reads one prompt per (query, candidate) pair -- the query part of a
:class:`~mmembed_rag.rerank_templates.RerankTemplate`, then the candidate part with the question -- and the
score is the softmax over its next-token logits for "True" and "False", taking P("True").

The query part comes first so it is computed once per query: its key/value cache is expanded along the
batch dimension and each batch of right-padded candidates is run on top of it, with an attention mask
over prefix + candidate and position ids continuing after the prefix. ``score(..., use_cache=False)`` is
the naive reference (each pair as one full sequence, one at a time); both agree to float rounding.

Images use the global view only (the whole image resized to the vision tower's size, its patch features
and one ``image_newline``), in both paths: at the released 336 px an image is 577 tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DynamicCache, LlavaNextForConditionalGeneration, PreTrainedTokenizerBase

from .arguments import positive_int
from .checkpoint_files import read_json_object
from .devices import default_dtype, resolve_device, resolve_dtype
from .errors import CheckpointError, ImageLoadError, InvalidArgumentError, InvalidItemError
from .hub import resolve_checkpoint
from .images import DEFAULT_MAX_PIXELS, load_image
from .items import MultimodalItem
from .preprocessing import GlobalViewProcessor
from .rerank_templates import (
    PLAIN_WRAPPER,
    PromptEncoder,
    RerankTemplate,
    TemplateError,
    chat_wrapper,
    get_template,
    select_template,
)
from .reranker_base import Reranker, check_finite
from .results import RankedItem
from .tokenization import PromptTokenizer

__all__ = ["MLLMReranker", "RerankTemplate", "TemplateError", "combine_ranked", "combine_scores"]

logger = logging.getLogger(__name__)


class MLLMReranker(Reranker):
    """Pointwise zero-shot reranker: an MLLM judges whether each candidate satisfies the query.

    Args:
        model: a ``LlavaNextForConditionalGeneration`` (see :meth:`from_pretrained`).
        tokenizer: its fast tokenizer.
        image_processor: turns an RGB image into the global-view tensor.
        template: a built-in template name, a :class:`RerankTemplate`, or ``None`` to pick the built-in
            template from each pair's modalities (text→text, text→image, image→text, composed image
            retrieval, image question→passage, else "generic").
        max_length: each user text (the query's, each candidate's) is cut to this many tokens, with a warning.
        chat_wrapper: (head, tail) around the prompt; :meth:`from_pretrained` derives it from the checkpoint's
            chat template. Default: no head, ``"\\nAnswer:"`` as tail.
        answer_tokens: the (yes, no) words; each must be one token, preferably in its leading-space form.
        max_image_pixels: decompression-bomb bound for image loading (``None`` disables it).
        url_timeout: seconds to wait for an image URL.
        prompt_tokenizer: tokenises prompts; default: built from ``tokenizer``'s backend (:meth:`from_pretrained`
            reads the checkpoint's ``tokenizer.json`` verbatim instead).

    Example:
        >>> reranker = MLLMReranker.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf", dtype="bfloat16")
        >>> ranked = reranker.rerank({"img": "cat.png"}, ["a cat on a mat", "a red square"], top_n=1)
        >>> ranked[0].index, ranked[0].score
    """

    def __init__(self, model: LlavaNextForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                 image_processor: GlobalViewProcessor, template: str | RerankTemplate | None = None,
                 max_length: int = 512, chat_wrapper: Sequence[str] | None = None,
                 answer_tokens: tuple[str, str] = ("True", "False"),
                 max_image_pixels: int | None = DEFAULT_MAX_PIXELS, url_timeout: float = 10.0,
                 prompt_tokenizer: PromptTokenizer | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = None if template is None else get_template(template)
        config = model.config
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        self.tokens_per_image = patches + (config.vision_feature_select_strategy == "full") + 1  # + image_newline
        tokens = prompt_tokenizer or PromptTokenizer.from_tokenizer(tokenizer)
        self.prompts = PromptEncoder(tokens, config.image_token_id, self.tokens_per_image, max_length,
                                     tuple(chat_wrapper) if chat_wrapper is not None else PLAIN_WRAPPER)
        self.answer_ids = (self.prompts.answer_token_id(answer_tokens[0]),
                           self.prompts.answer_token_id(answer_tokens[1]))
        if self.answer_ids[0] == self.answer_ids[1]:
            raise ValueError(f"answer tokens {answer_tokens!r} map to the same token id")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_image_pixels = max_image_pixels
        self.url_timeout = url_timeout

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | None = None,
                        dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
                        template: str | RerankTemplate | None = None,
                        max_length: int | None = None, use_chat_template: bool = True, revision: str | None = None,
                        local_files_only: bool = False, **kwargs: Any) -> Reranker:
        """Load a reranker checkpoint (safetensors; no remote code is ever run); the family is read from config.json.

        A LLaVA-NeXT generative checkpoint gives this class (P("True") of a templated prompt); a Qwen3-VL one
        (Qwen3-VL-Reranker) gives :class:`~mmembed_rag.families.qwen3_vl.reranker.Qwen3VLReranker` (the official
        yes/no score; ``instruction=`` per call), with the same ``score`` / ``rerank`` results.

        Args:
            name_or_path: hub id (e.g. ``"llava-hf/llava-v1.6-mistral-7b-hf"``) or a local directory.
            device: ``"cpu"``, ``"cuda"``...; default CUDA when available, else CPU.
            dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default float32 on CPU, bfloat16 on CUDA.
            device_map: ``"auto"`` (or an explicit map) spreads the model over the visible GPUs; without it the
                weights are read straight onto ``device``.
            template: see the class docstring.
            max_length: LLaVA-NeXT: tokens per user text (default 512); Qwen3-VL: tokens per pair (default 10240).
            use_chat_template: wrap prompts in the checkpoint's chat template when it has one.
            revision, local_files_only: passed to the hub download.
            **kwargs: further constructor options (``answer_tokens``, ``chat_wrapper``, ``max_image_pixels``...).

        Raises:
            ModelNotFoundError: no such directory and the hub cannot be reached.
            CheckpointError: not a LLaVA-NeXT generative checkpoint, no safetensors, or weights missing.
            DeviceError: an unsupported dtype, or CUDA asked for where there is none.
        """
        path = resolve_checkpoint(name_or_path, revision=revision, local_files_only=local_files_only)
        if read_json_object(path / "config.json", "no config.json").get("model_type") == "qwen3_vl":
            from .families.qwen3_vl.reranker import Qwen3VLReranker

            if template is not None or not use_chat_template:
                raise InvalidArgumentError("template= and use_chat_template= are for LLaVA-NeXT rerankers; a "
                                           "Qwen3-VL reranker uses the official prompt, steered by instruction=")
            return Qwen3VLReranker.from_pretrained(path, device=device, dtype=dtype, device_map=device_map,
                                                   max_length=10240 if max_length is None else max_length, **kwargs)
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, default=default_dtype(target))
        _check_checkpoint(path)
        max_length = 512 if max_length is None else max_length
        tokens = PromptTokenizer.from_checkpoint(path)
        model, info = LlavaNextForConditionalGeneration.from_pretrained(
            str(path), dtype=torch_dtype, use_safetensors=True, output_loading_info=True,
            device_map=device_map if device_map is not None else target)
        if info["missing_keys"]:
            raise CheckpointError(f"{path}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]}")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        processor = GlobalViewProcessor.from_checkpoint(path, model.config.vision_config.image_size)
        if use_chat_template and "chat_wrapper" not in kwargs:
            kwargs["chat_wrapper"] = chat_wrapper(tokenizer, path)
        return cls(model, tokenizer, processor, template=template, max_length=max_length, prompt_tokenizer=tokens,
                   **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def tokens(self) -> PromptTokenizer:
        """The prompt tokenizer (the checkpoint's tokenizer.json; exports copy its files verbatim)."""
        return self.prompts.tokens

    def format_prompt(self, query: Any, candidate: Any, template: str | RerankTemplate | None = None) -> str:
        """The decoded prompt of one pair (each image slot shows its image tokens), to check a template."""
        query_item, (item,) = self._items(query, [candidate])
        chosen = self._templates(query_item, [item], template)[0]
        ids = self.prompts.query_ids(chosen, query_item) + self.prompts.candidate_ids(chosen, item)
        return self.tokenizer.decode(ids)

    def answer_logits(self, queries: Sequence[Any], candidates: Sequence[Any],
                      template: str | RerankTemplate | None = None) -> torch.Tensor:
        """Next-token logits of the (yes, no) answer words for a batch of (query, candidate) pairs, differentiable.

        The training-side view of :meth:`score`: the same items, templates, truncation, prompt ids, image
        features and answer tokens, each pair as one full right-padded sequence (no shared cache, any mix of
        queries), in one language-model call. ``torch.softmax(logits, -1)[:, 0]`` is :meth:`score`'s P("True")
        to float rounding. Gradients flow unless the caller disables them; train/eval mode is the caller's.

        Args:
            queries: one query per pair (anything :func:`mmembed_rag.items.to_item` accepts).
            candidates: one candidate per pair, as long as ``queries``.
            template: overrides the reranker's template for this call.

        Returns:
            float32 tensor (n_pairs, 2): the logits of the yes word (column 0) and the no word (column 1).

        Raises:
            ValueError: ``queries`` and ``candidates`` differ in length or are empty.
            InvalidItemError: a pair's query or candidate (named by pair index) is invalid or does not fit.
            ImageLoadError: an image cannot be loaded (the message names the pair).

        Example:
            >>> logits = reranker.answer_logits(["a red square"] * 2, [{"img": "red.png"}, "a blue circle"])
            >>> loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))  # 0: "True" is right
        """
        if len(queries) != len(candidates) or not len(queries):
            raise ValueError(f"need as many queries as candidates (at least one), got {len(queries)} and "
                             f"{len(candidates)}")
        query_items, items, templates = [], [], []
        for i, (query, candidate) in enumerate(zip(queries, candidates)):
            try:
                query_item, (item,) = self._items(query, [candidate])
                templates.append(self._templates(query_item, [item], template)[0])
            except InvalidItemError as exc:  # a one-candidate call names its candidate "candidate 0"
                raise InvalidItemError(f"pair {i}: " + str(exc).replace("candidate 0:", "candidate:", 1)) from exc
            query_items.append(query_item)
            items.append(item)
        flat = self._truncate(query_items + items)
        rows, pixels, counts = [], [], []
        for i, (tpl, query_item, item) in enumerate(zip(templates, flat[:len(items)], flat[len(items):])):
            rows.append(self.prompts.query_ids(tpl, query_item) + self.prompts.candidate_ids(tpl, item))
            images = [(it, f"pair {i} {side}") for it, side in ((query_item, "query"), (item, "candidate"))
                      if it.image is not None]
            pixels.extend(self._pixels(it, label) for it, label in images)  # query image first: prompt order
            counts.append(len(images))
        features = iter(self._image_features(pixels))
        row_features = [torch.cat([next(features) for _ in range(n)]) if n else None for n in counts]
        embeds, lengths = self._embed(rows, row_features)
        mask = (torch.arange(embeds.shape[1], device=self.device) < lengths[:, None]).long()
        hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                                 use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(rows), device=self.device), lengths - 1]
        return self.model.lm_head(last).float()[:, list(self.answer_ids)]

    # -- inputs -----------------------------------------------------------------------------------------

    def _templates(self, query: MultimodalItem, items: list[MultimodalItem],
                   template: str | RerankTemplate | None) -> list[RerankTemplate]:
        fixed = get_template(template) if template is not None else self.template
        chosen = [fixed or select_template(query, item) for item in items]
        for i, (tpl, item) in enumerate(zip(chosen, items)):
            problem = tpl.check(query, "query")
            if problem:
                raise InvalidItemError(f"query: {problem}")
            problem = tpl.check(item, "candidate")
            if problem:
                raise InvalidItemError(f"candidate {i}: {problem}")
        return chosen

    def _truncate(self, items: list[MultimodalItem]) -> list[MultimodalItem]:
        out, cut = [], 0
        for item in items:
            text, was_cut = self.prompts.truncate(item.text)
            cut += was_cut
            out.append(MultimodalItem(text=text, image=item.image) if was_cut else item)
        if cut:
            logger.warning("%d text(s) longer than max_length=%d tokens were truncated", cut, self.prompts.max_length)
        return out

    def _pixels(self, item: MultimodalItem, label: str) -> torch.Tensor:
        try:
            image = load_image(item.image, max_pixels=self.max_image_pixels, timeout=self.url_timeout)
        except ImageLoadError as exc:
            raise ImageLoadError(f"{label}: {exc}") from exc
        return self.image_processor(image)

    # -- model ------------------------------------------------------------------------------------------

    def _image_features(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Global views → per image (tokens_per_image, hidden): patch features then ``image_newline``."""
        if not pixels:
            return []
        inner = self.model.model
        config = self.model.config
        batch = torch.stack(pixels).to(self.device, self.model.dtype)
        hidden = inner.vision_tower(batch, output_hidden_states=True).hidden_states
        layers = config.vision_feature_layer
        features = hidden[layers] if isinstance(layers, int) else torch.cat([hidden[i] for i in layers], dim=-1)
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop CLS
        features = inner.multi_modal_projector(features)
        newline = inner.image_newline.to(features.device, features.dtype).expand(features.shape[0], 1, -1)
        return list(torch.cat([features, newline], dim=1))

    def _embed(self, rows: list[list[int]], features: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded input embeddings with image features spliced in, and each row's length."""
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        ids = torch.full((len(rows), int(lengths.max())), self.pad_token_id, dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        ids = ids.to(self.device)
        slots = ids == self.prompts.image_token_id
        embeds = self.model.get_input_embeddings()(ids.masked_fill(slots, 0))
        present = [f for f in features if f is not None]
        if present:
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), torch.cat(present).to(embeds.dtype))
        return embeds, lengths

    def _p_true(self, last_hidden: torch.Tensor) -> np.ndarray:
        logits = self.model.lm_head(last_hidden).float()[:, list(self.answer_ids)]
        return torch.softmax(logits, dim=-1)[:, 0].cpu().numpy()

    def _prefix_cache(self, query_ids: list[int], query_features: torch.Tensor | None) -> DynamicCache:
        embeds, _ = self._embed([query_ids], [query_features])
        out = self.model.model.language_model(inputs_embeds=embeds, use_cache=True)
        return out.cache

    def _expanded(self, prefix: DynamicCache, batch: int) -> DynamicCache:
        """A fresh cache holding the prefix keys/values once per row (the forward appends to it)."""
        data = [(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)) for keys, values, *_ in prefix]
        return DynamicCache(data, config=self.model.config.text_config)

    def _score_batch(self, prefix: DynamicCache, prefix_len: int, rows: list[list[int]],
                     features: list[torch.Tensor | None]) -> np.ndarray:
        embeds, lengths = self._embed(rows, features)
        batch, width = embeds.shape[:2]
        offsets = torch.arange(width, device=self.device)
        mask = torch.cat([torch.ones(batch, prefix_len, dtype=torch.long, device=self.device),
                          (offsets < lengths[:, None]).long()], dim=1)
        positions = (prefix_len + offsets).expand(batch, width)
        hidden = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
            cache=self._expanded(prefix, batch), use_cache=True).last_hidden_state
        return self._p_true(hidden[torch.arange(batch, device=self.device), lengths - 1])

    def _score_pair(self, ids: list[int], pixels: list[torch.Tensor]) -> float:
        """Naive reference: the whole prompt as one sequence, images encoded afresh."""
        features = self._image_features(pixels)
        embeds, _ = self._embed([ids], [torch.cat(features) if features else None])
        hidden = self.model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return float(self._p_true(hidden[:, -1])[0])

    def _score(self, query: MultimodalItem, items: list[MultimodalItem], batch_size: int,
               show_progress: bool | None, template: str | RerankTemplate | None, use_cache: bool,
               instruction: str | None = None) -> np.ndarray:
        batch_size = positive_int(batch_size, "batch_size")
        if instruction is not None:
            raise InvalidArgumentError("instruction= is for Qwen3-VL rerankers; a LLaVA-NeXT reranker's prompt is "
                                       "its template= (a built-in name or a RerankTemplate)")
        templates = self._templates(query, items, template)
        out = np.zeros(len(items), dtype=np.float32)
        if not items:
            return out
        query, *items = self._truncate([query, *items])
        query_pixels = [self._pixels(query, "query")] if query.image is not None else []
        groups: dict[tuple[int, ...], list[int]] = {}  # one shared prefix per distinct query part
        for i, tpl in enumerate(templates):
            groups.setdefault(tuple(self.prompts.query_ids(tpl, query)), []).append(i)
        bar = tqdm(total=len(items), desc="reranking", unit="cand",
                   disable=not show_progress if show_progress is not None else len(items) < 256)
        with bar, torch.inference_mode():
            query_features = self._image_features(query_pixels)[0] if query_pixels and use_cache else None
            for prefix_ids, positions in groups.items():
                rows = {i: self.prompts.candidate_ids(templates[i], items[i]) for i in positions}
                if use_cache:
                    self._score_group(list(prefix_ids), query_features, rows, items, batch_size, out, bar)
                    continue
                for i in positions:
                    pixels = list(query_pixels)
                    if items[i].image is not None:
                        pixels.append(self._pixels(items[i], f"candidate {i}"))
                    out[i] = self._score_pair(list(prefix_ids) + rows[i], pixels)
                    bar.update(1)
        return check_finite(out)

    def _score_group(self, prefix_ids: list[int], query_features: torch.Tensor | None, rows: dict[int, list[int]],
                     items: list[MultimodalItem], batch_size: int, out: np.ndarray, bar: tqdm) -> None:
        """Score the candidates ``rows`` (position → candidate-part ids) that share one query part."""
        prefix = self._prefix_cache(prefix_ids, query_features)
        order = sorted(rows, key=lambda i: -len(rows[i]))  # similar lengths together: little padding
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            pixels = [self._pixels(items[i], f"candidate {i}") for i in chunk if items[i].image is not None]
            features = iter(self._image_features(pixels))
            row_features = [next(features) if items[i].image is not None else None for i in chunk]
            out[chunk] = self._score_batch(prefix, len(prefix_ids), [rows[i] for i in chunk], row_features)
            bar.update(len(chunk))


def combine_scores(rerank: float, retrieval: float | None, mode: str | None, weight: float, index: int,
                   *, score_field: str | None = None) -> float:
    """A reranked candidate's final score: P("True") alone or mixed with its retrieval score (adapters' ``combine``).

    Args:
        rerank: the reranker's P("True") for the candidate.
        retrieval: the candidate's incoming score (e.g. cosine similarity), or ``None`` when it has none.
        mode: ``None`` keeps ``rerank``; ``"multiply"``: ``rerank * retrieval`` (with a negative retrieval score
            the product favours low P("True"), so prefer ``"weighted"`` there); ``"weighted"``:
            ``weight * rerank + (1 - weight) * retrieval``.
        weight: the weight of ``rerank`` in ``"weighted"`` mode.
        index: the candidate's position, named in the error.
        score_field: where the caller reads the retrieval score from, named in the error (e.g. ``"metadata['score']"``).

    Returns:
        The final score.

    Raises:
        ValueError: ``mode`` is not one of the three, or it needs a retrieval score and ``retrieval`` is ``None``.

    Example:
        >>> combine_scores(0.5, 0.25, "weighted", 0.5, index=0)
        0.375
    """
    if mode is None:
        return rerank
    if mode not in ("multiply", "weighted"):
        raise ValueError(f"combine must be None, 'multiply' or 'weighted', got {mode!r}")
    if retrieval is None:
        where = f" ({score_field})" if score_field else ""
        raise ValueError(f"candidate {index} has no retrieval score{where}; combine={mode!r} needs one")
    return rerank * retrieval if mode == "multiply" else weight * rerank + (1.0 - weight) * retrieval


def combine_ranked(ranked: Sequence[RankedItem], retrieval: Sequence[float | None], mode: str | None, weight: float,
                   top_n: int | None, *, score_field: str | None = None) -> list[tuple[RankedItem, float]]:
    """Combine each reranked candidate's score with its retrieval score, re-sort, keep ``top_n``: every adapter's tail.

    Args:
        ranked: :meth:`MLLMReranker.rerank` output (``index`` = the candidate's position).
        retrieval: the incoming score of each candidate, by position (``None`` where there is none).
        mode, weight, score_field: as in :func:`combine_scores`.
        top_n: how many to keep (all when ``None``).

    Returns:
        ``(ranked item, final score)`` pairs, best final score first; ties keep the candidates' given order.

    Raises:
        ValueError: as :func:`combine_scores`.
    """
    scored = [(r, combine_scores(r.score, retrieval[r.index], mode, weight, r.index, score_field=score_field))
              for r in ranked]
    scored.sort(key=lambda pair: (-pair[1], pair[0].index))
    return scored[:top_n]


def _check_checkpoint(path: Path) -> None:
    raw = read_json_object(path / "config.json", "no config.json")
    architectures = raw.get("architectures") or []
    if raw.get("model_type") != "llava_next" or (
            architectures and "LlavaNextForConditionalGeneration" not in architectures):
        raise CheckpointError(
            f"{path}: not a LLaVA-NeXT generative checkpoint (model_type={raw.get('model_type')!r}, "
            f"architectures={architectures}); the reranker needs LlavaNextForConditionalGeneration weights, "
            "e.g. llava-hf/llava-v1.6-mistral-7b-hf (the MM-Embed encoder itself cannot generate)")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: no .safetensors weights (other formats are not loaded)")
