"""The training corpus: which files, the held-out split, the tokenizer trained on them, and the windows.

The default corpus is the Python standard library's own source; one file in HOLDOUT_EVERY (by a hash of
its relative path, the same on every machine) is held out for evaluation. The tokenizer is byte-level
BPE with BOS / EOS / pad first and the V4 chat markers as added tokens. It knows nothing of the model.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch

from ..chat import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, TASK_TOKENS, THINK_END, THINK_START, USER

PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2, as in the release
CHAT_TOKENS = [USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER, *TASK_TOKENS.values()]
HOLDOUT_EVERY = 50  # one file in ~50 (by a hash of its relative path) is held out for evaluation


def stdlib_files() -> tuple[list[Path], Path]:
    """The Python standard library's own .py files (not site-packages) and their root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts)), root


def gather_files(data: list[str] | None) -> tuple[list[Path], Path]:
    """Files named by --data (folders give their .py files), or the stdlib; plus their common root."""
    if not data:
        return stdlib_files()
    files: list[Path] = []
    for item in map(Path, data):
        if item.is_dir():
            files.extend(sorted(item.rglob("*.py")))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"--data {item}: no such file or folder")
    if not files:
        raise ValueError(f"--data {data} holds no .py files")
    root = Path(os.path.commonpath([f.resolve().parent for f in files]))
    return sorted(f.resolve() for f in files), root


def is_held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HOLDOUT_EVERY == 0


def split_files(files: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): a fixed split by relative path, the same on every machine."""
    held = [f for f in files if is_held_out(f.resolve().relative_to(root.resolve()).as_posix())]
    return [f for f in files if f not in set(held)], held


def read_texts(files: list[Path]) -> list[str]:
    """UTF-8 text of each file; files that are not UTF-8 (a few stdlib test inputs) are skipped."""
    texts = []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on `texts`: BOS/EOS/pad first (ids 0-2), V4 chat markers as added tokens last."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),  # numbers in groups of 3, as V4
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in CHAT_TOKENS])
    return tok


def encode_corpus(tok, texts: list[str]) -> torch.Tensor:
    """One int32 stream: every file as BOS + its tokens + EOS."""
    parts = [
        torch.tensor([0, *e.ids, 1], dtype=torch.int32)
        for e in tok.encode_batch(texts, add_special_tokens=False)
    ]
    return torch.cat(parts)


class Windows:
    """Non-overlapping windows of `length` tokens from a stream, in a fresh seeded order each epoch.
    The position (epoch, index) is the data state a resumed run restores."""

    def __init__(self, stream: torch.Tensor, length: int, seed: int):
        self.n = stream.numel() // length
        if self.n == 0:
            raise ValueError(
                f"the corpus has {stream.numel()} tokens, fewer than one window of {length}; lower --seq-len"
            )
        self.windows = stream[: self.n * length].view(self.n, length)
        self.seed, self.epoch, self.index = seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))

    def next(self, k: int) -> list[list[int]]:
        out = []
        for _ in range(k):
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.windows[self._order[self.index]].tolist())
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, st: dict) -> None:
        self.epoch, self.index = st["epoch"], st["index"]
        self._order = self._shuffle()
