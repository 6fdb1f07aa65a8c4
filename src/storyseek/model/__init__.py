"""The DeepSeek-V3-style model: MLA, DeepSeekMoE, MTP, RoPE."""

from .config import PRESETS, ModelConfig, get_preset, pad_vocab
from .mla import LatentCache
from .transformer import ModelOutput, Transformer

__all__ = ["PRESETS", "ModelConfig", "get_preset", "pad_vocab", "LatentCache", "ModelOutput", "Transformer"]
