"""Prompt building and tokenisation exactly as the released model formats its inputs.

Queries: ``Instruct: {instruction}\\nQuery: <image>\\n{text}``; documents: ``<image>\\n{text}``.
Only the template places the image token: user text and instructions are tokenised with special-token
matching off, so a literal ``<image>`` in them stays text.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

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
        tokenizer: the checkpoint's tokenizer (its fast backend is used with special-token matching off).
        image_token_index: id placed where the image goes.
        max_length: cap on text tokens (BOS/EOS included) before the image is expanded.
        add_eos: append EOS, as the release's ``add_eos_token: true`` does.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token_index: int, max_length: int,
                 add_eos: bool = True) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("PromptBuilder needs a fast (tokenizers-backed) tokenizer")
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.encode_special_tokens = True  # user text is data: "<image>" in it is text
        self._prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self._suffix = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
        self.image_token_index = image_token_index
        if max_length <= len(self._prefix) + len(self._suffix):
            raise ValueError(f"max_length={max_length} leaves no room for text")
        self.max_length = max_length

    def _encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids if text else []

    def query(self, text: str | None, has_image: bool, instruction: str | None) -> Prompt:
        """Prompt of a query; the instruction span is masked out of pooling."""
        head = f"Instruct: {instruction}\nQuery: " if instruction else "Query: "
        masked = 0
        if instruction:
            # The release counts the instruction prefix tokenised on its own, with BOS and EOS.
            masked = len(self._prefix) + len(self._encode(f"Instruct: {instruction}")) + len(self._suffix)
        return self._build(head, text, has_image, masked)

    def document(self, text: str | None, has_image: bool) -> Prompt:
        """Prompt of a document (never an instruction)."""
        return self._build("", text, has_image, 0)

    def _build(self, head: str, text: str | None, has_image: bool, masked: int) -> Prompt:
        text = text or ""
        if has_image:
            body = self._encode(head) + [self.image_token_index] + self._encode("\n" + text)
        else:
            body = self._encode(head + text)
        room = self.max_length - len(self._prefix) - len(self._suffix)
        truncated = len(body) > room
        body = body[:room]
        ids = tuple(self._prefix + body + self._suffix)
        return Prompt(ids, has_image and self.image_token_index in body, min(masked, len(ids)), truncated)
