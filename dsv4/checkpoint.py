"""Lazy, validated access to a DeepSeek V4 checkpoint folder.

Reads sharded safetensors (`model.safetensors.index.json`) or single/unindexed files, memory-mapped,
one tensor at a time. Both namings are accepted and exposed under the official names (no `model.`
prefix, `layers.N.attn.wq_a`, `ffn.experts.E.w1`, ...): transformers names are mapped, and its fused
`mlp.experts.gate_up_proj` / `down_proj` are served per expert through slices.

`Checkpoint.validate(cfg)` compares every tensor's presence, shape and dtype with what the config
implies and raises `CheckpointError` naming the tensor, the file, what was expected and what was
found, before any compute. This module knows the file layout, not the model math.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .quant import FP4_BLOCK, FP8_BLOCK, MXFP4, Dense, FP8Block, Weight

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8, torch.float32)
_DTYPE_NAMES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8, "U8": torch.uint8,
    "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "BOOL": torch.bool, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (raised before any compute), or a shard that can no
    longer be read as it was when the folder was opened (I/O error, cut short, replaced, removed)."""


@dataclass(frozen=True)
class Entry:
    """Where one official-named tensor lives: a file, the stored name and an optional slice."""

    file: Path
    stored: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sub: tuple[int, int] | None = None  # (offset, length) in bytes of a slice of a fused tensor (transformers')


# transformers name -> official name, applied to the part after `model.layers.N.`
_HF_LAYER_RENAMES = [
    (r"input_layernorm\.", "attn_norm."),
    (r"post_attention_layernorm\.", "ffn_norm."),
    (r"attn_hc\.(fn|base|scale)$", r"hc_attn_\1"),
    (r"ffn_hc\.(fn|base|scale)$", r"hc_ffn_\1"),
    (r"self_attn\.compressor\.indexer\.q_b_proj\.", "attn.indexer.wq_b."),
    (r"self_attn\.compressor\.indexer\.scorer\.weights_proj\.", "attn.indexer.weights_proj."),
    (r"self_attn\.compressor\.indexer\.kv_proj\.", "attn.indexer.compressor.wkv."),
    (r"self_attn\.compressor\.indexer\.gate_proj\.", "attn.indexer.compressor.wgate."),
    (r"self_attn\.compressor\.indexer\.position_bias$", "attn.indexer.compressor.ape"),
    (r"self_attn\.compressor\.indexer\.kv_norm\.", "attn.indexer.compressor.norm."),
    (r"self_attn\.compressor\.kv_proj\.", "attn.compressor.wkv."),
    (r"self_attn\.compressor\.gate_proj\.", "attn.compressor.wgate."),
    (r"self_attn\.compressor\.position_bias$", "attn.compressor.ape"),
    (r"self_attn\.compressor\.kv_norm\.", "attn.compressor.norm."),
    (r"self_attn\.q_a_proj\.", "attn.wq_a."),
    (r"self_attn\.q_a_norm\.", "attn.q_norm."),
    (r"self_attn\.q_b_proj\.", "attn.wq_b."),
    (r"self_attn\.kv_proj\.", "attn.wkv."),
    (r"self_attn\.kv_norm\.", "attn.kv_norm."),
    (r"self_attn\.o_a_proj\.", "attn.wo_a."),
    (r"self_attn\.o_b_proj\.", "attn.wo_b."),
    (r"self_attn\.sinks$", "attn.attn_sink"),
    (r"mlp\.gate\.e_score_correction_bias$", "ffn.gate.bias"),
    (r"mlp\.gate\.", "ffn.gate."),
    (r"mlp\.shared_experts\.gate_proj\.", "ffn.shared_experts.w1."),
    (r"mlp\.shared_experts\.up_proj\.", "ffn.shared_experts.w3."),
    (r"mlp\.shared_experts\.down_proj\.", "ffn.shared_experts.w2."),
]
_HF_TOP_RENAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def official_name(stored: str) -> str:
    """Map a transformers tensor name to the official one (official names pass through)."""
    if stored in _HF_TOP_RENAMES:
        return _HF_TOP_RENAMES[stored]
    name = stored.replace(".weight_scale_inv", ".scale")
    m = re.match(r"(?:model\.)?layers\.(\d+)\.(.*)$", name)
    if not m:
        return name
    rest = m.group(2)
    for pat, rep in _HF_LAYER_RENAMES:
        new = re.sub(pat, rep, rest)
        if new != rest:
            rest = new
            break
    # transformers' save_pretrained writes official names under `model.`, but kv_norm as `attn.norm`
    rest = re.sub(r"^attn\.norm\.", "attn.kv_norm.", rest)
    return f"layers.{m.group(1)}.{rest}"


