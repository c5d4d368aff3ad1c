// The decode products (a few rows of x against a quantized or dense matrix), into caller buffers:
// included at the end of cpu_kernels.cpp's internal namespace, after the row kernels, and used both by
// its tensor entry points (mxfp4_linear, fp8_linear below it) and by the fused ops (fused.h), so there
// is one decode path. A `DecodeJob` is one product; `run_decode` runs a batch of them in one parallel
// region.

// A weight as the decode products and the fused ops take it: (format code 0 Dense, 1 FP8Block,
// 2 MXFP4; values; scales, or the values again for Dense).
using Lin = std::tuple<int64_t, torch::Tensor, torch::Tensor>;

inline float bf16_bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float wval(const float* p, int64_t i) { return p[i]; }
inline float wval(const uint16_t* p, int64_t i) { return bf16_bits(p[i]); }

// sum_i w[i] * x[i] in fp32 for one weight row (fp32 or bf16 bits), prefetching the stream one
// line per 64 bytes read (the rows of small models are shorter than the hardware prefetchers' reach).
#if defined(__AVX512F__)
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const uint16_t* w) {  // 16 bf16 -> fp32: the bits in the high half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))), 16));
}

template <typename W>
inline float row_dot(const W* w, const float* x, int64_t in) {
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    if (i % kLine == 0) prefetch(reinterpret_cast<const uint8_t*>(w + i) + kPrefetch);
    if (sizeof(W) == 4 && (i + 16) % kLine == 0) prefetch(reinterpret_cast<const uint8_t*>(w + i + 16) + kPrefetch);
    a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(load16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  for (; i < in; ++i) s += wval(w, i) * x[i];
  return s;
}
#else
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t* w) {  // 8 bf16 -> fp32: the bits in the high half
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), 16));
}

// Four accumulators: the FMA latency, not the load, bounds fewer (a plain loop that the compiler
// left scalar read bf16 at ~3 GB/s from cache on a Zen 3).
template <typename W>
inline float row_dot(const W* w, const float* x, int64_t in) {
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    for (int64_t l = 0; l < 32; l += kLine) prefetch(reinterpret_cast<const uint8_t*>(w + i + l) + kPrefetch);
    for (int k = 0; k < 4; ++k) a[k] = _mm256_fmadd_ps(load8(w + i + 8 * k), _mm256_loadu_ps(x + i + 8 * k), a[k]);
  }
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
  for (; i < in; ++i) s += wval(w, i) * x[i];
  return s;
}
#endif


// One product of a batch of decode products: y [M, out] fp32 = x [M, in] @ W.T (x fp32 values,
// bf16-exact when `bf16`), through the same decode kernels, column orders and sums as the tensor
// entry points (mxfp4_linear, fp8_linear, dense_linear for a few rows), into a caller's buffer.
// `run_decode` computes a batch of them in ONE pool loop over all their 16-row tiles: a MoE layer's
// 21 matrices as 2 loops instead of 21. (Under OpenMP's passive wait, before the pool, each region
// cost ~50 us on the development VM: a 256 KB MXFP4 product took 15 us on 1 thread, 63 us on 2.)
struct DecodeJob {
  int64_t kind = 0, M = 0, in = 0, out = 0, kp = 0;
  bool mxb = false;        // MXFP4 with bf16 dot products (x bf16-exact)
  const uint8_t* w = nullptr;
  const uint8_t* s = nullptr;
  bool w_bf16 = false;     // Dense: bf16 values (else fp32)
  std::vector<float> sc;   // FP8 block scales (f8_scales)
  std::vector<float> xp;   // x permuted for the format (MXFP4 / FP8); Dense reads x itself
  std::vector<uint16_t> xb;  // x as bf16 bits in the mxb order
  const float* x = nullptr;
  float* y = nullptr;

  // Contiguous values and scales of the format's shapes (fused.h: decode_takes; the entry points check them); zeroes y [M, out].
  DecodeJob(const Lin& lin, const float* x_, int64_t M_, int64_t in_, bool bf16, float* y_)
      : kind(std::get<0>(lin)), M(M_), in(in_), x(x_), y(y_) {
    const auto& w_t = std::get<1>(lin);
    const auto& s_t = std::get<2>(lin);
    out = w_t.size(0);
    w = static_cast<const uint8_t*>(w_t.data_ptr());
    std::fill(y, y + M * out, 0.f);
    if (kind == 2) {
      s = static_cast<const uint8_t*>(s_t.data_ptr());
      kp = ceil_div(in, kMxChunk) * kMxChunk;
#ifdef __AVX512BF16__
      if (bf16) {  // bf16 dot products (mxb_row)
        mxb = true;
        std::vector<uint16_t> bits(M * in);
        for (int64_t i = 0; i < M * in; ++i) {
          uint32_t u;
          std::memcpy(&u, x + i, 4);
          bits[i] = static_cast<uint16_t>(u >> 16);  // exact: the values are bf16
        }
        xb.assign(M * kp, 0);
        permute_bf16_into(bits.data(), M, in, xb.data());
        return;
      }
#endif
      xp.resize(M * kp);
      permute_into<kMxChunk, mx_src>(x, M, in, xp.data());
    } else if (kind == 1) {
      sc = f8_scales(is_byte(s_t) ? s_t.view(torch::kUInt8) : s_t.to(torch::kFloat));
      kp = ceil_div(in, kF8Chunk) * kF8Chunk;
      xp.resize(M * kp);
      permute_into<kF8Chunk, f8_src>(x, M, in, xp.data());
    } else {
      w_bf16 = w_t.scalar_type() == torch::kBFloat16;
    }
  }

