"""Scene training on images.jsonl sets: it learns, it measures what evaluate_scenes measures, bad input is handled;
the photo scene head: retrieval vectors untouched, flip averaging, text evidence, save/load, old folders."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hgm_mm
from conftest import tiny_model as shared_tiny_model
from hgm_mm.data import DataError, ImageError, SceneImage
from hgm_mm.evaluation import evaluate_scenes
from hgm_mm.training.scenes import train_scenes

LABELS = ["bedroom", "kitchen"]
HEAD_ONLY = {"branch_stages": 0, "random_crops": 0, "scene_image_size": None}  # the linear head alone, fast


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, **overrides):
    model = shared_tiny_model(seed, scene_labels=LABELS, **overrides)
    with torch.no_grad():  # an untrained head: every photo gets the first label
        model.scene_head.weight.zero_()
        model.scene_head.bias.zero_()
    return model


def photos(folder, n_per_label: int, *, seed: int) -> list[SceneImage]:
    """Noisy photos whose colour tells the scene: reddish bedrooms, bluish kitchens."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_per_label):
        for label, base in zip(LABELS, ([190, 60, 60], [60, 60, 190])):
            pixels = np.clip(rng.normal(base, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{label}_{i}.png"
            Image.fromarray(pixels).save(path)
            items.append(SceneImage(image=path, scene=label))
    return items


@pytest.fixture
def toy(tmp_path):
    return photos(tmp_path / "train", 8, seed=0), photos(tmp_path / "val", 4, seed=1)


@pytest.mark.parametrize("recipe", [{"scene_source": "room", "train_views": "all"},
                                    {"scene_source": "room", "train_views": "whole"},
                                    {"scene_source": "photo"},
                                    {"scene_source": "photo", "flip_average": False, "mirror": False,
                                     "scene_image_size": 24},
                                    {"scene_source": "photo", "branch_stages": 2, "random_crops": 2,
                                     "tower_lr": 1e-2}])
def test_training_learns_a_separable_set_and_reports_what_evaluate_scenes_measures(toy, recipe):
    train_images, val_images = toy
    model = tiny_model()
    before = evaluate_scenes(model, val_images, progress=False, num_workers=0)
    assert before.accuracy == pytest.approx(0.5)  # all "bedroom"
    result = train_scenes(model, train_images, val_images=val_images, epochs=15, lr=3e-2, batch_size=8,
                          num_workers=0, progress=False, **{**HEAD_ONLY, **recipe})
    assert model.config.scene_source == recipe["scene_source"]
    after = evaluate_scenes(model, val_images, progress=False, num_workers=0)
    assert after.accuracy >= 0.9 > before.accuracy
    assert result.val_accuracy == pytest.approx(after.accuracy)
    assert result.val_macro_f1 == pytest.approx(after.macro_f1)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.n_train == 16 and result.n_val == 8 and result.skipped == []
    # predict_scene agrees photo by photo with the accuracy reported
    with torch.no_grad():
        predicted = [max(p, key=p.get) for p in model.predict_scene([item.image for item in val_images])]
    assert np.mean([p == item.scene for p, item in zip(predicted, val_images)]) == pytest.approx(after.accuracy)


def test_room_training_changes_the_scene_head_only_and_restores_trainable_flags(toy):
    train_images, _ = toy
    model = tiny_model()
    model.text_tower.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    start = copy.deepcopy(model.state_dict())
    result = train_scenes(model, train_images, scene_source="room", epochs=2, batch_size=8, num_workers=0,
                          progress=False)
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, start[name])}
    assert changed == {"scene_head.weight", "scene_head.bias"}
    assert set(result.trained_parameters) == {"scene_head.weight", "scene_head.bias"}
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert result.val_accuracy is None and not model.training
    assert model.config.scene_source == "room" and model.photo_scene_head is None


def retrieval_outputs(model):
    """Room views, room and product vectors on fixed inputs: what retrieval reads."""
    torch.manual_seed(0)
    side = model.config.image_tower.image_size
    rooms, products = torch.randn(2, model.room_views.n_views, 3, side, side), torch.randn(2, 3, side, side)
    with torch.no_grad():
        return {"views": model.encode_room_views(rooms), "room": model.encode_room(rooms, ["calm", None]),
                "product": model.encode_product(products, ["sofa", "lamp"])}


