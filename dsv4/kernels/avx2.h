// AVX2 + FMA + F16C kernels, for CPUs without AVX-512: included by cpu_kernels.cpp inside its
// namespace. Same functions and meaning as avx512.h, 8 lanes wide, with column orders of their own:
//   MXFP4: a 16-byte block (32 codes, one scale) is two halves of 8 bytes, each widened to 8
//     dwords; the low nibbles then the high ones give inputs 2d and 2d+1 of the half.
//   FP8: 16 bytes widen to 16 words, converted through fp16 in input order (no permutation).
// No load reads past a row's bytes: full blocks are loaded as they are, a tail is copied first.

inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }
// bf16 by dropping the low 16 bits: exact, as in avx512.h.
inline void store8(at::BFloat16* dst, __m256 v) {
  const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// ---- column permutations -------------------------------------------------------------------
// MXFP4 position p of a 128-code chunk (4 blocks of 16 bytes, two codes per byte) lies in vector
// v = p/8, lane e = p%8 of mx_expand's output: v = 8 * pair + 4 * nibble + 2 * (byte/8) + parity,
// lane = 4 * (block % 2) + (byte % 8) / 2 with parity = byte % 2 (see mx_expand).
inline int64_t mx_src(int64_t p) {
  const int64_t v = p / 8, e = p % 8;
  const int64_t block = 2 * (v / 8) + e / 4, byte = 8 * (v / 2 % 2) + 2 * (e % 4) + v % 2;
  return 32 * block + 2 * byte + v / 4 % 2;
}
inline int64_t f8_src(int64_t p) { return p; }

// dst[p] = src[idx[p]] for one full chunk, 8 lanes at a time.
template <int64_t Chunk>
inline void gather_chunk(const int32_t* idx, const float* src, float* dst) {
  for (int64_t v = 0; v < Chunk; v += 8)
    _mm256_storeu_ps(dst + v, _mm256_i32gather_ps(src, _mm256_load_si256(reinterpret_cast<const __m256i*>(idx + v)), 4));
}

// ---- MXFP4 ---------------------------------------------------------------------------------
// Every e2m1 value is bf16-exact, so a code becomes its fp32 value as two table lookups (vpshufb:
// the high and the low byte of its bf16 bits) and two interleaves, about 2.5 instructions per 8
// values where an fp32 table (vpermps) with a separate sign took ~5.5. Measured on a Zen 3 (EPYC
// 7xx3, AVX2 only), batch 1, bench_kernels --quick, 1 / 2 threads, GB/s from RAM: 2048 x 4096
// 2.5 -> 6.9 / 5.0 -> 9.3, 4096 x 2048 2.7 -> ~7 / 5.2 -> 10.8.
alignas(32) const uint8_t kE2M1Hi[32] = {0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40,
                                         0x80, 0xBF, 0xBF, 0xBF, 0xC0, 0xC0, 0xC0, 0xC0,
                                         0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40,
                                         0x80, 0xBF, 0xBF, 0xBF, 0xC0, 0xC0, 0xC0, 0xC0};
alignas(32) const uint8_t kE2M1Lo[32] = {0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0,
                                         0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0,
                                         0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0,
                                         0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0};

struct MxTables {
  __m256i hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(kE2M1Hi));
  __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(kE2M1Lo));
};

// 32 bytes (blocks 2 * pair and 2 * pair + 1 of a chunk, one per 128-bit lane) -> 64 fp32 values,
// unscaled, as v[4 * nibble + 2 * (byte / 8) + byte parity], in the mx_src order (each vector holds
// 4 values of each block: lanes 0..3 the first block, 4..7 the second).
inline void mx_expand(const uint8_t* wb, const MxTables& t, __m256 v[8]) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
  const __m256i nib = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi32(int(0xFFFF0000u));
  const __m256i n[2] = {_mm256_and_si256(b, nib), _mm256_and_si256(_mm256_srli_epi16(b, 4), nib)};
  for (int k = 0; k < 2; ++k) {
    const __m256i h = _mm256_shuffle_epi8(t.hi, n[k]), l = _mm256_shuffle_epi8(t.lo, n[k]);
    const __m256i w[2] = {_mm256_unpacklo_epi8(l, h), _mm256_unpackhi_epi8(l, h)};  // bf16 bits of bytes 0-7, 8-15
    for (int j = 0; j < 2; ++j) {
      v[4 * k + 2 * j] = _mm256_castsi256_ps(_mm256_slli_epi32(w[j], 16));     // even bytes
      v[4 * k + 2 * j + 1] = _mm256_castsi256_ps(_mm256_and_si256(w[j], high));  // odd bytes
    }
  }
}

