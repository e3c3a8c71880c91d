"""jaxvlm: nanoVLM in JAX / Flax NNX, numerically matched to PyTorch. Imports no torch."""

from conversion.config import PRESETS, VLMConfig

from .layers import ModelDtypes
from .vision_language_model import VisionLanguageModel, cross_entropy, forward

__all__ = ["PRESETS", "ModelDtypes", "VLMConfig", "VisionLanguageModel", "cross_entropy", "forward"]
