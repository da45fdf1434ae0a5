"""Loading and writing the released checkpoint format: strict keys, shards, dtypes, round trips."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmembed_rag import CheckpointError, Encoder
from mmembed_rag.errors import DeviceError
from mmembed_rag.modeling.checkpoint import load_model
from mmembed_rag.testing import make_tiny_checkpoint


def _keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


def _shape(path: Path, key: str) -> tuple[int, ...]:
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            if key in handle.keys():
                return tuple(handle.get_slice(key).get_shape())
    raise KeyError(key)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def _key_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key names with layer indices folded, and the number of dimensions of each."""
    out = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                out[re.sub(r"\.\d+\.", ".N.", key)] = len(handle.get_slice(key).get_shape())
    return out


def test_factory_writes_the_released_layout(tiny_checkpoint, release_dir):
    assert _key_shapes(tiny_checkpoint) == _key_shapes(release_dir)
    ours = json.loads((tiny_checkpoint / "config.json").read_text())
    release = json.loads((release_dir / "config.json").read_text())
    assert set(ours) == set(release)
    assert set(ours["text_config"]) == set(release["text_config"])
    assert set(ours["vision_config"]) == set(release["vision_config"])
    # As the release's code writes it: the embedding has no rows for <image> and <pad>, text_config says more.
    rows = _shape(tiny_checkpoint, "language_model.embed_tokens.weight")[0]
    assert rows == ours["image_token_index"] < ours["text_config"]["vocab_size"]
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
    config["vision_config"]["intermediate_size"] = 96
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
    with pytest.raises(DeviceError, match="unsupported dtype 'int8'; use one of float32, bfloat16, float16"):
        load_model(tiny_checkpoint, dtype="int8")
    with pytest.raises(DeviceError, match="unsupported dtype torch.int8"):
        Encoder.from_pretrained(tiny_checkpoint, dtype=torch.int8, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_cuda_device_says_so(tiny_checkpoint):
    with pytest.raises(DeviceError, match="this machine has no CUDA device"):
        Encoder.from_pretrained(tiny_checkpoint, device="cuda")


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


# -- checkpoint profiles (the release builds its LM from NV-Embed-v1's config, not text_config) -------------------


def _edit_config(src: Path, dst: Path, edit) -> Path:
    _copy(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    edit(raw)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize(("field", "value", "message"), [
    ("hidden_size", 128, "text_config.hidden_size gives 128 but language_model.embed_tokens.weight"),
    ("intermediate_size", 100, "text_config.intermediate_size gives 100 but language_model.layers.0.mlp.gate_proj"),
    ("num_attention_heads", 8, "text_config.num_key_value_heads × head_dim (head_dim 8: text_config.head_dim, else "
     "hidden_size / num_attention_heads) gives 16 but"),
    ("num_key_value_heads", 4, "num_key_value_heads × head_dim (head_dim 16: text_config.head_dim, else hidden_size "
     "/ num_attention_heads) gives 64 but language_model.layers.0.self_attn.k_proj.weight has shape (32, 64)"),
    ("num_hidden_layers", 3, "text_config.num_hidden_layers is 3 but the weights have 2 language-model layers"),
])
def test_config_and_weights_that_no_profile_explains_name_the_field(release_dir, tmp_path, field, value, message):
    bad = _edit_config(release_dir, tmp_path / "bad", lambda raw: raw["text_config"].update({field: value}))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(bad)


def test_unknown_retriever_is_refused_not_fetched(release_dir, tmp_path):
    bad = _edit_config(release_dir, tmp_path / "bad", lambda raw: raw.update(retriever="someone/Other-Embed"))
    with pytest.raises(CheckpointError, match="retriever 'someone/Other-Embed' is not a known checkpoint profile"):
        load_model(bad)


def test_nv_embed_profile_overrides_text_config(release_encoder):
    text = release_encoder.model.language_model.config
    assert (text.vocab_size, text.rope_parameters["rope_theta"], text.sliding_window) == (32000, 10000.0, None)
    assert release_encoder.model.latent_attention_model.cross_attend_blocks[0].fn.heads == 8


def test_without_a_retriever_text_config_is_what_runs(release_dir, tmp_path):
    plain = _edit_config(release_dir, tmp_path / "plain", lambda raw: raw.pop("retriever"))
    model, _ = load_model(plain)
    assert model.language_model.config.rope_parameters["rope_theta"] == 1e6
    assert model.language_model.config.vocab_size == 32000  # rows always come from the weights


def test_pad_id_is_embedded_as_eos_like_the_release(release_encoder):
    model = release_encoder.model
    eos, pad = torch.tensor([[1, 415, 2, 2]]), torch.tensor([[1, 415, 32001, 32001]])
    mask = torch.ones_like(eos)
    with torch.inference_mode():
        torch.testing.assert_close(model(pad, mask, mask), model(eos, mask, mask), atol=0, rtol=0)


def test_export_writes_the_release_layout_and_loads_back_identically(release_encoder, release_dir, tmp_path):
    docs = ["  indented text", {"img": str(release_dir / "input_0.png"), "txt": "\nstarts with a newline"}]
    before = release_encoder.encode_documents(docs)
    release_encoder.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text()) == \
        json.loads((release_dir / "config.json").read_text())
    assert _shape(tmp_path / "export", "language_model.embed_tokens.weight") == (32000, 64)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "export" / name).read_bytes() == (release_dir / name).read_bytes(), name
    again = Encoder.from_pretrained(tmp_path / "export", dtype="float32", device="cpu")
    np.testing.assert_array_equal(again.encode_documents(docs), before)


