// AVX-512 (F, BW, VL) kernels: included by cpu_kernels.cpp inside its namespace.

// Stores 16 dequantized weights as fp32, or as bf16 by dropping the low 16 bits: exact, because
// e2m1 and e4m3 values times a power-of-two scale have at most 4 significant bits.
inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
inline void store16(at::BFloat16* dst, __m512 v) {
  const __m256i hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), hi);
}

// ---- column permutations -------------------------------------------------------------------
// MXFP4: a 64-byte load viewed as 16 dwords holds 8 nibbles per dword. Shifting right by 4k and
// using vpermps (which reads only the low 4 index bits) yields lane d = code 8d+k of the chunk.
// So permuted position 16k+d holds input 8d+k.
inline int64_t mx_src(int64_t p) { return 8 * (p % 16) + p / 16; }
// FP8: the 64 bytes are split into even and odd bytes (two fp16 vectors of 32), each converted
// in two halves: quarter q holds inputs (q&1)*32 + 2d + (q>>1).
inline int64_t f8_src(int64_t p) { return (p / 16 & 1) * 32 + 2 * (p % 16) + (p / 32); }

// dst[p] = src[idx[p]] for one full chunk, 16 lanes at a time.
template <int64_t Chunk>
inline void gather_chunk(const int32_t* idx, const float* src, float* dst) {
  for (int64_t v = 0; v < Chunk; v += 16)
    _mm512_storeu_ps(dst + v, _mm512_i32gather_ps(_mm512_load_si512(idx + v), src, 4));
}

// ---- MXFP4 ---------------------------------------------------------------------------------

// e8m0 bytes (one per dword lane, zero-extended) -> fp32. Byte b is 2^(b-127): as fp32 bits that
// is b<<23, except b=0 (2^-127, a denormal).
inline __m512 e8m0_to_ps(__m512i b) {
  __m512i bits = _mm512_slli_epi32(b, 23);
  const __mmask16 zero = _mm512_testn_epi32_mask(b, b);
  if (__builtin_expect(zero != 0, 0))
    bits = _mm512_mask_mov_epi32(bits, zero, _mm512_set1_epi32(0x00400000));
  return _mm512_castsi512_ps(bits);
}

// Scales for one 128-code chunk: lane d belongs to block d/4. `s` holds nb (1..4) e8m0 bytes.
inline __m512 mx_scales(const uint8_t* s, int64_t nb) {
  uint32_t v = 0;
  std::memcpy(&v, s, nb);
  // pshufb works per 128-bit lane; lane L (dwords 4L..4L+3) takes byte L, zero-extended.
  const __m512i ctl = _mm512_set_epi32(
      (int)0x80808003, (int)0x80808003, (int)0x80808003, (int)0x80808003, (int)0x80808002,
      (int)0x80808002, (int)0x80808002, (int)0x80808002, (int)0x80808001, (int)0x80808001,
      (int)0x80808001, (int)0x80808001, (int)0x80808000, (int)0x80808000, (int)0x80808000,
      (int)0x80808000);
  return e8m0_to_ps(_mm512_shuffle_epi8(_mm512_set1_epi32((int)v), ctl));
}

// Load the 64-byte chunk c of a row (masked at the tail) and its scale vector.
inline void mx_load(const uint8_t* w, const uint8_t* s, int64_t in, int64_t c, __m512i& codes,
                    __m512& sc) {
  const int64_t rem = in - c * kMxChunk;  // codes left in the row, a multiple of 32
  if (rem >= kMxChunk) {
    codes = _mm512_loadu_si512(w + c * 64);
    sc = mx_scales(s + c * 4, 4);
  } else {
    codes = _mm512_maskz_loadu_epi32((__mmask16)((1u << (rem / 8)) - 1), w + c * 64);
    sc = mx_scales(s + c * 4, rem / 32);
  }
}

// Scales for 4 consecutive full chunks (16 e8m0 bytes): sc[i] lane d = block 4i + d/4.
inline void mx_scales4(const uint8_t* s, __m512 sc[4]) {
  const __m512 f =
      e8m0_to_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))));
  const __m512i quarter = _mm512_srli_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2);  // d/4
  for (int i = 0; i < 4; ++i)
    sc[i] = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * i)), f);
}

