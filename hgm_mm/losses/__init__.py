"""Training losses: gathered contrastive losses and the scene cross-entropy (`contrastive`), and
GradCache chunked embedding of their batches (`grad_cache`)."""
from .contrastive import PAD_ID as PAD_ID
from .contrastive import ContrastiveLoss as ContrastiveLoss
from .contrastive import MultiPositiveContrastiveLoss as MultiPositiveContrastiveLoss
from .contrastive import gather_with_grad as gather_with_grad
from .contrastive import pad_positive_ids as pad_positive_ids
from .contrastive import scene_loss as scene_loss
from .grad_cache import grad_cache_step as grad_cache_step
