"""The public IKEA repository: restricted unpickling, conversion to the dataset format, download."""
import collections
import datetime
import json
import os
import pickle
import tarfile

import pytest
from PIL import Image

from hgm_mm.data import load_dataset
from hgm_mm.data.ikea_repo import (IKEA_COMMIT, DownloadError, IkeaRepoError, UnsafePickleError, coarse_category,
                                   convert_ikea_repo, download_ikea, ikea_dataset, read_pickle, scene_label)

BEDROOM = "ikea-a-calm-bedroom-in-white__1364308431819-s4.jpg"
DINING = "ikea-enjoy-a-family-setting.-clogs-optional.__1364308405550-s4.jpg"
DINING_AGAIN = "ikea-enjoy-a-family-setting.-clogs-optional-1364335370196.jpg"  # the same caption, another photo


def _py2_pickle(obj) -> bytes:
    """The bytes Python 2's pickle.dumps(obj) (protocol 0) writes for dicts, lists and byte strings."""
    def encode(value) -> bytes:
        if isinstance(value, dict):
            return b"(d" + b"".join(encode(k) + encode(v) + b"s" for k, v in value.items())
        if isinstance(value, list):
            return b"(l" + b"".join(encode(v) + b"a" for v in value)
        raw = value.encode("utf-8") if isinstance(value, str) else value
        return b"S" + repr(raw)[1:].encode("ascii") + b"\n"  # a Python 2 str: its bytes, quoted and escaped
    return encode(obj) + b"."


