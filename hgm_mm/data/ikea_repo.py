"""The public IKEA room dataset (github.com/IvonaTau/ikea): download and conversion to the dataset format.

That repository keeps its ground truth as Python 2 pickles under ``text_data/``:

* ``item_to_room.p``: product photo path -> list of room photo paths (which products appear in
  which room; the pairs).
* ``products_dict.p``: product id -> ``{"name", "type", "color", "size", "desc", "img"}``.
* ``img_to_desc.p``: product photo URL -> ``{"desc", "name"}`` (the product description).
* ``room_to_items.p``: room photo name -> list of item types shown in the room.
* ``categories_dict.p``: room photo name -> the room's scene (e.g. ``"Living Room"``).

Photos live under ``images/`` (products in ``images/objects/`` and a few category folders, rooms in
``images/room_scenes/``). :func:`convert_ikea_repo` writes ``products.jsonl``, ``rooms.jsonl`` and
``pairs.csv`` (see ``docs/data_format.md``) with the photos beside them. Every pickle is read by a
restricted unpickler that builds plain containers and strings only: a pickle naming any other
class or function is refused before anything in it runs.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..files import atomic_dir, atomic_write
from .images import ImageError, load_image
from .records import PAIRS_FILE, PRODUCTS_FILE, ROOMS_FILE

IKEA_REPO = "IvonaTau/ikea"
IKEA_COMMIT = "6f316e3fecf8ce95069eaef5f2021405c536168a"
IKEA_ARCHIVE_URL = f"https://codeload.github.com/{IKEA_REPO}/tar.gz/{IKEA_COMMIT}"
DATA_ENV = "HGM_DATA"
CACHE_ENV = "HGM_CACHE"

TEXT_DIR = "text_data"
ITEM_TO_ROOM = "item_to_room.p"
PRODUCTS_DICT = "products_dict.p"
IMG_TO_DESC = "img_to_desc.p"
ROOM_TO_ITEMS = "room_to_items.p"
ROOM_SCENES = "categories_dict.p"
ROOM_PHOTO_DIR = "room_scenes"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}

# Coarse product categories from IKEA's product type, first match wins. The order settles
# overlaps ("Mirror with integrated lighting" is a lamp, "Bed storage box" storage, "Bed frame
# with storage" a bed); the rules reproduce every category of the shared IKEA products.jsonl.
CATEGORY_RULES: tuple[tuple[str, str], ...] = (
    ("lamp", r"lamp|light|chandelier|downlighter"),
    ("mirror", r"mirror"),
    ("textile", r"cushion|cover|quilt|pillow|throw|curtain|towel|bedspread|blanket|fabric|sheet|bedlinen|canopy"
                r"|mattress|skirt|bed pocket|bed runner|chair pad|bath mat"),
    ("rug", r"\brug\b|door mat"),
    ("sofa", r"sofa|chaise longue"),
    ("storage", r"bed storage"),
    ("toy", r"bed tent"),
    ("bed", r"\bbed\b|bed frame|bed frm|\bcot\b|day-bed|divan"),
    ("storage", r"storage|wardrobe|\bbox|basket|shelf|shelving|bookcase|cabinet|drawer|chest|trolley|tv bench"
                r"|sideboard|\bcrate|\bcase\b"),
    ("chair", r"\bchair\b|armchair|stool|\bbench\b"),
    ("other", r"organiser"),
    ("table", r"\btables?\b|\bdesk\b"),
    ("plant", r"plant"),
    ("decor", r"frame|vase|clock|picture|candle|decoration|poster|lantern"),
    ("toy", r"toy|game|train set|\bplay|puppet|blocks|easel|tunnel|cash register|book display"),
    ("fixture", r"door|handle|knob|\brail|oven|hood|tap|worktop|\bhook|hob\b|sink|fridge|decking|microwave"),
    ("tableware", r"bowl|plate|mug|glass|\bjar\b|cutlery|pot|pan|tray|carafe|cup|chopping board|dish|serving"
                  r"|espresso"),
)
_CATEGORY_PATTERNS = tuple((category, re.compile(pattern)) for category, pattern in CATEGORY_RULES)

# Scene labels from the repository's room categories, first match wins ("Children's bedroom" is
# a children's room, not a bedroom).
SCENE_RULES: tuple[tuple[str, str], ...] = (
    ("children_room", r"child|kid|baby|nursery"),
    ("dining_room", r"dining"),
    ("living_room", r"living"),
    ("bedroom", r"bed"),
    ("kitchen", r"kitchen"),
    ("home_office", r"office|work|study"),
    ("outdoor", r"outdoor|garden|balcony|patio"),
    ("hallway", r"hall|entrance"),
    ("laundry", r"laundry"),
    ("bathroom", r"bath"),
)
_SCENE_PATTERNS = tuple((scene, re.compile(pattern)) for scene, pattern in SCENE_RULES)
_ROOM_STAMP = re.compile(r"(__\d+(-s\d+)?|-\d{10,})$")  # IKEA's upload stamp after the caption


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a class or function beyond plain containers and strings; nothing was run."""


