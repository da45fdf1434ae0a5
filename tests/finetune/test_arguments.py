"""Training arguments: recipes load, overrides apply, unknown keys and bad values are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmembed_rag.finetune.arguments import ArgumentsError, TrainArguments, load_arguments, parse_overrides
from mmembed_rag.finetune.train import main

RECIPES = Path(__file__).resolve().parents[2] / "finetune" / "recipes"
REQUIRED = {"model_path": "ckpt", "output_dir": "out"}


@pytest.mark.parametrize("name", ["stage1.yaml", "stage2.yaml", "stage3_text.yaml"])
def test_recipes_load(name: str) -> None:
    args = load_arguments(RECIPES / name, REQUIRED)
    assert args.lora.enabled and args.max_steps <= 200 and args.max_length <= 256  # CPU-sized
    assert args.data_factory == "mmembed_rag.finetune.sampler:training_data"
    assert args.mixed_precision == "no"
    assert TrainArguments.from_dict(args.to_dict()) == args  # round trip


def test_stage_recipes_differ_where_the_method_says() -> None:
    stage1, stage2, stage3 = (load_arguments(RECIPES / n, REQUIRED) for n in
                              ("stage1.yaml", "stage2.yaml", "stage3_text.yaml"))
    assert stage2.num_negatives > stage1.num_negatives  # hard negatives
    assert stage3.task_mixing and "text" in stage3.task_mixing  # text pairs mixed with multimodal data


def test_overrides_nested_and_typed(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_path: a\noutput_dir: b\nlora: {rank: 4}\nmixed_precision: no\n")
    args = load_arguments(recipe, ["--lora.rank", "16", "--learning_rate=2e-5", "--task_mixing", "{text: 2}",
                                   "--lora.target_modules", "[q_proj, v_proj]", "--gradient_cache_chunk_size", "null"])
    assert args.lora.rank == 16 and args.lora.alpha == 32.0
    assert args.learning_rate == 2e-5 and args.task_mixing == {"text": 2.0}
    assert args.lora.target_modules == ["q_proj", "v_proj"] and args.gradient_cache_chunk_size is None
    assert args.mixed_precision == "no"  # YAML's bare `no` is read as false
    stage1 = load_arguments(RECIPES / "stage1.yaml", ["--model_path", "a", "--output_dir", "b",
                                                      "--data_options.queries", "q.jsonl"])
    assert stage1.data_options == {"negatives": "random", "queries": "q.jsonl"}  # dotted keys merge


def test_unknown_keys_list_the_valid_ones(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_path: a\noutput_dir: b\nlearning_rte: 0.1\n")
    with pytest.raises(ArgumentsError) as err:
        load_arguments(recipe)
    message = str(err.value)
    assert str(recipe) in message and "'learning_rte'" in message and "did you mean 'learning_rate'" in message
    assert "valid keys:" in message and "lora.rank" in message and "temperature" in message
    with pytest.raises(ArgumentsError, match=r"'lora.rnk'.*valid keys: lora.alpha"):
        load_arguments(None, {**REQUIRED, "lora": {"rnk": 2}})


@pytest.mark.parametrize(("override", "match"), [
    ({"batch_size": "big"}, "batch_size: expected an integer"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"mixed_precision": "fp8"}, "expected one of 'no', 'bf16', 'fp16'"),
    ({"full_finetune": True}, "exclusive"),
    ({"lora": {"enabled": False}, "train_pooling": False}, "nothing to train"),
    ({"temperature": -1}, "temperature must be > 0"),
    ({"data_factory": "no_colon"}, "package.module:function"),
])
def test_invalid_values(override: dict, match: str) -> None:
    with pytest.raises(ArgumentsError, match=match):
        load_arguments(None, {**REQUIRED, **override})


def test_missing_required_keys() -> None:
    with pytest.raises(ArgumentsError, match="missing required key.*output_dir"):
        load_arguments(None, {"model_path": "a"})


def test_parse_overrides_errors() -> None:
    assert parse_overrides(["--a.b=1", "--c", "x"]) == {"a.b": 1, "c": "x"}
    with pytest.raises(ArgumentsError, match="needs a value"):
        parse_overrides(["--max_steps"])
    with pytest.raises(ArgumentsError, match="expected --key value"):
        parse_overrides(["max_steps", "3"])


def test_cli_reports_bad_keys_without_a_traceback(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(RECIPES / "stage1.yaml"), "--model_path", "a", "--output_dir", "b", "--bogus", "1"])
    assert exit_info.value.code == 2
    assert "unknown key(s) 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(RECIPES / "stage1.yaml"), "--model_path", "a", "--output_dir", "b",
              "--data_factory", "null"])
    assert "no training data: set data_factory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(RECIPES / "stage1.yaml"), "--model_path", "a", "--output_dir", "b",
              "--data_factory", "mmembed_rag.finetune.sampler:no_such_function"])
    assert "cannot be loaded" in capsys.readouterr().err
