"""Known answers from the formats' definitions, byte by byte, for every decoder dsv4 has.

The expected values are computed here from the bit fields as the OCP Microscaling (MX) spec v1.0 and the
OCP 8-bit floating point spec define them, with nothing from `dsv4.quant`: E2M1 (1 sign, 2 exponent bits
with bias 1, 1 mantissa bit; exponent 0 is subnormal), E8M0 scales (2^(byte - 127), 0xFF is NaN) and
E4M3 "fn" (bias 7, no infinities, S.1111.111 is NaN). The checkpoint's packing (two E2M1 codes per byte,
low nibble first, along the input dim; one E8M0 scale per 32 inputs; one per 128x128 block for FP8) is
DeepSeek's. Each decoder -- dequantization, the plain-torch linears and every compiled kernel build this
CPU runs, decode and prefill paths -- must give exactly these values: every product below is exact.
"""

import math

import pytest
import torch

from dsv4 import kernels, ops
from dsv4.quant import MXFP4, FP8Block, dequant_fp8_block, dequant_mxfp4, e8m0_to_float, unpack_e2m1


def e2m1(code: int) -> float:
    sign = -1.0 if code & 0b1000 else 1.0
    exp, man = (code >> 1) & 0b11, code & 0b1
    return sign * (man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man * 0.5))


