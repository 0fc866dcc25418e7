"""Thin adapters around third-party backbones. Each tower maps its input to one feature vector
per sample and reports `output_dim`; the model adds projections, fusion and heads."""
from .hf_tower import HFTextTower as HFTextTower
from .hf_tower import build_hf_text_tower as build_hf_text_tower
from .open_clip_tower import OpenClipImageTower as OpenClipImageTower
from .open_clip_tower import OpenClipTextTower as OpenClipTextTower
from .open_clip_tower import build_open_clip_towers as build_open_clip_towers
from .timm_tower import TimmImageTower as TimmImageTower
