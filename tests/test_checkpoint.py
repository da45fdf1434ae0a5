"""Loading and writing the released checkpoint format: strict keys, shards, dtypes, round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmembed_rag import CheckpointError, Encoder
from mmembed_rag.modeling.checkpoint import load_model
from mmembed_rag.testing import make_tiny_checkpoint


def _keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_factory_writes_the_released_layout(tiny_checkpoint, reference_dir):
    assert _keys(tiny_checkpoint) == _keys(reference_dir)
    ours = json.loads((tiny_checkpoint / "config.json").read_text())
    release = json.loads((reference_dir / "config.json").read_text())
    assert set(ours) == set(release)
    assert set(ours["text_config"]) == set(release["text_config"])
    assert set(ours["vision_config"]) == set(release["vision_config"])
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json"):
        assert (tiny_checkpoint / name).is_file(), name
    assert len(list(tiny_checkpoint.glob("model-*-of-*.safetensors"))) >= 2
    assert any(k.startswith("vision_tower.vision_model.") for k in _keys(tiny_checkpoint))
    with safe_open(str(next(tiny_checkpoint.glob("model-*.safetensors"))), framework="pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16


def test_factory_is_deterministic_and_fast(tmp_path):
    import time

    start = time.perf_counter()
    a = make_tiny_checkpoint(tmp_path / "a", seed=3)
    assert time.perf_counter() - start < 10
    b = make_tiny_checkpoint(tmp_path / "b", seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4)
    wa = {k: v for f in a.glob("*.safetensors") for k, v in load_file(f).items()}
    wb = {k: v for f in b.glob("*.safetensors") for k, v in load_file(f).items()}
    wc = {k: v for f in c.glob("*.safetensors") for k, v in load_file(f).items()}
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["latent_attention_model.latents"], wc["latent_attention_model.latents"])
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_tokenizer_has_image_token(tiny_encoder):
    image_id = tiny_encoder.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == tiny_encoder.model.image_token_index


def test_save_load_round_trip_is_identical(tiny_encoder, tiny_checkpoint, tmp_path, image_file):
    items = ["a red square", {"img": str(image_file), "txt": "same in blue"}]
    before = tiny_encoder.encode_documents(items)
    tiny_encoder.save_pretrained(tmp_path / "copy")
    assert _keys(tmp_path / "copy") == _keys(tiny_checkpoint)
    again = Encoder.from_pretrained(tmp_path / "copy", dtype="float32")
    np.testing.assert_array_equal(again.encode_documents(items), before)


@pytest.mark.parametrize(("key", "message"), [
    ("language_model.norm.weight", r"missing keys: language_model\.norm\.weight"),
    ("latent_attention_model.latents", r"latent-attention weight latent_attention_model\.latents missing"),
])
def test_missing_key_is_an_error(tiny_checkpoint, tmp_path, key, message):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = next(p for p in ckpt.glob("model-*.safetensors") if key in load_file(p))
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


def test_unexpected_key_is_an_error(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = next(ckpt.glob("model-*.safetensors"))
    tensors = load_file(shard)
    tensors["lm_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"unexpected keys: lm_head\.weight"):
        load_model(ckpt)


def test_wrong_shape_is_an_error(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"wrong shape.*mlp"):
        load_model(ckpt)


def test_missing_shard_is_an_error(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    next(ckpt.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard listed in the index is missing"):
        load_model(ckpt)


def test_pickle_weights_are_refused(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", ckpt / "config.json")
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(ckpt)


def test_no_config_and_bad_config(tmp_path, tiny_checkpoint):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")
    ckpt = _copy(tiny_checkpoint, tmp_path / "bad")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type is 'bert'"):
        load_model(ckpt)


def test_unsupported_dtype(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="unsupported dtype 'int8'"):
        load_model(tiny_checkpoint, dtype="int8")


def test_single_file_checkpoint_loads(tiny_encoder, tmp_path):
    tiny_encoder.save_pretrained(tmp_path / "one", max_shard_bytes=10**12)
    assert len(list((tmp_path / "one").glob("*.safetensors"))) == 1
    (tmp_path / "one" / "model.safetensors.index.json").unlink()
    next((tmp_path / "one").glob("*.safetensors")).rename(tmp_path / "one" / "model.safetensors")
    again = Encoder.from_pretrained(tmp_path / "one")
    np.testing.assert_array_equal(again.encode_documents(["x"]), tiny_encoder.encode_documents(["x"]))


@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_other_poolings(tmp_path, pooling):
    ckpt = make_tiny_checkpoint(tmp_path / pooling, pooling=pooling)
    assert not any(k.startswith("latent_attention_model") for k in _keys(ckpt))
    encoder = Encoder.from_pretrained(ckpt)
    out = encoder.encode_documents(["a red square", "a much longer blue circle on the left"])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_other_llava_next_backbone(tmp_path):
    text = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
            "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 512}
    ckpt = make_tiny_checkpoint(tmp_path / "llama", text_config=text, pooling="mean")
    encoder = Encoder.from_pretrained(ckpt)
    assert encoder.dim == 48
    assert type(encoder.model.language_model).__name__ == "LlamaModel"
    out = encoder.encode_documents(["a", {"img": __import__("PIL.Image").Image.new("RGB", (9, 9))}])
    assert out.shape == (2, 48)
