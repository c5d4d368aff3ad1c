"""Quantized-weight matmuls for the CPU: compiled AVX-512 kernels with a plain-torch fallback.

`mxfp4_linear` and `fp8_linear` compute `x @ dequant(W).T` in fp32 for the two weight formats of
`dsv4.quant`, returning x's dtype; `*_torch` are the fallbacks, which are the reference math and
what the tests compare against. For a few rows of x (decode) the compiled kernels stream the
weight once and expand codes in registers (one bf16 row of x against MXFP4 uses bf16 dot products:
exact products, fp32 sums); from `*_PREFILL_ROWS` rows on they dequantize tiles and call at::mm
(a bf16 GEMM when x is bf16 and so is the result: exact products, fp32 sums).
Calls that autograd must differentiate always take the fallback.

Their parallel loops run on a worker pool of their own (`pool.h`: the caller works too, chunks are
claimed from an atomic counter, idle workers look for the next loop for 2 ms before sleeping), on
`torch.get_num_threads()` threads; only the prefill GEMMs stay on torch's OpenMP threads.

The same build carries fused ops for the small per-layer work of a step (`fused.h`: mHC pre/post
with the Sinkhorn iterations, RMSNorm + RoPE, the router); `fused()` says whether they take a call,
and their callers in `dsv4.ops` / `dsv4.model` keep the plain-torch reference beside them.

The compiled path (`cpu_kernels.cpp` with `avx512.h` or `avx2.h`) is built on first use with
`torch.utils.cpp_extension.load` into `~/.cache/dsv4/kernels/<hash>`, the hash covering the sources (and their path),
the flags, the torch version and the CPU's flags (the build uses `-march=native`). It needs a C++
compiler, `ninja` and a CPU with AVX-512 (F, BW, VL) or AVX2 + FMA + F16C; the AVX2 build drops
AVX-512 with `-mno-avx512f`. `DSV4_KERNELS` (read at the first call, and again after `refresh()`)
picks: `torch` (every call takes the fallback), `avx2` (the AVX2 build even on an AVX-512 CPU, to
test that path), `avx512`, or unset/`auto` (the best
the CPU has). Without a usable build every call takes the fallback: a failed build warns once;
a CPU without the instruction sets is a normal case, reported by `fallback_reason()`.

This module knows the weight formats only; which layer uses which format is `dsv4.ops`'s business.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from ..quant import dequant_fp8_block, dequant_mxfp4

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_HEADERS = ("avx512.h", "avx2.h", "pool.h", "decode.h", "fused.h")
_CFLAGS = ["-O3", "-fopenmp", "-std=c++17"]
_LDFLAGS = ["-fopenmp"]
# The flags that pick each build's instruction set (`-march=native` minus AVX-512 for avx2).
ISA_FLAGS = {"avx512": ["-march=native"], "avx2": ["-march=native", "-mno-avx512f"]}
_ISA_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl"}, "avx2": {"avx2", "fma", "f16c"}}
# From this many rows of x on, dequantizing tiles for a GEMM beats expanding codes in registers;
# keyed by format and GEMM dtype (bf16 when x is bf16, the output is not asked for in fp32, the
# CPU has bf16 dot products and, for FP8, the scales are e8m0). Single-thread crossovers measured
# on the development Xeon: FP8 decode amortises its e4m3 expansion over fewer FMAs than MXFP4
# does, and the bf16 GEMM is ~2-4x the fp32 one, so those hand over earlier.
PREFILL_ROWS = {
    ("mxfp4", torch.float32): 40,
    ("mxfp4", torch.bfloat16): 20,
    ("fp8", torch.float32): 20,
    ("fp8", torch.bfloat16): 12,
}
# The fallback dequantizes at most this many weight elements at a time (64 MB of fp32).
_FALLBACK_CHUNK = 1 << 24

_lock = threading.Lock()
_exts: dict[str, object] = {}  # ISA -> the compiled module once built, or False once it failed
_reasons: dict[str, str] = {}  # ISA -> why its build is unusable
_choices: dict[str, tuple[str | None, str]] = {}  # DSV4_KERNELS value -> `_choice()`'s answer
_active: list = []  # [the extension in use, or None] once `_load` has decided; `refresh` empties it


def refresh() -> None:
    """Decide again, from DSV4_KERNELS, at the next kernel call.

    The choice is made once per process: a decode step makes ~170 kernel calls, and reading the
    environment on each was ~1 us apiece. Code (tests) that changes DSV4_KERNELS calls this."""
    _active.clear()


def backend() -> str:
    """Which path the next call takes, "compiled" or "torch" (`DSV4_KERNELS=torch` forces torch)."""
    return "compiled" if available() else "torch"


def available() -> bool:
    """Whether the compiled kernels are usable here (builds them on the first call)."""
    return _load() is not None


def isa() -> str | None:
    """The instruction set of the compiled kernels in use ("avx512", "avx2"), None on the fallback."""
    ext = _load()
    return None if ext is None else ext.isa()


def supported_isas() -> list[str]:
    """The builds this CPU can run, best first (no build is attempted)."""
    flags = _cpu_flags()
    ok = [name for name, need in _ISA_NEEDS.items() if need <= flags]
    if "avx512" in ok and torch.backends.cpu.get_cpu_capability() != "AVX512":
        ok.remove("avx512")  # torch itself was told not to use AVX-512 (ATEN_CPU_CAPABILITY)
    return ok


def fallback_reason() -> str:
    """Why every call takes the plain-torch fallback ("" when the compiled kernels are in use)."""
    choice, reason = _choice()
    if choice is None:
        return reason
    return "" if available() else _reasons.get(choice, "")


def _choice() -> tuple[str | None, str]:
    """The build DSV4_KERNELS and the CPU ask for, or None and why there is none.

    The answer is kept per DSV4_KERNELS value (`_choices`): reading the CPU's flags is slow."""
    env = os.environ.get("DSV4_KERNELS", "")
    got = _choices.get(env)
    if got is None:
        got = _choices[env] = _decide(env.lower() or "auto")
    return got


