"""The dataset format: records (products, rooms, pairs, scene images), interaction events, safe image loading."""
from .events import InteractionEvent as InteractionEvent
from .events import read_events as read_events
from .images import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS
from .images import ImageError as ImageError
from .images import SkipCounter as SkipCounter
from .images import load_image as load_image
from .images import load_images as load_images
from .images import prepare_image as prepare_image
from .records import DataError as DataError
from .records import Dataset as Dataset
from .records import Product as Product
from .records import Room as Room
from .records import SceneImage as SceneImage
from .records import SceneText as SceneText
from .records import load_dataset as load_dataset
from .records import read_pairs as read_pairs
from .records import read_products as read_products
from .records import read_rooms as read_rooms
from .records import read_scene_images as read_scene_images
from .records import read_scene_texts as read_scene_texts

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DataError",
    "Dataset",
    "ImageError",
    "InteractionEvent",
    "Product",
    "Room",
    "SceneImage",
    "SceneText",
    "SkipCounter",
    "load_dataset",
    "load_image",
    "load_images",
    "prepare_image",
    "read_events",
    "read_pairs",
    "read_products",
    "read_rooms",
    "read_scene_images",
    "read_scene_texts",
]
