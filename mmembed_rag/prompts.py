"""Prompt building and tokenisation exactly as the released model formats its inputs.

Queries: ``Instruct: {instruction}\\nQuery: <image>\\n{text}``; documents: ``<image>\\n{text}``.
The ids are the release's tokenisation of the whole prompt string (see :mod:`mmembed_rag.tokenization`);
only the template places the image token: a literal ``<image>`` in user text or an instruction stays text.
A prompt longer than ``max_length`` loses the end of its text; an instruction is never cut, and one that leaves
no room for the query is refused (:class:`~mmembed_rag.errors.InvalidItemError`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidItemError
from .tokenization import Piece, PromptTokenizer

__all__ = ["Prompt", "PromptBuilder"]


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt with one (unexpanded) image slot at most.

    Attributes:
        ids: token ids including BOS/EOS; the image, if any, is one ``image_token_index`` id.
        has_image: whether the image slot survived truncation.
        masked_prefix: leading tokens excluded from pooling (the instruction span, BOS and one more).
        truncated: whether text was cut at ``max_length``.
    """

    ids: tuple[int, ...]
    has_image: bool
    masked_prefix: int
    truncated: bool


class PromptBuilder:
    """Turns (text, has_image, instruction) into token ids with the release's prompt and special tokens.

    Args:
        tokens: the checkpoint's prompt tokenizer (whole-prompt semantics of its ``tokenizer.json``).
        image_token_index: id placed where the image goes.
        max_length: cap on text tokens (BOS/EOS included) before the image is expanded.
        add_eos: append EOS, as the release's ``add_eos_token: true`` does.
    """

    def __init__(self, tokens: PromptTokenizer, image_token_index: int, max_length: int,
                 add_eos: bool = True) -> None:
        if not isinstance(tokens, PromptTokenizer):
            raise TypeError(f"PromptBuilder needs a PromptTokenizer, got {type(tokens).__name__}")
        self.tokens = tokens
        self._prefix = tokens.bos
        self._suffix = [tokens.eos_id] if add_eos and tokens.eos_id is not None else []
        self.image_token_index = image_token_index
        if max_length <= len(self._prefix) + len(self._suffix):
            raise ValueError(f"max_length={max_length} leaves no room for text")
        self.max_length = max_length

    def query(self, text: str | None, has_image: bool, instruction: str | None) -> Prompt:
        """Prompt of a query; the instruction span is masked out of pooling.

        Raises:
            InvalidItemError: the instruction leaves no token of ``max_length`` for the query's text or image
                (the message has no item index; :meth:`Encoder.query_prompts` adds it).
        """
        head: list[Piece] = [("markup", "Instruct: "), ("text", instruction), ("markup", "\nQuery: ")] \
            if instruction else [("markup", "Query: ")]
        masked = 0
        if instruction:
            # The release counts the instruction prefix tokenised on its own, with BOS and EOS.
            own = self.tokens.encode([("markup", "Instruct: "), ("text", instruction)])
            masked = len(self._prefix) + len(own) + len(self._suffix)
        prompt = self._build(head, text, has_image, masked)
        if instruction and prompt.truncated:
            self._check_room(head, text, has_image)
        return prompt

    def _check_room(self, head: list[Piece], text: str | None, has_image: bool) -> None:
        """Refuse a query whose instruction pushes all of its text and image past ``max_length``.

        Truncation cuts the end of the prompt, so an instruction that fills the budget would leave only masked
        tokens (nothing to pool: a crash alone, a zero vector in a batch) or pool the markup alone. Cutting the
        instruction instead would silently change the task the query asks for; the caller has to choose.

        Raises:
            InvalidItemError: the instruction and the template leave no token for the query's text or image.
        """
        image: list[Piece] = [("token", self.image_token_index), ("markup", "\n")] if has_image else []
        markup = len(self.tokens.encode([*head, *image]))  # instruction, template and image slot
        if markup + (1 if text else 0) > self.max_length - len(self._prefix) - len(self._suffix):  # 1: text's first
            raise InvalidItemError(
                f"the instruction leaves no room for the query within max_length={self.max_length} tokens "
                f"(instruction and prompt markup take {markup + len(self._prefix) + len(self._suffix)}); "
                "shorten the instruction or raise max_length"
            )

    def document(self, text: str | None, has_image: bool) -> Prompt:
        """Prompt of a document (never an instruction)."""
        return self._build([], text, has_image, 0)

    def _build(self, head: list[Piece], text: str | None, has_image: bool, masked: int) -> Prompt:
        image: list[Piece] = [("token", self.image_token_index), ("markup", "\n")] if has_image else []
        body = self.tokens.encode([*head, *image, ("text", text or "")])
        room = self.max_length - len(self._prefix) - len(self._suffix)
        truncated = len(body) > room
        body = body[:room]
        ids = tuple(self._prefix + body + self._suffix)
        return Prompt(ids, has_image and self.image_token_index in body, min(masked, len(ids)), truncated)
