"""Prompt building: the release's templates, special tokens, instruction mask span and truncation."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from mmembed_rag.errors import InvalidItemError
from mmembed_rag.prompts import PromptBuilder


@pytest.fixture(scope="module")
def builder(reference_encoder) -> PromptBuilder:
    return reference_encoder.family.prompts


@pytest.fixture(scope="module")
def raw(reference_dir) -> Tokenizer:
    return Tokenizer.from_file(str(reference_dir / "tokenizer.json"))


def _ids(raw: Tokenizer, text: str) -> list[int]:
    return raw.encode(text, add_special_tokens=False).ids


def test_query_with_image_matches_whole_prompt_tokenisation(builder, raw):
    prompt = builder.query("which animal?", True, "Find it.")
    expected = [1] + _ids(raw, "Instruct: Find it.\nQuery: <image>\nwhich animal?") + [2]
    assert list(prompt.ids) == expected
    assert prompt.has_image and not prompt.truncated


@pytest.mark.parametrize(("text", "image", "template"), [
    ("a red square", False, "a red square"),
    ("a", True, "<image>\na"),
    (None, True, "<image>\n"),
])
def test_document_templates(builder, raw, text, image, template):
    assert list(builder.document(text, image).ids) == [1] + _ids(raw, template) + [2]


def test_query_without_instruction(builder, raw):
    assert list(builder.query("hi", False, None).ids) == [1] + _ids(raw, "Query: hi") + [2]
    assert builder.query("hi", False, None).masked_prefix == 0


def test_instruction_mask_counts_bos_prefix_and_eos(builder, raw):
    prompt = builder.query("hi", False, "Find it.")
    assert prompt.masked_prefix == 1 + len(_ids(raw, "Instruct: Find it.")) + 1


def test_truncation_keeps_bos_and_eos(reference_encoder):
    short = PromptBuilder(reference_encoder.family.prompts.tokens, 32000, max_length=8)
    prompt = short.document("word " * 50, False)
    assert len(prompt.ids) == 8 and prompt.ids[0] == 1 and prompt.ids[-1] == 2 and prompt.truncated


@pytest.mark.parametrize(("text", "image"), [("x", True), ("x", False), (None, True)])
def test_instruction_that_leaves_no_room_for_the_query_is_refused(reference_encoder, text, image):
    # Before: the prompt was cut to the instruction alone (image dropped, masked_prefix == len(ids)): nothing to pool.
    short = PromptBuilder(reference_encoder.family.prompts.tokens, 32000, max_length=8)
    with pytest.raises(InvalidItemError, match=r"^the instruction leaves no room for the query within max_length=8 "
                                               r"tokens \(instruction and prompt markup take \d+\); shorten the "
                                               r"instruction or raise max_length$"):
        short.query(text, image, "a very long instruction " * 5)


def test_instruction_that_fits_keeps_whole_and_the_text_is_cut(reference_encoder, raw):
    short = PromptBuilder(reference_encoder.family.prompts.tokens, 32000, max_length=64)
    prompt = short.query("word " * 50, True, "Find it.")
    head = [1] + _ids(raw, "Instruct: Find it.\nQuery: <image>\n")
    assert prompt.truncated and prompt.has_image and len(prompt.ids) == 64
    assert list(prompt.ids[:len(head)]) == head and prompt.ids[-1] == 2
    assert prompt.masked_prefix < len(prompt.ids)  # something left to pool


def test_max_length_too_small(reference_encoder):
    with pytest.raises(ValueError, match="max_length=2 leaves no room"):
        PromptBuilder(reference_encoder.family.prompts.tokens, 32000, max_length=2)