# -- dtypes ---------------------------------------------------------------------------------------------------


def _frequencies(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf for name, buf in model.named_buffers() if name.endswith("inv_freq")}


def test_rotary_frequencies_stay_float32_in_bfloat16(release_dir):
    reference = _frequencies(load_model(release_dir, dtype="float32")[0])
    model, _ = load_model(release_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    for casted in (model, model.to(torch.float16), model.half().bfloat16()):
        frequencies = _frequencies(casted)
        assert frequencies and set(frequencies) == set(reference)
        for name, buf in frequencies.items():
            assert buf.dtype == torch.float32, name
            torch.testing.assert_close(buf, reference[name], atol=0, rtol=0)


def test_no_split_modules_keep_decoder_clip_layers_and_pooling_whole(release_encoder):
    from mmembed_rag.modeling.checkpoint import no_split_modules

    names = no_split_modules(release_encoder.model)
    assert {"MistralDecoderLayer", "CLIPEncoderLayer", "LatentAttentionPooling"} <= set(names)


def test_device_map_loads_and_embeds_identically(release_dir, release_encoder):
    docs = ["a red bus", {"img": str(release_dir / "input_1.png")}]
    for device_map in ("auto", {"": "cpu"}):
        spread = Encoder.from_pretrained(release_dir, dtype="float32", device_map=device_map)
        np.testing.assert_allclose(spread.encode_documents(docs), release_encoder.encode_documents(docs), atol=1e-6)


# --- damaged checkpoints (issue 11): a CheckpointError naming the file, never a library's own exception ---------


def _shard_with(ckpt: Path, suffix: str) -> Path:
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            if any(k.endswith(suffix) for k in handle.keys()):
                return shard
    raise KeyError(suffix)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard_names_the_file(tiny_checkpoint, tmp_path, damage):
    # Before: safetensors' SafetensorError ("Error while deserializing header: ..."), no CheckpointError.
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = _shard_with(ckpt, "latents")
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(shard))}: unreadable safetensors shard "
                                              r"\(Error while deserializing header: .+\)$"):
        Encoder.from_pretrained(ckpt, device="cpu")


