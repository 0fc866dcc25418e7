"""Tests for hgm_mm.data.records: the real datasets load, and every broken input gives one clear error."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
from PIL import Image

from hgm_mm.data import (
    DataError,
    Dataset,
    ImageError,
    Product,
    Room,
    SceneImage,
    load_dataset,
    load_image,
    read_pairs,
    read_products,
    read_rooms,
    read_scene_images,
)

# ------------------------------------------------------------------------------------------
# Real data (read in place through the shared_data fixture; skipped when absent)


def test_ikea_loads_exactly(shared_data):
    ds = load_dataset(shared_data / "ikea")
    assert (len(ds.products), len(ds.rooms), len(ds.pairs)) == (2187, 144, 1824)
    assert ds.scene_images == []
    product = ds.products_by_id["000.114.28"]
    assert product.title == "GRUNDTAL"
    assert product.category == "storage"
    assert product.description == "Saves space on the worktop."
    assert product.attributes == {"product_type": "Wall shelf", "color": "Stainless steel", "size": "80 cm"}
    assert product.image.is_absolute() and product.image.is_file()
    room = ds.rooms_by_id["a-bed-that-folds-away-to-be-a-sofa-by-day"]
    assert room.scene == "bedroom"
    assert room.title == "a bed that folds away to be a sofa by day"
    assert isinstance(room.attributes["item_types"], list) and "item_types" in room.attributes
    positives = ds.positives()
    assert sum(len(v) for v in positives.values()) == 1824
    assert "202.703.12" in positives["a-bed-that-folds-away-to-be-a-sofa-by-day"]
    assert set(positives) <= set(ds.rooms_by_id)


def test_places365_loads_scene_images(shared_data):
    ds = load_dataset(shared_data / "places365-rooms")
    assert len(ds.scene_images) == 3600
    assert ds.products == [] and ds.rooms == [] and ds.pairs == []
    scenes = {s.scene for s in ds.scene_images}
    assert scenes == {"bathroom", "bedroom", "dining_room", "hallway", "kitchen", "living_room"}  # entrance_hall is read as hallway
    splits = [s.image.relative_to(ds.root).parts[0] for s in ds.scene_images]
    assert (splits.count("train"), splits.count("val")) == (3000, 600)


def test_jiaju_cn_loads_chinese_listings(shared_data):
    products = read_products(shared_data / "jiaju-cn" / "products.jsonl")
    assert len(products) == 57
    assert all(p.description == "" for p in products)
    assert all("label_zh" in p.attributes for p in products)
    assert any("price" in p.attributes for p in products)
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in p.title) for p in products)


def test_web_furniture_loads_without_titles(shared_data):
    ds = load_dataset(shared_data / "web-furniture")
    assert len(ds.products) == 210
    assert all(p.title == "" and p.description == "" for p in ds.products)
    assert {p.category for p in ds.products} == {"bed", "chair", "cupboard", "fridge", "sofa", "table", "tv"}


# ------------------------------------------------------------------------------------------
# A small copy of the real IKEA data in tmp_path, corrupted one way per test


@pytest.fixture
def ikea_copy(shared_data, tmp_path):
    """The first 3 rooms of ikea with their pairs and products, images included (tmp only)."""
    src = shared_data / "ikea"
    rooms = [json.loads(line) for line in (src / "rooms.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    room_ids = {r["room_id"] for r in rooms}
    pair_lines = (src / "pairs.csv").read_text(encoding="utf-8").splitlines()
    pairs = [line for line in pair_lines[1:] if line.split(",")[0] in room_ids]
    product_ids = {line.split(",")[1] for line in pairs}
    products = [json.loads(line) for line in (src / "products.jsonl").read_text(encoding="utf-8").splitlines()
                if json.loads(line)["product_id"] in product_ids]
    dst = tmp_path / "ikea"
    for row in rooms + products:
        (dst / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / row["image"], dst / row["image"])
    _write_jsonl(dst / "rooms.jsonl", rooms)
    _write_jsonl(dst / "products.jsonl", products)
    (dst / "pairs.csv").write_text("\n".join([pair_lines[0], *pairs]) + "\n", encoding="utf-8")
    ds = load_dataset(dst)
    assert (len(ds.rooms), len(ds.products), len(ds.pairs)) == (3, len(products), len(pairs))
    return dst


def test_corrupt_copy_bad_json_line(ikea_copy):
    path = ikea_copy / "products.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1][:-1]  # drop the closing brace
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"products\.jsonl line 2: malformed JSON") as info:
        load_dataset(ikea_copy)
    assert info.value.line == 2 and info.value.path.name == "products.jsonl"
    assert "one complete JSON object" in str(info.value)


def test_corrupt_copy_unknown_product_in_pairs(ikea_copy):
    with (ikea_copy / "pairs.csv").open("a", encoding="utf-8") as fh:
        fh.write(f"{json.loads((ikea_copy / 'rooms.jsonl').read_text(encoding='utf-8').splitlines()[0])['room_id']},"
                 "999.999.99\n")
    n_lines = len((ikea_copy / "pairs.csv").read_text(encoding="utf-8").splitlines())
    with pytest.raises(DataError, match=rf"pairs\.csv line {n_lines}: unknown product_id '999\.999\.99'") as info:
        load_dataset(ikea_copy)
    assert "products.jsonl" in info.value.problem and info.value.line == n_lines


def test_corrupt_copy_missing_image(ikea_copy):
    room = json.loads((ikea_copy / "rooms.jsonl").read_text(encoding="utf-8").splitlines()[1])
    (ikea_copy / room["image"]).unlink()
    with pytest.raises(DataError, match=r"rooms\.jsonl line 2: image '.*' not found") as info:
        load_dataset(ikea_copy)
    assert info.value.line == 2 and "fix the path" in str(info.value)
    assert len(load_dataset(ikea_copy, check_images=False).rooms) == 3


def test_corrupt_copy_truncated_jpeg(ikea_copy):
    room = json.loads((ikea_copy / "rooms.jsonl").read_text(encoding="utf-8").splitlines()[0])
    image = ikea_copy / room["image"]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    ds = load_dataset(ikea_copy)  # readers only stat: the truncation shows when decoding
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        load_image(ds.rooms[0].image)
    assert image.name in str(info.value) and "re-download" in str(info.value)


# ------------------------------------------------------------------------------------------
# Synthetic datasets


def _write_jsonl(path: Path, rows) -> Path:
    """Writes dict rows as JSON lines and str rows verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return path


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A valid dataset: 3 products, 2 rooms, 3 pairs, 2 scene images."""
    root = tmp_path / "tiny"
    for name in ["p1", "p2", "p3", "r1", "r2", "s1", "s2"]:
        _image(root / "img" / f"{name}.png")
    _write_jsonl(root / "products.jsonl", [
        {"product_id": "p1", "image": "img/p1.png", "title": "Sofa", "category": "sofa",
         "description": "Soft.", "color": "red", "dims": {"w": 2}},
        {"product_id": "p2", "image": "img/p2.png", "title": "Chair"},
        {"product_id": "p3", "image": "img/p3.png"},
    ])
    _write_jsonl(root / "rooms.jsonl", [
        {"room_id": "r1", "image": "img/r1.png", "scene": "bedroom", "title": "Cosy", "item_types": ["bed"]},
        {"room_id": "r2", "image": "img/r2.png"},
    ])
    (root / "pairs.csv").write_text("room_id,product_id\nr1,p1\nr1,p2\nr2,p3\n", encoding="utf-8")
    _write_jsonl(root / "images.jsonl", [
        {"image": "img/s1.png", "scene": "kitchen"}, {"image": "img/s2.png", "scene": "bedroom"},
    ])
    return root


def test_tiny_dataset_loads(tiny):
    ds = load_dataset(tiny)
    assert isinstance(ds, Dataset) and ds.root == tiny.resolve()
    assert ds.products[0] == Product("p1", (tiny / "img/p1.png").resolve(), "Sofa", "sofa", "Soft.",
                                     {"color": "red", "dims": {"w": 2}})
    assert ds.products[1] == Product("p2", (tiny / "img/p2.png").resolve(), "Chair", None, "", {})
    assert ds.products[2].title == ""
    assert ds.rooms[0] == Room("r1", (tiny / "img/r1.png").resolve(), "bedroom", "Cosy", {"item_types": ["bed"]})
    assert ds.rooms[1] == Room("r2", (tiny / "img/r2.png").resolve(), None, "", {})
    assert ds.pairs == [("r1", "p1"), ("r1", "p2"), ("r2", "p3")]
    assert ds.scene_images == [SceneImage((tiny / "img/s1.png").resolve(), "kitchen"),
                               SceneImage((tiny / "img/s2.png").resolve(), "bedroom")]
    assert ds.positives() == {"r1": ["p1", "p2"], "r2": ["p3"]}
    assert list(ds.products_by_id) == ["p1", "p2", "p3"] and list(ds.rooms_by_id) == ["r1", "r2"]
    with pytest.raises(AttributeError):
        ds.products[0].title = "x"  # frozen


def test_blank_lines_skipped_and_counted(tiny):
    path = tiny / "products.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(["", lines[0], "   ", "", lines[1], lines[1]]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"products\.jsonl line 6: duplicate product_id 'p2' \(first seen on line 5\); "
                                        r"product ids must be unique"):
        read_products(path)


def test_null_optional_fields_mean_absent(tiny):
    path = _write_jsonl(tiny / "products.jsonl", [
        {"product_id": "p1", "image": "img/p1.png", "title": None, "category": None, "description": None},
    ])
    assert read_products(path) == [Product("p1", (tiny / "img/p1.png").resolve(), "", None, "", {})]


def test_utf8_bom_and_crlf_accepted(tiny):
    path = tiny / "rooms.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert [r.room_id for r in read_rooms(path)] == ["r1", "r2"]
    pairs = tiny / "pairs.csv"
    pairs.write_bytes(b"\xef\xbb\xbf" + pairs.read_bytes().replace(b"\n", b"\r\n"))
    assert read_pairs(pairs) == [("r1", "p1"), ("r1", "p2"), ("r2", "p3")]


def test_parent_relative_image_path_allowed_when_it_exists(tiny):
    _image(tiny.parent / "outside.png")
    path = _write_jsonl(tiny / "products.jsonl", [{"product_id": "p1", "image": "../outside.png"}])
    assert read_products(path)[0].image == (tiny.parent / "outside.png").resolve()
    path = _write_jsonl(tiny / "products.jsonl", [{"product_id": "p1", "image": "../nowhere.png"}])
    with pytest.raises(DataError, match=r"products\.jsonl line 1: image '\.\./nowhere\.png' not found"):
        read_products(path)


def test_check_images_false_skips_the_stat(tiny):
    path = _write_jsonl(tiny / "products.jsonl", [{"product_id": "p1", "image": "img/none.png"}])
    assert read_products(path, check_images=False)[0].image == (tiny / "img/none.png").resolve()
    with pytest.raises(DataError, match="not found"):
        read_products(path)


# One row per validation rule: (file, lines written, expected line, key words of the message).
JSONL_CASES = {
    "malformed_json": ("products.jsonl", ['{"product_id": "p1", "image": "img/p1.png"}', '{"product_id": "p2",'],
                       2, ["malformed JSON", "one complete JSON object"]),
    "not_an_object": ("products.jsonl", ['["p1", "img/p1.png"]'], 1, ["expected a JSON object, got an array"]),
    "scalar_line": ("rooms.jsonl", ['"r1"'], 1, ["expected a JSON object, got a string"]),
    "missing_product_id": ("products.jsonl", [{"image": "img/p1.png"}], 1,
                           ["missing required field 'product_id'", "add it"]),
    "missing_image": ("rooms.jsonl", [{"room_id": "r1", "image": "img/r1.png"}, {"room_id": "r2"}], 2,
                      ["missing required field 'image'"]),
    "numeric_product_id": ("products.jsonl", [{"product_id": 123, "image": "img/p1.png"}], 1,
                           ["'product_id' must be a string, got a number (123)", "quotes"]),
    "image_not_string": ("products.jsonl", [{"product_id": "p1", "image": ["img/p1.png"]}], 1,
                         ["'image' must be a string, got an array"]),
    "title_not_string": ("products.jsonl", [{"product_id": "p1", "image": "img/p1.png", "title": 5}], 1,
                         ["'title' must be a string or null, got a number"]),
    "category_not_string": ("products.jsonl", [{"product_id": "p1", "image": "img/p1.png", "category": True}], 1,
                            ["'category' must be a string or null, got a boolean"]),
    "scene_not_string": ("rooms.jsonl", [{"room_id": "r1", "image": "img/r1.png", "scene": {"a": 1}}], 1,
                         ["'scene' must be a string or null, got an object"]),
    "empty_product_id": ("products.jsonl", [{"product_id": "", "image": "img/p1.png"}], 1,
                         ["'product_id' is empty", "non-empty"]),
    "blank_room_id": ("rooms.jsonl", [{"room_id": "  ", "image": "img/r1.png"}], 1, ["'room_id' is empty"]),
    "empty_image": ("products.jsonl", [{"product_id": "p1", "image": ""}], 1, ["'image' is empty"]),
    "duplicate_room_id": ("rooms.jsonl", [{"room_id": "x", "image": "img/r1.png"}, {"room_id": "y", "image": "img/r1.png"},
                                          {"room_id": "x", "image": "img/r2.png"}], 3,
                          ["duplicate room_id 'x' (first seen on line 1); room ids must be unique"]),
    "duplicate_key": ("products.jsonl", ['{"product_id": "p1", "image": "img/p1.png", "product_id": "p2"}'], 1,
                      ["duplicate key 'product_id'"]),
    "absolute_image": ("products.jsonl", [{"product_id": "p1", "image": "/abs/p1.png"}], 1,
                       ["is absolute", "relative to the folder"]),
    "missing_image_file": ("rooms.jsonl", [{"room_id": "r1", "image": "img/r1.png"}, {"room_id": "r2", "image": "img/gone.jpg"}],
                           2, ["image 'img/gone.jpg' not found", "fix the path"]),
    "scene_images_missing_scene": ("images.jsonl", [{"image": "img/s1.png"}], 1, ["missing required field 'scene'"]),
    "scene_images_unknown_field": ("images.jsonl", [{"image": "img/s1.png", "scene": "a", "split": "train"}], 1,
                                   ["unknown field(s) 'split'", "only 'image' and 'scene'"]),
    "scene_images_duplicate": ("images.jsonl", [{"image": "img/s1.png", "scene": "a"}, {"image": "./img/s1.png", "scene": "b"}],
                               2, ["duplicate image", "first seen on line 1"]),
}
READERS = {"products.jsonl": read_products, "rooms.jsonl": read_rooms, "images.jsonl": read_scene_images}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_jsonl_validation(tiny, case):
    name, rows, line, words = JSONL_CASES[case]
    path = _write_jsonl(tiny / name, rows)
    with pytest.raises(DataError) as info:
        READERS[name](path)
    err = info.value
    assert (err.path, err.line) == (path, line)
    assert str(err).startswith(f"{path} line {line}: ")
    for word in words:
        assert word in str(err)
    with pytest.raises(DataError):  # load_dataset reports the same problem
        load_dataset(tiny)


def test_non_utf8_names_the_line(tiny):
    path = tiny / "products.jsonl"
    path.write_bytes(b'{"product_id": "p1", "image": "img/p1.png"}\n{"product_id": "caf\xe9", "image": "img/p2.png"}\n')
    with pytest.raises(DataError, match=r"products\.jsonl line 2: not valid UTF-8 \(byte 0xe9.*save the file as UTF-8"):
        read_products(path)
    (tiny / "pairs.csv").write_bytes(b"room_id,product_id\nr1,p1\nr2,p\xff\n")
    with pytest.raises(DataError, match=r"pairs\.csv line 3: not valid UTF-8"):
        read_pairs(tiny / "pairs.csv")


PAIRS_CASES = {
    "bad_header": ("room,product\nr1,p1\n", 1, ["bad header 'room,product'", "exactly 'room_id,product_id'"]),
    "swapped_header": ("product_id,room_id\np1,r1\n", 1, ["bad header"]),
    "no_header": ("r1,p1\n", 1, ["bad header 'r1,p1'"]),
    "three_columns": ("room_id,product_id\nr1,p1\nr1,p2,x\n", 3, ["expected 2 columns", "got 3"]),
    "empty_cell": ("room_id,product_id\nr1,\n", 2, ["empty product_id"]),
    "duplicate_pair": ("room_id,product_id\nr1,p1\n\nr2,p3\nr1,p1\n", 5,
                       ["duplicate pair 'r1','p1' (first seen on line 2)", "list each pair once"]),
    "unknown_room": ("room_id,product_id\nr1,p1\nr9,p1\n", 3, ["unknown room_id 'r9'", "rooms.jsonl"]),
    "unknown_product": ("room_id,product_id\nr1,p1\nr2,p9\n", 3, ["unknown product_id 'p9'", "products.jsonl"]),
}


@pytest.mark.parametrize("case", sorted(PAIRS_CASES))
def test_pairs_validation(tiny, case):
    text, line, words = PAIRS_CASES[case]
    path = tiny / "pairs.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_pairs(path, room_ids={"r1", "r2"}, product_ids={"p1", "p2", "p3"})
    assert (info.value.path, info.value.line) == (path, line)
    assert str(info.value).startswith(f"{path} line {line}: ")
    for word in words:
        assert word in str(info.value)
    with pytest.raises(DataError, match=rf"pairs\.csv line {line}: "):
        load_dataset(tiny)


def test_pairs_unknown_ids_only_checked_when_given(tiny):
    path = tiny / "pairs.csv"
    path.write_text("room_id,product_id\nr9,p9\n", encoding="utf-8")
    assert read_pairs(path) == [("r9", "p9")]


def test_pairs_empty_file(tiny):
    (tiny / "pairs.csv").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs\.csv: empty file") as info:
        read_pairs(tiny / "pairs.csv")
    assert info.value.line is None
    (tiny / "pairs.csv").write_text("room_id,product_id\n", encoding="utf-8")
    assert read_pairs(tiny / "pairs.csv") == []


def test_load_dataset_folder_errors(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset files found.*products.jsonl, rooms.jsonl, pairs.csv, images.jsonl"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(tmp_path / "absent")
    (tiny / "rooms.jsonl").unlink()
    with pytest.raises(DataError, match=r"pairs\.csv: pairs need rooms\.jsonl beside them"):
        load_dataset(tiny)
    (tiny / "pairs.csv").unlink()
    ds = load_dataset(tiny)
    assert (len(ds.products), ds.rooms, ds.pairs, len(ds.scene_images)) == (3, [], [], 2)


def test_reader_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"products\.jsonl: does not exist"):
        read_products(tmp_path / "products.jsonl")


def test_data_error_is_value_error_and_picklable(tiny):
    (tiny / "pairs.csv").write_text("room_id,product_id\nr9,p1\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_dataset(tiny)
    err = pickle.loads(pickle.dumps(info.value))
    assert isinstance(err, DataError)
    assert (str(err), err.path, err.line) == (str(info.value), info.value.path, 2)
