"""Every benchmark script runs on its smallest setting and writes its figures with the date and machine.

A smoke test only: a broken script fails here; the goals are checked by running the scripts themselves
(see benchmarks/README.md), on their full settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# script -> arguments of its smallest run (the result JSON path is appended)
SMOKE = {
    "encode_pipeline.py": ["--quick", "--json"],
    "gpu_encode.py": ["--dry-run", "--json"],
    "rerank.py": ["--quick", "--json"],
    "rerank_quality.py": ["--quick", "--json"],
    "modality_bias.py": ["--quick", "--split", "val", "--no-control", "--out"],
    "search_overhead.py": ["--quick", "--json"],
    "chroma_ingest.py": ["--quick", "--json"],
    "langchain_ingest.py": ["--quick", "--json"],
    "llama_index_ingest.py": ["--quick", "--json"],
    "qwen3_vl_encode.py": ["--quick", "--json"],
}


def test_every_benchmark_has_a_smoke_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")} - {"gpu_check.py"}
    assert scripts == set(SMOKE)  # gpu_check.py: tests/test_gpu_check.py


@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_run(script, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *SMOKE[script], str(out)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["measured_at"] and figures["machine"]["cpus"] >= 1, sorted(figures)
