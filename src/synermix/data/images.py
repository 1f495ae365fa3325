"""Decode one image file safely and describe it for the manifest.

:func:`inspect_image` never raises on bad input: a zero-byte file, a text file named
``.jpg``, a truncated PNG or an image past the pixel limit comes back with
``decodable=False`` and a reason, so one bad photo never stops a dataset. Its work is
bounded before any pixel is decoded: only the formats in ``choices.IMAGE_FORMATS`` are
opened, and the header's size must be within the pixel limit and
``choices.MAX_ASPECT_RATIO`` (the later resize scales the shorter side up). Decodable
images are brought to a canonical mode (``L`` for grey-level sources, ``RGB`` for
colour), EXIF orientation applied, and described by grey-level mean and standard
deviation (for blank/saturated frame checks) and a hash of their pixels (so a re-encoded
copy of the same picture is recognised as the same content).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from synermix.choices import IMAGE_FORMATS, MAX_ASPECT_RATIO

#: File extensions accepted from a ``<class>/<image>`` folder (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

#: Source modes whose pixels are grey levels (converted to 8-bit ``L``).
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def is_grey_mode(mode: str) -> bool:
    """Whether a source image of this Pillow mode becomes grey-level (``L``) in prepare."""
    return mode in _GREY_MODES


@dataclass(frozen=True)
class ImageInfo:
    """What the manifest records about one source image."""

    decodable: bool
    error: str
    format: str
    width: int
    height: int
    mode: str
    mean_intensity: float
    std_intensity: float
    content_sha256: str
    image: Image.Image | None = None  # canonical (L or RGB) pixels, only when decodable


def _failed(reason: str, data: bytes, fmt: str = "", width: int = 0, height: int = 0, mode: str = ""):
    return ImageInfo(
        decodable=False,
        error=reason,
        format=fmt,
        width=width,
        height=height,
        mode=mode,
        mean_intensity=float("nan"),
        std_intensity=float("nan"),
        content_sha256=hashlib.sha256(data).hexdigest(),
    )


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """High-bit-depth or float grey images to 8 bits, scaling by the type's range."""
    if image.mode in {"1", "L"}:
        return image.convert("L")
    if image.mode in {"LA", "La"}:
        return image.getchannel(0)
    array = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(array, 0.0, 255.0)
    else:  # I;16 variants and 32-bit I: treat as 16-bit data
        scaled = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def canonicalise(image: Image.Image) -> Image.Image:
    """Return ``image`` as 8-bit ``L`` (grey sources) or ``RGB`` (everything else)."""
    if image.mode in _GREY_MODES:
        return _to_8bit_grey(image)
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in {"RGBA", "RGBa"}:
        return image.convert("RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` pixels, keeping the aspect ratio."""
    width, height = image.size
    if min(width, height) == size:
        return image
    scale = size / min(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new, Image.Resampling.BILINEAR)


def fit_square(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """The model's view of a canonical image: ``size x size x channels`` uint8 pixels.

    Grey (``channels=1``) or RGB, shorter side scaled to ``size`` (bilinear, no reducing
    gap), then the centre ``size x size`` square. Training (from the prepared PNGs) and
    inference (from file bytes, :mod:`synermix.inference`) both call this, so they see the
    same pixels.
    """
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)


#: ``reserve(width, height, mode)``: a context held while those pixels decode (serve
#: bounds concurrent decodes by memory with it); raising refuses the image
Reserve = Callable[[int, int, str], AbstractContextManager]


def inspect_image(
    data: bytes, max_pixels: int, *, describe: bool = True, reserve: Reserve | None = None
) -> ImageInfo:
    """Decode ``data`` (a whole image file) without trusting it.

    ``max_pixels`` is the decompression-bomb guard: an image whose header declares more
    pixels, or a longest side more than ``MAX_ASPECT_RATIO`` times its shortest, is refused
    before any pixel is decoded. ``describe=False`` skips the statistics and the pixel hash
    the manifest needs and a prediction does not (their fields are NaN and empty).
    """
    if not data:
        return _failed("empty file (0 bytes)", data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own, coarser guard fired first
        return _failed(f"{exc} (decompression-bomb guard, data.max_pixels={max_pixels})", data)
    except UnidentifiedImageError:
        return _failed(
            f"not an image file of a format read here ({', '.join(IMAGE_FORMATS)}): "
            "wrong extension or corrupt header",
            data,
        )
    except (OSError, SyntaxError, ValueError) as exc:
        return _failed(f"unreadable image header: {exc}", data)
    fmt = image.format or ""
    width, height = image.size
    mode = image.mode
    if width * height > max_pixels:
        return _failed(
            f"{width}x{height} = {width * height} pixels is past data.max_pixels={max_pixels} "
            "(decompression-bomb guard)",
            data,
            fmt,
            width,
            height,
            mode,
        )
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        return _failed(
            f"{width}x{height}: one side is more than {MAX_ASPECT_RATIO} times the other "
            "(resizing it to the model's input would take far more memory than the file); "
            "crop it closer to the part",
            data,
            fmt,
            width,
            height,
            mode,
        )
    with (reserve or _no_reservation)(width, height, mode):  # what it raises reaches the caller
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.load()
                image = ImageOps.exif_transpose(image)
                canonical = canonicalise(image)
        except Image.DecompressionBombError:
            return _failed("past Pillow's decompression-bomb limit", data, fmt, width, height, mode)
        except (OSError, SyntaxError, ValueError, TypeError) as exc:
            reason = str(exc) or type(exc).__name__
            if "truncated" in reason.lower():
                reason = f"truncated file ({reason})"
            return _failed(f"cannot decode pixels: {reason}", data, fmt, width, height, mode)

    if not describe:
        return ImageInfo(True, "", fmt, width, height, mode, float("nan"), float("nan"), "", canonical)
    grey = np.asarray(canonical if canonical.mode == "L" else canonical.convert("L"), dtype=np.float64)
    digest = hashlib.sha256()
    digest.update(f"{canonical.mode}:{canonical.width}x{canonical.height}:".encode())
    digest.update(canonical.tobytes())
    return ImageInfo(
        decodable=True,
        error="",
        format=fmt,
        width=width,
        height=height,
        mode=mode,
        mean_intensity=round(float(grey.mean()), 4),
        std_intensity=round(float(grey.std()), 4),
        content_sha256=digest.hexdigest(),
        image=canonical,
    )


def _no_reservation(width: int, height: int, mode: str) -> AbstractContextManager:
    return nullcontext()


def decode_bytes(width: int, height: int, mode: str) -> int:
    """About the most memory decoding an image of this header takes: the decoded frame and
    its canonical copy (a grey 16-bit or float source becomes an 8-bit one, colour RGB)."""
    source = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 2}.get(mode, 4)
    canonical = 1 if is_grey_mode(mode) else 3
    return width * height * (source + canonical)


def encode_png(image: Image.Image) -> bytes:
    """Deterministic PNG bytes (no timestamps or text chunks)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
