"""The training engine: a run, its outputs, resume after a kill, bad input, several processes."""
import json
import logging
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hgm_mm
from hgm_mm.data.split import split_rooms
from hgm_mm.training import NonFiniteLossError, TrainConfig, train
from hgm_mm.training import checkpoint
from hgm_mm.training import loop as training_loop

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, *, n_products=18, n_rooms=8, seed=0) -> Path:
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True)
    products = []
    for i in range(n_products):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"p{i}.jpg")
        products.append({"product_id": f"p{i}", "image": f"img/p{i}.jpg", "title": f"item {i}",
                         "category": ["sofa", "lamp", "rug"][i % 3]})
    rooms, pairs = [], []
    for r in range(n_rooms):
        Image.new("RGB", (80, 56), (r * 25, 90, 200 - r * 20)).save(root / "img" / f"r{r}.jpg")
        rooms.append({"room_id": f"r{r}", "image": f"img/r{r}.jpg", "scene": ["bedroom", "kitchen"][r % 2],
                      "title": f"a room called {r}"})
        pairs += [f"r{r},p{p}" for p in rng.sample(range(n_products), 3)]
    (root / "products.jsonl").write_text("\n".join(json.dumps(p) for p in products))
    (root / "rooms.jsonl").write_text("\n".join(json.dumps(r) for r in rooms))
    (root / "pairs.csv").write_text("room_id,product_id\n" + "\n".join(pairs) + "\n")
    return root


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def tiny_config(**overrides):
    """A tiny retrieval run; the guide's scene heads after it are tested on their own (they cost a minute)."""
    settings = dict(model="hgm-tiny", epochs=2, batch_size=6, rooms_per_batch=3, num_workers=0,
                    checkpoint_every_steps=1, unlocked_image_groups=1, unlocked_text_layers=1,
                    room_text_probability=0.5,  # rooms read their captions: the scene-text path is trained too
                    eval_every_epochs=1, scene_heads=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def run(config, data, output, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(config, data=data, output=output, progress=False, **kwargs)


def checkpoint_weights(output):
    return load_file(str(Path(output) / "checkpoint" / "model.safetensors"))


def test_a_run_writes_the_best_model_and_what_it_was_trained_on(dataset, tmp_path):
    from accelerate.utils import set_seed

    set_seed(0)  # as the run does before creating its model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = hgm_mm.create_model("hgm-tiny").state_dict()
    result = run(tiny_config(), dataset, tmp_path / "run")
    assert result.steps == 6  # 18 products / 6 per step = 3 steps per epoch, 2 epochs
    assert [h["step"] for h in result.history] == [3, 6]
    assert result.best_metrics["recall@10"] == max(h["recall@10"] for h in result.history)
    model = hgm_mm.load_model(result.model_dir)
    assert {"metrics.json", "train_config.json", "train_pairs.csv", "val_rooms.txt"} <= \
        {p.name for p in result.model_dir.iterdir()}
    val_rooms = set((result.model_dir / "val_rooms.txt").read_text().split())
    train_pairs = (result.model_dir / "train_pairs.csv").read_text().splitlines()[1:]
    assert val_rooms and not val_rooms & {line.split(",")[0] for line in train_pairs}  # split by room
    scenes = json.loads((result.model_dir / "train_room_scenes.json").read_text())["scenes"]
    assert {line.split(",")[0] for line in train_pairs} <= set(scenes) and not val_rooms & set(scenes)
    after = checkpoint_weights(tmp_path / "run")
    assert not torch.equal(before["image_proj.weight"], after["image_proj.weight"])  # trained
    assert torch.equal(before["text_tower.encoder.embeddings.word_embeddings.weight"],
                       after["text_tower.encoder.embeddings.word_embeddings.weight"])  # embeddings frozen
    assert model.config.name == "hgm-tiny"


def test_killed_mid_epoch_and_resumed_reaches_the_same_weights(dataset, tmp_path):
    unbroken = run(tiny_config(), dataset, tmp_path / "unbroken")
    first = run(tiny_config(max_steps=4), dataset, tmp_path / "resumed")  # stops in the middle of epoch 2
    assert first.steps == 4
    resumed = run(tiny_config(), dataset, tmp_path / "resumed")
    assert resumed.steps == unbroken.steps == 6
    expected, got = checkpoint_weights(tmp_path / "unbroken"), checkpoint_weights(tmp_path / "resumed")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_killed_and_resumed_with_a_weight_average_reaches_the_same_weights_and_average(dataset, tmp_path):
    unbroken = run(tiny_config(ema_decay=0.5), dataset, tmp_path / "unbroken")
    assert run(tiny_config(ema_decay=0.5, max_steps=4), dataset, tmp_path / "resumed").steps == 4
    resumed = run(tiny_config(ema_decay=0.5), dataset, tmp_path / "resumed")
    assert resumed.steps == unbroken.steps == 6
    for file in ("model.safetensors", checkpoint.EMA_FILE):
        expected = load_file(str(tmp_path / "unbroken" / "checkpoint" / file))
        got = load_file(str(tmp_path / "resumed" / "checkpoint" / file))
        assert expected.keys() == got.keys() and "image_proj.weight" in expected
        for name in expected:
            assert torch.equal(expected[name], got[name]), (file, name)
    # the last validation (of the average) matches too; the first run also validated at its max_steps
    assert {k: v for k, v in resumed.history[-1].items() if k != "seconds"} == \
        {k: v for k, v in unbroken.history[-1].items() if k != "seconds"}


def test_the_weight_average_is_validated_and_saved_while_training_continues_on_the_raw_weights(
        dataset, tmp_path, monkeypatch):
    seen = []

    def fake_evaluate(model, state, *args, **kwargs):  # every evaluation is a new best: the last one is saved
        seen.append(model.image_proj.weight.detach().clone())
        state.best_metrics, state.best_step = {"recall@10": float(state.step)}, state.step
        model.save_pretrained(args[5] / training_loop.BEST_MODEL_DIR)
        return False

    monkeypatch.setattr(training_loop, "_evaluate_and_keep_best", fake_evaluate)
    run(tiny_config(ema_decay=0.9), dataset, tmp_path / "run")
    raw = checkpoint_weights(tmp_path / "run")["image_proj.weight"]
    average = load_file(str(tmp_path / "run" / "checkpoint" / checkpoint.EMA_FILE))["image_proj.weight"]
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))["image_proj.weight"]
    assert torch.equal(seen[-1], average) and torch.equal(saved, average)
    assert not torch.allclose(raw, average)  # the average lags the raw weights, which training kept