def test_default_training_adds_a_photo_head_and_leaves_every_other_weight_and_vector_as_it_was(toy):
    train_images, val_images = toy
    model = tiny_model()
    model.text_tower.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    start, vectors = copy.deepcopy(model.state_dict()), retrieval_outputs(model)
    result = train_scenes(model, train_images, val_images=val_images, epochs=3, batch_size=8, num_workers=0,
                          progress=False, **HEAD_ONLY)
    assert model.config.scene_source == "photo" and model.config.scene_flip_average
    assert set(result.trained_parameters) == {"photo_scene_head.weight", "photo_scene_head.bias"}
    assert {name for name in model.state_dict() if name not in start} == set(result.trained_parameters)
    assert all(torch.equal(start[name], value) for name, value in model.state_dict().items() if name in start)
    for key, value in retrieval_outputs(model).items():
        assert torch.equal(value, vectors[key]), key
    assert {name: p.requires_grad for name, p in model.named_parameters() if name in flags} == flags
    assert result.history[-1]["loss"] < result.history[0]["loss"] and not model.training


def test_photo_scene_logits_average_the_mirror_image_and_add_the_scene_text(toy):
    train_images, _ = toy
    model = tiny_model()
    train_scenes(model, train_images, epochs=3, batch_size=8, num_workers=0, progress=False, **HEAD_ONLY)
    with torch.no_grad():
        model.photo_scene_head.bias.copy_(torch.tensor([0.3, -0.2]))  # a scene the mirror cannot undo
        pixels = torch.stack([model.scene_transform(Image.open(item.image).convert("RGB"))
                              for item in train_images[:3]])
        single = F.normalize(model.image_tower(pixels), dim=-1)
        mirrored = F.normalize(model.image_tower(pixels.flip(-1)), dim=-1)
        expected = ((model.photo_scene_head(single).log_softmax(-1)
                     + model.photo_scene_head(mirrored).log_softmax(-1)) / 2).log_softmax(-1)
        assert torch.allclose(model.scene_logits(pixels), expected, atol=1e-6)
        assert not torch.allclose(expected, model.photo_scene_head(single).log_softmax(-1), atol=1e-4)
        # paths read as the tensors of scene_transform
        assert torch.allclose(model.scene_logits([item.image for item in train_images[:3]]), expected, atol=1e-6)
        # scene text: the scene-text classifier's log-probabilities are added, only where a room has
        # text, and the sum renormalised (the normalised product of the two readings)
        model.scene_text_classifier.head.weight.normal_()
        with_text = model.scene_logits(pixels, ["a kitchen", None, "a bedroom"])
        text = model.text_scene_log_probs(["a kitchen", "a bedroom"])
        assert not torch.allclose(text[0], text[1], atol=1e-3)
        assert torch.allclose(with_text[[0, 2]], (expected[[0, 2]] + text).log_softmax(-1), atol=1e-5)
        assert torch.allclose(with_text[1], expected[1], atol=1e-6)
        # without a photo the words alone decide, through the classifier
        assert torch.allclose(model.scene_logits(texts=["a kitchen"]), text[:1], atol=1e-6)
    (probabilities,) = model.predict_scene(pixels[:1])
    assert list(probabilities) != [] and sum(probabilities.values()) == pytest.approx(1.0)
    assert [probabilities[label] for label in LABELS] == pytest.approx(expected[0].softmax(-1).tolist(), abs=1e-6)


def test_photo_head_survives_save_and_load_and_old_folders_keep_the_room_head(toy, tmp_path):
    train_images, val_images = toy
    model = tiny_model()
    train_scenes(model, train_images, scene_image_size=24, epochs=3, batch_size=8, num_workers=0, branch_stages=0, random_crops=0,
                 progress=False)
    model.save_pretrained(tmp_path / "photo")
    loaded = hgm_mm.load_model(tmp_path / "photo")
    assert (loaded.config.scene_source, loaded.config.scene_image_size, loaded.config.scene_flip_average) == \
        ("photo", 24, True)
    assert loaded.scene_transform(Image.open(val_images[0].image).convert("RGB")).shape == (3, 24, 24)
    paths = [item.image for item in val_images]
    with torch.no_grad():
        assert torch.equal(loaded.scene_logits(paths), model.scene_logits(paths))
    assert evaluate_scenes(loaded, val_images, progress=False, num_workers=0).to_dict() == \
        evaluate_scenes(model, val_images, progress=False, num_workers=0).to_dict()

    # a folder saved before the photo head existed has no scene_source keys: it reads the room vector
    room = tiny_model(seed=3)
    room.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "hgm_config.json"
    document = json.loads(path.read_text())
    for key in ("scene_source", "scene_image_size", "scene_flip_average"):
        document["model"].pop(key)
    path.write_text(json.dumps(document))
    old = hgm_mm.load_model(tmp_path / "old")
    assert old.config.scene_source == "room" and old.photo_scene_head is None
    with torch.no_grad():
        assert torch.equal(old.scene_logits(paths), room.scene_logits(paths))
        assert torch.equal(old.scene_logits(paths), old.scene_head(old.encode_room(paths)).log_softmax(-1))
    with pytest.raises(ValueError, match="no photo scene head; train one with"):
        old.photo_scene_logits(paths)


