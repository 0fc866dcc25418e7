"""Folders written by an earlier hgm_mm still load and give the vectors and rankings they gave then.

`fixtures/saved_folders/` was written by `fixtures/make_saved_folders.py` (hgm_mm 0.1.0, commit
fb505c1): a matcher folder with its tiny random model (photo scene head with a tuned branch,
scene-text classifier), the catalogue it indexed, a room photo, and `expected.json`.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hgm_mm
from hgm_mm.ranking.catalog import build_catalog_index
from hgm_mm.ranking.matcher import Matcher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAVED = Path(__file__).resolve().parent / "fixtures" / "saved_folders"
EXPECTED = json.loads((SAVED / "expected.json").read_text(encoding="utf-8"))
TOLERANCE = 1e-5


def close(actual, expected) -> bool:
    return np.allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), atol=TOLERANCE)


@pytest.fixture(scope="module")
def model():
    return hgm_mm.load_model(SAVED / "matcher" / "model")


def test_the_saved_model_gives_the_vectors_it_gave_when_written(model):
    catalogue = [json.loads(line) for line in (SAVED / "catalogue" / "products.jsonl").read_text().splitlines()]
    room = Image.open(SAVED / "room.png").convert("RGB")
    words = EXPECTED["words"]
    with torch.no_grad():
        assert close(model.encode_image([room])[0], EXPECTED["image_vector"])
        assert close(model.encode_text([words])[0], EXPECTED["text_vector"])
        photo = Image.open(SAVED / "catalogue" / catalogue[3]["image"]).convert("RGB")
        assert close(model.encode_product([photo], [catalogue[3]["title"]])[0], EXPECTED["product_vector"])
        assert close(model.encode_room([room], [words])[0], EXPECTED["room_vector"])
    scenes = model.predict_scene([room], [words])[0]
    assert list(scenes) == list(EXPECTED["scene_probabilities"])  # the same order, most likely first
    assert close(list(scenes.values()), list(EXPECTED["scene_probabilities"].values()))


@pytest.mark.parametrize("query", ["photo", "words", "both"])
def test_the_saved_matcher_folder_ranks_as_it_did_when_written(query):
    matcher = Matcher.load(SAVED / "matcher", engine="torch")
    inputs = {"photo": {"image": SAVED / "room.png"}, "words": {"text": EXPECTED["words"]},
              "both": {"image": SAVED / "room.png", "text": EXPECTED["words"]}}[query]
    result = matcher.match(k=5, **inputs)
    expected = EXPECTED[f"match_{query}"]
    assert result.scene == expected["scene"]
    assert [p.product_id for p in result.products] == [row[0] for row in expected["products"]]
    assert close([p.score for p in result.products], [row[1] for row in expected["products"]])
    assert [p.product_id for p in result.product_set] == expected["set"]


def test_a_saved_matcher_folder_is_rebuilt_in_place_without_embedding_again(tmp_path, model):
    folder = tmp_path / "matcher"
    shutil.copytree(SAVED / "matcher", folder)
    before = Matcher.load(folder, engine="torch").index
    built = build_catalog_index(model, SAVED / "catalogue" / "products.jsonl", folder, kind="exact",
                                progress=False, num_workers=0)
    assert built.n_embedded == 0 and built.n_reused == 12  # every product's vector is taken from the saved folder
    after = Matcher.load(folder, engine="torch").index
    assert after.ids == before.ids
    assert close(after.vectors(after.ids), before.vectors(before.ids))


@pytest.mark.parametrize("manifest", ["matcher.json", "index/manifest.json", "model/hgm_config.json"])
def test_a_folder_of_a_newer_format_is_refused_the_same_way_whatever_its_kind(tmp_path, manifest):
    folder = tmp_path / "matcher"
    shutil.copytree(SAVED / "matcher", folder)
    document = json.loads((folder / manifest).read_text())
    document.update(format_version=99, library_version="9.0.0")
    (folder / manifest).write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"format_version=99, saved by hgm_mm 9\.0\.0; this hgm_mm .* reads formats "
                                         r"up to \d+\. Upgrade: pip install -U hgm-mm"):
        Matcher.load(folder, engine="torch")
