"""The size an image will have once loaded, read from its header where the source allows.

Families whose token count depends on the image's size (Qwen3-VL's dynamic resolution) need it before the
batch plan, without decoding every image of a large call twice: a PIL image, a file, bytes and data URIs give it
from the header (EXIF orientation applied as :func:`~mmembed_rag.images.load_image` applies it); a URL or an
array is loaded in full and handed back, so it is not fetched or converted again.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import ImageLoadError
from .images import (
    _DECODE_ERRORS,
    _SCHEME_RE,
    DEFAULT_MAX_PIXELS,
    ImageSource,
    _decode_data_uri,
    _open_regular_file,
    _shorten,
    describe_source,
    load_image,
)

__all__ = ["probe_image"]

_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def probe_image(source: ImageSource, *, index: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                timeout: float = 10.0, release_compatible: bool = False) -> tuple[tuple[int, int], Image.Image | None]:
    """``((width, height), loaded)``: the size :func:`load_image` would give, and the image when it had to load it.

    Raises:
        ImageLoadError: as :func:`load_image` (unreadable, corrupt header, too large, no pixels...).
    """
    if isinstance(source, Image.Image):
        return _upright(source, release_compatible), None
    header = _header_stream(source, index)
    if header is None:  # URL, array, or something load_image will refuse with its own message
        image = load_image(source, index=index, max_pixels=max_pixels, timeout=timeout,
                           release_compatible=release_compatible)
        return image.size, image
    prefix = f"item {index}: " if index is not None else ""
    desc = _shorten(describe_source(source))
    try:
        with header as fp, Image.open(fp) as opened:
            width, height = opened.size
            if width < 1 or height < 1 or (max_pixels is not None and width * height > max_pixels):
                load_image(source, index=index, max_pixels=max_pixels, release_compatible=release_compatible)
            return _upright(opened, release_compatible), None
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{prefix}cannot load image {desc!r}: unknown or unsupported image format") from exc
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"{prefix}cannot load image {desc!r}: corrupt or truncated image data ({exc})") from exc


def _header_stream(source: ImageSource, index: int | None) -> io.BufferedIOBase | None:
    """A stream over the image's bytes for a file, bytes or data URI; ``None`` for anything else."""
    def fail(reason: str) -> ImageLoadError:
        prefix = f"item {index}: " if index is not None else ""
        return ImageLoadError(f"{prefix}cannot load image {_shorten(describe_source(source))!r}: {reason}")

    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(bytes(source)) if source else None
    if isinstance(source, str) and source[:5].lower() == "data:":
        return io.BytesIO(_decode_data_uri(source, fail))
    if isinstance(source, str) and _SCHEME_RE.match(source):
        return None
    if isinstance(source, (str, Path)) and str(source):
        return _open_regular_file(Path(source).expanduser(), fail)
    return None


def _upright(image: Image.Image, release_compatible: bool) -> tuple[int, int]:
    width, height = image.size
    if not release_compatible and image.getexif().get(0x0112) in _TRANSPOSED:
        return height, width
    return width, height
