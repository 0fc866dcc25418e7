"""hgm_mm: scene-aware furniture matching with CLIP-style and BERT towers.

    import hgm_mm
    model = hgm_mm.create_model("hgm-lite-en")
    rooms = model.encode_room(["room.jpg"], ["a Nordic living room, warm light"])
"""
from .config import FusionConfig as FusionConfig
from .config import ImageTowerConfig as ImageTowerConfig
from .config import ModelConfig as ModelConfig
from .config import TextTowerConfig as TextTowerConfig
from .evaluation import evaluate as evaluate
from .factory import create_model as create_model
from .index import ProductIndex as ProductIndex
from .log import log_to_console as log_to_console
from .index import model_fingerprint as model_fingerprint
from .matching import MatchResult as MatchResult
from .matching import Matcher as Matcher
from .matching import RankedProduct as RankedProduct
from .matching import RankingWeights as RankingWeights
from .matching import SceneCategoryPrior as SceneCategoryPrior
from .matching import build_catalog_index as build_catalog_index
from .milvus_index import MilvusProductIndex as MilvusProductIndex
from .model import HGMModel as HGMModel
from .model import HGMOutput as HGMOutput
from .model import load_model as load_model
from .pretrained import RandomInitWarning as RandomInitWarning
from .pretrained import builtin_model_names as builtin_model_names
from .profile import InteractionEvent as InteractionEvent
from .profile import UserProfile as UserProfile
from .profile import read_events as read_events
from .training import TrainConfig as TrainConfig
from .training import train as train
from .version import __version__ as __version__

list_models = builtin_model_names
