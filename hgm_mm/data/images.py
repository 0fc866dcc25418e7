"""Loading photos as RGB images, safely.

:func:`load_image` is the one place the library decodes an image file. It always returns a fully
decoded ``RGB`` image with EXIF orientation applied, or raises :class:`ImageError`: it refuses
truncated or corrupt files, non-image files and decompression bombs (checked from the header,
before any pixel is decoded). It never sets ``ImageFile.LOAD_TRUNCATED_IMAGES``.

Mode policy (what each Pillow mode becomes):

* ``RGB``: unchanged. ``L``, ``1``: gray copied to the three channels.
* ``P`` (palette): looked up in the palette; transparent entries are composited onto white.
* ``LA``, ``PA``, ``RGBA`` (and premultiplied ``La``/``RGBa``): composited onto white.
* ``CMYK``: Pillow's CMYK to RGB conversion (no ICC colour management).
* ``I;16`` (and ``I;16B``/``I;16L``/``I;16N``) and ``I``: read as 16-bit, ``0..65535`` scaled
  to ``0..255`` (value / 257, rounded); ``I`` values outside ``0..65535`` are clipped.
* ``F``: read on Pillow's 8-bit scale (``0..255``, rounded; outside values and NaN clipped),
  the same as ``Image.convert("L")``.
* Anything else (``YCbCr``, ``HSV``, ...): ``Image.convert("RGB")``; a mode Pillow cannot
  convert raises :class:`ImageError`.

Callers that must keep going past bad files (training) use ``on_error="skip"`` in
:func:`load_images`, or a :class:`SkipCounter` per item, and report the count.
"""
from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000

ImageSource = str | Path | IO[bytes]

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
# Errors Pillow and its decoders raise on broken data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                  TypeError, zlib.error)


class ImageError(ValueError):
    """An image file cannot be used; the message names the file and the fix.

    Attributes:
        source: The path (or the file object's name) of the image.
        problem: The message without the file name prefix.
    """

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.source, self.problem))


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, (str, Path)) else f"<{type(source).__name__}>"


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes an image file into an ``RGB`` image.

    Args:
        source: A path, or a binary file object positioned at the image data (it is read,
            not closed).
        max_pixels: Largest ``width * height`` accepted, checked from the header before
            decoding.

    Returns:
        A fully loaded ``RGB`` image, EXIF orientation applied, independent of the file.

    Raises:
        ImageError: The file is missing, not an image, truncated or corrupt, larger than
            ``max_pixels`` (or Pillow's own decompression-bomb limit), or in a mode that cannot
            be converted.
    """
    if not isinstance(source, (str, Path)) and not hasattr(source, "read"):
        raise TypeError(f"source must be a path or a binary file object, got {type(source).__name__}")
    name = _describe(source)
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise ImageError(name, "file not found; fix the path or add the file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(name, f"{width}x{height} = {width * height:,} pixels exceeds "
                                           f"max_pixels={max_pixels:,} (possible decompression "
                                           "bomb); downscale the file or raise max_pixels")
                img.load()
                return prepare_image(img, max_pixels=max_pixels, name=name)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, f"refused as a decompression bomb ({exc}); downscale the file") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image file Pillow can read; remove it or replace it with "
                               "a JPEG/PNG/WebP") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(name, f"truncated or corrupt image ({type(exc).__name__}: {exc}); "
                               "re-download or re-export the file") from None


def prepare_image(img: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "PIL image") -> Image.Image:
    """The image policy of `load_image` for an image already in memory (what the API is handed):
    EXIF orientation applied, then the mode policy (alpha on white, 16-bit scaled, ...) -> ``RGB``.

    Every image input, a path or a PIL image, goes through this, so the same photo gives the
    same pixels either way. The input is not changed.

    Raises:
        TypeError: `img` is not a PIL image.
        ImageError: it is larger than `max_pixels`, or in a mode that cannot be converted.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(name, f"{width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,}; "
                               "downscale it")
    transposed = ImageOps.exif_transpose(img)  # a copy when the orientation changes
    return _to_rgb(transposed if transposed is not None else img, name)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    # ``img`` is already independent of the file (exif_transpose returns a copy).
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "1"):
        return img.convert("RGB")
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in _ALPHA_MODES:
        return _composite_on_white(img.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(img).astype(np.float64)  # (H, W)
        gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        gray = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)  # (H, W)
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageError(name, f"cannot convert mode {mode!r} to RGB ({exc}); re-export the file "
                               "as an 8-bit RGB JPEG or PNG") from None


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


@dataclass
class SkipCounter:
    """Loads images one at a time, skipping and counting the ones that fail.

    Meant for per-item loading in training, where one bad photo must not stop a run: ``load``
    returns ``None`` for a bad file and records it. Report ``count`` (or ``summary()``) at the
    end. Each process keeps its own counter: with ``DataLoader(num_workers > 0)`` the counts of
    worker processes do not reach the main process, so report them from the workers.

    Attributes:
        max_pixels: Passed to :func:`load_image`.
        skipped: ``(source, reason)`` for every image skipped, in order.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Number of images skipped so far."""
        return len(self.skipped)

    def load(self, source: ImageSource) -> Image.Image | None:
        """Loads one image, or records the failure and returns ``None``.

        Only :class:`ImageError` is caught; any other exception is a bug and propagates.
        """
        try:
            return load_image(source, max_pixels=self.max_pixels)
        except ImageError as exc:
            self.skipped.append((exc.source, exc.problem))
            return None

    def summary(self) -> str:
        """One line such as ``"skipped 2 unreadable images (first: a.jpg: truncated ...)"``."""
        if not self.skipped:
            return "skipped 0 images"
        source, reason = self.skipped[0]
        return f"skipped {self.count} unreadable image(s) (first: {source}: {reason})"


def load_images(
    sources: Iterable[ImageSource],
    *,
    on_error: Literal["raise", "skip"] = "raise",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[Image.Image], list[tuple[str, str]]]:
    """Loads several images with :func:`load_image`.

    Args:
        sources: Paths or binary file objects.
        on_error: ``"raise"`` stops at the first bad image; ``"skip"`` leaves it out and records
            it in the second return value.
        max_pixels: Passed to :func:`load_image`.

    Returns:
        ``(images, skipped)``: the images loaded, in input order with the skipped ones left out,
        and ``(source, reason)`` for each one skipped (always empty with ``"raise"``).

    Raises:
        ImageError: With ``on_error="raise"``, at the first bad image.
        ValueError: When ``on_error`` is neither ``"raise"`` nor ``"skip"``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if on_error == "raise":
        return [load_image(s, max_pixels=max_pixels) for s in sources], []
    counter = SkipCounter(max_pixels=max_pixels)
    images = [img for img in (counter.load(s) for s in sources) if img is not None]
    return images, counter.skipped
