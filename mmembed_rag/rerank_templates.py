"""Prompt templates of the zero-shot reranker and their tokenisation.

A :class:`RerankTemplate` has a **query part** (rendered first, shared by every candidate of a query so its
key/value cache is computed once) and a **candidate part** (the candidate, then the question). Slots are
``{query_text}``, ``{query_image}`` in the query part and ``{candidate_text}``, ``{candidate_image}`` in the
candidate part; a slot whose modality the item lacks renders as nothing. Braces follow ``str.format``'s syntax:
``{{`` and ``}}`` are literal braces, any other ``{...}`` is a slot, and a single brace is an error; slots take no
conversion or format spec (``{query_text!r}``, ``{query_text:>10}`` are refused).

User text is data, never template syntax: the template is split on its slots once, here, and user text is
inserted into the pieces (no ``str.format``, no Jinja), then tokenised with special-token matching off, so
``"<image>"`` or ``"{candidate_text}"`` inside a query or passage stays literal text.

Tokenisation goes through the one prompt helper (:mod:`mmembed_rag.tokenization`, the checkpoint's
``tokenizer.json`` used verbatim): the query part is BOS, the chat wrapper's head and the query template
tokenised as one prompt; the candidate part (candidate template, then the chat wrapper's tail, the
generation cue) as its continuation. The query/candidate boundary is always a token boundary, which is what
lets the cached and the naive computation see the same ids.

Answer tokens: the score reads the logits of one token per answer word, the form the model would write
right after the prompt -- ``" True"`` as a continuation (SentencePiece ``"▁True"``, byte-level BPE
``"ĠTrue"``) when that is a single token, else the bare ``"True"``. Other spellings are not summed in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .checkpoint_files import read_json_object
from .errors import MMEmbedError
from .items import MultimodalItem
from .modality import IMAGE, IMAGE_TEXT, TEXT, modality
from .tokenization import Piece, PromptTokenizer

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
# In str.format's order: escaped braces first, then a whole {field}, then a brace left alone.
_BRACES_RE = re.compile(r"\{\{|\}\}|\{[^{}]*\}|[{}]")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
    literal: list[str] = []
    start = 0
    for match in _BRACES_RE.finditer(text):
        literal.append(text[start:match.start()])
        start = match.end()
        token = match.group()
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        if len(token) == 1:
            raise TemplateError(f"{part} part: single {token!r} at character {match.start()}; write {token * 2!r} "
                                "for a literal brace")
        name = _slot_name(token, allowed, part)
        if name in seen:
            raise TemplateError(f"{part} part: slot {{{name}}} appears more than once")
        seen.add(name)
        if "".join(literal):
            pieces.append(("text", "".join(literal)))
        literal.clear()
        pieces.append(("slot", name))
    literal.append(text[start:])
    if "".join(literal):
        pieces.append(("text", "".join(literal)))
    if not seen:
        raise TemplateError(f"{part} part has no slot; it needs at least one of "
                            + ", ".join(f"{{{s}}}" for s in allowed))
    return tuple(pieces)


def _slot_name(token: str, allowed: tuple[str, ...], part: str) -> str:
    """The slot named by ``token`` (``"{name}"``), or a TemplateError saying what is wrong with it."""
    inner = token[1:-1]
    choices = ", ".join(f"{{{s}}}" for s in allowed)
    name = re.split(r"[!:]", inner, maxsplit=1)[0]
    if name != inner:
        raise TemplateError(f"{part} part: {token}: slots take no conversion (!r, !s) or format spec (:...); "
                            f"write {{{name}}}" + ("" if name in allowed else f" with one of {choices}"))
    if not _NAME_RE.fullmatch(name):
        raise TemplateError(f"{part} part: {token} is not a slot; allowed here: {choices} "
                            "(write {{ and }} for literal braces)")
    if name not in allowed:
        where = "the candidate part" if name in CANDIDATE_SLOTS else "the query part"
        hint = f"{{{name}}} belongs in {where}" if name in QUERY_SLOTS + CANDIDATE_SLOTS else "unknown slot"
        raise TemplateError(f"{part} part: {hint} {{{name}}}; allowed here: {choices}")
    return name


@dataclass(frozen=True)
class RerankTemplate:
    """A reranking prompt: the query part first, then the candidate part ending with the question.

    Args:
        query: text with ``{query_text}`` and/or ``{query_image}``, each at most once.
        candidate: text with ``{candidate_text}`` and/or ``{candidate_image}``, each at most once, then the
            question (e.g. "Does the passage answer the query? Answer True or False.").
        name: a label for logs and errors.

    Braces are ``str.format``'s: write ``{{`` and ``}}`` for literal braces; a slot takes no conversion or format
    spec. User text filled into a slot is never parsed (its braces stay as they are).

    Raises:
        TemplateError: a part has no slot, an unknown or repeated slot, the other part's slot, a slot with a
            conversion or format spec, or a single brace.

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
    (TEXT, TEXT): "text_to_text",
    (TEXT, IMAGE): "text_to_image",
    (IMAGE, TEXT): "image_to_text",
    (IMAGE_TEXT, IMAGE): "composed_image_retrieval",
    (IMAGE_TEXT, TEXT): "image_question_to_passage",
}


