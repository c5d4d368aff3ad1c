// CPU kernels for the two quantized weight formats (see dsv4/quant.py):
//   MXFP4: uint8 [out, in/2], two e2m1 codes per byte (low nibble = even input), e8m0 scale [out, in/32]
//   FP8:   e4m3fn [out, in] with one scale per 128x128 block (e8m0 bytes or float32)
// y[M, out] = x[M, in] @ dequant(W).T, accumulated in fp32.
//
// Two paths per format:
//   decode (few rows of x): the weight streams from memory once; codes are expanded to fp32 in
//     registers and FMA'd with a copy of x whose columns were permuted to match the order the
//     expansion produces (so no shuffles are needed to restore the input order). decode.h drives
//     the row kernels, for these entry points and for the fused ops alike.
//   prefill (many rows of x): the weight is dequantized in row chunks (same permuted column order)
//     into a fp32 buffer and multiplied with at::mm, which is compute-bound there anyway.
// The instruction set is chosen when the file is compiled: avx512.h (AVX-512 F/BW/VL) or avx2.h
// (AVX2 + FMA + F16C) provide the expansion, the row kernels and the column orders; the drivers
// and entry points below are shared. On AVX512_BF16 CPUs a few bf16 rows of x against MXFP4 take
// bf16 dot products (the decode path, see mxb_row). The entry points check shapes and
// dtypes again behind dsv4/kernels/__init__.py. This file knows nothing of models.

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

#include "pool.h"

namespace {

constexpr int64_t kMxChunk = 128;  // e2m1 codes in one 64-byte load
constexpr int64_t kF8Chunk = 64;   // e4m3 values in one 64-byte load
constexpr int64_t kTileRows = 16;  // weight rows per work item; divides the 128-row FP8 block
constexpr int64_t kGroup = 4;      // x rows sharing one expansion of the weight codes
constexpr int64_t kSegment = 2048;  // inputs per pass when a group's x would not fit in L1
constexpr int64_t kMinThreadBytes = 128 << 10;  // weight bytes below which a thread is not worth waking
// x bytes a group of rows may keep in L1 while the weight streams past: the 32 KB L1d holds much
// less than its size of x in practice (FP8 2048 x 4096, one thread, from RAM: 16 KB of fp32 x
// 11 GB/s as whole rows, 20-22 cut into 2048-input segments, 26 for an 8 KB x as whole rows).
constexpr int64_t kL1Bytes = 8 << 10;
// Software prefetch distance in bytes of the weight stream: with the hardware prefetcher alone a
// core decoding at full speed waits on DRAM (measured: ~2x slower single-threaded). When rows
// are cut into segments, the stream is no longer sequential and the prefetch instead reaches
// one tile of rows ahead. Prefetches go to L2, not L1: an L1 prefetch holds one of the core's
// few line-fill buffers until its line arrives, which capped the stream (bench_kernels, batch 1,
// 2 threads: FP8 16.3 -> 19.5-20.3 GB/s with L2 prefetches; 4096 bytes measured best, MXFP4
// 12.9 -> 15.5 GB/s against 2048; 8192 and 16384 no better).
constexpr int64_t kPrefetch = 4096;

inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }

alignas(64) const float kE2M1[16] = {0.f,  .5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                     -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// at::parallel_for grain in kTileRows tiles: a thread gets at least kMinThreadBytes of weight.
inline int64_t tile_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, kMinThreadBytes / (kTileRows * row_bytes));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "avx512.h"
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "avx2.h"
constexpr const char* kIsa = "avx2";
#else
#error "dsv4 CPU kernels need AVX-512 (F, BW, VL) or AVX2 with FMA and F16C"
#endif

