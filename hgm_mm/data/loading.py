"""Photo files decoded into model input, in DataLoader workers: the one decoding path of embedding,
training's feature caches and evaluation.

`PhotoDecoder` applies `load_image`'s policy (EXIF, modes, truncation, bombs) and, where asked,
decodes a JPEG at a reduced DCT scale first (`open_drafted`); `PhotoFiles` reports an unreadable
photo instead of raising, so one bad file never stops a long pass.
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch.utils.data import Dataset

from .images import DEFAULT_MAX_PIXELS, ImageError, load_image

if TYPE_CHECKING:
    import PIL.Image


class PhotoDecoder:
    """A photo path -> model input pixels: `load_image`'s policy, optionally JPEG draft decoding."""

    def __init__(self, transform: Callable, draft_side: int | None = None):
        self.transform = transform
        self.draft_side = draft_side

    def __call__(self, source: str | os.PathLike) -> torch.Tensor:
        image = open_drafted(source, self.draft_side) if self.draft_side else None
        return self.transform(image if image is not None else load_image(source))


def open_drafted(source: str | os.PathLike, min_side: int) -> PIL.Image.Image | None:
    """A JPEG decoded at the smallest DCT scale whose both sides stay >= `min_side`, as RGB.

    Returns None for anything but a plain, healthy JPEG within `DEFAULT_MAX_PIXELS`: the caller
    then uses `load_image`, which decodes it in full or raises its `ImageError`.
    """
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if img.format != "JPEG" or width * height > DEFAULT_MAX_PIXELS:
                    return None
                img.draft(None, (min_side, min_side))  # keeps the mode; sets the DCT scale
                img.load()
                img = ImageOps.exif_transpose(img)  # a copy, independent of the file
    except Exception:  # any failure is reported by load_image, with its message
        return None
    if img.mode == "RGB":
        return img
    return img.convert("RGB") if img.mode in ("L", "CMYK") else None  # load_image's policy for JPEG modes


DRAFT_HEADROOM = 2  # a drafted photo keeps both sides >= this many times what the transform needs


def draft_side(transform: Callable) -> int | None:
    """The smallest image side a JPEG draft may leave for `transform`, or None when unknown."""
    from torchvision import transforms as T

    from ..models.preprocess import RoomViews

    if isinstance(transform, RoomViews):
        if transform.kind == "feature_map":  # the whole photo at M x M
            return DRAFT_HEADROOM * transform.size
        return DRAFT_HEADROOM * max(transform.grids) * transform.size  # tiles of the finest grid cover S x S
    if isinstance(transform, T.Compose) and transform.transforms:
        first = transform.transforms[0]
        if type(first) is T.Resize and first.max_size is None:
            size = first.size if isinstance(first.size, int) else (first.size[0] if len(first.size) == 1 else None)
            return DRAFT_HEADROOM * size if size else None
    return None


def split_normalisation(transform: Callable) -> tuple[Callable, list[float], list[float]] | None:
    """Compose([..., ToTensor(), Normalize(mean, std)]) -> (the PIL steps ending in uint8, mean, std)."""
    from torchvision import transforms as T

    if not isinstance(transform, T.Compose) or len(transform.transforms) < 2:
        return None
    *head, to_tensor, normalize = transform.transforms
    if type(to_tensor) is not T.ToTensor or type(normalize) is not T.Normalize:
        return None
    return T.Compose([*head, T.PILToTensor()]), list(normalize.mean), list(normalize.std)


def normaliser(mean: list[float], std: list[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import functional as TF

    def normalise(pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) uint8 -> float
        return TF.normalize(pixels.to(torch.float32).div(255), mean, std)  # ToTensor's then Normalize's arithmetic

    return normalise


class PhotoFiles(Dataset):
    """Photo files read in DataLoader workers: item i -> (i, decode(photo) or None, (photo, reason) or None).

    An unreadable photo is reported, not raised, so one bad file never stops a long pass.
    """

    def __init__(self, sources: Sequence[str | os.PathLike | None], decode: Callable):
        self.sources = sources
        self.decode = decode

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        source = self.sources[i]
        if source is None:  # an item without a photo: neither pixels nor a problem
            return i, None, None
        try:
            return i, self.decode(source), None
        except ImageError as err:
            return i, None, (err.source, err.problem)