def test_one_dimensional_latents_name_the_shard(tiny_checkpoint, tmp_path):
    # Before: "ValueError: too many values to unpack" from the pooling sizes.
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = _shard_with(ckpt, "latents")
    state = load_file(shard)
    key = next(k for k in state if k.endswith("latents"))
    state[key] = state[key].flatten().contiguous()
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(shard))}: latent-attention weight "
                                              rf"latent_attention_model\.latents has shape \({state[key].numel()},\), "
                                              r"expected a non-empty 2-D matrix$"):
        load_model(ckpt)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda raw: raw["text_config"].update(hidden_size="32"),
     r"not a valid LLaVA-NeXT config \(StrictDataclassFieldValidationError: Validation error for field "
     r"'hidden_size': TypeError: Field 'hidden_size' expected int, got str \(value: '32'\)\)$"),
    (lambda raw: raw.update(text_config=[1]),
     r"not a valid LLaVA-NeXT config \(StrictDataclassFieldValidationError: Validation error for field "
     r"'text_config'.*\)$"),
    (lambda raw: (raw.pop("retriever"), raw.update(latent_attention_heads="8")),
     r"latent_attention_heads must be a positive int, got '8'$"),
    (lambda raw: raw.update(retriever=["nvidia/NV-Embed-v1"]),
     r"retriever \['nvidia/NV-Embed-v1'\] is not a known checkpoint profile"),
])
def test_config_field_of_the_wrong_type_names_the_file(release_dir, tmp_path, edit, message):
    # Before: huggingface_hub's StrictDataclassFieldValidationError, a ValueError from int("x"), a TypeError.
    bad = _edit_config(release_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(bad / 'config.json'))}: {message}"):
        load_model(bad)


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2]", r"expected a JSON object, got list"),
    (None, r"unreadable \(\[Errno 21\] Is a directory: .*\)"),
])
def test_config_json_that_is_not_an_object_or_not_a_file(tiny_checkpoint, tmp_path, content, message):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    if content is None:
        (ckpt / "config.json").unlink()
        (ckpt / "config.json").mkdir()  # before: a raw IsADirectoryError
    else:
        (ckpt / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(ckpt / 'config.json'))}: {message}$"):
        load_model(ckpt)


@pytest.mark.parametrize(("content", "message"), [
    ("[]", r"not a valid safetensors index \(TypeError: list indices must be integers or slices, not str\)"),
    ('{"weight_map": {"a": 3}}', r"weight_map must map weight names to shard file names"),
])
def test_damaged_index_names_the_file(tiny_checkpoint, tmp_path, content, message):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(ckpt / 'model.safetensors.index.json'))}: "
                                              rf"{message}$"):
        load_model(ckpt)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_shard_names_the_file(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = next(ckpt.glob("model-*.safetensors"))
    shard.chmod(0)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(shard))}: unreadable safetensors shard"):
        load_model(ckpt)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", r"invalid JSON \(Expecting property name enclosed in double quotes: .*\)"),
    ("[0.5, 0.5, 0.5]", r"expected a JSON object, got list"),
    ('{"image_std": [0, 0, 0]}', r"image_std must be 3 finite numbers > 0 \(one per RGB channel\), got \[0, 0, 0\]"),
    ('{"image_std": [0.2, 0.2]}', r"image_std must be 3 finite numbers > 0 \(one per RGB channel\), got \[0.2, 0.2\]"),
    ('{"image_mean": [NaN, 0, 0]}', r"image_mean must be 3 finite numbers \(one per RGB channel\), got \[nan, 0, 0\]"),
    ('{"rescale_factor": 0}', r"rescale_factor must be a finite number > 0, got 0"),
    ('{"resample": 42}', r"resample must be a PIL resampling filter \(0-5\), got 42"),
])
def test_damaged_preprocessor_config_names_the_file(tiny_checkpoint, tmp_path, content, message):
    # Before: a raw JSONDecodeError, or an encoder whose image embeddings are NaN (std 0) or garbage.
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "preprocessor_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(ckpt / 'preprocessor_config.json'))}: {message}$"):
        Encoder.from_pretrained(ckpt, device="cpu")


def test_shard_the_os_refuses_to_open_names_the_file(tiny_checkpoint, tmp_path, monkeypatch):
    # The same as the test above where it cannot run (as root every file is readable): the OS's refusal is simulated
    # at the one call that opens shards.
    import mmembed_rag.modeling.checkpoint as checkpoint

    def refuse(path: str, framework: str):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(checkpoint, "safe_open", refuse)
    shard = sorted(tiny_checkpoint.glob("model-*.safetensors"))[0]
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(shard))}: unreadable safetensors shard "
                                              rf"\(\[Errno 13\] Permission denied: '{re.escape(str(shard))}'\)$"):
        load_model(tiny_checkpoint)