def _photo(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _mini_repo(root):
    """A repository with the real layout and pickle structures, three products and three room photos."""
    text = root / "text_data"
    text.mkdir(parents=True)
    item_to_room = {
        "images/objects/101.000.01.jpg": [f"images/room_scenes/{BEDROOM}", f"images/room_scenes/{DINING}"],
        "images/chair/102.000.02.jpg": [f"images/room_scenes/{DINING}", f"images/room_scenes/{DINING_AGAIN}"],
        "images/objects/103.000.03.jpg": [f"images/room_scenes/{BEDROOM}",
                                          "images/room_scenes/ikea-a-room-never-downloaded__1364308000000-s4.jpg"],
        "images/objects/109.000.09.jpg": [f"images/room_scenes/{BEDROOM}"],  # no photo of this product
    }
    products = {
        "101.000.01": {"name": "KIVIK", "type": "Three-seat sofa", "color": "Grey", "size": "228x95 cm",
                       "desc": "View more product information Seat cushions stay soft",
                       "img": "images/objects/101.000.01.jpg"},
        "102.000.02": {"name": "BERNHARD", "type": "Chair", "color": "Chrome-plated", "size": "",
                       "desc": "You sit comfortably.", "img": "images/objects/102.000.02.jpg"},
        "103.000.03": {"name": "G\u00c5SER", "type": "Rug, high pile", "color": "Dark grey", "size": "56x150 cm",
                       "desc": "", "img": "images/objects/103.000.03.jpg"},
        "109.000.09": {"name": "LOST", "type": "Vase", "color": "", "size": "", "desc": "",
                       "img": "images/objects/109.000.09.jpg"},
    }
    descriptions = {"/static/images/102.000.02.jpg": {"desc": "The seat flexes as you sit.", "name": "BERNHARD"}}
    room_items = {BEDROOM: ["Three-seat sofa", "Rug, high pile"], DINING: ["Chair"]}
    scenes = {BEDROOM: "Bedroom", DINING: "Dining", DINING_AGAIN: "Dining"}
    for name, obj in [("item_to_room.p", item_to_room), ("products_dict.p", products), ("img_to_desc.p", descriptions),
                      ("room_to_items.p", room_items)]:
        (text / name).write_bytes(_py2_pickle(obj))
    (text / "categories_dict.p").write_bytes(pickle.dumps(scenes, protocol=2))  # a Python 3 pickle reads too
    _photo(root / "images" / "objects" / "101.000.01.jpg", (800, 600), (200, 30, 30))
    _photo(root / "images" / "chair" / "102.000.02.jpg", (300, 300), (30, 200, 30))
    _photo(root / "images" / "objects" / "103.000.03.jpg", (300, 300), (30, 30, 200))
    for name, colour in [(BEDROOM, (90, 90, 90)), (DINING, (120, 100, 80)), (DINING_AGAIN, (80, 100, 120))]:
        _photo(root / "images" / "room_scenes" / name, (2048, 1536), colour)
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_mini_repository_converts_to_the_expected_rows(tmp_path):
    repo = _mini_repo(tmp_path / "repo")
    result = convert_ikea_repo(repo, tmp_path / "ikea")
    out = tmp_path / "ikea"
    assert (result.n_products, result.n_rooms, result.n_pairs) == (3, 3, 5)
    assert any(line.startswith("109.000.09") for line in result.skipped)  # listed, no photo
    assert _rows(out / "products.jsonl") == [
        {"product_id": "101.000.01", "image": "images/products/101.000.01.jpg", "title": "KIVIK", "category": "sofa",
         "product_type": "Three-seat sofa", "color": "Grey", "size": "228x95 cm",
         "description": "View more product information Seat cushions stay soft"},
        {"product_id": "102.000.02", "image": "images/products/102.000.02.jpg", "title": "BERNHARD",
         "category": "chair", "product_type": "Chair", "color": "Chrome-plated", "size": "",
         "description": "The seat flexes as you sit."},  # img_to_desc.p wins over products_dict.p
        {"product_id": "103.000.03", "image": "images/products/103.000.03.jpg",
         "title": "G\u00c5SER",  # Python 2 UTF-8 bytes repaired
         "category": "rug", "product_type": "Rug, high pile", "color": "Dark grey", "size": "56x150 cm",
         "description": ""},
    ]
    rooms = _rows(out / "rooms.jsonl")
    repeated = rooms[2]["room_id"]  # a caption used twice: the photo later in name order gets a hashed suffix
    assert repeated.startswith("enjoy-a-family-setting-clogs-optional-") and len(repeated.rsplit("-", 1)[1]) == 6
    assert rooms == [
        {"room_id": "a-calm-bedroom-in-white", "image": "images/rooms/a-calm-bedroom-in-white.jpg", "scene": "bedroom",
         "title": "a calm bedroom in white", "item_types": ["three-seat sofa", "rug, high pile"]},
        {"room_id": "enjoy-a-family-setting-clogs-optional",
         "image": "images/rooms/enjoy-a-family-setting-clogs-optional.jpg",
         "scene": "dining_room", "title": "enjoy a family setting. clogs optional", "item_types": []},
        {"room_id": repeated, "image": f"images/rooms/{repeated}.jpg", "scene": "dining_room",
         "title": "enjoy a family setting. clogs optional", "item_types": ["chair"]},
    ]
    pairs = (out / "pairs.csv").read_text().splitlines()
    assert pairs == ["room_id,product_id", "a-calm-bedroom-in-white,101.000.01", "a-calm-bedroom-in-white,103.000.03",
                     "enjoy-a-family-setting-clogs-optional,102.000.02", f"{repeated},101.000.01",
                     f"{repeated},102.000.02"]
    dataset = load_dataset(out)  # the project's own readers accept what was written
    assert len(dataset.products) == 3 and len(dataset.pairs) == 5
    with Image.open(out / "images" / "rooms" / "a-calm-bedroom-in-white.jpg") as room:
        assert room.size == (1024, 768)
    with Image.open(out / "images" / "products" / "101.000.01.jpg") as product:
        assert product.size == (500, 375)


def test_an_unreadable_photo_is_left_out_and_listed(tmp_path):
    repo = _mini_repo(tmp_path / "repo")
    (repo / "images" / "chair" / "102.000.02.jpg").write_bytes(b"not a jpeg")
    result = convert_ikea_repo(repo, tmp_path / "ikea")
    assert result.n_products == 2 and "102.000.02" not in (tmp_path / "ikea" / "products.jsonl").read_text()
    assert "102.000.02" not in (tmp_path / "ikea" / "pairs.csv").read_text()
    assert any("102.000.02.jpg" in line for line in result.skipped)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_a_function_is_refused_without_running_it(tmp_path):
    repo = _mini_repo(tmp_path / "repo")
    marker = tmp_path / "the-command-ran"
    payload = {"101.000.01": {"name": "KIVIK", "type": _RunsACommand(marker)}}
    (repo / "text_data" / "products_dict.p").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"products_dict\.p: the pickle names posix\.system"):
        convert_ikea_repo(repo, tmp_path / "ikea")
    assert not marker.exists() and not (tmp_path / "ikea").exists()


@pytest.mark.parametrize("value", [collections.OrderedDict(a="b"), datetime.date(2017, 1, 1)])
def test_only_plain_containers_and_strings_are_admitted(tmp_path, value):
    path = tmp_path / "x.p"
    path.write_bytes(pickle.dumps({"key": value}, protocol=2))
    with pytest.raises(UnsafePickleError, match="x.p: the pickle names"):
        read_pickle(path)
    plain = {"a": [1, 2.5, True, None, ("t",), {"s"}, frozenset({"f"})]}
    path.write_bytes(pickle.dumps(plain, protocol=2))  # sets named through find_class
    assert read_pickle(path) == plain
    path.write_bytes(pickle.dumps({"a": b"caf\xc3\xa9"}, protocol=4))
    assert read_pickle(path) == {"a": "caf\u00e9"}  # byte strings become text


