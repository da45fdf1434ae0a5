"""Behaviour tests for mmembed_rag.items."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed_rag.errors import InvalidItemError, MMEmbedError
from mmembed_rag.items import MultimodalItem, to_item, to_items


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (4, 4))


# --- MultimodalItem -----------------------------------------------------------------------------


def test_item_fields_and_frozen(image: Image.Image) -> None:
    item = MultimodalItem(text="a cat", image=image, instruction="Retrieve images.")
    assert (item.text, item.image, item.instruction) == ("a cat", image, "Retrieve images.")
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.text = "dog"  # type: ignore[misc]


@pytest.mark.parametrize(
    "source", ["a.png", Path("a.png"), b"\x89PNG", bytearray(b"x"), np.zeros((2, 2), np.uint8)]
)
def test_item_accepts_image_source_types(source: object) -> None:
    assert MultimodalItem(image=source).image is source  # type: ignore[arg-type]


def test_empty_text_with_image_is_normalised(image: Image.Image) -> None:
    assert MultimodalItem(text="  ", image=image).text is None


def test_repr_is_short() -> None:
    item = MultimodalItem(text="x" * 500, image=b"\0" * 1_000_000)
    assert len(repr(item)) < 150
    assert "<bytes 1000000>" in repr(item)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "neither text nor image"),
        ({"text": ""}, "text is empty"),
        ({"text": "   "}, "text is empty"),
        ({"text": 5}, "text must be a str or None, got int"),
        ({"text": "q", "instruction": 3}, "instruction must be a str or None, got int"),
        ({"image": 1.5}, "unsupported image type float"),
        ({"image": [1, 2]}, "unsupported image type list"),
        ({"image": ""}, "image is empty"),
        ({"instruction": "only an instruction"}, "neither text nor image"),
    ],
)
def test_item_validation_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidItemError, match=message) as info:
        MultimodalItem(**kwargs)
    assert isinstance(info.value, MMEmbedError) and isinstance(info.value, ValueError)


# --- to_item ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["a cat", "photo.png", "/tmp/x.jpg", "<image> what is this?", "https://x/a.png"]
)
def test_str_is_always_text(text: str) -> None:
    item = to_item(text, 0)
    assert item.text == text and item.image is None


def test_item_passthrough_pil_and_path(image: Image.Image) -> None:
    item = MultimodalItem(text="q")
    assert to_item(item, 0) is item
    assert to_item(image, 0).image is image
    assert to_item(Path("a.png"), 0).image == Path("a.png")


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"txt": "a", "img": "a.png"}, ("a", "a.png", None)),
        ({"text": "a", "image": "a.png"}, ("a", "a.png", None)),
        ({"img": "a.png"}, (None, "a.png", None)),
        ({"txt": "q", "instruction": "Find it."}, ("q", None, "Find it.")),
        ({"text": "", "image": "a.png"}, (None, "a.png", None)),
    ],
)
def test_dict_forms(obj: dict, expected: tuple) -> None:
    item = to_item(obj, 0)
    assert (item.text, item.image, item.instruction) == expected


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (5, r"^item 3: expected str, dict, MultimodalItem, PIL\.Image\.Image or pathlib\.Path, got int$"),
        (None, r"^item 3: expected .*, got NoneType$"),
        (["a"], r"^item 3: expected .*, got list$"),
        (b"\x89PNG", r"^item 3: expected .*, got bytes$"),
        ("", r"^item 3: text is empty"),
        ({}, r"^item 3: item has neither text nor image"),
        ({"txt": "a", "picture": "x", "caption": 1}, r"^item 3: unknown dict key\(s\) 'caption', 'picture'"),
        ({"txt": "a", "text": "b"}, r"^item 3: dict has both spellings of 'text'"),
        ({"img": "a.png", "image": "b.png"}, r"^item 3: dict has both spellings of 'image'"),
        ({"txt": 7}, r"^item 3: text must be a str or None, got int"),
        ({"img": 7}, r"^item 3: unsupported image type int"),
        ({"txt": "q", "instruction": ["x"]}, r"^item 3: instruction must be a str or None, got list"),
    ],
)
def test_to_item_errors(obj: object, message: str) -> None:
    with pytest.raises(InvalidItemError, match=message):
        to_item(obj, 3)


# --- to_items ---------------------------------------------------------------------------------


def test_to_items_converts_in_order(image: Image.Image) -> None:
    items = to_items(["a", {"img": "x.png"}, image, MultimodalItem(text="b")])
    assert [i.text for i in items] == ["a", None, None, "b"]
    assert to_items(x for x in ("a", "b"))[1].text == "b"
    assert to_items(()) == []


def test_to_items_reports_bad_element_index() -> None:
    with pytest.raises(InvalidItemError, match=r"^item 2: expected .*, got int$"):
        to_items(["a", "b", 3])


@pytest.mark.parametrize("single", ["a cat", MultimodalItem(text="q"), {"txt": "a"}, Path("a.png")])
def test_to_items_rejects_single_item(single: object) -> None:
    with pytest.raises(InvalidItemError, match=r"got a single \w+; wrap it in a list"):
        to_items(single)  # type: ignore[arg-type]


def test_to_items_rejects_non_iterable() -> None:
    with pytest.raises(InvalidItemError, match="expected a list of items, got int"):
        to_items(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("obj", "field", "char", "position"), [
    ("abc\ud800", "text", "\\ud800", 3),
    ({"txt": "\udcff name", "img": "x.png"}, "text", "\\udcff", 0),
    ({"text": "ok", "instruction": "find \udc80"}, "instruction", "\\udc80", 5),
])
def test_lone_surrogates_are_refused_naming_the_item(obj, field, char, position) -> None:
    # Before: accepted here, then a TypeError ("TextInputSequence must be str") without the index in the tokenizer.
    with pytest.raises(InvalidItemError) as info:
        to_items(["fine", obj])
    assert str(info.value) == (f"item 1: {field} is not valid Unicode: lone surrogate '{char}' at character "
                               f"{position} (decode the source as UTF-8, or with errors='replace')")
    assert isinstance(info.value.__cause__.__cause__, UnicodeEncodeError)  # to_item adds the index on top


def test_surrogate_escaped_image_paths_are_kept() -> None:
    # os.fsdecode of a non-UTF-8 file name gives lone surrogates; such a path is a real file name, not bad text.
    assert to_item({"img": "photo-\udcff.png"}, 0).image == "photo-\udcff.png"