class Checkpoint:
    """A checkpoint folder: tensor names, shapes and dtypes up front; data read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.path} does not exist")
        self.entries: dict[str, Entry] = {}
        self._handles: dict[Path, object] = {}
        self._offsets: dict[Path, dict[str, tuple[int, int]]] = {}
        self._fds: dict[Path, int] = {}
        self._stamps: dict[Path, tuple[int, int]] = {}  # (size, mtime) of each shard as opened
        self._lock = threading.Lock()
        for file, names in self._files().items():
            if not file.exists():
                raise CheckpointError(f"the index lists shard {file.name}, which is missing from {self.path}")
            self._stamps[file] = _stamp(os.stat(file))
            handle = self._open(file)
            for stored in names:
                if stored not in handle.keys():
                    raise CheckpointError(f"the index puts tensor {stored!r} in {file.name}, which does not hold it")
                self._add(file, stored, handle.get_slice(stored))

    # ---- discovery ----

    def _files(self) -> dict[Path, list[str]]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {e}") from None
            files: dict[Path, list[str]] = {}
            for name, fname in weight_map.items():
                files.setdefault(self.path / fname, []).append(name)
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"no model.safetensors.index.json and no *.safetensors files in {self.path}")
        return {f: list(self._open(f).keys()) for f in shards}

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"cannot read {file}: {e}") from None
        return self._handles[file]

    def _add(self, file: Path, stored: str, sl) -> None:
        dtype = _DTYPE_NAMES.get(sl.get_dtype())
        if dtype is None:
            raise CheckpointError(f"tensor {stored!r} in {file.name} has unsupported dtype {sl.get_dtype()}")
        shape = tuple(sl.get_shape())
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", stored)
        if m:  # transformers' fused experts: expose one virtual tensor per expert and projection
            self._add_fused_experts(file, stored, int(m.group(1)), m.group(2), shape, dtype)
            return
        self.entries[official_name(stored)] = Entry(file, stored, shape, dtype)

    def _add_fused_experts(self, file, stored, layer, kind, shape, dtype) -> None:
        if len(shape) != 3:
            raise CheckpointError(f"fused expert tensor {stored!r} in {file.name} must be 3-D, found {list(shape)}")
        n_exp, rows, cols = shape
        row_bytes = cols * dtype.itemsize

        def part(e: int, lo: int, hi: int) -> Entry:
            sub = ((e * rows + lo) * row_bytes, (hi - lo) * row_bytes)
            return Entry(file, stored, (hi - lo, cols), dtype, sub)

        for e in range(n_exp):
            prefix = f"layers.{layer}.ffn.experts.{e}"
            if kind == "down_proj":
                self.entries[f"{prefix}.w2.weight"] = part(e, 0, rows)
            else:
                self.entries[f"{prefix}.w1.weight"] = part(e, 0, rows // 2)
                self.entries[f"{prefix}.w3.weight"] = part(e, rows // 2, rows)

    # ---- reading ----

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> Iterator[str]:
        return iter(self.entries)

    def tensor(self, name: str, drop_page_cache: bool = True) -> torch.Tensor:
        """Read one tensor (official name) with positioned reads into fresh anonymous memory (thread-safe).

        Never a view of the file: nothing stays memory-mapped, so what the model holds is resident,
        counted in RSS from the start, and never paged back in from the file behind the budget's back.
        drop_page_cache releases the file pages just read (posix_fadvise DONTNEED): they would otherwise
        count against a memory cgroup."""
        entry = self.entries.get(name)
        if entry is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.path}")
        file = entry.file
        try:
            fd = self._fd(file)
            self._check_unchanged(file, os.fstat(fd))
            _, offset, length = self.location(name)
            out = torch.empty(length, dtype=torch.uint8)
            view, done = memoryview(out.numpy()), 0
            while done < length:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise CheckpointError(f"short read of {name!r} from {file} at byte {offset + done}: truncated file?")
                done += n
        except OSError as e:  # EIO, a vanished file, ...: name what was being read
            raise CheckpointError(f"reading {name!r} from {file} failed: {e}") from e
        if drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        return out.view(entry.dtype).reshape(entry.shape)

    def _check_unchanged(self, file: Path, st: os.stat_result) -> None:
        """Offsets were taken from the shard as opened: a shard rewritten since would give wrong bytes."""
        was = self._stamps.get(file)
        if was is not None and _stamp(st) != was:
            raise CheckpointError(
                f"{file} changed after the checkpoint was opened (size {was[0]} -> {st.st_size} bytes, or its "
                "modification time): restart to load the new files"
            )

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def weight(self, prefix: str, dtype: torch.dtype) -> Weight:
        """The linear weight `<prefix>.weight` as its format object (FP8 / MXFP4 stay packed)."""
        w = self.tensor(f"{prefix}.weight")
        scale_name = f"{prefix}.scale"
        if w.dtype == torch.float8_e4m3fn:
            return FP8Block(w, self.tensor(scale_name))
        if w.dtype in (torch.int8, torch.uint8):
            return MXFP4(w.view(torch.int8), self.tensor(scale_name))
        return Dense(w.to(dtype))

    def location(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute byte offset, byte length) of a tensor's data, for direct reads."""
        e = self.entries[name]
        if e.file not in self._offsets:
            self._offsets[e.file] = _data_offsets(e.file)
        start, end = self._offsets[e.file][e.stored]
        if e.sub is not None:
            return e.file, start + e.sub[0], e.sub[1]
        return e.file, start, end - start

    def close(self) -> None:
        """Drop the header memory maps and file descriptors; later reads reopen what they need."""
        with self._lock:
            self._handles.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def nbytes(self, name: str) -> int:
        e = self.entries[name]
        n = 1
        for s in e.shape:
            n *= s
        return n * e.dtype.itemsize

    # ---- validation ----

    def release(self, cfg: ModelConfig) -> Release:
        """Which V4 release this folder holds (see `detect_release`)."""
        return detect_release(cfg, self.entries, self.path)

    def validate(self, cfg: ModelConfig) -> Release:
        """Check every tensor against the config and the detected release; raise CheckpointError on the
        first mismatch. Returns the release."""
        release = self.release(cfg)
        expected = expected_tensors(cfg, with_mtp=release.draft == "mtp", dspark_stages=release.dspark_stages)
        for name, spec in expected.items():
            if name not in self.entries:
                where = "the checkpoint"
                raise CheckpointError(f"missing tensor {name!r} ({spec.describe()}) in {where} at {self.path}")
            spec.check(name, self.entries[name], self.entries.get(spec.scale_name(name)))
        allowed = set(expected) | {spec.scale_name(n) for n, spec in expected.items() if spec.kind == "linear"}
        for name, e in self.entries.items():
            if name not in allowed:
                raise CheckpointError(
                    f"unexpected tensor {name!r} (stored as {e.stored!r} in {e.file.name}, shape {list(e.shape)}): "
                    f"the config ({cfg.n_layers} layers, {cfg.n_routed_experts} experts) and the {release.describe()} "
                    "layout do not use it"
                )
        return release


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def _data_offsets(file: Path) -> dict[str, tuple[int, int]]:
    """Absolute [start, end) byte ranges of every tensor in a safetensors file, from its header."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}


@dataclass(frozen=True)
class Spec:
    """What one tensor must look like. kind: 'linear' (a matmul weight), 'float', 'f32' or 'index'."""

    shape: tuple[int, ...]
    kind: str
    fp4_ok: bool = False  # routed experts may ship as MXFP4

    def describe(self) -> str:
        kinds = {
            "linear": "bf16/fp16/fp32, FP8 e4m3 + block scale" + (", or MXFP4 + e8m0 scale" if self.fp4_ok else ""),
            "float": "bf16/fp16/fp32",
            "f32": "fp32 (bf16/fp16 accepted)",
            "index": "int64/int32",
        }
        return f"shape {list(self.shape)}, {kinds[self.kind]}"

    @staticmethod
    def scale_name(name: str) -> str:
        return name[: -len(".weight")] + ".scale" if name.endswith(".weight") else name + ".scale"

    def check(self, name: str, e: Entry, scale: Entry | None) -> None:
        where = f"tensor {name!r} (stored as {e.stored!r} in {e.file.name})"
        if self.kind == "index":
            if e.dtype not in (torch.int64, torch.int32) or e.shape != self.shape:
                raise CheckpointError(f"{where}: expected {self.describe()}, found {e.dtype} {list(e.shape)}")
            return
        if self.kind != "linear" or e.dtype in FLOAT_DTYPES:
            if e.dtype not in FLOAT_DTYPES or e.shape != self.shape:
                raise CheckpointError(f"{where}: expected {self.describe()}, found {e.dtype} {list(e.shape)}")
            return
        out_f, in_f = self.shape
        if e.dtype == torch.float8_e4m3fn:
            want_scale = (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK))
            want_w = self.shape
        elif e.dtype in (torch.int8, torch.uint8) and self.fp4_ok:
            want_scale, want_w = (out_f, in_f // FP4_BLOCK), (out_f, in_f // 2)
        else:
            raise CheckpointError(f"{where}: expected {self.describe()}, found {e.dtype} {list(e.shape)}")
        if e.shape != want_w:
            raise CheckpointError(f"{where}: expected packed shape {list(want_w)} for a {out_f}x{in_f} weight, found {list(e.shape)}")
        if scale is None:
            raise CheckpointError(f"{where} is quantized ({e.dtype}) but its scale {self.scale_name(name)!r} is missing")
        if scale.dtype not in SCALE_DTYPES or scale.shape != want_scale:
            raise CheckpointError(
                f"scale {self.scale_name(name)!r} (in {scale.file.name}): expected e8m0/fp32 {list(want_scale)}, "
                f"found {scale.dtype} {list(scale.shape)}"
            )


def expected_tensors(cfg: ModelConfig, with_mtp: bool, dspark_stages: int = 0) -> dict[str, Spec]:
    """Every tensor the config implies, by official name: the backbone, plus the preview's MTP layer
    (with_mtp) or a DSpark draft of `dspark_stages` stages (0731-style releases)."""
    d, n = cfg.dim, cfg.hc_mult
    out: dict[str, Spec] = {
        "embed.weight": Spec((cfg.vocab_size, d), "float"),
        "head.weight": Spec((cfg.vocab_size, d), "float"),
        "norm.weight": Spec((d,), "float"),
        **_hc_head_specs("", n, d),
    }
    for i in range(cfg.n_layers):
        out.update(block_specs(cfg, f"layers.{i}", cfg.compress_ratios[i], cfg.csa_layers[i], cfg.hash_layers[i]))
    if with_mtp:
        for j in range(cfg.n_mtp_layers):
            p = f"mtp.{j}"
            ratio = cfg.mtp_compress_ratio
            out.update(block_specs(cfg, p, ratio, cfg.mtp_csa, False))
            out.update(_hc_head_specs(f"{p}.", n, d))
            out[f"{p}.e_proj.weight"] = Spec((d, d), "linear")
            out[f"{p}.h_proj.weight"] = Spec((d, d), "linear")
            for norm in ("enorm", "hnorm", "norm"):
                out[f"{p}.{norm}.weight"] = Spec((d,), "float")
    if dspark_stages:
        out.update(dspark_specs(cfg, dspark_stages))
    return out


def dspark_specs(cfg: ModelConfig, stages: int) -> dict[str, Spec]:
    """The DSpark draft: `stages` window-only, score-routed blocks `mtp.0..`; the first also holds the
    context projection of the captured target layers, the last the hc head, norm, Markov and
    confidence heads. Embedding and head are the target's."""
    d, rank = cfg.dim, cfg.dspark_markov_rank
    out: dict[str, Spec] = {}
    for s in range(stages):
        out.update(block_specs(cfg, f"mtp.{s}", 0, False, False))
    out["mtp.0.main_proj.weight"] = Spec((d, len(cfg.dspark_target_layer_ids) * d), "linear")
    out["mtp.0.main_norm.weight"] = Spec((d,), "float")
    last = f"mtp.{stages - 1}"
    out[f"{last}.norm.weight"] = Spec((d,), "float")
    out.update(_hc_head_specs(f"{last}.", cfg.hc_mult, d))
    out[f"{last}.markov_head.markov_w1.weight"] = Spec((cfg.vocab_size, rank), "float")
    out[f"{last}.markov_head.markov_w2.weight"] = Spec((cfg.vocab_size, rank), "float")
    out[f"{last}.confidence_head.proj.weight"] = Spec((1, d + rank), "float")
    return out