// x [M, in] fp32 -> [M, nchunks*chunk] in the ISA's column order (Src), zero-padded past `in`.
// Full chunks go through the ISA's gather_chunk; the scalar loop only does the tail chunk.
// Serial: cheap next to the matmul, and a parallel region costs a barrier.
template <int64_t Chunk, int64_t (*Src)(int64_t)>
void permute_into(const float* xs, int64_t M, int64_t in, float* xp) {
  const int64_t kp = ceil_div(in, Chunk) * Chunk;
  alignas(64) int32_t idx[Chunk];
  for (int64_t p = 0; p < Chunk; ++p) idx[p] = static_cast<int32_t>(Src(p));
  for (int64_t m = 0; m < M; ++m) {
    const float* src = xs + m * in;
    float* dst = xp + m * kp;
    int64_t c = 0;
    for (; c + Chunk <= in; c += Chunk) gather_chunk<Chunk>(idx, src + c, dst + c);
    for (; c < kp; c += Chunk)
      for (int64_t p = 0; p < Chunk; ++p) dst[c + p] = c + idx[p] < in ? src[c + idx[p]] : 0.f;
  }
}

template <int64_t Chunk, int64_t (*Src)(int64_t)>
torch::Tensor permute_x(const torch::Tensor& x) {
  const int64_t M = x.size(0), in = x.size(1), kp = ceil_div(in, Chunk) * Chunk;
  auto out = torch::empty({M, kp}, x.options());
  permute_into<Chunk, Src>(x.data_ptr<float>(), M, in, out.data_ptr<float>());
  return out;
}

// Block scales as float32 times 2^8 (undoing e4m3_expand's 2^-8), grid [ceil(out/128), ceil(in/128)].
std::vector<float> f8_scales(const torch::Tensor& scale) {
  auto s = scale.contiguous();
  std::vector<float> out(s.numel());
  if (s.scalar_type() == torch::kUInt8) {
    const uint8_t* b = s.data_ptr<uint8_t>();
    for (int64_t i = 0; i < s.numel(); ++i) out[i] = std::ldexp(1.0f, int(b[i]) - 127 + 8);
  } else {
    const float* f = s.data_ptr<float>();
    for (int64_t i = 0; i < s.numel(); ++i) out[i] = f[i] * 256.0f;
  }
  return out;
}

// ---- drivers -------------------------------------------------------------------------------

// Calls row<G>(r, m0, c0, c1) for every weight row r in [r0, r1), every group of up to kGroup x
// rows and every segment [c0, c1) of the nch chunks. The tile's rows are revisited per group from
// L1/L2, so the weight streams from memory once. When a group's x (G * kp floats) would not fit
// in L1 (x_bytes per element: fp32, or bf16 for mxb_row), rows are cut into segments so that
// each x slice stays there; otherwise each row is one segment, which keeps the weight stream
// sequential for the prefetchers.
template <class RowFn>
inline void for_tile(int64_t r0, int64_t r1, int64_t M, int64_t nch, int64_t chunk, int64_t row_bytes,
                     int64_t x_bytes, RowFn&& row) {
  const int64_t kp = nch * chunk;
  const bool whole = std::min(M, kGroup) * kp * x_bytes <= kL1Bytes;
  const int64_t seg = whole ? nch : kSegment / chunk;
  const int64_t pf = whole ? kPrefetch : kTileRows * row_bytes;
  for (int64_t c0 = 0; c0 < nch; c0 += seg) {
    const int64_t c1 = std::min(nch, c0 + seg);
    for (int64_t m0 = 0; m0 < M; m0 += kGroup) {
      const int64_t g = std::min(kGroup, M - m0);
      for (int64_t r = r0; r < r1; ++r) {
        switch (g) {
          case 1: row(std::integral_constant<int, 1>{}, r, m0, c0, c1, pf); break;
          case 2: row(std::integral_constant<int, 2>{}, r, m0, c0, c1, pf); break;
          case 3: row(std::integral_constant<int, 3>{}, r, m0, c0, c1, pf); break;
          default: row(std::integral_constant<int, 4>{}, r, m0, c0, c1, pf); break;
        }
      }
    }
  }
}