def test_the_last_training_decides_which_head_predict_scene_reads(toy):
    train_images, val_images = toy
    model = tiny_model()
    train_scenes(model, train_images, epochs=2, batch_size=8, num_workers=0, progress=False, **HEAD_ONLY)
    assert model.config.scene_source == "photo"
    result = train_scenes(model, train_images, val_images=val_images, scene_source="room", epochs=2, batch_size=8,
                          num_workers=0, progress=False)
    assert model.config.scene_source == "room" and model.photo_scene_head is None
    assert set(result.trained_parameters) == {"scene_head.weight", "scene_head.bias"}
    assert result.val_accuracy == pytest.approx(evaluate_scenes(model, val_images, progress=False,
                                                                num_workers=0).accuracy)


@pytest.mark.parametrize("unlocked_image_groups", [0, 1])
def test_the_room_head_of_a_feature_map_model_validates_as_evaluate_scenes_reads_it(toy, unlocked_image_groups):
    train_images, val_images = toy
    model = tiny_model(seed=0, room_views="feature_map", room_map_size=96)
    result = train_scenes(model, train_images, val_images=val_images, scene_source="room", epochs=2, batch_size=8,
                          num_workers=0, progress=False, unlocked_image_groups=unlocked_image_groups)
    assert "scene_head.weight" in result.trained_parameters
    measured = evaluate_scenes(model, val_images, progress=False, num_workers=0)
    assert result.val_accuracy == pytest.approx(measured.accuracy)
    # the calibration read the validation photos' cached logits: before the temperature, their ECE is
    # the one inference gives at temperature 1
    model.config.photo_scene_temperature = 1.0
    uncalibrated = evaluate_scenes(model, val_images, progress=False, num_workers=0)
    assert result.calibration["val_ece_before"] == pytest.approx(uncalibrated.ece, abs=1e-5)


def test_one_scene_reader_is_chosen_when_the_model_is_built_and_follows_the_head_trained(toy, tmp_path):
    train_images, _ = toy
    model = tiny_model()
    assert model.scene_reader.source == "room" and model.scene_reader.head(model) is model.scene_head
    train_scenes(model, train_images, epochs=1, batch_size=8, num_workers=0, progress=False,
                 branch_stages=2, random_crops=0, scene_image_size=None)
    reader = model.scene_reader
    assert reader.source == "photo" and reader.head(model) is model.photo_scene_head
    assert reader.branch(model) is model.photo_scene_branch
    model.save_pretrained(tmp_path / "m")
    assert hgm_mm.load_model(tmp_path / "m").scene_reader is reader  # the saved config chooses it again
    model.use_room_scene_head()
    assert model.scene_reader.source == model.config.scene_source == "room" and model.photo_scene_head is None


@pytest.mark.parametrize("source", ["room", "photo"])
def test_the_reader_scores_cached_layer_outputs_as_it_scores_pixels(toy, source):
    """Training reads the locked layers' cached outputs; they must give inference's logits."""
    train_images, _ = toy
    model = tiny_model()
    if source == "photo":
        model.use_photo_scene_head(branch_stages=2)
        with torch.no_grad():
            model.photo_scene_head.weight.normal_(0, 3.0)
    else:
        with torch.no_grad():
            model.scene_head.weight.normal_(0, 3.0)
    reader = model.scene_reader
    photos_in = [Image.open(item.image).convert("RGB") for item in train_images[:3]]
    pixels = torch.stack([reader.transform(model)(photo) for photo in photos_in])
    views = pixels.unsqueeze(1) if source == "photo" else pixels  # (B, V, 3, S, S)
    stage = len(model.image_tower.feature_stages()) - 2 if source == "photo" else None
    with torch.no_grad():
        flat = views.flatten(0, 1)
        cached = flat if stage is None else model.image_tower.prefix_features(flat, stage)
        if stage is None:
            cached = model.image_tower(flat)
        cached = cached.view(*views.shape[:2], *cached.shape[1:])  # (B, V, ...)
        versions = cached.unsqueeze(1)  # (B, A=1, V, ...)
        if source == "photo":  # the mirror image is the second version inference averages
            mirrored = model.image_tower.prefix_features(flat.flip(-1), stage)
            versions = torch.stack([cached, mirrored.view_as(cached)], dim=1)
        expected = reader.logits(model, pixels)
        got = reader.logits_from_cached_versions(model, versions, stage)
    assert torch.allclose(got.log_softmax(-1), expected.log_softmax(-1), atol=1e-5)
    assert not torch.allclose(expected.softmax(-1), torch.full_like(expected, 0.5), atol=1e-3)  # a real reading


