"""A visual evaluation report: one self-contained HTML folder to look at what a model retrieves.

    report/
      index.html          the metrics table, sampled rooms beside their top products, scene confusion
      thumbs/*.jpg        small JPEG copies of the photos shown (never links to the source photos)
      .hgm-mm-report      marks the folder as a report, so that writing one again may replace it

Every string that comes from data (ids, titles, categories, scene labels, model names) is
escaped. The folder is written beside its final place and swapped in whole, so a failure never
leaves a half-written report.
"""
from __future__ import annotations

import html
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import ImageError, load_image
from ..data.records import Product, Room
from ..files import atomic_dir
from . import metrics
from .evaluate import RetrievalEvaluation, SceneEvaluation, relevance

REPORT_MARKER = ".hgm-mm-report"
ROOM_THUMB_PX = 360  # longest side of a room photo in the report
PRODUCT_THUMB_PX = 150
JPEG_QUALITY = 82
# metric columns shown first, in this order; any other metric of the table follows
LEADING_COLUMNS = ("recall@10", "recall@50", "ndcg@10", "map", "hit_rate@10", "category_hit_rate@10")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table.numbers { border-collapse: collapse; margin: .5em 0; }
table.numbers th, table.numbers td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
table.numbers th:first-child, table.numbers td:first-child { text-align: left; }
.room { display: flex; gap: 1em; border-top: 1px solid #ddd; padding: 1em 0; }
.room-photo { flex: 0 0 auto; width: 360px; }
.room-photo img { max-width: 360px; }
.products { display: flex; flex-wrap: wrap; gap: .5em; align-content: flex-start; }
.product { width: 150px; font-size: .8em; border: 3px solid transparent; padding: 2px; }
.product img { width: 150px; height: 150px; object-fit: contain; background: #fafafa; }
.product.hit { border-color: #1a9641; background: #eef8f0; }
.missing { width: 150px; height: 150px; display: flex; align-items: center; justify-content: center;
           background: #eee; color: #888; }
.hit-mark { color: #1a9641; font-weight: bold; }
.missed { font-size: .85em; color: #555; }
table.confusion td.diagonal { font-weight: bold; outline: 2px solid #1a9641; }
"""


@dataclass
class _Thumbnails:
    """Writes each photo once as a small JPEG under `folder/thumbs`; names never come from data."""

    folder: Path
    written: dict[tuple[str, int], str | None]

    def get(self, kind: str, number: int, source: Path, size: int) -> str | None:
        """The relative path of the thumbnail, or None when the photo cannot be read."""
        key = (kind, number)
        if key not in self.written:
            try:
                image = load_image(source)
            except ImageError:
                self.written[key] = None
            else:
                image.thumbnail((size, size))
                relative = f"thumbs/{kind}-{number}.jpg"
                image.save(self.folder / relative, format="JPEG", quality=JPEG_QUALITY, optimize=True)
                self.written[key] = relative
        return self.written[key]


def write_report(folder: str | os.PathLike, result: RetrievalEvaluation | None = None,
                 catalog: Sequence[Product] = (), rooms: Sequence[Room] = (),
                 pairs: Sequence[tuple[str, str]] = (), *, table: Mapping[str, Mapping[str, float]] | None = None,
                 scenes: SceneEvaluation | None = None, title: str = "hgm_mm evaluation",
                 sample_rooms: int = 12, k: int = 10, seed: int = 0) -> Path:
    """Writes `folder/index.html` and its thumbnails, replacing an earlier report in `folder`.

    Args:
        folder: the report folder; created, or replaced when it holds an earlier report. A folder
            that exists and holds anything else is refused rather than overwritten.
        result: the model's evaluation from `evaluate` (it carries the score matrix); None for a
            report of scenes only.
        catalog: the products `result` ranked, in the same order (the columns of its scores).
        rooms: the query rooms given to `evaluate` (a superset of the rooms it evaluated).
        pairs: (room_id, product_id) ground truth: the products each room holds.
        table: metrics by model or baseline name for the overall table (default: the model's own).
        scenes: a scene evaluation from `evaluate_scenes`, drawn as a confusion matrix.
        title: heading of the page.
        sample_rooms: how many evaluated rooms to show, drawn with `seed`.
        k: products shown per room; hits are the room's products among them.
        seed: seed of the room sample, so that reports of two models show the same rooms.

    Returns:
        The path of `index.html`.
    """
    folder = Path(folder)
    if result is None and scenes is None:
        raise ValueError("nothing to report: give a retrieval evaluation, a scene evaluation, or both")
    for name, value in (("sample_rooms", sample_rooms), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"write_report: {name}={value!r}; expected an int >= 1")
    if result is not None:
        _check_result(result, catalog, rooms)
    check_report_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        (tmp / "thumbs").mkdir()
        thumbnails = _Thumbnails(tmp, {})
        sections = [f"<h1>{_text(title)}</h1>"]
        if result is not None:
            sections.append(_summary(result))
            sections.append(_metrics_table(table if table is not None else {"model": result.metrics}))
            sections.append(_scene_breakdown(result))
            sections.append(_rooms_section(result, catalog, rooms, pairs, thumbnails,
                                           sample_rooms=sample_rooms, k=k, seed=seed))
        if scenes is not None:
            sections.append(_confusion_section(scenes))
        page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{_text(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
                + "\n".join(sections) + "\n</body>\n</html>\n")
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / REPORT_MARKER).write_text("written by hgm_mm.evaluation.write_report\n", encoding="utf-8")

    atomic_dir(folder, write)
    return folder / "index.html"


def _check_result(result: RetrievalEvaluation, catalog: Sequence[Product], rooms: Sequence[Room]) -> None:
    if result.scores is None:
        raise ValueError("the retrieval evaluation carries no score matrix; pass the result of "
                         "hgm_mm.evaluate (not one rebuilt from JSON)")
    n_rows, n_columns = result.scores.shape
    if n_columns != len(catalog):
        raise ValueError(f"the evaluation scored {n_columns} products but the catalogue given has {len(catalog)}; "
                         "pass the catalogue the evaluation ranked, in the same order")
    if n_rows != len(result.room_ids):
        raise ValueError(f"the evaluation has {n_rows} score rows but {len(result.room_ids)} room ids")
    known = {room.room_id for room in rooms}
    unknown = [room_id for room_id in result.room_ids if room_id not in known]
    if unknown:
        raise ValueError(f"evaluated room(s) {unknown[:5]} are not among the rooms given; pass the rooms "
                         "given to evaluate")


def check_report_folder(folder: str | os.PathLike) -> None:
    """Raises ValueError unless `folder` is new, empty or an earlier report, the folders a report may replace.

    `write_report` checks this itself; call it first to fail before a long evaluation.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"report folder {folder} is a file; choose a folder path")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / REPORT_MARKER).is_file():
        raise ValueError(f"report folder {folder} exists and holds files that are not an hgm_mm report; "
                         "choose an empty or new folder (a report replaces its whole folder)")


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _summary(result: RetrievalEvaluation) -> str:
    skipped = f", {len(result.skipped)} unreadable photos skipped" if result.skipped else ""
    return (f"<p>{result.n_rooms} rooms ranked against the whole catalogue of {result.n_products} "
            f"products{skipped}.</p>")


def _number(value: object) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return _text(value)


def _metrics_table(table: Mapping[str, Mapping[str, float]]) -> str:
    present = {column for values in table.values() for column in values}
    columns = [c for c in LEADING_COLUMNS if c in present]
    columns += sorted(present - set(columns))
    head = "".join(f"<th>{_text(c)}</th>" for c in ["model", *columns])
    rows = []
    for name, values in table.items():
        cells = "".join(f"<td>{_number(values[c]) if c in values else ''}</td>" for c in columns)
        rows.append(f"<tr><td>{_text(name)}</td>{cells}</tr>")
    return (f"<h2>Metrics</h2>\n<table class=\"numbers metrics\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _scene_breakdown(result: RetrievalEvaluation) -> str:
    if not result.by_scene:
        return ""
    rows = "".join(f"<tr><td>{_text(scene)}</td><td>{_number(values.get('rooms', ''))}</td>"
                   f"<td>{_number(values.get('recall@10', ''))}</td><td>{_number(values.get('ndcg@10', ''))}</td></tr>"
                   for scene, values in result.by_scene.items())
    return ("<h2>By scene</h2>\n<table class=\"numbers by-scene\"><thead><tr><th>scene</th><th>rooms</th>"
            f"<th>recall@10</th><th>ndcg@10</th></tr></thead><tbody>{rows}</tbody></table>")


def ranking_order(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(N,) catalogue indices from best to worst under the metrics' pessimistic tie rule.

    Among equal scores irrelevant products come first, then relevant ones by ascending index,
    so a product is shown as a hit in the top k exactly when the metrics count it as one.
    """
    return np.lexsort((np.arange(scores.size), relevant, -scores))


def _rooms_section(result: RetrievalEvaluation, catalog: Sequence[Product], rooms: Sequence[Room],
                   pairs: Sequence[tuple[str, str]], thumbnails: _Thumbnails, *, sample_rooms: int, k: int,
                   seed: int) -> str:
    rows = sorted(random.Random(seed).sample(range(len(result.room_ids)), min(sample_rooms, len(result.room_ids))))
    room_by_id = {room.room_id: room for room in rooms}
    sampled = [room_by_id[result.room_ids[row]] for row in rows]
    scores = np.asarray(result.scores)[rows]  # (S, N)
    relevant = relevance(sampled, catalog, pairs)  # (S, N)
    if not relevant.any(axis=1).all():
        missing = [room.room_id for room, has in zip(sampled, relevant.any(axis=1)) if not has]
        raise ValueError(f"room(s) {missing[:5]} have no product of the catalogue in the pairs given; "
                         "pass the pairs given to evaluate")
    ranks = metrics.relevant_ranks(scores, relevant)
    recall_at_10 = ranks.recall_at_k(10)  # (S,)
    blocks = [f"<h2>Sampled rooms</h2>\n<p>{len(rows)} of {len(result.room_ids)} rooms (seed {seed}); "
              f"each room's top {k} products, <span class=\"hit-mark\">&#10003; hits</span> are products "
              "that appear in the room.</p>"]
    for s, (row, room) in enumerate(zip(rows, sampled)):
        order = ranking_order(scores[s], relevant[s])
        cards = [_product_card(catalog[column], int(column), rank, float(scores[s, column]),
                               bool(relevant[s, column]), thumbnails)
                 for rank, column in enumerate(order[:k], 1)]
        valid = ranks.valid[s]
        missed = sorted((int(r), int(j)) for r, j in zip(ranks.ranks[s][valid], ranks.items[s][valid]) if r > k)
        missed_text = ("" if not missed else "<p class=\"missed\">in the room, not in the top "
                       f"{k}: " + "; ".join(f"{_text(catalog[j].title)} (#{r})" for r, j in missed) + "</p>")
        photo = _image(thumbnails.get("room", row, room.image, ROOM_THUMB_PX), room.title)
        hits = int(relevant[s, order[:k]].sum())
        blocks.append(
            f"<div class=\"room\" data-room-id=\"{_text(room.room_id)}\">\n"
            f"<div class=\"room-photo\">{photo}<p><b>{_text(room.room_id)}</b> &middot; "
            f"{_text(room.scene or 'unknown')}<br>{_text(room.title)}<br>"
            f"Recall@10 <b class=\"recall\">{recall_at_10[s]:.3f}</b> &middot; "
            f"{hits} of {int(ranks.n_relevant[s])} products in the top {k}</p>{missed_text}</div>\n"
            f"<div class=\"products\">{''.join(cards)}</div>\n</div>")
    return "\n".join(blocks)


def _product_card(product: Product, column: int, rank: int, score: float, hit: bool,
                  thumbnails: _Thumbnails) -> str:
    image = _image(thumbnails.get("product", column, product.image, PRODUCT_THUMB_PX), product.title)
    mark = "<span class=\"hit-mark\">&#10003; hit</span> " if hit else ""
    card_class = "product hit" if hit else "product"
    return (f"<div class=\"{card_class}\" data-product-id=\"{_text(product.product_id)}\">"
            f"{image}<div>{mark}#{rank} {_text(product.title)}</div>"
            f"<div>{_text(product.category or '')} &middot; {score:.3f}</div></div>")


def _image(relative: str | None, alt: str) -> str:
    if relative is None:
        return "<div class=\"missing\">photo unreadable</div>"
    return f"<img src=\"{_text(relative)}\" alt=\"{_text(alt)}\" loading=\"lazy\">"


def _confusion_section(scenes: SceneEvaluation) -> str:
    labels, confusion = scenes.labels, np.asarray(scenes.confusion, dtype=np.int64)  # (L, L) [true][predicted]
    if confusion.shape != (len(labels), len(labels)):
        raise ValueError(f"scene evaluation: confusion matrix of shape {confusion.shape} for {len(labels)} labels")
    totals = confusion.sum(axis=1)
    head = "".join(f"<th>{_text(label)}</th>" for label in labels)
    rows = []
    for i, label in enumerate(labels):
        cells = []
        for j in range(len(labels)):
            share = confusion[i, j] / totals[i] if totals[i] else 0.0
            diagonal = " class=\"diagonal\"" if i == j else ""
            colour = "26, 150, 65" if i == j else "215, 48, 39"  # right in green, confusions in red
            cells.append(f"<td{diagonal} style=\"background: rgba({colour}, {share * 0.6:.3f})\" "
                         f"title=\"{share:.1%} of {_text(label)}\">{int(confusion[i, j])}</td>")
        rows.append(f"<tr><th>{_text(label)}</th>{''.join(cells)}<td>{int(totals[i])}</td></tr>")
    return (f"<h2>Scenes</h2>\n<p>{scenes.n_images} photos: accuracy {scenes.accuracy:.4f}, "
            f"macro-F1 {scenes.macro_f1:.4f}. Rows: true scene; columns: predicted scene.</p>\n"
            f"<table class=\"numbers confusion\"><thead><tr><th>true \\ predicted</th>{head}<th>photos</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")
