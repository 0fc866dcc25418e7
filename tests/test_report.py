"""The visual evaluation report: sampled rooms, hits, escaping, the confusion matrix, atomic writes."""
import json
import os
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hgm_mm
from hgm_mm.data import Product, Room, load_dataset
from hgm_mm.evaluation import SceneEvaluation, check_report_folder, evaluate_scenes, write_report
from hgm_mm.evaluation import metrics, report
from hgm_mm.evaluation.evaluate import relevance, retrieval_metrics

DATA = Path(os.environ.get("HGM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class Page(HTMLParser):
    """The parts of a report page the tests look at."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.rooms: list[str] = []
        self.hits: dict[str, list[str]] = {}  # room id -> product ids marked as hits, in rank order
        self.shown: dict[str, list[str]] = {}  # room id -> product ids shown, in rank order
        self.recalls: list[str] = []
        self._in_recall = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        classes = (attrs.get("class") or "").split()
        if tag == "img":
            self.images.append(attrs["src"])
        if "room" in classes:
            self.rooms.append(attrs["data-room-id"])
            self.hits[self.rooms[-1]], self.shown[self.rooms[-1]] = [], []
        if "product" in classes:
            self.shown[self.rooms[-1]].append(attrs["data-product-id"])
            if "hit" in classes:
                self.hits[self.rooms[-1]].append(attrs["data-product-id"])
        self._in_recall = "recall" in classes

    def handle_data(self, data):
        if self._in_recall:
            self.recalls.append(data)
            self._in_recall = False


def _photo(path: Path, colour) -> Path:
    Image.new("RGB", (90, 60), colour).save(path)
    return path


@pytest.fixture
def catalogue(tmp_path):
    """6 products and 4 rooms with photos; each room holds the products listed in `pairs`."""
    photos = tmp_path / "photos"
    photos.mkdir()
    products = [Product(product_id=f"p{j}", image=_photo(photos / f"p{j}.png", (40 * j, 80, 200 - 30 * j)),
                        title=f"product {j}", category="sofa" if j % 2 else "lamp", description="", attributes={})
                for j in range(6)]
    rooms = [Room(room_id=f"r{i}", image=_photo(photos / f"r{i}.png", (20, 60 * i, 90)), scene="bedroom",
                  title=f"room {i}", attributes={}) for i in range(4)]
    pairs = [("r0", "p0"), ("r0", "p4"), ("r1", "p1"), ("r2", "p2"), ("r2", "p3"), ("r2", "p5"), ("r3", "p5")]
    return products, rooms, pairs


def _evaluation(catalogue, scores):
    products, rooms, pairs = catalogue
    return retrieval_metrics(np.asarray(scores, dtype=float), relevance(rooms, products, pairs), products, rooms)


SCORES = [  # (rooms, products); top 3 per room marked by hand below
    [0.9, 0.8, 0.7, 0.1, 0.2, 0.3],  # r0 holds p0, p4: top 3 = p0 p1 p2 -> hit p0, recall 1/2
    [0.1, 0.2, 0.9, 0.8, 0.7, 0.0],  # r1 holds p1: top 3 = p2 p3 p4 -> no hit, recall@10 1 (6 products)
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # r2 holds p2 p3 p5, all tied: irrelevant first -> top 3 = p0 p1 p4
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.9],  # r3 holds p5: top 1
]
EXPECTED_HITS = {"r0": ["p0"], "r1": [], "r2": [], "r3": ["p5"]}


def test_report_marks_exactly_the_hits_in_each_rooms_top_k(tmp_path, catalogue):
    result = _evaluation(catalogue, SCORES)
    index = write_report(tmp_path / "report", result, *catalogue, sample_rooms=10, k=3)
    page = Page(index.read_text(encoding="utf-8"))
    assert page.rooms == ["r0", "r1", "r2", "r3"]
    assert page.hits == EXPECTED_HITS
    assert page.shown["r0"] == ["p0", "p1", "p2"] and page.shown["r2"] == ["p0", "p1", "p4"]
    # per-room Recall@10 over a 6-product catalogue: every product is in the top 10
    assert page.recalls == ["1.000"] * 4
    page_k1 = Page(write_report(tmp_path / "k1", result, *catalogue, k=1).read_text(encoding="utf-8"))
    assert page_k1.hits == {"r0": ["p0"], "r1": [], "r2": [], "r3": ["p5"]}
    assert all(len(shown) == 1 for shown in page_k1.shown.values())


def test_per_room_recall_is_the_metric_of_that_room(tmp_path, catalogue):
    products, rooms, pairs = catalogue
    wide = [Product(product_id=f"x{j}", image=products[0].image, title=f"filler {j}", category="rug",
                    description="", attributes={}) for j in range(12)]
    scores = np.hstack([np.asarray(SCORES), np.full((4, 12), 0.6)])  # 12 fillers above every 0.5 and below 0.7
    result = retrieval_metrics(scores, relevance(rooms, products + wide, pairs), products + wide, rooms)
    page = Page(write_report(tmp_path / "report", result, products + wide, rooms, pairs).read_text(encoding="utf-8"))
    expected = metrics.relevant_ranks(scores, relevance(rooms, products + wide, pairs)).recall_at_k(10)
    assert page.recalls == [f"{value:.3f}" for value in expected]
    assert expected.tolist() == [0.5, 0.0, 0.0, 1.0]  # r0: p0 1st, p4 14th; r1: p1 at 18; r2 tied at the bottom


def test_ranking_order_agrees_with_the_metrics_tie_rule():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.integers(0, 4, 30).astype(float)  # many ties
        relevant = rng.random(30) < 0.3
        relevant[rng.integers(0, 30)] = True
        order = report.ranking_order(scores, relevant)
        position = np.empty(30, dtype=int)
        position[order] = np.arange(1, 31)
        ranks = metrics.relevant_ranks(scores[None], relevant[None])
        valid = ranks.valid[0]
        assert position[ranks.items[0][valid]].tolist() == ranks.ranks[0][valid].tolist()


def test_room_sample_is_fixed_by_the_seed_and_thumbnails_live_in_the_folder(tmp_path, catalogue):
    result = _evaluation(catalogue, SCORES)
    first = Page(write_report(tmp_path / "a", result, *catalogue, sample_rooms=2, seed=3).read_text(encoding="utf-8"))
    again = Page(write_report(tmp_path / "b", result, *catalogue, sample_rooms=2, seed=3).read_text(encoding="utf-8"))
    assert len(first.rooms) == 2 and first.rooms == again.rooms and set(first.rooms) <= {"r0", "r1", "r2", "r3"}
    drawn = {tuple(Page(write_report(tmp_path / f"s{seed}", result, *catalogue, sample_rooms=2, seed=seed)
                        .read_text(encoding="utf-8")).rooms) for seed in range(8)}
    assert len(drawn) > 1  # the seed chooses the rooms
    assert first.images and all(re.fullmatch(r"thumbs/(room|product)-\d+\.jpg", src) for src in first.images)
    for src in set(first.images):
        with Image.open(tmp_path / "a" / src) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= report.ROOM_THUMB_PX
    text = (tmp_path / "a" / "index.html").read_text(encoding="utf-8")
    assert str(tmp_path / "photos") not in text  # no link to the source photos


def test_data_strings_are_escaped(tmp_path, catalogue):
    products, rooms, pairs = catalogue
    attack = '<script>alert("x")</script>'
    products = [Product(product_id='p0"><img src=x onerror=alert(1)>', image=products[0].image, title=attack,
                        category="<u>sofa</u>", description="", attributes={})] + products[1:]
    rooms = [Room(room_id=rooms[0].room_id, image=rooms[0].image, scene="<i>bed</i>", title=attack,
                  attributes={})] + rooms[1:]
    pairs = [(r, products[0].product_id if p == "p0" else p) for r, p in pairs]
    result = retrieval_metrics(np.asarray(SCORES), relevance(rooms, products, pairs), products, rooms)
    index = write_report(tmp_path / "report", result, products, rooms, pairs, k=3, title=attack,
                         table={attack: {"recall@10": 0.5}})
    text = index.read_text(encoding="utf-8")
    page = Page(text)
    assert not {"script", "u", "i"} & set(page.tags)
    assert attack not in text and html_escaped(attack) in text
    assert all(src.startswith("thumbs/") for src in page.images)  # the id did not inject an <img>
    assert page.hits["r0"] == [products[0].product_id]  # the id survives, as an attribute value


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_confusion_matrix_table(tmp_path):
    scenes = SceneEvaluation(accuracy=0.6, macro_f1=0.5, labels=["bedroom", "kitchen<x>"],
                             confusion=[[2, 1], [1, 1]], n_images=5)
    text = write_report(tmp_path / "report", scenes=scenes).read_text(encoding="utf-8")
    table = text[text.index("<table class=\"numbers confusion\""):]
    cells = [int(c) for c in re.findall(r"<td[^>]*>(\d+)</td>", table)]
    assert cells == [2, 1, 3, 1, 1, 2]  # each row: its counts, then its total
    assert "kitchen&lt;x&gt;" in table and "kitchen<x>" not in text
    assert "Sampled rooms" not in text  # scenes only


@pytest.mark.slow
def test_confusion_matrix_of_a_real_scene_evaluation(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model("hgm-tiny", scene_labels=["bedroom", "kitchen"])
    from hgm_mm.data import SceneImage

    images = [SceneImage(image=_photo(tmp_path / f"s{i}.png", (60 * i, 90, 30)), scene=["bedroom", "kitchen"][i % 2])
              for i in range(4)]
    scenes = evaluate_scenes(model, images, progress=False, num_workers=0)
    text = write_report(tmp_path / "report", scenes=scenes).read_text(encoding="utf-8")
    diagonal = [int(c) for c in re.findall(r"<td class=\"diagonal\"[^>]*>(\d+)</td>", text)]
    assert len(diagonal) == len(scenes.labels)
    assert sum(diagonal) == round(scenes.accuracy * scenes.n_images)


def test_a_failed_write_leaves_no_partial_folder_and_keeps_the_earlier_report(tmp_path, catalogue, monkeypatch):
    result = _evaluation(catalogue, SCORES)
    target = tmp_path / "report"

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "_confusion_section", broken)
    scenes = SceneEvaluation(accuracy=1.0, macro_f1=1.0, labels=["a"], confusion=[[1]], n_images=1)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(target, result, *catalogue, scenes=scenes)
    assert not target.exists() and list(tmp_path.iterdir()) == [tmp_path / "photos"]

    monkeypatch.undo()
    write_report(target, result, *catalogue, k=2)
    before = (target / "index.html").read_text(encoding="utf-8")
    monkeypatch.setattr(report, "_confusion_section", broken)
    with pytest.raises(RuntimeError):
        write_report(target, result, *catalogue, scenes=scenes)
    assert (target / "index.html").read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "report"]


def test_refuses_to_replace_a_folder_that_is_not_a_report(tmp_path, catalogue):
    result = _evaluation(catalogue, SCORES)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="not an hgm_mm report"):
        write_report(run, result, *catalogue)
    with pytest.raises(ValueError, match="not an hgm_mm report"):
        check_report_folder(run)
    assert (run / "model.safetensors").read_bytes() == b"weights"
    check_report_folder(tmp_path / "new")  # new, empty and earlier reports may be written
    (tmp_path / "empty").mkdir()
    check_report_folder(tmp_path / "empty")
    check_report_folder(write_report(tmp_path / "earlier", result, *catalogue).parent)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_report_folder(tmp_path / "file")


def test_refuses_inputs_that_do_not_match_the_evaluation(tmp_path, catalogue):
    products, rooms, pairs = catalogue
    result = _evaluation(catalogue, SCORES)
    with pytest.raises(ValueError, match="scored 6 products but the catalogue given has 5"):
        write_report(tmp_path / "r", result, products[:5], rooms, pairs)
    with pytest.raises(ValueError, match=r"\['r3'\] are not among the rooms given"):
        write_report(tmp_path / "r", result, products, rooms[:3], pairs)
    rebuilt = type(result)(**{**result.__dict__, "scores": None})
    with pytest.raises(ValueError, match="carries no score matrix"):
        write_report(tmp_path / "r", rebuilt, products, rooms, pairs)
    with pytest.raises(ValueError, match="nothing to report"):
        write_report(tmp_path / "r")
    with pytest.raises(ValueError, match="k=0"):
        write_report(tmp_path / "r", result, products, rooms, pairs, k=0)
    assert not (tmp_path / "r").exists()


def test_report_of_a_model_evaluation(tmp_path, catalogue):
    products, rooms, pairs = catalogue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model("hgm-tiny")
    (tmp_path / "photos" / "r3.png").write_bytes(b"not a photo")  # skipped by evaluate, so not in the report
    result = hgm_mm.evaluate(model, products, rooms, pairs, progress=False, num_workers=0)
    assert result.room_ids == ["r0", "r1", "r2"] and result.scores.shape == (3, 6)
    page = Page(write_report(tmp_path / "report", result, products, rooms, pairs, k=4).read_text(encoding="utf-8"))
    assert page.rooms == ["r0", "r1", "r2"]
    order = np.argsort(-result.scores, axis=1, kind="stable")[:, :4]
    relevant = relevance([rooms[i] for i in range(3)], products, pairs)
    for i, room_id in enumerate(page.rooms):
        assert set(page.hits[room_id]) == {products[j].product_id for j in order[i] if relevant[i, j]}
    assert json.loads(json.dumps(result.to_dict()))["n_rooms"] == 3  # the score matrix stays out of the JSON


def test_report_on_real_ikea_rooms(tmp_path):
    ikea = DATA / "ikea" if (DATA / "ikea").is_dir() else DATA
    if not (ikea / "rooms.jsonl").is_file():
        pytest.skip(f"IKEA data not found at {ikea}: set HGM_DATA to the shared data folder")
    dataset = load_dataset(ikea)
    rooms = dataset.rooms[:6]
    positives = dataset.positives()
    wanted = {pid for room in rooms for pid in positives.get(room.room_id, [])}
    products = [p for p in dataset.products if p.product_id in wanted] + dataset.products[:60]
    products = list({p.product_id: p for p in products}.values())
    relevant = relevance(rooms, products, dataset.pairs)
    scores = np.random.default_rng(0).random(relevant.shape)
    result = retrieval_metrics(scores, relevant, products, rooms)
    index = write_report(tmp_path / "report", result, products, rooms, dataset.pairs, sample_rooms=4)
    page = Page(index.read_text(encoding="utf-8"))
    assert len(page.rooms) == 4 and all(len(shown) == 10 for shown in page.shown.values())
    sizes = [(tmp_path / "report" / src).stat().st_size for src in set(page.images)]
    assert max(sizes) < 80_000  # small JPEGs, not copies of the 1024-px photos
