"""Prompt templates of the zero-shot reranker and their tokenisation.

A :class:`RerankTemplate` has a **query part** (rendered first, shared by every candidate of a query so its
key/value cache is computed once) and a **candidate part** (the candidate, then the question). Slots are
``{query_text}``, ``{query_image}`` in the query part and ``{candidate_text}``, ``{candidate_image}`` in the
candidate part; a slot whose modality the item lacks renders as nothing.

User text is data, never template syntax: the template is split on its slots once, here, and user text is
inserted into the pieces (no ``str.format``, no Jinja), then tokenised with special-token matching off, so
``"<image>"`` or ``"{candidate_text}"`` inside a query or passage stays literal text.

Tokenisation: the prompt is BOS, the chat wrapper's head, the query part, the candidate part and the
chat wrapper's tail (the generation cue). Each run of text between image slots is tokenised on its own, as
a *continuation* of the text before it: SentencePiece-style tokenizers (Llama, Mistral) prepend ``"▁"`` to
every string they encode, so a run that does not start the prompt is encoded after a ``"\\n"`` anchor whose
tokens are then dropped; trailing spaces of a run move to the start of the next (``"▁Query"``, not
``"▁"`` + ``"Query"``). The query/candidate boundary is always a token boundary, which is what lets the
cached and the naive computation see the same ids.

Answer tokens: the score reads the logits of one token per answer word, the form the model would write
right after the prompt -- ``" True"`` as a continuation (SentencePiece ``"▁True"``, byte-level BPE
``"ĠTrue"``) when that is a single token, else the bare ``"True"``. Other spellings are not summed in.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from .errors import MMEmbedError
from .items import MultimodalItem

__all__ = [
    "PLAIN_WRAPPER",
    "RERANK_TEMPLATES",
    "PromptEncoder",
    "RerankTemplate",
    "TemplateError",
    "chat_wrapper",
    "get_template",
    "select_template",
]

logger = logging.getLogger(__name__)

QUERY_SLOTS = ("query_text", "query_image")
CANDIDATE_SLOTS = ("candidate_text", "candidate_image")
_SLOT_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Chat wrapper used when the checkpoint has no chat template: nothing before, an answer cue after.
PLAIN_WRAPPER = ("", "\nAnswer:")
_QUESTION = " Answer True or False."
_SENTINEL = "\u2063MMEMBED_RERANK_CONTENT\u2063"  # stands for the message when rendering a chat template


class TemplateError(MMEmbedError, ValueError):
    """A rerank template is malformed (unknown, missing, repeated or misplaced slots) or unknown by name."""


def _parse(text: str, allowed: tuple[str, ...], part: str) -> tuple[tuple[str, str], ...]:
    """Split ``text`` into ``("text", literal)`` and ``("slot", name)`` pieces, validating the slots."""
    pieces: list[tuple[str, str]] = []
    seen: set[str] = set()
    start = 0
    for match in _SLOT_RE.finditer(text):
        name = match.group(1)
        if name not in allowed:
            where = "the candidate part" if name in CANDIDATE_SLOTS else "the query part"
            hint = (f"{{{name}}} belongs in {where}" if name in QUERY_SLOTS + CANDIDATE_SLOTS
                    else "unknown slot")
            raise TemplateError(f"{part} part: {hint} {{{name}}}; allowed here: "
                                + ", ".join(f"{{{s}}}" for s in allowed))
        if name in seen:
            raise TemplateError(f"{part} part: slot {{{name}}} appears more than once")
        seen.add(name)
        if match.start() > start:
            pieces.append(("text", text[start:match.start()]))
        pieces.append(("slot", name))
        start = match.end()
    if start < len(text):
        pieces.append(("text", text[start:]))
    if not seen:
        raise TemplateError(f"{part} part has no slot; it needs at least one of "
                            + ", ".join(f"{{{s}}}" for s in allowed))
    return tuple(pieces)


@dataclass(frozen=True)
class RerankTemplate:
    """A reranking prompt: the query part first, then the candidate part ending with the question.

    Args:
        query: text with ``{query_text}`` and/or ``{query_image}``, each at most once.
        candidate: text with ``{candidate_text}`` and/or ``{candidate_image}``, each at most once, then the
            question (e.g. "Does the passage answer the query? Answer True or False.").
        name: a label for logs and errors.

    Raises:
        TemplateError: a part has no slot, an unknown or repeated slot, or the other part's slot.

    Example:
        >>> RerankTemplate(query="Question: {query_text}\\n",
        ...                candidate="Document: {candidate_text}\\nIs the document relevant? Answer True or False.")
    """

    query: str
    candidate: str
    name: str = "custom"
    query_pieces: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)
    candidate_pieces: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.query, str) or not isinstance(self.candidate, str):
            raise TemplateError("template query and candidate parts must be strings")
        object.__setattr__(self, "query_pieces", _parse(self.query, QUERY_SLOTS, "query"))
        object.__setattr__(self, "candidate_pieces", _parse(self.candidate, CANDIDATE_SLOTS, "candidate"))

    def slots(self) -> set[str]:
        """Names of the slots used by either part."""
        return {v for k, v in self.query_pieces + self.candidate_pieces if k == "slot"}

    def check(self, item: MultimodalItem, side: str) -> str | None:
        """Why ``item`` cannot fill the ``side`` (``"query"``/``"candidate"``) slots, or ``None`` if it can."""
        slots = self.slots()
        for present, kind in ((item.text is not None, "text"), (item.image is not None, "image")):
            if present and f"{side}_{kind}" not in slots:
                return f"it has {'an image' if kind == 'image' else 'text'} but template {self.name!r} " \
                       f"has no {{{side}_{kind}}} slot"
        return None


def _template(name: str, query: str, candidate: str) -> RerankTemplate:
    return RerankTemplate(query=query, candidate=candidate + _QUESTION, name=name)


#: Built-in templates by task name.
RERANK_TEMPLATES: dict[str, RerankTemplate] = {t.name: t for t in (
    _template("text_to_text", "Query: {query_text}\n",
              "Passage: {candidate_text}\nDoes the passage answer the query?"),
    _template("text_to_image", "Query: {query_text}\n",
              "Image:\n{candidate_image}\nDoes the image match the query?"),
    _template("image_to_text", "Image:\n{query_image}\n",
              "Caption: {candidate_text}\nDoes the caption describe the image?"),
    _template("composed_image_retrieval", "Reference image:\n{query_image}\nRequested change: {query_text}\n",
              "Candidate image:\n{candidate_image}\n"
              "Is the candidate image the reference image with the requested change applied?"),
    _template("image_question_to_passage", "Image:\n{query_image}\nQuestion: {query_text}\n",
              "Passage: {candidate_text}\nDoes the passage help answer the question about the image?"),
    _template("generic", "Query:\n{query_image}{query_text}\n",
              "Candidate:\n{candidate_image}{candidate_text}\nIs the candidate relevant to the query?"),
)}

_AUTO = {
    ("text", "text"): "text_to_text",
    ("text", "image"): "text_to_image",
    ("image", "text"): "image_to_text",
    ("text+image", "image"): "composed_image_retrieval",
    ("text+image", "text"): "image_question_to_passage",
}


def _modality(item: MultimodalItem) -> str:
    if item.image is None:
        return "text"
    return "image" if item.text is None else "text+image"


def select_template(query: MultimodalItem, candidate: MultimodalItem) -> RerankTemplate:
    """The built-in template for the pair's modalities ("generic" for pairs without a dedicated task)."""
    return RERANK_TEMPLATES[_AUTO.get((_modality(query), _modality(candidate)), "generic")]


