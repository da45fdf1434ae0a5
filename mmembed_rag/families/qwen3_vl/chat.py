"""Qwen3-VL prompts: the checkpoint's chat template, rendered once per prompt shape with the user's text kept as
data (tokenised by :class:`~mmembed_rag.tokenization.PromptTokenizer`, so it never becomes a special token).

The layout is the official one: the instruction as the system message, then a user turn holding the image
(``<|vision_start|><|image_pad|><|vision_end|>``) before the text, then the generation prompt.
"""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ...checkpoint_files import read_json_object
from ...errors import CheckpointError
from ...tokenization import Piece, PromptTokenizer

__all__ = ["ChatPrompt", "ChatTemplate", "load_chat_template", "with_period"]


@dataclass(frozen=True)
class ChatPrompt:
    """A tokenised Qwen3-VL prompt.

    Attributes:
        ids: token ids, one ``<|image_pad|>`` per image (expanded to ``image_tokens`` at collation).
        image_tokens: visual tokens of the image (0: no image).
        length: the sequence length the model computes (image expanded, truncation applied).
        truncated: whether the sequence was cut to ``max_length``.
        image: the image when probing its size had to load it (a URL), so it is not fetched twice.
    """

    ids: tuple[int, ...]
    image_tokens: int
    length: int
    truncated: bool
    image: Image.Image | None = None

    @property
    def has_image(self) -> bool:
        return self.image_tokens > 0


def with_period(instruction: str) -> str:
    """The instruction stripped, with a full stop appended unless it ends in punctuation (as the official code)."""
    instruction = instruction.strip()
    if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    return instruction


def load_chat_template(path: Path, tokenizer: Any) -> str:
    """The processor's chat template (``chat_template.jinja`` / ``chat_template.json``), else the tokenizer's.

    Raises:
        CheckpointError: the checkpoint has no chat template.
    """
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        template = read_json_object(path / "chat_template.json", "no chat_template.json").get("chat_template")
        if isinstance(template, str):
            return template
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    raise CheckpointError(f"{path}: no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")


class ChatTemplate:
    """Renders ``system`` + ``user`` conversations into prompt pieces, once per shape.

    Args:
        template: the jinja chat template.
        tokenizer: the transformers tokenizer (renders the template with its own sandbox).
        tokens: the prompt tokenizer the pieces go through.
    """

    def __init__(self, template: str, tokenizer: Any, tokens: PromptTokenizer) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self.tokens = tokens
        self._shapes: dict[tuple[Any, ...], list[Piece | tuple[str, str]]] = {}

    def render(self, system: str | None, user: list[tuple[str, str | None]]) -> list[Piece]:
        """Pieces for a system text and user content parts: ``("text", s)`` or ``("image", None)``.

        User and system strings become ``("text", ...)`` pieces; the template's own text is markup.
        """
        shape = (system is not None, tuple(kind for kind, _ in user))
        skeleton = self._shapes.get(shape)
        if skeleton is None:
            skeleton = self._shapes[shape] = self._skeleton(system is not None, [kind for kind, _ in user])
        values = ([system] if system is not None else []) + [v for kind, v in user if kind == "text"]
        out: list[Piece] = []
        for kind, value in skeleton:
            out.append(("text", values[value]) if kind == "slot" else (kind, value))
        return out

    def _skeleton(self, with_system: bool, kinds: list[str]) -> list[tuple[str, Any]]:
        mark = uuid.uuid4().hex
        slots = [f"\ue000{mark}{i}\ue001" for i in range(len(kinds) + 1)]
        slot_iter = iter(slots)
        messages = []
        if with_system:
            messages.append({"role": "system", "content": [{"type": "text", "text": next(slot_iter)}]})
        content = [{"type": "image"} if kind == "image" else {"type": "text", "text": next(slot_iter)}
                   for kind in kinds]
        messages.append({"role": "user", "content": content})
        rendered = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
        used = slots[:sum(k != "image" for k in kinds) + int(with_system)]
        pieces: list[tuple[str, Any]] = []
        rest = rendered
        for number, slot in enumerate(used):
            before, found, rest = rest.partition(slot)
            if not found or slot in rest:
                raise CheckpointError("the chat template does not place each text part verbatim, once")
            if before:
                pieces.append(("markup", before))
            pieces.append(("slot", number))
        if rest:
            pieces.append(("markup", rest))
        return pieces
