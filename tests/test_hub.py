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