def test_weight_average_follows_the_decay_schedule_and_applied_restores_the_weights():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)  # locked: not averaged
    average = checkpoint.WeightAverage(model, 0.5)
    assert "0.bias" not in average.shadow and {"0.weight", "1.running_mean"} <= set(average.shadow)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model, 0)  # decay min(0.5, 1/10) = 0.1
    assert torch.allclose(average.shadow["0.weight"], start + 0.9)
    average.update(model, 20)  # decay 0.5
    assert torch.allclose(average.shadow["0.weight"], start + 0.95)
    with average.applied(model):
        assert torch.allclose(model[0].weight, start + 0.95)
    assert torch.equal(model[0].weight, start + 1.0)
    with pytest.raises(ValueError, match="ema_decay=1.0"):
        TrainConfig(ema_decay=1.0)


def test_a_fixed_temperature_sets_and_locks_the_logit_scale(dataset, tmp_path):
    import math

    learned = run(tiny_config(max_steps=2, lr=0.05), dataset, tmp_path / "learned")
    fixed = run(tiny_config(max_steps=2, lr=0.05, temperature=0.05), dataset, tmp_path / "fixed")
    assert learned.steps == fixed.steps == 2
    assert checkpoint_weights(tmp_path / "learned")["logit_scale"].item() != pytest.approx(2.6592, abs=1e-4)
    assert checkpoint_weights(tmp_path / "fixed")["logit_scale"].item() == pytest.approx(math.log(20.0), abs=1e-6)
    for bad in (0.005, 1.5, -0.1):
        with pytest.raises(ValueError, match="temperature"):
            TrainConfig(temperature=bad)


