"""torch_ref: the canonical PyTorch nanoVLM. Its state dict is upstream nanoVLM's; it imports no jax."""

from conversion.config import VLMConfig

from .vision_language_model import VisionLanguageModel

__all__ = ["VLMConfig", "VisionLanguageModel"]
