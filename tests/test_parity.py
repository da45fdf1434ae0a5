"""The native encoder reproduces the embeddings the release's own code computes, in float32 and bfloat16.

Two fixtures, each a tiny checkpoint with the embeddings the release's modelling code computed for it (see each
fixture's README): ``mmembed-tiny-reference`` and ``mmembed-release-layout`` -- the latter laid out exactly as the
release's code writes it (LLaVA-NeXT's text_config in config.json, NV-Embed-v1's language model in the weights,
the real Mistral vocabulary, texts with leading whitespace and newlines, a 4k-character document).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REFERENCE, RELEASE

from mmembed_rag import Encoder

TOL = 1e-4
BF16_TOL = 5e-3  # the release's own bf16-vs-fp32 gap on the release-layout fixture is about 2e-3
FIXTURES = {"tiny-reference": REFERENCE, "release-layout": RELEASE}


def _inputs(root: Path) -> dict:
    return json.loads((root / "inputs.json").read_text())


def _expected(root: Path) -> dict[str, np.ndarray]:
    with np.load(root / "expected.npz") as data:
        return {k: data[k] for k in data.files}


def _items(entries: list[dict], root: Path) -> list[dict]:
    return [{k: (str(root / v) if k == "img" else v) for k, v in e.items()} for e in entries]


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def case(request) -> tuple[Encoder, Path]:
    root = FIXTURES[request.param]
    max_length = _inputs(root)["max_length"]
    return Encoder.from_pretrained(root, dtype="float32", device="cpu", max_length=max_length), root


def test_documents_as_one_batch(case):
    encoder, root = case
    docs = _items(_inputs(root)["documents"], root)
    got = encoder.encode_documents(docs, batch_size=len(docs))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _expected(root)["documents"], atol=TOL, rtol=0)


def test_documents_one_by_one(case):
    encoder, root = case
    docs = _items(_inputs(root)["documents"], root)
    got = np.concatenate([encoder.encode_documents([d]) for d in docs])
    np.testing.assert_allclose(got, _expected(root)["documents_one_by_one"], atol=TOL, rtol=0)


@pytest.mark.parametrize("with_instruction", [True, False])
def test_queries(case, with_instruction):
    encoder, root = case
    inputs = _inputs(root)
    queries = _items(inputs["queries"], root)
    got = encoder.encode_queries(queries, instruction=inputs["instruction"] if with_instruction else None,
                                 batch_size=3)
    key = "queries_with_instruction" if with_instruction else "queries_without_instruction"
    np.testing.assert_allclose(got, _expected(root)[key], atol=TOL, rtol=0)


def test_instruction_changes_only_queries(case):
    # Guard against a parity test that passes trivially: the two query sets must really differ.
    expected = _expected(case[1])
    assert np.abs(expected["queries_with_instruction"] - expected["queries_without_instruction"]).max() > 1e-2


@pytest.fixture(scope="module")
def release_bf16() -> Encoder:
    return Encoder.from_pretrained(RELEASE, dtype="bfloat16", device="cpu")


def test_bfloat16_matches_the_release_in_bfloat16(release_bf16):
    inputs, expected = _inputs(RELEASE), _expected(RELEASE)
    docs = _items(inputs["documents"], RELEASE)
    chosen = inputs["documents_bfloat16"]
    got = np.concatenate([release_bf16.encode_documents([docs[i]]) for i in chosen])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected["documents_bfloat16"], atol=BF16_TOL, rtol=0)
    np.testing.assert_allclose(got, expected["documents_one_by_one"][chosen], atol=BF16_TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_bfloat16_stays_close_to_float32_on_every_input(name):
    root = FIXTURES[name]
    inputs, expected = _inputs(root), _expected(root)
    encoder = Encoder.from_pretrained(root, dtype="bfloat16", device="cpu", max_length=inputs["max_length"])
    docs = encoder.encode_documents(_items(inputs["documents"], root), batch_size=4)
    queries = encoder.encode_queries(_items(inputs["queries"], root), instruction=inputs["instruction"])
    np.testing.assert_allclose(docs, expected["documents"], atol=BF16_TOL, rtol=0)
    np.testing.assert_allclose(queries, expected["queries_with_instruction"], atol=BF16_TOL, rtol=0)


def test_release_layout_depends_on_the_profile(release_encoder):
    # With config.json's text_config (rope theta 1e6) the fixture's embeddings move by ~2e-2: the fixture can tell.
    text = release_encoder.model.language_model.config
    assert text.vocab_size == 32000
    assert text.rope_parameters["rope_theta"] == 10000.0