// The four e8m0 scales of a chunk as fp32, spread for mx_expand's two pairs: [s0 x4, s1 x4], [s2 x4, s3 x4].
inline void mx_scales(const uint8_t* s, __m256 sc[2]) {
  int32_t four;
  std::memcpy(&four, s, 4);
  const __m128i e = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(four));
  const __m128i bits = _mm_blendv_epi8(_mm_slli_epi32(e, 23), _mm_set1_epi32(0x00400000),  // 0 is 2^-127
                                       _mm_cmpeq_epi32(e, _mm_setzero_si128()));
  const __m256 f = _mm256_castps128_ps256(_mm_castsi128_ps(bits));
  sc[0] = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  sc[1] = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
}

// Chunk c's 64 code bytes and 4 scale bytes, or zero-padded copies of a row's last, shorter chunk
// (zero codes are 0; the padding's scale is 1, finite).
inline void mx_chunk_bytes(const uint8_t* w, const uint8_t* s, int64_t nblk, int64_t c, const uint8_t*& wc,
                           const uint8_t*& sc, uint8_t (&wtail)[64], uint8_t (&stail)[4]) {
  const int64_t rem = nblk - 4 * c;
  wc = w + 64 * c, sc = s + 4 * c;
  if (rem >= 4) return;
  std::memset(wtail, 0, 64);
  std::memcpy(wtail, wc, 16 * rem);
  std::memset(stail, 127, 4);
  std::memcpy(stail, sc, rem);
  wc = wtail, sc = stail;
}

// y[m] += sum over chunks [c0, c1) of a row of code * scale * xp[m], for M rows of permuted x.
template <int M>
inline void mx_row(const uint8_t* w, const uint8_t* s, int64_t in, int64_t c0, int64_t c1, bool /*last*/,
                   int64_t pf, const float* xp, int64_t ldx, float* y, int64_t ldy) {
  const MxTables t;
  __m256 acc[M][2];  // one per pair of blocks: independent chains
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const int64_t nblk = in / 32;
  uint8_t wtail[64], stail[4];
  for (int64_t c = c0; c < c1; ++c) {
    prefetch(w + c * 64 + pf);
    const uint8_t *wc, *scb;
    mx_chunk_bytes(w, s, nblk, c, wc, scb, wtail, stail);
    __m256 sc[2];
    mx_scales(scb, sc);
    for (int p = 0; p < 2; ++p) {
      __m256 v[8];
      mx_expand(wc + 32 * p, t, v);
      for (int m = 0; m < M; ++m) {
        const float* xm = xp + m * ldx + c * kMxChunk + 64 * p;
        // two chains of four: a chain of eight dependent FMAs held the loop to ~half speed
        __m256 d0 = _mm256_mul_ps(v[0], _mm256_loadu_ps(xm)), d1 = _mm256_mul_ps(v[1], _mm256_loadu_ps(xm + 8));
        for (int j = 2; j < 8; j += 2) {
          d0 = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(xm + 8 * j), d0);
          d1 = _mm256_fmadd_ps(v[j + 1], _mm256_loadu_ps(xm + 8 * j + 8), d1);
        }
        acc[m][p] = _mm256_fmadd_ps(_mm256_add_ps(d0, d1), sc[p], acc[m][p]);
      }
    }
  }
  for (int m = 0; m < M; ++m) y[m * ldy] += hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

