"""The quantized-weight matmuls: fallback against the `dsv4.quant` reference, compiled against fallback.

Errors are measured against the bound of fp32 summation, `|x| @ |W|.T`, so rows with extreme scales
or cancelling sums are judged fairly. The compiled kernels build once per session (~30 s the first
time, cached in ~/.cache/dsv4/kernels); their tests skip where `available()` is False.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dsv4 import kernels
from dsv4.quant import dequant_fp8_block, dequant_mxfp4, quantize_fp8_block, quantize_mxfp4

TOL = 1e-5


def rel_err(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    bound = x.float().abs().reshape(-1, x.shape[-1]) @ w.abs().T
    diff = (y.float() - ref.float()).reshape(bound.shape).abs()
    return (diff / bound.clamp_min(torch.finfo(torch.float32).tiny)).max().item()


def mx_agrees(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> bool:
    """Compiled MXFP4 against the fallback: fp32 within TOL, bf16 within one rounding step."""
    return close(kernels.mxfp4_linear(x, q, s), kernels.mxfp4_linear_torch(x, q, s), x, dequant_mxfp4(q, s))


def f8_agrees(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> bool:
    return close(kernels.fp8_linear(x, q, s), kernels.fp8_linear_torch(x, q, s), x, dequant_fp8_block(q, s))


def close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """fp32 results within TOL of the summation bound; bf16 ones within one bf16 rounding step."""
    if y.dtype == torch.bfloat16:
        torch.testing.assert_close(y, ref, rtol=2**-7, atol=1e-3)
        return True
    return rel_err(y, ref, x, w) <= TOL


def mx_weight(out_f: int, in_f: int, seed: int = 0, extreme: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_mxfp4(torch.randn(out_f, in_f, generator=g))
    if extreme:  # every e8m0 byte from 0 (2^-127, a denormal) to 250 (2^123), in every row
        b = torch.randint(0, 251, s.shape, generator=g, dtype=torch.int32)
        b[:, 0] = 0
        s = b.to(torch.uint8).view(torch.float8_e8m0fnu)
    return q, s


def f8_weight(out_f: int, in_f: int, seed: int = 0, scale: str = "e8m0"):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_fp8_block(torch.randn(out_f, in_f, generator=g))
    if scale == "fp32":
        s = torch.rand(s.shape, generator=g) * 0.01 + 1e-4
    elif scale == "extreme":  # 2^-127 (denormal) .. 2^100 per block
        b = torch.randint(0, 228, s.shape, generator=g, dtype=torch.int32)
        b.view(-1)[0] = 0
        s = b.to(torch.uint8).view(torch.float8_e8m0fnu)
    return q, s


def xs(rows: int, in_f: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)


ISAS = kernels.supported_isas()  # both builds on an AVX-512 CPU, the AVX2 one on CI's


@pytest.fixture(params=ISAS or [pytest.param(None, marks=pytest.mark.skip(reason="no AVX-512 or AVX2 here"))])
def isa(request, monkeypatch):
    """Each test below runs once per build this CPU can run, forced through DSV4_KERNELS."""
    monkeypatch.setenv("DSV4_KERNELS", request.param)
    kernels.refresh()
    if not kernels.available():
        pytest.skip(kernels.fallback_reason())
    assert kernels.isa() == request.param and kernels.fallback_reason() == ""
    return request.param


needs_compiled = pytest.mark.usefixtures("isa")


# ---- the fallback is the reference math ----


@pytest.mark.parametrize("chunk", [None, 4096])
def test_mxfp4_fallback_matches_reference(monkeypatch, chunk):
    if chunk:  # force several row chunks
        monkeypatch.setattr(kernels, "_FALLBACK_CHUNK", chunk)
    q, s = mx_weight(100, 192)
    x = xs(3, 192)
    ref = x @ dequant_mxfp4(q, s).T
    # BLAS may block a narrower matmul differently (seen on AVX2): summation order only, far below
    # what a misplaced chunk row would show
    torch.testing.assert_close(kernels.mxfp4_linear_torch(x, q, s), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 128 * 200])
@pytest.mark.parametrize("scale", ["e8m0", "fp32"])
def test_fp8_fallback_matches_reference(monkeypatch, chunk, scale):
    if chunk:
        monkeypatch.setattr(kernels, "_FALLBACK_CHUNK", chunk)
    q, s = f8_weight(300, 200, scale=scale)
    x = xs(2, 200).reshape(1, 2, 200)
    ref = x @ dequant_fp8_block(q, s).T
    torch.testing.assert_close(kernels.fp8_linear_torch(x, q, s), ref, rtol=1e-5, atol=1e-5)


def test_env_forces_fallback(monkeypatch):
    monkeypatch.setenv("DSV4_KERNELS", "torch")
    kernels.refresh()
    assert kernels.backend() == "torch" and not kernels.available()
    q, s = mx_weight(16, 64)
    x = xs(2, 64)
    assert torch.equal(kernels.mxfp4_linear(x, q, s), kernels.mxfp4_linear_torch(x, q, s))


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_exts", {})
    monkeypatch.setattr(kernels, "_SOURCE", tmp_path / "missing.cpp")
    monkeypatch.setattr(kernels, "supported_isas", lambda: ["avx2"])
    monkeypatch.setattr(kernels, "_choices", {})
    with pytest.warns(RuntimeWarning, match="fallback"):
        assert not kernels.available()
    assert not kernels.available()  # cached: no second build attempt, no second warning
    assert "avx2 build failed" in kernels.fallback_reason()
    q, s = mx_weight(8, 32)
    x = xs(1, 32)
    assert torch.equal(kernels.mxfp4_linear(x, q, s), kernels.mxfp4_linear_torch(x, q, s))


@pytest.mark.parametrize(
    "flags, capability, chosen",
    [
        ("avx2 fma f16c avx512f avx512bw avx512vl", "AVX512", ["avx512", "avx2"]),
        ("avx2 fma f16c avx512f avx512bw avx512vl", "AVX2", ["avx2"]),  # ATEN_CPU_CAPABILITY=avx2
        ("avx2 fma f16c avx512f", "AVX512", ["avx2"]),  # no BW/VL
        ("avx2 fma f16c", "AVX2", ["avx2"]),  # CI's CPU
        ("avx avx2 fma", "AVX2", []),  # no F16C
        ("sse4_2", "DEFAULT", []),
    ],
)
def test_the_build_follows_the_cpu_flags(monkeypatch, flags, capability, chosen):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: set(flags.split()))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(kernels, "_choices", {})
    monkeypatch.delenv("DSV4_KERNELS", raising=False)
    kernels.refresh()
    assert kernels.supported_isas() == chosen
    if not chosen:  # a normal case: no build, no warning, the reason on record
        monkeypatch.setattr(kernels, "_exts", {})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not kernels.available() and kernels.isa() is None
        assert kernels.fallback_reason() == "no AVX-512 or AVX2+FMA+F16C on this CPU"


@pytest.mark.parametrize(
    "value, reason",
    [
        ("torch", "DSV4_KERNELS=torch"),
        ("sse", "DSV4_KERNELS=sse is not one of"),
        ("AVX9", "DSV4_KERNELS=avx9 is not one of"),
    ],
)
def test_env_values_that_take_the_fallback(monkeypatch, value, reason):
    monkeypatch.setenv("DSV4_KERNELS", value)
    kernels.refresh()
    assert not kernels.available()
    assert kernels.fallback_reason().startswith(reason)


def test_env_asking_for_a_missing_isa(monkeypatch):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setattr(kernels, "_choices", {})
    monkeypatch.setenv("DSV4_KERNELS", "avx512")
    kernels.refresh()
    assert not kernels.available()
    assert kernels.fallback_reason() == "DSV4_KERNELS=avx512 but this CPU lacks AVX512"


def test_autograd_calls_take_the_differentiable_fallback():
    q, s = mx_weight(16, 64)
    x = xs(2, 64).requires_grad_()
    kernels.mxfp4_linear(x, q, s).sum().backward()
    torch.testing.assert_close(x.grad, dequant_mxfp4(q, s).sum(0).expand(2, 64))


def test_shape_mismatch_names_both_sizes():
    q, s = mx_weight(8, 64)
    with pytest.raises(ValueError, match="96 .* 64"):
        kernels.mxfp4_linear(xs(1, 96), q, s)


# ---- compiled against fallback ----

ROWS = [1, 2, 3, 5, 64, 257]  # decode (1-3, and 5 = a group of 4 plus 1), prefill (64, 257)
MX_SHAPES = [(130, 544), (1, 32), (17, 96), (256, 1024)]  # in % 128 = 32, 32, 96, 0
F8_SHAPES = [(130, 200), (1, 64), (257, 100), (128, 1024)]  # in not a multiple of 64 or 128


@needs_compiled
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", MX_SHAPES)
def test_mxfp4_compiled_matches(shape, rows):
    q, s = mx_weight(*shape)
    x = xs(rows, shape[1])
    y = kernels.mxfp4_linear(x, q, s)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
    assert rel_err(y, kernels.mxfp4_linear_torch(x, q, s), x, dequant_mxfp4(q, s)) <= TOL


@needs_compiled
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("scale", ["e8m0", "fp32"])
@pytest.mark.parametrize("shape", F8_SHAPES)
def test_fp8_compiled_matches(shape, scale, rows):
    q, s = f8_weight(*shape, scale=scale)
    x = xs(rows, shape[1])
    y = kernels.fp8_linear(x, q, s)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
    assert rel_err(y, kernels.fp8_linear_torch(x, q, s), x, dequant_fp8_block(q, s)) <= TOL


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("rows", [1, 6, 33])
def test_both_paths_whatever_the_thresholds(monkeypatch, path, rows, dtype):
    at = 10**9 if path == "decode" else 1
    for key in kernels.PREFILL_ROWS:
        monkeypatch.setitem(kernels.PREFILL_ROWS, key, at)
    q, s = mx_weight(130, 544)
    x = xs(rows, 544, dtype)
    assert mx_agrees(x, q, s)
    for scale in ["e8m0", "fp32"]:  # bf16 x, e8m0 scales: a bf16 GEMM; fp32 scales: an fp32 one
        q, s = f8_weight(130, 200, scale=scale)
        x = xs(rows, 200, dtype)
        assert close(
            kernels.fp8_linear(x, q, s), kernels.fp8_linear_torch(x, q, s), x, dequant_fp8_block(q, s)
        )


@needs_compiled
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_weights_big_enough_to_split_across_threads(rows):
    # Threads only share weights of a few hundred KB; the second starts mid FP8 row block.
    q, s = mx_weight(1024, 1024)
    x = xs(rows, 1024)
    assert mx_agrees(x, q, s)
    q, s = f8_weight(600, 1024)
    x = xs(rows, 1024)
    assert f8_agrees(x, q, s)


def weight_ending_at_a_guard_page(q: torch.Tensor):
    """A copy of q whose last byte is followed by an unreadable page (Linux), or None."""
    page, n = mmap.PAGESIZE, q.numel() * q.element_size()
    end = -(-n // page) * page
    buf = mmap.mmap(-1, end + page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(addr + end), ctypes.c_size_t(page), 0) != 0:  # PROT_NONE
        return None
    t = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=end - n).view(q.dtype).view(q.shape)
    t.copy_(q)
    return t


@needs_compiled
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_read_past_the_weight(rows, dtype):
    # The MXFP4 decode loads chunks again 1-3 bytes further on (fp32 path), or reads a short last
    # chunk of 16 bytes as a masked load (bf16 rows, in=544); never past the tensor's end.
    for in_f in (1024, 544):
        q, s = mx_weight(16, in_f)
        guarded = weight_ending_at_a_guard_page(q)
        if guarded is None:
            pytest.skip("no mprotect")
        x = xs(rows, in_f, dtype)
        torch.testing.assert_close(
            kernels.mxfp4_linear(x, guarded, s), kernels.mxfp4_linear(x, q, s), rtol=0, atol=0
        )
    x = xs(rows, 1024)
    q, s = f8_weight(16, 1024)
    guarded = weight_ending_at_a_guard_page(q)
    torch.testing.assert_close(kernels.fp8_linear(x, guarded, s), kernels.fp8_linear(x, q, s), rtol=0, atol=0)


@needs_compiled
@pytest.mark.parametrize("rows", [2, 3, 5, 15])
def test_long_rows_cut_into_segments(rows):
    # A group's x no longer fits in L1 here, so decode runs each row in several segments.
    q, s = mx_weight(20, 4128)
    x = xs(rows, 4128)
    assert mx_agrees(x, q, s)
    q, s = f8_weight(140, 3000)
    x = xs(rows, 3000)
    assert f8_agrees(x, q, s)


@needs_compiled
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_extreme_scales(rows):
    q, s = mx_weight(40, 544, extreme=True)
    for dtype in (torch.float32, torch.bfloat16):  # one bf16 row takes the bf16 dot-product decode
        x = (xs(rows, 544) * 1e-12).to(dtype)  # keeps rows scaled 2^123 finite
        ref = kernels.mxfp4_linear_torch(x, q, s, out_dtype=torch.float32)
        assert torch.isfinite(ref).all()
        y = kernels.mxfp4_linear(x, q, s, out_dtype=torch.float32)
        assert rel_err(y, ref, x.float(), dequant_mxfp4(q, s)) <= TOL
    q, s = f8_weight(300, 384, scale="extreme")
    x = xs(rows, 384) * 1e-12
    ref = kernels.fp8_linear_torch(x, q, s)
    assert torch.isfinite(ref).all()
    assert rel_err(kernels.fp8_linear(x, q, s), ref, x, dequant_fp8_block(q, s)) <= TOL


@needs_compiled
@pytest.mark.parametrize("rows", [1, 3, 5, 64])
def test_bf16_inputs(rows):
    for shape in [(130, 544), (64, 1024)]:
        q, s = mx_weight(*shape)
        x = xs(rows, shape[1], torch.bfloat16).reshape(1, rows, shape[1])
        w = dequant_mxfp4(q, s)
        # Exact products (bf16 x e2m1), fp32 sums: agrees to summation order before the rounding ...
        y32 = kernels.mxfp4_linear(x, q, s, out_dtype=torch.float32)
        assert y32.dtype == torch.float32 and rel_err(y32, x.float() @ w.T, x, w) <= TOL
        # ... so bf16 outputs differ from the fallback's by at most one bf16 rounding step.
        y = kernels.mxfp4_linear(x, q, s)
        assert y.dtype == torch.bfloat16 and y.shape == (1, rows, shape[0])
        torch.testing.assert_close(y, kernels.mxfp4_linear_torch(x, q, s), rtol=2**-7, atol=1e-3)
    q, s = f8_weight(130, 200)
    x = xs(rows, 200, torch.bfloat16)
    w = dequant_fp8_block(q, s)
    assert rel_err(kernels.fp8_linear(x, q, s, out_dtype=torch.float32), x.float() @ w.T, x, w) <= TOL
    y = kernels.fp8_linear(x, q, s)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, kernels.fp8_linear_torch(x, q, s), rtol=2**-7, atol=1e-3)


@needs_compiled
def test_strided_and_empty_inputs():
    q, s = mx_weight(64, 256)
    x = xs(8, 512)[:, ::2]  # non-contiguous view
    torch.testing.assert_close(
        kernels.mxfp4_linear(x, q, s), kernels.mxfp4_linear_torch(x, q, s), rtol=1e-5, atol=1e-4
    )
    assert kernels.mxfp4_linear(xs(0, 256), q, s).shape == (0, 64)
    q, s = f8_weight(64, 256)
    assert kernels.fp8_linear(xs(0, 256).reshape(0, 0, 256), q, s).shape == (0, 0, 64)


@needs_compiled
def test_prefill_path_under_inference_mode():
    """The multi-row path writes its output from worker threads; under torch.inference_mode that
    output is an inference tensor, which worker threads may only write with the mode set."""
    g = torch.Generator().manual_seed(0)
    w8, s8 = quantize_fp8_block(torch.randn(1024, 512, generator=g))
    w4, s4 = quantize_mxfp4(torch.randn(1024, 512, generator=g))
    with torch.inference_mode():
        x = torch.randn(96, 512, generator=g, dtype=torch.float32).to(torch.bfloat16)
        a, b = kernels.fp8_linear(x, w8, s8), kernels.mxfp4_linear(x, w4, s4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("user", [None, "ACTIVE", "PASSIVE"])
def test_openmp_waits_briefly_unless_the_user_says(user):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if user:
        env["OMP_WAIT_POLICY"] = user
    code = "import dsv4, os; print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ([user, "None"] if user else ["PASSIVE", "300"])


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path):
    """torch's build lock file, left by a build that was killed, no longer makes later loads wait."""
    import fcntl

    (tmp_path / "lock").touch()
    with kernels._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        with open(tmp_path / "dsv4.lock") as f:  # held: another builder would wait here
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "dsv4.lock") as f:  # released on exit
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---- the kernels' worker pool (pool.h) ----


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs_compiled
@pytest.mark.usefixtures("two_threads")
def test_pool_loops_from_several_threads_at_once():
    """Loops started from several threads at once (one runs on the pool, the others serially on their
    callers) all give the serial results, many times over."""
    import threading

    q, s = mx_weight(1024, 1024)
    xs_ = [xs(r, 1024, torch.bfloat16, seed=r) for r in (1, 2, 3, 4)]
    torch.set_num_threads(1)
    want = [kernels.mxfp4_linear(x, q, s) for x in xs_]
    torch.set_num_threads(2)
    bad = []

    def caller(i):
        torch.set_num_threads(2)  # per thread, as the server's generation thread does
        for _ in range(200):
            if not torch.equal(kernels.mxfp4_linear(xs_[i], q, s), want[i]):
                bad.append(i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@needs_compiled
@pytest.mark.usefixtures("two_threads")
def test_pool_works_in_a_forked_child():
    """A child forked after the pool started (its workers do not exist there) still computes."""
    import multiprocessing as mp

    q, s = mx_weight(1024, 1024)
    x = xs(1, 1024, torch.bfloat16)
    want = kernels.mxfp4_linear(x, q, s)  # the pool has run, and its worker waits
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as p:
        got = p.apply_async(_mx_in_child, (x, q, s)).get(timeout=60)
    assert torch.equal(got, want)


def _mx_in_child(x, q, s):
    torch.set_num_threads(2)
    return kernels.mxfp4_linear(x, q, s)
