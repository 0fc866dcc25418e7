"""What every front end of the guide shares: checking what a client sends, and the result it gets.

The JSON service (`hgm_mm.apps.service`, `hgm-mm serve`), the example upload app (`examples/app`) and
`hgm-mm match --service` all go through these functions and one `Matcher`, so a photo refused by
one is refused by all, with the same words, and a result reads the same everywhere.

Nothing a client sends reaches the file system by name: uploads are read as bytes, their file
names are never used, and product photos are served by product id from the index's own metadata.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..data import ImageError, load_image

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
ACCEPTED_MEDIA_TYPES = tuple(f"image/{name.lower()}" for name in ACCEPTED_FORMATS)
DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 25_000_000
MAX_TEXT_CHARS = 300
MAX_K = 100  # products one request may ask for
MAX_EVENTS = 1_000  # events one request may carry for its profile
PRIVATE_METADATA = ("image",)  # server paths: never sent to a client, never filtered on by one
WORKING_SIDE = 1024  # the model sees views of a few hundred pixels; a larger photo only costs time


class RequestRefused(Exception):
    """A request the guide will not match; `message` tells the person what to do instead, `status`
    is the HTTP status that says why (400 bad input, 413 too large, 415 not an image)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def read_room_photo(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes uploaded bytes into an RGB room photo, or refuses them with a message for people.

    The header is read first: only JPEG, PNG and WebP are accepted, and the pixel count is
    checked before any pixel is decoded, so a huge photo is refused at once.

    Args:
        data: The uploaded file's bytes.
        max_pixels: Largest width * height accepted.

    Returns:
        The photo, EXIF orientation applied, downscaled to at most ``WORKING_SIDE`` pixels a side.

    Raises:
        RequestRefused: Empty, not an image of an accepted format, too many pixels, or corrupt.
    """
    if not data:
        raise RequestRefused("Choose a photo of your room to upload.", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as header:
                width, height = header.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestRefused(f"This photo has far too many pixels; the limit is "
                             f"{max_pixels / 1e6:g} megapixels. Downscale it and upload it again.", 413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestRefused("This file is not an image. Upload a photo of your room as a JPEG, PNG "
                             "or WebP file.", 415) from None
    if width * height > max_pixels:
        raise RequestRefused(f"This photo is {width} x {height} pixels ({width * height / 1e6:.1f} "
                             f"megapixels); the limit is {max_pixels / 1e6:g} megapixels. Downscale it "
                             "and upload it again.", 413)
    try:
        photo = load_image(io.BytesIO(data), max_pixels=max_pixels)
    except ImageError:
        raise RequestRefused("This photo could not be decoded: it is truncated or corrupt. Save it "
                             "again as a JPEG or PNG and upload it again.", 400) from None
    photo.thumbnail((WORKING_SIDE, WORKING_SIDE))
    return photo


def read_wish(text: str | None) -> str | None:
    """The optional words a person typed, trimmed; refused when longer than ``MAX_TEXT_CHARS``."""
    if text is not None and not isinstance(text, str):
        raise RequestRefused(f"text must be a string, got {type(text).__name__}.")
    text = (text or "").strip()
    if len(text) > MAX_TEXT_CHARS:
        raise RequestRefused(f"Describe what you want in at most {MAX_TEXT_CHARS} characters "
                             f"(you typed {len(text)}).", 400)
    return text or None


def read_k(value: Any, *, max_k: int = MAX_K) -> int:
    """How many products a request asks for: an int in [1, max_k] (a form sends it as text)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_k:
        raise RequestRefused(f"k={value!r}; ask for between 1 and {max_k} products.")
    return value


def read_filter(value: str | Mapping | None) -> dict[str, Any] | None:
    """A request's metadata filter, as `ProductIndex.search` takes it, from a JSON object (or its text).

    Each value is a string or number (equal to), a list of them (any of), or ``{"min": x, "max": y}``
    (an inclusive range, either bound omitted): ``{"category": ["sofa", "chair"], "price": {"max": 800}}``.
    """
    value = _json_field(value, "filter", 'an object such as {"category": ["sofa"], "price": {"max": 800}}')
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RequestRefused(f"filter must be a JSON object of attribute -> condition, got {type(value).__name__}.")
    conditions: dict[str, Any] = {}
    for key, condition in value.items():
        if key in PRIVATE_METADATA:
            raise RequestRefused(f"filter {key!r}: {key} is where a file lies on the server, not a product attribute.")
        if isinstance(condition, Mapping):
            unknown = sorted(set(condition) - {"min", "max"})
            bounds = [condition.get("min"), condition.get("max")]
            if unknown or not any(b is not None for b in bounds) or not all(
                    b is None or (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b))
                    for b in bounds):
                raise RequestRefused(f"filter {key!r}: a range is {{\"min\": number, \"max\": number}} with at "
                                     f"least one bound; got {dict(condition)!r}.")
            conditions[key] = tuple(bounds)
        elif isinstance(condition, list):
            if not condition or not all(_is_scalar(c) for c in condition):
                raise RequestRefused(f"filter {key!r}: a list holds one or more strings or numbers.")
            conditions[key] = condition
        elif _is_scalar(condition):
            conditions[key] = condition
        else:
            raise RequestRefused(f"filter {key!r}: expected a string, a number, a list of them or a "
                                 f"{{\"min\", \"max\"}} range; got {type(condition).__name__}.")
    return conditions or None


