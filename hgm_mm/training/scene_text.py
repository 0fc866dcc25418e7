"""Training the scene-text classifier (`hgm_mm.models.scene_text.SceneTextClassifier`) on scene-labelled words.

The frozen lower layers of the scene-text tower run once per text; the epochs run the classifier's
own top layers and head on that cache. Training texts are what the caller gives (`texts.jsonl`
rows, room captions) plus, by default, the scene vocabulary's descriptions, which keep every
scene represented however few texts a dataset has for it. With validation texts, the classifier's
temperature (`config.text_scene_temperature`) is fitted on them afterwards (`calibration.fit_temperature`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.records import SceneText
from ..data.scenes import scene_descriptions
from ..models.calibration import fit_temperature
from .optim import adamw, warmup_cosine


@dataclass
class SceneTextTrainResult:
    """What `train_scene_texts` did and measured."""

    history: list[dict[str, float]]  # one row per epoch: epoch, loss, train_accuracy (+ val_accuracy)
    val_accuracy: float | None  # after training, calibrated model; None without validation texts
    start_val_accuracy: float | None  # before training (the description-initialised classifier)
    n_train: int
    n_val: int
    temperature: float  # `config.text_scene_temperature` afterwards
    left_out: list[str] = field(default_factory=list)  # scenes of texts that are not model labels

    def to_dict(self) -> dict:
        return {"history": self.history, "val_accuracy": self.val_accuracy,
                "start_val_accuracy": self.start_val_accuracy, "n_train": self.n_train, "n_val": self.n_val,
                "temperature": self.temperature, "left_out": self.left_out}


def train_scene_texts(model, texts: Sequence[SceneText], *, val_texts: Sequence[SceneText] | None = None,
                      with_descriptions: bool = True, epochs: int = 10, lr: float = 1e-5, head_lr: float = 1e-3,
                      batch_size: int = 32, label_smoothing: float = 0.1, weight_decay: float = 0.01,
                      seed: int = 0, calibrate: bool = True, progress: bool = True) -> SceneTextTrainResult:
    """Tunes the model's scene-text classifier (its copied top layers and head), in place.

    Args:
        model: an `HGMModel` with a scene-text classifier (`config.scene_text_layers` set).
        texts: labelled phrases; scenes outside `model.scene_labels` are left out and listed.
        val_texts: measured before and after training, and the temperature is fitted on them.
        with_descriptions: also train on the scene vocabulary's descriptions of every label.
        epochs: passes over the training texts.
        lr: peak learning rate of the copied transformer layers (AdamW, warm-up then cosine).
        head_lr: peak learning rate of the head.
        batch_size: texts per step.
        label_smoothing: of the cross-entropy.
        weight_decay: AdamW decay of the weight matrices.
        seed: order of the texts; the same seed gives the same weights.
        calibrate: fit the temperature on `val_texts` (kept at 1 without them).
        progress: show a progress bar.

    Raises:
        ValueError: the model has no scene-text classifier, or no text has a known scene.
    """
    from tqdm.auto import tqdm

    classifier = model.scene_text_classifier
    if classifier is None:
        raise ValueError(f"model {model.config.name!r} has no scene-text classifier (scene_text_layers is null); "
                         "create it with scene_text_layers set")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected an int >= 1")
    for name, value in (("lr", lr), ("head_lr", head_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r}; expected a finite number > 0")
    label_index = {label: i for i, label in enumerate(model.scene_labels)}
    rows = [(t.text, t.scene) for t in texts if t.text]
    if with_descriptions:
        rows += [(d, label) for label in model.scene_labels for d in scene_descriptions(label)]
    left_out = sorted({scene for _, scene in rows if scene not in label_index})
    rows = [(text, label_index[scene]) for text, scene in rows if scene in label_index]
    if not rows:
        raise ValueError("no training text has a scene among the model's labels "
                         f"{list(model.scene_labels)}; check the 'scene' of the texts")
    val_rows = [(t.text, label_index[t.scene]) for t in (val_texts or []) if t.text and t.scene in label_index]

    tower = model.scene_text_tower or model.text_tower
    model.eval()
    train_hidden, train_mask = _lower_hidden(model, classifier, tower, [t for t, _ in rows])
    train_labels = torch.tensor([y for _, y in rows])
    val_cache = _lower_hidden(model, classifier, tower, [t for t, _ in val_rows]) if val_rows else None
    val_labels = torch.tensor([y for _, y in val_rows]) if val_rows else None
    start_accuracy = _accuracy(classifier, *val_cache, val_labels) if val_cache else None

    trained = list(classifier.parameters())
    requires_grad = [p.requires_grad for p in trained]
    for p in trained:
        p.requires_grad_(True)
    # no decay on the head: its weights are the scene descriptions' vectors at their fitted scale
    optimizer = adamw([(classifier.layers, lr)], weight_decay, undecayed=[(classifier.head, head_lr)])
    total = epochs * math.ceil(len(rows) / batch_size)
    schedule = warmup_cosine(optimizer, total, total // 10, decay_from="start")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout inside the copied layers
    history = []
    try:
        for epoch in tqdm(range(epochs), desc="scene-text training", unit="epoch", disable=not progress):
            classifier.train()
            order = torch.randperm(len(rows), generator=generator)
            loss_sum, correct = 0.0, 0
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                features = classifier.features(train_hidden[batch].to(model.device), train_mask[batch].to(model.device))
                logits = classifier.logits(features)
                labels = train_labels[batch].to(model.device)
                loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(batch)
                correct += int((logits.argmax(1) == labels).sum())
            row = {"epoch": epoch + 1, "loss": loss_sum / len(rows), "train_accuracy": correct / len(rows)}
            if val_cache:
                row["val_accuracy"] = _accuracy(classifier, *val_cache, val_labels)
            history.append(row)
    finally:
        for p, flag in zip(trained, requires_grad):
            p.requires_grad_(flag)
        classifier.eval()
    if calibrate and val_cache:
        with torch.no_grad():
            logits = classifier.logits(classifier.features(*[x.to(model.device) for x in val_cache]))
        model.config.text_scene_temperature = fit_temperature(logits.cpu(), val_labels)
    return SceneTextTrainResult(
        history=history, val_accuracy=_accuracy(classifier, *val_cache, val_labels) if val_cache else None,
        start_val_accuracy=start_accuracy, n_train=len(rows), n_val=len(val_rows),
        temperature=model.config.text_scene_temperature, left_out=left_out)


@torch.no_grad()
def _lower_hidden(model, classifier, tower, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, H) hidden states entering the classifier's layers, and the (N, T) attention mask."""
    tokens = {k: v.to(model.device) for k, v in model.scene_tokenizer(texts).items()}
    hidden = torch.cat([classifier.lower_hidden(tower, {k: v[i:i + 64] for k, v in tokens.items()})
                        for i in range(0, len(texts), 64)])
    return hidden.cpu(), tokens["attention_mask"].cpu()


@torch.no_grad()
def _accuracy(classifier, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = classifier.training
    classifier.eval()
    device = classifier.head.weight.device
    predicted = classifier.logits(classifier.features(hidden.to(device), mask.to(device))).argmax(1).cpu()
    classifier.train(was_training)
    return float((predicted == labels).float().mean())
