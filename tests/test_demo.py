"""The demo job: dataset lookup, the subset it trains and shows on, the contact sheet, end to end."""
import json

import pytest
from PIL import Image

import hgm_mm
from hgm_mm.data import load_dataset
from hgm_mm.data.ikea_repo import DownloadError
from hgm_mm.data.split import split_rooms
from hgm_mm.apps.contact_sheet import HIT_COLOUR, write_contact_sheet
from hgm_mm.apps.demo import choose_subset, find_demo_data, run_demo, write_subset
from hgm_mm.ranking.matcher import MatchResult, RankedProduct
from hgm_mm.data.scenes import scene_words

SCENES = ["bedroom", "kitchen", "living_room"]


def _dataset(root, rooms_per_scene=4, n_products=30):
    """Rooms of three scenes, each holding four of the catalogue's products."""
    (root / "img").mkdir(parents=True)
    products, rooms, pairs = [], [], []
    for i in range(n_products):
        Image.new("RGB", (24, 24), (8 * i % 256, 80, 160)).save(root / "img" / f"p{i:02d}.jpg")
        products.append({"product_id": f"p{i:02d}", "image": f"img/p{i:02d}.jpg", "title": f"product {i}",
                         "category": ["sofa", "lamp", "rug"][i % 3]})
    for s, scene in enumerate(SCENES):
        for j in range(rooms_per_scene):
            room_id = f"{scene}-{j}"
            Image.new("RGB", (48, 32), (40 * s, 30 * j, 90)).save(root / "img" / f"{room_id}.jpg")
            rooms.append({"room_id": room_id, "image": f"img/{room_id}.jpg", "scene": scene, "title": f"a {scene}"})
            pairs += [(room_id, f"p{(s * 7 + j * 3 + k) % n_products:02d}") for k in range(4)]
    (root / "products.jsonl").write_text("\n".join(json.dumps(p) for p in products))
    (root / "rooms.jsonl").write_text("\n".join(json.dumps(r) for r in rooms))
    (root / "pairs.csv").write_text("room_id,product_id\n" + "".join(f"{r},{p}\n" for r, p in sorted(set(pairs))))
    return root


def test_the_data_folder_may_be_the_dataset_or_the_folder_holding_ikea(tmp_path, monkeypatch):
    dataset = _dataset(tmp_path / "root" / "ikea")
    assert find_demo_data(dataset, echo=None) == dataset
    assert find_demo_data(tmp_path / "root", echo=None) == dataset
    monkeypatch.setenv("HGM_DATA", str(tmp_path / "root"))
    assert find_demo_data(None, echo=None) == dataset
    with pytest.raises(FileNotFoundError, match="holds no products.jsonl .* pass --data a dataset folder"):
        find_demo_data(tmp_path, echo=None)


def test_without_data_or_network_the_demo_fails_with_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HGM_DATA", raising=False)
    with pytest.raises(DownloadError) as info:
        run_demo(None, output=tmp_path / "out", model="hgm-tiny", cache_dir=tmp_path / "cache",
                 download_url="https://127.0.0.1:9/ikea.tar.gz")
    message = str(info.value)
    assert "\n" not in message and message.count(";") == 1
    assert message.endswith("pass --data DIR or set HGM_DATA to a folder with products.jsonl, rooms.jsonl and "
                            "pairs.csv")
    assert "using the public IKEA room dataset" in capsys.readouterr().out  # it said what it tried
    assert not (tmp_path / "out").exists()  # nothing trained or written


def test_the_shown_rooms_are_held_out_and_keep_their_products(tmp_path):
    dataset = load_dataset(_dataset(tmp_path / "data"))
    subset = choose_subset(dataset, train_rooms=8, products=14, shown=2, val_fraction=0.25, seed=3)
    assert len(subset.rooms) == 8 and len(subset.products) == 14
    train_side, val_side = split_rooms(subset.rooms, val_fraction=0.25, seed=3)  # as hgm_mm.train splits them
    assert subset.train_rooms == train_side and subset.val_rooms == val_side
    shown_ids = [room.room_id for room in subset.shown]
    assert set(shown_ids) <= {room.room_id for room in val_side} and len({room.scene for room in subset.shown}) == 2
    ids = {p.product_id for p in subset.products}
    positives = dataset.positives()
    for room in subset.shown:
        assert set(positives[room.room_id]) <= ids  # every product of a shown room can be found
    paired_rooms = {room_id for room_id, _ in subset.pairs}
    assert {room.room_id for room in train_side} <= paired_rooms  # every training room keeps products
    assert all(p in ids and r in {room.room_id for room in subset.rooms} for r, p in subset.pairs)
    assert set(subset.pairs) <= set(dataset.pairs)
    with pytest.raises(ValueError, match="rooms on both a training and a validation side"):
        choose_subset(load_dataset(_dataset(tmp_path / "small", rooms_per_scene=1)), train_rooms=8)


def test_the_subset_folder_points_at_the_original_photos(tmp_path):
    dataset = load_dataset(_dataset(tmp_path / "data"))
    subset = choose_subset(dataset, train_rooms=6, products=10, shown=1)
    folder = write_subset(subset, tmp_path / "out" / "subset")
    written = load_dataset(folder)
    assert [p.image for p in written.products] == [p.image for p in subset.products]
    described = [(r.room_id, r.scene, r.image) for r in written.rooms]
    assert described == [(r.room_id, r.scene, r.image) for r in subset.rooms]
    assert written.pairs == subset.pairs
    assert not any(path.suffix == ".jpg" for path in folder.rglob("*"))  # no photo copied