class IkeaRepoError(ValueError):
    """The repository folder lacks a file or holds data of an unexpected structure."""


class DownloadError(FileNotFoundError):
    """The dataset is not on this machine and cannot be downloaded."""


# -- restricted unpickling ------------------------------------------------------------------------
_ADMITTED_BUILTINS: dict[str, type] = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "str": str,
    "bytes": bytes, "int": int, "float": float, "bool": bool,
    "unicode": str, "long": int,  # Python 2 names of the same types
}
_BUILTIN_MODULES = ("builtins", "__builtin__")


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dict, list, tuple, set, frozenset, str, bytes, int, float, bool, None.

    Any other global a pickle names (a class, a function such as ``os.system``) raises
    :class:`UnsafePickleError` naming the file, before the pickle can call it. Python 2 ``str``
    values are decoded as latin-1 (and repaired to UTF-8 where they were UTF-8 bytes, see
    :func:`read_pickle`).
    """

    def __init__(self, file: io.BufferedIOBase, *, source: str | os.PathLike) -> None:
        super().__init__(file, encoding="latin1")
        self.source = str(source)

    def find_class(self, module: str, name: str) -> Any:
        if module in _BUILTIN_MODULES and name in _ADMITTED_BUILTINS:
            return _ADMITTED_BUILTINS[name]
        raise UnsafePickleError(f"{self.source}: the pickle names {module}.{name}, which is not a plain "
                                "container or string; refused before it could run (only dict, list, tuple, set, "
                                "frozenset, str, bytes, int, float, bool and None are admitted)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: the pickle refers to a persistent object; refused "
                                "(plain data pickles have none)")


def read_pickle(path: str | os.PathLike) -> Any:
    """Reads a pickle of plain data with :class:`PlainDataUnpickler`; never a plain ``pickle.load``.

    Raises:
        IkeaRepoError: The file is missing or is not a readable pickle.
        UnsafePickleError: The pickle names anything beyond plain containers and strings.
    """
    path = Path(path)
    if not path.is_file():
        raise IkeaRepoError(f"{path}: file not found; the folder must be a copy of github.com/{IKEA_REPO} "
                            f"(commit {IKEA_COMMIT[:7]}) with its {TEXT_DIR}/ folder")
    with path.open("rb") as handle:
        try:
            return _repair_text(PlainDataUnpickler(handle, source=path).load())
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, MemoryError) as err:
            raise IkeaRepoError(f"{path}: not a readable pickle ({type(err).__name__}: {err}); "
                                "download the repository again") from err


def _repair_text(value: Any) -> Any:
    """Python 2 byte strings arrive latin-1 decoded; turn those that were UTF-8 back into text."""
    if isinstance(value, str):
        if any("\x80" <= ch <= "\xff" for ch in value):
            try:
                return value.encode("latin1").decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                return value
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin1")
    if isinstance(value, dict):
        return {_repair_text(k): _repair_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_repair_text(v) for v in value)
    return value


# -- structure checks -----------------------------------------------------------------------------
def _mapping(value: Any, path: Path, what: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise IkeaRepoError(f"{path}: expected a non-empty dict of {what}, found {type(value).__name__}; "
                            "download the repository again")
    for key in value:
        if not isinstance(key, str) or not key.strip():
            raise IkeaRepoError(f"{path}: key {key!r} is not a non-empty string; expected {what}")
    return value


def _string_list(value: Any, path: Path, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise IkeaRepoError(f"{path}: entry {key!r} holds {type(value).__name__} {value!r:.80}; "
                            "expected a list of strings")
    return list(value)


def _text_field(record: Mapping, field_name: str, path: Path, key: str) -> str:
    value = record.get(field_name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise IkeaRepoError(f"{path}: entry {key!r} field {field_name!r} is {type(value).__name__}; "
                            "expected a string")
    return value.strip()


def _record(value: Any, path: Path, key: str) -> Mapping:
    if not isinstance(value, dict):
        raise IkeaRepoError(f"{path}: entry {key!r} holds {type(value).__name__}; expected a dict of text fields")
    return value


def _stem(image_path: str) -> str:
    """'images/objects/202.049.06.jpg' or '/static/images/202.049.06.jpg' -> '202.049.06'."""
    name = PurePosixPath(image_path.replace("\\", "/")).name
    suffix = PurePosixPath(name).suffix
    return name[: -len(suffix)] if suffix.lower() in _IMAGE_SUFFIXES else name


def _basename(image_path: str) -> str:
    return PurePosixPath(image_path.replace("\\", "/")).name


# -- text rules -----------------------------------------------------------------------------------
def coarse_category(product_type: str) -> str:
    """The coarse category of an IKEA product type, e.g. ``"Three-seat sofa"`` -> ``"sofa"``.

    Returns one of sofa, chair, table, bed, storage, lamp, rug, textile, mirror, decor, plant,
    tableware, fixture, toy, other (see :data:`CATEGORY_RULES`).
    """
    text = product_type.lower()
    for category, pattern in _CATEGORY_PATTERNS:
        if pattern.search(text):
            return category
    return "other"


def scene_label(room_category: str) -> str:
    """The scene label of a room category of the repository, e.g. ``"Living Room"`` -> ``"living_room"``."""
    text = room_category.lower()
    for scene, pattern in _SCENE_PATTERNS:
        if pattern.search(text):
            return scene
    return re.sub(r"[^a-z0-9]+", "_", text.replace("'s", "")).strip("_") or "other"


def room_caption(photo_name: str) -> str:
    """The caption in a room photo's name.

    'ikea-a-rustic-way-to-dine__1364308411325-s4.jpg' -> 'a rustic way to dine'.
    """
    core = _ROOM_STAMP.sub("", _stem(photo_name))
    core = core[len("ikea-"):] if core.startswith("ikea-") else core
    return re.sub(r"\s+", " ", core.replace("-", " ")).strip(" .")


def room_slug(photo_name: str) -> str:
    """The room id made from a room photo's caption: lower case words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", room_caption(photo_name).lower()).strip("-")


