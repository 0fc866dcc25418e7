"""The text a model reads for a product or a room, built from its record in one place."""
from __future__ import annotations

from .records import Product, Room

# Attributes that describe what a product looks like; ids, prices and URLs say nothing visual.
DESCRIPTIVE_ATTRIBUTES = ("product_type", "color", "label_zh")


def product_text(product: Product) -> str:
    """`"KIVIK. Three-seat sofa, grey. A generous seating series ..."`: title, type, colour, description."""
    details = [str(product.attributes[key]) for key in DESCRIPTIVE_ATTRIBUTES if product.attributes.get(key)]
    if not details and product.category:
        details.append(product.category)
    parts = [product.title.strip(), ", ".join(details), product.description.strip()]
    return ". ".join(part for part in parts if part)


def room_text(room: Room) -> str | None:
    """The scene text of a room (its caption), or None. Never the list of visible items."""
    return room.title.strip() or None
