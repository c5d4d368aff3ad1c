"""Prefix cache: snapshots of sequence state keyed by the token prefix they hold, in RAM and on disk.

A prompt that starts with the tokens of a snapshot restores it and prefills only the rest. Keys are
sha256 digests over the model identity (checkpoint fingerprint, numerics, dtype) and the token ids.
A snapshot of `pos` tokens with rollback room `r` (`SeqState.room`) serves any prompt sharing at least
its first `pos - r` tokens: it is restored and rolled back to where the prompt diverges (thinking mode
renders the previous prompt's last token, `<think>`, differently in the next turn). At least one
prompt token is always left to feed, so the first sampled token has logits.

RAM tier: the snapshots (`SeqState.snapshot`), least recently used first out beyond `ram_bytes`
(`SeqState.nbytes`). Disk tier (optional, `DIR`): one safetensors file per snapshot in
`DIR/<identity[:16]>/<digest>.safetensors`; the tensors are `SeqState.tensors()`, the header's
`__metadata__` is the manifest: `format` (FORMAT), `identity`, `tokens` (JSON list), `pos`, `room`,
`sha256` (of the file's data section). A background thread writes each file to a temporary name
and renames it (a crash mid-write leaves no file under a final name); every file under DIR counts
towards `disk_bytes`, least recently used (mtime) deleted first. A file that cannot be read, whose
manifest, identity or checksum does not match, or whose tensors do not fit the model's state is
skipped with a warning (and deleted if it sits in this model's folder): it can cost a prefill, never
change an answer.

It knows `SeqState`'s operations and the file format, not the model math, the server or the chat format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .state import SeqState

log = logging.getLogger("dsv4.prefix_cache")

FORMAT = "dsv4-prefix-cache/1"
# snapshot granularity inside a prompt, in tokens: bytes per snapshot against the prefill a mid-prompt
# divergence repeats, measured by bench/bench_agent.py --granularity (README "Prompt cache")
DEFAULT_EVERY = 512
DEFAULT_DISK_BYTES = 8 << 30
RAM_SHARE = 16  # the prefix cache may hold 1/16 of the RAM budget ...
RAM_SHARE_MAX = 4 << 30  # ... and at most 4 GiB


def ram_share(ram_budget: int | None, available: int) -> int:
    """The RAM the prefix cache may hold: 1/16 of --max-ram (of the available memory without a budget),
    at most 4 GiB. The expert cache is sized from what the budget leaves after it."""
    return min((ram_budget if ram_budget is not None else available) // RAM_SHARE, RAM_SHARE_MAX)


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over config.json and, per safetensors shard, its name, size, header and three 64 KiB
    samples of its data (start, middle, end): cheap at startup, and any re-export or retrain changes it."""
    path = Path(path)
    h = hashlib.sha256()
    cfg = path / "config.json"
    h.update(cfg.read_bytes() if cfg.exists() else b"")
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(fh.read(min(n, 100 << 20)))
            for at in (0, size // 2, max(size - (64 << 10), 0)):
                fh.seek(at)
                h.update(fh.read(64 << 10))
    return h.hexdigest()


def model_identity(engine) -> str:
    """What a snapshot is only valid for: the checkpoint's fingerprint, the numerics and the dtype."""
    model = engine.model
    ckpt = getattr(engine, "checkpoint", None)
    source = checkpoint_fingerprint(ckpt.path) if ckpt is not None else f"in-memory:{id(model)}"
    numerics = "released" if model.numerics.released else "exact"
    return hashlib.sha256(f"{FORMAT}|{source}|{numerics}|{model.numerics.dtype}".encode()).hexdigest()


def _digests(identity: str, tokens: Sequence[int], lengths: list[int]) -> dict[int, str]:
    """Digest of tokens[:n] for every n in `lengths` (one pass over the tokens)."""
    h = hashlib.sha256(identity.encode())
    out, done = {}, 0
    for n in sorted(set(lengths)):
        h.update(array("q", tokens[done:n]).tobytes())
        done = n
        out[n] = h.copy().hexdigest()
    return out


@dataclass
class Entry:
    """One snapshot of `pos` tokens; serves prompts sharing its first `pos - room` tokens (the anchor)."""

    digest: str
    anchor: str
    pos: int
    room: int
    tail: tuple[int, ...]  # the last `room` tokens
    tokens: list[int] | None = None  # all of them, until written to disk
    snap: SeqState | None = None  # in RAM
    nbytes: int = 0
    file: Path | None = None  # on disk


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    tokens_saved: int = 0
    inserted: int = 0
    skipped_files: int = 0  # unreadable, foreign or corrupt files passed over
    ram_bytes: int = 0
    disk_bytes: int = 0


class PrefixCache:
    """Snapshots by token prefix. `lookup` and `insert` may be called from any thread."""

    def __init__(self, identity: str, new_state: Callable[[], SeqState], *, ram_bytes: int,
                 disk_dir: str | Path | None = None, disk_bytes: int = DEFAULT_DISK_BYTES,
                 every: int = DEFAULT_EVERY):  # fmt: skip
        if every < 1:
            raise ValueError(f"snapshot granularity must be at least 1 token, got {every}")
        self.identity, self.new_state = identity, new_state
        self.ram_bytes, self.disk_bytes, self.every = max(0, ram_bytes), max(0, disk_bytes), every
        self.stats = CacheStats()
        self._entries: dict[str, Entry] = {}
        self._anchors: dict[int, dict[str, list[Entry]]] = {}  # anchor length -> anchor digest -> entries
        self._lru: OrderedDict[str, None] = OrderedDict()  # RAM-held digests, least recent first
        self._max_room = 0
        self._lock = threading.RLock()
        self.root = Path(disk_dir) if disk_dir is not None else None
        self.dir = self.root / identity[:16] if self.root is not None else None
        self._writes: queue.Queue = queue.Queue()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._scan()
            threading.Thread(target=self._writer, name="dsv4-prefix-cache-writer", daemon=True).start()

    # ---- policy ----

    def boundary(self, before: int, after: int, prompt_len: int) -> bool:
        """Whether a prefill step from `before` to `after` tokens should leave a snapshot: at the end of
        the prompt, and when it crossed a multiple of `every`."""
        return after <= prompt_len and (after == prompt_len or after // self.every > before // self.every)

    # ---- index ----

    def _add(self, e: Entry) -> None:
        self._entries[e.digest] = e
        self._max_room = max(self._max_room, e.room)
        self._anchors.setdefault(e.pos - e.room, {}).setdefault(e.anchor, []).append(e)

    def _drop(self, e: Entry) -> None:
        if self._entries.pop(e.digest, None) is None:
            return
        group = self._anchors[e.pos - e.room]
        group[e.anchor].remove(e)
        if not group[e.anchor]:
            del group[e.anchor]
        if not group:
            del self._anchors[e.pos - e.room]
        self._forget_ram(e)

    def _forget_ram(self, e: Entry) -> None:
        if e.snap is not None:
            self._lru.pop(e.digest, None)
            self.stats.ram_bytes -= e.nbytes
            e.snap = None

    def _best(self, tokens: Sequence[int]) -> tuple[Entry, int] | None:
        """The entry that serves the most of tokens[:-1], and how many tokens it serves."""
        limit = len(tokens) - 1
        lengths = sorted((a for a in self._anchors if 0 < a <= limit), reverse=True)
        if not lengths:
            return None
        digests = _digests(self.identity, tokens, lengths)
        best: tuple[Entry, int] | None = None
        for a in lengths:
            if best is not None and a + self._max_room <= best[1]:
                break
            for e in self._anchors[a].get(digests[a], []):
                if e.snap is None and e.file is None:
                    continue  # evicted from RAM, its file not written yet
                common = 0
                while common < e.room and a + common < limit and e.tail[common] == tokens[a + common]:
                    common += 1
                if best is None or a + common > best[1]:
                    best = (e, a + common)
        return best

    # ---- the two operations ----

    def lookup(self, tokens: Sequence[int]) -> tuple[SeqState, int] | None:
        """A fresh state holding the longest cached prefix of tokens[:-1], and its length; None on a miss."""
        with self._lock:
            self.stats.lookups += 1
            while (found := self._best(tokens)) is not None:
                e, n = found
                snap = e.snap if e.snap is not None else self._read(e)
                if snap is None:
                    continue  # a bad file, dropped: try the next best
                state = self.new_state()
                state.restore(snap)
                state.rollback(e.pos - n)
                if e.snap is not None:
                    self._lru.move_to_end(e.digest)
                else:
                    self._hold(e, snap)
                if e.file is not None:
                    _touch(e.file)
                self.stats.hits += 1
                self.stats.tokens_saved += n
                return state, n
        return None

    def insert(self, tokens: Sequence[int], state: SeqState) -> None:
        """Keep a snapshot of `state`, which holds exactly `tokens` (a no-op if that prefix is kept)."""
        if len(tokens) != state.pos:
            raise ValueError(f"the state holds {state.pos} tokens, {len(tokens)} given")
        room = min(state.room, state.pos - 1)
        if state.pos < 1 or room < 0:
            return
        anchor = state.pos - room
        ds = _digests(self.identity, tokens, [anchor, state.pos])
        with self._lock:
            e = self._entries.get(ds[state.pos])
            if e is not None:
                if e.snap is not None:
                    self._lru.move_to_end(e.digest)
                return
            snap = state.snapshot()
            if room != snap.room:
                snap.room = room
            # the full token list only until its file is written (it is the manifest); the index needs the tail
            e = Entry(ds[state.pos], ds[anchor], state.pos, room, tuple(tokens[anchor:]),
                      list(tokens) if self.dir is not None else None)  # fmt: skip
            self._add(e)
            self._hold(e, snap)
            self.stats.inserted += 1
        if self.dir is not None:
            self._writes.put((e, snap))

    def _hold(self, e: Entry, snap: SeqState) -> None:
        e.snap, e.nbytes = snap, snap.nbytes()
        self._lru[e.digest] = None
        self.stats.ram_bytes += e.nbytes
        while self.stats.ram_bytes > self.ram_bytes and self._lru:
            old = self._entries[next(iter(self._lru))]
            self._forget_ram(old)
            if self.dir is None:
                self._drop(old)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every queued disk write is done."""
        end = time.monotonic() + timeout
        while self._writes.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)

    def summary(self) -> dict[str, int]:
        with self._lock:
            s = self.stats
            return {"lookups": s.lookups, "hits": s.hits, "tokens_saved": s.tokens_saved, "inserted": s.inserted,
                    "entries": len(self._entries), "ram_bytes": s.ram_bytes, "disk_bytes": s.disk_bytes,
                    "skipped_files": s.skipped_files}  # fmt: skip

    # ---- disk ----

    def _skip(self, f: Path, why: str, delete: bool) -> None:
        log.warning("prompt cache: skipping %s: %s", f, why)
        self.stats.skipped_files += 1
        if delete:
            f.unlink(missing_ok=True)

    def _scan(self) -> None:
        """Index this model's files from their manifests (the tensors are read on first use)."""
        now = time.time()
        for f in self.dir.glob(".tmp-*"):
            if now - f.stat().st_mtime > 600:  # left by a crash mid-write
                f.unlink(missing_ok=True)
        for f in sorted(self.dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            try:
                meta = _read_manifest(f)
                tokens = [int(t) for t in json.loads(meta["tokens"])]
                pos, room = int(meta["pos"]), int(meta["room"])
            except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
                self._skip(f, f"unreadable manifest ({e})", delete=True)
                continue
            if meta.get("format") != FORMAT or meta.get("identity") != self.identity:
                self._skip(f, "written for another model, numerics or dtype", delete=False)
                continue
            ds = _digests(self.identity, tokens, [pos - room, pos]) if 0 <= room < pos == len(tokens) else {}
            if ds.get(pos) != f.stem:
                self._skip(f, "its manifest does not match its name", delete=True)
                continue
            self._add(Entry(f.stem, ds[pos - room], pos, room, tuple(tokens[pos - room :]), file=f))
        self.stats.disk_bytes = self._disk_usage()[1]

    def _read(self, e: Entry) -> SeqState | None:
        """The snapshot in e's file, or None (the entry dropped, a warning logged) if it is bad."""
        try:
            from safetensors.torch import load

            raw = e.file.read_bytes()
            meta, data = _split(raw)
            if meta.get("sha256") != hashlib.sha256(data).hexdigest():
                raise ValueError("checksum mismatch (a damaged or truncated file)")
            tensors = load(raw)
            state = self.new_state()
            state.load_tensors(tensors)
            if (state.pos, state.room) != (e.pos, e.room):
                raise ValueError(
                    f"holds pos {state.pos} room {state.room}, its manifest says {e.pos}, {e.room}"
                )
        except Exception as exc:  # safetensors raises its own error types for damaged files
            self._skip(e.file, str(exc) or type(exc).__name__, delete=True)
            self._drop(e)
            return None
        return state

    def _writer(self) -> None:
        while True:
            e, snap = self._writes.get()
            try:
                self._write(e, snap)
            except Exception:
                log.exception("prompt cache: writing a snapshot to %s failed", self.dir)
            finally:
                self._writes.task_done()

    def _write(self, e: Entry, snap: SeqState) -> None:
        from safetensors.torch import save

        tensors = snap.tensors()
        meta = {"format": FORMAT, "identity": self.identity, "tokens": json.dumps(e.tokens), "pos": str(e.pos),
                "room": str(e.room)}  # fmt: skip
        meta["sha256"] = hashlib.sha256(_split(save(tensors, metadata=meta))[1]).hexdigest()
        data = save(tensors, metadata=meta)  # the same data section, its checksum now in the header
        if len(data) > self.disk_bytes:
            return
        final = self.dir / f"{e.digest}.safetensors"
        tmp = self.dir / f".tmp-{e.digest}-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        with self._lock:
            e.tokens = None
            if e.digest in self._entries:
                e.file = final
            self._evict_disk()

    def _disk_usage(self) -> tuple[list[tuple[float, int, Path]], int]:
        files = []
        for f in self.root.glob("*/*.safetensors"):
            try:
                st = f.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, f))
        files.sort()
        return files, sum(size for _, size, _ in files)

    def _evict_disk(self) -> None:
        """Delete the least recently used files under the root until they fit `disk_bytes`."""
        files, total = self._disk_usage()
        by_file = {e.file: e for e in self._entries.values() if e.file is not None}
        for _, size, f in files:
            if total <= self.disk_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
            e = by_file.get(f)
            if e is not None:
                e.file = None
                if e.snap is None:
                    self._drop(e)
        self.stats.disk_bytes = total


def _touch(f: Path) -> None:
    try:
        os.utime(f)
    except OSError:
        pass


def _split(raw: bytes) -> tuple[dict[str, str], bytes]:
    """A safetensors file's manifest (`__metadata__`) and data section."""
    if len(raw) < 8:
        raise ValueError("truncated header")
    n = struct.unpack("<Q", raw[:8])[0]
    if 8 + n > len(raw):
        raise ValueError("truncated header")
    meta = json.loads(raw[8 : 8 + n]).get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no __metadata__")
    return meta, raw[8 + n :]


def _read_manifest(f: Path) -> dict[str, str]:
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        if n > 64 << 20:
            raise ValueError(f"header of {n} bytes")
        raw = fh.read(n)
    if len(raw) != n:
        raise ValueError("truncated header")
    meta = json.loads(raw).get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no __metadata__")
    return meta


def for_engine(engine, *, disk_dir: str | Path | None = None, ram: int | str | None = "auto",
               disk: int | str | None = None, every: int = DEFAULT_EVERY) -> PrefixCache | None:  # fmt: skip
    """The engine's prefix cache: `ram` bytes ("auto": the share `load(prompt_cache=True)` set aside, else
    `ram_share` of the available memory; 0: none), files under `disk_dir` up to `disk` bytes (default 8 GiB).
    None when it would hold nothing."""
    from .memory import available_bytes, parse_size

    if isinstance(ram, str) and ram.lower() == "auto":
        ram = getattr(engine.model, "prompt_cache_bytes", None)
        ram = ram if ram is not None else ram_share(None, available_bytes())
    ram = parse_size(ram) or 0
    if not ram and disk_dir is None:
        return None
    disk_bytes = parse_size(disk) if disk is not None else DEFAULT_DISK_BYTES
    return PrefixCache(model_identity(engine), engine.new_state, ram_bytes=ram, disk_dir=disk_dir,
                       disk_bytes=disk_bytes, every=every)  # fmt: skip


def prefill(
    engine, cache: PrefixCache, ids: list[int], state: SeqState | None = None
) -> tuple[SeqState, int]:
    """A state holding ids[:-1] (the last token is left for the generator to feed), and how many of those
    tokens came from the cache. Without `state` the longest cached prefix is restored; with one (holding
    a prefix of ids, a chat session's own) it is continued. The rest is fed in pieces that end at the
    cache's boundaries, each kept."""
    restored = 0
    if state is None:
        found = cache.lookup(ids)
        state, restored = found if found is not None else (engine.new_state(), 0)
    done, end = state.pos, len(ids) - 1
    while done < end:
        nxt = min((done // cache.every + 1) * cache.every, end)
        engine.step([ids[done:nxt]], [state])
        done = nxt
        cache.insert(ids[:done], state)
    return state, restored