// Prefill: each thread dequantizes its rows, a tile of at most ~512 KB at a time (L2-sized), and
// multiplies the tile with a single-threaded at::mm (BLAS runs serially inside a parallel
// region). One parallel region per call: alternating dequant and multi-threaded GEMM regions per
// chunk measured up to 30x slower when other processes share the cores (every barrier can cost
// a scheduler time slice). T = float gives fp32 y; T = at::BFloat16 (xp bf16 too) gives bf16 y
// from a bf16 GEMM, whose products are exact and sums fp32: the fp32 result rounded once.
template <class T, class DequantFn>
torch::Tensor dequant_mm(const torch::Tensor& xp, int64_t out_f, DequantFn&& dequant) {
  const int64_t M = xp.size(0), kp = xp.size(1);
  auto y = torch::empty({M, out_f}, xp.options());
  const int64_t tile = std::max<int64_t>(kTileRows, ((512 << 10) / sizeof(T) / kp) / kTileRows * kTileRows);
  // InferenceMode is thread-local and parallel_for's workers do not inherit it; without it, writing
  // into y (an inference tensor when the caller is under torch.inference_mode) is refused.
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, ceil_div(out_f, kTileRows), tile_grain(kp / 2), [&](int64_t t0, int64_t t1) {
    c10::InferenceMode guard(inference);
    const int64_t end = std::min(out_f, t1 * kTileRows);
    auto buf = torch::empty({std::min(tile, end - t0 * kTileRows), kp}, xp.options());
    for (int64_t r0 = t0 * kTileRows; r0 < end; r0 += tile) {
      const int64_t n = std::min(tile, end - r0);
      dequant(r0, r0 + n, buf.data_ptr<T>());
      // y[:, r0:r0+n] is a strided view (ld = out_f) that BLAS writes in place.
      auto yv = y.narrow(1, r0, n);
      at::mm_out(yv, xp, buf.narrow(0, 0, n).t());
    }
  });
  return y;
}

// Whether the CPU has native bf16 dot products (AVX512_BF16, maybe AMX); without them bf16
// GEMMs are slower than fp32 ones.
bool has_bf16_gemm() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

// Whether prefill should run as a bf16 GEMM: only when the result is rounded to bf16 anyway.
bool bf16_gemm(const torch::Tensor& x_in, bool fp32_out) {
  return has_bf16_gemm() && x_in.scalar_type() == torch::kBFloat16 && !fp32_out;
}

// x [..., in] fp32/bf16 -> contiguous [M, in] in `to` (fp32 unless asked); the checks repeat the
// Python wrapper's for safety.
torch::Tensor rows_of(const torch::Tensor& x, int64_t in, torch::ScalarType to = torch::kFloat) {
  TORCH_CHECK(x.device().is_cpu(), "dsv4 cpu kernels: x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "dsv4 cpu kernels: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "dsv4 cpu kernels: x has ", x.size(-1),
              " input features, the weight expects ", in);
  if (x.dim() == 2 && x.scalar_type() == to && x.is_contiguous()) return x;  // as it is: no ATen call
  return x.reshape({-1, in}).to(to).contiguous();
}

// y fp32 [M, out] -> [..., out] in x's dtype (or fp32 when asked).
torch::Tensor finish(const torch::Tensor& y, const torch::Tensor& x, bool fp32_out) {
  const bool same = fp32_out || x.scalar_type() == torch::kFloat;
  if (x.dim() == 2) return same ? y : y.to(x.scalar_type());  // no view needed
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return same ? y.view(shape) : y.view(shape).to(x.scalar_type());
}

bool is_byte(const torch::Tensor& t) {
  const auto st = t.scalar_type();
  return st == torch::kUInt8 || st == torch::kInt8 || st == at::ScalarType::Float8_e8m0fnu ||
         st == at::ScalarType::Float8_e4m3fn;
}

