"""The command line and the store against hostile input and secured servers: every item checked before anything is
written, one rule for exit codes (2: the input or the command line, 1: anything else), unreadable folders and symlink
loops reported, and credentials that reach a Chroma server but never a log or an error message."""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import chromadb
import pytest
from test_cli_distributed import chroma_server  # noqa: F401  (a real `chroma run` subprocess)

from mmembed_rag.cli import main
from mmembed_rag.store import MultimodalCollection, StoreError

TOKEN = "s3cret-token-7f1d"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _count(db: Path, name: str = "mmembed") -> int:
    client = chromadb.PersistentClient(path=str(db))
    names = [c if isinstance(c, str) else c.name for c in client.list_collections()]
    return client.get_collection(name).count() if name in names else 0


@pytest.fixture()
def texts(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(150):
        (folder / f"a{i:03d}.txt").write_text(f"passage number {i} about buses")
    return folder


def test_index_opens_every_image_before_writing_and_names_the_global_item(capsys, texts, tmp_path, tiny_checkpoint):
    (texts / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # sorts last: item 150, chunk 2
    db = tmp_path / "db"
    code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "--no-progress", "index", texts, "--persist-dir", db,
                           "--chunk-size", "128")
    assert code == 2 and err.startswith("error: item 150: cannot load image") and "z_broken.png" in err
    assert "nothing was written" in err and _count(db) == 0


def test_a_failure_while_writing_undoes_the_whole_run(capsys, texts, tmp_path, tiny_checkpoint):
    (texts / "z_url.jsonl").write_text('{"text": "far away", "image": "http://127.0.0.1:9/missing.png"}\n')
    db = tmp_path / "db"
    code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "--no-progress", "index", texts, "--persist-dir", db,
                           "--chunk-size", "64")
    assert code == 2 and "item 150" in err and "missing.png" in err  # found while encoding the third chunk
    assert _count(db) == 0  # the two chunks written before it were removed again


def test_symlink_loops_are_input_errors(capsys, tmp_path, tiny_checkpoint):
    folder = tmp_path / "loop"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine")
    (folder / "a.txt").symlink_to(folder / "b.txt")
    (folder / "b.txt").symlink_to(folder / "a.txt")
    code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "index", folder, "--persist-dir", tmp_path / "db")
    assert code == 2 and "a.txt: cannot be resolved: a symlink loop" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "index", folder / "a.txt",
                           "--persist-dir", tmp_path / "db")
    assert code == 2 and "a symlink loop or a dangling symlink" in err


@pytest.mark.skipif(not hasattr(os, "seteuid"), reason="needs POSIX user ids")
def test_unreadable_inputs_are_input_errors_never_skipped(capsys, tiny_checkpoint):
    root = Path(tempfile.mkdtemp(prefix="mmembed-cli-"))  # under /tmp: searchable by every user
    try:
        (root / "sub").mkdir()
        (root / "sub" / "hidden.txt").write_text("in an unreadable folder")
        (root / "ok.txt").write_text("readable")
        (root / "secret.txt").write_text("unreadable file")
        (root / "cands.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
        root.chmod(0o755)
        (root / "sub").chmod(0o000)
        (root / "secret.txt").chmod(0o000)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "index", root, "--persist-dir", root / "db")
            assert code == 2 and f"cannot read folder {root / 'sub'}" in err
        finally:
            if as_root:
                os.seteuid(0)
        (root / "sub").chmod(0o755)
        if as_root:
            os.seteuid(65534)
        try:
            code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "index", root / "secret.txt",
                                   "--persist-dir", root / "db")
            assert code == 2 and f"cannot read {root / 'secret.txt'}" in err
        finally:
            if as_root:
                os.seteuid(0)
        code, _, err = run_cli(capsys, "rerank", "--query", "x", "--candidates", root / "cands.jsonl")
        assert code == 2 and "cands.jsonl: not UTF-8 text" in err
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------- secured servers