// acc[m] += sc * (codes . xc[m]) for one 128-code chunk and M rows of permuted x, given v[j] = the
// chunk's dwords with byte j of each moved to bits 0..7 (v[0] is the chunk as loaded).
template <int M>
inline void mx_chunk(const __m512i v[4], __m512 sc, const float* xc, int64_t ldx, __m512* acc) {
  const __m512 tab = _mm512_load_ps(kE2M1);
  __m512 b[M];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 lo = _mm512_permutexvar_ps(v[j], tab);                          // nibble 2j
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v[j], 4), tab);  // nibble 2j+1
    for (int m = 0; m < M; ++m) {
      const float* xm = xc + m * ldx + 32 * j;
      b[m] = j == 0 ? _mm512_mul_ps(lo, _mm512_loadu_ps(xm))
                    : _mm512_fmadd_ps(lo, _mm512_loadu_ps(xm), b[m]);
      b[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xm + 16), b[m]);
    }
  }
  for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(b[m], sc, acc[m]);
}

// The v[] of mx_chunk by shifting in registers (7 shifts on the vector ALU) ...
inline void mx_shifted(__m512i codes, __m512i v[4]) {
  v[0] = codes;
  for (int j = 1; j < 4; ++j) v[j] = _mm512_srli_epi32(codes, 8 * j);
}
// ... or by loading the chunk again 1, 2 and 3 bytes further on, which moves that work to the
// load ports (4 shifts instead of 7): the vector ALU ports bound this loop. Reads up to 3 bytes
// past the chunk, so the caller keeps it off the tensor's last chunk.
inline void mx_offset_loads(const uint8_t* wc, __m512i v[4]) {
  for (int j = 0; j < 4; ++j) v[j] = _mm512_loadu_si512(wc + j);
}

// y[m] += sum over chunks [c0, c1) of a row of code * scale * xp[m], for M rows of permuted x.
// `last` marks the tensor's last row, whose last chunk must not be over-read; pf is the prefetch
// distance in bytes (for_tile's).
template <int M>
inline void mx_row(const uint8_t* w, const uint8_t* s, int64_t in, int64_t c0, int64_t c1, bool last,
                   int64_t pf, const float* xp, int64_t ldx, float* y, int64_t ldy) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t nch = ceil_div(in, kMxChunk);
  const int64_t ngroup = std::min({c1, in / kMxChunk, last ? nch - 1 : nch});
  int64_t c = c0;
  // Groups of 4 full chunks share one 16-byte scale load.
  for (; c + 4 <= ngroup; c += 4) {
    const uint8_t* wc = w + c * 64;
    for (int i = 0; i < 4; ++i)
      prefetch(wc + pf + 64 * i);
    __m512 sc[4];
    mx_scales4(s + c * 4, sc);
    for (int i = 0; i < 4; ++i) {
      __m512i v[4];
      mx_offset_loads(wc + 64 * i, v);
      mx_chunk<M>(v, sc[i], xp + (c + i) * kMxChunk, ldx, acc);
    }
  }
  for (; c < c1; ++c) {
    __m512i codes, v[4];
    __m512 sc;
    mx_load(w, s, in, c, codes, sc);
    mx_shifted(codes, v);
    mx_chunk<M>(v, sc, xp + c * kMxChunk, ldx, acc);
  }
  for (int m = 0; m < M; ++m) y[m * ldy] += _mm512_reduce_add_ps(acc[m]);
}

// Rows [r0, r1) of the weight -> fp32 or bf16 (T) in permuted column order, row stride kp.
template <class T>
void mx_dequant(const uint8_t* w, const uint8_t* s, int64_t in, int64_t r0, int64_t r1, int64_t kp,
                T* dst) {
  const __m512 tab = _mm512_load_ps(kE2M1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wr = w + r * (in / 2);
    const uint8_t* sr = s + r * (in / 32);
    T* d = dst + (r - r0) * kp;
    for (int64_t c = 0; c < kp / kMxChunk; ++c) {
      __m512i codes;
      __m512 sc;
      mx_load(wr, sr, in, c, codes, sc);
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const __m512 v = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4 * k), tab);
        store16(d + c * kMxChunk + 16 * k, _mm512_mul_ps(v, sc));
      }
    }
  }
}

