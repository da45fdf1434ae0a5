"""Two CPU processes (gloo, launched by torchrun) mine and evaluate exactly what one process does, each encoding half.

The test launches this module as a worker (``python -m torch.distributed.run --nproc_per_node 2 -m
tests.finetune.test_parallel ...``); the workers join the process group themselves (from torchrun's
environment), write the mined queries, the pool cache and the report from rank 0, and each rank records what it
encoded and what it computed, which the test compares with a single-process run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmembed_rag.finetune.data import MBEIRDataset
from mmembed_rag.finetune.evaluate import evaluate
from mmembed_rag.finetune.mining import mine_hard_negatives
from mmembed_rag.finetune.parallel import (
    DataParallel,
    data_parallel,
    encode_documents,
    encode_sharded,
    shard_positions,
)
from mmembed_rag.finetune.synthetic import generate_benchmark, load_benchmark, load_text_benchmark

REPO = Path(__file__).resolve().parents[2]
BATCH = 5  # 136 pool candidates -> 28 batches, the last of one: uneven shares
MINING = {"top_k": 12, "c2_start": 8, "num_negatives": 3, "seed": 1, "batch_size": BATCH}
EVAL = {"pools": ("local", "global"), "ks": (1, 5, 10), "batch_size": BATCH}


def _make_bench(root: Path) -> Path:
    generate_benchmark(root, seed=0, n_train=4, n_test=2, n_val=0, n_text_test=8, image_size=32, distractors=2.0)
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_bench(tmp_path_factory.mktemp("bench"))


def _run(encoder, bench: Path, out: Path) -> tuple[str, dict]:
    """Mine and evaluate as the pipeline does; returns the report's JSON and the mined queries."""
    train = load_benchmark(bench, "train")
    result = mine_hard_negatives(encoder, train, output=out / "mined.jsonl", cache_dir=out / "cache", **MINING)
    report = evaluate(encoder, load_benchmark(bench, "test"), *load_text_benchmark(bench, "test"),
                      cache_dir=out / "cache", **EVAL)
    return report.to_json(out / "report.json"), {q.qid: list(q.neg_cand_list) for q in result.dataset.queries}


def _worker(ckpt: str, bench: str, out: Path) -> None:
    from mmembed_rag import Encoder

    rank = int(os.environ["RANK"])
    handler = logging.FileHandler(out / f"log-{rank}.txt")
    logging.getLogger("mmembed_rag.finetune").addHandler(handler)
    logging.getLogger("mmembed_rag.finetune").setLevel(logging.INFO)
    encoder = Encoder.from_pretrained(ckpt, device="cpu")
    calls: dict[str, list[int]] = {"documents": [], "queries": [], "writes": []}
    for kind in ("documents", "queries"):
        real = getattr(encoder, f"encode_{kind}")

        def counted(items, *args, _real=real, _kind=kind, **kwargs):
            items = list(items)
            calls[_kind].append(len(items))
            return _real(items, *args, **kwargs)

        setattr(encoder, f"encode_{kind}", counted)
    real_write = MBEIRDataset.write_queries

    def write(self, path, queries):
        calls["writes"].append(rank)
        return real_write(self, path, queries)

    MBEIRDataset.write_queries = write
    report, negatives = _run(encoder, Path(bench), out)
    # Without lengths the shards are contiguous; a failed write on rank 0 fails every rank.
    plain = encode_sharded(lambda part: np.asarray(part, dtype=np.float64)[:, None], list(range(11)), what="numbers")
    failure = None
    try:
        data_parallel().on_main(lambda: 1 / 0, "nothing")
    except (ZeroDivisionError, RuntimeError) as exc:
        failure = type(exc).__name__
    (out / f"rank-{rank}.json").write_text(json.dumps({"report": report, "negatives": negatives, "calls": calls,
                                                       "plain": plain[:, 0].tolist(), "failure": failure}))


