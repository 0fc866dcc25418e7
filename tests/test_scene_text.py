"""Scene vocabulary and aliases, the scene-text classifier before and after training, calibration,
photo and words combined, a saved model round trip, and the train-scenes / evaluate --guide commands."""
import json
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hgm_mm
from conftest import tiny_model as shared_tiny_model
from hgm_mm.models.calibration import fit_temperature
from hgm_mm.apps.cli import main
from hgm_mm.data import DataError, SceneText, read_rooms, read_scene_images, read_scene_texts
from hgm_mm.data.scenes import DEFAULT_SCENE_LABELS, canonical_scene, combine_scene_probabilities, scene_descriptions
from hgm_mm.training.scene_text import train_scene_texts

LABELS = ["bedroom", "kitchen"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(labels=LABELS, seed: int = 0):
    return shared_tiny_model(seed, scene_labels=labels)


# -- vocabulary ------------------------------------------------------------------------------------
def test_aliases_map_to_one_label_and_unknown_names_stay():
    assert canonical_scene("entrance_hall") == "hallway" and canonical_scene("Foyer") == "hallway"
    assert canonical_scene("Living room") == "living_room" and canonical_scene("kids-room") == "children_room"
    assert canonical_scene("wine_cellar") == "wine_cellar"
    assert len(set(DEFAULT_SCENE_LABELS)) == len(DEFAULT_SCENE_LABELS) and "entrance_hall" not in DEFAULT_SCENE_LABELS
    assert all(any(re.search(r"[\u4e00-\u9fff]", d) for d in scene_descriptions(label)) for label in DEFAULT_SCENE_LABELS)


def test_readers_store_the_canonical_scene(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "images.jsonl").write_text('{"image": "a.png", "scene": "entrance_hall"}\n', encoding="utf-8")
    assert read_scene_images(tmp_path / "images.jsonl")[0].scene == "hallway"
    (tmp_path / "rooms.jsonl").write_text('{"room_id": "r", "image": "a.png", "scene": "lounge"}\n', encoding="utf-8")
    assert read_rooms(tmp_path / "rooms.jsonl")[0].scene == "living_room"
    (tmp_path / "texts.jsonl").write_text('{"text": " a foyer with hooks ", "scene": "entrance"}\n'
                                          '{"text": "北欧风格的客厅", "scene": "living_room"}\n', encoding="utf-8")
    assert read_scene_texts(tmp_path / "texts.jsonl") == [SceneText("a foyer with hooks", "hallway"),
                                                          SceneText("北欧风格的客厅", "living_room")]


@pytest.mark.parametrize("line, message", [('{"text": "a kitchen"}', "missing required field 'scene'"),
                                           ('{"text": "", "scene": "kitchen"}', "'text'"),
                                           ('{"text": "x", "scene": "kitchen", "lang": "en"}', "unknown field")])
def test_bad_text_rows_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "a kitchen", "scene": "kitchen"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)) as err:
        read_scene_texts(path)
    assert "texts.jsonl" in str(err.value) and "line 2" in str(err.value)


def test_combining_readings_is_their_normalised_product():
    combined = combine_scene_probabilities({"a": 0.6, "b": 0.4}, {"a": 0.2, "b": 0.8}, None)
    assert combined == pytest.approx({"b": 0.32 / 0.44, "a": 0.12 / 0.44})
    assert list(combined) == ["b", "a"]  # most likely first
    assert combine_scene_probabilities({"a": 0.7, "b": 0.3}) == pytest.approx({"a": 0.7, "b": 0.3})
    with pytest.raises(ValueError):
        combine_scene_probabilities(None, None)


# -- calibration -----------------------------------------------------------------------------------
def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=generator) * 3
    labels = torch.multinomial((logits / 2.5).softmax(-1), 1, generator=generator)[:, 0]
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    assert fit_temperature(logits * 4, labels) == pytest.approx(10.0, rel=0.1)
    with pytest.raises(ValueError, match="no held-out examples"):
        fit_temperature(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))


