"""Pure PyTorch DeepSeek-V3 model: no distributed or kernel-selection logic in here."""

from leanmoe.model.attention import MLA
from leanmoe.model.cache import LatentCache
from leanmoe.model.moe import MoE, Router
from leanmoe.model.transformer import LossOutput, Transformer

__all__ = ["MLA", "MoE", "Router", "Transformer", "LossOutput", "LatentCache"]
