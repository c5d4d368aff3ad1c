"""Weight formats of the released checkpoints and their plain-torch reference arithmetic.

A weight is held as one of three format objects, and `ops.linear` dispatches on which:

- `Dense`: a plain tensor (bf16 / fp16 / fp32 in the file), kept in the compute dtype.
- `FP8Block`: `float8_e4m3fn` values `[out, in]` with one scale per 128x128 block, grid
  `[ceil(out/128), ceil(in/128)]`, stored as e8m0 (2^(b-127)) or as fp32 (`weight_scale_inv`).
- `MXFP4`: two e2m1 codes per int8 byte along the input dim (low nibble = even input index),
  `[out, in/2]`, with one e8m0 scale per 32 inputs, `[out, in/32]`.

This module also holds the rounding used by the "as-released" numerics mode: FP8 e4m3 and FP4
e2m1 block simulation with power-of-two (ue8m0) scales, and the Hadamard rotation of the indexer.
It knows nothing of models, files or devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0

# e2m1 code -> value; codes 8-15 are the negated 0-7.
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes (float8_e8m0fnu or uint8) -> float32 2^(byte - 127), 0xFF NaN; fp32 scales pass through."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        bits = scale.view(torch.uint8).to(torch.int32)
        out = torch.ldexp(torch.ones_like(bits, dtype=torch.float32), bits - 127)
        return out.masked_fill_(bits == 0xFF, math.nan)  # the OCP MX spec's NaN (not 2^128)
    return scale.float()


@dataclass(frozen=True)
class Dense:
    weight: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)


@dataclass(frozen=True)
class FP8Block:
    weight: torch.Tensor  # float8_e4m3fn [out, in]
    scale: torch.Tensor  # e8m0 or fp32 [ceil(out/128), ceil(in/128)]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequant_fp8_block(self.weight, self.scale).to(dtype)


@dataclass(frozen=True)
class MXFP4:
    weight: torch.Tensor  # int8 [out, in/2]
    scale: torch.Tensor  # e8m0 [out, in/32]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 2)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequant_mxfp4(self.weight, self.scale).to(dtype)


Weight = Dense | FP8Block | MXFP4


def dequant_fp8_block(weight: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """FP8 e4m3 `[out, in]` times its per-block scale -> float32 `[out, in]`."""
    out_f, in_f = weight.shape
    s = e8m0_to_float(scale)
    s = s.repeat_interleave(block, dim=0)[:out_f].repeat_interleave(block, dim=1)[:, :in_f]
    return weight.float() * s


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """int8 `[out, in/2]` -> float32 e2m1 values `[out, in]` (low nibble first)."""
    b = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)
    return E2M1_VALUES.to(packed.device)[codes]


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """MXFP4 `[out, in/2]` int8 + e8m0 `[out, in/32]` -> float32 `[out, in]`."""
    values = unpack_e2m1(packed)
    return values * e8m0_to_float(scale).repeat_interleave(block, dim=-1)


# ---- quantizers (used to write checkpoints and by the training export) ----


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= qmax (ue8m0 scale), as float32."""
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def _float_to_e8m0(s: torch.Tensor) -> torch.Tensor:
    bits = (torch.log2(s).round().to(torch.int32) + 127).clamp(0, 254)
    return bits.to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float `[out, in]` -> (float8_e4m3fn `[out, in]`, e8m0 scales `[ceil(out/b), ceil(in/b)]`)."""
    out_f, in_f = w.shape
    po, pi = -out_f % block, -in_f % block
    wp = torch.nn.functional.pad(w.float(), (0, pi, 0, po))
    blocks = wp.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [ob, b, ib, b]
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(2.0**-100)
    s = _pow2_scale(amax, FP8_MAX)
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.flatten(2, 3).flatten(0, 1)[:out_f, :in_f].contiguous()
    return q, _float_to_e8m0(s)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value (ties to the even code), x already scaled into [-6, 6]."""
    grid = E2M1_VALUES[:8].to(x.device)
    mag = x.abs().clamp(max=FP4_MAX)
    idx = torch.bucketize(mag, (grid[1:] + grid[:-1]) / 2)
    # bucketize puts exact midpoints in the lower bucket; ties go to the even code instead.
    mid = (grid[1:] + grid[:-1]) / 2
    at_mid = (idx < 7) & (mag == mid[idx.clamp(max=6)])
    idx = torch.where(at_mid & (idx % 2 == 1), idx + 1, idx)
    return torch.copysign(grid[idx], x)


def quantize_mxfp4(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float `[out, in]` -> (int8 packed `[out, in/2]`, e8m0 scales `[out, in/32]`)."""
    out_f, in_f = w.shape
    if in_f % block:
        raise ValueError(f"MXFP4 needs the input dim to be a multiple of {block}, got {in_f}")
    blocks = w.float().unflatten(-1, (-1, block))
    s = _pow2_scale(blocks.abs().amax(-1).clamp_min(2.0**-100), FP4_MAX)
    v = round_e2m1(blocks / s[..., None]).flatten(-2)
    grid = E2M1_VALUES[:8]
    codes = (v.abs()[..., None] == grid).to(torch.int64).argmax(-1) + 8 * (torch.signbit(v) & (v != 0))
    codes = codes.to(torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed.contiguous(), _float_to_e8m0(s)


# ---- as-released activation simulation ----


def simulate_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Round x through FP8 e4m3 with a ue8m0 scale per `block` along the last dim (a copy)."""
    xb = x.float().unflatten(-1, (-1, block))
    s = _pow2_scale(xb.abs().amax(-1, keepdim=True).clamp_min(1e-4), FP8_MAX)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).flatten(-2).to(x.dtype)


def simulate_fp4(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Round x through e2m1 with a ue8m0 scale per `block` along the last dim (a copy)."""
    xb = x.float().unflatten(-1, (-1, block))
    s = _pow2_scale(xb.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126), FP4_MAX)
    return (round_e2m1(xb / s) * s).flatten(-2).to(x.dtype)


_HADAMARD: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along the last dim (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two dim, got {n}")
    key = (n, x.device, x.dtype)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / math.sqrt(n)).to(device=x.device, dtype=x.dtype)
    return x @ _HADAMARD[key]