  int64_t tiles() const { return ceil_div(out, kTileRows); }
  int64_t bytes_per_row() const { return kind == 2 ? in / 2 : kind == 1 ? in : (w_bf16 ? 2 : 4) * in; }

  // Rows [t * kTileRows, ...) of y; xs: the thread's FP8 scaled-x buffer, valid for block `*key`.
  void tile(int64_t t, std::vector<float>& xs, const void*& key_job, int64_t& key_block) const {
    const int64_t r0 = t * kTileRows, r1 = std::min(out, r0 + kTileRows);
    if (kind == 2) {
      for_tile(r0, r1, M, kp / kMxChunk, kMxChunk, in / 2, mxb ? 2 : 4,
               [&](auto g, int64_t r, int64_t m0, int64_t c0, int64_t c1, int64_t pf) {
                 constexpr int G = decltype(g)::value;
                 float* yr = y + m0 * out + r;
#ifdef __AVX512BF16__
                 if (mxb) {
                   mxb_row<G>(w + r * (in / 2), s + r * (in / 32), in, c0, c1, pf, xb.data() + m0 * kp, kp, yr, out);
                   return;
                 }
#endif
                 mx_row<G>(w + r * (in / 2), s + r * (in / 32), in, c0, c1, r == out - 1, pf, xp.data() + m0 * kp, kp,
                           yr, out);
               });
    } else if (kind == 1) {
      const int64_t rb = r0 / 128, nbi = ceil_div(in, 128);
      if (key_job != this || key_block != rb) {  // x times this 128-row block's scales (f8_decode)
        key_job = this, key_block = rb;
        xs.resize(M * kp);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t i0 = 0; i0 < kp; i0 += 128) {
            const float sv = sc[rb * nbi + i0 / 128];
            for (int64_t i = i0; i < std::min(kp, i0 + 128); ++i) xs[m * kp + i] = xp[m * kp + i] * sv;
          }
      }
      for_tile(r0, r1, M, kp / kF8Chunk, kF8Chunk, in, 4,
               [&](auto g, int64_t r, int64_t m0, int64_t c0, int64_t c1, int64_t pf) {
                 f8_row<decltype(g)::value>(w + r * in, in, c0, c1, pf, xs.data() + m0 * kp, kp, y + m0 * out + r,
                                            out);
               });
    } else {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t m = 0; m < M; ++m)
          y[m * out + r] = w_bf16 ? row_dot(reinterpret_cast<const uint16_t*>(w) + r * in, x + m * in, in)
                                  : row_dot(reinterpret_cast<const float*>(w) + r * in, x + m * in, in);
    }
  }
};

// Every job's tiles in one pool loop (a chunk is a contiguous run of tiles, across jobs).
inline void run_decode(const std::vector<DecodeJob>& jobs) {
  std::vector<int64_t> first(jobs.size() + 1, 0);
  int64_t bytes = 0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    first[j + 1] = first[j] + jobs[j].tiles();
    bytes += jobs[j].out * jobs[j].bytes_per_row();
  }
  const int64_t total = first.back();
  if (total == 0) return;
  const int64_t tile_bytes = std::max<int64_t>(1, bytes / total);
  pool::run(total, std::max<int64_t>(1, kMinThreadBytes / tile_bytes), [&](int64_t t0, int64_t t1) {
    std::vector<float> xs;
    const void* key_job = nullptr;
    int64_t key_block = -1;
    size_t j = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[j + 1]) ++j;
      jobs[j].tile(t - first[j], xs, key_job, key_block);
    }
  });
}

// One product (a batch of one).
inline void decode_into(const Lin& lin, const float* x, int64_t M, int64_t in, bool bf16, float* y) {
  std::vector<DecodeJob> jobs;
  jobs.emplace_back(lin, x, M, in, bf16, y);
  run_decode(jobs);
}

// The tensor entry points' decode path: x [M, in] (fp32 or bf16, contiguous) -> y [M, out] fp32.
inline torch::Tensor decode(const Lin& lin, const torch::Tensor& x) {
  const auto xf = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({x.size(0), std::get<1>(lin).size(0)}, torch::kFloat);
  decode_into(lin, xf.data_ptr<float>(), x.size(0), x.size(1), x.scalar_type() == torch::kBFloat16,
              y.data_ptr<float>());
  return y;
}

