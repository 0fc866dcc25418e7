"""Embedding photos and texts in batches (`batch`), and a catalogue of any size into resumable shards (`shards`)."""
from ..data.loading import PhotoDecoder as PhotoDecoder
from ..data.loading import PhotoFiles as PhotoFiles
from .batch import ENGINES as ENGINES
from .batch import PRECISIONS as PRECISIONS
from .batch import EmbeddedImages as EmbeddedImages
from .batch import default_num_workers as default_num_workers
from .batch import embed_images as embed_images
from .batch import embed_texts as embed_texts
from .batch import photo_encoder as photo_encoder
from .batch import resolve_engine as resolve_engine
from .shards import MANIFEST_NAME as MANIFEST_NAME
from .shards import SHARD_PATTERN as SHARD_PATTERN
from .shards import ShardedEmbeddings as ShardedEmbeddings
from .shards import embed_to_shards as embed_to_shards
from .shards import plan_digest as plan_digest
