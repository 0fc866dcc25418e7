"""The built-in pretrained models work offline and their towers carry real knowledge."""
import json
import warnings

import pytest
import torch

import hgm_mm
from hgm_mm import RandomInitWarning

pytestmark = pytest.mark.slow


def _create_without_random_init(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        return hgm_mm.create_model(name)


@pytest.fixture(scope="module")
def lite_en():
    return _create_without_random_init("hgm-lite-en")


@pytest.fixture(scope="module")
def lite_multilingual():
    return _create_without_random_init("hgm-lite-multilingual")


def _cos(model, a, b):
    with torch.no_grad():
        x, y = model.encode_text([a, b])
    return float(x @ y)


def test_lite_en_text_tower_knows_furniture(lite_en):
    with torch.no_grad():
        assert lite_en.encode_text(["a grey sofa"]).shape == (1, 384)
    assert _cos(lite_en, "sofa", "couch") > _cos(lite_en, "sofa", "tax deadline") + 0.2


def test_lite_multilingual_reads_chinese(lite_multilingual):
    assert _cos(lite_multilingual, "沙发", "布艺沙发") > _cos(lite_multilingual, "沙发", "增值税发票")
    assert _cos(lite_multilingual, "沙发", "sofa") > _cos(lite_multilingual, "沙发", "invoice")


def _products(shared_data, product_type, n):
    rows = [json.loads(line) for line in (shared_data / "ikea" / "products.jsonl").read_text().splitlines()]
    chosen = [r for r in rows if r["product_type"] == product_type][:n]
    assert len(chosen) == n, f"fewer than {n} products of type {product_type!r}"
    return [shared_data / "ikea" / r["image"] for r in chosen]


def test_lite_image_tower_groups_product_photos_by_kind(lite_en, shared_data):
    """Frozen image features: a sofa photo is nearer other sofas than pendant lamps."""
    sofas = _products(shared_data, "Three-seat sofa", 4)
    lamps = _products(shared_data, "Pendant lamp", 4)
    with torch.no_grad():
        sofa_vecs, lamp_vecs = lite_en.encode_image(sofas), lite_en.encode_image(lamps)
    sofa_to_sofa = (sofa_vecs[:1] @ sofa_vecs[1:].T).mean()
    sofa_to_lamp = (sofa_vecs[:1] @ lamp_vecs.T).mean()
    assert sofa_to_sofa > sofa_to_lamp


def test_lite_image_tower_classifies_an_imagenet_object(lite_en, shared_data):
    """The image tower's trunk is the ImageNet model: with its classifier put back, a sofa is a couch."""
    import timm

    from hgm_mm.models.towers.offline_weights import efficientnet_lite0_state_dict

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    classifier.load_state_dict(efficientnet_lite0_state_dict())
    classifier.eval()
    pixels = lite_en.preprocess_images(_products(shared_data, "Three-seat sofa", 3))
    with torch.no_grad():
        top5 = classifier(pixels).topk(5).indices
    assert all(831 in row for row in top5.tolist())  # 831: ImageNet "studio couch"


def test_lite_model_round_trip_is_bit_exact(lite_en, tmp_path):
    lite_en.save_pretrained(tmp_path)
    loaded = hgm_mm.load_model(tmp_path)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(lite_en.encode_room(pixels, ["a Nordic living room", None]),
                           loaded.encode_room(pixels, ["a Nordic living room", None]))
        assert torch.equal(lite_en.encode_text(["KIVIK sofa"]), loaded.encode_text(["KIVIK sofa"]))
