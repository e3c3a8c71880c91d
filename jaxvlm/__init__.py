"""jaxvlm: nanoVLM in JAX / Flax NNX, numerically matched to PyTorch. Imports no torch."""

from conversion.config import PRESETS, VLMConfig

from .generate import generate
from .image_processing import ImageProcessor, image_string, load_image
from .kernels import Kernels
from .options import ModelOptions
from .tokenizer import Tokenizer, load_tokenizer
from .vision_language_model import VisionLanguageModel, cross_entropy, forward

__all__ = [
    "PRESETS",
    "ImageProcessor",
    "Kernels",
    "ModelOptions",
    "Tokenizer",
    "VLMConfig",
    "VisionLanguageModel",
    "cross_entropy",
    "forward",
    "generate",
    "image_string",
    "load_image",
    "load_tokenizer",
]
