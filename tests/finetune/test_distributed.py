"""Two CPU processes (gloo, launched by torchrun) give the loss and gradients of one process with the whole batch.

The test launches this module as a worker (``python -m torch.distributed.run --nproc_per_node 2 -m
tests.finetune.test_distributed ...``); each rank writes its results to files that the test compares
with a single-process computation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from mmembed_rag.finetune.arguments import LoraArguments, TrainArguments
from mmembed_rag.finetune.collator import ContrastiveCollator
from mmembed_rag.finetune.examples import ContrastiveExample
from mmembed_rag.finetune.loss import InfoNCELoss
from mmembed_rag.finetune.train import build_model, contrastive_backward, train

from .test_train import tiny_examples

REPO = Path(__file__).resolve().parents[2]
N_QUERIES = 7  # split 4 / 3 over two processes: uneven shares must still give the global mean


def _examples() -> list[ContrastiveExample]:
    """Examples with 0, 1 or 2 negatives, so the processes hold different numbers of candidates."""
    return [ContrastiveExample(ex.query, ex.positive, ex.negatives[: i % 3], ex.task, ex.qid)
            for i, ex in enumerate(tiny_examples(N_QUERIES, negatives=2))]


def _model(ckpt: str):
    torch.manual_seed(0)
    encoder, model = build_model(TrainArguments(model_path=ckpt, output_dir="unused",
                                                lora=LoraArguments(rank=4, dropout=0.0)))
    with torch.no_grad():  # non-zero LoRA B, so every adapter weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return encoder, model


def _train_args(ckpt: str, out: Path) -> TrainArguments:
    return TrainArguments(model_path=ckpt, output_dir=str(out), batch_size=8, max_steps=2, learning_rate=1e-3,
                          lora=LoraArguments(rank=4, dropout=0.0), show_progress=False, seed=3)


def _results(model: torch.nn.Module, loss: torch.Tensor) -> dict:
    return {"loss": loss.detach(), "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                             if p.grad is not None}}


def _worker(ckpt: str, out: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, world
    encoder, model = _model(ckpt)
    model = accelerator.prepare(model)
    share = [_examples()[i] for i in np.array_split(np.arange(N_QUERIES), world)[rank]]
    for name, chunk in (("plain", None), ("cached", 3)):
        model.zero_grad(set_to_none=True)
        batch = ContrastiveCollator(encoder, chunk_size=chunk)(share).to(accelerator.device)
        loss = contrastive_backward(model, batch, InfoNCELoss(0.05), accelerator, gradient_cache=chunk is not None)
        torch.save(_results(accelerator.unwrap_model(model), loss), out / f"{name}-{rank}.pt")
    train(_train_args(ckpt, out / "train"), tiny_examples(16))


def test_two_processes_match_one(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.finetune.test_distributed", str(tiny_checkpoint), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    errors = [line for line in done.stderr.splitlines() if "Warning" not in line and "warnings.warn" not in line]
    assert done.returncode == 0, "\n".join(errors)[-8000:]

    encoder, model = _model(str(tiny_checkpoint))
    batch = ContrastiveCollator(encoder)(_examples())
    reference = _results(model, contrastive_backward(model, batch, InfoNCELoss(0.05)))
    for name in ("plain", "cached"):
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt") for r in range(2)]
        torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, reference["loss"], rtol=1e-5, atol=1e-5)
        for result in ranks:  # gradients were averaged across processes by DDP: every rank holds the global ones
            assert result["grads"].keys() == reference["grads"].keys()
            for key, ref in reference["grads"].items():
                scale = max(1.0, ref.abs().max().item())
                torch.testing.assert_close(result["grads"][key], ref, rtol=0, atol=1e-5 * scale, msg=key)

    # The whole loop: two processes sharing each global batch train what one process trains.
    single = train(_train_args(str(tiny_checkpoint), tmp_path / "single"), tiny_examples(16))
    one = {k: v for f in single.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    two = {k: v for f in (tmp_path / "train" / "model").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=2e-5, msg=key)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
