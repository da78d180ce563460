"""sea-attention: linear-time sparse attention with an estimated attention mask (SEA, ICLR 2024)."""

from .core.attention import SEAAttention, SEAOutput
from .core.config import SEAConfig
from .core.decoding import DecodeState

__version__ = "0.1.0"

__all__ = ["SEAConfig", "SEAAttention", "SEAOutput", "DecodeState", "__version__"]

# Hugging Face integration (sea_attention.hf), imported on first use so that `import sea_attention`
# does not pull in transformers.
_HF_EXPORTS = ("patch", "unpatch", "sea_layers", "layer_override", "LayerCall", "dense_attention", "set_budget",
               "sea_budget", "set_runtime", "save_pretrained", "from_pretrained", "GrowingCache",
               "cache_kwargs")
__all__ += list(_HF_EXPORTS)


def __getattr__(name: str):
    if name in _HF_EXPORTS:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