# ---- release detection ----

# Draft tensors that only one layout has (the part after `mtp.N.`); block tensors are shared.
_MTP_ONLY = ("e_proj.", "h_proj.", "enorm.", "hnorm.")
_DSPARK_ONLY = ("main_proj.", "main_norm.", "markov_head.", "confidence_head.")
_LAYOUTS = (
    "the preview's MTP layer (mtp.0 with e_proj, h_proj, enorm, hnorm)",
    "a DSpark draft (mtp.0..2 with main_proj, main_norm, markov_head, confidence_head; config dspark_* keys)",
)
EXPECTED_LAYOUTS = " or ".join(_LAYOUTS)


@dataclass(frozen=True)
class Release:
    """Which DeepSeek V4 release a checkpoint folder holds.

    name: "preview" (the April release, MTP draft), "0731" (V4-Flash-0731 / V4-Pro-0813: new backbone
    weights, DSpark draft, 0731 chat format) or "dspark" (the -DSpark repos: the preview backbone plus a
    DSpark draft, preview chat format). draft: "mtp", "dspark" or None (no draft tensors).
    naming: "official" or "transformers" (an export by transformers' save_pretrained).
    chat: the chat format the release's encoder renders: "preview" or "0731".
    """

    name: str
    draft: str | None
    naming: str
    chat: str
    dspark_stages: int = 0

    def describe(self) -> str:
        names = {"preview": "V4 preview", "0731": "V4 0731-style", "dspark": "V4 DSpark repo (preview backbone)"}
        draft = {"mtp": "MTP draft", "dspark": f"{self.dspark_stages}-stage DSpark draft", None: "no draft"}[self.draft]
        naming = ", transformers names" if self.naming == "transformers" else ""
        return f"{names[self.name]} ({draft}{naming})"


