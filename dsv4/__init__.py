"""dsv4: run DeepSeek V4 (Flash, Pro) from the official checkpoints.

    import dsv4, torch
    m = dsv4.load("path/to/checkpoint", dtype=torch.float32)
    logits = m.logits([0, 3476, 477])   # [3, vocab] float32
"""

import os

# torch's OpenMP threads (prefill's tensor ops; the kernels have their own pool, dsv4/kernels/pool.h)
# spin for ~3 us (libgomp's 300 spins) after a region, then sleep: spinning long collapses a step
# when another process holds a core (issue 10: ~10x slower), while sleeping at once makes every
# region of a prefill wake them (~50 us each on the development VM). 2 threads, 64-token prefill,
# quiet / next to a busy process: demo 878 / 1,015 tok/s sleeping at once, 2,066 / 1,711 with 300
# spins, 2,512 / 768 with 1,000. Set before torch loads its OpenMP runtime, which reads them once; a
# wait policy the user set is kept, and so is their spin count.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "300")

from .config import ModelConfig  # noqa: E402
from .engine import Engine, load  # noqa: E402

__all__ = ["Engine", "ModelConfig", "load"]
__version__ = "0.1.0"