#ifdef __AVX512BF16__
// ---- MXFP4 decode with bf16 dot products (x in bf16) --------------------------------------
// When x is bf16 its values are exact in bf16, and so is every e2m1 code: vdpbf16ps multiplies
// 32 pairs per instruction with exact products and fp32 sums, twice the work of an fp32 FMA, and
// the codes expand as words (vpermw) instead of dwords. A 64-byte chunk viewed as 32 words holds
// codes 4w..4w+3 in word w; shifting it right by 4k puts code 4w+k in the word's low nibble, and
// vpermw (which reads 5 index bits, hence the table twice) expands all 32 of them at once. Lane i of
// a dot product sums words 2i and 2i+1, codes 8i+k and 8i+4+k: all four shifts' lanes i lie in the
// 32-code block i/4, so the four dot products of a chunk accumulate together and take their block
// scales (mx_scales' lane order) in one multiply. x is permuted to match (mxb_src).
inline int64_t mxb_src(int64_t p) {
  const int64_t k = p / 32, q = p % 32;
  return 8 * (q / 2) + 4 * (q % 2) + k;
}

// The e2m1 values as bf16 bits, twice: vpermw reads 5 index bits, and bit 4 is the next code's.
alignas(64) const uint16_t kE2M1Bf16[32] = {
    0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0,
    0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};

// x [M, in] bf16 bits -> xp [M, kp] in the mxb_src order (xp zeroed by the caller: the padding).
void permute_bf16_into(const uint16_t* xs, int64_t M, int64_t in, uint16_t* xp) {
  const int64_t kp = ceil_div(in, kMxChunk) * kMxChunk;
  int64_t idx[kMxChunk];
  for (int64_t p = 0; p < kMxChunk; ++p) idx[p] = mxb_src(p);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < kp; c += kMxChunk)
      for (int64_t p = 0; p < kMxChunk; ++p)
        if (c + idx[p] < in) xp[m * kp + c + p] = xs[m * in + c + idx[p]];
}

// acc[m] += sc * (chunk . xc[m]) for one 128-code chunk and M rows of permuted bf16 x.
template <int M>
inline void mxb_chunk(__m512i codes, __m512 sc, __m512i tab, const uint16_t* xc, int64_t ldx, __m512* acc) {
  __m512i e[4];
  e[0] = _mm512_permutexvar_epi16(codes, tab);
  for (int k = 1; k < 4; ++k) e[k] = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4 * k), tab);
  for (int m = 0; m < M; ++m) {
    const uint16_t* xm = xc + m * ldx;
    __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)e[0], (__m512bh)_mm512_loadu_si512(xm));
    for (int k = 1; k < 4; ++k) d = _mm512_dpbf16_ps(d, (__m512bh)e[k], (__m512bh)_mm512_loadu_si512(xm + 32 * k));
    acc[m] = _mm512_fmadd_ps(d, sc, acc[m]);
  }
}

// y[m] += sum over chunks [c0, c1) of a row, for M rows of bf16 x permuted by permute_bf16_into.
// Loads stay inside the row's bytes (a short last chunk is a masked load).
template <int M>
inline void mxb_row(const uint8_t* w, const uint8_t* s, int64_t in, int64_t c0, int64_t c1, int64_t pf,
                    const uint16_t* xp, int64_t ldx, float* y, int64_t ldy) {
  const __m512i tab = _mm512_load_si512(kE2M1Bf16);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t nfull = std::min(c1, in / kMxChunk);
  int64_t c = c0;
  for (; c + 4 <= nfull; c += 4) {  // groups of 4 full chunks share one 16-byte scale load
    const uint8_t* wc = w + c * 64;
    for (int i = 0; i < 4; ++i) prefetch(wc + pf + 64 * i);
    __m512 sc[4];
    mx_scales4(s + c * 4, sc);
    for (int i = 0; i < 4; ++i)
      mxb_chunk<M>(_mm512_loadu_si512(wc + 64 * i), sc[i], tab, xp + (c + i) * kMxChunk, ldx, acc);
  }
  for (; c < c1; ++c) {
    prefetch(w + c * 64 + pf);
    __m512i codes;
    __m512 sc;
    mx_load(w, s, in, c, codes, sc);
    mxb_chunk<M>(codes, sc, tab, xp + c * kMxChunk, ldx, acc);
  }
  for (int m = 0; m < M; ++m) y[m * ldy] += _mm512_reduce_add_ps(acc[m]);
}



