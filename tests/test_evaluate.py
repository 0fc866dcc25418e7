"""Evaluation of a model over a catalogue, and its baselines."""
import json
import warnings

import numpy as np
import torch
import pytest
from PIL import Image

import hgm_mm
from hgm_mm.data import load_dataset
from hgm_mm.evaluation import baseline_evaluations, popularity_scores
from hgm_mm.evaluation.evaluate import relevance


@pytest.fixture
def small_dataset(tmp_path):
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (120, 120, 120), (220, 220, 20)]
    (tmp_path / "img").mkdir()
    products = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (40, 40), colour).save(tmp_path / "img" / f"p{i}.png")
        products.append({"product_id": f"p{i}", "image": f"img/p{i}.png", "title": f"item {i}",
                         "category": "sofa" if i < 2 else "lamp"})
    rooms = []
    for r, scene in enumerate(["bedroom", "bedroom", "kitchen"]):
        Image.new("RGB", (64, 48), colours[r]).save(tmp_path / "img" / f"r{r}.png")
        rooms.append({"room_id": f"r{r}", "image": f"img/r{r}.png", "scene": scene, "title": f"room {r}"})
    (tmp_path / "products.jsonl").write_text("\n".join(json.dumps(p) for p in products))
    (tmp_path / "rooms.jsonl").write_text("\n".join(json.dumps(r) for r in rooms))
    (tmp_path / "pairs.csv").write_text("room_id,product_id\nr0,p0\nr0,p2\nr1,p0\nr1,p3\nr2,p4\n")
    return load_dataset(tmp_path)


def test_popularity_counts_training_pairs_and_scene_popularity_uses_the_scene(small_dataset):
    d = small_dataset
    train_pairs = [("r0", "p0"), ("r0", "p2"), ("r1", "p0"), ("r2", "p4")]
    overall = popularity_scores(d.products, d.rooms, train_pairs)
    assert overall[0].tolist() == [2, 0, 1, 0, 1]
    by_scene = popularity_scores(d.products, d.rooms, train_pairs, d.rooms, by_scene=True)
    # bedroom rooms: p0 twice, p2 once; ties broken by global counts scaled below 1 (2/3, 0, 1/3, 0, 1/3)
    assert np.allclose(by_scene[0], [2 + 2 / 3, 0, 1 + 1 / 3, 0, 1 / 3])
    assert np.argmax(by_scene[2]) == 4  # the kitchen room's most popular product is the kitchen's


def test_evaluate_ranks_the_whole_catalogue(small_dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model("hgm-tiny")
    d = small_dataset
    result = hgm_mm.evaluate(model, d.products, d.rooms, d.pairs, progress=False)
    assert result.n_rooms == 3 and result.n_products == 5
    assert set(result.by_scene) == {"bedroom", "kitchen"} and result.by_scene["bedroom"]["rooms"] == 2
    # 5 products: every room's products are in the top 10
    assert result.metrics["recall@10"] == 1.0 and result.metrics["hit_rate@10"] == 1.0
    assert 0 < result.metrics["map"] <= 1
    assert set(result.recall_by_category) == {"sofa", "lamp"}


def test_baselines_include_random_popularity_and_frozen_features(small_dataset):
    d = small_dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = hgm_mm.create_model("hgm-tiny")
    results = baseline_evaluations(d.products, d.rooms, d.pairs, train_pairs=d.pairs, train_rooms=d.rooms,
                                   frozen_model=frozen, ks=(1, 2), progress=False)
    assert set(results) == {"random", "popularity", "scene_popularity", "frozen_features"}
    # random ranking of 5 products, k=1: E[recall@1] = 1/5 for every room
    assert results["random"]["recall@1"] == pytest.approx(0.2)
    # scene popularity from the test pairs themselves ranks a room's own products first
    assert results["scene_popularity"]["hit_rate@1"] == 1.0
    assert results["scene_popularity"]["recall@2"] > results["popularity"]["recall@2"]


def test_relevance_matrix_marks_the_pairs(small_dataset):
    d = small_dataset
    relevant = relevance(d.rooms, d.products, d.pairs)
    assert relevant.sum() == 5 and relevant[0, 0] and relevant[0, 2] and not relevant[0, 1]


def test_scene_evaluation_counts_right_and_wrong_predictions(tmp_path):
    from hgm_mm.data import SceneImage
    from hgm_mm.evaluation import evaluate_scenes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model("hgm-tiny", scene_labels=["bedroom", "kitchen"])
    images = []
    for i, colour in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 200)]):
        path = tmp_path / f"s{i}.png"
        Image.new("RGB", (48, 48), colour).save(path)
        images.append(SceneImage(image=path, scene=["bedroom", "kitchen"][i % 2]))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    result = evaluate_scenes(model, images + [SceneImage(image=tmp_path / "bad.png", scene="kitchen")],
                             progress=False, num_workers=0)
    with torch.no_grad():  # the same prediction, computed directly
        predicted = [max(p, key=p.get) for p in model.predict_scene([i.image for i in images])]
    expected = sum(p == i.scene for p, i in zip(predicted, images)) / 4
    assert result.n_images == 4 and len(result.skipped) == 1
    assert result.accuracy == pytest.approx(expected)
    assert sum(map(sum, result.confusion)) == 4
    with pytest.raises(ValueError, match=r"\['laundry'\] are not among the model's scene labels"):
        evaluate_scenes(model, [SceneImage(image=images[0].image, scene="laundry")], progress=False)


def test_held_out_rooms_leave_out_what_the_model_folder_trained_on(tmp_path):
    from hgm_mm.data.records import Room
    from hgm_mm.evaluation import held_out_rooms

    rooms = [Room(room_id=f"r{i}", image=tmp_path / "room.jpg", scene="bedroom", title="") for i in range(4)]
    assert held_out_rooms(rooms, None) == (rooms, 0)
    assert held_out_rooms(rooms, tmp_path) == (rooms, 0)  # a folder without training pairs
    (tmp_path / "train_pairs.csv").write_text("room_id,product_id\nr0,p1\nr2,p1\nr2,p3\n")
    assert held_out_rooms(rooms, tmp_path) == ([rooms[1], rooms[3]], 2)
    with pytest.raises(ValueError, match="every room is one the model was trained on"):
        held_out_rooms(rooms[:1], tmp_path)
