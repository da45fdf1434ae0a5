"""Prompt tokenisation equals the release's whole-prompt tokenisation on the real Mistral vocabulary.

Reference ids: ``fixtures/mistral-tokenizer-reference`` (the release's transformers 4.42 tokenising each whole
prompt string, legacy and Metaspace tokenizer.json forms; BOS included, EOS not).
"""

from __future__ import annotations

import json

import pytest
from conftest import TOKENIZER_REFERENCE
from tokenizers import Tokenizer

from mmembed_rag.prompts import PromptBuilder
from mmembed_rag.tokenization import PromptTokenizer

FORMS = ("legacy", "metaspace")
EOS = 2


def _reference(form: str) -> dict:
    return json.loads((TOKENIZER_REFERENCE / form / "reference_ids.json").read_text())


def _cases() -> list[tuple[str, int]]:
    return [(form, i) for form in FORMS for i in range(len(_reference(form)["prompts"]))]


@pytest.fixture(scope="module")
def builders() -> dict[str, PromptBuilder]:
    return {form: PromptBuilder(PromptTokenizer.from_checkpoint(TOKENIZER_REFERENCE / form), 32000, 4096)
            for form in FORMS}


@pytest.mark.parametrize(("form", "index"), _cases())
def test_every_prompt_form_matches_the_release(builders, form, index):
    reference = _reference(form)
    case, instruction = reference["prompts"][index], reference["instruction"]
    build = builders[form]
    got = {"document_text": build.document(case["text"], False),
           "document_image": build.document(case["text"], True),
           "query_text": build.query(case["text"], False, instruction),
           "query_image": build.query(case["text"], True, instruction),
           "query_image_no_instruction": build.query(case["text"], True, None)}
    for name, prompt in got.items():  # the release appends EOS (add_eos_token: true)
        assert list(prompt.ids) == case["ids"][name] + [EOS], (name, case["text"])


@pytest.mark.parametrize("form", FORMS)
def test_instruction_mask_counts_bos_and_eos(builders, form):
    reference = _reference(form)
    prompt = builders[form].query("a red square", True, reference["instruction"])
    assert prompt.masked_prefix == len(reference["instruction_prefix_ids"]) + 1  # + the EOS add_eos_token appends


def test_the_file_is_used_verbatim_not_transformers_rebuild(release_encoder):
    # transformers 5 rebuilds the legacy file as Metaspace(always), which drops one "▁" before leading spaces.
    case = next(c for c in _reference("legacy")["prompts"] if c["text"] == "  leading spaces")
    prompt = release_encoder.family.prompts.document(case["text"], False)
    assert list(prompt.ids) == case["ids"]["document_text"] + [EOS]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("text", ["look: <image> here", "<s> and </s> inside", "<pad><unk>"])
def test_special_token_strings_in_user_text_stay_text(builders, form, text):
    raw = Tokenizer.from_file(str(TOKENIZER_REFERENCE / form / "tokenizer.json"))
    raw.encode_special_tokens = True
    prompt = builders[form].document(text, has_image=False)
    assert list(prompt.ids) == [1] + raw.encode(text, add_special_tokens=False).ids + [EOS]
    assert not {0, 1, 2, 32000, 32001} & set(prompt.ids[1:-1])
    query = builders[form].query("x", True, f"find {text}")
    assert list(query.ids).count(32000) == 1 and query.ids.count(1) == 1


@pytest.mark.parametrize("form", FORMS)
def test_markup_special_tokens_are_matched(form):
    tokens = PromptTokenizer.from_checkpoint(TOKENIZER_REFERENCE / form)
    ids = tokens.encode([("markup", "a</s>b"), ("text", "</s>")])
    assert ids.count(2) == 1 and ids[:ids.index(2)] == tokens.encode_text("a")


def test_continuation_runs_get_no_metaspace_prefix():
    tokens = PromptTokenizer.from_checkpoint(TOKENIZER_REFERENCE / "metaspace")
    assert tokens.encode_text("hello", at_start=False) != tokens.encode_text("hello")
    assert tokens.encode([("markup", "Query: "), ("text", "hello")]) == \
        tokens.encode_text("Query:") + tokens.encode_text(" hello", at_start=False)


def test_unknown_piece_kind_is_refused():
    tokens = PromptTokenizer.from_checkpoint(TOKENIZER_REFERENCE / "legacy")
    with pytest.raises(ValueError, match="unknown prompt piece kind 'html'"):
        tokens.encode([("html", "<b>")])
