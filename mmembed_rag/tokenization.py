"""The one prompt-tokenisation helper: prompts built from markup, user text and token slots.

A prompt is a sequence of pieces: ``("markup", s)`` (the template's own text; special tokens in it such
as a chat template's ``<|im_start|>`` are matched), ``("text", s)`` (user text: data, never special,
so a literal ``<image>`` or ``</s>`` in it stays text) and ``("token", id)`` (an id placed as is, e.g. the
image slot). The ids equal what the checkpoint's own ``tokenizer.json``, used verbatim, gives for the whole
prompt string with only the template's special tokens and slots split out: text between two of them is
joined and encoded in one call (so merges across the template/user-text boundary happen as in the release),
and a run after a special token or slot is encoded the way the tokenizer treats such a split: the legacy
Mistral form's ``Prepend("▁")`` normalizer marks every split, a ``Metaspace(prepend_scheme="first")``
pre-tokenizer only the one at offset 0.

transformers 5 rebuilds a legacy Llama/Mistral ``tokenizer.json`` as ``Metaspace(prepend_scheme="always")``
when it loads one, which differs from the release on leading whitespace; this module reads the file itself.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from .checkpoint_files import read_json_object

__all__ = ["PromptTokenizer", "Piece", "TOKENIZER_FILES"]

logger = logging.getLogger(__name__)

Piece = tuple[Literal["markup", "text", "token"], Any]
#: Tokenizer files an export copies verbatim from its base checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")


def _continuation(spec: dict[str, Any]) -> dict[str, Any]:
    """The same tokenizer for a run that does not start the prompt: Metaspace ``first`` prepends nothing there."""
    def visit(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                return {**node, "prepend_scheme": "never"}
            return {k: visit(v) for k, v in node.items()}
        if isinstance(node, list):
            return [visit(v) for v in node]
        return node
    return {**spec, "pre_tokenizer": visit(spec.get("pre_tokenizer"))}


class PromptTokenizer:
    """Token ids of prompts, with the whole-prompt semantics of a ``tokenizer.json``.

    Args:
        spec: the parsed ``tokenizer.json``.
        bos_token, eos_token: their strings (``None``: the tokenizer has none).
        add_bos: start every prompt with BOS (``tokenizer_config.json``'s ``add_bos_token``).
        source: the checkpoint directory the files came from (exports copy them verbatim).
    """

    def __init__(self, spec: dict[str, Any], bos_token: str | None, eos_token: str | None, add_bos: bool = True,
                 source: Path | None = None) -> None:
        self._first = Tokenizer.from_str(json.dumps(spec))
        self._next = Tokenizer.from_str(json.dumps(_continuation(spec)))
        for backend in (self._first, self._next):
            backend.encode_special_tokens = True  # runs are data; markup's special tokens are split out below
        self._anchor = self._next.encode("\n", add_special_tokens=False).ids
        self.source = source
        self.bos_id = self._id(bos_token)
        self.eos_id = self._id(eos_token)
        self.add_bos = add_bos and self.bos_id is not None
        specials = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
        self._special_ids = {t: self._first.token_to_id(t) for t in specials}
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))) \
            if specials else None

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> PromptTokenizer:
        """Read ``tokenizer.json`` verbatim, and BOS/EOS from ``tokenizer_config.json``.

        Raises:
            CheckpointError: no or an unreadable tokenizer.json / tokenizer_config.json.
        """
        path = Path(path)
        spec = read_json_object(path / "tokenizer.json", "no tokenizer.json; the checkpoint's tokenizer is needed")
        config = read_json_object(path / "tokenizer_config.json", "no tokenizer_config.json") \
            if (path / "tokenizer_config.json").is_file() else {}
        return cls(spec, _token(config.get("bos_token")), _token(config.get("eos_token")),
                   add_bos=bool(config.get("add_bos_token", True)), source=path)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> PromptTokenizer:
        """From an in-memory fast tokenizer (its backend as transformers built it, not necessarily the file)."""
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("prompts need a fast (tokenizers-backed) tokenizer")
        return cls(json.loads(tokenizer.backend_tokenizer.to_str()), tokenizer.bos_token, tokenizer.eos_token,
                   add_bos=bool(getattr(tokenizer, "add_bos_token", True)))

    def copy_files(self, path: str | Path) -> bool:
        """Copy the checkpoint's tokenizer files verbatim into ``path``; ``False`` when built in memory (no source).

        Re-saving through transformers 5 would rewrite a legacy tokenizer.json in a form that tokenises differently.
        """
        if self.source is None:
            return False
        path = Path(path)
        if self.source.resolve() != path.resolve():
            for name in TOKENIZER_FILES:
                if (self.source / name).is_file():
                    shutil.copyfile(self.source / name, path / name)
        return True

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._first.token_to_id(token)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's special tokens (those markup can contain)."""
        return frozenset(self._special_ids.values())

    @property
    def bos(self) -> list[int]:
        """``[BOS]`` when prompts start with it, else ``[]``."""
        return [self.bos_id] if self.add_bos else []

    def encode(self, pieces: Iterable[Piece], at_start: bool = True) -> list[int]:
        """Ids of the pieces (no BOS/EOS).

        Args:
            pieces: the prompt, see the module docstring.
            at_start: the pieces start the prompt; ``False`` encodes them as the continuation of earlier text
                in the same run (as if after a newline: no word-start marker is added), e.g. a reranker's
                candidate part after its query part.
        """
        ids: list[int] = []
        run: list[str] = []
        place = "start" if at_start else "text"  # where the current run begins

        def flush() -> None:
            text = "".join(run)
            run.clear()
            if not text:
                return
            if place == "start":
                ids.extend(self._first.encode(text, add_special_tokens=False).ids)
            elif place == "split":  # right after a special token or slot: a new split of the whole string
                ids.extend(self._next.encode(text, add_special_tokens=False).ids)
            else:
                ids.extend(self._continue(text))

        for kind, value in pieces:
            if kind == "text":
                run.append(value)
            elif kind == "markup":
                start = 0
                for match in self._special_re.finditer(value) if self._special_re else ():
                    run.append(value[start:match.start()])
                    flush()
                    ids.append(self._special_ids[match.group()])
                    place, start = "split", match.end()
                run.append(value[start:])
            elif kind == "token":
                flush()
                ids.append(int(value))
                place = "split"
            else:
                raise ValueError(f"unknown prompt piece kind {kind!r}")
        flush()
        return ids

    def _continue(self, text: str) -> list[int]:
        """``text`` tokenised as it is when it follows a newline in the same run (the newline's ids dropped)."""
        ids = self._next.encode("\n" + text, add_special_tokens=False).ids
        if ids[:len(self._anchor)] == self._anchor:
            return ids[len(self._anchor):]
        # The anchor merged with the text (byte-level BPE: "\n\n" is one token); such tokenizers add no word-start
        # marker, so the text on its own is the continuation.
        return self._next.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str, at_start: bool = True) -> list[int]:
        """Ids of one piece of user text."""
        return self.encode([("text", text)], at_start=at_start)

    def truncate(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """Cut ``text`` to its first ``max_tokens`` tokens (at a token boundary); returns (text, was_cut)."""
        encoding = self._first.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= max_tokens:
            return text, False
        return text[:encoding.offsets[max_tokens - 1][1]], True


def _token(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-style dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
