"""The hgm_mm model: image, text and scene-text towers projected into one space, fused, with a scene head."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fusion import GatedFusion
from .folder import (OPEN_CLIP_DIR, SCENE_TOKENIZER_DIR, TOKENIZER_DIR, check_state_matches, read_model_folder,
                           resolve_model_folder, write_model_folder)
from .preprocess import RoomViews, TextTokenizer, build_image_transform
from .scene_heads import scene_reader
from .scene_text import SceneTextClassifier, transformer_layers
from .towers import build_hf_text_tower, build_open_clip_towers
from .towers.open_clip_tower import save_open_clip_config
from .towers.timm_tower import TimmImageTower

if TYPE_CHECKING:
    from .model_card import TrainingRecord

MAP_PASS_ROOMS = 8  # "feature_map" room photos per tower pass at inference
VIEW_PASS_IMAGES = 64  # room views per tower pass at inference: memory stays flat however many views a room has

ImageInput = Any  # a tensor (B, 3, H, W) or (3, H, W), a PIL image, a path, or a sequence of them
TextInput = Any  # a string, a sequence of strings, or a tokenizer output dict


@dataclass
class HGMOutput:
    """What `HGMModel.forward` computes; a field is None when its inputs were not given."""

    room_embeds: torch.Tensor | None = None  # (R, D) fused room image + scene text, unit norm
    room_view_embeds: torch.Tensor | None = None  # (R, V, D) one unit vector per view of the room photo
    scene_logits: torch.Tensor | None = None  # (R, S) over `config.scene_labels`, from `scene_head` on the room vector
    room_image_embeds: torch.Tensor | None = None  # (R, D)
    room_text_embeds: torch.Tensor | None = None  # (R, D) scene text, rows without text are zero
    product_embeds: torch.Tensor | None = None  # (P, D) fused product photo + product text
    product_image_embeds: torch.Tensor | None = None  # (P, D)
    product_text_embeds: torch.Tensor | None = None  # (P, D)
    logit_scale: torch.Tensor | None = None  # scalar, already exponentiated


class HGMModel(nn.Module):
    """Rooms and products in one embedding space.

    Build one with `hgm_mm.create_model(name)` or `hgm_mm.load_model(folder)`. All `encode_*`
    methods return L2-normalised (B, embed_dim) tensors and accept raw inputs (PIL images,
    paths, strings) or ready tensors; they keep the caller's grad mode, so wrap inference in
    `torch.no_grad()`.
    """

    def __init__(self, config: ModelConfig, *, load_weights: bool = True, folder: Path | None = None):
        """Builds the architecture of `config`.

        Args:
            config: the model config.
            load_weights: fetch the towers' pretrained weights named in the config; False leaves
                them random (a saved model then loads its own weights).
            folder: a saved model folder to read tokenizers and open_clip configs from.
        """
        super().__init__()
        config = copy.deepcopy(config)  # tower builders fill in resolved fields; the caller's copy stays
        embed_dim = config.embed_dim
        self.open_clip_config: dict | None = None
        if config.image_tower.source == "open_clip":
            parts = build_open_clip_towers(
                config.image_tower, load_weights=load_weights,
                config_dir=folder / OPEN_CLIP_DIR if folder is not None else None)
            config.image_tower = parts.image_config
            self.image_tower, self.text_tower = parts.image_tower, parts.text_tower
            self.open_clip_config = parts.open_clip_config
            text_backend, init_logit_scale = parts.tokenizer, parts.logit_scale
            self.tower_pretrained = {"image_tower": parts.is_pretrained, "text_tower": parts.is_pretrained}
            tokenizer_kind = "open_clip"
        else:
            self.image_tower = TimmImageTower(config.image_tower, load_weights=load_weights)
            self.text_tower, text_backend, config.text_tower, text_pretrained = build_hf_text_tower(
                config.text_tower, load_weights=load_weights,
                tokenizer_dir=folder / TOKENIZER_DIR if folder is not None else None)
            init_logit_scale = config.init_logit_scale
            self.tower_pretrained = {"image_tower": self.image_tower.is_pretrained, "text_tower": text_pretrained}
            tokenizer_kind = "hf"
        self.tokenizer = TextTokenizer(text_backend, kind=tokenizer_kind, max_length=config.text_tower.max_length,
                                       prefix=config.text_tower.prefix)

        self.scene_text_tower = None
        self.scene_tokenizer = self.tokenizer
        if config.scene_text_tower is not None:
            self.scene_text_tower, scene_backend, config.scene_text_tower, scene_pretrained = build_hf_text_tower(
                config.scene_text_tower, load_weights=load_weights,
                tokenizer_dir=folder / SCENE_TOKENIZER_DIR if folder is not None else None)
            self.scene_tokenizer = TextTokenizer(scene_backend, kind="hf",
                                                 max_length=config.scene_text_tower.max_length,
                                                 prefix=config.scene_text_tower.prefix)
            self.tower_pretrained["scene_text_tower"] = scene_pretrained
        self.config = config

        scene_tower = self.scene_text_tower or self.text_tower
        self.image_proj = _projection(self.image_tower.output_dim, embed_dim, config.image_tower.projection)
        self.text_proj = _projection(self.text_tower.output_dim, embed_dim, config.text_tower.projection)
        scene_cfg = config.scene_text_tower or config.text_tower
        self.scene_text_proj = _projection(scene_tower.output_dim, embed_dim, scene_cfg.projection)
        self.room_fusion = GatedFusion(embed_dim, config.fusion)
        self.product_fusion = GatedFusion(embed_dim, config.fusion)
        self.scene_head = nn.Linear(embed_dim, len(config.scene_labels))
        self.scene_reader = scene_reader(config.scene_source)  # what `scene_logits` reads a photo with
        self.photo_scene_head = (nn.Linear(self.image_tower.output_dim, len(config.scene_labels))
                                 if self.scene_reader.source == "photo" else None)
        self.photo_scene_branch = _scene_branch(self.image_tower, config.scene_branch_stages)
        self.scene_text_classifier = None
        if config.scene_text_layers is not None:
            # a swapped-in shallower scene-text tower keeps at least one shared layer
            config.scene_text_layers = min(config.scene_text_layers, len(transformer_layers(scene_tower.encoder)) - 1)
            self.scene_text_classifier = SceneTextClassifier(scene_tower, len(config.scene_labels),
                                                             config.scene_text_layers)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.image_transform = build_image_transform(config.image_tower)
        self.room_views = RoomViews(config.image_tower, config.room_grids, kind=config.room_views,
                                    map_size=config.room_map_size)
        if config.room_views == "feature_map" and not (isinstance(self.image_tower, TimmImageTower)
                                                       and self.image_tower.has_region_features()):
            raise ValueError(f"room_views='feature_map' pools a timm tower's feature map; this model's image tower "
                             f"({config.image_tower.source}:{config.image_tower.name}) has none hgm_mm knows: "
                             "use room_views='crops'")
        self.image_input_stage = 0  # > 0 inside `image_inputs_from_stage`
        self.eval()
        if self.scene_text_classifier is not None and load_weights:  # a new model: start from the descriptions
            self.scene_text_classifier.init_from_descriptions(scene_tower, self.scene_tokenizer, config.scene_labels)

    # -- inputs --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def scene_labels(self) -> tuple[str, ...]:
        return self.config.scene_labels

    def preprocess_images(self, images: ImageInput) -> torch.Tensor:
        """PIL images or paths -> a pixel batch (B, 3, S, S) on the model's device."""
        if isinstance(images, torch.Tensor):
            pixels = images.unsqueeze(0) if images.dim() == 3 else images
            if pixels.dim() != 4 or (pixels.shape[1] != 3 and not self.image_input_stage):
                raise ValueError(f"image tensor has shape {tuple(images.shape)}; expected (B, 3, H, W)")
            return pixels.to(self.device)
        return self._transform_photos(images, self.image_transform)  # (B, 3, S, S)

    def _transform_photos(self, images, transform) -> torch.Tensor:
        """A PIL image, a path, or a sequence of them -> stacked `transform` outputs on the device."""
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
            images = [images]
        from ..data.images import load_image, prepare_image

        # one image policy for paths and PIL images: EXIF orientation, alpha, 16-bit (data/images.py)
        tensors = [transform(load_image(item) if isinstance(item, (str, os.PathLike)) else prepare_image(item))
                   for item in images]
        if not tensors:
            raise ValueError("no images given")
        return torch.stack(tensors).to(self.device)

    def preprocess_room_views(self, images: ImageInput) -> torch.Tensor:
        """Room photos or paths -> their views (R, V, 3, S, S); a (R, 3, S, S) tensor is one view each."""
        if isinstance(images, torch.Tensor):
            if images.dim() == 4:
                images = images.unsqueeze(1)
            if images.dim() != 5 or (images.shape[2] != 3 and not self.image_input_stage):
                raise ValueError(f"room tensor has shape {tuple(images.shape)}; expected (R, V, 3, H, W)")
            return images.to(self.device)
        return self._transform_photos(images, self.room_views)  # (R, V, 3, S, S)

    @contextlib.contextmanager
    def image_inputs_from_stage(self, stage: int):
        """Within this block, image inputs are activations entering image-tower stage `stage`
        (`TimmImageTower.feature_stages`), e.g. cached outputs of locked lower layers."""
        if stage and not isinstance(self.image_tower, TimmImageTower):
            raise ValueError(f"{type(self.image_tower).__name__} takes pixels only")
        previous, self.image_input_stage = self.image_input_stage, stage
        try:
            yield self
        finally:
            self.image_input_stage = previous

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.image_input_stage:
            return self.image_tower(pixels, start_stage=self.image_input_stage)
        return self.image_tower(pixels)

    @staticmethod
    def _text_features(tower: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled text-tower outputs; a token dict may carry them precomputed as `tower_features`
        (outputs of a locked tower, cached once)."""
        if "tower_features" in tokens:
            return tokens["tower_features"]
        return tower(tokens["input_ids"], tokens["attention_mask"])

    def _tokens(self, texts: TextInput, tokenizer: TextTokenizer) -> dict[str, torch.Tensor]:
        if isinstance(texts, dict):
            return {k: v.to(self.device) for k, v in texts.items()}
        tokens = tokenizer(texts)
        if tokens["input_ids"].shape[0] == 0:
            raise ValueError("no texts given")
        return {k: v.to(self.device) for k, v in tokens.items()}

    # -- encoders ------------------------------------------------------------------------------
    def encode_image(self, images: ImageInput) -> torch.Tensor:
        """Images (room or product photos) -> unit vectors (B, D)."""
        features = self._image_features(self.preprocess_images(images))  # (B, C)
        return F.normalize(self.image_proj(features), dim=-1)  # (B, D)

    def encode_text(self, texts: TextInput) -> torch.Tensor:
        """Product-side text (titles, descriptions, queries) -> unit vectors (B, D)."""
        tokens = self._tokens(texts, self.tokenizer)
        features = self._text_features(self.text_tower, tokens)  # (B, H)
        return F.normalize(self.text_proj(features), dim=-1)  # (B, D)

    def encode_scene_text(self, texts: TextInput) -> torch.Tensor:
        """Scene text ("a Nordic living room, warm light") through the scene-text tower -> (B, D)."""
        tokens = self._tokens(texts, self.scene_tokenizer)
        tower = self.scene_text_tower or self.text_tower
        features = self._text_features(tower, tokens)  # (B, H)
        return F.normalize(self.scene_text_proj(features), dim=-1)  # (B, D)

    def encode_room_views(self, images: ImageInput) -> torch.Tensor:
        """Each view of each room photo (see `config.room_grids`) -> unit vectors (R, V, D)."""
        views = self.preprocess_room_views(images)  # (R, V, 3, S, S); "feature_map": (R, 1, 3, M, M)
        if self.room_views.kind == "feature_map":
            return F.normalize(self.image_proj(self._room_map_features(views[:, 0])), dim=-1)  # (R, V, D)
        flat = views.flatten(0, 1)  # (R * V, 3, S, S)
        if self.training and torch.is_grad_enabled():  # one pass: train-mode BatchNorm sees the whole batch
            features = self._image_features(flat)  # (R * V, C)
        else:  # R * V photos in one pass: 8 rooms of 55 views held 9 GB (2.5 GB in passes of 64)
            features = torch.cat([self._image_features(chunk) for chunk in flat.split(VIEW_PASS_IMAGES)])
        return F.normalize(self.image_proj(features), dim=-1).view(*views.shape[:2], -1)  # (R, V, D)

    def _room_map_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Room photos at the map size (R, 3, M, M), or their cached locked-layer outputs -> the
        tower's features pooled over each view's cells (R, V, C)."""
        passes = [pixels] if self.training and torch.is_grad_enabled() else pixels.split(MAP_PASS_ROOMS)
        return torch.cat([self.image_tower.region_features(chunk, self.config.room_grids,
                                                           start_stage=self.image_input_stage) for chunk in passes])

    def encode_room(self, images: ImageInput | None = None, texts: Sequence[str | None] | str | None = None,
                    *, view_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """A room from its photo, its scene text, or both (a text entry may be None) -> (B, D).

        The photo part is the mean of the room's view vectors; `view_embeds` (B, V, D), the views
        already encoded by `encode_room_views`, stand in for `images`. To rank products, prefer
        `score_products`, which pools per-view scores and keeps small objects visible.
        """
        if images is not None and view_embeds is None:
            view_embeds = self.encode_room_views(images)
        text_embeds, text_present = self._optional_texts(texts, self.encode_scene_text)
        self._check_batch(view_embeds, text_embeds)
        return self.room_vector(view_embeds, text_embeds, text_present=text_present)

    def room_vector(self, view_embeds: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None, *,
                    text_present: torch.Tensor | None = None) -> torch.Tensor:
        """The room vector, defined here once: the normalised mean of the room's view vectors
        (R, V, D), fused with its scene-text vector (R, D) by `room_fusion` -> unit vectors (R, D).
        Either part may be None; `text_present` (R,) marks the rooms that have words."""
        image_embeds = _mean_view(view_embeds) if view_embeds is not None else None
        return self.room_fusion(image_embeds, text_embeds, text_present=text_present)

    def score_products(self, product_embeds: torch.Tensor, *, view_embeds: torch.Tensor | None = None,
                       text_embeds: torch.Tensor | None = None, text_present: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """How well each product fits each room -> (R, N); higher is better.

        Each view is scored against every product and the view scores are pooled
        (`config.view_pooling`); the pooled photo score and the scene-text score are combined with
        the room fusion's gates. With one view this ranks products exactly as `encode_room(...) @
        product_embeds.T` does.

        Args:
            product_embeds: (N, D) unit product vectors (`encode_product`).
            view_embeds: (R, V, D) from `encode_room_views`, or None for text-only rooms.
            text_embeds: (R, D) scene-text vectors (`encode_scene_text`), or None.
            text_present: (R,) bools, False for rooms without text.
        """
        mean_views = _mean_view(view_embeds) if view_embeds is not None else None
        gates, _, text_part, residual = self.room_fusion.parts(mean_views, text_embeds, text_present=text_present)
        scores = torch.zeros(gates.shape[0], product_embeds.shape[0], device=product_embeds.device,
                             dtype=product_embeds.dtype)  # (R, N)
        if view_embeds is not None:
            view_scores = torch.einsum("rvd,nd->rvn", view_embeds, product_embeds)  # (R, V, N)
            scores = scores + gates[:, :1] * self._pool_views(view_scores)
        if text_embeds is not None:
            scores = scores + gates[:, 1:] * (text_part @ product_embeds.T)
        if residual is not None:
            scores = scores + residual @ product_embeds.T
        return scores

    @staticmethod
    def pack_rooms(view_embeds: torch.Tensor, text_embeds: torch.Tensor | None = None,
                   text_present: torch.Tensor | None = None) -> torch.Tensor:
        """Views (R, V, D) and scene text (R, D) in one tensor (R, V + 1, D); a room without text
        has a zero last row. One tensor gathers across processes; `packed_room_scores` reads it."""
        text = torch.zeros_like(view_embeds[:, 0]) if text_embeds is None else text_embeds
        if text_present is not None:
            text = text * text_present.unsqueeze(1).to(text.dtype)
        return torch.cat([view_embeds, text.unsqueeze(1)], dim=1)  # (R, V + 1, D)

    def packed_room_scores(self, packed_rooms: torch.Tensor, product_embeds: torch.Tensor) -> torch.Tensor:
        """`score_products` for rooms packed by `pack_rooms` -> (R, N)."""
        views, text = packed_rooms[:, :-1], packed_rooms[:, -1]  # (R, V, D), (R, D)
        present = text.detach().norm(dim=-1) > 0  # (R,)
        if not bool(present.any()):
            return self.score_products(product_embeds, view_embeds=views)
        return self.score_products(product_embeds, view_embeds=views, text_embeds=text, text_present=present)

    def _pool_views(self, view_scores: torch.Tensor) -> torch.Tensor:
        """(R, V, N) view scores -> (R, N)."""
        if self.config.view_pooling == "max":
            return view_scores.amax(dim=1)
        if self.config.view_pooling == "mean":
            return view_scores.mean(dim=1)
        t = self.config.view_temperature  # soft maximum, equal to the mean score when views agree
        return t * (torch.logsumexp(view_scores / t, dim=1) - math.log(view_scores.shape[1]))

    def encode_product(self, images: ImageInput | None = None, texts: Sequence[str | None] | str | None = None
                       ) -> torch.Tensor:
        """A product from its photo, its text, or both (a text entry may be None) -> (B, D)."""
        image_embeds = self.encode_image(images) if images is not None else None
        text_embeds, text_present = self._optional_texts(texts, self.encode_text)
        self._check_batch(image_embeds, text_embeds)
        return self.product_vector(image_embeds, text_embeds, text_present=text_present)

    def product_vector(self, image_embeds: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None, *,
                       image_present: torch.Tensor | None = None, text_present: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """The product vector, defined here once: the photo vector (B, D) fused with the text vector
        (B, D) by `product_fusion` -> unit vectors (B, D). Either part may be None; `image_present`
        and `text_present` (B,) mark the rows that have it (an unreadable photo, a product without
        text), whose other values are ignored."""
        return self.product_fusion(image_embeds, text_embeds, image_present=image_present, text_present=text_present)

    # -- scenes -------------------------------------------------------------------------------
    @property
    def scene_transform(self):
        """A PIL photo -> the pixels `scene_logits` reads for it, as `scene_reader` gives them: the
        whole photo (3, S, S) for the photo scene head, the room views (V, 3, S, S) for the room vector."""
        return self.scene_reader.transform(self)

    def scene_logits(self, images: ImageInput | None = None, texts: Sequence[str | None] | str | None = None
                     ) -> torch.Tensor:
        """Calibrated scene log-probabilities (B, S) from a room photo, scene text, or both.

        The photo (`photo_scene_log_probs`) and the words (`text_scene_log_probs`) are read
        separately; for a room with both, the result is their normalised product
        (`hgm_mm.data.scenes.combine_scene_probabilities` computes the same on dicts), so readings that
        agree grow surer and a confident one outweighs an unsure one.

        Args:
            images: photos (PIL images or paths), or pixels from `scene_transform`: (B, 3, S, S)
                whole photos for "photo", room views (B, V, 3, S, S) or (B, 3, S, S) for "room".
            texts: scene texts, one per photo (an entry may be None), or None.
        """
        if images is None:
            if texts is None:
                raise ValueError("give images, texts or both")
            return self.text_scene_log_probs(texts)
        logits = self.photo_scene_log_probs(images)  # (B, S)
        if texts is None:
            return logits
        if isinstance(texts, str):
            texts = [texts]
        n_texts = texts["input_ids"].shape[0] if isinstance(texts, dict) else len(texts)
        if n_texts != len(logits):
            raise ValueError(f"{len(logits)} images but {n_texts} texts; give one text (or None) per image")
        rows = list(range(n_texts)) if isinstance(texts, dict) else [i for i, text in enumerate(texts) if text]
        if not rows:
            return logits
        present = texts if isinstance(texts, dict) else [texts[i] for i in rows]
        text_logits = self.text_scene_log_probs(present)  # (B', S)
        combined = logits.index_add(0, torch.tensor(rows, device=logits.device), text_logits.to(logits.dtype))
        return combined.log_softmax(dim=-1)

    def photo_scene_log_probs(self, images: ImageInput, view_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated scene log-probabilities (B, S) read from room photos alone by `scene_reader`
        (the photo scene head, or `scene_head` on the room vector), divided by
        `config.photo_scene_temperature`. `view_embeds` (B, V, D), the photos' room views from
        `encode_room_views`, spare a reader of the room vector a second pass over the views."""
        logits = self.scene_reader.logits(self, images, view_embeds)
        return (logits / self.config.photo_scene_temperature).log_softmax(dim=-1)

    def text_scene_log_probs(self, texts: TextInput) -> torch.Tensor:
        """Calibrated scene log-probabilities (B, S) read from scene texts alone: the scene-text
        classifier when the model has one, else `scene_head` on the words' room vector; divided by
        `config.text_scene_temperature`."""
        if self.scene_text_classifier is not None:
            tokens = self._tokens(texts, self.scene_tokenizer)
            return self.scene_text_classifier.log_probabilities(
                self.scene_text_tower or self.text_tower, tokens, self.config.text_scene_temperature)
        logits = self.scene_head(self.encode_room(texts=texts))
        return (logits / self.config.text_scene_temperature).log_softmax(dim=-1)

    def photo_scene_logits(self, images: ImageInput) -> torch.Tensor:
        """Scene logits (B, S) of whole photos: the log-probabilities of `photo_scene_head` (a model
        whose `config.scene_source` is "photo"), averaged with the mirror image's when
        `config.scene_flip_average`.

        Args:
            images: photos (PIL images or paths), or whole-photo pixels (B, 3, S, S) from `scene_transform`.
        """
        if self.photo_scene_head is None:
            raise ValueError(f"this model reads scenes from the room vector (scene_source="
                             f"{self.scene_reader.source!r}) and has no photo scene head; train one with "
                             "hgm_mm.training.train_scenes(model, ..., scene_source='photo')")
        if isinstance(images, torch.Tensor):
            pixels = images.unsqueeze(0) if images.dim() == 3 else images
            if pixels.dim() != 4 or pixels.shape[1] != 3:
                raise ValueError(f"photo tensor has shape {tuple(images.shape)}; the photo scene head reads whole "
                                 "photos (B, 3, S, S), from model.scene_transform")
            pixels = pixels.to(self.device)
        else:
            pixels = self._transform_photos(images, self.scene_transform)  # (B, 3, S, S)
        features = [self.photo_scene_features(pixels)]  # (B, C)
        if self.config.scene_flip_average:
            features.append(self.photo_scene_features(pixels.flip(-1)))
        return self.photo_scene_logits_from_features(torch.stack(features, dim=1))

    def photo_scene_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Whole-photo pixels (B, 3, S, S) -> the pooled features (B, C) `photo_scene_head` reads:
        the image tower's, or with a scene branch, the tower's lower stages and then the branch."""
        if self.photo_scene_branch is None:
            return self.image_tower(pixels)
        start = len(self.image_tower.feature_stages()) - len(self.photo_scene_branch)
        return self.scene_branch_features(self.image_tower.prefix_features(pixels, start))

    def scene_branch_features(self, activations: torch.Tensor) -> torch.Tensor:
        """The activation entering the scene branch (B, C', H, W) -> pooled features (B, C), through
        the branch's stages and the image tower's pooling."""
        x = activations
        for stage in self.photo_scene_branch:
            x = stage(x)
        return self.image_tower.trunk.forward_head(x, pre_logits=True)

    def photo_scene_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled image-tower features (B, A, C) of A versions of each photo (the photo, its mirror
        image) -> scene logits (B, S): the mean over the versions of their log-probabilities.

        Features are L2-normalised first: their norm varies with the photo, not with its scene.
        """
        logits = self.photo_scene_head(F.normalize(features.to(self.photo_scene_head.weight.dtype), dim=-1))
        return logits.log_softmax(dim=-1).mean(dim=1)  # (B, S)

    def use_photo_scene_head(self, *, image_size: int | None = None, flip_average: bool = True,
                             branch_stages: int = 0) -> None:
        """Switches scene recognition to a new, untrained `photo_scene_head` (all scenes equally
        likely) reading the whole photo (`config.scene_source = "photo"`);
        `train_scenes(..., scene_source="photo")` does this itself.

        Room and product vectors do not change: the head reads the image tower's pooled features
        and nothing else reads the head. `save_pretrained` keeps the choice.

        Args:
            image_size: side the whole photo is resized to; None keeps `config.image_tower.image_size`.
            flip_average: average the scene log-probabilities of each photo and its mirror image.
            branch_stages: > 0 gives the head its own copy of the image tower's top `branch_stages`
                `feature_stages()`, starting from the tower's weights, for `train_scenes` to tune
                (a timm tower with known stages); 0 reads the image tower itself.
        """
        config = copy.deepcopy(self.config)
        config.scene_source, config.scene_image_size, config.scene_flip_average = "photo", image_size, flip_average
        config.scene_branch_stages = branch_stages
        config.photo_scene_temperature = 1.0  # a new head: calibrated again once trained
        config.__post_init__()  # validates the new values before anything changes
        branch = _scene_branch(self.image_tower, branch_stages)
        self.config = config
        self.scene_reader = scene_reader("photo")
        self.photo_scene_branch = branch.to(self.device) if branch is not None else None
        head = nn.Linear(self.image_tower.output_dim, len(config.scene_labels))
        nn.init.zeros_(head.weight)  # uniform scenes until trained; training a linear head is convex, so
        nn.init.zeros_(head.bias)  # a fixed start costs nothing and makes runs independent of the RNG
        self.photo_scene_head = head.to(self.device)

    def use_room_scene_head(self) -> None:
        """Switches scene recognition to `scene_head` on the room vector (`config.scene_source =
        "room"`), dropping any photo scene head; `train_scenes(..., scene_source="room")` does this
        itself. The head keeps its weights; its calibration is reset."""
        self.config = dataclasses.replace(self.config, scene_source="room", scene_image_size=None,
                                          scene_flip_average=False, scene_branch_stages=0,
                                          photo_scene_temperature=1.0)
        self.scene_reader = scene_reader("room")
        self.photo_scene_head = self.photo_scene_branch = None

    def predict_scene(self, images: ImageInput | None = None, texts: Sequence[str | None] | str | None = None
                      ) -> list[dict[str, float]]:
        """Calibrated scene probabilities per room (photo and words combined, see `scene_logits`),
        as {label: probability} sorted from most likely."""
        with torch.no_grad():
            probs = self.scene_logits(images, texts).softmax(dim=-1).cpu()  # (B, S)
        return [dict(sorted(zip(self.scene_labels, row.tolist()), key=lambda kv: -kv[1])) for row in probs]

    def _optional_texts(self, texts, encode) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encodes the non-empty texts and scatters them into a (B, D) batch with a presence mask."""
        if texts is None:
            return None, None
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, dict):
            return encode(texts), None
        present = torch.tensor([bool(t) for t in texts], dtype=torch.bool)
        if not bool(present.any()):
            return None, None
        encoded = encode([t for t in texts if t])  # (B', D)
        if bool(present.all()):
            return encoded, None
        full = encoded.new_zeros(len(texts), encoded.shape[1])  # (B, D)
        full[present.to(encoded.device)] = encoded
        return full, present.to(encoded.device)

    @staticmethod
    def _check_batch(image_embeds: torch.Tensor | None, text_embeds: torch.Tensor | None) -> None:
        if image_embeds is None and text_embeds is None:
            raise ValueError("give images, texts or both")
        if image_embeds is not None and text_embeds is not None and len(image_embeds) != len(text_embeds):
            raise ValueError(f"{len(image_embeds)} images but {len(text_embeds)} texts; give one text "
                             "(or None) per image")

    # -- training forward ----------------------------------------------------------------------
    def forward(self, *, room_pixels: torch.Tensor | None = None, room_tokens: dict | None = None,
                room_text_present: torch.Tensor | None = None, product_pixels: torch.Tensor | None = None,
                product_tokens: dict | None = None) -> HGMOutput:
        """Computes what the given inputs allow, for training and batch inference.

        Args:
            room_pixels: (R, V, 3, S, S) views of the room photos (`preprocess_room_views`), or
                (R, 3, S, S) for one view each.
            room_tokens: scene-text tokens for the R rooms (from `model.scene_tokenizer`).
            room_text_present: (R,) bools, False where a room has no scene text.
            product_pixels: (P, 3, S, S) product photos.
            product_tokens: product-text tokens for the P products (from `model.tokenizer`).
        """
        out = HGMOutput(logit_scale=self.logit_scale.exp())
        if room_pixels is not None or room_tokens is not None:
            if room_pixels is not None:
                out.room_view_embeds = self.encode_room_views(room_pixels)  # (R, V, D)
                out.room_image_embeds = _mean_view(out.room_view_embeds)
            if room_tokens is not None:
                out.room_text_embeds = self.encode_scene_text(room_tokens)
                if room_text_present is not None:
                    out.room_text_embeds = out.room_text_embeds * room_text_present.unsqueeze(1)
            out.room_embeds = self.room_vector(out.room_view_embeds, out.room_text_embeds,
                                               text_present=room_text_present)
            out.scene_logits = self.scene_head(out.room_embeds)
        if product_pixels is not None or product_tokens is not None:
            if product_pixels is not None:
                out.product_image_embeds = self.encode_image(product_pixels)
            if product_tokens is not None:
                out.product_text_embeds = self.encode_text(product_tokens)
            out.product_embeds = self.product_vector(out.product_image_embeds, out.product_text_embeds)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trades compute for memory in every tower that supports it."""
        for tower in (self.image_tower, self.text_tower, self.scene_text_tower):
            if tower is not None:
                tower.set_grad_checkpointing(enable)

    # -- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, *, training: "TrainingRecord | None" = None) -> Path:
        """Writes config JSON, safetensors weights, tokenizers and the model card `README.md` to `folder`.

        Every file is written under a temporary name and moved into place, the config last, so
        an interrupted save never leaves a folder that loads half a model; the config records the
        weights' SHA-256, so weights swapped in from another model are refused on load.

        Args:
            folder: the model folder (created if needed; a model already there is replaced).
            training: what the training run recorded (config, data, validation metrics), for the
                card (`hgm_mm.models.model_card`); without it the card describes the towers and how to load.
        """
        from .model_card import render_model_card

        if self.open_clip_config is not None:
            tokenizers = {OPEN_CLIP_DIR: lambda d: save_open_clip_config(d, self.open_clip_config,
                                                                         self.tokenizer.backend)}
        else:
            tokenizers = {TOKENIZER_DIR: self.tokenizer.save}
        if self.scene_text_tower is not None:
            tokenizers[SCENE_TOKENIZER_DIR] = self.scene_tokenizer.save
        return write_model_folder(folder, self.state_dict(), self.config, render_model_card(self.config, training),
                                  tokenizers)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "HGMModel":
        """Same as `hgm_mm.load_model(folder)`."""
        return load_model(folder)


def load_model(folder: str | os.PathLike, *, device: str | torch.device | None = None) -> HGMModel:
    """Loads a model written by `save_pretrained`, exactly: from its folder with no network, or by
    its Hugging Face Hub id.

    Args:
        folder: the folder `save_pretrained` wrote; or, when no such path exists, the hub id
            (`org/name`, or `hf-hub:org/name`) of such a folder pushed to the hub, fetched through
            huggingface_hub into its cache (offline, `HF_HUB_OFFLINE=1`, from the cache alone).
        device: where to put the model.

    Raises:
        FileNotFoundError: the folder or one of its files is missing, or the hub id cannot be had.
        ValueError: the folder was written by a newer hgm_mm, or its config or weights do not
            match (names the keys), or a file is corrupt.
    """
    folder = resolve_model_folder(folder)
    config, state, weights_path = read_model_folder(folder)
    model = HGMModel(config, load_weights=False, folder=folder)
    check_state_matches(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.to(device) if device is not None else model


def _scene_branch(image_tower: nn.Module, n_stages: int) -> nn.ModuleList | None:
    """A trainable copy of the image tower's top `n_stages` feature stages, for the photo scene head."""
    if not n_stages:
        return None
    stages = image_tower.feature_stages() if hasattr(image_tower, "feature_stages") else None
    if not stages:
        raise ValueError(f"scene_branch_stages={n_stages} needs a timm image tower whose stages hgm_mm knows "
                         f"(EfficientNet or ResNet families); this model's is {type(image_tower).__name__}: use 0")
    if n_stages >= len(stages):
        raise ValueError(f"scene_branch_stages={n_stages}: the image tower has {len(stages)} stages and the branch "
                         f"must leave at least one shared; use 1..{len(stages) - 1}")
    return nn.ModuleList(copy.deepcopy(stage) for stage in stages[-n_stages:])


def _mean_view(view_embeds: torch.Tensor) -> torch.Tensor:
    """(R, V, D) unit view vectors -> (R, D) unit vector of their mean."""
    return F.normalize(view_embeds.mean(dim=1), dim=-1)


def _projection(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "none":
        if in_dim != out_dim:
            raise ValueError(f"projection 'none' needs tower output {in_dim} == embed_dim {out_dim}; "
                             "use projection 'linear' or set embed_dim")
        return nn.Identity()
    layer = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.orthogonal_(layer.weight)  # keeps the pretrained geometry: an isometry when in_dim <= out_dim
    return layer
