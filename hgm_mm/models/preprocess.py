"""How to feed a model: image transforms and tokenizers, both built from the model's config."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .config import ROOM_VIEW_KINDS, ImageTowerConfig


def build_image_transform(cfg: ImageTowerConfig):
    """PIL RGB image -> normalised tensor (3, S, S): resize the shorter side, centre crop, normalise."""
    from torchvision import transforms as T

    interpolation = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    resize_to = int(round(cfg.image_size / cfg.crop_pct))
    return T.Compose([
        T.Resize(resize_to, interpolation=interpolation[cfg.interpolation]),
        T.CenterCrop(cfg.image_size),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


class RoomViews:
    """A room photo -> the tower inputs of its views: for each grid g, g x g tiles.

    "crops" (the default): each tile resized to S x S, (V, 3, S, S) with V = sum of g * g. Tiles are
    resized whole (not cropped) so no part of the room is lost; grid 1 is the photo.
    "feature_map": the whole photo resized to `map_size` x `map_size`, (1, 3, M, M); the tiles are
    cells of the tower's feature map, pooled by `TimmImageTower.region_features`.
    """

    def __init__(self, cfg: ImageTowerConfig, grids: tuple[int, ...], *, kind: str = "crops",
                 map_size: int | None = None):
        from torchvision import transforms as T

        if kind not in ROOM_VIEW_KINDS:
            raise ValueError(f"RoomViews kind={kind!r}; expected one of {list(ROOM_VIEW_KINDS)}")
        self.grids = grids
        self.kind = kind
        self.size = cfg.image_size if kind == "crops" else int(map_size or cfg.image_size)
        self.interpolation = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[
            cfg.interpolation]
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])

    @property
    def n_views(self) -> int:
        """View vectors per room."""
        return sum(g * g for g in self.grids)

    @property
    def n_passes(self) -> int:
        """Tower inputs per room: one per view, or one photo whose feature map holds them all."""
        return self.n_views if self.kind == "crops" else 1

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        if self.kind == "feature_map":
            whole = TF.resize(image, [self.size, self.size], interpolation=self.interpolation)
            return self.to_tensor(whole).unsqueeze(0)  # (1, 3, M, M)
        width, height = image.size
        views = []
        for g in self.grids:
            for row in range(g):
                for col in range(g):
                    box = (round(col * width / g), round(row * height / g),
                           round((col + 1) * width / g), round((row + 1) * height / g))
                    tile = image.crop(box) if g > 1 else image
                    views.append(self.to_tensor(TF.resize(tile, [self.size, self.size],
                                                          interpolation=self.interpolation)))
        return torch.stack(views)  # (V, 3, S, S)


class WholePhoto:
    """A PIL photo -> the whole photo resized to `size` x `size` and normalised (3, S, S), as the
    whole-photo view of `RoomViews` (no part is cropped away: a scene fills the frame)."""

    def __init__(self, cfg: ImageTowerConfig, size: int | None = None):
        import dataclasses

        self.views = RoomViews(dataclasses.replace(cfg, image_size=size or cfg.image_size), (1,))

    def __call__(self, image) -> torch.Tensor:
        return self.views(image)[0]

class TextTokenizer:
    """Texts -> the tensors a text tower reads: {"input_ids": (B, T), "attention_mask": (B, T)}.

    Wraps a transformers tokenizer (`kind="hf"`) or an open_clip tokenizer (`kind="open_clip"`),
    adding the tower's prefix and length limit so callers only pass strings.
    """

    def __init__(self, backend: Any, *, kind: str, max_length: int, prefix: str = ""):
        if kind not in ("hf", "open_clip"):
            raise ValueError(f"TextTokenizer kind={kind!r}; expected 'hf' or 'open_clip'")
        self.backend = backend
        self.kind = kind
        self.max_length = max_length
        self.prefix = prefix

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}; expected str")
        texts = [self.prefix + t for t in texts]
        if self.kind == "open_clip":
            input_ids = self.backend(texts)  # (B, context_length)
            return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}
        encoded = self.backend(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def save(self, folder: Path) -> None:
        """Writes the tokenizer files (transformers tokenizers; open_clip ones live with their config)."""
        if self.kind == "hf":
            self.backend.save_pretrained(str(folder))
