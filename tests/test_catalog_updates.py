"""Rebuilding a catalogue index embeds only what changed, resumes after a kill, and equals a fresh build."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import hgm_mm
from conftest import tiny_model
from hgm_mm.embedding.catalog_vectors import content_key
from hgm_mm.ranking.catalog import build_catalog_index
from hgm_mm.ranking.matcher import Matcher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def write_catalogue(folder, rows):
    """rows: (product_id, colour or None for an unreadable photo, title, price[, category]) -> products.jsonl."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for product_id, colour, title, price, *category in rows:
        path = folder / "img" / f"{product_id}.png"
        if colour is None:
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (40, 32), colour).save(path)
        row = {"product_id": product_id, "image": f"img/{product_id}.png", "title": title, "price": price,
               "category": category[0] if category else "lamp" if product_id < "p05" else "sofa"}
        lines.append(json.dumps({key: value for key, value in row.items() if value is not None}))
    (folder / "products.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return folder / "products.jsonl"


def free_port() -> int:
    """A loopback port nothing listens on now: other tests' process groups may hold the default one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build(model, catalogue, output, store="faiss", collection=None):
    return build_catalog_index(model, catalogue, output, kind="exact", store=store, collection=collection,
                               progress=False, num_workers=0)


@pytest.fixture(params=["faiss", "milvus"])
def store(request, tmp_path):
    """A function giving (store URI, collection) for the n-th index of a test."""
    if request.param == "faiss":
        return lambda n: ("faiss", None)
    pytest.importorskip("milvus_lite", reason="the Milvus backend needs pip install 'hgm-mm[milvus]'")
    return lambda n: (f"milvus-lite:{tmp_path / 'catalogue.db'}", f"index_{n}")


def folder_contents(folder):
    matcher = Matcher.load(folder)
    ids = matcher.index.ids
    return ids, matcher.index.vectors(ids), [matcher.index.metadata(i) for i in ids]


def test_a_rebuild_embeds_only_new_and_changed_products_and_equals_a_fresh_build(model, tmp_path, store):
    rows = [(f"p{i:02d}", (20 * i, 100, 200 - 10 * i), f"product {i}", 10 + i) for i in range(10)]
    first = build(model, write_catalogue(tmp_path / "v1", rows), tmp_path / "index", *store(1))
    assert (first.n_embedded, first.n_reused, first.n_products) == (10, 0, 10)
    first_vector = Matcher.load(tmp_path / "index").index.vectors(["p00"])

    changed = list(rows)
    changed[1] = ("p01", (5, 5, 5), "product 1", 11)  # a new photo
    changed[2] = ("p02", rows[2][1], "product 2, now in oak", 12)  # a new text
    changed[3] = ("p03", rows[3][1], "product 3", 99)  # a new price only: no embedding
    del changed[4]  # removed
    changed += [("p10", (1, 2, 3), "product 10", 20), ("p11", (9, 9, 250), "product 11", 21)]
    catalogue = write_catalogue(tmp_path / "v2", changed)  # every photo is a new file: content decides, not paths
    second = build(model, catalogue, tmp_path / "index", *store(1))
    assert (second.n_embedded, second.n_reused, second.n_products) == (4, 7, 11)

    fresh = build(model, catalogue, tmp_path / "fresh", *store(2))
    assert fresh.n_embedded == 11
    ids, vectors, metadata = folder_contents(tmp_path / "index")
    fresh_ids, fresh_vectors, fresh_metadata = folder_contents(tmp_path / "fresh")
    assert ids == fresh_ids == [row[0] for row in changed]
    assert metadata == fresh_metadata and metadata[3]["price"] == 99
    np.testing.assert_allclose(vectors, fresh_vectors, atol=1e-5)
    # the reused vector of an unchanged product is the first build's (to the index's re-normalisation)
    np.testing.assert_allclose(Matcher.load(tmp_path / "index").index.vectors(["p00"]), first_vector,
                               rtol=0, atol=1e-7)
    assert not (tmp_path / ".index.vectors").exists()  # the shards are gone once the folder is written
    assert len(Matcher.load(tmp_path / "index").index) == 11  # the removed product is gone from the store too


def test_a_collection_another_model_built_is_refused_not_overwritten(model, tmp_path):
    pytest.importorskip("milvus_lite", reason="the Milvus backend needs pip install 'hgm-mm[milvus]'")
    uri = f"milvus-lite:{tmp_path / 'catalogue.db'}"
    catalogue = write_catalogue(tmp_path, [(f"p{i:02d}", (30 * i, 0, 0), f"product {i}", 1) for i in range(4)])
    build(model, catalogue, tmp_path / "index", uri)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = hgm_mm.create_model("hgm-tiny")
    with pytest.raises(ValueError, match=r"'hgm_catalogue' .* holds the vectors of model 'hgm-tiny' \(\w+\), not of the model 'hgm-tiny' \(\w+\) being indexed.*not overwritten.*--collection"):
        build(other, catalogue, tmp_path / "other", uri)
    assert not (tmp_path / "other").exists() and not (tmp_path / ".other.vectors").exists()  # refused before embedding
    assert len(Matcher.load(tmp_path / "index").index) == 4
    with pytest.raises(ValueError, match="built with model"):
        Matcher.load(tmp_path / "index", model=other)
    assert len(build(other, catalogue, tmp_path / "other", uri, "other_model").folder.name) > 0


def test_another_models_folder_is_embedded_again_not_reused(model, tmp_path):
    catalogue = write_catalogue(tmp_path, [(f"p{i:02d}", (30 * i, 0, 0), f"product {i}", 1) for i in range(4)])
    build(model, catalogue, tmp_path / "index")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = hgm_mm.create_model("hgm-tiny")
    rebuilt = build(other, catalogue, tmp_path / "index")
    assert (rebuilt.n_embedded, rebuilt.n_reused) == (4, 0)
    Matcher.load(tmp_path / "index")  # its own model's folder now


def test_a_product_without_a_readable_photo_or_text_is_left_out_and_named(model, tmp_path):
    rows = [("p00", (200, 0, 0), "red lamp", 1), ("p01", None, "broken photo, has a title", 2), ("p02", None, "", 3, None)]
    built = build(model, write_catalogue(tmp_path, rows), tmp_path / "index")
    assert built.n_products == 2 and [pid for pid, _, _ in built.left_out] == ["p02"]
    assert [photo for photo, _ in built.skipped] == [str((tmp_path / "img" / "p01.png").resolve())]
    assert Matcher.load(tmp_path / "index").index.ids == ["p00", "p01"]
    again = build(model, write_catalogue(tmp_path, rows), tmp_path / "index")  # a rerun is not refused
    assert again.n_products == 2 and again.n_reused == 2


def test_content_key_follows_photo_bytes_and_text_not_paths(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(a)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(b)
    Image.new("RGB", (8, 8), (1, 2, 4)).save(c)
    assert content_key(a, "lamp") == content_key(b, "lamp")
    assert content_key(a, "lamp") != content_key(c, "lamp") != content_key(a, "lamp ")
    assert content_key(tmp_path / "missing.png", "lamp") != content_key(None, "lamp")


@pytest.mark.slow
def test_a_build_killed_mid_way_resumes_from_its_shards(model, tmp_path):
    """kill -9 while embedding, then rerun: the finished shards are kept and the folder equals a fresh build."""
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(160):  # large photos decode slowly enough to be caught mid-way
        Image.fromarray(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8)).save(tmp_path / "img" / f"p{i}.jpg")
        lines.append(json.dumps({"product_id": f"p{i:03d}", "image": f"img/p{i}.jpg", "title": f"product {i}"}))
    (tmp_path / "products.jsonl").write_text("\n".join(lines), encoding="utf-8")
    command = [sys.executable, "-m", "hgm_mm", "index", "--model", str(model_dir), "--catalog",
               str(tmp_path / "products.jsonl"), "--output", str(tmp_path / "index"), "--kind", "exact"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / ".index.vectors"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(shards.glob("*/shard-*.safetensors"))) < 3:
        assert process.poll() is None, "the build finished before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "index").exists()

    resumed = build_catalog_index(hgm_mm.load_model(model_dir), tmp_path / "products.jsonl", tmp_path / "index",
                                  kind="exact", progress=False, num_workers=0)
    assert resumed.n_products == 160 and 0 < resumed.n_reused < 160
    assert resumed.n_embedded == 160 - resumed.n_reused
    build_catalog_index(hgm_mm.load_model(model_dir), tmp_path / "products.jsonl", tmp_path / "fresh",
                        kind="exact", progress=False, num_workers=0)
    ids, vectors, metadata = folder_contents(tmp_path / "index")
    fresh_ids, fresh_vectors, fresh_metadata = folder_contents(tmp_path / "fresh")
    assert ids == fresh_ids and metadata == fresh_metadata
    np.testing.assert_allclose(vectors, fresh_vectors, atol=1e-5)


@pytest.mark.slow
def test_two_accelerate_processes_write_one_store_equal_to_a_one_process_build(model, tmp_path):
    """accelerate launch -m hgm_mm index with two real CPU processes (gloo): each embeds its share
    of the shards, process 0 writes the Milvus collection and the folder, equal to one process's."""
    pytest.importorskip("milvus_lite", reason="the Milvus backend needs pip install 'hgm-mm[milvus]'")
    model_dir = model.save_pretrained(tmp_path / "model")
    rows = [(f"p{i:02d}", (7 * i, 255 - 5 * i, 40), f"product {i}", 10 + i) for i in range(40)]
    catalogue = write_catalogue(tmp_path / "catalogue", rows)
    uri = f"milvus-lite:{tmp_path / 'store.db'}"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "hgm_mm",
               "index", "--model", str(model_dir), "--catalog", str(catalogue), "--output", str(tmp_path / "two"),
               "--store", uri, "--collection", "two", "--kind", "exact", "--batch-size", "4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("hgm-mm ")]
    assert done.returncode == 0, errors or done.stderr[-3000:]
    assert done.stdout.count("indexed 40 products") == 1  # process 0 reports; both embedded
    assert not (tmp_path / ".two.vectors").exists() and not (tmp_path / ".two.previous.safetensors").exists()

    one = build(hgm_mm.load_model(model_dir), catalogue, tmp_path / "one", uri, "one")
    assert one.n_embedded == 40
    ids, vectors, metadata = folder_contents(tmp_path / "two")
    one_ids, one_vectors, one_metadata = folder_contents(tmp_path / "one")
    assert ids == one_ids == [row[0] for row in rows] and metadata == one_metadata
    np.testing.assert_allclose(vectors, one_vectors, atol=1e-5)