def select_template(query: MultimodalItem, candidate: MultimodalItem) -> RerankTemplate:
    """The built-in template for the pair's modalities ("generic" for pairs without a dedicated task)."""
    return RERANK_TEMPLATES[_AUTO.get((modality(query), modality(candidate)), "generic")]


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
        tokens: the checkpoint's prompt tokenizer (:class:`~mmembed_rag.tokenization.PromptTokenizer`).
        image_token_id: id repeated ``tokens_per_image`` times where an image goes.
        tokens_per_image: image feature vectors per image.
        max_length: each user text (the query's, each candidate's) is cut to this many tokens.
        wrapper: (head, tail) of the chat format; special tokens in them are matched (they are the
            checkpoint's own markup), unlike in templates and user text.
    """

    def __init__(self, tokens: PromptTokenizer, image_token_id: int, tokens_per_image: int,
                 max_length: int, wrapper: Sequence[str] = PLAIN_WRAPPER) -> None:
        if not isinstance(tokens, PromptTokenizer):
            raise TypeError(f"the reranker needs a PromptTokenizer, got {type(tokens).__name__}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokens = tokens
        self.head, self.tail = wrapper
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length

    def truncate(self, text: str | None) -> tuple[str | None, bool]:
        """Cut ``text`` to ``max_length`` tokens (at a token boundary); returns (text, was_cut)."""
        if not text:
            return text, False
        return self.tokens.truncate(text, self.max_length)

    def _pieces(self, pieces: tuple[tuple[str, str], ...], item: MultimodalItem) -> list[Piece]:
        out: list[Piece] = []
        for kind, value in pieces:
            if kind == "text":
                out.append(("text", value))  # template text is data too: no special tokens in it
            elif value.endswith("_text"):
                out.append(("text", item.text or ""))
            elif item.image is not None:
                out.extend([("token", self.image_token_id)] * self.tokens_per_image)
        return out

    def query_ids(self, template: RerankTemplate, item: MultimodalItem) -> list[int]:
        """BOS, chat head and the query part (text already truncated by the caller)."""
        pieces = [("markup", self.head), *self._pieces(template.query_pieces, item)]
        return self.tokens.bos + self.tokens.encode(pieces, at_start=True)

    def candidate_ids(self, template: RerankTemplate, item: MultimodalItem) -> list[int]:
        """The candidate part, the question and the chat tail (the generation cue), as a continuation."""
        pieces = [*self._pieces(template.candidate_pieces, item), ("markup", self.tail)]
        return self.tokens.encode(pieces, at_start=False)

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
            ids = self.tokens.encode_text(form, at_start=False)
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
            value = read_json_object(file, f"no {name}").get("chat_template")
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