def get_template(template: str | RerankTemplate) -> RerankTemplate:
    """Return ``template`` itself or the built-in template of that name.

    Raises:
        TemplateError: unknown name or wrong type.
    """
    if isinstance(template, RerankTemplate):
        return template
    if isinstance(template, str):
        if template in RERANK_TEMPLATES:
            return RERANK_TEMPLATES[template]
        raise TemplateError(f"unknown template {template!r}; choose one of {', '.join(sorted(RERANK_TEMPLATES))} "
                            "or pass a RerankTemplate")
    raise TemplateError(f"template must be a name or a RerankTemplate, got {type(template).__name__}")


class PromptEncoder:
    """Token ids of the query part and the candidate part of a rerank prompt.

    Args:
        tokenizer: the checkpoint's fast tokenizer.
        image_token_id: id repeated ``tokens_per_image`` times where an image goes.
        tokens_per_image: image feature vectors per image.
        max_length: each user text (the query's, each candidate's) is cut to this many tokens.
        wrapper: (head, tail) of the chat format; special tokens in them are matched (they are the
            checkpoint's own markup), unlike in templates and user text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token_id: int, tokens_per_image: int,
                 max_length: int, wrapper: Sequence[str] = PLAIN_WRAPPER) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("the reranker needs a fast (tokenizers-backed) tokenizer")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        serialized = tokenizer.backend_tokenizer.to_str()
        self._markup = Tokenizer.from_str(serialized)
        self._data = Tokenizer.from_str(serialized)
        self._data.encode_special_tokens = True  # user text and templates are data: "<image>" stays text
        self._anchor = self._data.encode("\n", add_special_tokens=False).ids
        self._bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.head, self.tail = wrapper
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length

    def _encode(self, backend: Tokenizer, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        if at_start:
            return backend.encode(text, add_special_tokens=False).ids
        ids = backend.encode("\n" + text, add_special_tokens=False).ids
        if ids[:len(self._anchor)] == self._anchor:
            return ids[len(self._anchor):]
        # The anchor merged with the text (byte-level BPE: "\n\n" is one token); such tokenizers add no
        # prefix space, so encoding the text on its own is the continuation.
        return backend.encode(text, add_special_tokens=False).ids

    def truncate(self, text: str | None) -> tuple[str | None, bool]:
        """Cut ``text`` to ``max_length`` tokens (at a token boundary); returns (text, was_cut)."""
        if not text:
            return text, False
        encoding = self._data.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= self.max_length:
            return text, False
        return text[:encoding.offsets[self.max_length - 1][1]], True

    def _part(self, pieces: tuple[tuple[str, str], ...], text: str | None, has_image: bool, head: str = "",
              tail: str = "", at_start: bool = False) -> list[int]:
        ids: list[int] = []
        run = ""
        carried = ""  # trailing spaces moved to the next text run: "▁Query", not "▁" + "Query"

        def flush(backend: Tokenizer, chunk: str, keep_spaces: bool) -> None:
            nonlocal at_start, carried
            chunk, carried = carried + chunk, ""
            if not keep_spaces:
                body = chunk.rstrip(" ")
                chunk, carried = body, chunk[len(body):]
            if chunk:
                ids.extend(self._encode(backend, chunk, at_start))
                at_start = False

        flush(self._markup, head, keep_spaces=False)
        for kind, value in pieces:
            if kind == "text":
                run += value
            elif value.endswith("_text"):
                run += text or ""
            elif has_image:
                flush(self._data, run, keep_spaces=True)
                run = ""
                ids.extend([self.image_token_id] * self.tokens_per_image)
                at_start = False
        flush(self._data, run, keep_spaces=not tail)
        flush(self._markup, tail, keep_spaces=True)  # the part ends here: nothing is carried over its end
        return ids

    def query_ids(self, template: RerankTemplate, item: MultimodalItem) -> list[int]:
        """BOS, chat head and the query part (text already truncated by the caller)."""
        return self._bos + self._part(template.query_pieces, item.text, item.image is not None,
                                      head=self.head, at_start=True)

    def candidate_ids(self, template: RerankTemplate, item: MultimodalItem) -> list[int]:
        """The candidate part, the question and the chat tail (the generation cue)."""
        return self._part(template.candidate_pieces, item.text, item.image is not None, tail=self.tail)

    def answer_token_id(self, word: str) -> int:
        """The single token the model would emit for ``word`` right after the prompt.

        Tried in order: ``" " + word`` as a continuation (SentencePiece ``"▁True"``, byte-level ``"ĠTrue"``:
        the form a model writes after "Answer:" or "[/INST]"), then ``word`` with no space.

        Raises:
            ValueError: ``word`` is empty, or the tokenizer has no single token for either form.
        """
        if not word:
            raise ValueError("answer words must be non-empty")
        for form in (" " + word, word):
            ids = self._encode(self._data, form, at_start=False)
            if len(ids) == 1:
                return ids[0]
        raise ValueError(f"the tokenizer has no single token for {word!r} or {' ' + word!r}; "
                         "pass answer_tokens=(yes_word, no_word) that it has")


def chat_wrapper(tokenizer: PreTrainedTokenizerBase, path: Path) -> tuple[str, str]:
    """(head, tail) of the checkpoint's chat template around one user message, with the generation cue.

    The template is rendered once with a sentinel as the message (never with user text) and split on it.
    Looks at the tokenizer's template, then ``chat_template.json`` and ``processor_config.json``; falls back
    to :data:`PLAIN_WRAPPER`.
    """
    from jinja2 import TemplateError as JinjaError

    sources = [tokenizer.chat_template] if isinstance(tokenizer.chat_template, str) else []
    for name in ("chat_template.json", "processor_config.json"):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text()).get("chat_template")
            sources += [value] if isinstance(value, str) else []
    for source in sources:
        for content in (_SENTINEL, [{"type": "text", "text": _SENTINEL}]):  # tokenizer, processor style
            try:
                rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=source,
                                                         tokenize=False, add_generation_prompt=True)
            except (JinjaError, TypeError, ValueError, KeyError) as exc:
                logger.debug("chat template not usable with %s content: %s", type(content).__name__, exc)
                continue
            if isinstance(rendered, str) and rendered.count(_SENTINEL) == 1:
                head, tail = rendered.split(_SENTINEL)
                if tokenizer.bos_token and head.startswith(tokenizer.bos_token):
                    head = head[len(tokenizer.bos_token):]  # BOS is added as an id, not as text
                logger.info("rerank prompts wrapped in the chat template: %r ... %r", head, tail)
                return head, tail
    logger.info("no usable chat template; rerank prompts end with %r", PLAIN_WRAPPER[1])
    return PLAIN_WRAPPER
