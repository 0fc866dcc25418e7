"""Fine-tuning: contrastive and scene objectives under accelerate (the only place accelerate is used)."""
from .config import SceneTrainConfig as SceneTrainConfig
from .config import TrainConfig as TrainConfig
from .loop import NonFiniteLossError as NonFiniteLossError
from .loop import TrainResult as TrainResult
from .loop import train as train
from .scenes import SceneTrainResult as SceneTrainResult
from .scenes import train_scenes as train_scenes
