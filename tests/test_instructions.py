"""Tests for the M-BEIR task instruction catalog."""

from __future__ import annotations

import dataclasses

import pytest

from mmembed_rag.errors import InvalidItemError, MMEmbedError
from mmembed_rag.instructions import (
    M_BEIR_DATASETS,
    M_BEIR_TASKS,
    TASK_INSTRUCTIONS,
    TaskInstruction,
    UnknownTaskError,
    get_instruction,
    instructions_for,
    resolve_instruction,
)

EXPECTED_PAIRS = {
    (0, 0), (0, 3),  # VisualNews
    (9, 0), (9, 3),  # MSCOCO
    (1, 0), (1, 3),  # Fashion200K
    (2, 1), (2, 2),  # WebQA
    (3, 2),  # EDIS
    (4, 4),  # NIGHTS
    (5, 6), (5, 8),  # OVEN
    (6, 6), (6, 8),  # InfoSeek
    (7, 7),  # FashionIQ
    (8, 7),  # CIRR
}

EXPECTED_NAMES = {
    "visualnews_t2i", "visualnews_i2t", "mscoco_t2i", "mscoco_i2t", "fashion200k_t2i",
    "fashion200k_i2t", "webqa_t2t", "webqa_t2it", "edis_t2it", "nights_i2i", "oven_it2t",
    "oven_it2it", "infoseek_it2t", "infoseek_it2it", "fashioniq_it2i", "cirr_it2i",
}

VISUALNEWS_T2I = "Identify the news-related image in line with the described event."
VISUALNEWS_I2T = "Find a caption for the news in the given photo."


def test_catalog_has_the_16_evaluated_pairs() -> None:
    assert len(TASK_INSTRUCTIONS) == 16
    assert set(TASK_INSTRUCTIONS) == EXPECTED_NAMES
    assert {(e.dataset_id, e.task_id) for e in TASK_INSTRUCTIONS.values()} == EXPECTED_PAIRS


def test_catalog_is_read_only() -> None:
    with pytest.raises(TypeError):
        TASK_INSTRUCTIONS["new"] = TASK_INSTRUCTIONS["visualnews_t2i"]  # type: ignore[index]
    with pytest.raises(TypeError):
        M_BEIR_TASKS[5] = ("image", "image,text")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASK_INSTRUCTIONS["visualnews_t2i"].instruction = "x"  # type: ignore[misc]


def test_visualnews_strings() -> None:
    assert get_instruction("visualnews_t2i") == VISUALNEWS_T2I
    assert get_instruction("visualnews_i2t") == VISUALNEWS_I2T
    assert instructions_for(0, 0).instruction == VISUALNEWS_T2I
    assert instructions_for(0, 3).instruction == VISUALNEWS_I2T


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mscoco_t2i", "Find me an everyday image that matches the given caption."),
        ("mscoco_i2t", "Find an image caption describing the following everyday image."),
        ("fashion200k_t2i", "Based on the following fashion description, retrieve the best matching image."),
        ("fashion200k_i2t", "Find a product description for the fashion item in the image."),
        ("webqa_t2t", "Retrieve passages from Wikipedia that provide answers to the following question."),
        ("webqa_t2it", "Find a Wikipedia image that answers this question."),
        ("edis_t2it", "Find a news image that matches the provided caption."),
        ("nights_i2i", "Find a day-to-day image that looks similar to the provided image."),
        ("fashioniq_it2i", "Find a fashion image that aligns with the reference image and style note."),
        (
            "cirr_it2i",
            "Retrieve a day-to-day image that aligns with the modification instructions "
            "of the provided image.",
        ),
    ],
)
def test_canonical_instructions(name: str, expected: str) -> None:
    assert get_instruction(name) == expected


def test_oven_and_infoseek_share_canonical_instruction_per_task() -> None:
    assert get_instruction("oven_it2t") == get_instruction("infoseek_it2t")
    assert get_instruction("oven_it2it") == get_instruction("infoseek_it2it")
    assert get_instruction("oven_it2it") == (
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image."
    )


