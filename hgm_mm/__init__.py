"""hgm_mm: scene-aware furniture matching with CLIP-style and BERT towers."""
from .version import __version__ as __version__
