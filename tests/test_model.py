"""The model: creation by every kind of name, encoders, fusion, save/load."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import hgm_mm
from conftest import tiny_model
from hgm_mm import ImageTowerConfig, RandomInitWarning, TextTowerConfig

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def photos(n=2, size=(80, 60)):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)]
    return [Image.new("RGB", size, colours[i % len(colours)]) for i in range(n)]


def all_outputs(model):
    """Every encoder on fixed inputs, for exact comparisons."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, model.config.image_tower.image_size, model.config.image_tower.image_size)
    with torch.no_grad():
        return {
            "image": model.encode_image(images),
            "text": model.encode_text(["a grey sofa", "沙发"]),
            "scene_text": model.encode_scene_text(["a Nordic living room"]),
            "room": model.encode_room(images, ["warm light", None]),
            "product": model.encode_product(images, ["KIVIK sofa", "lamp"]),
            "scene": model.scene_logits(images),
        }


# -- creation -------------------------------------------------------------------------------------
def test_builtin_tiny_model_warns_random_init_and_lists_in_builtins():
    assert {"hgm-tiny", "hgm-lite-en", "hgm-lite-multilingual"} <= set(hgm_mm.list_models())
    with pytest.warns(RandomInitWarning, match="image_tower, text_tower randomly initialised"):
        model = hgm_mm.create_model("hgm-tiny")
    assert isinstance(model, hgm_mm.HGMModel)
    assert not model.training


def test_unknown_name_lists_what_is_available():
    with pytest.raises(ValueError, match="hgm-lite-en.*open_clip"):
        hgm_mm.create_model("hgm-no-such-model")


def test_bare_path_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=f"local-dir:{tmp_path}"):
        hgm_mm.create_model(str(tmp_path))


def test_empty_schema_identifier_is_refused():
    with pytest.raises(ValueError, match="nothing after"):
        hgm_mm.create_model("local-dir:")


