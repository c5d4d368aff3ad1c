"""Per-sequence state: what a sequence needs to continue, in preallocated buffers indexed by position.

Everything is a function of the sequence's length `pos` and buffers whose rows are keyed by absolute
position, so the state's operations are cheap and exact:

- `Ring`: the rows of the latest `cap` positions, position p in slot p % cap (the sliding window's
  K=V entries, a compressor's per-token rows). Capacity covers what attention or the next compression
  needs plus `max_rollback` positions, so forgetting the last few tokens is only `pos -= n`.
- `Entries`: compressed KV entries (one per closed window), a buffer grown by doubling; how many are
  live follows from `pos` (`pos // ratio`), and an entry, once its window closes, never changes.

A forward step is atomic: layers *stage* their writes while they compute and `commit` applies them
once every layer has succeeded, so a step that raises leaves every state as it was (`discard`).

Operations: `snapshot` / `restore` (independent exact copies, for prefix caches and sessions),
`rollback(n)` (speculative decoding), `tensors` / `load_tensors` (what a snapshot is on disk), and
`nbytes`. This module knows shapes and positions, not the model math that fills the buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DEFAULT_MAX_ROLLBACK = 8  # tokens a state can forget in O(1): the longest speculative block, plus margin


class Ring:
    """Rows of the latest `cap` positions; position p lives in slot p % cap."""

    def __init__(self, cap: int, width: int, dtype: torch.dtype, device):
        self.buf = torch.zeros(cap, width, dtype=dtype, device=device)

    @property
    def cap(self) -> int:
        return self.buf.shape[0]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Rows of positions [lo, hi) in order (hi - lo <= cap); a view when they do not wrap."""
        n = hi - lo
        if n <= 0:
            return self.buf[:0]
        a = lo % self.cap
        if a + n <= self.cap:
            return self.buf[a : a + n]
        return torch.cat([self.buf[a:], self.buf[: a + n - self.cap]])

    def write(self, lo: int, rows: torch.Tensor) -> None:
        """Store rows of positions [lo, lo + len(rows)); only the last `cap` of them can be kept."""
        n, cap = rows.shape[0], self.cap
        if n > cap:
            lo, rows, n = lo + n - cap, rows[n - cap :], cap
        a = lo % cap
        first = min(n, cap - a)
        self.buf[a : a + first] = rows[:first]
        if first < n:
            self.buf[: n - first] = rows[first:]

    def clone(self) -> Ring:
        r = Ring.__new__(Ring)
        r.buf = self.buf.clone()
        return r


class Entries:
    """Compressed entries in a buffer grown by doubling; entry i is row i."""

    def __init__(self, width: int, dtype: torch.dtype, device, cap: int = 16):
        self.buf = torch.zeros(cap, width, dtype=dtype, device=device)

    def view(self, n: int) -> torch.Tensor:
        return self.buf[:n]

    def write(self, first: int, rows: torch.Tensor) -> None:
        end = first + rows.shape[0]
        if end > self.buf.shape[0]:
            cap = max(end, 2 * self.buf.shape[0])
            grown = self.buf.new_zeros(cap, self.buf.shape[1])
            grown[:first] = self.buf[:first]
            self.buf = grown
        self.buf[first:end] = rows

    def clone(self, n: int) -> Entries:
        e = Entries.__new__(Entries)
        e.buf = self.buf[: max(n, 1)].clone()
        return e