def e4m3(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    return sign * (2.0**-6 * man / 8 if exp == 0 else 2.0 ** (exp - 7) * (1 + man / 8))


def e8m0(byte: int) -> float:
    return math.nan if byte == 0xFF else 2.0 ** (byte - 127)


def test_the_definitions_give_the_spec_tables():
    """The decoders above against the spec's own tables (OCP MX v1.0 table 5; OCP FP8 E4M3 limits)."""
    assert [e2m1(c) for c in range(8)] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert [e2m1(c) for c in range(8, 16)] == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert (e4m3(0x7E), e4m3(0x08), e4m3(0x01), e4m3(0x38), e4m3(0xB8)) == (
        448.0,
        2.0**-6,
        2.0**-9,
        1.0,
        -1.0,
    )
    assert math.isnan(e4m3(0x7F)) and math.isnan(e4m3(0xFF))
    assert (e8m0(0), e8m0(127), e8m0(254)) == (2.0**-127, 1.0, 2.0**127) and math.isnan(e8m0(255))


def u8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def test_e8m0_scales():
    got = e8m0_to_float(u8(list(range(256))).view(torch.float8_e8m0fnu))
    want = torch.tensor([e8m0(b) for b in range(256)], dtype=torch.float64)
    assert torch.equal(got[:255].double(), want[:255]) and torch.isnan(got[255])
    assert torch.equal(e8m0_to_float(u8([0, 127, 254])), torch.tensor([2.0**-127, 1.0, 2.0**127]))


def test_e2m1_nibbles_low_first():
    """Byte 0x72 holds 1.0 (code 2) at the even input and 6.0 (code 7) at the odd one, byte 0xF9 holds
    -0.5 (code 9) then -6.0 (code 15); every byte decodes to its two codes in that order."""
    assert unpack_e2m1(u8([[0x72, 0xF9]]).view(torch.int8)).tolist() == [[1.0, 6.0, -0.5, -6.0]]
    every = unpack_e2m1(u8(list(range(256))).view(torch.int8)[None])[0]
    assert every.tolist() == [e2m1(v) for b in range(256) for v in (b & 0xF, b >> 4)]


# Every byte of each format, as a weight with per-block scales; x = identity reads each weight back.
MX_SCALES = [127, 126, 128, 130, 120, 135, 127, 125]  # per 32 inputs of each row


def mx_weight() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 [2, 128] (bytes 0..255), e8m0 [2, 8], and the fp64 values [2, 256] the spec gives."""
    packed = u8(list(range(256))).reshape(2, 128)
    scale = u8([MX_SCALES, MX_SCALES[::-1]])
    want = torch.tensor([[e2m1(v) * e8m0(int(scale[r, (2 * i + j) // 32])) for i, b in enumerate(packed[r].tolist())
                          for j, v in enumerate((b & 0xF, b >> 4))] for r in range(2)], dtype=torch.float64)  # fmt: skip
    return packed.view(torch.int8), scale.view(torch.float8_e8m0fnu), want


def fp8_weight(fp32_scale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e4m3 [130, 256] (row r: the 256 bytes rotated by r, NaNs made 0), scales [2, 2] (128x128 blocks),
    and the fp64 values the spec gives. 130 rows: the second row block is partial."""
    rows = [[(b + r) % 256 for b in range(256)] for r in range(130)]
    rows = [[0 if b in (0x7F, 0xFF) else b for b in row] for row in rows]
    bits = [[127, 130], [124, 127]]
    if fp32_scale:
        scale, factor = torch.tensor([[0.75, 3.0], [1.25, 0.5]]), [[0.75, 3.0], [1.25, 0.5]]
    else:
        scale, factor = u8(bits).view(torch.float8_e8m0fnu), [[e8m0(b) for b in row] for row in bits]
    want = torch.tensor([[e4m3(b) * factor[r // 128][i // 128] for i, b in enumerate(row)] for r, row in enumerate(rows)],
                        dtype=torch.float64)  # fmt: skip
    return u8(rows).view(torch.float8_e4m3fn), scale, want


def test_dequantize_by_the_definitions():
    packed, scale, want = mx_weight()
    assert torch.equal(dequant_mxfp4(packed, scale).double(), want)
    assert torch.equal(MXFP4(packed, scale).dequantize().double(), want)
    for fp32_scale in (False, True):
        w, s, want = fp8_weight(fp32_scale)
        assert torch.equal(dequant_fp8_block(w, s).double(), want)
        assert torch.equal(FP8Block(w, s).dequantize().double(), want)


BACKENDS = ["torch", *kernels.supported_isas()]  # the fallback, and each compiled build this CPU runs


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("DSV4_KERNELS", request.param)
    kernels.refresh()
    if request.param != "torch" and not kernels.available():
        pytest.skip(kernels.fallback_reason())
    return request.param


def read_back(linear, w, s, in_f: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """x = the identity, fed `rows` rows per call: out[i] is the weight's column i, exactly."""
    eye = torch.eye(in_f, dtype=dtype)
    return torch.cat(
        [linear(eye[i : i + rows], w, s, out_dtype=torch.float32) for i in range(0, in_f, rows)]
    ).T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows", [1, 4, 64]
)  # decode (codes expanded in registers) and prefill (tiles + GEMM)
def test_mxfp4_linear_by_the_definitions(backend, rows, dtype):
    packed, scale, want = mx_weight()
    assert torch.equal(read_back(kernels.mxfp4_linear, packed, scale, 256, rows, dtype).double(), want)
    x = torch.eye(256, dtype=dtype)[:rows]
    assert torch.equal(ops.linear(x, MXFP4(packed, scale)).double(), want.T[:rows].to(dtype).double())


@pytest.mark.parametrize("fp32_scale", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 64])
def test_fp8_linear_by_the_definitions(backend, rows, dtype, fp32_scale):
    w, s, want = fp8_weight(fp32_scale)
    if dtype == torch.bfloat16:  # 0.75 x a 4-bit significand can need 6 bits: still exact in bf16's 8
        assert torch.equal(want.to(torch.bfloat16).double(), want)
    assert torch.equal(read_back(kernels.fp8_linear, w, s, 256, rows, dtype).double(), want)


def test_quantizers_known_answers():
    """dsv4's quantizers (the training export and test checkpoints) against hand-made bytes. The MX
    scale is DeepSeek's 2^ceil(log2(amax / 6)), which never clips, where the spec's example rule
    2^(floor(log2 amax) - 2) clips the block's largest values to 6: amax 7 shows the difference."""
    from dsv4.quant import quantize_fp8_block, quantize_mxfp4

    block = torch.tensor([[6.0, -3.0, 1.0, 0.5, 0.25, 0.75, -0.0, 4.0] + [0.0] * 24])
    packed, scale = quantize_mxfp4(block)
    # 0.25 and 0.75 are ties: to the even code (0 -> 0.0, 2 -> 1.0)
    assert packed.view(torch.uint8)[0, :4].tolist() == [0xD7, 0x12, 0x20, 0x60] and scale.view(
        torch.uint8
    ).tolist() == [[127]]
    packed, scale = quantize_mxfp4(block * 7 / 6)  # amax 7: scale 2, 7 -> 3.5 -> 4 (tie to the even code)
    assert scale.view(torch.uint8).tolist() == [[128]] and packed.view(torch.uint8)[0, 0] & 0xF == 6
    w = torch.zeros(128, 128)
    w[0, :4] = torch.tensor([448.0, 1.0, -1.5, 2.0**-9])
    q, s = quantize_fp8_block(w)
    assert q.view(torch.uint8)[0, :4].tolist() == [0x7E, 0x38, 0xBC, 0x01] and s.view(
        torch.uint8
    ).tolist() == [[127]]
