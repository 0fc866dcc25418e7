"""Catalogue embedding: shards that resume, bad photos skipped and counted, vectors equal to the
model's own encoder, JPEG draft decoding, and two processes merging to the one-process result."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import hgm_mm
from conftest import tiny_model
from hgm_mm.models import export
from hgm_mm.data import loading
from hgm_mm.embedding import batch, shards
from hgm_mm.data.images import ImageError, load_image
from hgm_mm.embedding import ShardedEmbeddings, embed_images, embed_to_shards

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return tiny_model(seed=0)


def make_photos(folder: Path, n: int, size=(90, 70)) -> list[Path]:
    """JPEGs with different colours and a gradient, so their vectors differ."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Image.linear_gradient("L").resize(size).convert("RGB")
        tint = Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (153 * i) % 256))
        path = folder / f"p{i}.jpg"
        Image.blend(image, tint, 0.6).save(path, quality=90)
        paths.append(path)
    return paths


def reference_vectors(model, paths) -> torch.Tensor:
    """The model's own encoder on load_image's pixels, one photo at a time -> (N, D)."""
    with torch.no_grad():
        return torch.cat([model.encode_image(model.image_transform(load_image(p)).unsqueeze(0)) for p in paths])


def ids_for(paths) -> list[str]:
    return [f"id-{p.stem}" for p in paths]


@pytest.mark.parametrize("workers", [0, 2])
def test_vectors_equal_the_models_encoder_in_input_order(model, tmp_path, workers):
    paths = make_photos(tmp_path / "img", 11)
    result = embed_to_shards(model, ids_for(paths), paths, tmp_path / "out", shard_size=4, batch_size=3,
                             num_workers=workers, jpeg_draft=False, progress=False)
    ids, vectors = result.load()
    assert ids == ids_for(paths)
    assert result.n_shards == 3 and result.complete
    assert torch.allclose(vectors, reference_vectors(model, paths), atol=1e-5)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(paths)), atol=1e-5)


def test_embed_images_keeps_its_behaviour(model, tmp_path):
    paths = make_photos(tmp_path / "img", 5)
    result = embed_images(model, paths, batch_size=2, num_workers=0, progress=False)
    assert result.kept == list(range(5)) and result.skipped == []
    assert torch.allclose(result.embeddings, reference_vectors(model, paths), atol=1e-6)
    views = embed_images(model, paths[:2], num_workers=0, progress=False, room_views=True)
    with torch.no_grad():
        expected = model.encode_room_views([load_image(p) for p in paths[:2]])
    assert torch.allclose(views.embeddings, expected, atol=1e-6)


