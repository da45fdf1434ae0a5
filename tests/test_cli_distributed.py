"""``mmembed-rag index`` in two CPU processes writing to a real local Chroma server.

``accelerate launch --cpu --num_processes 2`` starts a single process on a CPU-only machine, so the test
launches with torchrun (which sets RANK, WORLD_SIZE and MASTER_ADDR, as ``accelerate launch --multi_gpu``
does); the processes join a gloo group and the first one prints the report of both.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import chromadb
import pytest
from PIL import Image

from mmembed_rag.cli import main
from mmembed_rag.cli.sources import iter_entries, scan_paths
from mmembed_rag.store.records import content_id, image_reference

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, N_PASSAGES = 5, 4


def _chroma_binary() -> str:
    beside = Path(sys.executable).parent / "chroma"
    return str(beside) if beside.exists() else (shutil.which("chroma") or pytest.skip("no `chroma` command"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A `chroma run` subprocess on a free port, answering its heartbeat; stopped at teardown."""
    tmp_path = tmp_path_factory.mktemp("chroma")
    port = _free_port()
    log = (tmp_path / "chroma.log").open("wb")
    server = subprocess.Popen([_chroma_binary(), "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"chroma server did not start: {(tmp_path / 'chroma.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    for i in range(N_IMAGES):
        Image.new("RGB", (32 + 4 * i, 32), (40 * i, 200 - 30 * i, 90)).save(folder / ("b" if i % 2 else "") /
                                                                          f"img{i}.png")
    paragraphs = [f"Passage {i}: the {c} bus leaves at {7 + i} o'clock." for i, c in
                  enumerate(["red", "green", "blue", "white"][:N_PASSAGES])]
    (folder / "notes.md").write_text("\n\n".join(paragraphs))
    (folder / "skip.csv").write_text("a,b\n")
    return folder


def _expected_ids(corpus: Path) -> list[str]:
    """Content ids of every item, in the global order that sharding follows."""
    entries = iter_entries(scan_paths([str(corpus)]).files, max_chars=60)
    return [content_id(e.item.text, image_reference(e.item, 0)) for e in entries]


def _index_args(checkpoint: Path, corpus: Path, port: int, collection: str) -> list[str]:
    return ["--model", str(checkpoint), "--json", "--no-progress", "index", str(corpus), "--max-chars", "60",
            "--host", "127.0.0.1", "--port", str(port), "--collection", collection]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        if name not in extra:
            env.pop(name, None)
    return env


def test_two_processes_index_disjoint_shards_into_a_server(chroma_server, corpus, tiny_checkpoint, capsys):
    port = chroma_server
    expected = _expected_ids(corpus)
    assert len(expected) == len(set(expected)) == N_IMAGES + N_PASSAGES
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mmembed_rag.cli", *_index_args(tiny_checkpoint, corpus, port, "mmembed")]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one document: the first process reports for both

    assert report["world_size"] == 2 and report["skipped"] == 1
    assert report["items"] == report["count"] == len(expected)
    shards = {entry["rank"]: entry["ids"] for entry in report["ranks"]}
    assert sorted(shards) == [0, 1] and all(shards.values())
    assert not set(shards[0]) & set(shards[1])
    assert shards[0] == expected[0::2] and shards[1] == expected[1::2]  # shard = ordinal % world size

    stored = chromadb.HttpClient(host="127.0.0.1", port=port).get_collection("mmembed").get(include=[])["ids"]
    assert sorted(stored) == sorted(expected)  # every item once

    # Indexing again from one process (in-process, same server) overwrites instead of duplicating.
    code = main(_index_args(tiny_checkpoint, corpus, port, "mmembed")[2:])  # without --model
    rerun = json.loads(capsys.readouterr().out)
    assert code == 0 and rerun["model"] == str(tiny_checkpoint.resolve())  # the collection's own model
    assert rerun["items"] == rerun["count"] == len(expected)


def test_processes_started_by_hand_shard_by_rank_and_world_size(chroma_server, corpus, tiny_checkpoint):
    """RANK and WORLD_SIZE alone (no launcher, no process group): each process reports its own share."""
    expected = _expected_ids(corpus)
    cmd = [sys.executable, "-m", "mmembed_rag.cli", *_index_args(tiny_checkpoint, corpus, chroma_server, "byhand")]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(RANK=str(rank), WORLD_SIZE="2"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=150) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    reports = [json.loads(out) for out, _ in outputs]
    for rank, report in enumerate(reports):
        assert report["world_size"] == 2 and [e["rank"] for e in report["ranks"]] == [rank]
        assert report["ranks"][0]["ids"] == expected[rank::2]
    stored = chromadb.HttpClient(host="127.0.0.1", port=chroma_server).get_collection("byhand").get(include=[])
    assert sorted(stored["ids"]) == sorted(expected)
