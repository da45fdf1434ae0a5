"""The native Qwen3-VL family reproduces the official Qwen3-VL-Embedding / -Reranker classes.

The fixture (``tests/fixtures/qwen3-vl-reference``, see its README) holds tiny checkpoints written by
``make_tiny_qwen3_vl`` and what the official code (transformers 4.57.6, qwen-vl-utils 0.0.14) computed on them for
texts, images of several sizes and aspect ratios, text+image and instructions. Inputs our item type cannot express
(two images in one item, an empty item) are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmembed_rag import Encoder
from mmembed_rag.items import MultimodalItem

ROOT = Path(__file__).parent / "fixtures" / "qwen3-vl-reference"
TOL = 1e-4
BF16_TOL = 5e-3  # the official bf16-vs-fp32 gap on this fixture is 2.4e-3


def _expected() -> dict[str, np.ndarray]:
    with np.load(ROOT / "expected.npz") as data:
        return {k: data[k] for k in data.files}


def _embedder_cases() -> list[tuple[int, MultimodalItem]]:
    entries = json.loads((ROOT / "inputs.json").read_text())["embedder"]
    out = []
    for index, entry in enumerate(entries):
        image = entry.get("image")
        if isinstance(image, list) or (image is None and entry.get("text") is None):
            continue  # several images in one item / an empty item: not expressible as a MultimodalItem
        out.append((index, MultimodalItem(text=entry.get("text"), image=str(ROOT / image) if image else None,
                                          instruction=entry.get("instruction"))))
    return out


@pytest.fixture(scope="module")
def qwen_encoder() -> Encoder:
    return Encoder.from_pretrained(ROOT / "embedding", device="cpu", dtype="float32")


def test_prompt_ids_equal_the_official_processor(qwen_encoder):
    expected = _expected()
    cases = _embedder_cases()
    prompts = qwen_encoder.query_prompts([item for _, item in cases])
    for (index, _), prompt in zip(cases, prompts):
        ids = np.asarray(prompt.ids)
        image_id = qwen_encoder.model.config.image_token_id
        expanded = np.repeat(ids, np.where(ids == image_id, prompt.image_tokens, 1))
        np.testing.assert_array_equal(expanded, expected[f"input_ids_{index:02d}"], err_msg=f"input {index}")


def test_embeddings_match_the_official_embedder_one_by_one_and_batched(qwen_encoder):
    expected = _expected()
    cases = _embedder_cases()
    rows = [index for index, _ in cases]
    batched = qwen_encoder.encode_queries([item for _, item in cases], batch_size=16)
    single = np.stack([qwen_encoder.encode_queries([item])[0] for _, item in cases])
    assert np.abs(batched - expected["embeddings"][rows]).max() < TOL
    assert np.abs(single - expected["embeddings"][rows]).max() < TOL
    assert np.abs(batched - expected["embeddings_batched"][rows]).max() < TOL


def test_documents_get_the_default_instruction(qwen_encoder):
    expected = _expected()
    plain = [(i, it) for i, it in _embedder_cases() if it.instruction is None]
    docs = qwen_encoder.encode_documents([it for _, it in plain])
    assert np.abs(docs - expected["embeddings"][[i for i, _ in plain]]).max() < TOL


def test_bfloat16_within_tolerance_of_the_official_bfloat16_run():
    encoder = Encoder.from_pretrained(ROOT / "embedding", device="cpu", dtype="bfloat16")
    expected = _expected()
    cases = _embedder_cases()
    out = encoder.encode_queries([item for _, item in cases], batch_size=16)
    assert np.abs(out - expected["embeddings_bf16"][[i for i, _ in cases]]).max() < BF16_TOL


def test_truncation_cuts_the_sequence_as_the_official_processor():
    expected = _expected()
    text = json.loads((ROOT / "inputs.json").read_text())["embedder"][1]["text"]
    encoder = Encoder.from_pretrained(ROOT / "embedding", device="cpu", dtype="float32", max_length=40)
    (prompt,) = encoder.document_prompts([MultimodalItem(text=text)])
    assert prompt.truncated and prompt.length == 40
    np.testing.assert_array_equal(np.asarray(prompt.ids[:40]), expected["trunc_embedder_input_ids"].reshape(-1))
    out = encoder.encode_documents([text])
    assert np.abs(out - expected["trunc_embedder_embedding"].reshape(1, -1)).max() < TOL


def _rerank_cases() -> list[tuple[MultimodalItem, list[MultimodalItem], str | None]]:
    def item(entry: dict) -> MultimodalItem:
        return MultimodalItem(text=entry.get("text"), image=str(ROOT / entry["image"]) if entry.get("image") else None)

    entries = json.loads((ROOT / "inputs.json").read_text())["reranker"]
    return [(item(e["query"]), [item(d) for d in e["documents"]], e.get("instruction")) for e in entries]


@pytest.fixture(scope="module")
def qwen_reranker():
    from mmembed_rag import MLLMReranker

    return MLLMReranker.from_pretrained(ROOT / "reranker", device="cpu", dtype="float32")


def test_reranker_family_is_read_from_the_config(qwen_reranker):
    from mmembed_rag.families.qwen3_vl.reranker import Qwen3VLReranker
    from mmembed_rag.reranker_base import Reranker

    assert isinstance(qwen_reranker, Qwen3VLReranker) and isinstance(qwen_reranker, Reranker)


@pytest.mark.parametrize("use_cache, batch_size", [(False, 1), (True, 3), (True, 16)])
def test_reranker_scores_match_the_official_reranker(qwen_reranker, use_cache, batch_size):
    expected = _expected()
    for number, (query, docs, instruction) in enumerate(_rerank_cases()):
        logits = qwen_reranker.score_logits(query, docs, instruction=instruction, use_cache=use_cache,
                                            batch_size=batch_size)
        assert np.abs(logits - expected[f"rerank_logits_{number}"]).max() < TOL, number
        scores = qwen_reranker.score(query, docs, instruction=instruction, use_cache=use_cache, batch_size=batch_size)
        assert np.abs(scores - expected[f"rerank_scores_{number}"]).max() < TOL, number


def test_reranker_prompt_ids_equal_the_official_ones(qwen_reranker):
    expected = _expected()
    query, docs, instruction = _rerank_cases()[1]
    images = [qwen_reranker._image(query, "query")]
    for d, doc in enumerate(docs):
        own = images + ([qwen_reranker._image(doc, "c")] if doc.image is not None else [])
        ids = qwen_reranker.tokens.encode(qwen_reranker.chat.render(
            "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
            'Note that the answer can only be "yes" or "no".', qwen_reranker._user(query, doc, instruction)))
        full, _ = qwen_reranker._sequence(ids, [g for _, g in own])
        np.testing.assert_array_equal(np.asarray(full), expected[f"rerank_input_ids_1_{d}"].reshape(-1))


def test_reranker_truncation_keeps_specials_and_the_tail_as_the_official():
    from mmembed_rag import MLLMReranker

    spec = json.loads((ROOT / "inputs.json").read_text())["truncation"]
    expected = _expected()
    reranker = MLLMReranker.from_pretrained(ROOT / "reranker", device="cpu", dtype="float32",
                                            max_length=spec["max_length"])
    query = MultimodalItem(text=spec["reranker"]["query"]["text"])
    docs = [MultimodalItem(text=d.get("text"), image=str(ROOT / d["image"]) if d.get("image") else None)
            for d in spec["reranker"]["documents"]]
    for use_cache in (False, True):
        logits = reranker.score_logits(query, docs, use_cache=use_cache)
        assert np.abs(logits - expected["trunc_rerank_logits"].reshape(-1)).max() < TOL


def test_reranker_refuses_llava_options():
    from mmembed_rag import MLLMReranker
    from mmembed_rag.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="template= and use_chat_template= are for LLaVA-NeXT"):
        MLLMReranker.from_pretrained(ROOT / "reranker", device="cpu", template="generic")
