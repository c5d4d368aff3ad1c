"""Train a small DeepSeek V4 model from scratch with the engine's own network; export it as released.

The package, by job:

- `corpus`: the files (the stdlib's .py source by default), the held-out split, the BPE tokenizer,
  the shuffled windows;
- `init`: size presets, a fresh init per official tensor name, the trainable `Transformer`;
- `balance`: auxiliary-loss-free load balancing of the routed experts;
- `loss`: next-token cross-entropy plus the MTP block's;
- `loop`: options, optimizer and schedule, the resumable run, `train` (the whole job);
- `export`: the released layout (FP8 dense, MXFP4 experts) plus tokenizer.json;
- `evaluate`: held-out perplexity and MTP acceptance of an exported folder through `dsv4.load`;
- `dspark`: a DSpark draft trained on a frozen backbone (the 0731 releases' draft);
- `plot`: the loss curve (matplotlib, optional); `cli`: `dsv4 train` / `python -m dsv4.train`.
"""

from .balance import LoadMeter, update_router_bias
from .cli import add_train_parser, main
from .corpus import gather_files, is_held_out, split_files, train_tokenizer
from .evaluate import evaluate, score
from .export import export
from .init import PRESETS, InitSource, build_model, preset_config
from .loop import TrainOptions, train
from .loss import batch_loss

__all__ = [
    "PRESETS", "InitSource", "LoadMeter", "TrainOptions", "add_train_parser", "batch_loss", "build_model",
    "evaluate", "export", "gather_files", "is_held_out", "main", "preset_config", "score", "split_files",
    "train", "train_tokenizer", "update_router_bias",
]  # fmt: skip
