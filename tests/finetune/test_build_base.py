"""Bi-encoder bases from pretrained parts: every layout's key mapping, exact reproduction, accounting, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mmembed_rag import Encoder
from mmembed_rag.errors import CheckpointError
from mmembed_rag.finetune.build_base import BASE_PARTS_FILE, build_base
from mmembed_rag.testing import make_tiny_checkpoint, make_tiny_nv_embed, make_tiny_qwen3_vl, make_tiny_reranker

FOUR_X = Path(__file__).parents[1] / "fixtures" / "llava-next-4x-layout"
ITEMS = ["a red circle", {"img": Image.new("RGB", (60, 40), (200, 20, 20))},
         {"txt": "the same in blue", "img": Image.new("RGB", (30, 50), (20, 20, 200))}]


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    reference = make_tiny_checkpoint(root / "reference", dtype=torch.float32)  # seed 0, as the 4.x fixture's
    return {"reference": reference,
            "generative": make_tiny_reranker(root / "generative", vision_from=reference, dtype=torch.float32),
            "embedder": make_tiny_nv_embed(root / "embedder", from_checkpoint=reference)}


def _keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys |= set(handle.keys())
    return keys


@pytest.mark.parametrize("layout", ["transformers-5", "transformers-4.57"])
def test_generative_plus_embedder_reproduces_the_reference_exactly(parts, layout, tmp_path):
    generative = parts["generative"] if layout == "transformers-5" else FOUR_X
    out = build_base(tmp_path / "base", generative=generative, text_embedder=parts["embedder"])
    expected = Encoder.from_pretrained(parts["reference"], device="cpu").encode_queries(ITEMS, instruction="mscoco_t2i")
    got = Encoder.from_pretrained(out, device="cpu").encode_queries(ITEMS, instruction="mscoco_t2i")
    assert np.abs(got - expected).max() < 1e-4
    assert _keys(out) == _keys(parts["reference"])  # the release layout, key for key


def test_every_key_is_accounted_for(parts, tmp_path):
    out = build_base(tmp_path / "base", generative=parts["generative"], text_embedder=parts["embedder"])
    record = json.loads((out / BASE_PARTS_FILE).read_text())
    assert set(record["taken"]) == {"vision tower", "projector", "image newline", "language model", "pooling head"}
    assert str(parts["embedder"]) in record["taken"]["language model"]
    dropped = " ".join(record["dropped"])
    assert "language_model.lm_head.weight" in dropped and "language model" in dropped
    assert "## Base parts" in (out / "README.md").read_text()


@pytest.mark.parametrize("pooling, kind", [("mean", "mean"), ("last_token", "last_token"),
                                           ({"num_latents": 4, "heads": 2}, "latent_attention")])
def test_a_fresh_pooling_head_without_an_embedder(parts, tmp_path, pooling, kind):
    out = build_base(tmp_path / "base", generative=parts["generative"], pooling=pooling)
    encoder = Encoder.from_pretrained(out, device="cpu")
    assert encoder.model.pooling == kind
    assert encoder.encode_documents(ITEMS).shape == (3, 64)


def test_qwen3_vl_instruct_becomes_an_embedder_with_the_same_weights(tmp_path):
    instruct = make_tiny_qwen3_vl(tmp_path / "instruct", kind="instruct", dtype=torch.float32)
    out = build_base(tmp_path / "base", generative=instruct)
    assert _keys(out) == _keys(instruct) - {"lm_head.weight"}
    for key in ("model.language_model.layers.0.self_attn.q_proj.weight", "model.visual.blocks.0.attn.qkv.weight"):
        with safe_open(str(instruct / "model.safetensors"), "pt") as a, \
                safe_open(str(next(out.glob("*.safetensors"))), "pt") as b:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3VLForEmbedding"]
    # the same computation as the embedder layout of the same weights (whose parity with the official is tested)
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    encoder = Encoder.from_pretrained(out, device="cpu")
    assert encoder.family.name == "qwen3_vl" and (out / "chat_template.json").is_file()
    np.testing.assert_array_equal(encoder.encode_documents(ITEMS),
                                  Encoder.from_pretrained(twin, device="cpu").encode_documents(ITEMS))


def test_unknown_keys_are_an_error_naming_them(parts, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "generative"
    shutil.copytree(parts["generative"], broken)
    file = next(broken.glob("*.safetensors"))
    weights = load_file(str(file))
    weights["adapter.extra.weight"] = torch.zeros(2)
    save_file(weights, str(file))
    with pytest.raises(CheckpointError, match=r"1 weight\(s\) no rule covers, e.g. adapter.extra.weight"):
        build_base(tmp_path / "base", generative=broken, pooling="mean")
    assert not (tmp_path / "base").exists()  # nothing half-written


def test_a_missing_part_is_an_error(parts, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "generative"
    shutil.copytree(parts["generative"], broken)
    file = next(broken.glob("*.safetensors"))
    weights = {k: v for k, v in load_file(str(file)).items() if not k.startswith("multi_modal_projector.")}
    save_file(weights, str(file))
    with pytest.raises(CheckpointError, match="no weights for the projector"):
        build_base(tmp_path / "base", generative=broken, pooling="mean")


@pytest.mark.parametrize("kwargs, error, message", [
    ({}, ValueError, "pooling= is needed without text_embedder="),
    ({"pooling": "max"}, ValueError, "pooling must be one of latent_attention, mean, last_token or a dict, got 'max'"),
    ({"pooling": {"num_latents": 0}}, ValueError, r"pooling\['num_latents'\] must be a positive int, got 0"),
    ({"pooling": {"latents": 4}}, ValueError, "pooling has unknown key"),
])
def test_bad_pooling_arguments(parts, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        build_base(tmp_path / "base", generative=parts["generative"], **kwargs)


def test_embedder_and_pooling_together_are_refused(parts, tmp_path):
    with pytest.raises(ValueError, match="with text_embedder= its own head is used"):
        build_base(tmp_path / "base", generative=parts["generative"], text_embedder=parts["embedder"], pooling="mean")


def test_an_existing_checkpoint_is_not_overwritten(parts, tmp_path):
    shutil.copytree(parts["reference"], tmp_path / "base")
    with pytest.raises(FileExistsError, match="exists and is not an empty directory"):
        build_base(tmp_path / "base", generative=parts["generative"], pooling="mean")


def test_an_encoder_checkpoint_is_not_a_generative_one(parts, tmp_path):
    with pytest.raises(CheckpointError, match="no rule covers|no weights for"):
        build_base(tmp_path / "base", generative=parts["reference"], pooling="mean")


def test_the_base_trains_with_the_pipeline(parts, tmp_path):
    from mmembed_rag.finetune.pipeline import Benchmark, MiningOptions, run_pipeline

    base = build_base(tmp_path / "base", generative=parts["generative"], text_embedder=parts["embedder"])
    steps = {"max_steps": 2, "batch_size": 4, "warmup_steps": 0}
    result = run_pipeline(tmp_path / "run", base_model=base, stage1=steps, stage2=steps, stage3=steps,
                          benchmark=Benchmark(n_train=12, n_test=6), show_progress=False,
                          mining=MiningOptions(top_k=10, c2_start=5, num_negatives=2))
    card = (result.final_model / "README.md").read_text()
    assert "## Base parts" in card and str(parts["embedder"]) in card


def test_the_command_line_builds_a_base_and_reports_errors_in_one_line(parts, tmp_path, capsys):
    from mmembed_rag.finetune.__main__ import main

    assert main(["build-base", "--output", str(tmp_path / "base"), "--generative", str(parts["generative"]),
                 "--pooling", "latent_attention", "--latents", "4", "--latent-heads", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pooling"] == "latent_attention" and "fresh latent attention" in report["taken"]["pooling head"]
    assert main(["build-base", "--output", str(tmp_path / "other"), "--generative", str(parts["generative"]),
                 "--latents", "4"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --latents and --latent-heads size a fresh head: add --pooling "
                                               "latent_attention")


def test_a_qwen3_vl_reranker_from_the_bi_encoder_plus_the_bases_lm_head(tmp_path):
    from mmembed_rag import MLLMReranker
    from mmembed_rag.finetune.reranker_init import reranker_from_encoder

    instruct = make_tiny_qwen3_vl(tmp_path / "instruct", kind="instruct", dtype=torch.float32)
    encoder = build_base(tmp_path / "base", generative=instruct)
    out = reranker_from_encoder(encoder, tmp_path / "reranker", lm_head_from=instruct)
    assert _keys(out) == _keys(instruct)
    candidates = ["a red circle", {"img": Image.new("RGB", (64, 64), (200, 0, 0))}]
    rebuilt = MLLMReranker.from_pretrained(out, device="cpu").score_logits("red", candidates)
    original = MLLMReranker.from_pretrained(instruct, device="cpu").score_logits("red", candidates)
    np.testing.assert_array_equal(rebuilt, original)  # the same weights: the bi-encoder's and the base's head


def test_a_llava_reranker_takes_the_bases_lm_head(parts, tmp_path):
    from mmembed_rag.finetune.reranker_init import reranker_from_encoder

    out = reranker_from_encoder(parts["reference"], tmp_path / "reranker", lm_head_from=parts["generative"])
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as got, \
            safe_open(str(next(parts["generative"].glob("*.safetensors"))), "pt") as base:
        head = base.get_tensor("language_model.lm_head.weight")
        key = next(k for k in got.keys() if k.endswith("lm_head.weight"))
        assert torch.equal(got.get_tensor(key), head)


def test_an_lm_head_that_does_not_fit_is_refused(parts, tmp_path):
    from mmembed_rag.finetune.reranker_init import reranker_from_encoder

    other = make_tiny_reranker(tmp_path / "wide", hidden_size=32, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"LM head of shape \(\d+, 32\) does not fit a \d+-row, 64-wide"):
        reranker_from_encoder(parts["reference"], tmp_path / "reranker", lm_head_from=other)


def test_one_command_from_a_generative_checkpoint_to_an_evaluated_export(tmp_path, capsys):
    from mmembed_rag.finetune.__main__ import main

    instruct = make_tiny_qwen3_vl(tmp_path / "instruct", kind="instruct", dtype=torch.float32)
    code = main(["pipeline", "--workdir", str(tmp_path / "run"), "--generative", str(instruct), "--n-train", "12",
                 "--n-test", "6", "--top-k", "10", "--c2-start", "5", "--num-negatives", "2", "--no-progress",
                 *[arg for stage in ("stage1", "stage2", "stage3")
                   for arg in (f"--{stage}", "max_steps=2", f"--{stage}", "batch_size=4")]])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    final = Path(out.strip().splitlines()[-1].removeprefix("final model: "))
    assert "recall@5" in out.lower() or "R@5" in out
    assert Encoder.from_pretrained(final, device="cpu").family.name == "qwen3_vl"
    assert "## Base parts" in (final / "README.md").read_text()
