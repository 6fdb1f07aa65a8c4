"""The DeepSeek-V3-style model: MLA, DeepSeekMoE, MTP, RoPE.

The torch-backed classes are imported on first use (PEP 562), so code that only needs the config
(the CLI generating `storyseek train`'s model flags) does not pay torch's ~2 s import.
"""

from importlib import import_module

from .config import PRESETS, ModelConfig, get_preset, pad_vocab

_LAZY = {"CacheStep": ".mla", "KVCache": ".mha", "LatentCache": ".mla", "ModelOutput": ".transformer", "Transformer": ".transformer"}

__all__ = ["PRESETS", "ModelConfig", "get_preset", "pad_vocab", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
