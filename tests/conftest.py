"""Shared fixtures: the released-format reference checkpoint and tiny checkpoints built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed_rag import Encoder
from mmembed_rag.testing import make_tiny_checkpoint, make_tiny_reranker

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "mmembed-tiny-reference"
# Laid out as the release's code writes it: text_config from LLaVA-NeXT, the LM from NV-Embed-v1 (see its README).
RELEASE = FIXTURES / "mmembed-release-layout"
TOKENIZER_REFERENCE = FIXTURES / "mistral-tokenizer-reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def reference_inputs() -> dict:
    return json.loads((REFERENCE / "inputs.json").read_text())


@pytest.fixture(scope="session")
def reference_expected() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "expected.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def reference_encoder() -> Encoder:
    return Encoder.from_pretrained(REFERENCE, dtype="float32", device="cpu", max_length=512)


@pytest.fixture(scope="session")
def release_dir() -> Path:
    return RELEASE


@pytest.fixture(scope="session")
def release_encoder() -> Encoder:
    return Encoder.from_pretrained(RELEASE, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-NeXT reranker checkpoint, built once and only read by the tests."""
    return make_tiny_reranker(tmp_path_factory.mktemp("rerank") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint: Path) -> Encoder:
    return Encoder.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture()
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(path)
    return path