def test_two_processes_mine_and_evaluate_as_one(tiny_checkpoint: Path, tiny_encoder, bench: Path,
                                                tmp_path: Path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.finetune.test_parallel", str(tiny_checkpoint), str(bench), str(two)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    errors = [line for line in done.stderr.splitlines() if "Warning" not in line and "warnings.warn" not in line]
    assert done.returncode == 0, "\n".join(errors)[-8000:]
    print(f"two processes: {time.perf_counter() - start:.1f}s")

    report, negatives = _run(tiny_encoder, bench, one)
    ranks = [json.loads((two / f"rank-{r}.json").read_text()) for r in range(2)]
    # The files rank 0 wrote are the single process's, byte for byte.
    assert (two / "mined.jsonl").read_bytes() == (one / "mined.jsonl").read_bytes()
    assert (two / "report.json").read_text() == (one / "report.json").read_text() == report + "\n"
    caches = sorted(p.name for p in (two / "cache").iterdir())
    assert caches == sorted(p.name for p in (one / "cache").iterdir()) and len(caches) == 2  # train and test pools
    for name in caches:  # whole batches per rank: the very embeddings of one process, not just close ones
        np.testing.assert_array_equal(np.load(two / "cache" / name), np.load(one / "cache" / name))
    # Every rank holds the whole result; rank 0 alone wrote the queries file.
    for rank, result in enumerate(ranks):
        assert result["report"] == report and result["negatives"] == negatives
        assert result["calls"]["writes"] == ([0] if rank == 0 else [])
    # Each rank encoded its share only: the shares it logged add up to the whole, and are what it passed the encoder.
    train, test = load_benchmark(bench, "train"), load_benchmark(bench, "test")
    text, corpus = load_text_benchmark(bench, "test")
    expected = [(len(train.pool), "pool candidates"), (len(train.queries), "mining queries"),
                (len(test.pool), "pool candidates"), (len(test.queries), "evaluation queries"),
                (len(corpus), "text passages"), (len(text.queries), "text queries")]
    logged_text = [(two / f"log-{rank}.txt").read_text() for rank in range(2)]
    logged = [[(int(n), int(total), what) for r, n, total, what in
               re.findall(r"rank (\d) of 2 encodes (\d+) of (\d+) (.+?) \(whole length-sorted batches\)", log)
               if int(r) == rank] for rank, log in enumerate(logged_text)]
    assert [(total, what) for _, total, what in logged[0]] == expected
    for (first, _, _), (second, _, _), (total, _) in zip(*logged, expected, strict=True):
        assert first + second == total and 0 < first < total and 0 < second < total
    for rank, result in enumerate(ranks):
        assert result["plain"] == list(range(11)) and result["failure"] == ("ZeroDivisionError", "RuntimeError")[rank]
        assert f"rank {rank} of 2 encodes {6 - rank} of 11 numbers (a contiguous shard)" in logged_text[rank]
        calls = result["calls"]
        assert sum(calls["documents"]) + sum(calls["queries"]) == sum(n for n, _, _ in logged[rank])
        assert len(calls["documents"]) == len(calls["queries"]) == 3


def test_shards_are_whole_encoder_batches(tiny_encoder, bench: Path) -> None:
    train = load_benchmark(bench, "train")
    items = [train.candidate_item(c) for c in train.pool.values()]
    lengths = [tiny_encoder.token_count(p) for p in tiny_encoder.document_prompts(items)]
    shards = shard_positions(len(items), 3, BATCH, lengths)
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(items)))
    assert [len(s) for s in shards] == [45 + 1, 45, 45]  # 28 batches of 5 (the last of 1), dealt round-robin
    whole = tiny_encoder.encode_documents(items, batch_size=BATCH)
    for shard in shards:  # a shard forms the batches of one process: bit-identical rows
        part = tiny_encoder.encode_documents([items[i] for i in shard], batch_size=BATCH)
        np.testing.assert_array_equal(part, whole[shard])
    contiguous = shard_positions(10, 3)
    assert [s.tolist() for s in contiguous] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_alone_it_is_one_plain_call(tiny_encoder, bench: Path) -> None:
    items = [load_benchmark(bench, "test").candidate_item(c) for c in load_benchmark(bench, "test").pool.values()]
    seen: list[int] = []

    def encode(part):
        seen.append(len(part))
        return np.ones((len(part), 2), dtype=np.float32)

    assert encode_sharded(encode, items, group=DataParallel()).shape == (len(items), 2) and seen == [len(items)]
    np.testing.assert_array_equal(encode_documents(tiny_encoder, items[:7], batch_size=BATCH),
                                  tiny_encoder.encode_documents(items[:7], batch_size=BATCH))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