def _decide(want: str) -> tuple[str | None, str]:
    if want == "torch":
        return None, "DSV4_KERNELS=torch"
    if want not in ("auto", *ISA_FLAGS):
        return None, f"DSV4_KERNELS={want} is not one of torch, auto, {', '.join(ISA_FLAGS)}"
    have = supported_isas()
    if want == "auto":
        return (have[0], "") if have else (None, "no AVX-512 or AVX2+FMA+F16C on this CPU")
    return (want, "") if want in have else (None, f"DSV4_KERNELS={want} but this CPU lacks {want.upper()}")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set(platform.processor().lower().split())


def _build_dir(isa: str) -> Path:
    h = hashlib.sha256()
    for path in (_SOURCE, *(_SOURCE.with_name(n) for n in _HEADERS)):
        h.update(path.read_bytes())
    h.update(" ".join(_CFLAGS + ISA_FLAGS[isa] + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    # the folder's build.ninja names the source path: two checkouts sharing one folder would rebuild
    # each other's build on every load
    h.update(str(_SOURCE).encode())
    h.update(" ".join(sorted(_cpu_flags())).encode())
    return Path.home() / ".cache" / "dsv4" / "kernels" / f"{isa}-{h.hexdigest()[:16]}"


def _load():
    if _active:
        return _active[0]
    choice, _ = _choice()
    if choice is not None and choice not in _exts:
        with _lock:
            if choice not in _exts:
                _exts[choice] = _build(choice) or False
    ext = _exts[choice] or None if choice is not None else None
    _active[:] = [ext]
    return ext


def _build(isa: str):
    try:
        from torch.utils.cpp_extension import load

        build = _build_dir(isa)
        build.mkdir(parents=True, exist_ok=True)
        with _build_lock(build):
            return load(
                name=f"dsv4_cpu_kernels_{isa}",
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS + ISA_FLAGS[isa],
                extra_ldflags=_LDFLAGS,
                build_directory=str(build),
                verbose=False,
            )
    except Exception as e:  # no compiler, no ninja, a broken cache: the engine still runs
        _reasons[isa] = f"the {isa} build failed ({type(e).__name__})"
        warnings.warn(
            f"dsv4.kernels: building the {isa} CPU kernels failed ({type(e).__name__}: {str(e)[:500]}), "
            "using the plain-torch fallback (pip install ninja and a C++ compiler to build them)",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


@contextlib.contextmanager
def _build_lock(build: Path):
    """One builder per folder across processes, under a lock the OS drops when its holder dies.

    torch's own lock is a file that a killed build leaves behind, and every later load then waits on
    it forever (a CLI run killed by a timeout while compiling did that). Every dsv4 build takes this
    lock first, so a torch lock found while holding it was left by a build that no longer runs."""
    with open(build / "dsv4.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (build / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_X_DTYPES = (torch.float32, torch.bfloat16)
_BYTE_DTYPES = (torch.uint8, torch.int8, torch.float8_e8m0fnu, torch.float8_e4m3fn)


def _compiled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, byte_scale: bool):
    """The extension if it should take this call, else None (the fallback takes it).

    It takes CPU tensors only, x in fp32/bf16, byte-sized codes (and scales when `byte_scale`),
    and never a call that autograd must differentiate: the kernels have no backward.
    """
    ext = _load()
    if (
        ext is None
        or x.dtype not in _X_DTYPES
        or not (x.is_cpu and weight.is_cpu and scale.is_cpu)
        or weight.dtype not in _BYTE_DTYPES
        or (byte_scale and scale.dtype not in _BYTE_DTYPES)
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        return None
    return ext


def fused(*tensors: torch.Tensor | None):
    """The extension when its fused ops (`fused.h`: mHC pre/post, RMSNorm + RoPE, the router) should
    take a call on these tensors, else None (the caller's plain-torch reference takes it).

    CPU float32/bf16 tensors only (None entries are skipped), and never a call that autograd must
    differentiate: the fused ops have no backward.
    """
    ext = _load()
    if ext is None:
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (not t.is_cpu or t.dtype not in _X_DTYPES or (grad and t.requires_grad)):
            return None
    return ext


def _check(x: torch.Tensor, in_f: int) -> None:
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects {in_f}")


def prefill_rows(dtype: torch.dtype) -> list[int]:
    """The rows of x (this dtype) from which `fp8_linear` (e8m0 scales) and `mxfp4_linear` take their
    GEMM path: [FP8, MXFP4], as the fused ops that call them for a prefill chunk take them."""
    ext = _load()
    gemm = torch.bfloat16 if dtype == torch.bfloat16 and ext is not None and ext.has_bf16_gemm() else torch.float32
    return [PREFILL_ROWS["fp8", gemm], PREFILL_ROWS["mxfp4", gemm]]


def mxfp4_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x `[..., in]` @ MXFP4 weight (int8 `[out, in/2]`, e8m0 `[out, in/32]`).T, fp32 accumulation.

    Returns `[..., out]` in `out_dtype` (default x's dtype); float32 skips the final rounding.
    """
    _check(x, weight.shape[1] * 2)
    ext = _compiled(x, weight, scale, byte_scale=True)
    if ext is None:
        return mxfp4_linear_torch(x, weight, scale, out_dtype=out_dtype)
    fp32_out = out_dtype == torch.float32
    gemm = (
        torch.bfloat16
        if x.dtype == torch.bfloat16 and not fp32_out and ext.has_bf16_gemm()
        else torch.float32
    )
    y = ext.mxfp4_linear(x, weight, scale, PREFILL_ROWS["mxfp4", gemm], fp32_out)
    return y if out_dtype is None else y.to(out_dtype)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x `[..., in]` @ FP8 weight (e4m3 `[out, in]`, e8m0/fp32 block scales `[out/128, in/128]`).T.

    Returns `[..., out]` in `out_dtype` (default x's dtype); float32 skips the final rounding.
    """
    _check(x, weight.shape[1])
    ext = _compiled(x, weight, scale, byte_scale=False)
    if ext is None:
        return fp8_linear_torch(x, weight, scale, out_dtype=out_dtype)
    fp32_out = out_dtype == torch.float32
    bf16 = x.dtype == torch.bfloat16 and not fp32_out and scale.dtype in _BYTE_DTYPES and ext.has_bf16_gemm()
    y = ext.fp8_linear(
        x, weight, scale, PREFILL_ROWS["fp8", torch.bfloat16 if bf16 else torch.float32], fp32_out
    )
    return y if out_dtype is None else y.to(out_dtype)


def mxfp4_linear_torch(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The fallback: `dequant_mxfp4` in row chunks, then matmul."""
    out_f, in_f = weight.shape[0], weight.shape[1] * 2
    _check(x, in_f)
    x2 = x.reshape(-1, in_f).float()
    y = _chunked(x2, out_f, in_f, lambda r0, r1: dequant_mxfp4(weight[r0:r1], scale[r0:r1]))
    return y.reshape(*x.shape[:-1], out_f).to(out_dtype or x.dtype)


def fp8_linear_torch(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The fallback: `dequant_fp8_block` in row chunks (whole 128-row scale blocks), then matmul."""
    out_f, in_f = weight.shape
    _check(x, in_f)
    x2 = x.reshape(-1, in_f).float()

    def dequant(r0: int, r1: int) -> torch.Tensor:
        return dequant_fp8_block(weight[r0:r1], scale[r0 // 128 : (r1 + 127) // 128])

    y = _chunked(x2, out_f, in_f, dequant, align=128)
    return y.reshape(*x.shape[:-1], out_f).to(out_dtype or x.dtype)


def _chunked(x2: torch.Tensor, out_f: int, in_f: int, dequant, align: int = 1) -> torch.Tensor:
    """The reference math, dequantizing row chunks so big weights need bounded temporary memory."""
    rows = max(align, _FALLBACK_CHUNK // max(in_f, 1) // align * align)
    if rows >= out_f:
        return x2 @ dequant(0, out_f).T
    y = x2.new_empty(x2.shape[0], out_f)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        y[:, r0:r1] = x2 @ dequant(r0, r1).T
    return y