// ---- FP8 e4m3 ------------------------------------------------------------------------------

// 64 e4m3 bytes -> 4 x 16 fp32 holding value * 2^-8, in the f8_src order.
// e4m3 (s eeee mmm, bias 7) placed as fp16 bits s 0eeee mmm0000000 is exactly value * 2^-8,
// denormals included, and vcvtph2ps widens fp16 exactly; this avoids fp32 denormals.
inline void e4m3_expand(__m512i v, __m512 f[4]) {
  const __m512i keep = _mm512_set1_epi16((short)0xBF80);
  // srai copies the sign into bit 14, which `keep` clears; bits 6..0 (the other byte) also go.
  const __m512i odd = _mm512_and_si512(_mm512_srai_epi16(v, 1), keep);
  const __m512i even = _mm512_and_si512(_mm512_srai_epi16(_mm512_slli_epi16(v, 8), 1), keep);
  f[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(even));
  f[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(even, 1));
  f[2] = _mm512_cvtph_ps(_mm512_castsi512_si256(odd));
  f[3] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(odd, 1));
}

inline __m512i f8_load(const uint8_t* w, int64_t in, int64_t c) {
  const int64_t rem = in - c * kF8Chunk;
  if (rem >= kF8Chunk) return _mm512_loadu_si512(w + c * kF8Chunk);
  return _mm512_maskz_loadu_epi8((__mmask64)((1ull << rem) - 1), w + c * kF8Chunk);
}

// acc[m][q] += e4m3 chunk (quarter q) * xc[m] (quarter q), for M rows of scaled, permuted x.
template <int M>
inline void f8_chunk(__m512i codes, const float* xc, int64_t ldx, __m512 (&acc)[M][4]) {
  __m512 f[4];
  e4m3_expand(codes, f);
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q)
      acc[m][q] = _mm512_fmadd_ps(f[q], _mm512_loadu_ps(xc + m * ldx + 16 * q), acc[m][q]);
}

// y[m] += sum over chunks [c0, c1) of a row of e4m3 * xs[m]; xs carries the block scales and 2^8.
// The masked tail chunk stays out of the main loop, which keeps the 4M accumulators in registers
// (with it inside, GCC spilled them to the stack every iteration: half the speed).
template <int M>
inline void f8_row(const uint8_t* w, int64_t in, int64_t c0, int64_t c1, int64_t pf,
                   const float* xs, int64_t ldx, float* y, int64_t ldy) {
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm512_setzero_ps();
  const int64_t nfull = std::min(c1, in / kF8Chunk);
  int64_t c = c0;
  for (; c < nfull; ++c) {
    prefetch(w + c * kF8Chunk + pf);
    f8_chunk<M>(_mm512_loadu_si512(w + c * kF8Chunk), xs + c * kF8Chunk, ldx, acc);
  }
  if (c < c1) f8_chunk<M>(f8_load(w, in, c), xs + c * kF8Chunk, ldx, acc);
  for (int m = 0; m < M; ++m) {
    const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                   _mm512_add_ps(acc[m][2], acc[m][3]));
    y[m * ldy] += _mm512_reduce_add_ps(a);
  }
}

template <class T>
void f8_dequant(const uint8_t* w, const float* sc, int64_t nbi, int64_t in, int64_t r0, int64_t r1,
                int64_t kp, T* dst) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wr = w + r * in;
    const float* srow = sc + (r / 128) * nbi;
    T* d = dst + (r - r0) * kp;
    for (int64_t c = 0; c < kp / kF8Chunk; ++c) {
      __m512 f[4];
      e4m3_expand(f8_load(wr, in, c), f);
      const __m512 s = _mm512_set1_ps(srow[c / 2]);  // two 64-chunks per 128-column block
      for (int q = 0; q < 4; ++q) store16(d + c * kF8Chunk + 16 * q, _mm512_mul_ps(f[q], s));
    }
  }
}