class _Capture(BaseHTTPRequestHandler):
    """Forwards every request to the real server and records its headers."""

    upstream: int = 0
    seen: list[dict[str, str]] = []

    def _forward(self) -> None:
        type(self).seen.append(dict(self.headers))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        connection = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        connection.request(self.command, self.path, body=body or None, headers=headers)
        reply = connection.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        connection.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def capture(chroma_server: int) -> Iterator[type[_Capture]]:  # noqa: F811
    handler = type("Capture", (_Capture,), {"upstream": chroma_server, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.port = server.server_address[1]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_token_and_headers_reach_the_server_and_stay_out_of_logs(capture, tiny_checkpoint, tiny_encoder, caplog):
    caplog.set_level(logging.DEBUG)
    col = MultimodalCollection(str(tiny_checkpoint), encoder=tiny_encoder, host="127.0.0.1", port=capture.port,
                               collection="secured", auth_token=TOKEN, headers={"X-Team": "search"})
    col.add(["a red bus", "a green tram"])
    assert col.search("bus", k=1)[0].item.text in ("a red bus", "a green tram") and col.count() == 2
    assert capture.seen and all(h.get("Authorization") == f"Bearer {TOKEN}" for h in capture.seen)
    assert all(h.get("X-Team") == "search" for h in capture.seen)
    assert TOKEN not in caplog.text and TOKEN not in repr(col)
    header = MultimodalCollection(str(tiny_checkpoint), encoder=tiny_encoder, host="127.0.0.1", port=capture.port,
                                  collection="secured", auth_token=TOKEN, auth_header="X-Chroma-Token")
    assert header.count() == 2 and capture.seen[-1].get("X-Chroma-Token") == TOKEN
    with pytest.raises(StoreError, match="auth_token apply to a Chroma server: pass host=/port= too"):
        MultimodalCollection(str(tiny_checkpoint), encoder=tiny_encoder, auth_token=TOKEN)


def test_cli_reads_the_token_from_the_environment_only(capture, capsys, monkeypatch, tiny_checkpoint, tmp_path):
    (tmp_path / "note.txt").write_text("a red bus in London")
    monkeypatch.setenv("MMEMBED_CHROMA_TOKEN", TOKEN)
    base = ["--model", tiny_checkpoint, "--host", "127.0.0.1", "--port", capture.port, "--collection", "cli-secured",
            "--no-progress", "-v"]
    code, out, err = run_cli(capsys, *base, "index", tmp_path / "note.txt")
    assert code == 0, err
    code, out, err = run_cli(capsys, *base, "search", "bus", "--k", "1")
    assert code == 0 and "a red bus" in out
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for h in capture.seen) and len(capture.seen) > 3
    assert TOKEN not in out + err  # -v: DEBUG logging of every library, still no token
    for argv in (["--token", TOKEN, "search", "bus"], [f"--token={TOKEN}", "search", "bus"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "read from the environment variable MMEMBED_CHROMA_TOKEN" in err and TOKEN not in err
    code, _, err = run_cli(capsys, *base, "--ssl", "search", "bus")  # the capture server speaks plain HTTP
    assert code == 2 and "\nerror: cannot reach a Chroma server at 127.0.0.1:" in err and "(https)" in err
    assert TOKEN not in err  # not in the message, nor in the -v traceback


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_an_input_error(capsys, tmp_path, tiny_checkpoint):
    (tmp_path / "note.txt").write_text("text")
    code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "--device", "cuda", "index", tmp_path / "note.txt",
                           "--persist-dir", tmp_path / "db")
    assert code == 2 and "no CUDA device" in err


def test_index_with_a_modality_index_serves_filtered_searches(capsys, tmp_path, tiny_checkpoint):
    import json

    from PIL import Image

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "note.txt").write_text("a red bus in London")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "data" / "red.png")
    db = tmp_path / "db"
    code, _, err = run_cli(capsys, "--model", tiny_checkpoint, "--no-progress", "index", tmp_path / "data",
                           "--persist-dir", db, "--modality-index")
    assert code == 0, err
    names = {c if isinstance(c, str) else c.name for c in chromadb.PersistentClient(path=str(db)).list_collections()}
    assert {"mmembed", "mmembed.text", "mmembed.image", "mmembed.image-text"} <= names
    code, out, err = run_cli(capsys, "--json", "--persist-dir", db, "search", "bus", "--modality", "image")
    assert code == 0, err
    assert [r["modality"] for r in json.loads(out)["results"]] == ["image"]