def test_a_failed_photo_training_leaves_the_model_as_it_was(toy, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    model = tiny_model()
    with pytest.raises(ValueError, match="none of the 1 photos could be read"):
        train_scenes(model, [SceneImage(image=broken, scene="kitchen")], epochs=1, num_workers=0, progress=False, **HEAD_ONLY)
    assert model.config.scene_source == "room" and model.photo_scene_head is None
    assert "photo_scene_head.weight" not in model.state_dict()


def test_photo_head_inputs_and_config_values_are_checked(toy):
    train_images, _ = toy
    model = tiny_model()
    train_scenes(model, train_images, epochs=1, batch_size=8, num_workers=0, progress=False, **HEAD_ONLY)
    side = model.config.image_tower.image_size
    with pytest.raises(ValueError, match=rf"shape \(2, 5, 3, {side}, {side}\); the photo scene head reads whole"):
        model.scene_logits(torch.zeros(2, 5, 3, side, side))
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        model.scene_logits(torch.zeros(2, 3, side, side), ["a kitchen"])
    for key, value, message in (("scene_source", "tiles", r"scene_source='tiles' is not valid"),
                                ("scene_image_size", 4, r"scene_image_size=4; expected None or an int >= 8"),
                                ("scene_flip_average", "yes", r"scene_flip_average='yes'; expected true or false")):
        with pytest.raises(ValueError, match=message):
            hgm_mm.ModelConfig(**{key: value})
    with pytest.raises(ValueError, match="scene_image_size=2"):
        model.use_photo_scene_head(image_size=2)
    assert model.config.scene_image_size is None  # a refused value changes nothing


def test_projection_and_top_tower_group_train_when_asked(toy):
    train_images, val_images = toy
    model = tiny_model()
    start = copy.deepcopy(model.state_dict())
    result = train_scenes(model, train_images, val_images=val_images, scene_source="room", epochs=2, batch_size=8,
                          projection_lr=1e-2, unlocked_image_groups=1, mirror=True, train_views="all", num_workers=0,
                          progress=False)
    changed = {name for name, value in model.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, start[name])}
    assert "image_proj.weight" in changed and "scene_head.weight" in changed
    tower_changed = {name.removeprefix("image_tower.trunk.").rsplit(".", 1)[0]
                     for name in changed if name.startswith("image_tower.")}
    assert tower_changed and tower_changed <= _top_group_modules(model)
    # the cached-feature validation is still what evaluate_scenes measures with the changed tower
    assert result.val_accuracy == pytest.approx(evaluate_scenes(model, val_images, progress=False,
                                                                num_workers=0).accuracy)


def _top_group_modules(model) -> set[str]:
    """Names of the trunk modules in the image tower's top layer group."""
    from timm.models import group_parameters

    trunk = model.image_tower.trunk
    groups = group_parameters(trunk, trunk.group_matcher(coarse=True))
    return {name.rsplit(".", 1)[0] for name in groups[max(groups)]}


@pytest.mark.parametrize("scene_source, options", [("photo", {}), ("room", {}),
                                                    ("photo", {"branch_stages": 1, "random_crops": 2})])
