"""The training loop: trains, exports a loadable model, resumes exactly, guards its output directory, CLI."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmembed_rag import Encoder
from mmembed_rag.finetune.arguments import LoraArguments, TrainArguments
from mmembed_rag.finetune.collator import ContrastiveCollator, plan_chunks
from mmembed_rag.finetune.examples import ContrastiveExample
from mmembed_rag.finetune.gradcache import embed
from mmembed_rag.finetune.synthetic import generate_benchmark
from mmembed_rag.finetune.train import latest_checkpoint, train
from mmembed_rag.items import MultimodalItem

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20),
           "purple": (140, 20, 160), "cyan": (20, 210, 210), "gray": (128, 128, 128), "black": (10, 10, 10)}
SHAPES = ["square", "circle", "star", "ring"]


def tiny_examples(n: int = 32, negatives: int = 1) -> list[ContrastiveExample]:
    """Caption -> image pairs (every second query also has an image), text negatives; deterministic."""
    names = list(COLOURS)
    out = []
    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        image = Image.new("RGB", (24 + i % 5, 20 + i % 3), COLOURS[colour])
        query = MultimodalItem(text=f"a {colour} {shape}", image=image if i % 2 else None,
                               instruction="Identify the image showcasing the described everyday scene.")
        negs = tuple(MultimodalItem(text=f"a {names[(i + k + 1) % len(names)]} {shape}") for k in range(negatives))
        out.append(ContrastiveExample(query, MultimodalItem(image=image, text=f"{shape}" if i % 3 == 0 else None),
                                      negs, task="t2i", qid=str(i)))
    return out


def _args(ckpt: Path, out: Path, **kw) -> TrainArguments:
    kw.setdefault("lora", LoraArguments(rank=4, alpha=8, dropout=0.0))
    base = dict(model_path=str(ckpt), output_dir=str(out), batch_size=8, max_steps=2, learning_rate=1e-3,
                show_progress=False, log_every=1)
    return TrainArguments(**{**base, **kw})


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


class _Killed(RuntimeError):
    pass


class _Sampler:
    """Deterministic global batches; raises after ``kill_after`` batches to simulate a crash."""

    def __init__(self, n: int, batch: int, kill_after: int | None = None) -> None:
        self.n, self.batch, self.kill_after, self.epochs = n, batch, kill_after, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        epoch = self.epochs[-1] if self.epochs else 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + epoch)).tolist()
        for k, start in enumerate(range(0, self.n - self.batch + 1, self.batch)):
            served = epoch * (self.n // self.batch) + k
            if self.kill_after is not None and served >= self.kill_after:
                raise _Killed(f"killed before batch {served}")
            yield order[start:start + self.batch]


def test_collator_embeds_like_the_encoder(tiny_encoder: Encoder) -> None:
    """Training inputs come from the Encoder's own prompt and collate code: same embeddings as encode_*."""
    examples = tiny_examples(5, negatives=2)
    batch = ContrastiveCollator(tiny_encoder, num_negatives=1)(examples)
    assert batch.num_queries == 5 and batch.num_items == 5 + 5 + 5
    with torch.no_grad():
        got = embed(tiny_encoder.model, batch).numpy()
    queries = tiny_encoder.encode_queries([ex.query for ex in examples])
    docs = tiny_encoder.encode_documents([ex.positive for ex in examples] + [ex.negatives[0] for ex in examples])
    np.testing.assert_allclose(got[:5], queries, atol=1e-5)
    np.testing.assert_allclose(got[5:], docs, atol=1e-5)


def test_plan_chunks_bounds_padding_and_size() -> None:
    lengths = [600, 12, 590, 30, 8, 610, 300, 14]
    groups = plan_chunks(lengths)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(2 * lengths[i] > lengths[g[0]] for g in groups for i in g)  # padding < 2x for every item
    assert [len(g) for g in plan_chunks([5] * 10, chunk_size=4)] == [4, 4, 2]
    assert plan_chunks([7] * 3) == [[0, 1, 2]]


