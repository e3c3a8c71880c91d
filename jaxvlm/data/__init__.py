"""Data for training nanoVLM in JAX: encoding conversations, datasets, and a static-shape loader.

Imports neither jax nor torch (numpy, pillow and tokenizers only).
"""

from .datasets import ConversationDataset, Record, cauldron_dataset, coco_captions_dataset, llava_dataset
from .encoding import IGNORE_INDEX, SampleEncoder, SampleError, shift_labels
from .loader import DataLoader, collate, pick_bucket, power_of_two_buckets
from .synthetic import ANSWERS, QUESTIONS, Scene, SyntheticShapesDataset, render

__all__ = [
    "ANSWERS",
    "ConversationDataset",
    "DataLoader",
    "IGNORE_INDEX",
    "QUESTIONS",
    "Record",
    "SampleEncoder",
    "SampleError",
    "Scene",
    "SyntheticShapesDataset",
    "cauldron_dataset",
    "coco_captions_dataset",
    "collate",
    "llava_dataset",
    "pick_bucket",
    "power_of_two_buckets",
    "render",
    "shift_labels",
]
