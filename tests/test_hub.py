"""Model resolution: local directories, and a clear, fast failure when the hub cannot be reached."""

from __future__ import annotations

import time

import pytest

from mmembed_rag import Encoder, ModelNotFoundError
from mmembed_rag.hub import resolve_checkpoint


def test_released_model_offline_fails_fast_and_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on this machine: nothing cached, nothing reachable
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        Encoder.from_pretrained("nvidia/MM-Embed")
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "nvidia/MM-Embed" in message
    assert "Encoder.from_pretrained('DIR')" in message and "--local-dir" in message
    assert isinstance(info.value, OSError)


def test_released_model_without_network_fails_fast():
    # No HF_HUB_OFFLINE: the real download attempt must give up quickly with the same project error.
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="nvidia/MM-Embed"):
        resolve_checkpoint("nvidia/MM-Embed", timeout=5)
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("name", ["./no/such/dir", "/definitely/not/here", "not-a-repo-id"])
def test_missing_local_path(name):
    with pytest.raises(ModelNotFoundError, match="no such checkpoint directory"):
        Encoder.from_pretrained(name)


def test_local_directory_is_used_as_is(tiny_checkpoint):
    assert resolve_checkpoint(tiny_checkpoint) == tiny_checkpoint


def test_hub_download_fetches_the_chat_template_but_no_code():
    from fnmatch import fnmatch

    from mmembed_rag.hub import ALLOW_PATTERNS

    def fetched(name: str) -> bool:
        return any(fnmatch(name, pattern) for pattern in ALLOW_PATTERNS)

    assert fetched("chat_template.jinja") and fetched("tokenizer.json") and fetched("model-00001-of-00004.safetensors")
    assert not fetched("modeling_nvmmembed.py") and not fetched("pytorch_model.bin")
