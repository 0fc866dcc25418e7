"""The contact sheet: each room photo beside the products the guide ranked for it, with titles and
categories, the products that really appear in the room framed in green, and what the guide said
of the room's scene beside its true scene."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import ImageError, Room, load_image
from ..data.scenes import scene_words
from ..files import atomic_write

HIT_COLOUR = (40, 160, 60)  # frame of a product that appears in the room
_PAGE = (255, 255, 255)
_INK = (30, 30, 30)
_MUTED = (110, 110, 110)


def scene_verdict(result) -> str:
    """What the guide says of a room's scene: "living room (83%)", or "not sure (living room 41%?)"."""
    probability = result.scene_probabilities.get(result.scene, 0.0)
    if getattr(result, "scene_confident", True):
        return f"{scene_words(result.scene)} ({probability:.0%})"
    return f"not sure ({scene_words(result.scene)} {probability:.0%}?)"


def write_contact_sheet(path: str | os.PathLike, rows: Sequence[tuple[Room, Any]],
                        positives: dict[str, set[str]] | None = None, *, title: str = "", tile: int = 160,
                        room_height: int = 220) -> Path:
    """Draws each room photo beside its ranked products (photo, title, score) and saves it (JPEG or PNG by suffix).

    Args:
        path: The image to write, atomically.
        rows: (room, `MatchResult`) pairs, one row each.
        positives: Room id -> ids of the products in that room; those are framed in green.
        title: A line at the top.
        tile: Side of a product photo, in pixels.
        room_height: Height of a room photo, in pixels.
    """
    from PIL import Image, ImageDraw

    path = Path(path)
    positives = positives or {}
    font, small = _font(14), _font(12)
    room_width = room_height * 3 // 2
    k = max((len(result.products) for _, result in rows), default=0)
    gap, caption = 12, 44
    row_height = 22 + max(room_height, tile + caption) + gap
    width = gap + room_width + gap + k * (tile + gap)
    height = (28 if title else gap) + len(rows) * row_height
    sheet = Image.new("RGB", (max(width, 400), height), _PAGE)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, 7), title, fill=_INK, font=font)
    top = 28 if title else gap
    for room, result in rows:
        draw.text((gap, top), f"{room.room_id}   true scene: {scene_words(room.scene or '?')}   the guide sees: "
                              f"{scene_verdict(result)}", fill=_INK, font=font)
        y = top + 22
        sheet.paste(_fit(load_image(room.image), room_width, room_height), (gap, y))
        for column, product in enumerate(result.products):
            x = gap + room_width + gap + column * (tile + gap)
            image_path = product.metadata.get("image")
            try:
                photo = _fit(load_image(image_path), tile, tile) if image_path else None
            except ImageError:
                photo = None
            if photo is not None:
                sheet.paste(photo, (x, y))
            else:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=_MUTED)
                draw.text((x + 8, y + tile // 2), "no photo", fill=_MUTED, font=small)
            if product.product_id in positives.get(room.room_id, ()):
                draw.rectangle((x - 3, y - 3, x + tile + 2, y + tile + 2), outline=HIT_COLOUR, width=4)
            name = str(product.metadata.get("title") or product.product_id)
            category = product.metadata.get("category") or ""
            draw.text((x, y + tile + 5), _clip(name, draw, small, tile), fill=_INK, font=small)
            draw.text((x, y + tile + 22), _clip(str(category), draw, small, tile), fill=_MUTED, font=small)
        top += row_height
    file_format = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sheet.save(tmp, format=file_format, quality=90))
    return path


def _fit(image, width: int, height: int):
    """The image scaled to fit in width x height, centred on white."""
    from PIL import Image, ImageOps

    image = ImageOps.contain(image, (width, height))
    canvas = Image.new("RGB", (width, height), _PAGE)
    canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
    return canvas


def _clip(text: str, draw, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap size
        return ImageFont.load_default()