def test_an_unexpected_structure_names_the_file_and_the_entry(tmp_path):
    repo = _mini_repo(tmp_path / "repo")
    (repo / "text_data" / "item_to_room.p").write_bytes(_py2_pickle(["images/objects/101.000.01.jpg"]))
    with pytest.raises(IkeaRepoError, match=r"item_to_room\.p: expected a non-empty dict"):
        convert_ikea_repo(repo, tmp_path / "ikea")
    (repo / "text_data" / "item_to_room.p").write_bytes(_py2_pickle({"images/objects/101.000.01.jpg": "a room"}))
    with pytest.raises(IkeaRepoError, match=r"item_to_room\.p: entry 'images/objects/101\.000\.01\.jpg' holds str"):
        convert_ikea_repo(repo, tmp_path / "ikea")
    repo = _mini_repo(tmp_path / "another")
    (repo / "text_data" / "room_to_items.p").unlink()
    with pytest.raises(IkeaRepoError, match=r"room_to_items\.p: file not found"):
        convert_ikea_repo(repo, tmp_path / "ikea")
    (repo / "text_data" / "item_to_room.p").write_bytes(b"\x80\x02}q\x00")  # cut short
    with pytest.raises(IkeaRepoError, match=r"item_to_room\.p: not a readable pickle"):
        convert_ikea_repo(repo, tmp_path / "ikea")
    assert not (tmp_path / "ikea").exists()


def test_download_without_network_fails_with_one_clear_sentence(tmp_path, capsys):
    with pytest.raises(DownloadError) as info:
        download_ikea(tmp_path / "cache", url="https://127.0.0.1:9/ikea.tar.gz", timeout=5)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot download the IKEA room dataset")
    assert message.endswith("pass --data DIR or set HGM_DATA to a folder with products.jsonl, rooms.jsonl and "
                            "pairs.csv")
    assert "downloading the IKEA room dataset" in capsys.readouterr().out
    assert not list((tmp_path / "cache" / "ikea").iterdir())  # nothing half-written left behind


def _archive(repo, path):
    """A GitHub-style archive of `repo` (one top folder) plus members that must never be unpacked."""
    top = f"ikea-{IKEA_COMMIT}"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(repo, arcname=top)
        escape = tarfile.TarInfo(f"{top}/images/../../escaped.txt")
        escape.size = 0
        tar.addfile(escape)
        link = tarfile.TarInfo(f"{top}/images/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path


def test_download_unpacks_the_archive_once_and_safely(tmp_path, capsys):
    archive = _archive(_mini_repo(tmp_path / "repo"), tmp_path / "ikea.tar.gz")
    cache = tmp_path / "cache"
    with pytest.raises(IkeaRepoError, match="escaped"):  # a member leaving the folder stops the unpacking
        download_ikea(cache, url=archive.as_uri())
    assert not (cache / "escaped.txt").exists() and not (cache / "ikea" / "escaped.txt").exists()

    clean = tmp_path / "clean.tar.gz"
    with tarfile.open(clean, "w:gz") as tar:
        tar.add(tmp_path / "repo", arcname=f"ikea-{IKEA_COMMIT}")
        link = tarfile.TarInfo(f"ikea-{IKEA_COMMIT}/images/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    repo = download_ikea(cache, url=clean.as_uri())
    assert (repo / "text_data" / "item_to_room.p").is_file() and not (repo / "images" / "link").exists()
    assert "downloading the IKEA room dataset" in capsys.readouterr().out
    assert download_ikea(cache, url="https://127.0.0.1:9/unused") == repo  # cached: no second download
    assert capsys.readouterr().out == ""

    dataset = ikea_dataset(cache)
    assert len(load_dataset(dataset).rooms) == 3


def test_scene_labels_of_the_repository_categories():
    assert [scene_label(s) for s in ["Living Room", "Bedroom", "Dining", "Children's IKEA", "Home office", "Hallway"]] \
        == ["living_room", "bedroom", "dining_room", "children_room", "home_office", "hallway"]


def test_category_rules_reproduce_the_shared_ikea_rows(shared_data):
    path = shared_data / "ikea" / "products.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} absent: the IKEA dataset is not in the shared data folder")
    rows = _rows(path)
    wrong = [(r["product_type"], r["category"]) for r in rows if coarse_category(r["product_type"]) != r["category"]]
    assert not wrong and len(rows) > 2000
