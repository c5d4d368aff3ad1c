import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from release_writer import write_release  # noqa: E402

from dsv4.tiny import tiny_config  # noqa: E402

torch.set_num_threads(2)


def pytest_sessionstart(session):
    """Build the CPU kernels once, in this process, before any test starts a CLI or server process
    under a timeout: a first build takes 1-2 minutes on 2 cores, and would otherwise fall inside the
    first subprocess test's time limit."""
    import dsv4.kernels

    dsv4.kernels.available()


@pytest.fixture(autouse=True)
def _kernel_choice():
    """Every test starts and ends with the kernel choice read from the environment afresh (the
    choice is kept per process; tests that set DSV4_KERNELS call `kernels.refresh()` themselves)."""
    import dsv4.kernels

    dsv4.kernels.refresh()
    yield
    dsv4.kernels.refresh()


# Tiny configs covering every layer type, hash and routed MoE, hc_mult 4, MTP.
# Indexer scores tie exactly (at 0) when every head's ReLU is 0, and which tied entry top-k keeps is
# implementation-defined; 16 indexer heads make such ties too rare to decide a pick (V4 itself has 64).
CONFIGS = {
    # V4-Flash pattern: sliding, CSA, HCA, CSA; two hash layers
    "flash": tiny_config(index_n_heads=16),
    # V4-Pro pattern: HCA, HCA, CSA, HCA, CSA; three hash layers; fewer indexer picks
    "pro": tiny_config(num_hidden_layers=5, compress_ratios=[128, 128, 4, 128, 4, 0], num_hash_layers=3, index_topk=4,
                       index_n_heads=16),
    # short windows and HCA ratio 8: many compressed entries and window wraps in a short sequence
    "small": tiny_config(sliding_window=16, compress_ratios=[0, 4, 8, 4, 0], index_topk=6, index_n_heads=16),
}


class Tiny:
    """A test checkpoint: its folder, config.json dict and tensors as stored (fp32, by official name)."""

    def __init__(self, path: Path, raw: dict, tensors: dict):
        self.path, self.raw, self.tensors = path, raw, tensors


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """name -> Tiny (preview-layout FP8/MXFP4 checkpoint with an MTP layer, written once per session).

    Written by tests/release_writer.py, which shares no code with dsv4: a layout or format mistake
    made alike in dsv4's reader and its writer cannot pass the tests that load these."""
    cache = {}

    def get(name: str) -> Tiny:
        if name not in cache:
            raw = CONFIGS[name]
            path = tmp_path_factory.mktemp(f"ckpt_{name}")
            tensors = write_release(path, raw, draft="mtp", seed=zlib.crc32(name.encode()))
            cache[name] = Tiny(path, raw, tensors)
        return cache[name]

    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position relative L2 error of logits [S, V]."""
    return (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1)


def token_ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    return [int(x) for x in torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed))]


# The official tokenizer's vocabulary, so text, chat format and stop strings can be exercised.
CONFIGS["vocab"] = tiny_config(vocab_size=129280, num_hidden_layers=3, compress_ratios=[0, 4, 128, 0], num_hash_layers=1)
