"""Encoder behaviour: shapes, normalisation, batching invariance, prompts, instructions, progress, errors."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from PIL import Image

from mmembed_rag import Encoder, ImageLoadError, InvalidItemError, MultimodalItem, get_instruction
from mmembed_rag.errors import InvalidArgumentError, NumericalError


def _corpus(image_file):
    return [
        "a red square",
        {"img": str(image_file)},
        {"txt": "the same but in blue", "img": str(image_file)},
        "photosynthesis " * 40,
        MultimodalItem(image=Image.new("RGB", (300, 80), "blue")),
        "ok",
    ]


def test_output_is_float32_normalised(tiny_encoder, image_file):
    out = tiny_encoder.encode_documents(_corpus(image_file))
    assert out.dtype == np.float32
    assert out.shape == (6, tiny_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_embedding_does_not_depend_on_batch_company(tiny_encoder, image_file):
    items = _corpus(image_file)
    alone = np.concatenate([tiny_encoder.encode_documents([it]) for it in items])
    for batch_size in (2, 3, 6):
        together = tiny_encoder.encode_documents(items, batch_size=batch_size)
        np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_input_order_is_restored(tiny_encoder, image_file):
    items = _corpus(image_file)
    forward = tiny_encoder.encode_documents(items, batch_size=4)
    backward = tiny_encoder.encode_documents(items[::-1], batch_size=4)
    np.testing.assert_allclose(backward[::-1], forward, atol=1e-5, rtol=0)


def test_empty_input_gives_empty_matrix(tiny_encoder):
    assert tiny_encoder.encode_documents([]).shape == (0, tiny_encoder.dim)
    assert tiny_encoder.encode_queries([], instruction="mscoco_t2i").shape == (0, tiny_encoder.dim)


def test_queries_get_the_instruction_documents_never(tiny_encoder):
    plain = tiny_encoder.encode_queries(["a red square"])
    steered = tiny_encoder.encode_queries(["a red square"], instruction="Find a picture.")
    assert np.abs(plain - steered).max() > 1e-3
    prompt = tiny_encoder.family.prompts.query("a red square", False, "Find a picture.")
    assert tiny_encoder.tokenizer.decode(prompt.ids, skip_special_tokens=True).startswith("Instruct: Find a picture.")
    doc = tiny_encoder.family.prompts.document("a red square", False)
    assert "Instruct" not in tiny_encoder.tokenizer.decode(doc.ids)


def test_task_name_resolves_to_catalog_text(tiny_encoder):
    by_name = tiny_encoder.encode_queries(["a red square"], instruction="mscoco_t2i")
    by_text = tiny_encoder.encode_queries(["a red square"], instruction=get_instruction("mscoco_t2i"))
    np.testing.assert_array_equal(by_name, by_text)


def test_item_instruction_overrides_the_default(tiny_encoder):
    own = tiny_encoder.encode_queries([MultimodalItem(text="a cat", instruction="Find a caption.")],
                                      instruction="Find a picture.")
    direct = tiny_encoder.encode_queries(["a cat"], instruction="Find a caption.")
    np.testing.assert_allclose(own, direct, atol=1e-6)


def test_literal_image_tag_in_text_is_text(tiny_encoder, image_file):
    prompt = tiny_encoder.family.prompts.document("look: <image> here", has_image=False)
    assert tiny_encoder.model.image_token_index not in prompt.ids
    as_text = tiny_encoder.encode_documents(["look: <image> here"])
    with_image = tiny_encoder.encode_documents([{"txt": "look: here", "img": str(image_file)}])
    assert np.isfinite(as_text).all()
    assert np.abs(as_text - with_image).max() > 1e-3
    # An instruction containing the tag is text as well.
    query = tiny_encoder.family.prompts.query("x", False, "match <image> please")
    assert tiny_encoder.model.image_token_index not in query.ids


def test_image_slot_is_expanded_to_the_global_view(tiny_encoder, image_file):
    items = [MultimodalItem(text="hi", image=str(image_file))]
    prompts = [tiny_encoder.family.prompts.document("hi", True)]
    batch = next(tiny_encoder.batches(items, prompts, 1))
    image_tokens = int((batch.inputs["input_ids"] == tiny_encoder.model.image_token_index).sum())
    assert image_tokens == (56 // 14) ** 2 + 1
    assert batch.inputs["pixel_values"].shape == (1, 3, 56, 56)


def test_truncation_warns_and_keeps_working(tiny_checkpoint, caplog):
    encoder = Encoder.from_pretrained(tiny_checkpoint, max_length=16)
    with caplog.at_level(logging.WARNING, logger="mmembed_rag.encoder"):
        out = encoder.encode_documents(["short", "long " * 200])
    assert "truncated" in caplog.text and "item 1" in caplog.text
    assert out.shape == (2, encoder.dim)
    assert len(encoder.family.prompts.document("long " * 200, False).ids) == 16


def test_progress_bar_can_be_shown_and_hidden(tiny_encoder, capsys):
    tiny_encoder.encode_documents(["a", "b"], show_progress=True)
    assert "encoding" in capsys.readouterr().err
    tiny_encoder.encode_documents(["a", "b"], show_progress=False)
    assert capsys.readouterr().err == ""


def test_dtype_and_device_options(tiny_checkpoint):
    reference = Encoder.from_pretrained(tiny_checkpoint, dtype="float32", device="cpu")
    half = Encoder.from_pretrained(tiny_checkpoint, dtype="bfloat16", device="cpu")
    assert half.dtype.is_floating_point and str(half.dtype) == "torch.bfloat16"
    a = reference.encode_documents(["a red square", "a blue circle"])
    b = half.encode_documents(["a red square", "a blue circle"])
    assert b.dtype == np.float32
    assert (a * b).sum(axis=1).min() > 0.98


@pytest.mark.parametrize(
    ("items", "error", "message"),
    [
        ([None], InvalidItemError, r"item 0: "),
        (["ok", 42], InvalidItemError, r"item 1: .*int"),
        (["ok", ""], InvalidItemError, r"item 1: .*empty"),
        (["ok", {"caption": "x"}], InvalidItemError, r"item 1: .*caption"),
        ("a single string", InvalidItemError, r"wrap it in a list"),
        (["ok", {"img": "/no/such/file.png"}], ImageLoadError, r"item 1: .*/no/such/file.png"),
    ],
)
def test_bad_items_name_the_index(tiny_encoder, items, error, message):
    with pytest.raises(error, match=message):
        tiny_encoder.encode_documents(items)


def test_corrupt_image_names_its_position_after_sorting(tiny_encoder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    items = ["long text " * 30, "short", {"img": str(bad)}]
    with pytest.raises(ImageLoadError, match=r"item 2: "):
        tiny_encoder.encode_documents(items, batch_size=1)


def test_bad_batch_size(tiny_encoder):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        tiny_encoder.encode_documents(["a"], batch_size=0)


def test_empty_instruction_is_rejected(tiny_encoder):
    with pytest.raises(InvalidItemError, match="instruction"):
        tiny_encoder.encode_queries(["a"], instruction="   ")


def test_float16_and_device_map_auto(tiny_checkpoint):
    reference = Encoder.from_pretrained(tiny_checkpoint).encode_documents(["a red square"])
    half = Encoder.from_pretrained(tiny_checkpoint, dtype="float16").encode_documents(["a red square"])
    spread = Encoder.from_pretrained(tiny_checkpoint, device_map="auto")
    assert float((reference * half).sum()) > 0.99
    np.testing.assert_allclose(spread.encode_documents(["a red square"]), reference, atol=1e-6)


def test_parallel_image_loading_matches_serial_and_names_the_first_bad_item(tiny_checkpoint, tmp_path):
    paths = []
    for i, size in enumerate([(40, 30), (300, 90), (17, 64), (128, 128)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", size, (i * 60, 100, 200 - i * 40)).save(paths[-1])
    items = [{"img": str(p), "txt": f"picture {i}"} for i, p in enumerate(paths)]
    serial = Encoder.from_pretrained(tiny_checkpoint, image_workers=1)
    parallel = Encoder.from_pretrained(tiny_checkpoint, image_workers=4)
    np.testing.assert_array_equal(parallel.encode_documents(items, batch_size=4),
                                  serial.encode_documents(items, batch_size=4))
    broken = items[:1] + [{"img": str(tmp_path / "missing1.png")}] + items[2:3] + [{"img": str(tmp_path / "m3.png")}]
    with pytest.raises(ImageLoadError, match=r"item 1: .*missing1.png"):
        parallel.encode_documents(broken, batch_size=4)


# --- hostile inputs (issue 11) ----------------------------------------------------------------

LONG_INSTRUCTION = "Find the image " * 2000


@pytest.mark.parametrize("items", [["a", {"txt": "b", "instruction": "Find"}], ["a"]])
def test_instruction_filling_max_length_is_refused_naming_the_item(tiny_encoder, items):
    # Before: alone it crashed in pooling ("cannot reshape tensor of 0 elements"), in a batch the row was zeros.
    with pytest.raises(InvalidItemError, match=r"^item 0: the instruction leaves no room for the query within "
                                               r"max_length=4096 tokens \(instruction and prompt markup take \d+\); "
                                               r"shorten the instruction or raise max_length$"):
        tiny_encoder.encode_queries(items, instruction=LONG_INSTRUCTION)


def test_item_instruction_filling_max_length_names_that_item(tiny_encoder):
    with pytest.raises(InvalidItemError, match=r"^item 1: the instruction leaves no room"):
        tiny_encoder.encode_queries(["a", {"txt": "b", "instruction": LONG_INSTRUCTION}], instruction="Find")


def test_long_instruction_and_long_text_still_pool_the_text(tiny_checkpoint):
    enc = Encoder.from_pretrained(tiny_checkpoint, device="cpu", max_length=128)
    out = enc.encode_queries(["word " * 200, {"txt": "a " * 200, "img": Image.new("RGB", (8, 8))}],
                             instruction="Find the image " * 4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_prompt_with_nothing_to_pool_is_refused(tiny_encoder):
    from mmembed_rag.prompts import Prompt

    good = tiny_encoder.document_prompts([MultimodalItem(text="a")])[0]
    empty = Prompt(good.ids, False, len(good.ids), False)
    items = [MultimodalItem(text="a"), MultimodalItem(text="b")]
    with pytest.raises(InvalidItemError, match=rf"^item 1: its prompt has no token left to pool \(masked_prefix "
                                               rf"{len(good.ids)} >= its length\)$"):
        tiny_encoder.collate(items, [good, empty], [0, 1])


def test_lone_surrogates_name_the_item(tiny_encoder):
    with pytest.raises(InvalidItemError, match=r"^item 1: text is not valid Unicode: lone surrogate '\\ud800' at "
                                               r"character 1 \(decode the source as UTF-8, or with "
                                               r"errors='replace'\)$"):
        tiny_encoder.encode_documents(["ok", "a\ud800b"])
    with pytest.raises(InvalidItemError, match=r"^item 0: instruction is not valid Unicode: lone surrogate '\\udcff'"):
        tiny_encoder.encode_queries([{"txt": "a", "instruction": "find \udcff"}])
    with pytest.raises(InvalidArgumentError, match=r"^instruction is not valid Unicode: lone surrogate '\\ud800' at "
                                                   r"character 0"):
        tiny_encoder.encode_queries(["a"], instruction="\ud800")


@pytest.mark.parametrize("batch_size", [2.5, "4", True, None, 2.0])
@pytest.mark.parametrize("method", ["encode_queries", "encode_documents"])
def test_batch_size_must_be_an_int(tiny_encoder, method, batch_size):
    expected = rf"^batch_size must be an int >= 1, got {type(batch_size).__name__} {re.escape(repr(batch_size))}$"
    with pytest.raises(InvalidArgumentError, match=expected) as info:
        getattr(tiny_encoder, method)(["a"], batch_size=batch_size)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_numpy_integer_batch_size_is_accepted(tiny_encoder):
    assert tiny_encoder.encode_documents(["a", "b", "c"], batch_size=np.int64(2)).shape == (3, tiny_encoder.dim)


def test_nan_weights_raise_naming_the_items(tiny_checkpoint):
    import torch

    enc = Encoder.from_pretrained(tiny_checkpoint, device="cpu")
    with torch.no_grad():
        enc.model.latent_attention_model.latents.fill_(float("nan"))
    with pytest.raises(NumericalError, match=r"^item\(s\) 0, 1, 2: the model produced non-finite \(NaN/inf\) "
                                             r"embeddings; the checkpoint's weights or its image normalisation "
                                             r"\(preprocessor_config\.json\) are broken$"):
        enc.encode_documents(["a", "b", {"img": Image.new("RGB", (8, 8))}])