def detect_release(cfg: ModelConfig, entries: dict[str, Entry], path: Path | None = None) -> Release:
    """Decide the release from the config and the tensor names; raise CheckpointError on a draft layout
    that is unknown, mixed, or contradicts the config (naming the tensor and the layouts expected).

    The layout cannot tell a 0731-style checkpoint from a DSpark repo (same tensors and config keys):
    the encoder the folder ships (`encoding/encoding_dsv4.py`) does when present; without it a DSpark
    checkpoint is taken for 0731-style."""
    naming = "transformers" if any(e.stored.startswith(("model.", "lm_head.")) for e in entries.values()) else "official"
    stages: set[int] = set()
    mtp_marker = dspark_marker = None
    for name in sorted(entries, key=lambda n: (n.endswith(".scale"), n)):  # name weights before scales
        if not name.startswith("mtp."):
            continue
        m = re.match(r"mtp\.(\d+)\.(.+)$", name)
        if not m:
            raise CheckpointError(f"tensor {name!r} matches no known draft layout; expected {EXPECTED_LAYOUTS}")
        stages.add(int(m.group(1)))
        rest = m.group(2)
        if rest.startswith(_MTP_ONLY):
            mtp_marker = mtp_marker or name
        elif rest.startswith(_DSPARK_ONLY):
            dspark_marker = dspark_marker or name
    if mtp_marker and dspark_marker:
        raise CheckpointError(
            f"tensor {dspark_marker!r} belongs to a DSpark draft but {mtp_marker!r} to the preview's MTP layer: "
            f"a mixed layout; expected {EXPECTED_LAYOUTS}"
        )
    if stages and not (mtp_marker or dspark_marker):
        first = min(n for n in entries if n.startswith("mtp."))
        raise CheckpointError(f"tensor {first!r} matches no known draft layout; expected {EXPECTED_LAYOUTS}")
    if mtp_marker and cfg.dspark:
        raise CheckpointError(
            f"tensor {mtp_marker!r} belongs to the preview's MTP layer, but config.json declares a DSpark draft "
            f"(dspark_block_size {cfg.dspark_block_size}); expected {_LAYOUTS[1]}"
        )
    if dspark_marker and not cfg.dspark:
        raise CheckpointError(
            f"tensor {dspark_marker!r} belongs to a DSpark draft, but config.json has no dspark_block_size / "
            f"dspark_target_layer_ids / dspark_markov_rank; expected {_LAYOUTS[0]} or the 0731 config keys"
        )
    n_stages = 0
    if dspark_marker:
        n_stages = max(stages) + 1
        missing = sorted(set(range(n_stages)) - stages)
        if missing:
            raise CheckpointError(f"the DSpark draft has stages {sorted(stages)} but no mtp.{missing[0]}.* tensors")
        listed = len(cfg.draft_compress_ratios)
        if listed > 1 and listed != n_stages:
            raise CheckpointError(
                f"config.json's compress_ratios list {listed} draft stages after the {cfg.n_layers} layers, "
                f"but the checkpoint holds {n_stages} (mtp.0..{n_stages - 1})"
            )
    draft = "dspark" if dspark_marker else "mtp" if mtp_marker else None
    chat = _shipped_chat_format(path)
    if draft == "mtp" or not (cfg.dspark or draft == "dspark"):
        name = "preview"
    else:
        name = "dspark" if chat == "preview" else "0731"
    return Release(name, draft, naming, chat or ("0731" if name == "0731" else "preview"), n_stages)


