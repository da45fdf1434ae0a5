"""Safe image loading: turn any supported image source into a decoded, upright RGB ``PIL.Image.Image``.

Accepted sources: a ``PIL.Image.Image``; a filesystem path (``str`` or ``pathlib.Path``); raw ``bytes`` /
``bytearray``; a ``data:`` URI (base64 or percent-encoded); an ``http(s)://`` URL; a ``numpy`` ``uint8``
(or ``bool``) array shaped HxW, HxWx1, HxWx3 or HxWx4. The pixel count is checked from the header before
any pixel data is decoded. PIL's own global ``Image.MAX_IMAGE_PIXELS`` guard is left untouched, so images
beyond it are still refused by PIL even when ``max_pixels=None``. Only regular files are read (a FIFO or a
device would block or never end); a URL fetch is bounded in time as a whole (connect, headers and body share one
deadline) and in size, and follows redirects to http(s) URLs only. Every failure raises
:class:`~mmembed_rag.errors.ImageLoadError`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import logging
import os
import re
import socket
import stat
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmembed_rag.errors import ImageLoadError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SOURCE_TYPES", "ImageSource", "describe_source", "load_image"]

logger = logging.getLogger(__name__)

#: Default upper bound on ``width * height`` (decompression-bomb guard).
DEFAULT_MAX_PIXELS = 64_000_000
#: Largest HTTP response body read when fetching a URL.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024

ImageSource: TypeAlias = Image.Image | str | Path | bytes | bytearray | np.ndarray
#: Runtime tuple of the types in :data:`ImageSource` (for ``isinstance`` checks).
IMAGE_SOURCE_TYPES: tuple[type, ...] = (Image.Image, str, Path, bytes, bytearray, np.ndarray)

_ACCEPTED = (
    "a PIL.Image.Image, a path (str or pathlib.Path), bytes, a data URI, an http(s) URL "
    "or a numpy uint8 array"
)
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_Fail: TypeAlias = Callable[[str], ImageLoadError]
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Exceptions PIL (or its plugins) may raise on bad or truncated data.
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_source(source: object) -> str:
    """Return a short human-readable reference to an image source, suitable for storing or logging.

    Args:
        source: Any value; need not be a valid image source.

    Returns:
        The path or URL string, ``"data:image/png;base64,... (1234 chars)"`` for data URIs,
        ``"<PIL image 30x20>"``, ``"<bytes 1234>"``, ``"<array 20x30x3 uint8>"`` or ``"<TypeName>"``.
    """
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height}>"
    if isinstance(source, Path):
        return str(source)
    if isinstance(source, str):
        if source[:5].lower() == "data:":
            header = source.split(",", 1)[0]
            return f"{_shorten(header, 60)},... ({len(source)} chars)"
        return source
    if isinstance(source, (bytes, bytearray)):
        return f"<bytes {len(source)}>"
    if isinstance(source, np.ndarray):
        return f"<array {'x'.join(map(str, source.shape))} {source.dtype}>"
    return f"<{type(source).__name__}>"


def load_image(
    source: ImageSource,
    *,
    index: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    timeout: float = 10.0,
    release_compatible: bool = False,
) -> Image.Image:
    """Load an image source into a new, fully decoded RGB image.

    EXIF orientation is applied, transparency is composited onto white, and high-bit-depth modes
    (``I;16``, ``I``, ``F``) are scaled to 8 bits: what a photo means, not how its bytes are stored.
    ``release_compatible=True`` does what the MM-Embed release's image processor (transformers 4.42) does
    instead -- pixels in stored order (no EXIF orientation) and PIL's ``convert("RGB")`` (alpha dropped, not
    composited) -- to reproduce its embeddings exactly. The caller's image or array is never modified.

    Args:
        source: The image source (see the module docstring for accepted kinds).
        index: Position of the owning item; when given, error messages start with ``"item {index}: "``.
        max_pixels: Refuse images whose ``width * height`` exceeds this, checked before decoding.
            ``None`` disables this check.
        timeout: Seconds a URL fetch may take in all (connect, headers and body share one deadline, so a
            server that trickles bytes cannot keep it alive).
        release_compatible: convert as the release does (see above) instead of the upright, white-composited RGB.

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``RGB``.

    Raises:
        ImageLoadError: The source has an unsupported type, cannot be read, fetched or decoded, is not a
            regular file, has no pixels (0xN), or is too large.
    """
    prefix = f"item {index}: " if index is not None else ""
    desc = _shorten(describe_source(source))

    def fail(reason: str) -> ImageLoadError:
        return ImageLoadError(f"{prefix}cannot load image {desc!r}: {reason}")

    def check_size(width: int, height: int) -> None:
        if width < 1 or height < 1:  # PIL and numpy allow 0xN images; embedding one would embed nothing
            raise fail(f"image has no pixels ({width}x{height})")
        if max_pixels is not None and width * height > max_pixels:
            raise fail(f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}")

    if isinstance(source, Image.Image):
        check_size(*source.size)
        return _finish(source, fail, release_compatible)
    if isinstance(source, np.ndarray):
        return _finish(_from_array(source, fail, check_size), fail, release_compatible)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise fail("no image data (0 bytes)")
        return _decode(io.BytesIO(bytes(source)), fail, check_size, release_compatible)
    if isinstance(source, str) and source[:5].lower() == "data:":
        return _decode(io.BytesIO(_decode_data_uri(source, fail)), fail, check_size, release_compatible)
    if isinstance(source, str) and _SCHEME_RE.match(source):
        if not source.lower().startswith(("http://", "https://")):
            raise fail("unsupported URL scheme (only http and https can be fetched)")
        return _decode(io.BytesIO(_fetch(source, timeout, fail)), fail, check_size, release_compatible)
    if not isinstance(source, (str, Path)):
        raise fail(f"unsupported image source type {type(source).__name__}; expected {_ACCEPTED}")
    if not str(source):
        raise fail("empty path")
    with _open_regular_file(Path(source).expanduser(), fail) as fp:
        return _decode(fp, fail, check_size, release_compatible)


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _open_regular_file(path: Path, fail: _Fail) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file (checked on the opened descriptor: no race)."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as exc:
        raise fail("file not found") from exc
    except IsADirectoryError as exc:
        raise fail("path is a directory, not an image file") from exc
    except (OSError, ValueError) as exc:  # permission denied, name too long, symlink loop, NUL byte in path...
        raise fail(f"cannot read file ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise fail("path is a directory, not an image file")
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
            raise fail(f"path is {kind}, not a regular image file")
        os.set_blocking(fd, True)  # a regular file ignores the flag; cleared so the reads are plain ones
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(fp: BinaryIO, fail: _Fail, check_size: Callable[[int, int], None],
            release_compatible: bool) -> Image.Image:
    """Open from a binary stream, check the header size, then decode fully."""
    try:
        with Image.open(fp) as opened:
            check_size(*opened.size)  # header only: no pixel data decoded yet
            return _finish(opened, fail, release_compatible)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        raise fail("unknown or unsupported image format") from exc
    except Image.DecompressionBombError as exc:
        raise fail(f"refused by PIL's decompression-bomb guard ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise fail(f"corrupt or truncated image data ({exc})") from exc


def _finish(image: Image.Image, fail: _Fail, release_compatible: bool) -> Image.Image:
    """Decode, apply EXIF orientation and convert to RGB (or convert as the release does); a new image."""
    try:
        image.load()
        if release_compatible:
            rgb = image.convert("RGB") if image.mode != "RGB" else image.copy()
        else:
            upright = ImageOps.exif_transpose(image)  # a copy even when no rotation is needed
            rgb = _to_rgb(upright)
        rgb.load()
    except _DECODE_ERRORS as exc:
        raise fail(f"corrupt or truncated image data ({exc})") from exc
    return rgb


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit integer or float pixels to uint8 (fixed range when known, else min-max)."""
    values = np.nan_to_num(arr.astype(np.float64))
    if mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = values * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = values
        elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
            scaled = values / 257.0
        else:
            scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _from_array(arr: np.ndarray, fail: _Fail, check_size: Callable[[int, int], None]) -> Image.Image:
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise fail(f"numpy array must have dtype uint8 or bool, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise fail(f"numpy array must be shaped HxW, HxWx1, HxWx3 or HxWx4, got {arr.shape}")
    check_size(arr.shape[1], arr.shape[0])
    return Image.fromarray(np.ascontiguousarray(arr))


def _decode_data_uri(uri: str, fail: _Fail) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise fail("malformed data URI (no ',' separating header and data)")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise fail(f"invalid base64 in data URI ({exc})") from exc
    return urllib.parse.unquote_to_bytes(payload)


class _DeadlineReader(io.RawIOBase):
    """A socket's reads sharing one deadline: each waits at most until it, however the server paces its bytes."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._raw, self._sock, self._deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int | None:  # type: ignore[override]
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the fetch's deadline passed")
        self._sock.settimeout(remaining)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the socket's own reader: closing it releases the socket
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: object, deadline: float, **kwargs: object) -> None:
        super().__init__(sock, *args, **kwargs)
        # Status line, headers and body are read through the deadline; the socket reader is kept (it holds the
        # socket open after urllib closes the connection's reference).
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


class _DeadlineConnection:
    """Connection mixin: connect within what is left of the deadline (a redirect opens a new connection), and read
    the response through it."""

    def __init__(self, *args: Any, deadline: float, timeout: float, **kwargs: Any) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the fetch's deadline passed")
        super().__init__(*args, timeout=min(timeout, remaining), **kwargs)
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)


class _DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: float) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPConnection, deadline=self._deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: float) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPSConnection, deadline=self._deadline), req,
                            context=self._context)


class _RefusedRedirect(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class _HTTPOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: urllib's default also follows ``ftp://``, past our scheme check."""

    def redirect_request(self, req: urllib.request.Request, fp: BinaryIO, code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            fp.close()
            raise _RefusedRedirect(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, timeout: float, fail: _Fail) -> bytes:
    logger.debug("fetching image %s (timeout %.1fs)", _shorten(url), timeout)
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline),
                                         _HTTPOnlyRedirectHandler())
    request = urllib.request.Request(url, headers={"User-Agent": "mmembed-rag"})
    try:
        with opener.open(request, timeout=timeout) as response:  # scheme checked by the caller and on redirects
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > MAX_DOWNLOAD_BYTES:
                raise fail(f"response of {declared} bytes is larger than {MAX_DOWNLOAD_BYTES} bytes")
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except ImageLoadError:
        raise
    except _RefusedRedirect as exc:
        raise fail(f"redirected to {_shorten(exc.url)!r}: only http and https URLs are fetched") from None
    except urllib.error.HTTPError as exc:
        raise fail(f"HTTP error {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise fail(f"fetch timed out after {timeout}s") from exc
        raise fail(f"cannot fetch URL ({exc.reason})") from exc
    except TimeoutError as exc:
        raise fail(f"fetch timed out after {timeout}s") from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise fail(f"cannot fetch URL ({exc})") from exc
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise fail(f"response larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data
