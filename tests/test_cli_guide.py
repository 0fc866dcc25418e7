"""`hgm-mm index` and `hgm-mm match` on a few real IKEA products with hgm-tiny."""
import json
import warnings

import pytest

from hgm_mm.apps.cli import main

N_PRODUCTS = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")  # hgm-tiny announces its random weights
    return ctx


@pytest.fixture(scope="module")
def catalog(ikea, tmp_path_factory):
    """A products.jsonl of the first room's products and a few others; photos linked, never copied."""
    root = tmp_path_factory.mktemp("catalog")
    (root / "images").symlink_to(ikea / "images", target_is_directory=True)
    rows = [json.loads(line) for line in (ikea / "products.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    room = json.loads((ikea / "rooms.jsonl").read_text(encoding="utf-8").splitlines()[0])
    in_room = {line.split(",")[1] for line in (ikea / "pairs.csv").read_text(encoding="utf-8").splitlines()[1:]
               if line.startswith(room["room_id"] + ",")}
    chosen = [r for r in rows if r["product_id"] in in_room][:N_PRODUCTS // 2]
    chosen += [r for r in rows if r["product_id"] not in in_room][:N_PRODUCTS - len(chosen)]
    (root / "products.jsonl").write_text("\n".join(json.dumps(r) for r in chosen) + "\n", encoding="utf-8")
    return {"products": root / "products.jsonl", "ids": [r["product_id"] for r in chosen],
            "room_photo": ikea / room["image"]}


@pytest.fixture(scope="module")
def index_dir(ikea, catalog, tmp_path_factory):
    output = tmp_path_factory.mktemp("guide") / "catalogue"
    ctx = tiny_warnings()
    try:
        code = main(["index", "--model", "hgm-tiny", "--catalog", str(catalog["products"]), "--output", str(output),
                     "--pairs", str(ikea / "pairs.csv"), "--rooms", str(ikea / "rooms.jsonl")])
    finally:
        ctx.__exit__(None, None, None)
    assert code == 0
    return output


def run_match(capsys, *args):
    capsys.readouterr()
    code = main(["match", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_match_json_holds_scene_products_reasons_and_a_set(index_dir, catalog, capsys):
    code, out, _ = run_match(capsys, "--index", index_dir, catalog["room_photo"], "--text", "a bright room",
                             "-k", 5, "--json")
    assert code == 0
    document = json.loads(out)
    assert document["scene"] == next(iter(document["scene_probabilities"]))
    assert sum(document["scene_probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert len(document["products"]) == 5
    for product in document["products"] + document["product_set"]:
        assert product["product_id"] in catalog["ids"]
        assert set(product["reasons"]) == {"similarity", "scene_fit", "profile", "diversity"}
        assert product["score"] == pytest.approx(sum(product["reasons"].values()), abs=1e-5)
        assert {"title", "category", "image"} <= set(product["metadata"])
    categories = [p["metadata"]["category"] for p in document["product_set"]]
    assert categories and len(categories) == len(set(categories))  # one product per category


def test_match_with_a_user_profile(index_dir, catalog, capsys, tmp_path):
    events = tmp_path / "events.csv"
    liked = catalog["ids"][-1]
    events.write_text("user_id,product_id,event,timestamp\n"
                      f"u1,{liked},purchase,2024-05-01T12:00:00Z\n"
                      f"u1,{catalog['ids'][0]},view,1700000000\n", encoding="utf-8")
    code, out, _ = run_match(capsys, "--index", index_dir, catalog["room_photo"], "--user-events", events,
                             "--user", "u1", "-k", N_PRODUCTS, "--json")
    assert code == 0
    products = json.loads(out)["products"]
    assert any(p["reasons"]["profile"] != 0 for p in products)
    code, out, _ = run_match(capsys, "--index", index_dir, catalog["room_photo"], "--user-events", events,
                             "--user", "u1", "-k", 3)
    assert code == 0 and "products for user u1:" in out and "product set:" in out and "scene: " in out


@pytest.mark.parametrize("case", ["missing photo", "unknown user", "bad events", "user without events"])
def test_match_input_errors_are_one_clear_line(index_dir, catalog, capsys, tmp_path, case):
    events = tmp_path / "events.csv"
    events.write_text("user_id,product_id,event,timestamp\nu1,p1,like,1700000000\n"
                      if case == "bad events" else "user_id,product_id,event,timestamp\nu1,p1,view,1700000000\n")
    args = {
        "missing photo": ["--index", index_dir, tmp_path / "absent.jpg"],
        "unknown user": ["--index", index_dir, catalog["room_photo"], "--user-events", events, "--user", "u9"],
        "bad events": ["--index", index_dir, catalog["room_photo"], "--user-events", events, "--user", "u1"],
        "user without events": ["--index", index_dir, catalog["room_photo"], "--user", "u1"],
    }[case]
    expected = {"missing photo": "absent.jpg: no such photo", "unknown user": "unknown user 'u9'",
                "bad events": "events.csv line 2: event 'like' is not known",
                "user without events": "needs --user-events FILE and --user ID together"}[case]
    code, out, err = run_match(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("hgm-mm match: ") and expected in err


def test_match_refuses_a_model_that_did_not_build_the_index(index_dir, catalog, capsys, tmp_path):
    import hgm_mm

    ctx = tiny_warnings()
    try:
        hgm_mm.create_model("hgm-tiny").save_pretrained(tmp_path / "other")  # same config, other weights
    finally:
        ctx.__exit__(None, None, None)
    code, out, err = run_match(capsys, "--index", index_dir, catalog["room_photo"], "--model", tmp_path / "other")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "was built with model 'hgm-tiny'" in err and "not comparable" in err


def test_index_refuses_to_replace_a_folder_it_did_not_write(catalog, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    code = main(["index", "--model", "hgm-tiny", "--catalog", str(catalog["products"]), "--output", str(tmp_path)])
    assert code == 2 and "is not an index folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    code = main(["index", "--model", "hgm-tiny", "--catalog", str(catalog["products"]), "--output",
                 str(tmp_path / "new"), "--pairs", "pairs.csv"])
    assert code == 2 and "--pairs and --rooms together" in capsys.readouterr().err


@pytest.fixture(scope="module")
def milvus_index_dir(index_dir, catalog, ikea, tmp_path_factory):
    """The same catalogue and model as `index_dir`, its vectors in a Milvus Lite store."""
    pytest.importorskip("milvus_lite", reason="the Milvus backend needs pip install 'hgm-mm[milvus]'")
    root = tmp_path_factory.mktemp("milvus")
    code = main(["index", "--model", str(index_dir / "model"), "--catalog", str(catalog["products"]),
                 "--output", str(root / "catalogue"), "--store", f"milvus-lite:{root / 'store.db'}",
                 "--collection", "ikea", "--pairs", str(ikea / "pairs.csv"), "--rooms", str(ikea / "rooms.jsonl")])
    assert code == 0
    return root / "catalogue"


def test_match_on_a_milvus_store_equals_match_on_the_faiss_folder(index_dir, milvus_index_dir, catalog, capsys):
    manifest = json.loads((milvus_index_dir / "matcher.json").read_text())
    assert manifest["index"] is None and manifest["store"]["collection"] == "ikea"
    assert not (milvus_index_dir / "index").exists()
    documents = []
    for folder in (index_dir, milvus_index_dir):
        code, out, _ = run_match(capsys, "--index", folder, catalog["room_photo"], "--text", "a bright room",
                                 "-k", 10, "--json")
        assert code == 0
        documents.append(json.loads(out))
    faiss_doc, milvus_doc = documents
    assert [p["product_id"] for p in milvus_doc["products"]] == [p["product_id"] for p in faiss_doc["products"]]
    assert [p["product_id"] for p in milvus_doc["product_set"]] == [p["product_id"] for p in faiss_doc["product_set"]]
    assert [p["metadata"] for p in milvus_doc["products"]] == [p["metadata"] for p in faiss_doc["products"]]
    for a, b in zip(milvus_doc["products"], faiss_doc["products"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_index_names_a_store_it_cannot_reach_before_embedding(catalog, capsys, tmp_path):
    code = main(["index", "--model", "hgm-tiny", "--catalog", str(catalog["products"]), "--output",
                 str(tmp_path / "out"), "--store", "milvus://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the Milvus store 'milvus://127.0.0.1:9'" in err
    assert not (tmp_path / "out").exists()
    for store, expected in (("milvus-lite:store.sqlite", "ends in .db"), ("redis://x", "not valid; expected faiss")):
        code = main(["index", "--model", "hgm-tiny", "--catalog", str(catalog["products"]), "--output",
                     str(tmp_path / "out"), "--store", store])
        assert code == 2 and expected in capsys.readouterr().err
    code = main(["index", "--model", "hgm-tiny", "--catalog", str(catalog["products"]), "--output",
                 str(tmp_path / "out"), "--store", f"milvus-lite:{tmp_path / 's.db'}", "--kind", "ivfpq"])
    assert code == 2 and "ivfpq is FAISS's own" in capsys.readouterr().err