def test_a_crashed_run_resumes_to_the_same_vectors_without_duplicates(model, tmp_path, monkeypatch):
    paths = make_photos(tmp_path / "img", 10)
    ids = ids_for(paths)
    unbroken = embed_to_shards(model, ids, paths, tmp_path / "unbroken", shard_size=3, batch_size=2,
                               num_workers=0, progress=False)

    write_shard = shards._write_shard
    written = []

    def crash_on_third_shard(path, shard, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # what a kill between two shards leaves behind
        write_shard(path, shard, *args)
        written.append(path)

    monkeypatch.setattr(shards, "_write_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        embed_to_shards(model, ids, paths, tmp_path / "resumed", shard_size=3, batch_size=2, num_workers=0,
                        progress=False)
    monkeypatch.setattr(shards, "_write_shard", write_shard)
    partial = ShardedEmbeddings.open(tmp_path / "resumed")
    assert partial.missing_shards() == [2, 3]
    with pytest.raises(ValueError, match=r"2 of 4 shards are not written yet.*rerun embed_to_shards"):
        partial.load()
    (tmp_path / "resumed" / ".shard-00002.safetensors.x.tmp").write_bytes(b"half a shard")  # a kill mid-write
    first_shard_time = written[0].stat().st_mtime_ns

    resumed = embed_to_shards(model, ids, paths, tmp_path / "resumed", shard_size=3, batch_size=2, num_workers=0,
                              progress=False)
    assert written[0].stat().st_mtime_ns == first_shard_time  # finished shards were not embedded again
    assert not list((tmp_path / "resumed").glob(".*.tmp"))
    got_ids, got = resumed.load()
    want_ids, want = unbroken.load()
    assert got_ids == want_ids == ids  # every id once, in input order
    assert torch.equal(got, want)


def test_broken_photos_are_skipped_and_counted_and_texts_keep_their_product(model, tmp_path):
    paths = make_photos(tmp_path / "img", 6)
    truncated = tmp_path / "img" / "truncated.jpg"
    truncated.write_bytes(paths[0].read_bytes()[:200])
    not_an_image = tmp_path / "img" / "notes.jpg"
    not_an_image.write_text("not a photo")
    photos = [paths[0], truncated, paths[1], not_an_image, *paths[2:]]
    ids = [f"item{i}" for i in range(len(photos))]

    photo_only = embed_to_shards(model, ids, photos, tmp_path / "photos", shard_size=3, batch_size=2,
                                 num_workers=0, jpeg_draft=False, progress=False)
    got_ids, vectors = photo_only.load()
    assert got_ids == [ids[i] for i in (0, 2, 4, 5, 6, 7)]
    assert torch.allclose(vectors, reference_vectors(model, [photos[i] for i in (0, 2, 4, 5, 6, 7)]), atol=1e-5)
    skipped = photo_only.skipped()
    assert [(item, photo) for item, photo, _ in skipped] == [("item1", str(truncated)), ("item3", str(not_an_image))]
    assert "truncated or corrupt" in skipped[0][2] and "not an image file" in skipped[1][2]

    texts = [f"product {i}" for i in range(len(photos))]
    texts[5] = None  # a product with a photo and no text
    with_text = embed_to_shards(model, ids, photos, tmp_path / "products", texts=texts, shard_size=3, batch_size=2,
                                num_workers=0, jpeg_draft=False, progress=False)
    got_ids, vectors = with_text.load()
    assert got_ids == ids  # a product whose photo is unreadable keeps its text
    assert len(with_text.skipped()) == 2
    with torch.no_grad():
        text_only = model.encode_text([texts[1]])
        photo = model.encode_image(model.image_transform(load_image(photos[5])).unsqueeze(0))
    assert torch.allclose(vectors[1], text_only[0], atol=1e-5)
    assert torch.allclose(vectors[5], photo[0], atol=1e-5)

    with pytest.raises(ImageError, match="truncated.jpg"):
        embed_to_shards(model, ids, photos, tmp_path / "strict", on_error="raise", num_workers=0, progress=False)


def test_a_folder_of_another_catalogue_or_model_is_refused(model, tmp_path):
    paths = make_photos(tmp_path / "img", 4)
    out = tmp_path / "out"
    embed_to_shards(model, ids_for(paths), paths, out, shard_size=2, num_workers=0, progress=False)
    with pytest.raises(ValueError, match=r"inputs_sha256.*choose another output folder"):
        embed_to_shards(model, ids_for(paths)[::-1], paths[::-1], out, shard_size=2, num_workers=0, progress=False)
    with pytest.raises(ValueError, match=r"shard_size: folder has 2, this run 3"):
        embed_to_shards(model, ids_for(paths), paths, out, shard_size=3, num_workers=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = hgm_mm.create_model("hgm-tiny")
    with pytest.raises(ValueError, match=r"model: folder has 'hgm-tiny:sha256"):
        embed_to_shards(other, ids_for(paths), paths, out, shard_size=2, num_workers=0, progress=False)


def test_a_shard_swapped_in_from_another_folder_or_edited_is_refused(model, tmp_path):
    paths = make_photos(tmp_path / "img", 4)
    mine = embed_to_shards(model, ids_for(paths), paths, tmp_path / "mine", shard_size=2, num_workers=0,
                           progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other_model = hgm_mm.create_model("hgm-tiny")
    theirs = embed_to_shards(other_model, ids_for(paths), paths, tmp_path / "theirs", shard_size=2, num_workers=0,
                             progress=False)
    original = mine.shard_path(1).read_bytes()
    mine.shard_path(1).write_bytes(theirs.shard_path(1).read_bytes())  # same ids, same shape, another model
    with pytest.raises(ValueError, match=r"mine/shard-00001\.safetensors: was written for another embedding plan"):
        mine.load()

    from safetensors import safe_open
    from safetensors.torch import save_file

    mine.shard_path(1).write_bytes(original)
    with safe_open(str(mine.shard_path(1)), framework="pt") as f:
        metadata, vectors = f.metadata(), f.get_tensor("vectors")
    ids = json.loads(metadata["ids"])
    metadata["ids"] = json.dumps(ids[::-1])  # two products swap vectors
    save_file({"vectors": vectors}, str(mine.shard_path(1)), metadata=metadata)
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors: its ids and vectors do not match"):
        mine.load()


def test_bad_arguments_and_damaged_folders_say_what_to_fix(model, tmp_path):
    paths = make_photos(tmp_path / "img", 3)
    with pytest.raises(ValueError, match="3 ids, 2 photos"):
        embed_to_shards(model, ids_for(paths), paths[:2], tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="id 'x' occurs twice"):
        embed_to_shards(model, ["x", "y", "x"], paths, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="shard_size=0"):
        embed_to_shards(model, ids_for(paths), paths, tmp_path / "a", shard_size=0, progress=False)
    with pytest.raises(ValueError, match="precision='fp8'"):
        embed_to_shards(model, ids_for(paths), paths, tmp_path / "a", precision="fp8", progress=False)
    with pytest.raises(FileNotFoundError, match="not an embedding folder"):
        ShardedEmbeddings.open(tmp_path / "nothing")
    out = tmp_path / "out"
    embed_to_shards(model, ids_for(paths), paths, out, shard_size=2, num_workers=0, progress=False)
    (out / "shard-00001.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: damaged shard.*delete the file and rerun"):
        ShardedEmbeddings.open(out).load()


def test_jpeg_draft_decodes_large_photos_smaller_but_never_below_twice_the_model_input(model, tmp_path):
    big = make_photos(tmp_path / "big", 1, size=(1200, 900))[0]
    small = make_photos(tmp_path / "small", 1, size=(150, 120))[0]
    png = tmp_path / "big.png"
    Image.open(big).save(png)
    need = loading.draft_side(model.image_transform)
    assert need == 2 * round(model.config.image_tower.image_size / model.config.image_tower.crop_pct)
    drafted = loading.open_drafted(big, need)
    assert drafted.mode == "RGB" and min(drafted.size) >= need and drafted.size[0] < 1200
    assert loading.open_drafted(small, need).size == (150, 120)  # too small to reduce
    assert loading.open_drafted(png, need) is None  # not a JPEG: load_image decodes it
    assert loading.open_drafted(tmp_path / "missing.jpg", need) is None

    full = reference_vectors(model, [big])
    result = embed_to_shards(model, ["big"], [big], tmp_path / "out", num_workers=0, progress=False)
    cosine = torch.nn.functional.cosine_similarity(result.load()[1], full)
    assert cosine.item() > 0.99


def test_batch_norm_folding_keeps_outputs_and_refuses_a_conv_output_used_twice():
    class SharedConvOutput(nn.Module):
        """conv -> BatchNorm, but the conv output also feeds a skip path: folding would change it."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return (self.norm(y) + y).mean(dim=(2, 3))

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.norm(self.conv(x)).mean(dim=(2, 3))

    torch.manual_seed(0)
    plain, shared = Plain().eval(), SharedConvOutput().eval()
    for module in (plain, shared):  # statistics far from the identity, so a wrong fold shows
        module.norm.running_mean.uniform_(-1, 1)
        module.norm.running_var.uniform_(0.5, 2)
    folded = export.folded_copy(plain, 16, torch.device("cpu"))
    assert folded is not plain and isinstance(folded.norm, nn.Identity)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), plain(x), atol=1e-5)
    assert export.folded_copy(shared, 16, torch.device("cpu")) is shared  # the probe check refused it


@pytest.mark.slow
def test_two_processes_split_the_catalogue_and_merge_to_the_one_process_result(model, tmp_path):
    """accelerate launch with two real CPU processes (gloo): each embeds its shards, the folder merges."""
    paths = make_photos(tmp_path / "img", 13)
    model_dir = model.save_pretrained(tmp_path / "model")
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"ids": ids_for(paths), "photos": [str(p) for p in paths]}))
    script = tmp_path / "embed_worker.py"
    script.write_text(
        "import json, sys\n"
        "from accelerate import Accelerator\n"
        "import hgm_mm\n"
        "from hgm_mm.embedding import embed_to_shards\n"
        "state = Accelerator()  # joins the process group the launcher set up\n"
        "inputs = json.load(open(sys.argv[1]))\n"
        "model = hgm_mm.load_model(sys.argv[2])\n"
        "result = embed_to_shards(model, inputs['ids'], inputs['photos'], sys.argv[3], shard_size=3,\n"
        "                         batch_size=2, num_workers=0, progress=False)\n"
        "print(f'process {state.process_index} of {state.num_processes}: complete={result.complete}', flush=True)\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(script), str(inputs), str(model_dir), str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0 of 2: complete=True" in done.stdout and "process 1 of 2: complete=True" in done.stdout

    loaded = hgm_mm.load_model(model_dir)
    one = embed_to_shards(loaded, ids_for(paths), paths, tmp_path / "one", shard_size=3, batch_size=2,
                          num_workers=0, progress=False)
    two = ShardedEmbeddings.open(tmp_path / "two")
    (one_ids, one_vectors), (two_ids, two_vectors) = one.load(), two.load()
    assert two_ids == one_ids == ids_for(paths)
    assert torch.allclose(two_vectors, one_vectors, atol=1e-6)


# -- ONNX Runtime engine -------------------------------------------------------------------------
needs_onnxruntime = pytest.mark.skipif(not export.onnxruntime_available(),
                                       reason="onnxruntime, onnx and onnxscript are not installed")


@needs_onnxruntime
def test_onnxruntime_engine_matches_torch_for_products_and_room_views_with_worker_processes(model, tmp_path):
    paths = make_photos(tmp_path / "img", 7)
    texts = [f"product {i}" for i in range(7)]
    by_engine = {}
    for engine, workers in (("torch", 0), ("onnxruntime", 2)):  # ONNX Runtime in this process, workers decode
        result = embed_to_shards(model, ids_for(paths), paths, tmp_path / engine, texts=texts, shard_size=3,
                                 batch_size=2, num_workers=workers, engine=engine, progress=False)
        by_engine[engine] = result.load()
    assert by_engine["onnxruntime"][0] == by_engine["torch"][0] == ids_for(paths)
    assert torch.allclose(by_engine["onnxruntime"][1], by_engine["torch"][1], rtol=0, atol=1e-4)
    assert not torch.allclose(by_engine["torch"][1][0], by_engine["torch"][1][1], atol=1e-2)  # photos differ

    views = {engine: embed_images(model, paths[:3], num_workers=0, progress=False, room_views=True,
                                  engine=engine).embeddings for engine in ("torch", "onnxruntime")}
    assert views["onnxruntime"].shape == (3, model.room_views.n_views, model.config.embed_dim)
    assert torch.allclose(views["onnxruntime"], views["torch"], rtol=0, atol=1e-4)


@needs_onnxruntime
def test_onnx_encoder_survives_pickling_and_builds_its_session_again(model):
    import pickle

    encoder = export.OnnxImageEncoder(model)
    pixels = torch.randn(2, 3, model.config.image_tower.image_size, model.config.image_tower.image_size)
    expected = encoder(pixels)
    copied = pickle.loads(pickle.dumps(encoder))  # what a spawned DataLoader worker receives
    assert copied._session is None
    assert torch.allclose(copied(pixels), expected, atol=1e-6)
    with torch.inference_mode():
        assert torch.allclose(expected, model.encode_image(pixels), rtol=0, atol=1e-4)


def test_engine_choice_and_refusals(model, monkeypatch):
    installed = export.onnxruntime_available()
    few, many = batch.ONNX_MIN_PHOTOS - 1, batch.ONNX_MIN_PHOTOS
    assert batch.resolve_engine("auto", model, "auto", few) == "torch"  # the export would cost more
    assert batch.resolve_engine("auto", model, "auto", many) == ("onnxruntime" if installed else "torch")
    assert batch.resolve_engine("auto", model, "bf16", many) == "torch"  # ONNX Runtime runs fp32 here
    assert batch.resolve_engine("torch", model, "auto", many) == "torch"
    with pytest.raises(ValueError, match="expected one of"):
        batch.resolve_engine("tensorrt", model, "auto", many)
    with pytest.raises(ValueError, match="fp32"):
        batch.resolve_engine("onnxruntime", model, "bf16", many)
    monkeypatch.setattr(export, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(batch, "onnxruntime_available", lambda: False)
    assert batch.resolve_engine("auto", model, "auto", many) == "torch"
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        batch.resolve_engine("onnxruntime", model, "auto", many)


@needs_onnxruntime
def test_auto_engine_falls_back_to_torch_when_the_export_fails(model, tmp_path, monkeypatch):
    def failing_export(encoder, probe):
        raise export.OnnxExportError("the image path could not be exported to ONNX (test)")

    monkeypatch.setattr(export, "_export", failing_export)
    monkeypatch.setattr(batch, "ONNX_MIN_PHOTOS", 1)
    paths = make_photos(tmp_path / "img", 3)
    with pytest.warns(RuntimeWarning, match="embedding with torch instead"):
        result = embed_to_shards(model, ids_for(paths), paths, tmp_path / "auto", num_workers=0, progress=False)
    assert torch.allclose(result.load()[1], reference_vectors(model, paths), atol=1e-4)
    with pytest.raises(export.OnnxExportError):
        embed_to_shards(model, ids_for(paths), paths, tmp_path / "strict", engine="onnxruntime", num_workers=0,
                        progress=False)


def test_folded_copy_fixes_tensorflow_same_padding_for_its_input_size():
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    tower = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                          Conv2dSame(8, 8, 5, stride=2, groups=8), nn.BatchNorm2d(8)).eval()
    for norm in (tower[1], tower[4]):  # statistics that make folding change the numbers
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    folded = export.folded_copy(tower, 63, torch.device("cpu"))  # odd size: pads differ on each side
    assert not any(isinstance(m, (Conv2dSame, nn.BatchNorm2d)) for m in folded.modules())
    pixels = torch.randn(4, 3, 63, 63)
    with torch.inference_mode():
        assert torch.allclose(folded(pixels.contiguous(memory_format=torch.channels_last)), tower(pixels),
                              atol=1e-5)


def test_folded_encoder_refuses_another_image_size(model):
    encoder = export.FoldedImageEncoder(model)
    size = model.config.image_tower.image_size
    with pytest.raises(ValueError, match=f"takes {size}x{size}"):
        encoder(torch.randn(1, 3, size + 8, size + 8))


@needs_onnxruntime
def test_onnx_export_falls_back_to_the_torch_export_exporter(model, monkeypatch):
    def unavailable(encoder, probe):
        raise RuntimeError("the TorchScript-based exporter is gone")

    monkeypatch.setattr(export, "_export_torchscript", unavailable)
    encoder = export.OnnxImageEncoder(model)  # built through torch.export and checked on its probe
    size = model.config.image_tower.image_size
    pixels = torch.randn(5, 3, size, size)
    with torch.inference_mode():
        assert torch.allclose(encoder(pixels), model.encode_image(pixels), rtol=0, atol=1e-4)
    monkeypatch.setattr(export, "_export_torch_export", unavailable)
    both_failed = "TorchScript exporter: RuntimeError.*torch.export exporter: RuntimeError"
    with pytest.raises(export.OnnxExportError, match=both_failed):
        export.OnnxImageEncoder(model)


def test_folded_copy_gives_the_locked_prefix_only_where_no_fold_crosses_the_cut():
    """A cut between a convolution and its BatchNorm would hand out the folded (normalised) output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model("hgm-tiny")
    tower, side = model.image_tower.eval(), model.config.image_tower.image_size
    stages = tower.feature_stages()
    with torch.no_grad():  # statistics far from the identity, so a fold across the cut shows
        stages[-1].running_mean.uniform_(-1, 1)
        stages[-1].running_var.uniform_(0.5, 2)
    pixels = torch.randn(2, 3, side, side)
    between = len(stages) - 1  # after the head convolution, before its BatchNorm
    assert export.folded_copy(tower, side, torch.device("cpu"), prefix_stage=between) is tower
    folded = export.folded_copy(tower, side, torch.device("cpu"), prefix_stage=between - 1)
    assert folded is not tower
    with torch.no_grad():
        expected = tower.prefix_features(pixels, between - 1)
        got = folded.prefix_features(pixels.contiguous(memory_format=torch.channels_last), between - 1)
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))


def test_room_views_run_in_bounded_passes_and_give_the_one_pass_vectors(model, tmp_path, monkeypatch):
    import hgm_mm.models.hgm as model_module

    paths = make_photos(tmp_path / "img", 3)
    rooms = [load_image(p) for p in paths]
    with torch.no_grad():
        one_pass = model.encode_room_views(rooms)  # hgm-tiny's views fit in one pass of 64
    widths = []
    original = model_module.HGMModel._image_features

    def recorded(self, pixels):
        widths.append(len(pixels))
        return original(self, pixels)

    monkeypatch.setattr(model_module.HGMModel, "_image_features", recorded)
    monkeypatch.setattr(model_module, "VIEW_PASS_IMAGES", 4)
    monkeypatch.setattr(batch, "VIEW_PASS_IMAGES", 4)
    with torch.no_grad():
        chunked = model.encode_room_views(rooms)
    assert max(widths) == 4 and sum(widths) == len(rooms) * model.room_views.n_views
    assert torch.allclose(chunked, one_pass, atol=1e-6)
    widths.clear()
    views = embed_images(model, paths, batch_size=3, num_workers=0, progress=False, room_views=True, engine="torch")
    assert max(widths) == 4
    assert torch.allclose(views.embeddings, one_pass, atol=1e-6)
