"""The staged recipe end to end on tiny data (a few steps per stage), its cache, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmembed_rag import Encoder
from mmembed_rag.finetune.__main__ import main as cli
from mmembed_rag.finetune.pipeline import Benchmark, MiningOptions, PipelineResult, run_pipeline

STEPS = {"max_steps": 2, "batch_size": 4, "warmup_steps": 0}
SUMMARY_KEYS = {"recall@5", "modality_accuracy", "multimodal_recall@5", "local_recall@5", "text_ndcg@10", "per_task"}


def _run(workdir: Path) -> PipelineResult:
    return run_pipeline(workdir, stage1=STEPS, stage2=STEPS, stage3=STEPS, benchmark=Benchmark(n_train=12, n_test=6),
                        mining=MiningOptions(top_k=10, c2_start=5, num_negatives=2), show_progress=False)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineResult, PipelineResult]:
    workdir = tmp_path_factory.mktemp("pipeline")
    return _run(workdir), _run(workdir)  # the second run finds every step in the cache


def test_every_stage_trains_evaluates_and_writes_its_outputs(pipeline_run: tuple[PipelineResult, ...]) -> None:
    result, _ = pipeline_run
    assert list(result.stages) == ["stage1", "stage2", "stage3"]
    for stage in result.stages.values():
        assert (stage.model_dir / "config.json").is_file()
        assert (stage.model_dir.parent / "stage.json").is_file() and (stage.model_dir.parent / "eval.md").is_file()
        assert {(r.task, r.pool) for r in stage.report.tasks} >= {("mscoco_t2i", "global"), ("mscoco_t2i", "local")}
    assert result.stages["stage2"].args["model_path"] == str(result.stages["stage1"].model_dir)
    assert result.stages["stage3"].args["model_path"] == str(result.stages["stage2"].model_dir)
    assert result.stages["stage3"].args["task_mixing"]["text"] == 1.0
    mined = [json.loads(line) for line in Path(result.mining["queries"]).read_text().splitlines()]
    assert mined and all(q["neg_cand_list"] for q in mined)  # mined, or stage 1's random ones as a fallback
    assert set(result.mining["counts"]) == {q for q in result.summary()["stage1"]["per_task"]}
    assert json.loads((result.workdir / "pipeline_result.json").read_text())["final_model"] == str(result.final_model)


def test_the_report_has_every_key(pipeline_run: tuple[PipelineResult, ...]) -> None:
    summary = pipeline_run[0].summary()
    assert set(summary) == {"stage1", "stage2", "stage3"}
    for stage in summary.values():
        assert set(stage) == SUMMARY_KEYS
        assert all(0.0 <= stage[k] <= 1.0 for k in SUMMARY_KEYS - {"per_task"})
        assert len(stage["per_task"]) == 8
        for pools in stage["per_task"].values():
            assert set(pools) == {"local", "global"}
            assert set(pools["global"]) == {"recall@5", "modality_accuracy"}


def test_the_exported_model_loads_and_encodes(pipeline_run: tuple[PipelineResult, ...]) -> None:
    result, _ = pipeline_run
    encoder = Encoder.from_pretrained(result.final_model, device="cpu")
    assert (result.final_model / "README.md").read_text().count("stage3") >= 1
    emb = encoder.encode_queries(["a small red solid circle in the center"], instruction="mscoco_t2i")
    assert emb.shape == (1, encoder.dim) and np.isclose(np.linalg.norm(emb), 1.0, atol=1e-5)
    trained = Encoder.from_pretrained(result.stages["stage3"].model_dir, device="cpu")
    again = trained.encode_queries(["a small red solid circle in the center"], instruction="mscoco_t2i")
    np.testing.assert_allclose(emb, again, atol=1e-5)


def test_a_rerun_reuses_every_step(pipeline_run: tuple[PipelineResult, ...]) -> None:
    first, second = pipeline_run
    assert not any(s.cached for s in first.stages.values())
    assert all(s.cached for s in second.stages.values())
    assert {n: s.key for n, s in first.stages.items()} == {n: s.key for n, s in second.stages.items()}
    assert second.summary() == first.summary()
    assert not {"stage1", "mining", "stage2", "stage3", "export"} & set(second.timings)


def test_cli_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "mmembed_rag.finetune", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for command in ("synth", "train", "mine", "eval", "export", "pipeline"):
        assert command in out.stdout


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "no-data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "manifest.json" in err[0]
    recipe = Path(__file__).resolve().parents[2] / "finetune" / "recipes" / "stage1.yaml"
    assert cli(["train", "--config", str(recipe), "--model_path", "m", "--output_dir", "o", "--lora.rnk", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.rank" in err[0]  # the did-you-mean hint
    with pytest.raises(SystemExit) as exit_info:
        cli(["pipeline"])  # --workdir missing: argparse's error, also one line
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_recipe_runs_on_a_qwen3_vl_base(tmp_path: Path) -> None:
    """Training, mining, evaluation and export are backbone-independent: a Qwen3-VL-Embedding base goes through."""
    import torch
    from safetensors import safe_open

    from mmembed_rag.testing import make_tiny_qwen3_vl

    base = make_tiny_qwen3_vl(tmp_path / "base", dtype=torch.float32)
    result = run_pipeline(tmp_path / "run", base_model=base, stage1=STEPS, stage2=STEPS, stage3=STEPS,
                          benchmark=Benchmark(n_train=12, n_test=6), show_progress=False,
                          mining=MiningOptions(top_k=10, c2_start=5, num_negatives=2))
    assert set(result.stages) == {"stage1", "stage2", "stage3"} and result.mining["counts"]
    final = Encoder.from_pretrained(result.final_model, device="cpu")
    assert final.family.name == "qwen3_vl"
    with safe_open(str(next(result.final_model.glob("*.safetensors"))), "pt") as handle:
        keys = set(handle.keys())
    with safe_open(str(base / "model.safetensors"), "pt") as handle:
        assert keys == set(handle.keys())  # the released key names: LoRA merged, nothing renamed
    texts = ["a red circle", "the glucose is stored in the plant"]
    before = Encoder.from_pretrained(base, device="cpu").encode_documents(texts)
    assert not np.allclose(final.encode_documents(texts), before, atol=1e-4)  # the adapters were trained and merged
    stage3 = Encoder.from_pretrained(result.stages["stage3"].model_dir, device="cpu")
    np.testing.assert_allclose(final.encode_documents(texts), stage3.encode_documents(texts), atol=1e-6)
