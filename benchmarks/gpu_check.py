"""The release-fidelity checks that need a GPU, in one run: parity on CUDA, long-input bf16, throughput, reranker.

1. Parity: every fixture under ``tests/fixtures`` loaded on CUDA in float32 (TF32 off) and bfloat16 through the
   public ``Encoder`` API against the embeddings the release's own code computed (float32: 1e-4; bfloat16: 5e-3).
2. Long input: a 3,500-token text with an image (release-layout fixture), bfloat16 on CUDA vs float32 on the CPU:
   cosine of the two embeddings (bf16 rotary frequencies or a bf16 pooling sum would show here).
3. ``gpu_encode.py`` (the full 8.2B shape, random bf16 weights): items/s and MFU at batch 1, 8 and 32.
4. ``rerank.py --device cuda``: cached vs naive scores (equality) and speed.

Writes one JSON (``--out``); ``benchmarks/gpu_check.sh`` runs it. Exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmembed_rag import Encoder

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PARITY = ("mmembed-tiny-reference", "mmembed-release-layout")


def _items(entries: list[dict], root: Path) -> list[dict]:
    return [{k: (str(root / v) if k == "img" else v) for k, v in e.items()} for e in entries]


def parity(name: str, dtype: str, device: str = "cuda") -> dict[str, Any]:
    """Max abs difference to the release's embeddings of each array of one fixture."""
    root = FIXTURES / name
    inputs = json.loads((root / "inputs.json").read_text())
    with np.load(root / "expected.npz") as data:
        expected = {k: data[k] for k in data.files}
    encoder = Encoder.from_pretrained(root, device=device, dtype=dtype, max_length=inputs["max_length"])
    docs = _items(inputs["documents"], root)
    queries = _items(inputs["queries"], root)
    got = {"documents": encoder.encode_documents(docs, batch_size=len(docs)),
           "documents_one_by_one": np.concatenate([encoder.encode_documents([d]) for d in docs]),
           "queries_with_instruction": encoder.encode_queries(queries, instruction=inputs["instruction"]),
           "queries_without_instruction": encoder.encode_queries(queries)}
    if dtype == "bfloat16" and "documents_bfloat16" in expected:
        chosen = inputs["documents_bfloat16"]
        got["documents_bfloat16"] = got["documents_one_by_one"][chosen]
    tol = 1e-4 if dtype == "float32" else 5e-3
    diffs = {k: float(np.abs(v - expected[k]).max()) for k, v in got.items()}
    return {"max_abs_diff": diffs, "tolerance": tol, "passed": all(d <= tol for d in diffs.values())}


def long_input(device: str = "cuda") -> dict[str, Any]:
    """bf16 on ``device`` vs fp32 CPU cosine for a 3,500-token text plus an image."""
    root = FIXTURES / "mmembed-release-layout"
    cpu = Encoder.from_pretrained(root, device="cpu", dtype="float32")
    prompts = cpu.family.prompts
    text, _ = prompts.tokens.truncate("Photosynthesis converts light energy into chemical energy. " * 600, 3500)
    item = [{"txt": text, "img": str(root / "input_1.png")}]
    tokens = cpu.token_count(prompts.document(text, True))
    reference = cpu.encode_documents(item)
    half = Encoder.from_pretrained(root, device=device, dtype="bfloat16").encode_documents(item)
    cosine = float((reference * half).sum())
    return {"tokens": tokens, "device": device, "cosine_bf16_vs_fp32_cpu": cosine, "goal": ">= 0.999",
            "passed": cosine >= 0.999}


def run_script(script: str, args: list[str], timeout: int) -> dict[str, Any]:
    """Run a benchmark script with ``--json``; its figures, or the failure."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
                              capture_output=True, text=True, timeout=timeout)
        record: dict[str, Any] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
        if out.is_file():
            record["result"] = json.loads(out.read_text())
        else:
            record["stderr_tail"] = proc.stderr[-3000:]
        return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON of figures")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "no CUDA device: torch.cuda.is_available() is False\n")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity means float32 arithmetic
    torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "parity": {f"{name}/{dtype}": parity(name, dtype) for name in PARITY for dtype in ("float32", "bfloat16")},
        "long_input": long_input(),
    }
    figures["gpu_encode"] = run_script("gpu_encode.py", ["--batch-sizes", "1", "8", "32"], timeout=300)
    figures["rerank"] = run_script("rerank.py", ["--device", "cuda"], timeout=120)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    figures["passed"] = all(p["passed"] for p in figures["parity"].values()) and figures["long_input"]["passed"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
