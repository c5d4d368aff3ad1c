"""Print the logits parity of dsv4 against Hugging Face transformers on the test suite's tiny configs.

    python bench/parity_report.py

Per config: exact fp32 vs transformers (dequantized weights), bf16 vs fp32, as-released vs exact;
per-position relative L2 error of the logits, max and median. Needs `transformers==5.23.0`.
"""

import sys
import tempfile
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import CONFIGS, rel_err, token_ids  # noqa: E402
from reference import hf_logits, hf_model  # noqa: E402

import dsv4  # noqa: E402
from dsv4.config import ModelConfig  # noqa: E402
from dsv4.tiny import random_weights  # noqa: E402
from dsv4.writer import write_checkpoint  # noqa: E402

LENGTHS = {"flash": 300, "pro": 290, "small": 150}


def main() -> None:
    torch.set_num_threads(2)
    print("| config | comparison | positions | max rel. error | median rel. error |")
    print("|---|---|---|---|---|")
    for name, n in LENGTHS.items():
        raw = CONFIGS[name]
        with tempfile.TemporaryDirectory() as d:
            seen = write_checkpoint(d, raw, random_weights(ModelConfig.from_dict(raw), seed=zlib.crc32(name.encode())))
            ids = token_ids(n, raw["vocab_size"])
            exact = dsv4.load(d, dtype=torch.float32).logits(ids)
            rows = {
                "exact fp32 vs transformers": (exact, hf_logits(hf_model(raw, seen), ids)),
                "exact bf16 vs exact fp32": (dsv4.load(d).logits(ids), exact),
                "released fp32 vs exact fp32": (dsv4.load(d, dtype=torch.float32, numerics="released").logits(ids), exact),
            }
            for label, (a, b) in rows.items():
                e = rel_err(a, b)
                print(f"| {name} | {label} | {n} | {e.max():.2e} | {e.median():.2e} |", flush=True)


if __name__ == "__main__":
    main()