def test_train_learns_and_exports(tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    same_batch = [list(range(8))] * 6  # one batch over and over: its loss must fall
    with caplog.at_level(logging.INFO, logger="mmembed_rag.finetune.train"):
        out = train(_args(tiny_checkpoint, tmp_path / "run", max_steps=6, learning_rate=3e-3), tiny_examples(8),
                    batch_sampler=same_batch)
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", caplog.text)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert out == tmp_path / "run" / "model"
    encoder = Encoder.from_pretrained(out, device="cpu")
    emb = encoder.encode_queries(["a red square"], instruction="mscoco_t2i")
    assert emb.shape == (1, encoder.dim)
    assert (out / "README.md").is_file() and (tmp_path / "run" / "train_args.yaml").is_file()
    assert latest_checkpoint(tmp_path / "run").name == "step-00000006"


def test_resume_after_kill_gives_same_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # LoRA dropout on: the result depends on the RNG stream, so the RNG must be restored too.
    # 24 examples in batches of 8: 3 steps per epoch, so the run also crosses an epoch boundary.
    examples = tiny_examples(24)
    kw = dict(max_steps=5, save_every=2, lora=LoraArguments(rank=4, alpha=8, dropout=0.2), warmup_steps=1)
    straight = train(_args(tiny_checkpoint, tmp_path / "a", **kw), examples, _Sampler(24, 8))
    with pytest.raises(_Killed):
        train(_args(tiny_checkpoint, tmp_path / "b", **kw), examples, _Sampler(24, 8, kill_after=3))
    assert latest_checkpoint(tmp_path / "b").name == "step-00000002"
    resumed = train(_args(tiny_checkpoint, tmp_path / "b", resume_from="latest", **kw), examples, _Sampler(24, 8))
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = _weights(tiny_checkpoint)
    assert any(not torch.equal(a[k], base[k].float()) for k in a)  # it did train


def test_output_dir_guard(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        train(_args(tiny_checkpoint, out, max_steps=1), tiny_examples(8))
    train(_args(tiny_checkpoint, out, max_steps=1, overwrite_output_dir=True), tiny_examples(8))
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model" / "config.json").is_file()


def test_bf16_with_gradient_cache_and_checkpointing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """bf16 autocast (CPU has it), chunked gradient caching and activation checkpointing together."""
    out = train(_args(tiny_checkpoint, tmp_path / "bf16", max_steps=1, mixed_precision="bf16",
                      gradient_cache_chunk_size=5, gradient_checkpointing=True, export_dtype="bfloat16"),
                tiny_examples(8))
    encoder = Encoder.from_pretrained(out, device="cpu")
    assert np.isfinite(encoder.encode_documents(["a red square"])).all()


def test_rejects_rank_aware_sampler(tiny_checkpoint: Path, tmp_path: Path) -> None:
    class RankSampler(list):
        world_size = 2

    with pytest.raises(ValueError, match="GLOBAL"):
        train(_args(tiny_checkpoint, tmp_path / "x"), tiny_examples(8), RankSampler([[0, 1]]))


def test_cli_runs_a_recipe_on_the_synthetic_benchmark(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The documented command: stage-3 recipe, the data pipeline's factory, text and image tasks mixed."""
    data = tmp_path / "data"
    manifest = generate_benchmark(data, n_train=8, n_test=1, image_size=16)
    train_split = manifest["splits"]["train"]
    options = {"queries": str(data / train_split["queries"]), "pool": str(data / train_split["global_pool"]),
               "instructions": str(data / manifest["instructions"]), "image_root": str(data),
               "text": str(data / manifest["text"]["train"]["queries"])}
    recipe = REPO / "finetune" / "recipes" / "stage3_text.yaml"
    cmd = [sys.executable, "-m", "mmembed_rag.finetune.train", "--config", str(recipe),
           "--model_path", str(tiny_checkpoint), "--output_dir", str(tmp_path / "cli"), "--max_steps", "2",
           "--batch_size", "4", "--show_progress", "false", "--lora.rank=4"]
    cmd += [token for key, value in options.items() for token in (f"--data_options.{key}", value)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2/2 loss" in done.stderr
    assert (tmp_path / "cli" / "model" / "config.json").is_file()


def test_lora_under_bf16_keeps_the_frozen_base_in_bf16(tiny_checkpoint: Path) -> None:
    """An 8.2B base is 33 GB in float32: under bf16 mixed precision only the trained parameters are float32."""
    from mmembed_rag.finetune.train import build_model

    _, model = build_model(_args(tiny_checkpoint, Path("unused"), train_pooling=True), frozen_dtype=torch.bfloat16)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith("inv_freq"))