def _ranked(product_id, image, score):
    return RankedProduct(product_id, score, {"similarity": score, "scene_fit": 0.0, "profile": 0.0, "diversity": 0.0},
                         {"title": f"title of {product_id}", "category": "sofa", "image": str(image)})


def test_the_contact_sheet_shows_each_room_beside_its_products_and_frames_the_hits(tmp_path):
    dataset = load_dataset(_dataset(tmp_path / "data"))
    room = dataset.rooms_by_id["kitchen-1"]
    products = dataset.products_by_id
    result = MatchResult("kitchen", {"kitchen": 0.7, "bedroom": 0.3},
                         [_ranked("p01", products["p01"].image, 0.9), _ranked("p02", products["p02"].image, 0.8),
                          _ranked("p03", "/no/such/photo.jpg", 0.7)], [])
    path = write_contact_sheet(tmp_path / "sheet.png", [(room, result), (room, result)], {"kitchen-1": {"p02"}},
                               title="demo", tile=100, room_height=120)
    with Image.open(path) as sheet:
        sheet = sheet.convert("RGB")
        gap, room_width = 12, 180
        row_height = 22 + max(120, 100 + 44) + gap
        assert sheet.size == (gap + room_width + gap + 3 * (100 + gap), 28 + 2 * row_height)
        y = 28 + 22  # first row's photos
        hit_x = gap + room_width + gap + (100 + gap)  # second product
        miss_x = gap + room_width + gap
        assert sheet.getpixel((hit_x - 2, y + 50)) == HIT_COLOUR
        assert sheet.getpixel((miss_x - 2, y + 50)) == (255, 255, 255)
        with Image.open(products["p01"].image) as photo:
            assert sheet.getpixel((miss_x + 50, y + 50)) == photo.convert("RGB").getpixel((12, 12))
        assert sheet.getpixel((hit_x - 2, y + row_height + 50)) == HIT_COLOUR  # every row drawn


@pytest.mark.slow
def test_the_demo_trains_indexes_matches_and_draws_on_the_ikea_data(shared_data, tmp_path, capsys):
    if not (shared_data / "ikea" / "products.jsonl").is_file():
        pytest.skip(f"{shared_data / 'ikea'} absent: the IKEA dataset is not in the shared data folder")
    with pytest.warns(UserWarning):  # hgm-tiny announces its random weights
        result = run_demo(shared_data, output=tmp_path / "demo", model="hgm-tiny", rooms=2, train_rooms=8,
                          products=40, steps=2, batch_size=8, top_k=3, progress=False)
    out = capsys.readouterr().out
    assert f"contact sheet: {result.contact_sheet.resolve()}" in out and "Done in" in out
    document = json.loads(result.report.read_text())
    assert document["steps"] == 2 and len(document["rooms"]) == 2
    trained_on = set((result.model_dir / "train_pairs.csv").read_text().split())
    for room in document["rooms"]:
        assert len(room["products"]) == 3 and room["scene_probabilities"] and room["product_set"]
        assert set(room["products"][0]["reasons"]) == {"similarity", "scene_fit", "profile", "diversity"}
        assert not any(line.startswith(room["room_id"] + ",") for line in trained_on)  # a held-out room
        assert f"room {room['room_id']} (true scene: {scene_words(room['true_scene'])}): the guide sees " in out
    held_out = document["held_out"]  # every held-out room measured, beside chance and random
    assert held_out["rooms"] >= 2 and 0 <= held_out["scene_correct"] <= held_out["rooms"]
    assert held_out["scene_accuracy"] == pytest.approx(held_out["scene_correct"] / held_out["rooms"])
    assert 0 < held_out["random_recall@10"] < 1 and 0 < held_out["scene_chance"] <= 1
    assert (f"on the {held_out['rooms']} held-out rooms: scene from the photo right for {held_out['scene_correct']} "
            f"(accuracy {held_out['scene_accuracy']:.2f}; chance {held_out['scene_chance']:.2f})") in out
    assert hgm_mm.load_model(result.model_dir).config.scene_source == "photo"  # the demo trained the scene heads
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.width >= 12 + 330 + 12 + 3 * 172 and sheet.height > 2 * 200
    from hgm_mm.ranking.matcher import Matcher

    assert len(Matcher.load(result.index_dir).index) == 40  # the folder works on its own


@pytest.mark.slow
def test_the_demo_runs_end_to_end_on_a_small_dataset_and_counts_an_unreadable_photo(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    (data / "img" / "p29.jpg").write_bytes(b"not a jpeg")  # a distractor's photo
    with pytest.warns(UserWarning):  # hgm-tiny announces its random weights
        result = run_demo(data, output=tmp_path / "demo", model="hgm-tiny", rooms=2, train_rooms=6, products=30,
                          steps=1, batch_size=8, top_k=4, progress=False)
    out = capsys.readouterr().out
    assert result.unreadable_photos == [str(data / "img" / "p29.jpg")]
    assert "Unreadable photos: 1 in the catalogue" in out
    assert len(result.matches) == 2 and all(len(m.products) == 4 for m in result.matches.values())
    for room_id, match in result.matches.items():  # the count of in-room products is what the marks show
        block = out.split(f"room {room_id} (")[1].split("\n\n")[0]
        assert sum(line.startswith("  ") and line.strip()[3:5] == "* " for line in block.splitlines()) \
            == result.hits[room_id]
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.format == "JPEG" and sheet.height > 2 * 220
