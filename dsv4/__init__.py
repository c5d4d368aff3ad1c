"""dsv4: run DeepSeek V4 (Flash, Pro) from the official checkpoints.

    import dsv4, torch
    m = dsv4.load("path/to/checkpoint", dtype=torch.float32)
    logits = m.logits([0, 3476, 477])   # [3, vocab] float32
"""

import os

# OpenMP threads that spin while they wait collapse decode when another process holds a core
# (issue 10: ~10x slower); passive waiting costs nothing measurable when the cores are free. Set
# before torch loads its OpenMP runtime, which reads it once; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ModelConfig  # noqa: E402
from .engine import Engine, load  # noqa: E402

__all__ = ["Engine", "ModelConfig", "load"]
__version__ = "0.1.0"
