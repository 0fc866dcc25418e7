"""Readers for the dataset folder format: products, rooms, room-product pairs and scene images.

A dataset is a folder holding any of ``products.jsonl``, ``rooms.jsonl``, ``pairs.csv`` and
``images.jsonl`` (see ``docs/data_format.md``). Every reader validates strictly and raises a
:class:`DataError` naming the file, the line, what is wrong and how to fix it, at the first
problem found. Image paths are relative to the file that names them; readers only check that the
image file exists (a ``stat``), they never decode it: use :func:`hgm_mm.data.load_image` for that.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .lines import DataError as DataError
from .lines import csv_rows, json_objects, json_type
from .scenes import canonical_scene

PRODUCTS_FILE = "products.jsonl"
ROOMS_FILE = "rooms.jsonl"
PAIRS_FILE = "pairs.csv"
SCENE_IMAGES_FILE = "images.jsonl"
PAIRS_HEADER = ("room_id", "product_id")

@dataclass(frozen=True)
class Product:
    """One catalogue product.

    Attributes:
        product_id: Unique, non-empty identifier.
        image: Absolute, resolved path of the product photo.
        title: Product name or listing title; ``""`` when the source has none.
        category: Coarse category (e.g. ``"sofa"``), or ``None`` when absent.
        description: Free-text description; ``""`` when absent.
        attributes: Every other field of the JSON line, unchanged (e.g. ``color``, ``price``).
    """

    product_id: str
    image: Path
    title: str
    category: str | None
    description: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Room:
    """One photographed room (the query side).

    Attributes:
        room_id: Unique, non-empty identifier.
        image: Absolute, resolved path of the room photo.
        scene: Scene label (e.g. ``"bedroom"``), or ``None`` when absent.
        title: Caption of the room; ``""`` when absent.
        attributes: Every other field of the JSON line, unchanged (e.g. IKEA's ``item_types``).
    """

    room_id: str
    image: Path
    scene: str | None
    title: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SceneImage:
    """One photo labelled with its scene, for scene recognition.

    Attributes:
        image: Absolute, resolved path of the photo.
        scene: Scene label (e.g. ``"kitchen"``).
    """

    image: Path
    scene: str


@dataclass(frozen=True)
class SceneText:
    """One phrase labelled with the scene it describes, for scene recognition from words.

    Attributes:
        text: What a person might type ("a calm bedroom where I can sleep well").
        scene: Canonical scene label (e.g. ``"bedroom"``).
    """

    text: str
    scene: str


@dataclass(frozen=True)
class Dataset:
    """Everything read from one dataset folder by :func:`load_dataset`.

    Attributes:
        root: The dataset folder, absolute.
        products: Products from ``products.jsonl``, in file order (empty when the file is absent).
        rooms: Rooms from ``rooms.jsonl``, in file order (empty when absent).
        pairs: ``(room_id, product_id)`` rows of ``pairs.csv``, in file order (empty when absent).
        scene_images: Rows of ``images.jsonl``, in file order (empty when absent).
    """

    root: Path
    products: list[Product] = field(default_factory=list)
    rooms: list[Room] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    scene_images: list[SceneImage] = field(default_factory=list)

    @property
    def products_by_id(self) -> dict[str, Product]:
        """Products keyed by ``product_id`` (a new dict on each access)."""
        return {p.product_id: p for p in self.products}

    @property
    def rooms_by_id(self) -> dict[str, Room]:
        """Rooms keyed by ``room_id`` (a new dict on each access)."""
        return {r.room_id: r for r in self.rooms}

    def positives(self) -> dict[str, list[str]]:
        """The products paired with each room.

        Returns:
            ``room_id`` -> product ids in ``pairs.csv`` order. Rooms without any pair are absent.
        """
        out: dict[str, list[str]] = {}
        for room_id, product_id in self.pairs:
            out.setdefault(room_id, []).append(product_id)
        return out


# --------------------------------------------------------------------------------------------
# Low-level helpers


def _required_str(path: Path, lineno: int, obj: dict[str, Any], key: str, *, is_id: bool) -> str:
    if key not in obj:
        raise DataError(path, lineno, f"missing required field {key!r}; add it to every line")
    value = obj[key]
    if not isinstance(value, str):
        hint = "write it in quotes as a JSON string" if is_id else "it must be a JSON string"
        raise DataError(path, lineno, f"field {key!r} must be a string, got {json_type(value)}; {hint}")
    if not value.strip():
        raise DataError(path, lineno, f"field {key!r} is empty; give a non-empty value")
    return value


def _optional_str(path: Path, lineno: int, obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(path, lineno, f"field {key!r} must be a string or null, got {json_type(value)}; "
                                      "write it as a JSON string")
    return value


def _resolve_image(path: Path, lineno: int, image: str, check_images: bool) -> Path:
    if Path(image).is_absolute():
        raise DataError(path, lineno, f"image path {image!r} is absolute; write it relative to "
                                      f"the folder holding {path.name}")
    resolved = (path.parent / image).resolve()
    if check_images and not resolved.is_file():
        raise DataError(path, lineno, f"image {image!r} not found (looked for {resolved}); "
                                      f"fix the path (relative to the folder holding {path.name}) "
                                      "or add the file")
    return resolved


def _check_unique(path: Path, lineno: int, key: str, value: str, seen: dict[str, int], what: str) -> None:
    first = seen.get(value)
    if first is not None:
        raise DataError(path, lineno, f"duplicate {key} {value!r} (first seen on line {first}); "
                                      f"{what} must be unique")
    seen[value] = lineno


# --------------------------------------------------------------------------------------------
# Readers


def read_products(path: str | Path, *, check_images: bool = True) -> list[Product]:
    """Reads and validates a ``products.jsonl`` file.

    Args:
        path: The JSONL file. Image paths in it are relative to its folder.
        check_images: Check that every image file exists (a ``stat``; images are not decoded).

    Returns:
        The products in file order.

    Raises:
        DataError: At the first invalid line: malformed JSON, a line that is not an object,
            missing or empty ``product_id``/``image``, a field of the wrong type, a duplicate
            ``product_id``, or a missing image file.
    """
    path = Path(path)
    products: list[Product] = []
    seen: dict[str, int] = {}
    for lineno, obj in json_objects(path):
        product_id = _required_str(path, lineno, obj, "product_id", is_id=True)
        image = _required_str(path, lineno, obj, "image", is_id=False)
        title = _optional_str(path, lineno, obj, "title")
        category = _optional_str(path, lineno, obj, "category")
        description = _optional_str(path, lineno, obj, "description")
        _check_unique(path, lineno, "product_id", product_id, seen, "product ids")
        known = {"product_id", "image", "title", "category", "description"}
        products.append(Product(
            product_id=product_id,
            image=_resolve_image(path, lineno, image, check_images),
            title=title or "",
            category=category,
            description=description or "",
            attributes={k: v for k, v in obj.items() if k not in known},
        ))
    return products


def read_rooms(path: str | Path, *, check_images: bool = True) -> list[Room]:
    """Reads and validates a ``rooms.jsonl`` file.

    Args:
        path: The JSONL file. Image paths in it are relative to its folder.
        check_images: Check that every image file exists (a ``stat``; images are not decoded).

    Returns:
        The rooms in file order.

    Raises:
        DataError: At the first invalid line (same rules as :func:`read_products`, for
            ``room_id``, ``image``, ``scene`` and ``title``).
    """
    path = Path(path)
    rooms: list[Room] = []
    seen: dict[str, int] = {}
    for lineno, obj in json_objects(path):
        room_id = _required_str(path, lineno, obj, "room_id", is_id=True)
        image = _required_str(path, lineno, obj, "image", is_id=False)
        scene = _optional_str(path, lineno, obj, "scene")
        scene = canonical_scene(scene) if scene else scene
        title = _optional_str(path, lineno, obj, "title")
        _check_unique(path, lineno, "room_id", room_id, seen, "room ids")
        known = {"room_id", "image", "scene", "title"}
        rooms.append(Room(
            room_id=room_id,
            image=_resolve_image(path, lineno, image, check_images),
            scene=scene,
            title=title or "",
            attributes={k: v for k, v in obj.items() if k not in known},
        ))
    return rooms


def read_scene_images(path: str | Path, *, check_images: bool = True) -> list[SceneImage]:
    """Reads and validates an ``images.jsonl`` file of scene-labelled photos.

    Each line holds exactly ``image`` and ``scene``; any other field is an error (there is
    nowhere to keep it).

    Args:
        path: The JSONL file. Image paths in it are relative to its folder.
        check_images: Check that every image file exists (a ``stat``; images are not decoded).

    Returns:
        The labelled images in file order.

    Raises:
        DataError: At the first invalid line: malformed JSON, missing/empty/non-string ``image``
            or ``scene``, an unknown field, an image listed twice, or a missing image file.
    """
    path = Path(path)
    items: list[SceneImage] = []
    seen: dict[str, int] = {}
    for lineno, obj in json_objects(path):
        image = _required_str(path, lineno, obj, "image", is_id=False)
        scene = _required_str(path, lineno, obj, "scene", is_id=False)
        extra = sorted(set(obj) - {"image", "scene"})
        if extra:
            raise DataError(path, lineno, f"unknown field(s) {', '.join(map(repr, extra))}; "
                                          f"{path.name} lines hold only 'image' and 'scene'")
        resolved = _resolve_image(path, lineno, image, check_images)
        _check_unique(path, lineno, "image", str(resolved), seen, "images")
        items.append(SceneImage(image=resolved, scene=canonical_scene(scene)))
    return items


def read_scene_texts(path: str | Path) -> list[SceneText]:
    """Reads and validates a ``texts.jsonl`` file of scene-labelled phrases.

    Each line holds exactly ``text`` (what a person might type: "a cosy living room", "北欧风格的客厅")
    and ``scene``; the scene is mapped to its canonical label (`hgm_mm.data.scenes.canonical_scene`).

    Returns:
        The phrases in file order.

    Raises:
        DataError: At the first invalid line: malformed JSON, missing/empty/non-string ``text`` or
            ``scene``, or an unknown field.
    """
    path = Path(path)
    items: list[SceneText] = []
    for lineno, obj in json_objects(path):
        text = _required_str(path, lineno, obj, "text", is_id=False)
        scene = _required_str(path, lineno, obj, "scene", is_id=False)
        extra = sorted(set(obj) - {"text", "scene"})
        if extra:
            raise DataError(path, lineno, f"unknown field(s) {', '.join(map(repr, extra))}; "
                                          f"{path.name} lines hold only 'text' and 'scene'")
        items.append(SceneText(text=text.strip(), scene=canonical_scene(scene)))
    return items


def read_pairs(
    path: str | Path,
    *,
    room_ids: Iterable[str] | None = None,
    product_ids: Iterable[str] | None = None,
) -> list[tuple[str, str]]:
    """Reads and validates a ``pairs.csv`` file (header ``room_id,product_id``).

    Args:
        path: The CSV file (UTF-8, comma-separated).
        room_ids: When given, every ``room_id`` must be one of these.
        product_ids: When given, every ``product_id`` must be one of these.

    Returns:
        ``(room_id, product_id)`` tuples in file order.

    Raises:
        DataError: At the first problem: a wrong header, a row without exactly two non-empty
            cells, an exact duplicate row, or an id outside ``room_ids``/``product_ids``.
    """
    path = Path(path)
    known_rooms = set(room_ids) if room_ids is not None else None
    known_products = set(product_ids) if product_ids is not None else None
    pairs: list[tuple[str, str]] = []
    seen: dict[tuple[str, str], int] = {}
    for lineno, row in csv_rows(path, PAIRS_HEADER):
        room_id, product_id = row["room_id"], row["product_id"]
        for key, value in (("room_id", room_id), ("product_id", product_id)):
            if not value.strip():
                raise DataError(path, lineno, f"empty {key}; give both ids on every row")
        if known_rooms is not None and room_id not in known_rooms:
            raise DataError(path, lineno, f"unknown room_id {room_id!r}; it is not in "
                                          f"{ROOMS_FILE}: add the room or remove the row")
        if known_products is not None and product_id not in known_products:
            raise DataError(path, lineno, f"unknown product_id {product_id!r}; it is not in "
                                          f"{PRODUCTS_FILE}: add the product or remove the row")
        pair = (room_id, product_id)
        first = seen.get(pair)
        if first is not None:
            raise DataError(path, lineno, f"duplicate pair {room_id!r},{product_id!r} (first "
                                          f"seen on line {first}); list each pair once")
        seen[pair] = lineno
        pairs.append(pair)
    return pairs


def load_dataset(root: str | Path, *, check_images: bool = True) -> Dataset:
    """Reads every dataset file present in a folder and cross-validates them.

    Reads whichever of ``products.jsonl``, ``rooms.jsonl``, ``pairs.csv`` and ``images.jsonl``
    exist. ``pairs.csv`` needs both ``rooms.jsonl`` and ``products.jsonl`` beside it, and every
    id it names must be in them.

    Args:
        root: The dataset folder.
        check_images: Check that every image file exists (a ``stat``; images are not decoded).

    Returns:
        The dataset; absent files give empty lists.

    Raises:
        DataError: When the folder holds none of the four files, or at the first invalid line.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(root, None, "not a directory; pass the dataset folder")
    files = {name: root / name for name in (PRODUCTS_FILE, ROOMS_FILE, PAIRS_FILE, SCENE_IMAGES_FILE)}
    present = {name: p for name, p in files.items() if p.is_file()}
    if not present:
        raise DataError(root, None, f"no dataset files found; the folder must hold at least one of "
                                    f"{', '.join(files)}")

    products = read_products(files[PRODUCTS_FILE], check_images=check_images) if PRODUCTS_FILE in present else []
    rooms = read_rooms(files[ROOMS_FILE], check_images=check_images) if ROOMS_FILE in present else []
    pairs: list[tuple[str, str]] = []
    if PAIRS_FILE in present:
        missing = [n for n in (ROOMS_FILE, PRODUCTS_FILE) if n not in present]
        if missing:
            raise DataError(files[PAIRS_FILE], None, f"pairs need {' and '.join(missing)} beside "
                                                     "them to check the ids; add the file(s)")
        pairs = read_pairs(files[PAIRS_FILE], room_ids=(r.room_id for r in rooms),
                           product_ids=(p.product_id for p in products))
    scene_images = (read_scene_images(files[SCENE_IMAGES_FILE], check_images=check_images)
                    if SCENE_IMAGES_FILE in present else [])
    return Dataset(root=root, products=products, rooms=rooms, pairs=pairs, scene_images=scene_images)
