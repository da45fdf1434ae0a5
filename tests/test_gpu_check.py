"""benchmarks/gpu_check.py: its checks run on the CPU too (the GPU run itself needs CUDA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parity_check_passes_on_cpu(dtype):
    result = gpu_check.parity("mmembed-release-layout", dtype, device="cpu")
    assert result["passed"], result
    assert set(result["max_abs_diff"]) >= {"documents", "queries_with_instruction", "queries_without_instruction"}


def test_long_input_cosine_on_cpu():
    result = gpu_check.long_input(device="cpu")
    assert result["tokens"] > 3500 and result["passed"], result


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_script_refuses_to_run_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()
