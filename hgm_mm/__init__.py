"""hgm_mm: scene-aware furniture matching with CLIP-style and BERT towers.

    import hgm_mm
    model = hgm_mm.create_model("hgm-lite-en")
    rooms = model.encode_room(["room.jpg"], ["a Nordic living room, warm light"])

The package follows the data's path (docs/architecture.md): `data` (records, images, scenes),
`models`, `retrieval`, `embedding`, `losses`, `ranking`, `evaluation`, `training`, `apps`.
"""
from . import _moved

_moved.install()

from .data.events import InteractionEvent as InteractionEvent  # noqa: E402
from .data.events import read_events as read_events  # noqa: E402
from .evaluation import evaluate as evaluate  # noqa: E402
from .log import log_to_console as log_to_console  # noqa: E402
from .models.config import FusionConfig as FusionConfig  # noqa: E402
from .models.config import ImageTowerConfig as ImageTowerConfig  # noqa: E402
from .models.config import ModelConfig as ModelConfig  # noqa: E402
from .models.config import TextTowerConfig as TextTowerConfig  # noqa: E402
from .models.factory import create_model as create_model  # noqa: E402
from .models.hgm import HGMModel as HGMModel  # noqa: E402
from .models.hgm import HGMOutput as HGMOutput  # noqa: E402
from .models.hgm import load_model as load_model  # noqa: E402
from .models.pretrained import RandomInitWarning as RandomInitWarning  # noqa: E402
from .models.pretrained import builtin_model_names as builtin_model_names  # noqa: E402
from .ranking.catalog import build_catalog_index as build_catalog_index  # noqa: E402
from .ranking.matcher import Matcher as Matcher  # noqa: E402
from .ranking.matcher import MatchResult as MatchResult  # noqa: E402
from .ranking.matcher import RankedProduct as RankedProduct  # noqa: E402
from .ranking.prior import SceneCategoryPrior as SceneCategoryPrior  # noqa: E402
from .ranking.profile import UserProfile as UserProfile  # noqa: E402
from .ranking.weights import RankingWeights as RankingWeights  # noqa: E402
from .retrieval.index import ProductIndex as ProductIndex  # noqa: E402
from .retrieval.index import model_fingerprint as model_fingerprint  # noqa: E402
from .retrieval.milvus import MilvusProductIndex as MilvusProductIndex  # noqa: E402
from .training import TrainConfig as TrainConfig  # noqa: E402
from .training import train as train  # noqa: E402
from .version import __version__ as __version__  # noqa: E402

list_models = builtin_model_names