# -- the classifier --------------------------------------------------------------------------------
def test_copied_layers_compute_what_the_tower_computes():
    model = tiny_model()
    classifier, tower = model.scene_text_classifier, model.text_tower
    assert classifier.n_layers == 1 and len(classifier.layers) == 1
    tokens = model.scene_tokenizer(["a kitchen with a stove", "bed"])
    with torch.no_grad():
        features = classifier.features(classifier.lower_hidden(tower, tokens), tokens["attention_mask"])
        expected = F.normalize(tower(tokens["input_ids"], tokens["attention_mask"]), dim=-1)
    assert torch.allclose(features, expected, atol=1e-5)


def test_untrained_classifier_is_nearest_description():
    model = tiny_model()
    classifier = model.scene_text_classifier
    texts = [d for label in LABELS for d in scene_descriptions(label)]
    tokens = model.scene_tokenizer(texts)
    with torch.no_grad():
        features = classifier.features(classifier.lower_hidden(model.text_tower, tokens), tokens["attention_mask"])
        prototypes = F.normalize(torch.stack([features[:7].mean(0), features[7:].mean(0)]), dim=-1)
        nearest = (features @ prototypes.T).argmax(1)
        assert torch.equal(model.text_scene_log_probs(texts).argmax(1), nearest)
    assert torch.allclose(F.normalize(classifier.head.weight, dim=-1), prototypes, atol=1e-5)
    assert float(classifier.head.weight.detach().norm(dim=1)[0]) > 1.0  # a fitted scale, not unit cosines


@pytest.mark.slow
@pytest.mark.parametrize("name, text, scene", [
    ("hgm-lite-en", "a cosy living room with a big sofa to watch films", "living_room"),
    ("hgm-lite-en", "somewhere quiet to sleep, with a double bed", "bedroom"),
    ("hgm-lite-multilingual", "北欧风格的客厅", "living_room"),
    ("hgm-lite-multilingual", "宝宝的房间，有小床和玩具", "children_room"),
])
def test_pretrained_models_read_the_scene_from_words_before_any_training(name, text, scene):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model(name)
    (probabilities,) = model.predict_scene(texts=[text])
    assert next(iter(probabilities)) == scene, probabilities