@dataclass
class CompressorState:
    """One compressor: its per-token rows `[kv | gate]` (fp32, ape added) and its emitted entries.

    The rows of positions [start(pos), pos) are live: the open window, and for an overlapping (CSA)
    compressor also the previous closed window, whose first half pools into the next entry."""

    ratio: int
    overlap: bool
    rows: Ring
    entries: Entries

    def start(self, pos: int) -> int:
        return max((pos // self.ratio - self.overlap) * self.ratio, 0)

    def clone(self, pos: int) -> CompressorState:
        return CompressorState(self.ratio, self.overlap, self.rows.clone(), self.entries.clone(pos // self.ratio))


@dataclass
class LayerState:
    """One attention layer: the sliding window's K=V entries, and its compressor and indexer."""

    window: Ring
    span: int  # window positions a new query needs besides itself (window_size - 1)
    comp: CompressorState | None = None
    index: CompressorState | None = None
    pending: list[Callable[[], None]] = field(default_factory=list)

    def stage(self, write: Callable[[], None]) -> None:
        self.pending.append(write)

    def commit(self) -> None:
        for write in self.pending:
            write()
        self.pending.clear()

    def discard(self) -> None:
        self.pending.clear()

    def compressors(self) -> list[tuple[str, CompressorState]]:
        return [(k, c) for k, c in (("comp", self.comp), ("index", self.index)) if c is not None]

    def clone(self, pos: int) -> LayerState:
        return LayerState(self.window.clone(), self.span,
                          *(None if c is None else c.clone(pos) for c in (self.comp, self.index)))  # fmt: skip

    def live(self, pos: int, room: int = 0) -> dict[str, torch.Tensor]:
        """What continuing from `pos` needs, in position order; with `room`, also what continuing
        from any of the `room` positions before it needs (so a loaded state can still roll back)."""
        out = {"window": self.window.read(max(pos - room - self.span, 0), pos)}
        for k, c in self.compressors():
            out[f"{k}.rows"] = c.rows.read(c.start(pos - room), pos)
            out[f"{k}.entries"] = c.entries.view(pos // c.ratio)
        return out

    def load(self, pos: int, d: dict[str, torch.Tensor], where: str, room: int = 0) -> None:
        want = {k: t.shape for k, t in self.live(pos, room).items()}
        for k, c in self.compressors():  # a fresh entry buffer is shorter than what it will hold
            want[f"{k}.entries"] = torch.Size((pos // c.ratio, c.entries.buf.shape[1]))
        dtypes = {k: t.dtype for k, t in self.live(pos, room).items()}
        if set(d) != set(want):
            raise ValueError(f"{where}: state tensors {sorted(d)}, expected {sorted(want)}")
        for k, t in d.items():
            if t.shape != want[k] or t.dtype != dtypes[k]:
                raise ValueError(f"{where}.{k}: shape {tuple(t.shape)} {t.dtype}, expected "
                                 f"{tuple(want[k])} {dtypes[k]}")  # fmt: skip
        dev = self.window.buf.device
        self.window.write(max(pos - room - self.span, 0), d["window"].to(dev))
        for k, c in self.compressors():
            c.rows.write(c.start(pos - room), d[f"{k}.rows"].to(dev))
            c.entries.write(0, d[f"{k}.entries"].to(dev))


@dataclass
class SeqState:
    """Everything a sequence needs to continue: per-layer state, the MTP block's, and its length.

    `room` counts the latest tokens that `rollback` may still forget (at most `max_rollback`)."""

    layers: list[LayerState]
    mtp: list[LayerState] = field(default_factory=list)
    pos: int = 0
    max_rollback: int = DEFAULT_MAX_ROLLBACK
    room: int = 0

    def _all(self) -> list[LayerState]:
        return self.layers + self.mtp

    def advance(self, n: int) -> None:
        """Commit the staged writes of a step of n tokens (a DSpark draft's context rings included)."""
        for ls in self._all():
            ls.commit()
        self.pos += n
        self.room = min(self.max_rollback, self.room + n)

    def discard(self) -> None:
        for ls in self._all():
            ls.discard()

    def rollback(self, n: int) -> None:
        """Forget the last n tokens exactly: the state becomes what it was before they were fed."""
        if not 0 <= n <= self.room:
            raise ValueError(f"cannot roll back {n} tokens: only the last {self.room} can be forgotten "
                             f"(max_rollback {self.max_rollback})")  # fmt: skip
        self.pos -= n
        self.room -= n

    def snapshot(self) -> SeqState:
        """An independent exact copy: later steps, rollbacks or restores of either leave the other alone."""
        return SeqState([x.clone(self.pos) for x in self.layers], [x.clone(self.pos) for x in self.mtp],
                        self.pos, self.max_rollback, self.room)  # fmt: skip

    def restore(self, snap: SeqState) -> None:
        """Become equal to `snap`, which stays usable for further restores."""
        copy = snap.snapshot()
        self.layers, self.mtp, self.pos, self.room = copy.layers, copy.mtp, copy.pos, copy.room

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live content under stable names (`layers.3.comp.entries`, ...), plus `pos` and `room`:
        what continuing from `pos`, or from any of the `room` positions `rollback` may return to, needs."""
        out = {"pos": torch.tensor(self.pos, dtype=torch.int64), "room": torch.tensor(self.room, dtype=torch.int64)}
        for group, states in (("layers", self.layers), ("mtp", self.mtp)):
            for i, ls in enumerate(states):
                for k, t in ls.live(self.pos, self.room).items():
                    out[f"{group}.{i}.{k}"] = t.contiguous()
        return out

    def load_tensors(self, d: dict[str, torch.Tensor]) -> None:
        """Load what `tensors()` gave into this fresh state; a ValueError names any mismatch."""
        if self.pos:
            raise ValueError("load_tensors needs a fresh state (pos 0)")
        if "pos" not in d:
            raise ValueError("state tensors lack 'pos'")
        pos, room = int(d["pos"]), int(d.get("room", 0))
        if not 0 <= room <= min(pos, self.max_rollback):
            raise ValueError(f"state tensors: room {room}, expected 0..{min(pos, self.max_rollback)} "
                             f"(pos {pos}, max_rollback {self.max_rollback})")  # fmt: skip
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in d.items():
            if name not in ("pos", "room"):
                group, i, key = name.split(".", 2)
                by_layer.setdefault(f"{group}.{i}", {})[key] = t
        want = {f"{g}.{i}" for g, states in (("layers", self.layers), ("mtp", self.mtp)) for i in range(len(states))}
        if set(by_layer) != want:
            raise ValueError(f"state tensors cover layers {sorted(by_layer)}, expected {sorted(want)}")
        for group, states in (("layers", self.layers), ("mtp", self.mtp)):
            for i, ls in enumerate(states):
                ls.load(pos, by_layer[f"{group}.{i}"], f"{group}.{i}", room)
        self.pos, self.room = pos, room

    def nbytes(self) -> int:
        """Bytes allocated for this state."""
        total = 0
        for ls in self._all():
            total += ls.window.buf.nbytes
            for _, c in ls.compressors():
                total += c.rows.buf.nbytes + c.entries.buf.nbytes
        return total

    def live_nbytes(self) -> int:
        """Bytes that `tensors()` returns (what a snapshot on disk holds)."""
        return sum(t.nbytes for t in self.tensors().values())