#endif  // __AVX512BF16__

#include "decode.h"

}  // namespace

// x [..., in] fp32/bf16; weight int8/uint8 [out, in/2]; scale e8m0 (or its uint8 bytes) [out, in/32].
// Rows of x at or above prefill_rows take the dequantize-then-at::mm path; fp32_out skips the
// final cast to x's dtype.
torch::Tensor mxfp4_linear(const torch::Tensor& x_in, const torch::Tensor& weight_in,
                           const torch::Tensor& scale_in, int64_t prefill_rows, bool fp32_out) {
  TORCH_CHECK(weight_in.dim() == 2 && is_byte(weight_in), "MXFP4 weight: 2-D int8/uint8");
  TORCH_CHECK(weight_in.device().is_cpu() && scale_in.device().is_cpu(), "MXFP4: weight and scale on the CPU");
  const int64_t out_f = weight_in.size(0), in = weight_in.size(1) * 2;
  TORCH_CHECK(is_byte(scale_in) && scale_in.dim() == 2 && scale_in.size(0) == out_f &&
                  scale_in.size(1) == in / 32,
              "MXFP4 scale: e8m0 [", out_f, ", ", in / 32, "], got ", scale_in.sizes());
  const auto x = rows_of(x_in, in, x_in.scalar_type());  // fp32 or bf16, as given
  const auto weight = weight_in.contiguous(), scale = scale_in.contiguous();
  const int64_t M = x.size(0);
  const auto* w = static_cast<const uint8_t*>(weight.data_ptr());
  const auto* s = static_cast<const uint8_t*>(scale.data_ptr());
#ifdef __AVX512BF16__
  // One row of bf16 x (batch-1 decode) takes bf16 dot products whatever the threshold: 2-14 %
  // faster than the fp32 path in back-to-back bench_kernels runs (2 threads).
  const bool one_bf16 = M == 1 && x.scalar_type() == torch::kBFloat16;
#else
  const bool one_bf16 = false;
#endif
  if (M < prefill_rows || one_bf16) return finish(decode(Lin{2, weight, scale}, x), x_in, fp32_out);
  auto xp = permute_x<kMxChunk, mx_src>(x.to(torch::kFloat));
  const int64_t kp = xp.size(1);
  if (M >= prefill_rows && bf16_gemm(x_in, fp32_out)) {
    return finish(dequant_mm<at::BFloat16>(xp.to(torch::kBFloat16), out_f,
                                           [&](int64_t r0, int64_t r1, at::BFloat16* dst) {
                                             mx_dequant(w, s, in, r0, r1, kp, dst);
                                           }),
                  x_in, fp32_out);
  }
  return finish(dequant_mm<float>(xp, out_f, [&](int64_t r0, int64_t r1, float* dst) {
    mx_dequant(w, s, in, r0, r1, kp, dst);
  }), x_in, fp32_out);
}