@pytest.fixture
def tiny_clip_name(tmp_path_factory):
    """Registers a 1-layer open_clip architecture, as open_clip's own tests do."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfgs")
    (folder / "hgmtest-tiny-clip.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder)
    return "hgmtest-tiny-clip"


def test_open_clip_architecture_random_init(tiny_clip_name):
    with pytest.warns(RandomInitWarning):
        model = hgm_mm.create_model(tiny_clip_name)
    assert model.config.embed_dim == 16
    assert model.config.image_tower.image_size == 32
    out = all_outputs(model)
    assert out["image"].shape == (2, 16) and out["text"].shape == (2, 16)


def test_open_clip_local_dir_loads_its_weights(tiny_clip_name, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    clip = open_clip.create_model(tiny_clip_name).eval()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    save_file(clip.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)  # weights come from the folder
        model = hgm_mm.create_model(f"local-dir:{tmp_path}")
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.get_tokenizer(tiny_clip_name)(["a sofa", "a lamp"])
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), clip.encode_image(images, normalize=True), atol=1e-6)
        assert torch.allclose(model.encode_text(["a sofa", "a lamp"]), clip.encode_text(tokens, normalize=True),
                              atol=1e-6)
    assert model.logit_scale.item() == pytest.approx(clip.logit_scale.item())


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_hostile_pickles_are_refused_naming_the_file_never_suggesting_unsafe_loading(tiny_clip_name, tmp_path,
                                                                                       capsys):
    from hgm_mm.models.pretrained import load_state_dict_file

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    torch.save({"weight": _RunsCode()}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError) as refused:
        hgm_mm.create_model(f"local-dir:{tmp_path}")
    assert str(refused.value).startswith(f"{tmp_path}: refused") and "weights_only" not in str(refused.value)
    with pytest.raises(ValueError) as refused:
        load_state_dict_file(tmp_path / "open_clip_pytorch_model.bin")
    assert "open_clip_pytorch_model.bin: refused" in str(refused.value) and "weights_only" not in str(refused.value)
    assert "this ran" not in capsys.readouterr().out


def test_open_clip_model_round_trips_offline(tiny_clip_name, tmp_path):
    with pytest.warns(RandomInitWarning):
        model = hgm_mm.create_model(tiny_clip_name)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "open_clip" / "open_clip_config.json").is_file()
    loaded = hgm_mm.load_model(tmp_path / "saved")
    for key, value in all_outputs(model).items():
        assert torch.equal(value, all_outputs(loaded)[key]), key


def test_separate_tower_choices(tmp_path):
    """Any timm image tower, and any transformers encoder (here a local folder) as the scene-text tower."""
    import transformers

    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=261, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))
    bert.save_pretrained(tmp_path / "bert")
    from hgm_mm.models.towers.hf_tower import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(str(tmp_path / "bert"))
    model = tiny_model(
        image_tower=ImageTowerConfig(name="test_resnet", image_size=48),
        scene_text_tower=TextTowerConfig(name=str(tmp_path / "bert"), pretrained="hub"),
        embed_dim=8, scene_labels=["bedroom", "kitchen"])
    assert model.image_tower.trunk.default_cfg["architecture"] == "test_resnet"
    assert model.tower_pretrained["scene_text_tower"] is True
    assert model.scene_text_tower.encoder.config.hidden_size == 24
    out = all_outputs(model)
    assert out["scene_text"].shape == (1, 8) and out["scene"].shape == (2, 2)
    with torch.no_grad():  # the scene tower holds the folder's weights
        direct = model.scene_text_tower(**{k: v for k, v in model.scene_tokenizer(["x"]).items()})
    assert direct.shape == (1, 24)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "scene_tokenizer").is_dir()
    loaded = hgm_mm.load_model(tmp_path / "saved")
    for key, value in out.items():
        assert torch.equal(value, all_outputs(loaded)[key]), key


def test_unknown_timm_tower_suggests_names():
    with pytest.raises(ValueError, match="unknown timm model 'efficientnet_b99'"):
        tiny_model(image_tower=ImageTowerConfig(name="efficientnet_b99"))


# -- encoders and fusion ----------------------------------------------------------------------------
def test_encoders_return_unit_vectors_of_embed_dim():
    model = tiny_model()
    out = all_outputs(model)
    for key in ("image", "text", "scene_text", "room", "product"):
        assert out[key].shape[1] == 32, key
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(len(out[key])), atol=1e-5), key
    assert out["scene"].shape == (2, len(model.scene_labels))


def test_encode_image_accepts_pil_paths_and_tensors(tmp_path):
    model = tiny_model()
    image = photos(1)[0]
    image.save(tmp_path / "room.png")
    with torch.no_grad():
        from_pil = model.encode_image(image)
        from_path = model.encode_image([tmp_path / "room.png"])
        from_tensor = model.encode_image(model.image_transform(image))
    assert torch.equal(from_pil, from_path) and torch.equal(from_pil, from_tensor)


def test_fusion_with_a_missing_modality_uses_the_present_one():
    model = tiny_model()
    images = photos(2)
    with torch.no_grad():
        image_only = model.encode_room(images)
        text_only = model.encode_room(texts=["nordic", "industrial loft"])
        both = model.encode_room(images, ["nordic", "industrial loft"])
        mixed = model.encode_room(images, ["nordic", None])
        image_embeds = torch.nn.functional.normalize(model.encode_room_views(images).mean(1), dim=-1)
        text_embeds = model.encode_scene_text(["nordic", "industrial loft"])
    assert torch.allclose(image_only, image_embeds, atol=1e-6)
    assert torch.allclose(text_only, text_embeds, atol=1e-6)
    assert not torch.allclose(both, image_embeds, atol=1e-3)
    assert torch.allclose(mixed[0], both[0], atol=1e-6)  # row 0 has both modalities
    assert torch.allclose(mixed[1], image_embeds[1], atol=1e-6)  # row 1 has only its photo


def test_fusion_refuses_nothing_and_mismatched_batches():
    model = tiny_model()
    with pytest.raises(ValueError, match="give images, texts or both"):
        model.encode_room()
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        model.encode_room(photos(2), ["only one"])


def test_forward_returns_one_dataclass_with_what_was_asked():
    model = tiny_model()
    pixels = torch.randn(3, 3, 64, 64)
    out = model(room_pixels=pixels, room_tokens=model.scene_tokenizer(["a", "b", "c"]),
                room_text_present=torch.tensor([True, False, True]))
    assert isinstance(out, hgm_mm.HGMOutput)
    assert out.room_embeds.shape == (3, 32) and out.scene_logits.shape == (3, len(model.scene_labels))
    assert out.product_embeds is None and out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)
    with torch.no_grad():
        expected_row1 = model.encode_room(pixels[1:2])  # a (B, 3, S, S) tensor is one view per room
    assert torch.allclose(out.room_embeds[1], expected_row1[0], atol=1e-5)
    products = model(product_pixels=pixels, product_tokens=model.tokenizer(["x", "y", "z"]))
    assert products.product_embeds.shape == (3, 32) and products.room_embeds is None


def test_room_views_are_the_whole_photo_and_its_tiles():
    from hgm_mm.models.preprocess import RoomViews

    photo = Image.new("RGB", (80, 60), (255, 0, 0))
    photo.paste((0, 0, 255), (40, 30, 80, 60))  # bottom-right quadrant blue
    views_of = RoomViews(ImageTowerConfig(image_size=16, mean=(0, 0, 0), std=(1, 1, 1)), (1, 2))
    views = views_of(photo)
    assert views.shape == (5, 3, 16, 16) and views_of.n_views == 5
    assert views[4, 2].min() > 0.99 and views[4, 0].max() < 0.01  # tile (1, 1) is all blue
    assert views[1, 0].min() > 0.99  # tile (0, 0) is all red
    assert 0.1 < views[0, 2].mean() < 0.4  # the whole photo: a quarter blue


def test_score_products_pools_views_and_matches_encode_room_ranking_with_one_view():
    model = tiny_model()
    products = torch.nn.functional.normalize(torch.randn(7, 32), dim=-1)
    with torch.no_grad():
        views = model.encode_room_views(photos(2))  # hgm-tiny: whole photo + 2 x 2 tiles
        assert views.shape == (2, 5, 32)
        scores = model.score_products(products, view_embeds=views)
        view_scores = torch.einsum("rvd,nd->rvn", views, products)
        assert torch.all(scores <= view_scores.amax(1) + 1e-6) and torch.all(scores >= view_scores.mean(1) - 1e-6)
        one_view = views[:, :1]
        texts = model.encode_scene_text(["nordic", "loft"])
        pooled = model.score_products(products, view_embeds=one_view, text_embeds=texts)
        fused = model.room_fusion(one_view[:, 0], texts) @ products.T
    assert torch.equal(pooled.argsort(dim=1), fused.argsort(dim=1))


def test_packed_rooms_score_like_score_products():
    model = tiny_model()
    products = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
    with torch.no_grad():
        views = model.encode_room_views(photos(3))
        texts = model.encode_scene_text(["nordic", "loft", "calm"])
        present = torch.tensor([True, False, True])
        packed = model.pack_rooms(views, texts, present)
        assert packed.shape == (3, 6, 32) and packed[1, -1].abs().sum() == 0
        expected = model.score_products(products, view_embeds=views, text_embeds=texts, text_present=present)
        assert torch.allclose(model.packed_room_scores(packed, products), expected, atol=1e-6)
        photo_only = model.packed_room_scores(model.pack_rooms(views), products)
        assert torch.allclose(photo_only, model.score_products(products, view_embeds=views), atol=1e-6)


def test_room_grids_are_validated():
    with pytest.raises(ValueError, match="room_grids"):
        hgm_mm.ModelConfig(room_grids=(1, 1))
    with pytest.raises(ValueError, match="view_pooling='median'"):
        hgm_mm.ModelConfig(view_pooling="median")


def test_predict_scene_gives_probabilities_per_label():
    model = tiny_model(scene_labels=["bedroom", "kitchen", "living_room"])
    (probs,) = model.predict_scene(texts=["a kitchen"])
    assert set(probs) == {"bedroom", "kitchen", "living_room"}
    assert sum(probs.values()) == pytest.approx(1.0)
    assert list(probs.values()) == sorted(probs.values(), reverse=True)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['embed_dimm'\].*valid keys"):
        hgm_mm.ModelConfig.from_dict({"embed_dimm": 3})
    with pytest.raises(ValueError, match="source='onnx'.*'timm', 'open_clip'"):
        ImageTowerConfig(source="onnx")
    with pytest.raises(ValueError, match="scene_labels"):
        hgm_mm.ModelConfig(scene_labels=("only",))


# -- save / load ------------------------------------------------------------------------------------
def test_round_trip_is_bit_exact_and_writes_the_expected_files(tmp_path):
    model = tiny_model(scene_labels=["bedroom", "kitchen", "outdoor"])
    with torch.no_grad():  # move every parameter off its initial value so nothing passes by accident
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["README.md", "hgm_config.json", "model.safetensors", "tokenizer/tokenizer.json",
                     "tokenizer/tokenizer_config.json"]  # README.md: the model card (hgm_mm/models/model_card.py)
    document = json.loads((tmp_path / "hgm_config.json").read_text())
    assert document["library_version"] == hgm_mm.__version__ and document["format_version"] == 1
    assert document["model"]["scene_labels"] == ["bedroom", "kitchen", "outdoor"]

    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)  # loading is not a random init
        loaded = hgm_mm.load_model(tmp_path)
        via_name = hgm_mm.create_model(f"local-dir:{tmp_path}")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    expected = all_outputs(model)
    for candidate in (loaded, via_name, hgm_mm.HGMModel.from_pretrained(tmp_path)):
        outputs = all_outputs(candidate)
        for key in expected:
            assert torch.equal(expected[key], outputs[key]), key
    assert loaded.scene_labels == ("bedroom", "kitchen", "outdoor")


def test_saving_again_over_a_model_replaces_it(tmp_path):
    first, second = tiny_model(), tiny_model()
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path)
    assert torch.equal(all_outputs(hgm_mm.load_model(tmp_path))["room"], all_outputs(second)["room"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.fixture
def saved_tiny(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_config(folder, edit):
    path = folder / "hgm_config.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def test_load_refuses_a_newer_format(saved_tiny):
    _edit_config(saved_tiny, lambda d: d.update(format_version=99, library_version="9.0.0"))
    with pytest.raises(ValueError, match=r"format_version=99, saved by hgm_mm 9\.0\.0.*pip install -U hgm-mm"):
        hgm_mm.load_model(saved_tiny)


def test_load_refuses_unknown_config_keys(saved_tiny):
    _edit_config(saved_tiny, lambda d: d["model"].update(adapter_rank=8))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['adapter_rank'\].*upgrade"):
        hgm_mm.load_model(saved_tiny)


def test_load_refuses_missing_and_unexpected_weights(saved_tiny):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved_tiny / "model.safetensors"))
    state.pop("scene_head.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(saved_tiny / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: its content .* is not the file its manifest recorded"):
        hgm_mm.load_model(saved_tiny)
    _edit_config(saved_tiny, lambda d: d.pop("sha256"))  # a folder saved before digests: the keys are checked
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. \['scene_head\.weight'\]\); 1 unexpected"):
        hgm_mm.load_model(saved_tiny)


def test_load_refuses_shape_mismatch(saved_tiny):
    _edit_config(saved_tiny, lambda d: d["model"].update(scene_labels=["a", "b"]))
    with pytest.raises(ValueError, match="shape mismatch for scene_head"):
        hgm_mm.load_model(saved_tiny)


def test_load_refuses_corrupt_files(saved_tiny):
    weights = saved_tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _edit_config(saved_tiny, lambda d: d.pop("sha256"))  # without a digest, safetensors itself refuses it
    with pytest.raises(ValueError, match="model.safetensors: cannot be read"):
        hgm_mm.load_model(saved_tiny)
    (saved_tiny / "hgm_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="hgm_config.json: not valid JSON"):
        hgm_mm.load_model(saved_tiny)


def test_weights_of_another_model_swapped_into_a_folder_are_refused(saved_tiny, tmp_path):
    torch.manual_seed(123)
    other = tiny_model()
    other.save_pretrained(tmp_path / "other")
    (saved_tiny / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"m/model\.safetensors: its content .* replaced or changed"):
        hgm_mm.load_model(saved_tiny)
    assert hgm_mm.load_model(tmp_path / "other") is not None  # the folder it came from still loads


def test_load_of_a_folder_without_config_says_what_it_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an hgm_mm model folder"):
        hgm_mm.load_model(tmp_path)
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="create_model\\('local-dir:"):
        hgm_mm.load_model(tmp_path)


def test_weight_files_are_never_unpickled(tmp_path):
    import pickle

    from hgm_mm.models.pretrained import load_state_dict_file

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ValueError, match="weights-only"):
        load_state_dict_file(path)


# -- hf-hub: a real code path, exercised offline through a populated hub cache ------------------------
def _fake_hub_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for relative, source in files.items():
        target = snapshot / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hf_hub_names_load_hgm_models_from_the_hub_cache(saved_tiny, tmp_path):
    cache = tmp_path / "hub"
    files = {str(p.relative_to(saved_tiny)): p for p in saved_tiny.rglob("*") if p.is_file()}
    assert "README.md" in files  # the model card travels with the model
    _fake_hub_repo(cache, "acme/hgm-tiny-rooms", files)
    script = (
        "import hgm_mm, torch, huggingface_hub\n"
        f"b = hgm_mm.load_model({str(saved_tiny)!r})\n"
        "x = torch.randn(1, 3, 64, 64)\n"
        "for name in ('hf-hub:acme/hgm-tiny-rooms', 'acme/hgm-tiny-rooms'):\n"
        "    a = hgm_mm.create_model(name) if name.startswith('hf-hub:') else hgm_mm.load_model(name)\n"
        "    with torch.no_grad(): assert torch.equal(a.encode_room(x, ['nordic']), b.encode_room(x, ['nordic'])), name\n"
        "print('same')\n"
        "print('snapshot', huggingface_hub.snapshot_download('acme/hgm-tiny-rooms'))\n"
        "try:\n"
        "    hgm_mm.load_model('acme/no-such-model')\n"
        "except FileNotFoundError as err:\n"
        "    print('missing', err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)  # no folder named acme/ where it runs: the names are hub ids
    assert result.returncode == 0, result.stderr[-2000:]
    assert "same" in result.stdout
    snapshot = Path(result.stdout.split("snapshot ")[1].splitlines()[0])
    assert snapshot.is_relative_to(cache)  # read from the hub cache's snapshot, not from saved_tiny
    assert (snapshot / "README.md").read_text() == (saved_tiny / "README.md").read_text()
    missing = result.stdout.split("missing ")[1]
    assert "'acme/no-such-model' is not a folder" in missing and "hub cache" in missing
