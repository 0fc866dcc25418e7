"""Scene training on images.jsonl sets: it learns, it measures what evaluate_scenes measures, bad input is handled."""
import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import hgm_mm
from hgm_mm.data import DataError, ImageError, SceneImage
from hgm_mm.evaluation import evaluate_scenes
from hgm_mm.training.scenes import train_scenes

LABELS = ["bedroom", "kitchen"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random towers warn
        model = hgm_mm.create_model("hgm-tiny", scene_labels=LABELS)
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


@pytest.mark.parametrize("train_views", ["all", "whole"])
def test_training_learns_a_separable_set_and_reports_what_evaluate_scenes_measures(toy, train_views):
    train_images, val_images = toy
    model = tiny_model()
    before = evaluate_scenes(model, val_images, progress=False, num_workers=0)
    assert before.accuracy == pytest.approx(0.5)  # all "bedroom"
    result = train_scenes(model, train_images, val_images=val_images, epochs=15, lr=3e-2, batch_size=8,
                          train_views=train_views, num_workers=0, progress=False)
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


def test_default_training_changes_the_scene_head_only_and_restores_trainable_flags(toy):
    train_images, _ = toy
    model = tiny_model()
    model.text_tower.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    start = copy.deepcopy(model.state_dict())
    result = train_scenes(model, train_images, epochs=2, batch_size=8, num_workers=0, progress=False)
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, start[name])}
    assert changed == {"scene_head.weight", "scene_head.bias"}
    assert set(result.trained_parameters) == {"scene_head.weight", "scene_head.bias"}
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert result.val_accuracy is None and not model.training


def test_projection_and_top_tower_group_train_when_asked(toy):
    train_images, val_images = toy
    model = tiny_model()
    start = copy.deepcopy(model.state_dict())
    result = train_scenes(model, train_images, val_images=val_images, epochs=2, batch_size=8, projection_lr=1e-2,
                          unlocked_image_groups=1, mirror=True, train_views="all", num_workers=0, progress=False)
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


def test_same_seed_same_weights_other_seed_other_weights(toy):
    train_images, _ = toy
    heads = []
    for seed in (0, 0, 1):
        model = tiny_model()
        train_scenes(model, train_images, epochs=2, batch_size=4, seed=seed, mirror=True, num_workers=0,
                     progress=False)
        heads.append(model.scene_head.weight.detach().clone())
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
                          batch_size=8, num_workers=0, progress=False)
    assert result.n_train == len(train_images) and result.n_val == len(val_images)
    assert sorted(source for source, _ in result.skipped) == sorted([str(broken), str(text)])
    with pytest.raises(ImageError, match="broken.png"):
        train_scenes(tiny_model(), [SceneImage(image=broken, scene="kitchen")] + train_images, epochs=1,
                     image_errors="raise", num_workers=0, progress=False)
    with pytest.raises(ValueError, match="none of the 1 photos could be read"):
        train_scenes(tiny_model(), [SceneImage(image=broken, scene="kitchen")], epochs=1, num_workers=0,
                     progress=False)


def test_reads_an_images_jsonl_path_and_refuses_bad_rows(toy, tmp_path):
    train_images, _ = toy
    good = tmp_path / "images.jsonl"
    good.write_text("".join(json.dumps({"image": str(item.image.relative_to(tmp_path)), "scene": item.scene}) + "\n"
                            for item in train_images), encoding="utf-8")
    result = train_scenes(tiny_model(), good, epochs=1, batch_size=8, num_workers=0, progress=False)
    assert result.n_train == len(train_images)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "train/bedroom_0.png", "label": "bedroom"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl line 1"):
        train_scenes(tiny_model(), bad, epochs=1, num_workers=0, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, r"epochs=0; expected an int >= 1"),
    ({"batch_size": 2.5}, r"batch_size=2.5"),
    ({"lr": 0.0}, r"lr=0.0; expected a finite number > 0"),
    ({"lr": float("nan")}, r"lr=nan"),
    ({"projection_lr": -1.0}, r"projection_lr=-1.0"),
    ({"label_smoothing": 1.0}, r"label_smoothing=1.0; expected a value in \[0, 1\)"),
    ({"unlocked_image_groups": -1}, r"unlocked_image_groups=-1"),
    ({"unlocked_image_groups": 99}, r"unlocks the whole image tower"),
    ({"image_errors": "ignore"}, r"image_errors='ignore'; expected one of \['skip', 'raise'\]"),
    ({"train_views": "tiles"}, r"train_views='tiles'; expected one of \['all', 'whole'\]"),
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
                     num_workers=0, progress=False)
    with pytest.raises(ValueError, match=r"val_images: scene label\(s\) \['garage'\]"):
        train_scenes(model, train_images, val_images=[SceneImage(image=train_images[0].image, scene="garage")],
                     num_workers=0, progress=False)
    with pytest.raises(ValueError, match="train_images is empty"):
        train_scenes(model, [], num_workers=0, progress=False)
    with pytest.raises(TypeError, match=r"train_images\[0\] is dict; expected hgm_mm.data.SceneImage"):
        train_scenes(model, [{"image": "a.png", "scene": "bedroom"}], num_workers=0, progress=False)
    with pytest.raises(TypeError, match="train_images is int"):
        train_scenes(model, 3, num_workers=0, progress=False)