// x [..., in] fp32/bf16; weight e4m3fn (or its uint8 bytes) [out, in]; scale e8m0 bytes or any float
// dtype, block grid [ceil(out/128), ceil(in/128)].
torch::Tensor fp8_linear(const torch::Tensor& x_in, const torch::Tensor& weight_in,
                         const torch::Tensor& scale_in, int64_t prefill_rows, bool fp32_out) {
  TORCH_CHECK(weight_in.dim() == 2 && is_byte(weight_in), "FP8 weight: 2-D float8_e4m3fn");
  TORCH_CHECK(weight_in.device().is_cpu() && scale_in.device().is_cpu(), "FP8: weight and scale on the CPU");
  const int64_t out_f = weight_in.size(0), in = weight_in.size(1), nbi = ceil_div(in, 128);
  TORCH_CHECK(scale_in.dim() == 2 && scale_in.size(0) == ceil_div(out_f, 128) && scale_in.size(1) == nbi,
              "FP8 scale grid: [", ceil_div(out_f, 128), ", ", nbi, "], got ", scale_in.sizes());
  const auto x = rows_of(x_in, in);
  const auto weight = weight_in.contiguous();
  const int64_t M = x.size(0);
  if (M < prefill_rows) return finish(decode(Lin{1, weight, scale_in.contiguous()}, x), x_in, fp32_out);
  const std::vector<float> sc =
      f8_scales(is_byte(scale_in) ? scale_in.contiguous().view(torch::kUInt8) : scale_in.to(torch::kFloat));
  const auto* w = static_cast<const uint8_t*>(weight.data_ptr());
  auto xp = permute_x<kF8Chunk, f8_src>(x);
  const int64_t kp = xp.size(1);
  // fp32 block scales make weight * scale inexact in bf16, so only e8m0 scales go to bf16.
  if (M >= prefill_rows && is_byte(scale_in) && bf16_gemm(x_in, fp32_out)) {
    return finish(dequant_mm<at::BFloat16>(xp.to(torch::kBFloat16), out_f,
                                           [&](int64_t r0, int64_t r1, at::BFloat16* dst) {
                                             f8_dequant(w, sc.data(), nbi, in, r0, r1, kp, dst);
                                           }),
                  x_in, fp32_out);
  }
  return finish(dequant_mm<float>(xp, out_f, [&](int64_t r0, int64_t r1, float* dst) {
    f8_dequant(w, sc.data(), nbi, in, r0, r1, kp, dst);
  }), x_in, fp32_out);
}

#include "fused.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hc_pre", &fused::hc_pre, "HyperConnection.pre: block input, post and Sinkhorn comb");
  m.def("hc_post", &fused::hc_post, "HyperConnection.post: expand a block output back into n streams");
  m.def("norm_rope", &fused::norm_rope, "RMSNorm (eps >= 0) then interleaved RoPE (cos/sin given)");
  m.def("dense_linear", &fused::dense_linear, "x @ w.T for a few rows, x and w both bf16 or both fp32");
  m.def("sink_decode", &fused::sink_decode, "one query's attention over shared K=V rows with a sink per head");
  m.def("index_top", &fused::index_top, "the lightning indexer's top-k entries for one query");
  m.def("grouped_linear", &fused::grouped_linear, "block-diagonal projection of a few rows, any weight format");
  m.def("attn_project", &fused::attn_project, "an attention layer's projections for a few rows");
  m.def("attn_output", &fused::attn_output, "an attention layer's output projection for a few rows");
  m.def("experts_rows", &fused::experts_rows, "routed experts, each on its own rows, added into fp32");
  m.def("experts_sum", &fused::experts_sum, "several SwiGLU experts for a few rows, summed in fp32");
  m.def("expert_mlp", &fused::expert_mlp, "one SwiGLU expert for a few rows, optionally added into an fp32 sum");
  m.def("route", &fused::route, "router scores, top-k (or hashed ids) and normalized weights");
  m.def("mxfp4_linear", &mxfp4_linear, "y = x @ dequant_mxfp4(w, s).T, fp32 accumulation");
  m.def("fp8_linear", &fp8_linear, "y = x @ dequant_fp8_block(w, s).T, fp32 accumulation");
  m.def("isa", [] { return std::string(kIsa); }, "the instruction set this build uses");
  m.def("has_bf16_gemm", &has_bf16_gemm, "whether bf16 x with bf16 output prefills with a bf16 GEMM");
}
