"""Room views pooled from one feature map (`room_views="feature_map"`): the pooling, the engines, the
cache, saving, and the matcher's queries."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hgm_mm
from conftest import tiny_model
from hgm_mm.embedding.batch import photo_encoder
from hgm_mm.models import export
from hgm_mm.models.towers.timm_tower import grid_pool
from hgm_mm.ranking.matcher import Matcher
from hgm_mm.retrieval.index import ProductIndex, model_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAP_SIZE = 128  # hgm-tiny's tower at 128 px: a 4 x 4 feature map


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, room_views="feature_map", room_map_size=MAP_SIZE)


def room_photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("height,width", [(14, 14), (7, 9)])  # even and uneven bins
def test_grid_pool_is_adaptive_average_pooling_grid_by_grid(height, width):
    feature_map = torch.randn(2, 6, height, width)
    grids = (1, 2, 3, 5)
    expected = torch.cat([F.adaptive_avg_pool2d(feature_map, g).flatten(2).transpose(1, 2) for g in grids], dim=1)
    got = grid_pool(feature_map, grids)
    assert got.shape == (2, 1 + 4 + 9 + 25, 6)
    assert torch.allclose(got, expected, atol=1e-6)


def test_grid_pool_exports_to_onnx_with_uneven_bins():
    if not export.onnxruntime_available():
        pytest.skip("onnxruntime, onnx and onnxscript are not installed")
    import onnxruntime

    class Pool(torch.nn.Module):
        def forward(self, feature_map):
            return grid_pool(feature_map, (1, 2, 3, 5))

    feature_map = torch.randn(2, 4, 20, 20)  # 20 / 3: tiles of grid 3 overlap by a cell
    session = onnxruntime.InferenceSession(export._export(Pool(), feature_map), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: feature_map.numpy()})[0])
    assert torch.allclose(got, Pool()(feature_map), atol=1e-5)


def test_one_pass_gives_every_view_and_the_whole_view_is_the_photo_at_the_map_size(model):
    assert model.room_views.n_views == 5 and model.room_views.n_passes == 1
    photos = room_photos(2)
    pixels = model.preprocess_room_views(photos)
    assert pixels.shape == (2, 1, 3, MAP_SIZE, MAP_SIZE)
    with torch.no_grad():
        views = model.encode_room_views(photos)
        assert views.shape == (2, 5, model.config.embed_dim)
        assert torch.allclose(views.norm(dim=-1), torch.ones(2, 5), atol=1e-5)
        assert torch.allclose(views[:, 0], model.encode_image(pixels[:, 0]), atol=1e-5)  # grid 1: the whole map
        assert not torch.allclose(views[:, 1], views[:, 2], atol=1e-3)  # the tiles see different cells
        features = model.image_tower.trunk.forward_features(pixels[:, 0])  # (2, C, 4, 4)
        top_left = F.normalize(model.image_proj(features[:, :, :2, :2].mean((2, 3))), dim=-1)
        assert torch.allclose(views[:, 1], top_left, atol=1e-5)  # tile (0, 0) of grid 2: the top-left cells


def test_cached_locked_layers_give_the_views_of_the_pixels(model):
    pixels = model.preprocess_room_views(room_photos(2))
    stage = len(model.image_tower.feature_stages()) - 2
    with torch.no_grad():
        expected = model.encode_room_views(pixels)
        cached = model.image_tower.prefix_features(pixels.flatten(0, 1), stage).unsqueeze(1)  # (R, 1, C, h, w)
        with model.image_inputs_from_stage(stage):
            got = model.encode_room_views(cached)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_the_catalogue_and_query_engines_give_the_models_views(model, engine):
    if engine == "onnxruntime" and not export.onnxruntime_available():
        pytest.skip("onnxruntime, onnx and onnxscript are not installed")
    pixels = model.preprocess_room_views(room_photos(3))
    encode = photo_encoder(model, room_views=True, engine=engine)  # torch: the folded copy
    with torch.no_grad():
        expected = model.encode_room_views(pixels)
    got = encode(pixels)
    assert got.shape == expected.shape == (3, 5, model.config.embed_dim)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4)


def test_a_saved_model_keeps_its_room_views(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    loaded = hgm_mm.load_model(tmp_path / "model")
    assert loaded.config.room_views == "feature_map" and loaded.config.room_map_size == MAP_SIZE
    photos = room_photos(1)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_room_views(photos), model.encode_room_views(photos), atol=1e-6)


def test_the_matcher_ranks_by_the_pooled_views(model):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((12, model.config.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"p{i}" for i in range(12)]
    index = ProductIndex.build(ids, vectors, [{"category": "sofa"} for _ in ids],
                               model_identity=model_fingerprint(model))
    matcher = Matcher(model, index)
    photo = room_photos(1)[0]
    query = matcher.encode_query(photo)
    assert query.view_embeds.shape == (1, 5, model.config.embed_dim)
    weights = hgm_mm.RankingWeights(scene_fit=0.0, profile=0.0, diversity=0.0)
    result = matcher.rank(query, k=12, weights=weights)
    with torch.no_grad():
        scores = model.score_products(torch.from_numpy(vectors), view_embeds=model.encode_room_views([photo]))[0]
    assert [p.product_id for p in result.products] == [ids[i] for i in scores.argsort(descending=True).tolist()]


def test_bad_room_view_settings_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="room_views.*'crops'"):
        hgm_mm.ModelConfig(room_views="tiles")
    with pytest.raises(ValueError, match="room_map_size=48.*64"):
        hgm_mm.ModelConfig(room_grids=(1, 2), room_views="feature_map", room_map_size=48)
    with pytest.raises(ValueError, match="TrainConfig.room_views"):
        hgm_mm.TrainConfig(room_views="tiles")
    tiny_model().save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="saved hgm_mm model"):  # a trained model keeps the views it learnt
        hgm_mm.create_model(f"local-dir:{tmp_path / 'saved'}", room_views="feature_map")