def separable_texts():
    """Random words after a marker the untrained tower barely weighs: 'q' for bedrooms, 'z' for kitchens."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        for label, letter in zip(LABELS, "qz"):
            words = ["".join(rng.choice(list("abcdefgh"), size=int(n))) for n in rng.integers(3, 7, size=4)]
            rows.append(SceneText(" ".join([letter] + words), label))
    return rows[:56], rows[56:]


def retrieval_vectors(model):
    with torch.no_grad():
        return {"text": model.encode_text(["a sofa", "a lamp"]), "scene_text": model.encode_scene_text(["a room"]),
                "room": model.encode_room(texts=["a kitchen"])}


def test_training_improves_the_classifier_and_leaves_retrieval_alone():
    model = tiny_model()
    train, val = separable_texts()
    before = retrieval_vectors(model)
    result = train_scene_texts(model, train, val_texts=val, with_descriptions=False, epochs=40, lr=1e-2,
                               head_lr=3e-2, progress=False)
    assert result.val_accuracy == 1.0 and result.start_val_accuracy < 1.0
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.temperature == model.config.text_scene_temperature != 1.0
    for key, value in retrieval_vectors(model).items():
        assert torch.equal(value, before[key]), key
    assert all(not p.requires_grad for p in model.scene_text_classifier.parameters()) or not model.training


def test_a_classifier_with_no_layers_of_its_own_trains_its_head():
    config = tiny_model().config.to_dict()
    config["scene_text_layers"] = 0
    model = hgm_mm.HGMModel(hgm_mm.ModelConfig.from_dict(config))
    assert len(model.scene_text_classifier.layers) == 0
    train, val = separable_texts()
    before = model.scene_text_classifier.head.weight.detach().clone()
    train_scene_texts(model, train, val_texts=val, epochs=2, progress=False)
    assert not torch.equal(model.scene_text_classifier.head.weight, before)


def test_training_refuses_a_model_without_classifier_and_lists_unknown_scenes():
    model = tiny_model()
    model.scene_text_classifier = None
    with pytest.raises(ValueError, match="has no scene-text classifier"):
        train_scene_texts(model, [SceneText("a kitchen", "kitchen")], progress=False)
    result = train_scene_texts(tiny_model(), [SceneText("a garage", "garage"), SceneText("a kitchen", "kitchen")],
                               epochs=1, progress=False)
    assert result.left_out == ["garage"]


def test_a_trained_classifier_and_its_calibration_survive_save_and_load(tmp_path):
    model = tiny_model()
    train, val = separable_texts()
    train_scene_texts(model, train, val_texts=val, epochs=3, progress=False)
    model.config.photo_scene_temperature = 1.7
    folder = model.save_pretrained(tmp_path / "model")
    loaded = hgm_mm.load_model(folder)
    assert loaded.config.text_scene_temperature == model.config.text_scene_temperature
    assert loaded.config.photo_scene_temperature == 1.7
    texts = [t.text for t in val]
    with torch.no_grad():
        assert torch.equal(loaded.text_scene_log_probs(texts), model.text_scene_log_probs(texts))


def test_calibration_temperatures_divide_the_logits():
    model = tiny_model()
    texts = ["qq zz", "zzz"]
    with torch.no_grad():
        base = model.text_scene_log_probs(texts)
        model.config.text_scene_temperature = 3.0
        assert torch.allclose(model.text_scene_log_probs(texts), (base * 1 / 3.0).log_softmax(-1), atol=1e-5)
    with pytest.raises(ValueError, match="text_scene_temperature"):
        hgm_mm.ModelConfig.from_dict({**model.config.to_dict(), "text_scene_temperature": 0})


def test_old_configs_without_a_classifier_read_words_through_the_room_head():
    config = tiny_model().config.to_dict()
    config["scene_text_layers"] = None
    model = hgm_mm.HGMModel(hgm_mm.ModelConfig.from_dict(config))
    assert model.scene_text_classifier is None
    with torch.no_grad():
        expected = model.scene_head(model.encode_room(texts=["a kitchen"])).log_softmax(-1)
        assert torch.allclose(model.text_scene_log_probs(["a kitchen"]), expected, atol=1e-6)


# -- commands --------------------------------------------------------------------------------------
def colour_photos(folder, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for label, base in zip(LABELS, ([190, 60, 60], [60, 60, 190])):
            path = folder / f"{label}_{i}.png"
            Image.fromarray(np.clip(rng.normal(base, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)).save(path)
            rows.append({"image": f"{folder.name}/{path.name}", "scene": label})
    return rows


def test_train_scenes_command_trains_calibrates_and_saves(tmp_path, capsys):
    data = tmp_path / "scenes"
    rows = colour_photos(data / "train", 6, 0) + colour_photos(data / "val", 3, 1)
    (data / "images.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t.text, "scene": t.scene}) for t in separable_texts()[0]) + "\n",
                     encoding="utf-8")
    source = tiny_model().save_pretrained(tmp_path / "start")
    output = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train-scenes", "--data", str(data), "--texts", str(texts), "--model", str(source),
                     "--output", str(output), "--branch-stages", "0", "--random-crops", "0",
                     "--scene-image-size", "32", "--epochs", "8"])
    out = capsys.readouterr().out
    assert code == 0 and "photo scene head: 12 training photos" in out and "on 6 photos" in out
    report = json.loads((output / "scene_heads.json").read_text())
    assert report["photo"]["n_val"] == 6 and report["photo"]["calibration"]["temperature"] > 0
    loaded = hgm_mm.load_model(output)
    assert loaded.config.scene_source == "photo" and loaded.config.scene_image_size == 32
    assert loaded.config.photo_scene_temperature == pytest.approx(report["photo"]["calibration"]["temperature"])


def test_train_scenes_command_checks_labels_before_training(tmp_path, capsys):
    data = tmp_path / "scenes"
    rows = colour_photos(data / "train", 1, 0)
    rows[0]["scene"] = "garage"
    (data / "images.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    source = tiny_model().save_pretrained(tmp_path / "start")
    code = main(["train-scenes", "--data", str(data), "--model", str(source), "--output", str(tmp_path / "out")])
    assert code == 2 and "['garage'] are not among the model's scene labels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
