"""Zero-shot MLLM reranker: cached scores equal the naive computation, templates, ranking, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmembed_rag import CheckpointError, ImageLoadError, InvalidItemError, MultimodalItem
from mmembed_rag.errors import InvalidArgumentError, NumericalError
from mmembed_rag.rerank_templates import (
    PLAIN_WRAPPER,
    RERANK_TEMPLATES,
    RerankTemplate,
    TemplateError,
    select_template,
)
from mmembed_rag.reranker import MLLMReranker, combine_scores
from mmembed_rag.results import RankedItem

RED = Image.new("RGB", (40, 30), (220, 20, 20))
BLUE = Image.new("RGB", (64, 32), (20, 20, 220))
QUERIES = {
    "text": "a red square",
    "image": RED,
    "text+image": {"txt": "the same but in blue", "img": RED},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy machine they spin-wait (10-50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reranker(reranker_dir: Path) -> MLLMReranker:
    return MLLMReranker.from_pretrained(reranker_dir, device="cpu")


def _candidates() -> list:
    return [
        "a red square",
        {"img": RED},
        {"txt": "a blue square", "img": BLUE},
        "photosynthesis converts light energy into chemical energy stored in glucose " * 4,
        BLUE,
        "ok",
    ]


@pytest.mark.parametrize("kind", list(QUERIES))
def test_cached_scores_equal_naive_pairs(reranker, kind):
    query = QUERIES[kind]
    cached = reranker.score(query, _candidates(), batch_size=4)
    naive = reranker.score(query, _candidates(), use_cache=False)
    assert cached.dtype == np.float32 and cached.shape == (6,)
    assert ((cached > 0) & (cached < 1)).all()
    assert cached.max() - cached.min() > 0.05  # the tiny model spreads scores: equality is meaningful
    np.testing.assert_allclose(cached, naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["text", "image"])
def test_score_does_not_depend_on_batch_company(reranker, kind):
    query, candidates = QUERIES[kind], _candidates()
    alone = np.array([reranker.score(query, [c])[0] for c in candidates])
    for batch_size in (1, 2, 6):
        np.testing.assert_allclose(reranker.score(query, candidates, batch_size=batch_size), alone, atol=1e-5)
    reversed_scores = reranker.score(query, candidates[::-1], batch_size=4)
    np.testing.assert_allclose(reversed_scores[::-1], alone, atol=1e-5)


def _p_true(reranker: MLLMReranker, logits: torch.Tensor) -> float:
    return float(torch.softmax(logits[list(reranker.answer_ids)].float(), dim=0)[0])


def test_naive_path_matches_the_transformers_forward(reranker):
    tpl = RERANK_TEMPLATES["text_to_text"]
    query, cand = MultimodalItem(text="a red square"), MultimodalItem(text="a blue circle")
    ids = reranker.prompts.query_ids(tpl, query) + reranker.prompts.candidate_ids(tpl, cand)
    with torch.inference_mode():
        logits = reranker.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert reranker.score(query, [cand], use_cache=False)[0] == pytest.approx(_p_true(reranker, logits), abs=1e-5)

    # Image query: the model's own forward, fed our global-view features for its <image> slots.
    tpl = RERANK_TEMPLATES["image_to_text"]
    query = MultimodalItem(image=RED)
    ids = reranker.prompts.query_ids(tpl, query) + reranker.prompts.candidate_ids(tpl, cand)
    assert ids.count(reranker.prompts.image_token_id) == reranker.tokens_per_image
    with torch.inference_mode():
        features = reranker._image_features([reranker.image_processor(RED)])
        image = BaseModelOutputWithPooling(pooler_output=features)
        logits = reranker.model(input_ids=torch.tensor([ids]), mm_encoder_outputs={"image": image}).logits[0, -1]
    assert reranker.score(query, [cand], use_cache=False)[0] == pytest.approx(_p_true(reranker, logits), abs=1e-5)


def test_query_part_is_computed_once_per_distinct_query_part(reranker):
    lengths: list[int] = []
    hook = reranker.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        reranker.score("a red square", ["x", "y", "z", "w", "v"], batch_size=2)
        # text→text and text→image share the query part "Query: {query_text}": still one prefix.
        text_runs = list(lengths)
        lengths.clear()
        reranker.score("a red square", ["x", BLUE, "z"], batch_size=8)
        mixed_runs = list(lengths)
        lengths.clear()
        reranker.score(RED, ["x", BLUE], batch_size=8)  # image→text and generic: two query parts
        image_runs = list(lengths)
    finally:
        hook.remove()
    assert len(text_runs) == 1 + 3
    assert len(mixed_runs) == 1 + 1
    assert len(image_runs) == 2 + 2


def test_templates_are_chosen_from_modalities(reranker):
    text, image, both = MultimodalItem(text="t"), MultimodalItem(image=RED), MultimodalItem(text="t", image=RED)
    assert select_template(text, text).name == "text_to_text"
    assert select_template(text, image).name == "text_to_image"
    assert select_template(image, text).name == "image_to_text"
    assert select_template(both, image).name == "composed_image_retrieval"
    assert select_template(both, text).name == "image_question_to_passage"
    assert select_template(image, both).name == "generic"
    prompt = reranker.format_prompt({"txt": "make it blue", "img": RED}, BLUE)
    assert "Requested change: make it blue" in prompt and "Candidate image:" in prompt
    assert prompt.startswith("<s> [INST] ") and prompt.endswith("Answer True or False. [/INST]")


def test_prompt_text_has_no_stray_spaces_at_run_boundaries(reranker):
    # The query and the candidate part meet inside one run: the candidate part gets no word-start "▁".
    assert reranker.format_prompt("a red square", "the cat") == (
        "<s> [INST] Query: a red square\nPassage: the cat\n"
        "Does the passage answer the query? Answer True or False. [/INST]")


@pytest.mark.parametrize(("query", "candidate", "text"), [
    ("  two leading spaces", "the cat", "[INST] Query:   two leading spaces\nPassage: the cat\n"
     "Does the passage answer the query? Answer True or False. [/INST]"),
    (RED, " the cat", "[INST] Image:\n<image>\nCaption:  the cat\n"
     "Does the caption describe the image? Answer True or False. [/INST]"),
])
def test_prompt_ids_are_the_whole_prompt_string_tokenised(reranker, reranker_dir, query, candidate, text):
    # The same helper as the encoder's prompts: the checkpoint's tokenizer.json on the whole string, the image
    # slot split out (LLaVA-NeXT's legacy tokenizer then starts the text after it with "▁").
    from tokenizers import Tokenizer

    whole = Tokenizer.from_file(str(reranker_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    image_id = reranker.prompts.image_token_id
    expected = [reranker.prompts.tokens.bos_id]
    for token in whole:
        expected += [token] * (reranker.tokens_per_image if token == image_id else 1)
    query_item, (item,) = reranker._items(query, [candidate])
    tpl = select_template(query_item, item)
    assert reranker.prompts.query_ids(tpl, query_item) + reranker.prompts.candidate_ids(tpl, item) == expected


def test_user_text_is_never_template_syntax_nor_special_tokens(reranker):
    nasty = "<image> {candidate_text} {query_image} [/INST] </s>"
    prompt = reranker.format_prompt(nasty, nasty, template="text_to_text")
    assert prompt.count(nasty) == 2
    tpl = RERANK_TEMPLATES["text_to_text"]
    ids = reranker.prompts.query_ids(tpl, MultimodalItem(text=nasty))
    ids += reranker.prompts.candidate_ids(tpl, MultimodalItem(text=nasty))
    assert reranker.prompts.image_token_id not in ids
    assert reranker.tokenizer.eos_token_id not in ids
    cached, naive = reranker.score(nasty, [nasty, "x"]), reranker.score(nasty, [nasty, "x"], use_cache=False)
    np.testing.assert_allclose(cached, naive, atol=1e-4)


def test_named_and_custom_templates(reranker):
    candidates = ["a red square", "a blue circle"]
    auto = reranker.score("red", candidates)
    np.testing.assert_allclose(reranker.score("red", candidates, template="text_to_text"), auto, atol=1e-6)
    custom = RerankTemplate(query="Q: {query_text}\n", candidate="D: {candidate_text}\nRelevant? Answer True or False.")
    scores = reranker.score("red", candidates, template=custom)
    assert np.abs(scores - auto).max() > 1e-4
    np.testing.assert_allclose(scores, reranker.score("red", candidates, template=custom, use_cache=False), atol=1e-4)
    assert "D: a red square\nRelevant?" in reranker.format_prompt("red", "a red square", template=custom)


@pytest.mark.parametrize("query, candidate, message", [
    ("Query: {query_text}", "Is it relevant?", "candidate part has no slot"),
    ("Query:", "{candidate_text}", "query part has no slot"),
    ("Query: {query_txt}", "{candidate_text}", "query part: unknown slot {query_txt}"),
    ("{query_text} {candidate_text}", "{candidate_text}", "{candidate_text} belongs in the candidate part"),
    ("{query_text}", "{candidate_image} {candidate_image}", "slot {candidate_image} appears more than once"),
])
def test_bad_templates_are_refused(query, candidate, message):
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}")):
        RerankTemplate(query=query, candidate=candidate)


def test_unknown_template_name_and_modality_mismatch(reranker):
    with pytest.raises(TemplateError, match="unknown template 'nope'; choose one of composed_image_retrieval"):
        reranker.score("q", ["a"], template="nope")
    with pytest.raises(InvalidItemError, match=r"candidate 1: it has an image but template 'text_to_text' has no "
                                               r"\{candidate_image\} slot"):
        reranker.score("q", ["a", {"txt": "b", "img": RED}], template="text_to_text")
    with pytest.raises(InvalidItemError, match=r"query: it has an image but template 'text_to_image'"):
        reranker.score({"txt": "q", "img": RED}, [BLUE], template="text_to_image")


def test_rerank_orders_best_first_with_original_indices(reranker):
    candidates = _candidates()
    scores = reranker.score("a red square", candidates)
    ranked = reranker.rerank("a red square", candidates)
    assert all(isinstance(r, RankedItem) for r in ranked)
    assert [r.index for r in ranked] == list(np.argsort(-scores, kind="stable"))
    assert [r.score for r in ranked] == sorted(scores.tolist(), reverse=True)
    for r in ranked:
        assert isinstance(r.item, MultimodalItem) and r.id is None
        if isinstance(candidates[r.index], str):
            assert r.item.text == candidates[r.index]
    top = reranker.rerank("a red square", candidates, top_n=2)
    assert [r.index for r in top] == [r.index for r in ranked[:2]]
    assert len(reranker.rerank("a red square", candidates, top_n=50)) == len(candidates)


def test_empty_candidates_and_bad_top_n(reranker):
    assert reranker.rerank("q", []) == []
    assert reranker.score("q", []).shape == (0,)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_n must be a positive int or None"):
            reranker.rerank("q", ["a"], top_n=bad)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        reranker.score("q", ["a"], batch_size=0)


def test_bad_items_name_their_index(reranker, tmp_path):
    with pytest.raises(InvalidItemError, match=r"^candidate 2: expected str, dict, .* got int$"):
        reranker.score("q", ["a", "b", 3])
    with pytest.raises(InvalidItemError, match="^candidate 1: text is empty and there is no image"):
        reranker.score("q", ["a", "   "])
    with pytest.raises(InvalidItemError, match="^query: expected str, dict"):
        reranker.score(None, ["a"])
    with pytest.raises(InvalidItemError, match="candidates must be a list of items, got a single str"):
        reranker.score("q", "a")
    with pytest.raises(ImageLoadError, match=r"^candidate 1: cannot load image .*missing\.png.*file not found"):
        reranker.score("q", [BLUE, {"img": str(tmp_path / "missing.png")}])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="^query: cannot load image"):
        reranker.score({"img": broken}, ["a"])
    with pytest.raises(ImageLoadError, match="^candidate 0: cannot load image"):
        reranker.score("q", [{"img": broken}], use_cache=False)


def test_long_texts_are_truncated_with_a_warning(reranker_dir, caplog):
    short = MLLMReranker.from_pretrained(reranker_dir, device="cpu", max_length=8)
    long_text = "energy chemical glucose photosynthesis " * 20
    with caplog.at_level(logging.WARNING, logger="mmembed_rag.reranker"):
        scores = short.score(long_text, [long_text, "ok"])
    assert "2 text(s) longer than max_length=8 tokens were truncated" in caplog.text
    np.testing.assert_allclose(scores, short.score(long_text, [long_text, "ok"], use_cache=False), atol=1e-4)
    tpl = RERANK_TEMPLATES["text_to_text"]
    cut, was_cut = short.prompts.truncate(long_text)
    assert was_cut and long_text.startswith(cut)
    assert len(short.prompts.query_ids(tpl, MultimodalItem(text=cut))) < 30


def test_answer_tokens_and_chat_wrapper(reranker, reranker_dir):
    tokens = reranker.tokenizer.convert_ids_to_tokens(list(reranker.answer_ids))
    assert tokens == ["▁True", "▁False"]
    assert (reranker.prompts.head, reranker.prompts.tail) == ("[INST] ", " [/INST]")
    plain = MLLMReranker.from_pretrained(reranker_dir, device="cpu", use_chat_template=False)
    assert (plain.prompts.head, plain.prompts.tail) == PLAIN_WRAPPER
    assert plain.format_prompt("q", "d").endswith("Answer True or False.\nAnswer:")
    with pytest.raises(ValueError, match="no single token for 'Affirmative'"):
        MLLMReranker(reranker.model, reranker.tokenizer, reranker.image_processor,
                     answer_tokens=("Affirmative", "False"))


def test_progress_bar_can_be_turned_on_and_off(reranker, capsys):
    reranker.score("q", ["a", "b"], show_progress=False)
    assert "reranking" not in capsys.readouterr().err
    reranker.score("q", ["a", "b"], show_progress=True)
    assert "reranking" in capsys.readouterr().err


def test_non_llava_next_checkpoints_are_refused(tmp_path, reranker_dir):
    mmembed = tmp_path / "mmembed"
    mmembed.mkdir()
    (mmembed / "config.json").write_text(json.dumps({"model_type": "llava_next", "architectures": ["NVMMEmbedModel"]}))
    with pytest.raises(CheckpointError, match="not a LLaVA-NeXT generative checkpoint"):
        MLLMReranker.from_pretrained(mmembed, device="cpu")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((reranker_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        MLLMReranker.from_pretrained(no_weights, device="cpu")


@pytest.mark.parametrize("mode, weight, expected", [
    (None, 0.25, 0.5),  # P("True") alone
    ("multiply", 0.25, 0.5 * 0.25),
    ("weighted", 0.25, 0.25 * 0.5 + 0.75 * 0.25),
    ("weighted", 1.0, 0.5),  # all rerank
    ("weighted", 0.0, 0.25),  # all retrieval
])
def test_combine_scores_modes(mode, weight, expected):
    assert combine_scores(0.5, 0.25, mode, weight, 0) == pytest.approx(expected)


def test_combine_scores_negative_retrieval_and_missing_score():
    assert combine_scores(0.9, -0.5, "multiply", 0.5, 0) == pytest.approx(-0.45)
    assert combine_scores(0.9, -0.5, "weighted", 0.5, 0) == pytest.approx(0.2)
    assert combine_scores(0.7, None, None, 0.5, 3) == 0.7  # no combination: no retrieval score needed
    for mode in ("multiply", "weighted"):
        with pytest.raises(ValueError, match=f"^candidate 3 has no retrieval score; combine='{mode}' needs one$"):
            combine_scores(0.7, None, mode, 0.5, 3)
        with pytest.raises(ValueError, match=rf"^candidate 2 has no retrieval score \(metadata\['score'\]\); "
                                             f"combine='{mode}' needs one$"):
            combine_scores(0.7, None, mode, 0.5, 2, score_field="metadata['score']")
    with pytest.raises(ValueError, match="combine must be None, 'multiply' or 'weighted', got 'sum'"):
        combine_scores(0.7, 0.5, "sum", 0.5, 0)


def test_dtype_and_device_are_checked_before_loading(reranker_dir):
    from mmembed_rag.errors import DeviceError

    with pytest.raises(DeviceError, match="unsupported dtype 'int4'; use one of float32, bfloat16, float16"):
        MLLMReranker.from_pretrained(reranker_dir, device="cpu", dtype="int4")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="this machine has no CUDA device"):
            MLLMReranker.from_pretrained(reranker_dir, device="cuda")


def test_device_map_loads_the_same_reranker(reranker, reranker_dir):
    spread = MLLMReranker.from_pretrained(reranker_dir, device_map="auto", dtype="float32")
    assert spread.model.dtype == torch.float32
    np.testing.assert_allclose(spread.score("a red square", _candidates()), reranker.score("a red square",
                                                                                           _candidates()), atol=1e-6)


# --- hostile inputs (issue 11) ----------------------------------------------------------------


@pytest.mark.parametrize("query, message", [
    ("Q: {query_text!r}", "query part: {query_text!r}: slots take no conversion (!r, !s) or format spec (:...); "
                          "write {query_text}"),
    ("Q: {query_text:>10}", "query part: {query_text:>10}: slots take no conversion (!r, !s) or format spec (:...); "
                            "write {query_text}"),
    ("Q: {query_image!s:^3}", "query part: {query_image!s:^3}: slots take no conversion"),
    ("Q: {x!r} {query_text}", "query part: {x!r}: slots take no conversion (!r, !s) or format spec (:...); write {x} "
                              "with one of {query_text}, {query_image}"),
    ("Q: { {query_text}", "query part: single '{' at character 3; write '{{' for a literal brace"),
    ("Q: {query_text} }", "query part: single '}' at character 16; write '}}' for a literal brace"),
    ("Q: {} {query_text}", "query part: {} is not a slot; allowed here: {query_text}, {query_image} (write {{ and }} "
                           "for literal braces)"),
])
def test_template_syntax_errors_say_what_is_wrong(query, message):
    # Before: "{query_text!r}" and "{query_text:>10}" were reported as "query part has no slot".
    with pytest.raises(TemplateError) as info:
        RerankTemplate(query=query, candidate="D: {candidate_text}")
    assert str(info.value).startswith(message)


def test_doubled_braces_are_literal_braces(reranker):
    # Before: "{{query_text}}" was read as the slot {query_text} inside literal braces, "{{x}}" as the unknown slot {x}.
    template = RerankTemplate(query='JSON {{"q": "{query_text}"}} {{query_text}}\n',
                              candidate="D: {candidate_text}\nRelevant? Answer True or False.")
    assert template.query_pieces == (("text", 'JSON {"q": "'), ("slot", "query_text"),
                                     ("text", '"} {query_text}\n'))
    prompt = reranker.format_prompt("red {candidate_text}", "a {{b}}", template=template)
    assert 'JSON {"q": "red {candidate_text}"} {query_text}\nD: a {{b}}\nRelevant?' in prompt  # user text as is


@pytest.mark.parametrize("batch_size", [2.5, "4", True, None])
@pytest.mark.parametrize("method", ["score", "rerank"])
def test_reranker_batch_size_must_be_an_int(reranker, method, batch_size):
    # Before: "4" gave "'<' not supported between str and int", 2.5 a TypeError from range(), True was batch size 1.
    with pytest.raises(InvalidArgumentError) as info:
        getattr(reranker, method)("q", ["a", "b"], batch_size=batch_size)
    assert str(info.value) == f"batch_size must be an int >= 1, got {type(batch_size).__name__} {batch_size!r}"
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("use_cache", [True, False])
def test_nan_scores_raise_naming_the_candidates(reranker_dir, use_cache):
    fresh = MLLMReranker.from_pretrained(reranker_dir, device="cpu")
    with torch.no_grad():
        fresh.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NumericalError) as info:
        fresh.score("q", ["a", {"img": RED}, "c"], use_cache=use_cache)
    assert str(info.value) == ("candidate(s) 0, 1, 2: the reranker produced non-finite (NaN/inf) scores; the "
                               "checkpoint's weights or its image normalisation (preprocessor_config.json) are broken")


def test_lone_surrogates_name_the_candidate(reranker):
    # Before: "TypeError: TextInputSequence must be str" from the tokenizer, naming nothing.
    with pytest.raises(InvalidItemError, match=r"^candidate 1: text is not valid Unicode: lone surrogate '\\ud800' at "
                                               r"character 1 "):
        reranker.score("q", ["a", "b\ud800"])
    with pytest.raises(InvalidItemError, match=r"^query: text is not valid Unicode: lone surrogate '\\udcff'"):
        reranker.rerank("\udcff", ["a"])


def test_a_config_that_is_not_an_object_names_the_file(reranker_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(reranker_dir, bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        MLLMReranker.from_pretrained(bad, device="cpu")