def test_the_room_loss_can_have_its_own_fixed_temperature():
    from hgm_mm.training.objective import RetrievalObjective, StepOutputs

    scales = {}

    def recorder(name):
        def loss(*args, **kwargs):
            scales[name] = float(args[2])
            return torch.tensor(1.0)
        return loss

    targets = {"product_ids": None, "room_positive_ids": None, "room_labels": None}
    outputs = StepOutputs(None, None, None, None, None, log_logit_scale=torch.tensor(20.0).log())
    for room_temperature, expected in ((0.0, 20.0), (0.1, 10.0)):
        config = TrainConfig(room_temperature=room_temperature, scene_loss_weight=0.0)
        objective = RetrievalObjective(product_weight=config.product_loss_weight, room_weight=config.room_loss_weight,
                                       scene_weight=0.0, room_temperature=room_temperature,
                                       contrastive=recorder("product"), room_contrastive=recorder("room"))
        terms = objective(outputs, targets)
        assert scales == {"product": pytest.approx(20.0), "room": pytest.approx(expected)}
        assert set(terms) == {"product_loss", "room_loss", "loss"}  # a term of weight 0 is not computed
        assert float(terms["loss"]) == pytest.approx(config.product_loss_weight + config.room_loss_weight)
    with pytest.raises(ValueError, match="room_temperature"):
        TrainConfig(room_temperature=0.001)


def test_grad_cache_steps_train_the_same_weights_as_whole_batch_steps(dataset, tmp_path):
    # no dropout and no BatchNorm batch statistics, so chunked embedding computes what one pass computes
    settings = dict(max_steps=2, unlocked_image_groups=0, unlocked_text_layers=0, cache_frozen_features=False)
    run(tiny_config(**settings), dataset, tmp_path / "whole")
    run(tiny_config(grad_cache_chunk=2, **settings), dataset, tmp_path / "chunked")
    whole, chunked = checkpoint_weights(tmp_path / "whole"), checkpoint_weights(tmp_path / "chunked")
    for name in whole:
        assert torch.allclose(whole[name], chunked[name], atol=1e-5), name
    run(tiny_config(**{**settings, "max_steps": 1}), dataset, tmp_path / "one_step")
    one_step = checkpoint_weights(tmp_path / "one_step")
    assert any(not torch.allclose(one_step[name], whole[name], atol=1e-4) for name in whole)  # the second step trained


def test_resume_refuses_other_settings(dataset, tmp_path):
    run(tiny_config(max_steps=1), dataset, tmp_path / "run")
    with pytest.raises(ValueError, match=r"other settings \(\['lr'\]\)"):
        run(tiny_config(lr=0.5), dataset, tmp_path / "run")


