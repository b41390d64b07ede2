"""rmt_fast: the Recurrent Memory Transformer over any HuggingFace encoder or decoder, with fused kernels."""
from .config import RMTConfig
from .model import RecurrentMemoryModel, RMTOutput, from_pretrained
from .wrap import wrap

__all__ = ["wrap", "from_pretrained", "RMTConfig", "RecurrentMemoryModel", "RMTOutput"]
__version__ = "0.1.0"
