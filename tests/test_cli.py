"""The `hgm-mm` command line."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from hgm_mm.cli import main


def _tiny_dataset(root):
    (root / "img").mkdir(parents=True)
    products = []
    for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (120, 120, 120)]):
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"p{i}.jpg")
        products.append({"product_id": f"p{i}", "image": f"img/p{i}.jpg", "title": f"product {i}",
                         "category": "sofa"})
    Image.new("RGB", (64, 48), (90, 90, 90)).save(root / "img" / "room.jpg")
    (root / "products.jsonl").write_text("\n".join(json.dumps(p) for p in products))
    (root / "rooms.jsonl").write_text(json.dumps({"room_id": "r1", "image": "img/room.jpg", "scene": "bedroom",
                                                  "title": "a calm bedroom"}))
    (root / "pairs.csv").write_text("room_id,product_id\nr1,p2\n")
    return root


def test_demo_runs_on_a_dataset_folder(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    with pytest.warns(UserWarning):  # hgm-tiny announces its random weights
        assert main(["demo", "--data", str(data), "--model", "hgm-tiny", "--query", "a sofa"]) == 0
    out = capsys.readouterr().out
    assert "room r1 (bedroom)" in out
    ranked = [line for line in out.splitlines() if line.startswith("  ") and line.strip()[:2] in {"1.", "2.", "3.", "4."}]
    assert len(ranked) == 4  # every product of the catalogue, ranked for the room
    assert sum("* " in line and "product 2 " in line for line in ranked) == 1  # the room's own product is marked
    assert "0 unreadable photos skipped" in out


def test_demo_skips_and_counts_an_unreadable_photo(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    (data / "img" / "p0.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning):
        assert main(["demo", "--data", str(data), "--model", "hgm-tiny"]) == 0
    assert "1 unreadable photos skipped" in capsys.readouterr().out


def test_demo_without_data_fails_with_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("HGM_DATA", raising=False)
    result = subprocess.run([sys.executable, "-m", "hgm_mm", "demo"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "hgm-mm demo: no dataset given: pass --data DIR or set HGM_DATA to a folder with products.jsonl, "
        "rooms.jsonl and pairs.csv"]


def test_demo_reports_a_bad_dataset_row(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    (data / "pairs.csv").write_text("room_id,product_id\nr1,p9\n")
    assert main(["demo", "--data", str(data), "--model", "hgm-tiny"]) == 2
    err = capsys.readouterr().err
    assert "pairs.csv line 2" in err and "p9" in err


def test_models_lists_the_builtins(capsys):
    assert main(["models"]) == 0
    assert {"hgm-lite-en", "hgm-lite-multilingual", "hgm-tiny"} <= set(capsys.readouterr().out.split())


def test_evaluate_prints_one_table_with_the_baselines_and_writes_json(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    out_json = tmp_path / "eval.json"
    with pytest.warns(UserWarning):
        code = main(["evaluate", "--model", "hgm-tiny", "--catalog", str(data / "products.jsonl"),
                     "--rooms", str(data / "rooms.jsonl"), "--pairs", str(data / "pairs.csv"), "--baselines",
                     "--train-pairs", str(data / "pairs.csv"), "--frozen-model", "hgm-tiny", "--json", str(out_json)])
    assert code == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == ["model", "hgm-tiny", "random", "popularity", "scene_popularity", "frozen_features"]
    document = json.loads(out_json.read_text())
    assert document["model"]["n_rooms"] == 1 and "recall@10" in document["table"]["random"]


def test_evaluate_scenes_alone_and_refuses_a_partial_retrieval_set(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    (data / "images.jsonl").write_text("\n".join(json.dumps({"image": f"img/p{i}.jpg", "scene": s})
                                                 for i, s in enumerate(["bedroom", "kitchen", "bedroom"])))
    with pytest.warns(UserWarning):
        assert main(["evaluate", "--model", "hgm-tiny", "--scenes", str(data / "images.jsonl")]) == 0
    assert "scenes: 3 photos, accuracy" in capsys.readouterr().out
    assert main(["evaluate", "--model", "hgm-tiny", "--catalog", str(data / "products.jsonl")]) == 2
    assert "needs --catalog, --rooms and --pairs together" in capsys.readouterr().err
