"""leanmoe: train and serve DeepSeek-V3-style Mixture-of-Experts models, from a laptop CPU to a cluster."""

from leanmoe.weights import from_pretrained, save_pretrained
from leanmoe.config import PRESETS, ModelConfig
from leanmoe.infer import LLM, EngineConfig, SamplingParams
from leanmoe.model import LatentCache, LossOutput, Transformer

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "Transformer", "LossOutput", "LatentCache", "from_pretrained",
           "save_pretrained", "LLM", "SamplingParams", "EngineConfig", "__version__"]
