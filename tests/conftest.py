"""Shared fixtures: the released-format reference checkpoint and tiny checkpoints built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed_rag import Encoder
from mmembed_rag.testing import make_tiny_checkpoint, make_tiny_qwen3_vl, make_tiny_reranker

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
def llava_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def llava_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-NeXT reranker checkpoint, built once and only read by the tests."""
    return make_tiny_reranker(tmp_path_factory.mktemp("rerank") / "tiny", seed=0)


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-VL-Embedding checkpoint in the released layout, only read by the tests."""
    return make_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen") / "embedding", kind="embedding", seed=0)


@pytest.fixture(scope="session")
def qwen_reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-VL-Reranker checkpoint in the released layout, only read by the tests."""
    return make_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen-rerank") / "reranker", kind="reranker", seed=0)


#: The model families that modules marked ``pytestmark = pytest.mark.both_families`` run every test over.
FAMILIES = ("llava_next", "qwen3_vl")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_families: run each test once per model family (tiny checkpoint, "
                                       "encoder and reranker of that family)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "family" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_families"):
        metafunc.parametrize("family", FAMILIES, indirect=True, scope="session")


@pytest.fixture(scope="session")
def family(request: pytest.FixtureRequest) -> str:
    """The model family of ``tiny_checkpoint`` / ``tiny_encoder`` / ``reranker_dir``: MM-Embed unless parametrized."""
    return getattr(request, "param", "llava_next")


@pytest.fixture(scope="session")
def tiny_checkpoint(family: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("llava_checkpoint" if family == "llava_next" else "qwen_checkpoint")


@pytest.fixture(scope="session")
def reranker_dir(family: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("llava_reranker_dir" if family == "llava_next" else "qwen_reranker_dir")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint: Path) -> Encoder:
    return Encoder.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture()
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(path)
    return path