@pytest.mark.parametrize("entry", list(TASK_INSTRUCTIONS.values()), ids=lambda e: e.name)
def test_entry_is_consistent(entry: TaskInstruction) -> None:
    assert entry.dataset == M_BEIR_DATASETS[entry.dataset_id]
    assert M_BEIR_TASKS[entry.task_id] == (entry.query_modality, entry.target_modality)
    assert {entry.query_modality, entry.target_modality} <= {"text", "image", "image,text"}
    assert entry.name.startswith(entry.dataset.lower() + "_")
    assert entry.variants[0] == entry.instruction
    assert len(entry.variants) >= 3
    assert len(set(entry.variants)) == len(entry.variants)
    for text in entry.variants:
        assert text == text.strip() and text.endswith((".", "?"))
    assert instructions_for(entry.dataset_id, entry.task_id) is entry


def test_name_suffix_matches_modalities() -> None:
    short = {"text": "t", "image": "i", "image,text": "it"}
    for entry in TASK_INSTRUCTIONS.values():
        expected = f"{short[entry.query_modality]}2{short[entry.target_modality]}"
        assert entry.name.rsplit("_", 1)[1] == expected


def test_m_beir_tasks_table() -> None:
    assert dict(M_BEIR_TASKS) == {
        0: ("text", "image"),
        1: ("text", "text"),
        2: ("text", "image,text"),
        3: ("image", "text"),
        4: ("image", "image"),
        6: ("image,text", "text"),
        7: ("image,text", "image"),
        8: ("image,text", "image,text"),
    }


def test_get_instruction_ignores_case_and_spaces() -> None:
    assert get_instruction("  VisualNews_T2I ") == VISUALNEWS_T2I


def test_unknown_name_error_type_and_message() -> None:
    with pytest.raises(UnknownTaskError) as info:
        get_instruction("visualnews_t2")
    err = info.value
    assert isinstance(err, KeyError)
    assert isinstance(err, MMEmbedError)
    message = str(err)
    assert not message.startswith(("'", '"'))  # no KeyError repr quoting
    assert "'visualnews_t2'" in message
    assert "Did you mean" in message and "'visualnews_t2i'" in message
    assert "TASK_INSTRUCTIONS" in message


def test_unknown_name_without_close_match_still_lists_names() -> None:
    with pytest.raises(UnknownTaskError, match="TASK_INSTRUCTIONS") as info:
        get_instruction("zzz")
    assert "mscoco_t2i" in str(info.value)


def test_resolve_instruction_none() -> None:
    assert resolve_instruction(None) is None


def test_resolve_instruction_catalog_name() -> None:
    assert resolve_instruction("visualnews_t2i") == VISUALNEWS_T2I
    assert resolve_instruction(" MSCOCO_I2T ") == get_instruction("mscoco_i2t")


def test_resolve_instruction_free_form_is_stripped_pass_through() -> None:
    text = "Find a recipe that uses the ingredients shown in this photo."
    assert resolve_instruction(text) == text
    assert resolve_instruction(f"\n  {text}\t") == text
    # A catalog text given verbatim is also returned as is.
    assert resolve_instruction(VISUALNEWS_T2I) == VISUALNEWS_T2I


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_resolve_instruction_empty_raises(blank: str) -> None:
    with pytest.raises(InvalidItemError, match="empty"):
        resolve_instruction(blank)


def test_resolve_instruction_rejects_non_string() -> None:
    with pytest.raises(InvalidItemError, match="string"):
        resolve_instruction(42)  # type: ignore[arg-type]


def test_resolve_instruction_mistyped_name_raises() -> None:
    with pytest.raises(UnknownTaskError, match="mscoco_t2i"):
        resolve_instruction("mscoco_t2")


def test_instructions_for_unknown_pair() -> None:
    with pytest.raises(UnknownTaskError) as info:
        instructions_for(0, 1)
    message = str(info.value)
    assert "VisualNews" in message and "visualnews_t2i" in message and "visualnews_i2t" in message
    with pytest.raises(UnknownTaskError, match="dataset id 42"):
        instructions_for(42, 0)


def test_task_instruction_validates_itself() -> None:
    with pytest.raises(ValueError, match="modalities"):
        TaskInstruction("x_t2i", "X", 0, 0, "image", "text", "a.", ("a.",))
    with pytest.raises(ValueError, match="first variant"):
        TaskInstruction("x_t2i", "X", 0, 0, "text", "image", "a.", ("b.", "a."))