class _RunsCode:
    """What a hostile pickle carries: unpickling it would call a function of the file's choosing."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_tampered_optimizer_checkpoint_is_refused_without_suggesting_unsafe_loading(dataset, tmp_path, capsys):
    run(tiny_config(max_steps=1), dataset, tmp_path / "run")
    torch.save({"state": _RunsCode()}, tmp_path / "run" / "checkpoint" / "optimizer.pt")
    with pytest.raises(ValueError) as refused:
        run(tiny_config(max_steps=2), dataset, tmp_path / "run")
    message = str(refused.value)
    assert "checkpoint/optimizer.pt: refused" in message and "Delete the checkpoint folder" in message
    assert "weights_only" not in message and "this ran" not in capsys.readouterr().out
    (tmp_path / "run" / "checkpoint" / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"optimizer\.pt: refused: not a weights-only torch file"):
        run(tiny_config(max_steps=2), dataset, tmp_path / "run")


def test_a_killed_checkpoint_write_leaves_the_last_checkpoint_whole(dataset, tmp_path, monkeypatch):
    run(tiny_config(max_steps=2), dataset, tmp_path / "run")
    good = checkpoint_weights(tmp_path / "run")

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # the process is killed while writing the optimizer state

    monkeypatch.setattr(training_loop.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(max_steps=3), dataset, tmp_path / "run")
    monkeypatch.undo()
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    for name, tensor in checkpoint_weights(tmp_path / "run").items():
        assert torch.equal(tensor, good[name])
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def _nan_on_step(monkeypatch, bad_step):
    from hgm_mm.training.objective import RetrievalObjective

    original = RetrievalObjective.__call__
    calls = []

    def poisoned(*args, **kwargs):
        terms = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == bad_step + 1:  # one call per step, from step 0
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(RetrievalObjective, "__call__", poisoned)


def test_a_nan_loss_stops_the_run_naming_the_step_and_batch(dataset, tmp_path, monkeypatch):
    _nan_on_step(monkeypatch, bad_step=1)
    with pytest.raises(NonFiniteLossError, match=r"step 1: non-finite loss .* on rooms \['r"):
        run(tiny_config(), dataset, tmp_path / "run")
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1  # the bad step saved nothing
    assert all(torch.isfinite(t).all() for t in checkpoint_weights(tmp_path / "run").values())


def test_a_nan_loss_can_skip_the_batch(dataset, tmp_path, monkeypatch):
    _nan_on_step(monkeypatch, bad_step=1)
    result = run(tiny_config(skip_nonfinite=True), dataset, tmp_path / "run")
    assert result.skipped_batches == 1 and result.steps == 6
    assert all(torch.isfinite(t).all() for t in checkpoint_weights(tmp_path / "run").values())


def test_unreadable_photos_are_skipped_and_counted(dataset, tmp_path):
    (dataset / "img" / "p3.jpg").write_bytes(b"\xff\xd8\xff broken")
    result = run(tiny_config(max_steps=3), dataset, tmp_path / "run")
    assert result.skipped_images >= 1 and result.steps == 3
    with pytest.raises(hgm_mm.data.ImageError, match="p3.jpg"):
        run(tiny_config(image_errors="raise"), dataset, tmp_path / "strict")


def test_grad_cache_chunks_train_like_one_batch(dataset, tmp_path):
    # locked towers run without dropout, so the chunked and the whole-batch passes draw nothing at random
    settings = dict(unlocked_image_groups=0, unlocked_text_layers=0, max_steps=2)
    run(tiny_config(**settings), dataset, tmp_path / "plain")
    run(tiny_config(grad_cache_chunk=2, **settings), dataset, tmp_path / "cached")
    plain, cached = checkpoint_weights(tmp_path / "plain"), checkpoint_weights(tmp_path / "cached")
    for name in plain:
        assert torch.allclose(plain[name], cached[name], atol=1e-5), name


@pytest.mark.parametrize("unlocked_text_layers", [0, 1])  # text towers cached too, or tokenised each step
def test_cached_locked_layers_train_like_pixels(dataset, tmp_path, unlocked_text_layers):
    settings = dict(unlocked_image_groups=1, unlocked_text_layers=unlocked_text_layers, max_steps=4)
    from_pixels = run(tiny_config(cache_frozen_features=False, **settings), dataset, tmp_path / "pixels")
    from_cache = run(tiny_config(**settings), dataset, tmp_path / "cache")
    pixels, cache = checkpoint_weights(tmp_path / "pixels"), checkpoint_weights(tmp_path / "cache")
    for name in pixels:
        assert torch.allclose(pixels[name], cache[name], atol=1e-5), name
    assert [h["step"] for h in from_cache.history] == [h["step"] for h in from_pixels.history]
    for got, expected in zip(from_cache.history, from_pixels.history):
        assert got["recall@10"] == pytest.approx(expected["recall@10"], abs=1e-6)


def test_feature_map_room_views_train_from_the_cache_like_from_pixels(dataset, tmp_path):
    settings = dict(unlocked_image_groups=1, unlocked_text_layers=0, max_steps=3, room_views="feature_map",
                    room_map_size=96)
    from_pixels = run(tiny_config(cache_frozen_features=False, **settings), dataset, tmp_path / "pixels")
    from_cache = run(tiny_config(**settings), dataset, tmp_path / "cache")
    pixels, cache = checkpoint_weights(tmp_path / "pixels"), checkpoint_weights(tmp_path / "cache")
    for name in pixels:
        assert torch.allclose(pixels[name], cache[name], atol=1e-5), name
    for got, expected in zip(from_cache.history, from_pixels.history):
        assert got["recall@10"] == pytest.approx(expected["recall@10"], abs=1e-6)
    saved = hgm_mm.load_model(from_cache.model_dir).config
    assert (saved.room_views, saved.room_map_size) == ("feature_map", 96)


def test_a_short_run_caches_only_the_rooms_its_steps_draw(dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hgm_mm")
    data = hgm_mm.data.load_dataset(dataset)
    config = tiny_config(max_steps=1, rooms_per_batch=2, unlocked_text_layers=0)
    train_rooms, val_rooms = split_rooms(data.rooms, val_fraction=config.val_fraction, seed=config.seed)
    assert len(train_rooms) > 2  # the step reads 2 of them
    short = run(config, dataset, tmp_path / "short")
    said = caplog.text
    assert f"for {len(data.products)} product photos and {2 + len(val_rooms)} rooms" in said
    # the cache rows of the drawn rooms stand where the whole run's would: the same step, the same weights
    run(tiny_config(max_steps=1, rooms_per_batch=2, unlocked_text_layers=0, cache_frozen_features=False),
        dataset, tmp_path / "pixels")
    cached, pixels = checkpoint_weights(tmp_path / "short"), checkpoint_weights(tmp_path / "pixels")
    for name in pixels:
        assert torch.allclose(pixels[name], cached[name], atol=1e-5), name
    assert short.history[-1]["step"] == 1


def test_validation_on_cached_features_is_what_evaluate_measures(dataset, tmp_path):
    result = run(tiny_config(max_steps=3, unlocked_text_layers=0), dataset, tmp_path / "run")
    data = hgm_mm.data.load_dataset(dataset)
    val_ids = (result.model_dir / "val_rooms.txt").read_text().split()
    val_rooms = [r for r in data.rooms if r.room_id in val_ids]
    measured = hgm_mm.evaluate(hgm_mm.load_model(result.model_dir), data.products, val_rooms, data.pairs,
                               progress=False, num_workers=0).metrics
    saved = json.loads((result.model_dir / "metrics.json").read_text())["validation"]["metrics"]
    assert set(saved) == set(measured)
    for name, value in measured.items():
        assert saved[name] == pytest.approx(value, abs=1e-6), name
    counts = json.loads((result.model_dir / "scene_categories.json").read_text())["counts"]
    train_pairs = [line.split(",") for line in (result.model_dir / "train_pairs.csv").read_text().splitlines()[1:]]
    assert sum(sum(c.values()) for c in counts.values()) == len(train_pairs)


def test_lora_trains_adapters_only_and_saves_them_merged(dataset, tmp_path):
    pytest.importorskip("peft")
    from accelerate.utils import set_seed

    set_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = hgm_mm.create_model("hgm-tiny").state_dict()
    result = run(tiny_config(lora_rank=2, unlocked_text_layers=0, max_steps=3), dataset, tmp_path / "run")
    trained = checkpoint_weights(tmp_path / "run")
    adapters = [k for k in trained if "lora_B" in k]
    assert adapters and all(k.startswith(("text_tower.", "scene_text_tower.")) for k in adapters)
    assert any(trained[k].abs().sum() > 0 for k in adapters)  # adapters start at zero and moved
    query = "text_tower.encoder.encoder.layer.0.attention.self.query"
    assert torch.equal(trained[f"{query}.base_layer.weight"], before[f"{query}.weight"])  # locked under the adapter
    saved = hgm_mm.load_model(result.model_dir)  # an ordinary model: adapters merged into the weights
    assert not any("lora" in k for k in saved.state_dict())
    assert not torch.equal(saved.state_dict()[f"{query}.weight"], before[f"{query}.weight"])


def test_unlocked_image_groups_count_from_the_head_convolution():
    from hgm_mm.training.freezing import lock_image_tower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tower = hgm_mm.create_model("hgm-tiny").image_tower
    trainable = lambda: {n.split(".")[1] for n, p in tower.named_parameters() if p.requires_grad}  # noqa: E731
    lock_image_tower(tower, 1)
    assert trainable() == {"conv_head", "bn2"}
    last_block = f"blocks.{len(tower.trunk.blocks) - 1}"
    lock_image_tower(tower, 2)
    assert trainable() == {"conv_head", "bn2", "blocks"}
    assert all(n.startswith(f"trunk.{last_block}.") or "blocks" not in n
               for n, p in tower.named_parameters() if p.requires_grad)
    lock_image_tower(tower, 0)
    assert trainable() == set()


def test_train_ends_with_the_guides_scene_heads_trained_calibrated_and_saved(dataset, tmp_path):
    result = run(tiny_config(max_steps=2, scene_heads=True, scene_epochs=1, scene_image_size=32), dataset,
                 tmp_path / "run")
    report = json.loads((result.model_dir / "scene_heads.json").read_text())
    loaded = hgm_mm.load_model(result.model_dir)
    assert loaded.scene_reader.source == "photo" and loaded.config.scene_image_size == 32
    assert report["photo"]["n_train"] > 0 and report["photo"]["calibration"]["temperature"] > 0
    assert loaded.config.photo_scene_temperature == pytest.approx(report["photo"]["calibration"]["temperature"])
    assert "text" in report and loaded.scene_text_classifier is not None
    card = (result.model_dir / "README.md").read_text()  # saved again with the heads: the card says what they measured
    assert (f"- from the photo: accuracy {report['photo']['val_accuracy']:.4f} on {report['photo']['n_val']} "
            "validation photos") in card
    assert "| metric | value |" in card and "## Recipe" in card  # and still holds the retrieval run's record
    without = run(tiny_config(max_steps=2), dataset, tmp_path / "plain")
    assert hgm_mm.load_model(without.model_dir).scene_reader.source == "room"
    assert not (without.model_dir / "scene_heads.json").exists()
    assert "Scene heads" not in (without.model_dir / "README.md").read_text()


def test_config_refuses_unknown_settings_and_reads_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\]; valid settings are .*'lr'"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="precision='fp8'"):
        TrainConfig(precision="fp8")
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nlr: 0.002\n")
    config = TrainConfig.from_file(path, epochs=5)
    assert config.epochs == 5 and config.lr == 0.002


def test_config_numbers_in_exponent_notation_work_and_wrong_types_are_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\ntower_lr: 3E-4\nweight_decay: 5.0e-2\nepochs: 2\n")
    config = TrainConfig.from_file(path)
    assert (config.lr, config.tower_lr, config.weight_decay, config.epochs) == (1e-3, 3e-4, 5e-2, 2)
    assert isinstance(config.lr, float)
    for text, message in (("epochs: true", r"epochs=True \(bool\); expected an int"),
                          ("lr: fast", r"lr='fast' \(str\); expected a finite number"),
                          ("val_fraction: '0.2'", r"val_fraction='0.2' \(str\); expected a finite number"),
                          ("lr: .inf", r"lr=inf \(float\); expected a finite number"),
                          ("max_steps: 2.5", r"max_steps=2.5 \(float\); expected an int or null"),
                          ("scene_heads: 'no'", r"scene_heads='no' \(str\); expected true or false")):
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=rf"^{path}: TrainConfig\.{message}"):
            TrainConfig.from_file(path)


def test_cli_train_refuses_a_non_finite_lr_before_making_a_run_folder(dataset, tmp_path, capsys):
    from hgm_mm.apps.cli import main

    code = main(["train", "--data", str(dataset), "--model", "hgm-tiny", "--output", str(tmp_path / "run"),
                 "--lr", "inf"])
    assert code == 2 and "TrainConfig.lr=inf (float); expected a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_train_prints_the_validation_metrics(dataset, tmp_path):
    from hgm_mm.apps.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", "--data", str(dataset), "--model", "hgm-tiny", "--output", str(tmp_path / "run"),
                     "--max-steps", "2", "--batch-size", "6", "--no-scene-heads"])
    assert code == 0
    assert (tmp_path / "run" / "model" / "hgm_config.json").is_file()


@pytest.mark.slow
def test_two_processes_train_like_one(dataset, tmp_path):
    """accelerate launch with two real CPU processes: same global batch, same weights as one process."""
    settings = {"model": "hgm-tiny", "epochs": 1, "max_steps": 2, "batch_size": 6, "rooms_per_batch": 4,
                "num_workers": 0, "unlocked_image_groups": 0, "unlocked_text_layers": 0,  # no dropout, no BatchNorm batch statistics
                "scene_epochs": 1, "scene_image_size": 32}  # the scene heads after it run on the main process alone
    config = tmp_path / "config.json"
    config.write_text(json.dumps(settings))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "hgm_mm", "train", "--data", str(dataset), "--output", str(tmp_path / "two"),
               "--config", str(config)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    # the run's lines are logged (standard error) by the main process alone; the command's answer is printed
    assert "processes: 2" in result.stderr  # the run announced both processes
    assert result.stderr.count("photo scene head:") == 1  # trained and reported once
    assert result.stderr.count("run folder:") == 1
    assert result.stdout.count("best model:") == 1  # one process reports the run
    run(TrainConfig(**settings), dataset, tmp_path / "one")
    one, two = checkpoint_weights(tmp_path / "one"), checkpoint_weights(tmp_path / "two")
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name


def test_one_schedule_with_the_two_shapes_the_trainings_use():
    import math

    from hgm_mm.training.optim import warmup_cosine

    def factors(**kwargs):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = warmup_cosine(optimizer, 100, 10, **kwargs)
        values = []
        for _ in range(100):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return values

    retrieval, scenes = factors(), factors(decay_from="start")
    assert retrieval[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # the same ramp
    assert scenes == pytest.approx([min((s + 1) / 10, 0.5 * (1 + math.cos(math.pi * s / 100))) for s in range(100)])
    # after it, the retrieval run's cosine starts at the top; the scene heads' has run from step 0
    assert retrieval[10] == pytest.approx(1.0) and retrieval[55] == pytest.approx(0.5)
    assert scenes[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 100))) and scenes[50] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="decay_from"):
        factors(decay_from="end")
