"""dsv4: run DeepSeek V4 (Flash, Pro) from the official checkpoints.

    import dsv4, torch
    m = dsv4.load("path/to/checkpoint", dtype=torch.float32)
    logits = m.logits([0, 3476, 477])   # [3, vocab] float32
"""

from .config import ModelConfig
from .engine import Engine, load

__all__ = ["Engine", "ModelConfig", "load"]
__version__ = "0.1.0"