def test_same_seed_same_weights_other_seed_other_weights(toy, scene_source, options):
    train_images, _ = toy
    heads = []
    for seed, global_seed in ((0, 7), (0, 123), (1, 7)):  # torch's global RNG does not matter, the seed does
        model = tiny_model()
        torch.manual_seed(global_seed)
        train_scenes(model, train_images, scene_source=scene_source, epochs=2, batch_size=4, seed=seed, mirror=True,
                     num_workers=2 if options and global_seed == 123 else 0, progress=False,
                     **{**HEAD_ONLY, **options})
        head = model.photo_scene_head if scene_source == "photo" else model.scene_head
        heads.append(head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


def test_unreadable_photos_are_skipped_and_counted_or_raise(toy, tmp_path):
    train_images, val_images = toy
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    model = tiny_model()
    result = train_scenes(model, train_images + [SceneImage(image=broken, scene="kitchen")],
                          val_images=val_images + [SceneImage(image=text, scene="bedroom")], epochs=1,
                          batch_size=8, num_workers=0, progress=False, **HEAD_ONLY)
    assert result.n_train == len(train_images) and result.n_val == len(val_images)
    assert sorted(source for source, _ in result.skipped) == sorted([str(broken), str(text)])
    with pytest.raises(ImageError, match="broken.png"):
        train_scenes(tiny_model(), [SceneImage(image=broken, scene="kitchen")] + train_images, epochs=1,
                     image_errors="raise", num_workers=0, progress=False, **HEAD_ONLY)
    with pytest.raises(ValueError, match="none of the 1 photos could be read"):
        train_scenes(tiny_model(), [SceneImage(image=broken, scene="kitchen")], epochs=1, num_workers=0,
                     progress=False, **HEAD_ONLY)


def test_reads_an_images_jsonl_path_and_refuses_bad_rows(toy, tmp_path):
    train_images, _ = toy
    good = tmp_path / "images.jsonl"
    good.write_text("".join(json.dumps({"image": str(item.image.relative_to(tmp_path)), "scene": item.scene}) + "\n"
                            for item in train_images), encoding="utf-8")
    result = train_scenes(tiny_model(), good, epochs=1, batch_size=8, num_workers=0, progress=False, **HEAD_ONLY)
    assert result.n_train == len(train_images)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "train/bedroom_0.png", "label": "bedroom"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl line 1"):
        train_scenes(tiny_model(), bad, epochs=1, num_workers=0, progress=False, **HEAD_ONLY)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, r"epochs=0; expected an int >= 1"),
    ({"batch_size": 2.5}, r"batch_size=2.5"),
    ({"lr": 0.0}, r"lr=0.0; expected a finite number > 0"),
    ({"lr": float("nan")}, r"lr=nan"),
    ({"projection_lr": -1.0}, r"projection_lr=-1.0"),
    ({"label_smoothing": 1.0}, r"label_smoothing=1.0; expected a value in \[0, 1\)"),
    ({"unlocked_image_groups": -1}, r"unlocked_image_groups=-1"),
    ({"unlocked_image_groups": 99, "scene_source": "room"}, r"unlocks the whole image tower"),
    ({"unlocked_image_groups": 1}, r"unlocked_image_groups=1 trains layers the photo scene head does not own"),
    ({"projection_lr": 1e-3}, r"projection_lr=0.001 trains layers the photo scene head does not own"),
    ({"scene_source": "tiles"}, r"scene_source='tiles'; expected one of \['photo', 'room'\]"),
    ({"scene_image_size": 7}, r"scene_image_size=7; expected None or an int >= 8"),
    ({"flip_average": None}, r"flip_average=None; expected True or False"),
    ({"mirror": "yes"}, r"mirror='yes'; expected True or False"),
    ({"image_errors": "ignore"}, r"image_errors='ignore'; expected one of \['skip', 'raise'\]"),
    ({"train_views": "tiles"}, r"train_views='tiles'; expected one of \['all', 'whole'\]"),
    ({"branch_stages": -1}, r"branch_stages=-1; expected an int >= 0"),
    ({"branch_stages": 9}, r"scene_branch_stages=9: the image tower has 9 stages"),
    ({"branch_stages": 1, "scene_source": "room"}, r"branch_stages=1 is for the photo scene head"),
    ({"random_crops": 2, "scene_source": "room"}, r"random_crops=2 is for the photo scene head"),
    ({"random_crops": 1.5}, r"random_crops=1.5; expected an int >= 0"),
    ({"crop_scale": 0.0}, r"crop_scale=0.0; expected a fraction"),
])
def test_invalid_arguments_are_refused_with_the_value_and_the_fix(toy, kwargs, message):
    train_images, _ = toy
    with pytest.raises(ValueError, match=message):
        train_scenes(tiny_model(), train_images, num_workers=0, progress=False, **kwargs)


