"""sea-attention: linear-time sparse attention with an estimated attention mask (SEA, ICLR 2024)."""

from .attention import SEAAttention, SEAOutput
from .config import SEAConfig

__version__ = "0.1.0"

__all__ = ["SEAConfig", "SEAAttention", "SEAOutput", "__version__"]