# -- conversion -----------------------------------------------------------------------------------
@dataclass
class IkeaConversion:
    """What :func:`convert_ikea_repo` wrote.

    Attributes:
        folder: The dataset folder (products.jsonl, rooms.jsonl, pairs.csv, images/).
        n_products: Catalogue products written.
        n_rooms: Room photos written.
        n_pairs: Room-product pairs written.
        skipped: ``"<photo>: <why>"`` for every photo left out (missing, unreadable, ambiguous).
    """

    folder: Path
    n_products: int
    n_rooms: int
    n_pairs: int
    skipped: list[str] = field(default_factory=list)


def convert_ikea_repo(repo_dir: str | os.PathLike, out_dir: str | os.PathLike, *, room_width: int = 1024,
                      product_size: int = 500) -> IkeaConversion:
    """Converts a copy of github.com/IvonaTau/ikea to the dataset format, written atomically to `out_dir`.

    Products are every product with a photo (ids are IKEA article numbers), with ``title``,
    ``category`` (coarse, from ``product_type`` by :data:`CATEGORY_RULES`), ``product_type``,
    ``color``, ``size`` and ``description``. Rooms are every room photo, with ``scene``,
    ``title`` (the caption in the photo's name) and ``item_types``. Pairs come from
    ``item_to_room.p``. Photos are re-encoded as JPEG, rooms at most `room_width` wide and
    products at most `product_size` on their longer side; unreadable ones are left out and listed.

    Raises:
        IkeaRepoError: A ground-truth pickle or the images folder is missing, or a pickle's
            structure is not the one of that repository (the message names the file).
        UnsafePickleError: A pickle names anything beyond plain containers and strings.
    """
    repo = Path(repo_dir)
    out = Path(out_dir)
    text = repo / TEXT_DIR
    item_to_room_path, products_path = text / ITEM_TO_ROOM, text / PRODUCTS_DICT
    descriptions_path, room_items_path, scenes_path = text / IMG_TO_DESC, text / ROOM_TO_ITEMS, text / ROOM_SCENES

    item_to_room = _mapping(read_pickle(item_to_room_path), item_to_room_path, "product photo -> room photos")
    item_rooms = {key: _string_list(value, item_to_room_path, key) for key, value in item_to_room.items()}
    products_raw = _mapping(read_pickle(products_path), products_path, "product id -> product fields")
    descriptions_raw = _mapping(read_pickle(descriptions_path), descriptions_path, "product photo -> description")
    room_items_raw = _mapping(read_pickle(room_items_path), room_items_path, "room photo -> item types")
    scenes_raw = _mapping(read_pickle(scenes_path), scenes_path, "room photo -> room category")

    fields = {_stem(key): _record(value, products_path, key) for key, value in products_raw.items()}
    descriptions = {_stem(key): _text_field(_record(value, descriptions_path, key), "desc", descriptions_path, key)
                    for key, value in descriptions_raw.items()}
    room_items = {_basename(key): _string_list(value, room_items_path, key) for key, value in room_items_raw.items()}
    scenes: dict[str, str] = {}
    for key, value in scenes_raw.items():
        if not isinstance(value, str):
            raise IkeaRepoError(f"{scenes_path}: entry {key!r} holds {type(value).__name__}; expected a room "
                                "category string")
        scenes[_basename(key)] = value

    product_photos, room_photos, skipped = _find_photos(repo, fields, products_path)
    product_ids = sorted(pid for pid in set(fields) | {_stem(k) for k in item_rooms} if pid in product_photos)
    skipped += [f"{pid}: no photo in {repo / 'images'}" for pid in sorted(set(fields) - set(product_photos))]
    room_ids = _room_ids(sorted(room_photos))

    def write(tmp: Path) -> IkeaConversion:
        (tmp / "images" / "products").mkdir(parents=True)
        (tmp / "images" / "rooms").mkdir(parents=True)
        products, rooms = [], []
        for pid in product_ids:
            relative = f"images/products/{pid}.jpg"
            problem = _save_photo(product_photos[pid], tmp / relative, (product_size, product_size))
            if problem:
                skipped.append(problem)
                continue
            record = fields.get(pid, {})
            product_type = _text_field(record, "type", products_path, pid)
            products.append({
                "product_id": pid, "image": relative, "title": _text_field(record, "name", products_path, pid),
                "category": coarse_category(product_type), "product_type": product_type,
                "color": _text_field(record, "color", products_path, pid),
                "size": _text_field(record, "size", products_path, pid),
                "description": descriptions[pid] if pid in descriptions
                else _text_field(record, "desc", products_path, pid),
            })
        for name, room_id in room_ids.items():
            relative = f"images/rooms/{room_id}.jpg"
            problem = _save_photo(room_photos[name], tmp / relative, (room_width, 10 * room_width))
            if problem:
                skipped.append(problem)
                continue
            room: dict[str, Any] = {"room_id": room_id, "image": relative}
            if name in scenes:
                room["scene"] = scene_label(scenes[name])
            room["title"] = room_caption(name)
            room["item_types"] = [item.strip().lower() for item in room_items.get(name, [])]
            rooms.append(room)
        written_products = {p["product_id"] for p in products}
        written_rooms = {r["room_id"] for r in rooms}
        pairs = sorted({(room_ids[_basename(room)], _stem(item)) for item, room_list in item_rooms.items()
                        for room in room_list
                        if room_ids.get(_basename(room)) in written_rooms and _stem(item) in written_products})
        rooms.sort(key=lambda r: r["room_id"])
        _write_jsonl(tmp / PRODUCTS_FILE, products)
        _write_jsonl(tmp / ROOMS_FILE, rooms)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["room_id", "product_id"])
        writer.writerows(pairs)
        (tmp / PAIRS_FILE).write_text(buffer.getvalue(), encoding="utf-8")
        return IkeaConversion(folder=out, n_products=len(products), n_rooms=len(rooms), n_pairs=len(pairs),
                              skipped=skipped)

    out.parent.mkdir(parents=True, exist_ok=True)
    outcome: list[IkeaConversion] = []
    atomic_dir(out, lambda tmp: outcome.append(write(tmp)))
    return outcome[0]