def test_invalid_photo_lists_are_refused(toy):
    train_images, _ = toy
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\['laundry'\] are not among the model's scene labels"):
        train_scenes(model, train_images + [SceneImage(image=train_images[0].image, scene="laundry")],
                     num_workers=0, progress=False, **HEAD_ONLY)
    with pytest.raises(ValueError, match=r"val_images: scene label\(s\) \['garage'\]"):
        train_scenes(model, train_images, val_images=[SceneImage(image=train_images[0].image, scene="garage")],
                     num_workers=0, progress=False, **HEAD_ONLY)
    with pytest.raises(ValueError, match="train_images is empty"):
        train_scenes(model, [], num_workers=0, progress=False, **HEAD_ONLY)
    with pytest.raises(TypeError, match=r"train_images\[0\] is dict; expected hgm_mm.data.SceneImage"):
        train_scenes(model, [{"image": "a.png", "scene": "bedroom"}], num_workers=0, progress=False, **HEAD_ONLY)
    with pytest.raises(TypeError, match="train_images is int"):
        train_scenes(model, 3, num_workers=0, progress=False, **HEAD_ONLY)


def test_a_scene_branch_tunes_its_own_copy_of_the_top_stages_and_survives_save_and_load(toy, tmp_path):
    train_images, val_images = toy
    model = tiny_model()
    model.text_tower.requires_grad_(False)
    start, vectors = copy.deepcopy(model.state_dict()), retrieval_outputs(model)
    result = train_scenes(model, train_images, val_images=val_images, branch_stages=2, random_crops=2, epochs=3,
                          tower_lr=1e-2, batch_size=8, num_workers=0, progress=False)
    assert model.config.scene_branch_stages == 2 and len(model.photo_scene_branch) == 2
    trained = set(result.trained_parameters)
    assert {"photo_scene_head.weight", "photo_scene_head.bias"} < trained
    assert {name.split(".")[0] for name in trained} == {"photo_scene_head", "photo_scene_branch"}
    # the branch started as the tower's top stages; its convolutions moved, its norms did not
    tower_stages = model.image_tower.feature_stages()[-2:]
    branch_start = {f"{i}.{k}": v for i, stage in enumerate(tower_stages) for k, v in stage.state_dict().items()}
    branch_now = {k.removeprefix("photo_scene_branch."): v for k, v in model.state_dict().items()
                  if k.startswith("photo_scene_branch.")}
    assert branch_now.keys() == branch_start.keys()
    norms = {f"{name}.{key}" for name, module in model.photo_scene_branch.named_modules()
             if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for key in module.state_dict()}
    assert norms and any(not torch.equal(branch_now[k], branch_start[k]) for k in branch_now if k not in norms)
    assert all(torch.equal(branch_now[k], branch_start[k]) for k in norms)
    # everything retrieval reads is as it was
    assert all(torch.equal(start[name], value) for name, value in model.state_dict().items() if name in start)
    for key, value in retrieval_outputs(model).items():
        assert torch.equal(value, vectors[key]), key
    assert result.val_accuracy == pytest.approx(evaluate_scenes(model, val_images, progress=False,
                                                                num_workers=0).accuracy)
    model.save_pretrained(tmp_path / "branch")
    loaded = hgm_mm.load_model(tmp_path / "branch")
    paths = [item.image for item in val_images]
    with torch.no_grad():
        assert torch.equal(loaded.scene_logits(paths), model.scene_logits(paths))
    with pytest.raises(ValueError, match="scene_branch_stages=1 belongs to the photo scene head"):
        hgm_mm.ModelConfig(scene_branch_stages=1)


def test_a_scene_config_and_settings_by_name_train_the_same_head(toy):
    from hgm_mm.training import SceneTrainConfig

    train_images, _ = toy
    by_config, by_name = tiny_model(), tiny_model()
    config = SceneTrainConfig(epochs=2, batch_size=8, **HEAD_ONLY)
    assert SceneTrainConfig.from_dict(config.to_dict()) == config  # JSON round trip
    train_scenes(by_config, train_images, config=config, num_workers=0, progress=False)
    train_scenes(by_name, train_images, epochs=2, batch_size=8, num_workers=0, progress=False, **HEAD_ONLY)
    assert torch.equal(by_config.photo_scene_head.weight, by_name.photo_scene_head.weight)
    assert SceneTrainConfig(scene_source="room").resolved().branch_stages == 0  # left to the scene source
    assert SceneTrainConfig().resolved().branch_stages == 4  # the measured recipe's photo head
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\]"):
        train_scenes(tiny_model(), train_images, epoch=2, num_workers=0, progress=False)
