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
// MXFP4 position p of a 128-code chunk: block p/32, half (p%32)/16, nibble (p/8)%2, byte p%8.
inline int64_t mx_src(int64_t p) { return 32 * (p / 32) + 16 * (p % 32 / 16) + 2 * (p % 8) + p / 8 % 2; }
inline int64_t f8_src(int64_t p) { return p; }

// dst[p] = src[idx[p]] for one full chunk, 8 lanes at a time.
template <int64_t Chunk>
inline void gather_chunk(const int32_t* idx, const float* src, float* dst) {
  for (int64_t v = 0; v < Chunk; v += 8)
    _mm256_storeu_ps(dst + v, _mm256_i32gather_ps(src, _mm256_load_si256(reinterpret_cast<const __m256i*>(idx + v)), 4));
}

// ---- MXFP4 ---------------------------------------------------------------------------------

inline float e8m0_to_float(uint8_t b) {
  const uint32_t bits = b ? uint32_t(b) << 23 : 0x00400000u;  // b = 0 is 2^-127, a denormal
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// 8 codes (bits 0..3 of each dword; higher bits ignored) -> fp32: vpermps looks the magnitude up
// from bits 0..2, bit 3 becomes the sign.
inline __m256 e2m1_8(__m256i c, __m256 mag) {
  const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(c, 28), _mm256_set1_epi32(INT32_MIN));
  return _mm256_or_ps(_mm256_permutevar8x32_ps(mag, c), _mm256_castsi256_ps(sign));
}

// One 16-byte block -> its 32 values in the mx_src order (unscaled).
inline void mx_block(const uint8_t* wb, __m256 mag, __m256 v[4]) {
  for (int h = 0; h < 2; ++h) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + 8 * h)));
    v[2 * h] = e2m1_8(b, mag);
    v[2 * h + 1] = e2m1_8(_mm256_srli_epi32(b, 4), mag);
  }
}

// y[m] += sum over chunks [c0, c1) of a row of code * scale * xp[m], for M rows of permuted x.
template <int M>
inline void mx_row(const uint8_t* w, const uint8_t* s, int64_t in, int64_t c0, int64_t c1, bool /*last*/,
                   int64_t pf, const float* xp, int64_t ldx, float* y, int64_t ldy) {
  const __m256 mag = _mm256_load_ps(kE2M1);
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t nblk = in / 32;
  for (int64_t c = c0; c < c1; ++c) {
    prefetch(w + c * 64 + pf);
    for (int64_t blk = 4 * c; blk < std::min(nblk, 4 * c + 4); ++blk) {
      __m256 v[4];
      mx_block(w + 16 * blk, mag, v);
      const __m256 sc = _mm256_set1_ps(e8m0_to_float(s[blk]));
      for (int m = 0; m < M; ++m) {
        const float* xm = xp + m * ldx + 32 * blk;
        __m256 d = _mm256_mul_ps(v[0], _mm256_loadu_ps(xm));
        for (int j = 1; j < 4; ++j) d = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(xm + 8 * j), d);
        acc[m] = _mm256_fmadd_ps(d, sc, acc[m]);
      }
    }
  }
  for (int m = 0; m < M; ++m) y[m * ldy] += hsum(acc[m]);
}

// Rows [r0, r1) of the weight -> fp32 or bf16 (T) in permuted column order, row stride kp.
template <class T>
void mx_dequant(const uint8_t* w, const uint8_t* s, int64_t in, int64_t r0, int64_t r1, int64_t kp,
                T* dst) {
  const __m256 mag = _mm256_load_ps(kE2M1);
  const int64_t nblk = in / 32;
  for (int64_t r = r0; r < r1; ++r) {
    T* d = dst + (r - r0) * kp;
    for (int64_t blk = 0; blk < kp / 32; ++blk) {
      __m256 v[4];
      if (blk < nblk) {
        mx_block(w + r * (in / 2) + 16 * blk, mag, v);
        const __m256 sc = _mm256_set1_ps(e8m0_to_float(s[r * nblk + blk]));
        for (int j = 0; j < 4; ++j) v[j] = _mm256_mul_ps(v[j], sc);
      } else {
        for (int j = 0; j < 4; ++j) v[j] = _mm256_setzero_ps();
      }
      for (int j = 0; j < 4; ++j) store8(d + 32 * blk + 8 * j, v[j]);
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