def _find_photos(repo: Path, fields: Mapping[str, Mapping], fields_path: Path
                 ) -> tuple[dict[str, Path], dict[str, Path], list[str]]:
    """Product photos by id and room photos by file name, found anywhere under images/."""
    images = repo / "images"
    if not images.is_dir():
        raise IkeaRepoError(f"{images}: folder not found; the folder must be a copy of github.com/{IKEA_REPO} "
                            "with its images/ folder")
    by_name: dict[str, list[Path]] = {}
    rooms: dict[str, Path] = {}
    for path in sorted(images.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        if ROOM_PHOTO_DIR in path.relative_to(images).parts:
            rooms[path.name] = path
        else:
            by_name.setdefault(path.stem, []).append(path)
    products: dict[str, Path] = {}
    skipped: list[str] = []
    for pid, paths in by_name.items():
        if len(paths) > 1 and len({_sha256(p) for p in paths}) > 1:
            # the repository files a few products under two folders with different photos:
            # the one products_dict.p names wins, else the first in path order
            named = _text_field(fields.get(pid, {}), "img", fields_path, pid)
            chosen = next((p for p in paths if named and p == repo / named), paths[0])
            skipped.append(f"{pid}: {len(paths)} different photos; kept {chosen.relative_to(repo)}")
            products[pid] = chosen
        else:
            products[pid] = paths[0]
    return products, rooms, skipped


def _room_ids(photo_names: list[str]) -> dict[str, str]:
    """Room id per room photo name; a caption used twice gets a short hash of the photo name."""
    ids: dict[str, str] = {}
    taken: set[str] = set()
    for name in photo_names:
        slug = room_slug(name) or hashlib.sha1(name.encode()).hexdigest()[:12]
        if slug in taken:
            slug = f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"
        taken.add(slug)
        ids[name] = slug
    return ids


def _save_photo(source: Path, target: Path, max_size: tuple[int, int]) -> str | None:
    """Writes a safely decoded, size-limited JPEG copy; returns why not when the photo is unusable."""
    try:
        image = load_image(source)
    except ImageError as err:
        return f"{source}: {err.problem}"
    image.thumbnail(max_size)
    image.save(target, format="JPEG", quality=90)
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


# -- download -------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Where downloads are kept: ``$HGM_CACHE``, else ``$XDG_CACHE_HOME/hgm_mm``, else ``~/.cache/hgm_mm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "hgm_mm"


def download_ikea(cache_dir: str | os.PathLike | None = None, *, url: str | None = None,
                  timeout: float = 30.0, echo: Callable[[str], object] | None = print) -> Path:
    """Downloads github.com/IvonaTau/ikea at the pinned commit and returns the unpacked repository folder.

    The archive is fetched over HTTPS into `cache_dir` (default :func:`default_cache_dir`) and
    unpacked into ``<cache_dir>/ikea/repo-<commit>`` atomically, so an interrupted download
    leaves nothing half-written; a later call finds the folder and downloads nothing.

    Args:
        cache_dir: Folder of downloads.
        url: The archive (a ``.tar.gz`` of the repository); default :data:`IKEA_ARCHIVE_URL`.
        timeout: Seconds to wait for the server.
        echo: Called with one line saying what is downloaded and where; ``None`` for silence.

    Raises:
        DownloadError: The archive cannot be fetched (no network, server refused); the message is
            one sentence saying to pass ``--data DIR`` or set ``HGM_DATA`` instead.
        IkeaRepoError: The archive does not hold the repository's ``text_data/`` folder.
    """
    url = url if url is not None else IKEA_ARCHIVE_URL
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "ikea"
    repo = folder / f"repo-{IKEA_COMMIT[:12]}"
    if (repo / TEXT_DIR / ITEM_TO_ROOM).is_file():
        return repo
    if echo is not None:
        echo(f"downloading the IKEA room dataset (github.com/{IKEA_REPO} at commit {IKEA_COMMIT[:7]}) into {repo}")
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / f"{IKEA_COMMIT[:12]}.tar.gz"
    try:
        atomic_write(archive, lambda tmp: _fetch(url, tmp, timeout))
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"cannot download the IKEA room dataset from {url} ({reason}); pass --data DIR or set "
                            f"{DATA_ENV} to a folder with products.jsonl, rooms.jsonl and pairs.csv") from None
    try:
        atomic_dir(repo, lambda tmp: _unpack(archive, tmp))
    finally:
        archive.unlink(missing_ok=True)
    return repo