// Rows [r0, r1) of the weight -> fp32 or bf16 (T) in permuted column order, row stride kp.
template <class T>
void mx_dequant(const uint8_t* w, const uint8_t* s, int64_t in, int64_t r0, int64_t r1, int64_t kp,
                T* dst) {
  const MxTables t;
  const int64_t nblk = in / 32;
  uint8_t wtail[64], stail[4];
  for (int64_t r = r0; r < r1; ++r) {
    T* d = dst + (r - r0) * kp;
    for (int64_t c = 0; c < kp / kMxChunk; ++c) {
      const uint8_t *wc, *scb;
      mx_chunk_bytes(w + r * (in / 2), s + r * nblk, nblk, c, wc, scb, wtail, stail);
      __m256 sc[2];
      mx_scales(scb, sc);
      for (int p = 0; p < 2; ++p) {
        __m256 v[8];
        mx_expand(wc + 32 * p, t, v);
        for (int j = 0; j < 8; ++j) store8(d + c * kMxChunk + 64 * p + 8 * j, _mm256_mul_ps(v[j], sc[p]));
      }
    }
  }
}

// ---- FP8 e4m3 ------------------------------------------------------------------------------

// 16 e4m3 bytes -> 2 x 8 fp32 holding value * 2^-8, in input order (the fp16 placement of avx512.h).
inline void e4m3_expand16(const uint8_t* p, __m256 f[2]) {
  const __m256i wd = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(wd, 8), 1),
                                     _mm256_set1_epi16((short)0xBF80));
  f[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  f[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// The 64 bytes of chunk c, or a zero-padded copy of the row's last, shorter chunk.
inline const uint8_t* f8_chunk_bytes(const uint8_t* w, int64_t in, int64_t c, uint8_t (&tail)[kF8Chunk]) {
  const int64_t rem = in - c * kF8Chunk;
  if (rem >= kF8Chunk) return w + c * kF8Chunk;
  std::memset(tail, 0, kF8Chunk);
  std::memcpy(tail, w + c * kF8Chunk, rem);
  return tail;
}

// y[m] += sum over chunks [c0, c1) of a row of e4m3 * xs[m]; xs carries the block scales and 2^8.
template <int M>
inline void f8_row(const uint8_t* w, int64_t in, int64_t c0, int64_t c1, int64_t pf,
                   const float* xs, int64_t ldx, float* y, int64_t ldy) {
  __m256 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  uint8_t tail[kF8Chunk];
  for (int64_t c = c0; c < c1; ++c) {
    prefetch(w + c * kF8Chunk + pf);
    const uint8_t* wc = f8_chunk_bytes(w, in, c, tail);
    for (int q = 0; q < 4; ++q) {
      __m256 f[2];
      e4m3_expand16(wc + 16 * q, f);
      for (int m = 0; m < M; ++m) {
        const float* xm = xs + m * ldx + c * kF8Chunk + 16 * q;
        acc[m][0] = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xm), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xm + 8), acc[m][1]);
      }
    }
  }
  for (int m = 0; m < M; ++m) y[m * ldy] += hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

template <class T>
void f8_dequant(const uint8_t* w, const float* sc, int64_t nbi, int64_t in, int64_t r0, int64_t r1,
                int64_t kp, T* dst) {
  uint8_t tail[kF8Chunk];
  for (int64_t r = r0; r < r1; ++r) {
    const float* srow = sc + (r / 128) * nbi;
    T* d = dst + (r - r0) * kp;
    for (int64_t c = 0; c < kp / kF8Chunk; ++c) {
      const uint8_t* wc = f8_chunk_bytes(w + r * in, in, c, tail);
      const __m256 s = _mm256_set1_ps(srow[c / 2]);  // two 64-chunks per 128-column block
      for (int q = 0; q < 4; ++q) {
        __m256 f[2];
        e4m3_expand16(wc + 16 * q, f);
        store8(d + c * kF8Chunk + 16 * q, _mm256_mul_ps(f[0], s));
        store8(d + c * kF8Chunk + 16 * q + 8, _mm256_mul_ps(f[1], s));
      }
    }
  }
}