# What the 0731 encoder defines and the preview's lacks: its table of three reasoning-effort texts
# (the preview's defines only REASONING_EFFORT_MAX). SGLang tells the two apart the same way.
_0731_ENCODER_MARK = "REASONING_EFFORT_PROMPTS"


def _shipped_chat_format(path: Path | None) -> str | None:
    """'0731' or 'preview' from the encoder a release folder ships, None when it ships none."""
    if path is None:
        return None
    f = path / "encoding" / "encoding_dsv4.py"
    try:
        text = f.read_text(errors="replace")
    except OSError:
        return None
    return "0731" if _0731_ENCODER_MARK in text else "preview"


def _hc_head_specs(prefix: str, n: int, d: int) -> dict[str, Spec]:
    return {
        f"{prefix}hc_head_fn": Spec((n, n * d), "f32"),
        f"{prefix}hc_head_base": Spec((n,), "f32"),
        f"{prefix}hc_head_scale": Spec((1,), "f32"),
    }


def block_specs(cfg: ModelConfig, p: str, ratio: int, csa: bool, hashed: bool) -> dict[str, Spec]:
    """The tensors of one block (a main layer or an MTP block) under prefix `p`."""
    d, hd, h = cfg.dim, cfg.head_dim, cfg.n_heads
    s: dict[str, Spec] = {
        f"{p}.attn_norm.weight": Spec((d,), "float"),
        f"{p}.ffn_norm.weight": Spec((d,), "float"),
        f"{p}.attn.wq_a.weight": Spec((cfg.q_lora_rank, d), "linear"),
        f"{p}.attn.q_norm.weight": Spec((cfg.q_lora_rank,), "float"),
        f"{p}.attn.wq_b.weight": Spec((h * hd, cfg.q_lora_rank), "linear"),
        f"{p}.attn.wkv.weight": Spec((hd, d), "linear"),
        f"{p}.attn.kv_norm.weight": Spec((hd,), "float"),
        f"{p}.attn.wo_a.weight": Spec((cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups), "linear"),
        f"{p}.attn.wo_b.weight": Spec((d, cfg.o_groups * cfg.o_lora_rank), "linear"),
        f"{p}.attn.attn_sink": Spec((h,), "f32"),
        f"{p}.ffn.gate.weight": Spec((cfg.n_routed_experts, d), "float"),
    }
    for which in ("attn", "ffn"):
        s[f"{p}.hc_{which}_fn"] = Spec((cfg.n_mix, cfg.hc_mult * d), "f32")
        s[f"{p}.hc_{which}_base"] = Spec((cfg.n_mix,), "f32")
        s[f"{p}.hc_{which}_scale"] = Spec((3,), "f32")
    if ratio:
        s.update(_compressor_specs(f"{p}.attn.compressor", d, hd, ratio, 2 if csa else 1))
    if ratio and csa:
        ih, ihd = cfg.index_n_heads, cfg.index_head_dim
        s[f"{p}.attn.indexer.wq_b.weight"] = Spec((ih * ihd, cfg.q_lora_rank), "linear")
        s[f"{p}.attn.indexer.weights_proj.weight"] = Spec((ih, d), "float")
        s.update(_compressor_specs(f"{p}.attn.indexer.compressor", d, ihd, ratio, 2))
    if hashed:
        s[f"{p}.ffn.gate.tid2eid"] = Spec((cfg.vocab_size, cfg.n_activated_experts), "index")
    else:
        s[f"{p}.ffn.gate.bias"] = Spec((cfg.n_routed_experts,), "f32")
    inter = cfg.moe_inter_dim
    for e in range(cfg.n_routed_experts):
        s[f"{p}.ffn.experts.{e}.w1.weight"] = Spec((inter, d), "linear", fp4_ok=True)
        s[f"{p}.ffn.experts.{e}.w3.weight"] = Spec((inter, d), "linear", fp4_ok=True)
        s[f"{p}.ffn.experts.{e}.w2.weight"] = Spec((d, inter), "linear", fp4_ok=True)
    shared = inter * cfg.n_shared_experts
    s[f"{p}.ffn.shared_experts.w1.weight"] = Spec((shared, d), "linear")
    s[f"{p}.ffn.shared_experts.w3.weight"] = Spec((shared, d), "linear")
    s[f"{p}.ffn.shared_experts.w2.weight"] = Spec((d, shared), "linear")
    return s


def _compressor_specs(p: str, d: int, hd: int, ratio: int, coff: int) -> dict[str, Spec]:
    return {
        f"{p}.wkv.weight": Spec((coff * hd, d), "float"),
        f"{p}.wgate.weight": Spec((coff * hd, d), "float"),
        f"{p}.ape": Spec((ratio, coff * hd), "f32"),
        f"{p}.norm.weight": Spec((hd,), "float"),
    }