def _json_field(value: Any, name: str, expected: str) -> Any:
    """A form field that holds JSON text (or, from Python, the value itself); None when empty."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RequestRefused(f"{name} is not valid JSON ({err.msg} at column {err.colno}); send {expected}.") from None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and math.isfinite(value))


def read_events(value: str | list | None, index) -> "Any":
    """A shopper's own events, sent with a request, as the `UserProfile` that personalises it.

    `value` is a JSON list (or its text) of ``{"product_id", "event", "timestamp"}`` objects
    (event: view, cart or purchase; timestamp: seconds since the epoch or ISO-8601), at most
    ``MAX_EVENTS``; products the index does not hold are ignored, as in `UserProfile.from_events`.
    """
    from ..data.events import event_from_row
    from ..ranking.profile import UserProfile

    value = _json_field(value, "events", 'a list of {"product_id", "event", "timestamp"} objects')
    if value is None:
        return None
    if not isinstance(value, list):
        raise RequestRefused(f"events must be a JSON list, got {type(value).__name__}.")
    if len(value) > MAX_EVENTS:
        raise RequestRefused(f"events holds {len(value)} entries; send at most {MAX_EVENTS} (the latest).", 413)
    events = []
    for position, row in enumerate(value):
        if not isinstance(row, Mapping) or sorted(row) != ["event", "product_id", "timestamp"]:
            raise RequestRefused(f"events[{position}]: expected an object with exactly product_id, event and "
                                 "timestamp.")
        try:
            events.append(event_from_row({"user_id": "shopper", **row}, f"events[{position}]"))
        except ValueError as err:
            raise RequestRefused(str(err)) from None
    if not events:
        return None
    return UserProfile.from_events(events, "shopper", index=index)


def result_document(result, photo_url: Callable[[str], str]) -> dict[str, Any]:
    """`MatchResult.to_dict()` for a client: each product's image path on this server replaced by
    ``photo_url(product_id)``, where the client fetches it."""
    document = result.to_dict()
    for product in [*document["products"], *document["product_set"]]:
        for key in PRIVATE_METADATA:
            product["metadata"].pop(key, None)
        product["photo_url"] = photo_url(product["product_id"])
    return document


def product_document(index, product_id: str, photo_url: Callable[[str], str]) -> dict[str, Any]:
    """One catalogue product for a client: its id, metadata (no server path) and photo URL."""
    metadata = index.metadata(product_id)
    for key in PRIVATE_METADATA:
        metadata.pop(key, None)
    return {"product_id": product_id, "metadata": metadata, "photo_url": photo_url(product_id)}
