"""Behaviour tests for mmembed_rag.images.load_image and describe_source."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmembed_rag.errors import ImageLoadError, MMEmbedError
from mmembed_rag.images import DEFAULT_MAX_PIXELS, describe_source, load_image


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def red() -> Image.Image:
    return Image.new("RGB", (30, 20), (255, 0, 0))


@pytest.fixture
def red_png(tmp_path: Path, red: Image.Image) -> Path:
    path = tmp_path / "red.png"
    red.save(path)
    return path


def assert_red(image: Image.Image) -> None:
    assert image.mode == "RGB"
    assert image.size == (30, 20)
    assert image.getpixel((5, 5)) == (255, 0, 0)


# --- accepted sources -------------------------------------------------------------------------


def test_pil_image_is_copied_not_mutated(red: Image.Image) -> None:
    out = load_image(red)
    assert_red(out)
    assert out is not red


def test_path_str_and_pathlib(red_png: Path) -> None:
    assert_red(load_image(red_png))
    assert_red(load_image(str(red_png)))


def test_bytes_and_bytearray(red: Image.Image) -> None:
    data = png_bytes(red)
    assert_red(load_image(data))
    assert_red(load_image(bytearray(data)))


def test_data_uri(red: Image.Image) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(red)).decode()
    assert_red(load_image(uri))


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((20, 30), 128, np.uint8), (128, 128, 128)),
        (np.full((20, 30, 3), (255, 0, 0), np.uint8), (255, 0, 0)),
        (np.zeros((20, 30, 4), np.uint8), (255, 255, 255)),  # fully transparent -> white
        (np.ones((20, 30), bool), (255, 255, 255)),
    ],
)
def test_numpy_arrays(array: np.ndarray, expected: tuple[int, int, int]) -> None:
    out = load_image(array)
    assert out.mode == "RGB" and out.size == (30, 20)
    assert out.getpixel((0, 0)) == expected


def test_numpy_bad_dtype_and_shape() -> None:
    with pytest.raises(ImageLoadError, match=r"item 2: .*dtype uint8 or bool, got float32"):
        load_image(np.zeros((4, 4), np.float32), index=2)
    with pytest.raises(ImageLoadError, match=r"shaped HxW.*got \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))


# --- orientation and modes --------------------------------------------------------------------


def test_exif_orientation_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.new("RGB", (40, 10), (0, 0, 255)).save(path, exif=exif)
    assert load_image(path).size == (10, 40)


@pytest.mark.parametrize(
    ("mode", "color"),
    [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0)), ("RGBa", (0, 0, 0, 0)), ("PA", (0, 0))],
)
def test_transparent_modes_become_white(mode: str, color: tuple[int, ...]) -> None:
    out = load_image(Image.new(mode, (8, 8), color))
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == (255, 255, 255)


def test_semi_transparent_composited_on_white() -> None:
    out = load_image(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert out.getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=1)


def test_palette_with_transparency_from_png(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent index -> white
    assert out.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 200, 200),
        ("1", 1, 255),
        ("P", 0, 0),
        ("CMYK", (0, 0, 0, 0), 255),
        ("I", 65535, 255),
        ("I", 100, 100),
        ("F", 0.5, 128),
    ],
)
def test_opaque_modes_become_rgb(mode: str, value: object, expected: int) -> None:
    image = Image.new(mode, (6, 6), value)
    if mode == "F":  # constant float image: give it a range so scaling is observable
        image.putpixel((5, 5), 0.0)
    out = load_image(image)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (expected,) * 3


def test_i16_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)  # 16-bit grayscale PNG
    for source in (path, Image.fromarray(arr)):
        out = np.asarray(load_image(source))[0, :, 0]
        assert out.tolist() == [0, 4, 128, 255]


# --- size bound -------------------------------------------------------------------------------


def test_pixel_bound_checked_from_header(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("1", (5000, 5000)).save(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(
        ImageLoadError, match=r"item 7: .*5000x5000 = 25000000 pixels exceeds max_pixels=1000000"
    ):
        load_image(path, index=7, max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match="exceeds max_pixels"):
        load_image(path.read_bytes(), max_pixels=1_000_000)
    assert load_image(path, max_pixels=None).size == (5000, 5000)
    assert DEFAULT_MAX_PIXELS >= 25_000_000


def test_pixel_bound_applies_to_arrays_and_pil_images() -> None:
    with pytest.raises(ImageLoadError, match="exceeds max_pixels=100"):
        load_image(np.zeros((20, 30), np.uint8), max_pixels=100)
    with pytest.raises(ImageLoadError, match="exceeds max_pixels=100"):
        load_image(Image.new("RGB", (30, 20)), max_pixels=100)


# --- bad inputs -------------------------------------------------------------------------------


def test_truncated_png(red: Image.Image) -> None:
    data = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageLoadError, match=r"item 1: .*<bytes \d+>.*corrupt or truncated"):
        load_image(data[: len(data) // 2], index=1)


def test_corrupt_and_empty_bytes() -> None:
    with pytest.raises(ImageLoadError, match=r"item 0: .*unknown or unsupported image format"):
        load_image(b"\x89PNG-not-really-an-image", index=0)
    with pytest.raises(ImageLoadError, match=r"no image data \(0 bytes\)"):
        load_image(b"")


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(
        ImageLoadError, match=r"item 4: cannot load image '.*nope\.png': file not found"
    ) as info:
        load_image(missing, index=4)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert isinstance(info.value, MMEmbedError) and isinstance(info.value, ValueError)


def test_directory_and_empty_path(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="empty path"):
        load_image("")


def test_unknown_format_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("just some text, not an image\n")
    with pytest.raises(ImageLoadError, match=r"notes\.txt': unknown or unsupported image format"):
        load_image(path)


def test_bad_base64_data_uri() -> None:
    with pytest.raises(ImageLoadError, match=r"item 5: .*data:image/png;base64.*invalid base64"):
        load_image("data:image/png;base64,!!!not base64!!!", index=5)
    with pytest.raises(ImageLoadError, match="malformed data URI"):
        load_image("data:image/png;base64")


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    """A test server's handler: no request log, and one way to answer with an image."""

    def send_png(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded local HTTP server for ``handler``, its base URL yielded, shut down afterwards."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_server(red: Image.Image) -> Iterator[str]:
    """A local HTTP server: /ok.png serves a PNG, /slow.png stalls, anything else is a 404."""
    body = png_bytes(red)

    class Handler(_QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
            if self.path == "/slow.png":
                time.sleep(3)
            if self.path in ("/ok.png", "/slow.png"):
                self.send_png(body)
            else:
                self.send_error(404)

    yield from _serve(Handler)


def test_url_fetch_ok_and_http_error(http_server: str) -> None:
    assert_red(load_image(f"{http_server}/ok.png"))
    with pytest.raises(
        ImageLoadError,
        match=r"item 6: cannot load image 'http://127\.0\.0\.1:\d+/missing\.png': HTTP error 404",
    ):
        load_image(f"{http_server}/missing.png", index=6)


def test_url_fetch_times_out(http_server: str) -> None:
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"slow\.png': fetch timed out after 0\.5s"):
        load_image(f"{http_server}/slow.png", timeout=0.5)
    assert time.monotonic() - start < 2.5


def test_url_fetch_fails_fast() -> None:
    with socket.socket() as sock:  # find a local port with no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Offline, the unroutable address fails by timeout, "unreachable" or a sandbox proxy's HTTP error.
    for url in (f"http://127.0.0.1:{port}/x.png", "http://10.255.255.1/x.png"):
        start = time.monotonic()
        with pytest.raises(
            ImageLoadError, match=r"item 9: cannot load image 'http://.*': (cannot fetch|fetch timed|HTTP)"
        ):
            load_image(url, index=9, timeout=1)
        assert time.monotonic() - start < 5


def test_unsupported_url_scheme() -> None:
    with pytest.raises(ImageLoadError, match="unsupported URL scheme"):
        load_image("ftp://example.com/x.png")


@pytest.mark.parametrize("source", [42, None, [1, 2], {"img": "x.png"}])
def test_unsupported_type(source: object) -> None:
    name = type(source).__name__
    with pytest.raises(
        ImageLoadError, match=rf"item 3: .*unsupported image source type {name}; expected a PIL"
    ):
        load_image(source, index=3)  # type: ignore[arg-type]


def test_long_source_is_shortened_in_message() -> None:
    uri = "data:image/png;base64," + "A" * 10_000 + "!"
    with pytest.raises(ImageLoadError) as info:
        load_image(uri)
    assert len(str(info.value)) < 300


# --- describe_source --------------------------------------------------------------------------


def test_describe_source(red: Image.Image, red_png: Path) -> None:
    assert describe_source(red) == "<PIL image 30x20>"
    assert describe_source(red_png) == str(red_png)
    assert describe_source("https://x.org/a.png") == "https://x.org/a.png"
    assert describe_source(b"1234") == "<bytes 4>"
    assert describe_source(np.zeros((2, 3, 3), np.uint8)) == "<array 2x3x3 uint8>"
    assert describe_source("data:image/png;base64,AAAA") == "data:image/png;base64,... (26 chars)"
    assert describe_source(3.5) == "<float>"


def test_release_compatible_loading_converts_like_the_release(tmp_path):
    # The release (transformers 4.42) opens pixels in stored order and drops alpha with convert("RGB").
    rgba = Image.new("RGBA", (4, 2), (200, 10, 10, 0))
    rgba.save(tmp_path / "clear.png")
    rotated = Image.new("RGB", (6, 3), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° for display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    exact = load_image(tmp_path / "clear.png", release_compatible=True)
    assert exact.getpixel((0, 0)) == (200, 10, 10)  # colour under the transparent alpha, as convert("RGB") gives
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # default: composited on white
    assert load_image(tmp_path / "rotated.jpg", release_compatible=True).size == (6, 3)
    assert load_image(tmp_path / "rotated.jpg").size == (3, 6)


def test_encoder_switch_reproduces_release_image_handling(tiny_checkpoint, tmp_path):
    from mmembed_rag import Encoder

    Image.new("RGBA", (30, 20), (200, 10, 10, 0)).save(tmp_path / "clear.png")
    exact = Encoder.from_pretrained(tiny_checkpoint, device="cpu", release_compatible_images=True)
    default = Encoder.from_pretrained(tiny_checkpoint, device="cpu")
    item = [{"img": str(tmp_path / "clear.png")}]
    as_release = default.encode_documents([{"img": Image.open(tmp_path / "clear.png").convert("RGB")}])
    np.testing.assert_allclose(exact.encode_documents(item), as_release, atol=1e-6)
    assert np.abs(default.encode_documents(item) - as_release).max() > 1e-3


# --- hostile inputs (issue 11) ----------------------------------------------------------------


def _load_in_thread(source: object, seconds: float = 5.0, **kwargs: object) -> BaseException | None:
    """load_image(source) in a thread: the error it raised, None on success; fails the test if it hangs."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load_image(source, **kwargs)  # type: ignore[arg-type]
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"load_image({source!r}) still blocked after {seconds}s"
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    try:
        error = _load_in_thread(fifo, index=2)
    finally:
        with contextlib.suppress(OSError):  # release a reader blocked in open() (the old behaviour)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(error, ImageLoadError)
    assert re.fullmatch(r"item 2: cannot load image '.*pipe\.png': path is a FIFO \(named pipe\), "
                        r"not a regular image file", str(error))


def test_character_device_is_refused() -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    error = _load_in_thread("/dev/zero", index=0)
    assert isinstance(error, ImageLoadError)
    assert "item 0: cannot load image '/dev/zero': path is a character device, not a regular image file" in str(error)


def test_symlink_loop_is_an_image_load_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(ImageLoadError, match=r"item 8: cannot load image '.*a\.png': cannot read file \(.*symbolic"):
        load_image(tmp_path / "a.png", index=8)


@pytest.mark.parametrize("source", [Image.new("RGB", (0, 0)), Image.new("L", (0, 7)), np.zeros((0, 0, 3), np.uint8),
                                    np.zeros((5, 0), np.uint8)])
def test_image_without_pixels_is_refused(source: object) -> None:
    with pytest.raises(ImageLoadError, match=r"^item 1: cannot load image '<.*>': image has no pixels \(\d+x\d+\)$"):
        load_image(source, index=1)  # type: ignore[arg-type]


def test_encoder_refuses_image_without_pixels(tiny_encoder) -> None:
    with pytest.raises(ImageLoadError, match=r"item 1: .*image has no pixels \(0x0\)"):
        tiny_encoder.encode_documents(["fine", {"img": np.zeros((0, 0, 3), np.uint8)}])


@pytest.fixture
def hostile_server(red: Image.Image) -> Iterator[str]:
    """A local HTTP server that trickles its body or headers, lies about its size, or redirects elsewhere."""
    body = png_bytes(red)

    class Handler(_QuietHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
            try:
                self._serve()
            except OSError:  # the client gave up: expected
                pass

        def _serve(self) -> None:
            if self.path == "/trickle-body.png":  # each byte well within the socket timeout, the whole never
                self.send_response(200)
                self.send_header("Content-Length", "16")
                self.end_headers()
                for _ in range(16):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.25)
            elif self.path == "/trickle-headers.png":
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                for _ in range(16):
                    self.wfile.write(b"y")
                    self.wfile.flush()
                    time.sleep(0.25)
                self.wfile.write(b"\r\n\r\n" + body)
            elif self.path == "/huge.png":
                self.send_response(200)
                self.send_header("Content-Length", str(10**12))
                self.end_headers()
                self.wfile.write(body)
            elif self.path.startswith("/slow-redirect-"):  # each hop quick enough, the chain not
                hop = int(self.path.rsplit("-", 1)[1])
                time.sleep(0.4)
                self.send_response(302)
                self.send_header("Location", f"/slow-redirect-{hop + 1}" if hop < 5 else "/ok.png")
                self.end_headers()
            elif self.path.startswith("/redirect"):
                target = {"/redirect-ftp": "ftp://127.0.0.1/x.png", "/redirect-ok": "/ok.png"}[self.path]
                self.send_response(302)
                self.send_header("Location", target)
                self.end_headers()
            elif self.path == "/ok.png":
                self.send_png(body)
            else:
                self.send_error(404)

    yield from _serve(Handler)


@pytest.mark.parametrize("path", ["/trickle-body.png", "/trickle-headers.png", "/slow-redirect-1"])
def test_url_timeout_bounds_the_whole_transfer(hostile_server: str, path: str) -> None:
    start = time.monotonic()
    error = _load_in_thread(f"{hostile_server}{path}", seconds=10, index=4, timeout=1.0)
    elapsed = time.monotonic() - start
    assert isinstance(error, ImageLoadError)
    assert re.fullmatch(rf"item 4: cannot load image 'http://127\.0\.0\.1:\d+{path}': fetch timed out after 1\.0s",
                        str(error)), str(error)
    assert elapsed < 2.0, f"a 1 s fetch took {elapsed:.1f}s"


def test_declared_oversized_response_is_refused_before_reading(hostile_server: str) -> None:
    with pytest.raises(ImageLoadError, match=r"^item 0: cannot load image '.*/huge\.png': response of "
                                             r"1000000000000 bytes is larger than 67108864 bytes$"):
        load_image(f"{hostile_server}/huge.png", index=0, timeout=5)


def test_redirect_to_another_scheme_is_refused(hostile_server: str) -> None:
    assert_red(load_image(f"{hostile_server}/redirect-ok", timeout=5))  # http -> http is followed
    error = _load_in_thread(f"{hostile_server}/redirect-ftp", seconds=10, index=3, timeout=3)
    assert isinstance(error, ImageLoadError)
    assert re.fullmatch(r"item 3: cannot load image 'http://.*/redirect-ftp': redirected to "
                        r"'ftp://127\.0\.0\.1/x\.png': only http and https URLs are fetched", str(error)), str(error)