def _fetch(url: str, target: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "hgm_mm"})
    with urllib.request.urlopen(request, timeout=timeout) as response, target.open("wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _unpack(archive: Path, target: Path) -> None:
    """Unpacks the repository's text_data/ and images/ (GitHub's top folder dropped), safely."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if len(parts) < 2 or parts[1] not in (TEXT_DIR, "images") or not (member.isfile() or member.isdir()):
                    continue
                member = tarfile.data_filter(member.replace(name="/".join(parts[1:]), deep=False), str(target))
                tar.extract(member, target, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise IkeaRepoError(f"{archive}: not a readable repository archive ({err}); delete it and download again") \
            from err
    if not (target / TEXT_DIR / ITEM_TO_ROOM).is_file():
        raise IkeaRepoError(f"{archive}: holds no {TEXT_DIR}/{ITEM_TO_ROOM}; it is not github.com/{IKEA_REPO}")


def ikea_dataset(cache_dir: str | os.PathLike | None = None, *, url: str | None = None,
                 echo: Callable[[str], object] | None = print) -> Path:
    """The converted IKEA dataset folder in the cache, downloading and converting it on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dataset = root / "ikea" / f"dataset-{IKEA_COMMIT[:12]}"
    if (dataset / PRODUCTS_FILE).is_file():
        return dataset
    repo = download_ikea(root, url=url, echo=echo)
    if echo is not None:
        echo(f"converting {repo} to the dataset format in {dataset}")
    convert_ikea_repo(repo, dataset)
    return dataset


__all__ = [
    "CATEGORY_RULES", "DownloadError", "IKEA_ARCHIVE_URL", "IKEA_COMMIT", "IkeaConversion", "IkeaRepoError",
    "PlainDataUnpickler", "UnsafePickleError", "coarse_category", "convert_ikea_repo", "default_cache_dir",
    "download_ikea", "ikea_dataset", "read_pickle", "room_caption", "room_slug", "scene_label",
]
