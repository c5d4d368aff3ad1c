// Fused CPU ops for the small per-layer work of a step (callers: dsv4/ops.py, dsv4/model.py).
//
// At batch 1 every layer spends its time in dozens of tiny ATen ops (the Sinkhorn iterations alone
// dispatch ~80 per hyper-connection), each a few microseconds of dispatch for a few hundred flops.
// These ops do the same math in one call each, token rows split over threads. They follow the
// plain-torch reference (dsv4/model.py, dsv4/ops.py) step by step, rounding to the tensor dtype
// exactly where it does (so bf16 results match bit for bit but for the last ulp of fp32 math
// functions and summation order). Plain C++ (auto-vectorized with the build's -march), so the
// AVX-512 and AVX2 builds share it. Every matrix product goes through decode.h's decode products
// (for a few rows) or the tensor entry points above this file. It knows nothing of models beyond
// these formulas.
//
// Sections: mHC pre/post; RMSNorm + RoPE; the router; the dense GEMV; one decode token's attention
// (sink attention, the indexer's top-k); an attention layer's projections (attn_project,
// attn_output); the experts (expert_mlp, experts_sum, experts_rows).

#include <cmath>
#include <limits>

namespace fused {

template <typename T>
inline float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// sum_i a[i] * b[i] with 16 partial sums (vectorizable without -ffast-math).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

inline float sumsq(const float* a, int64_t n) { return dot(a, a, n); }

// t as contiguous fp32, itself (no ATen call) when it already is.
inline torch::Tensor f32c(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat && t.is_contiguous() ? t : t.to(torch::kFloat).contiguous();
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

inline void check_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16, what,
              ": float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), what, ": a CPU tensor");
}

inline int64_t grain(int64_t work_per_row) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, work_per_row)); }

// ---- hyper-connections (mHC) ----

// h [T, n, D] -> x [T, D] (h's dtype), post [T, n], comb [T, n, n] (fp32). fn [(2+n)*n, n*D],
// base [(2+n)*n], scale [3], all fp32: HyperConnection.pre.
std::vector<torch::Tensor> hc_pre(const torch::Tensor& h_in, const torch::Tensor& fn_in, const torch::Tensor& scale_in,
                                  const torch::Tensor& base_in, int64_t iters, double eps_d, double norm_eps_d) {
  check_float(h_in, "hc_pre h");
  TORCH_CHECK(h_in.dim() == 3, "hc_pre: h [T, n, D], got ", h_in.sizes());
  const auto h = h_in.contiguous();
  const int64_t T = h.size(0), n = h.size(1), D = h.size(2), nD = n * D, m = (2 + n) * n;
  TORCH_CHECK(fn_in.sizes() == torch::IntArrayRef({m, nD}) && base_in.numel() == m && scale_in.numel() == 3,
              "hc_pre: fn [", m, ", ", nD, "], base [", m, "], scale [3]; got ", fn_in.sizes(), ", ",
              base_in.sizes(), ", ", scale_in.sizes());
  const auto fn = f32c(fn_in), base = f32c(base_in),
             scale = f32c(scale_in);
  auto x = torch::empty({T, D}, h.options());
  auto post = torch::empty({T, n}, h.options().dtype(torch::kFloat));
  auto comb = torch::empty({T, n, n}, h.options().dtype(torch::kFloat));
  const float eps = static_cast<float>(eps_d), norm_eps = static_cast<float>(norm_eps_d);
  const float* F = fn.data_ptr<float>();
  const float* B = base.data_ptr<float>();
  const float* S = scale.data_ptr<float>();
  float* P = post.data_ptr<float>();
  float* C = comb.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "hc_pre", [&] {
    const scalar_t* H = h.data_ptr<scalar_t>();
    scalar_t* X = x.data_ptr<scalar_t>();
    pool::run(T, grain(m * nD), [&](int64_t t0, int64_t t1) {
      std::vector<float> hf(nD), mix(m), pre(n);
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t i = 0; i < nD; ++i) hf[i] = ld(H, t * nD + i);
        const float rs = 1.f / std::sqrt(sumsq(hf.data(), nD) / nD + norm_eps);
        for (int64_t r = 0; r < m; ++r) mix[r] = dot(hf.data(), F + r * nD, nD) * rs;
        for (int64_t i = 0; i < n; ++i) {
          pre[i] = sigmoid(mix[i] * S[0] + B[i]) + eps;
          P[t * n + i] = 2 * sigmoid(mix[n + i] * S[1] + B[n + i]);
        }
        float* c = C + t * n * n;  // [j][k]
        for (int64_t j = 0; j < n; ++j) {  // softmax over k, + eps
          float* row = c + j * n;
          float mx = -INFINITY;
          for (int64_t k = 0; k < n; ++k) {
            row[k] = mix[2 * n + j * n + k] * S[2] + B[2 * n + j * n + k];
            mx = std::max(mx, row[k]);
          }
          float sum = 0;
          for (int64_t k = 0; k < n; ++k) sum += (row[k] = std::exp(row[k] - mx));
          for (int64_t k = 0; k < n; ++k) row[k] = row[k] / sum + eps;
        }
        // divide each line a of comb by its sum + eps: rows (over k) with (n, 1), columns (over j) with (1, n)
        auto normalize = [&](int64_t line, int64_t step) {
          for (int64_t a = 0; a < n; ++a) {
            float s = 0;
            for (int64_t b = 0; b < n; ++b) s += c[a * line + b * step];
            for (int64_t b = 0; b < n; ++b) c[a * line + b * step] /= s + eps;
          }
        };
        normalize(1, n);
        for (int64_t it = 1; it < iters; ++it) {
          normalize(n, 1);
          normalize(1, n);
        }
        for (int64_t d = 0; d < D; ++d) {
          float acc = 0;
          for (int64_t j = 0; j < n; ++j) acc += pre[j] * hf[j * D + d];
          X[t * D + d] = static_cast<scalar_t>(acc);
        }
      }
    });
  });
  return {x, post, comb};
}

// out [T, D], h [T, n, D] (same dtype), post [T, n], comb [T, n, n] fp32 -> new streams [T, n, D]:
// stream k = post_k * out + sum_j comb[j, k] * h_j (HyperConnection.post).
torch::Tensor hc_post(const torch::Tensor& out_in, const torch::Tensor& h_in, const torch::Tensor& post_in,
                      const torch::Tensor& comb_in) {
  check_float(h_in, "hc_post h");
  TORCH_CHECK(h_in.dim() == 3 && out_in.scalar_type() == h_in.scalar_type(), "hc_post: h [T, n, D], out of its dtype");
  const auto h = h_in.contiguous(), out = out_in.contiguous();
  const int64_t T = h.size(0), n = h.size(1), D = h.size(2);
  TORCH_CHECK(out.numel() == T * D && post_in.numel() == T * n && comb_in.numel() == T * n * n,
              "hc_post: out [T, D], post [T, n], comb [T, n, n] for h ", h.sizes());
  const auto post = f32c(post_in), comb = f32c(comb_in);
  auto y = torch::empty_like(h);
  const float* P = post.data_ptr<float>();
  const float* C = comb.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "hc_post", [&] {
    const scalar_t* H = h.data_ptr<scalar_t>();
    const scalar_t* O = out.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    pool::run(T, grain(n * n * D), [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(D);
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* ht = H + t * n * D;
        const float* c = C + t * n * n;
        for (int64_t k = 0; k < n; ++k) {
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t j = 0; j < n; ++j) {
            const float w = c[j * n + k];
            for (int64_t d = 0; d < D; ++d) acc[d] += w * ld(ht, j * D + d);
          }
          const float p = P[t * n + k];
          for (int64_t d = 0; d < D; ++d) Y[(t * n + k) * D + d] = static_cast<scalar_t>(p * ld(O, t * D + d) + acc[d]);
        }
      }
    });
  });
  return y;
}

// ---- RMSNorm and RoPE ----

// x [T, ..., D] -> RMSNorm over D (weight [D] or none; skipped when eps < 0), rounded to x's dtype,
// then the interleaved-pair rotation of the last 2*R2 dims by cos/sin [T, R2] (none: no rotation;
// inverse: rotate by -angle), in fp32, rounded again: ops.rms_norm, then ops.rope.
torch::Tensor norm_rope(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& weight_in, double eps_d,
                        const c10::optional<torch::Tensor>& cos_in, const c10::optional<torch::Tensor>& sin_in,
                        bool inverse) {
  check_float(x_in, "norm_rope x");
  TORCH_CHECK(x_in.dim() >= 1, "norm_rope: x needs a last dimension");
  const auto x = x_in.contiguous();
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  const bool norm = eps_d >= 0, rot = cos_in.has_value();
  torch::Tensor w, cs, sn;
  if (weight_in.has_value()) {
    w = f32c(*weight_in);
    TORCH_CHECK(w.numel() == D, "norm_rope: weight [", D, "], got ", weight_in->sizes());
  }
  int64_t T = 1, R2 = 0;
  if (rot) {
    TORCH_CHECK(sin_in.has_value() && x.dim() >= 2, "norm_rope: cos and sin [T, R/2] for x [T, ..., D]");
    cs = f32c(*cos_in);
    sn = f32c(*sin_in);
    T = x.size(0), R2 = cs.size(-1);
    TORCH_CHECK(cs.dim() == 2 && cs.size(0) == T && sn.sizes() == cs.sizes() && 2 * R2 <= D,
                "norm_rope: cos/sin [", T, ", R/2 <= ", D / 2, "], got ", cos_in->sizes(), " and ", sin_in->sizes());
  }
  const int64_t per_t = rot ? rows / T : rows;
  auto y = torch::empty_like(x);
  const float eps = static_cast<float>(eps_d);
  const float* W = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* CS = rot ? cs.data_ptr<float>() : nullptr;
  const float* SN = rot ? sn.data_ptr<float>() : nullptr;
  const float sign = inverse ? -1.f : 1.f;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "norm_rope", [&] {
    const scalar_t* X = x.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    pool::run(rows, grain(4 * D), [&](int64_t r0, int64_t r1) {
      std::vector<float> v(D);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = X + r * D;
        scalar_t* yr = Y + r * D;
        for (int64_t i = 0; i < D; ++i) v[i] = ld(xr, i);
        if (norm) {
          const float rs = 1.f / std::sqrt(sumsq(v.data(), D) / D + eps);
          for (int64_t i = 0; i < D; ++i) {
            const float z = W ? W[i] * (v[i] * rs) : v[i] * rs;
            v[i] = static_cast<float>(static_cast<scalar_t>(z));  // rms_norm returns x's dtype
          }
        }
        if (rot) {
          const int64_t t = r / per_t, off = D - 2 * R2;
          const float* c = CS + t * R2;
          const float* s = SN + t * R2;
          for (int64_t p = 0; p < R2; ++p) {
            const float a = v[off + 2 * p], b = v[off + 2 * p + 1], sp = sign * s[p];
            v[off + 2 * p] = a * c[p] - b * sp;
            v[off + 2 * p + 1] = a * sp + b * c[p];
          }
        }
        for (int64_t i = 0; i < D; ++i) yr[i] = static_cast<scalar_t>(v[i]);
      }
    });
  });
  return y;
}

// ---- router ----

// logits [T, E] fp32 -> (weights [T, K] fp32, ids [T, K] int64): scores by score_func (0 softmax,
// 1 sigmoid, 2 sqrt(softplus)); ids = the top K of scores + bias (largest first, the lower id
// among equals), or hashed [T, K] when given; weights = scores at ids, normalized to sum 1 unless
// softmax, times route_scale (MoE.route).
std::vector<torch::Tensor> route(const torch::Tensor& logits_in, const c10::optional<torch::Tensor>& bias_in,
                                 const c10::optional<torch::Tensor>& hashed_in, int64_t K, int64_t score_func,
                                 double route_scale) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == torch::kFloat && logits_in.device().is_cpu(),
              "route: logits [T, E] float32 on the CPU");
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(score_func >= 0 && score_func <= 2, "route: score_func 0, 1 or 2, got ", score_func);
  torch::Tensor bias, hashed;
  if (hashed_in.has_value()) {
    hashed = hashed_in->to(torch::kLong).contiguous();
    TORCH_CHECK(hashed.dim() == 2 && hashed.size(0) == T, "route: hashed ids [", T, ", K], got ", hashed.sizes());
    K = hashed.size(1);
  } else {
    TORCH_CHECK(bias_in.has_value() && bias_in->numel() == E, "route: bias [", E, "] for top-k routing");
    bias = f32c(*bias_in);
  }
  TORCH_CHECK(K >= 1 && K <= E, "route: K in [1, ", E, "], got ", K);
  auto weights = torch::empty({T, K}, logits.options());
  auto ids = hashed.defined() ? hashed.clone() : torch::empty({T, K}, logits.options().dtype(torch::kLong));
  if (hashed.defined()) {  // checked here: the loop below runs on the pool, whose loops must not throw
    const int64_t* h = hashed.data_ptr<int64_t>();
    for (int64_t i = 0; i < T * K; ++i)
      TORCH_CHECK(h[i] >= 0 && h[i] < E, "route: expert id ", h[i], " outside [0, ", E, ")");
  }
  const float* L = logits.data_ptr<float>();
  const float* Bs = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* Wt = weights.data_ptr<float>();
  int64_t* I = ids.data_ptr<int64_t>();
  const float scale = static_cast<float>(route_scale);
  pool::run(T, grain(8 * E), [&](int64_t t0, int64_t t1) {
    std::vector<float> s(E), key(E);
    for (int64_t t = t0; t < t1; ++t) {
      const float* l = L + t * E;
      if (score_func == 0) {
        float mx = -INFINITY, sum = 0;
        for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
        for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(l[e] - mx));
        for (int64_t e = 0; e < E; ++e) s[e] /= sum;
      } else if (score_func == 1) {
        for (int64_t e = 0; e < E; ++e) s[e] = sigmoid(l[e]);
      } else {  // torch's softplus: x above 20 passes through
        for (int64_t e = 0; e < E; ++e) s[e] = std::sqrt(l[e] > 20.f ? l[e] : std::log1p(std::exp(l[e])));
      }
      int64_t* id = I + t * K;
      if (Bs) {
        for (int64_t e = 0; e < E; ++e) key[e] = s[e] + Bs[e];
        for (int64_t k = 0; k < K; ++k) {
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e)
            if (key[e] == key[e] && (best < 0 || key[e] > key[best])) best = e;  // NaN never wins
          if (best < 0) best = k;  // all NaN: any id, as topk would give
          id[k] = best;
          key[best] = NAN;
        }
      }
      float* w = Wt + t * K;
      float sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += (w[k] = s[id[k]]);
      for (int64_t k = 0; k < K; ++k) w[k] = (score_func == 0 ? w[k] : w[k] / sum) * scale;
    }
  });
  return {weights, ids};
}

// ---- dense matrix-vector ----

// Whether dense_linear takes x against w: both bf16, both fp32, or fp32 x against bf16 w (weights
// the checkpoint stores in bf16 and the math runs in fp32: the router, the compressors).
inline bool dense_pair(torch::ScalarType x, torch::ScalarType w) {
  return (x == torch::kFloat || x == torch::kBFloat16) && (w == x || (x == torch::kFloat && w == torch::kBFloat16));
}

// x [M, in] -> x @ w.T [M, out] in x's dtype for a few rows (decode), fp32 sums: what F.linear
// computes, streaming w once through decode.h's row dot (torch's bf16 GEMV reached ~1-2 GB/s here on
// the vocabulary head, the largest single read of a decode step on small models). Takes fp32 x
// against a bf16 matrix too, which F.linear cannot without converting the matrix on every call.
torch::Tensor dense_linear(const torch::Tensor& x_in, const torch::Tensor& w_in) {
  TORCH_CHECK(dense_pair(x_in.scalar_type(), w_in.scalar_type()) && x_in.dim() == 2 && w_in.dim() == 2 &&
                  x_in.size(1) == w_in.size(1) && x_in.device().is_cpu() && w_in.device().is_cpu(),
              "dense_linear: x [M, in] and w [out, in] on the CPU, both bfloat16, both float32 or float32 x with "
              "bfloat16 w; got ", x_in.sizes(), " ", x_in.scalar_type(), " and ", w_in.sizes(), " ", w_in.scalar_type());
  const auto w = w_in.contiguous();
  const auto y = decode(Lin{0, w, w}, x_in.contiguous());
  return x_in.scalar_type() == torch::kFloat ? y : y.to(x_in.scalar_type());
}

// ---- one decode token: attention, the indexer's pick, an expert ----
// The batch-1 step's remaining small work, each a dozen-plus ATen ops in the reference.

// q [1, H, hd] (or [H, hd]); keys = the rows of `parts` ([K_i, hd] each, in order), shared by all
// heads as K=V; sink [H]. Softmax over (q.k * scale for every key, the head's sink) in fp32, the
// sink in the denominator only; out [1, H, hd] = probs . keys in q's dtype (ops.sink_attention with
// every key visible).
torch::Tensor sink_decode(const torch::Tensor& q_in, const std::vector<torch::Tensor>& parts,
                          const torch::Tensor& sink_in, double scale_d) {
  check_float(q_in, "sink_decode q");
  TORCH_CHECK(q_in.dim() == 3 && q_in.size(0) == 1, "sink_decode: q [1, H, hd], got ", q_in.sizes());
  const int64_t H = q_in.size(1), hd = q_in.size(2);
  TORCH_CHECK(sink_in.numel() == H, "sink_decode: sink [", H, "], got ", sink_in.sizes());
  int64_t K = 0;
  for (const auto& p : parts) {
    check_float(p, "sink_decode keys");
    TORCH_CHECK(p.dim() == 2 && p.size(1) == hd, "sink_decode: keys [K, ", hd, "], got ", p.sizes());
    K += p.size(0);
  }
  const auto q = f32c(q_in);
  const auto sink = f32c(sink_in);
  std::vector<float> keys(K * hd);
  int64_t row = 0;
  for (const auto& p : parts) {  // fp32 copies, once for all heads
    const auto pc = p.contiguous();
    const int64_t n = pc.size(0) * hd;
    float* dst = keys.data() + row * hd;
    if (pc.scalar_type() == torch::kFloat) {
      std::memcpy(dst, pc.data_ptr<float>(), n * sizeof(float));
    } else {
      const auto* src = reinterpret_cast<const uint16_t*>(pc.data_ptr());
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits(src[i]);
    }
    row += pc.size(0);
  }
  auto out = torch::empty({1, H, hd}, q.options());
  const float* Q = q.data_ptr<float>();
  const float* S = sink.data_ptr<float>();
  const float* Kd = keys.data();
  float* O = out.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  pool::run(H, grain(2 * K * hd), [&](int64_t h0, int64_t h1) {
    std::vector<float> p(K);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = Q + h * hd;
      float mx = S[h];
      for (int64_t k = 0; k < K; ++k) mx = std::max(mx, p[k] = dot(qh, Kd + k * hd, hd) * scale);
      float sum = std::exp(S[h] - mx);
      for (int64_t k = 0; k < K; ++k) sum += (p[k] = std::exp(p[k] - mx));
      float* oh = O + h * hd;
      std::fill(oh, oh + hd, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float w = p[k] / sum;
        const float* kk = Kd + k * hd;
        for (int64_t d = 0; d < hd; ++d) oh[d] += w * kk[d];
      }
    }
  });
  return q_in.scalar_type() == torch::kFloat ? out : out.to(q_in.scalar_type());
}

// The lightning indexer for one query: score[n] = sum_h w[h] * relu(q[h] . keys[n]) (fp32), and
// the indices of the top min(k, N) scores, largest first, the earlier entry first among equals
// (Indexer.top: a stable descending sort). q [1, Hi, d], w [1, Hi] fp32, keys [N, d].
torch::Tensor index_top(const torch::Tensor& q_in, const torch::Tensor& w_in, const torch::Tensor& keys_in,
                        int64_t k) {
  check_float(q_in, "index_top q");
  check_float(keys_in, "index_top keys");
  TORCH_CHECK(q_in.dim() == 3 && q_in.size(0) == 1 && keys_in.dim() == 2 && keys_in.size(1) == q_in.size(2) &&
                  w_in.numel() == q_in.size(1),
              "index_top: q [1, Hi, d], w [1, Hi], keys [N, d]; got ", q_in.sizes(), ", ", w_in.sizes(), ", ",
              keys_in.sizes());
  const int64_t Hi = q_in.size(1), d = q_in.size(2), N = keys_in.size(0);
  const auto q = f32c(q_in);
  const auto w = f32c(w_in);
  const auto keys = f32c(keys_in);
  const float *Q = q.data_ptr<float>(), *W = w.data_ptr<float>(), *Kd = keys.data_ptr<float>();
  std::vector<float> score(N);
  pool::run(N, grain(Hi * d), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0;
      for (int64_t h = 0; h < Hi; ++h) s += std::max(dot(Q + h * d, Kd + n * d, d), 0.f) * W[h];
      score[n] = s;
    }
  });
  const int64_t m = std::min(k, N);
  std::vector<int64_t> order(N);
  for (int64_t n = 0; n < N; ++n) order[n] = n;
  std::partial_sort(order.begin(), order.begin() + m, order.end(), [&](int64_t a, int64_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  });
  auto idx = torch::empty({m}, torch::kLong);
  std::copy(order.begin(), order.begin() + m, idx.data_ptr<int64_t>());
  return idx;
}

// y = x @ W.T for a weight in one of dsv4.quant's formats: kind 0 Dense (scale unused), 1 FP8Block,
// 2 MXFP4; x's dtype out, what ops.linear computes for a few rows of x.
// From rows_f8 / rows_mx rows of x on, FP8 / MXFP4 take their dequantize-and-GEMM path (kernels.
// PREFILL_ROWS); by default never (a few rows: the decode paths).
constexpr int64_t kDecodeOnly = std::numeric_limits<int64_t>::max();
inline torch::Tensor linear_any(const torch::Tensor& x, int64_t kind, const torch::Tensor& w,
                                const torch::Tensor& s, int64_t rows_f8 = kDecodeOnly, int64_t rows_mx = kDecodeOnly) {
  if (kind == 1) return ::fp8_linear(x, w, s, rows_f8, false);
  if (kind == 2) return ::mxfp4_linear(x, w, s, rows_mx, false);
  TORCH_CHECK(kind == 0, "expert_mlp: weight kind 0 (dense), 1 (FP8) or 2 (MXFP4), got ", kind);
  if (dense_pair(x.scalar_type(), w.scalar_type())) return dense_linear(x, w);
  return at::linear(x, w.to(x.scalar_type()));
}

// Block-diagonal projection for a few rows (ops.grouped_linear): x [M, G, in], W [G*rows, in] ->
// [M, G, rows], group g multiplying x[:, g] by weight rows g*rows ... (an FP8 weight's groups must
// be whole 128-row scale blocks).
torch::Tensor grouped_linear(const torch::Tensor& x, int64_t kind, const torch::Tensor& w, const torch::Tensor& s,
                             int64_t groups) {
  check_float(x, "grouped_linear x");
  TORCH_CHECK(x.dim() == 3 && x.size(1) == groups && groups > 0 && w.size(0) % groups == 0,
              "grouped_linear: x [M, ", groups, ", in] and weight rows divisible by ", groups, "; got ", x.sizes(),
              " and ", w.sizes());
  const int64_t rows = w.size(0) / groups;
  TORCH_CHECK(kind != 1 || rows % 128 == 0, "grouped_linear: FP8 groups of whole 128-row blocks, got ", rows);
  std::vector<torch::Tensor> parts;
  for (int64_t g = 0; g < groups; ++g) {
    const auto wg = w.narrow(0, g * rows, rows);
    const auto sg = kind == 1 ? s.narrow(0, g * rows / 128, rows / 128) : kind == 2 ? s.narrow(0, g * rows, rows) : wg;
    parts.push_back(linear_any(x.select(1, g), kind, wg, sg));
  }
  return at::stack(parts, 1);
}

// ---- an attention layer's per-token work, for a few rows ----
inline torch::Tensor linear_of(const torch::Tensor& x, const Lin& w, int64_t rows_f8 = kDecodeOnly,
                               int64_t rows_mx = kDecodeOnly) {
  return linear_any(x, std::get<0>(w), std::get<1>(w), std::get<2>(w), rows_f8, rows_mx);
}

// ---- batches of decode products (decode.h) ----

inline float round_to(float v, bool bf16) { return bf16 ? static_cast<float>(c10::BFloat16(v)) : v; }

// Whether the decode products take this weight for x [M, in] (bf16 or fp32 values): contiguous
// values and scales of the shapes its format needs (a Dense weight as dense_pair allows).
inline bool decode_takes(const Lin& lin, int64_t in, bool bf16) {
  const auto& [kind, w, s] = lin;
  if (w.dim() != 2 || !w.is_contiguous() || !s.is_contiguous() || !w.device().is_cpu()) return false;
  const int64_t out = w.size(0);
  if (kind == 2)
    return is_byte(w) && is_byte(s) && in % 32 == 0 && w.size(1) * 2 == in && s.dim() == 2 && s.size(0) == out &&
           s.size(1) == in / 32;
  if (kind == 1)
    return is_byte(w) && w.size(1) == in && s.dim() == 2 && s.size(0) == ceil_div(out, 128) &&
           s.size(1) == ceil_div(in, 128);
  return kind == 0 && w.size(1) == in && dense_pair(bf16 ? torch::kBFloat16 : torch::kFloat, w.scalar_type());
}

// fp32 results as a tensor of x's dtype (bf16: rounded to nearest even, as the tensor ops do).
inline torch::Tensor out_tensor(std::vector<float>& v, at::IntArrayRef sizes, bool bf16) {
  const auto t = torch::from_blob(v.data(), sizes, torch::kFloat);
  return bf16 ? t.to(torch::kBFloat16) : t.clone();
}

// Attention.project for a few rows: x [M, D] -> {qr [M, q_lora], q [M, H, hd] (normed, RoPE'd),
// kv [M, hd] (normed, RoPE'd), the compressor's rows [M, 2C], the indexer's queries [M, Hi, hdi],
// head weights [M, Hi] (fp32, times w_scale) and compressor rows [M, 2Ci]}; the last four are
// empty tensors where the layer has no compressor / indexer.
// lin: wq_a, wq_b, wkv [, the indexer's wq_b]. vec: q_norm, kv_norm [, compressor wkv, wgate, ape
// [, indexer weights_proj, compressor wkv, wgate, ape]]. dims: H, Hi, hdi. The products run as two
// batches of decode products (what reads x, then what reads qr); an empty list where a weight is not
// one the decode products take (Attention.project then takes its reference path).
std::vector<torch::Tensor> attn_project(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                        const torch::Tensor& positions, const std::vector<Lin>& lin,
                                        const std::vector<torch::Tensor>& vec, const std::vector<int64_t>& dims,
                                        double eps, double w_scale) {
  check_float(x, "attn_project x");
  TORCH_CHECK(x.dim() == 2 && lin.size() >= 3 && vec.size() >= 2 && dims.size() == 3,
              "attn_project: x [M, D], lin [wq_a, wq_b, wkv (, indexer wq_b)], vec [q_norm, kv_norm, ...], dims [H, Hi, hdi]");
  const bool bf16 = x.scalar_type() == torch::kBFloat16, comp = vec.size() >= 5, idx = comp && vec.size() == 9 && lin.size() == 4;
  const int64_t M = x.size(0), D = x.size(1), R = std::get<1>(lin[0]).size(0);
  auto dense = [](const torch::Tensor& w) { return Lin{0, w, w}; };
  // first batch: (weight, reads x in x's dtype (else in fp32: the compressors))
  std::vector<std::pair<Lin, bool>> first = {{lin[0], true}, {lin[2], true}};
  if (comp) first.insert(first.end(), {{dense(vec[2]), false}, {dense(vec[3]), false}});
  if (idx) first.insert(first.end(), {{dense(vec[5]), true}, {dense(vec[6]), false}, {dense(vec[7]), false}});
  bool ok = true;
  for (const auto& [l, own] : first) ok = ok && decode_takes(l, D, own && bf16);
  for (size_t i : {size_t(1), size_t(3)})
    if (i < lin.size() && (i == 1 || idx)) ok = ok && decode_takes(lin[i], R, bf16);
  if (!ok) return {};

  const auto xc = f32c(x);
  std::vector<std::vector<float>> y(first.size());
  std::vector<DecodeJob> jobs;
  jobs.reserve(first.size());
  for (size_t i = 0; i < first.size(); ++i) {
    y[i].resize(M * std::get<1>(first[i].first).size(0));
    jobs.emplace_back(first[i].first, xc.data_ptr<float>(), M, D, first[i].second && bf16, y[i].data());
  }
  run_decode(jobs);
  const auto qr = norm_rope(out_tensor(y[0], {M, R}, bf16), vec[0], eps, c10::nullopt, c10::nullopt, false);
  const auto kv = norm_rope(out_tensor(y[1], {M, y[1].size() / M}, bf16), vec[1], eps, cos, sin, false);
  const auto pos = positions.to(torch::kLong).contiguous();
  // a compressor's rows [M, 2C] = [x wkv | x wgate + ape[position % ratio]] in fp32 (Compressor.project)
  auto rows = [&](size_t i, const torch::Tensor& ape) {
    const int64_t C = y[i].size() / M, ratio = ape.size(0);
    const auto a = f32c(ape);
    auto t = torch::empty({M, 2 * C}, torch::kFloat);
    float* T = t.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const float* ap = a.data_ptr<float>() + (pos.data_ptr<int64_t>()[m] % ratio) * C;
      for (int64_t c = 0; c < C; ++c) {
        T[m * 2 * C + c] = y[i][m * C + c];
        T[m * 2 * C + C + c] = y[i + 1][m * C + c] + ap[c];
      }
    }
    return t;
  };
  torch::Tensor none = torch::empty({0}), crows = none, iq = none, iw = none, irows = none;
  if (comp) crows = rows(2, vec[4]);
  if (idx) {
    iw = torch::empty({M, dims[1]}, torch::kFloat);
    for (int64_t i = 0; i < M * dims[1]; ++i) iw.data_ptr<float>()[i] = round_to(y[4][i], bf16) * static_cast<float>(w_scale);
    irows = rows(5, vec[8]);
  }
  // second batch: what reads qr
  const auto qf = f32c(qr);
  std::vector<float> yq(M * std::get<1>(lin[1]).size(0)), yi(idx ? M * std::get<1>(lin[3]).size(0) : 0);
  jobs.clear();
  jobs.emplace_back(lin[1], qf.data_ptr<float>(), M, R, bf16, yq.data());
  if (idx) jobs.emplace_back(lin[3], qf.data_ptr<float>(), M, R, bf16, yi.data());
  run_decode(jobs);
  const auto q = norm_rope(out_tensor(yq, {M, dims[0], static_cast<int64_t>(yq.size()) / (M * dims[0])}, bf16),
                           c10::nullopt, eps, cos, sin, false);
  if (idx) iq = norm_rope(out_tensor(yi, {M, dims[1], dims[2]}, bf16), c10::nullopt, -1.0, cos, sin, false);
  return {qr, q, kv, crows, iq, iw, irows};
}

// Attention.output for a few rows: o [M, H, hd] -> undo the values' RoPE at the query position,
// the grouped wo_a (groups), then wo_b: [M, D]. The groups' products run as one batch of decode
// products, then wo_b; an undefined tensor where a weight is not one they take (Attention.output
// then takes its reference path).
torch::Tensor attn_output(const torch::Tensor& o, const torch::Tensor& cos, const torch::Tensor& sin, const Lin& wo_a,
                          const Lin& wo_b, int64_t groups) {
  check_float(o, "attn_output o");
  TORCH_CHECK(o.dim() == 3 && groups > 0, "attn_output: o [M, H, hd], got ", o.sizes());
  const int64_t M = o.size(0);
  const auto r = norm_rope(o, c10::nullopt, -1.0, cos, sin, true).reshape({M, groups, -1});
  const auto& [ka, wa, sa] = wo_a;
  const int64_t in = r.size(2), rows = wa.size(0) / groups;
  const bool bf16 = o.scalar_type() == torch::kBFloat16;
  std::vector<Lin> parts;
  bool ok = wa.size(0) % groups == 0 && (ka != 1 || rows % 128 == 0);
  for (int64_t g = 0; ok && g < groups; ++g) {
    const auto wg = wa.narrow(0, g * rows, rows);
    parts.emplace_back(ka, wg, ka == 1 ? sa.narrow(0, g * rows / 128, rows / 128) : ka == 2 ? sa.narrow(0, g * rows, rows) : wg);
    ok = decode_takes(parts.back(), in, bf16);
  }
  ok = ok && decode_takes(wo_b, groups * rows, bf16);
  if (!ok) return {};
  const auto rf = f32c(r);  // [M, groups, in]
  std::vector<float> xg(groups * M * in), yg(groups * M * rows);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(&xg[(g * M + m) * in], rf.data_ptr<float>() + (m * groups + g) * in, in * sizeof(float));
  std::vector<DecodeJob> jobs;
  jobs.reserve(groups);
  for (int64_t g = 0; g < groups; ++g) jobs.emplace_back(parts[g], &xg[g * M * in], M, in, bf16, &yg[g * M * rows]);
  run_decode(jobs);
  std::vector<float> flat(M * groups * rows);  // [M, groups * rows], rounded as grouped_linear's output
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < rows; ++i) flat[(m * groups + g) * rows + i] = round_to(yg[(g * M + m) * rows + i], bf16);
  auto y = torch::empty({M, std::get<1>(wo_b).size(0)}, torch::kFloat);
  decode_into(wo_b, flat.data(), M, groups * rows, bf16, y.data_ptr<float>());
  return bf16 ? y.to(torch::kBFloat16) : y;
}

// One SwiGLU expert for a few rows of x [M, D] (ops.expert_mlp): h = silu(min(w1 x, limit)) *
// clamp(w3 x, -limit, limit) in fp32 (no clamping when limit <= 0), times route[:, slot] when
// slot >= 0, rounded to x's dtype; returns w2 h in x's dtype.
inline torch::Tensor expert_out(const torch::Tensor& x, const Lin& w1, const Lin& w2, const Lin& w3, double limit_d,
                                const torch::Tensor& route, int64_t slot, int64_t rows_f8 = kDecodeOnly,
                                int64_t rows_mx = kDecodeOnly) {
  const auto g = linear_of(x, w1, rows_f8, rows_mx).to(torch::kFloat).contiguous();
  const auto u = linear_of(x, w3, rows_f8, rows_mx).to(torch::kFloat).contiguous();
  TORCH_CHECK(g.sizes() == u.sizes(), "expert_mlp: w1 and w3 give ", g.sizes(), " and ", u.sizes());
  const int64_t M = g.size(0), F = g.size(1);
  TORCH_CHECK(slot < 0 || (route.dim() == 2 && route.size(0) == M && slot < route.size(1) &&
                           route.scalar_type() == torch::kFloat && route.is_contiguous()),
              "expert_mlp: route weights fp32 [", M, ", K] with column ", slot, ", got ", route.sizes());
  const float limit = static_cast<float>(limit_d);
  if (M * F >= 4096) {  // a prefill chunk's expert: ops.swiglu's own (vectorized) ops, in its order
    const auto a = limit > 0 ? g.clamp_max(limit) : g, b = limit > 0 ? u.clamp(-limit, limit) : u;
    auto hv = at::silu(a) * b;
    if (slot >= 0) hv = hv * route.select(1, slot).unsqueeze(1);
    return linear_of(hv.to(x.scalar_type()), w2, rows_f8, rows_mx);
  }
  auto h = torch::empty({M, F}, g.options());
  const float *G = g.data_ptr<float>(), *U = u.data_ptr<float>();
  const float* R = slot >= 0 ? route.data_ptr<float>() : nullptr;
  float* Hd = h.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t f = 0; f < F; ++f) {
      float a = G[m * F + f], b = U[m * F + f];
      if (limit > 0) {
        a = std::min(a, limit);
        b = std::min(std::max(b, -limit), limit);
      }
      const float v = a / (1.f + std::exp(-a)) * b;
      Hd[m * F + f] = R ? v * R[m * route.size(1) + slot] : v;
    }
  return linear_of(h.to(x.scalar_type()), w2, rows_f8, rows_mx);
}

// acc (fp32, contiguous) += out, in place.
inline void add_into(torch::Tensor& acc, const torch::Tensor& out) {
  TORCH_CHECK(acc.scalar_type() == torch::kFloat && acc.is_contiguous() && acc.sizes() == out.sizes(),
              "expert sum: acc fp32 contiguous ", out.sizes(), ", got ", acc.sizes(), " ", acc.scalar_type());
  const auto of = f32c(out);
  float* A = acc.data_ptr<float>();
  const float* Od = of.data_ptr<float>();
  for (int64_t i = 0; i < of.numel(); ++i) A[i] += Od[i];
}

// One expert (weights w1, w2, w3); route [M, 1] fp32 or none. With `acc` (fp32 [M, D']) the output
// is added into it in place and `acc` is returned (MoE: y = y + out.float()), else the output.
torch::Tensor expert_mlp(const torch::Tensor& x, const Lin& w1, const Lin& w2, const Lin& w3, double limit,
                         const c10::optional<torch::Tensor>& route_in, c10::optional<torch::Tensor> acc) {
  check_float(x, "expert_mlp x");
  TORCH_CHECK(x.dim() == 2, "expert_mlp: x [M, D], got ", x.sizes());
  const auto route = route_in.has_value() ? f32c(*route_in) : torch::Tensor();
  auto out = expert_out(x, w1, w2, w3, limit, route, route.defined() ? 0 : -1);
  if (!acc.has_value()) return out;
  add_into(*acc, out);
  return *acc;
}

// SwiGLU experts, each on its own rows: item e takes x_e [M_e, D] (fp32 values, bf16-exact when
// `bf16`), scales its h rows by scale_e (empty: unscaled) and adds its output rows into acc rows
// rows_e (acc fp32, row length ldacc), items in list order; the roundings are expert_out's (each
// projection's output and h to x's dtype), so the sums are the same. Every weight must pass
// decode_takes. All the items' w1 and w3 products run as one batch, then all w2 products.
using ExpertW = std::tuple<Lin, Lin, Lin>;

struct ExpertRows {
  const ExpertW* w;
  const float* x;               // [M, D]: all of x's rows, or `gathered`
  std::vector<float> scale;     // [M] or empty
  std::vector<int64_t> rows;    // [M]: where each row's output goes in acc
  std::vector<float> gathered;  // the rows of x this expert takes, when not all of them
};

inline void experts_into(const std::vector<ExpertRows>& items, int64_t D, bool bf16, float limit, float* acc,
                         int64_t ldacc) {
  const size_t E = items.size();
  std::vector<std::vector<float>> g(E), u(E), h(E), o(E);
  std::vector<DecodeJob> jobs;
  jobs.reserve(2 * E);
  for (size_t e = 0; e < E; ++e) {
    const auto& [w1, w2, w3] = *items[e].w;
    const int64_t M = items[e].rows.size(), F = std::get<1>(w1).size(0);
    g[e].resize(M * F), u[e].resize(M * F);
    jobs.emplace_back(w1, items[e].x, M, D, bf16, g[e].data());
    jobs.emplace_back(w3, items[e].x, M, D, bf16, u[e].data());
  }
  run_decode(jobs);
  jobs.clear();
  for (size_t e = 0; e < E; ++e) {
    const auto& [w1, w2, w3] = *items[e].w;
    const int64_t M = items[e].rows.size(), F = std::get<1>(w1).size(0);
    h[e].resize(M * F);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t f = 0; f < F; ++f) {
        float a = round_to(g[e][m * F + f], bf16), b = round_to(u[e][m * F + f], bf16);
        if (limit > 0) {
          a = std::min(a, limit);
          b = std::min(std::max(b, -limit), limit);
        }
        const float v = a / (1.f + std::exp(-a)) * b;
        h[e][m * F + f] = round_to(items[e].scale.empty() ? v : v * items[e].scale[m], bf16);
      }
    o[e].resize(M * std::get<1>(w2).size(0));
    jobs.emplace_back(w2, h[e].data(), M, F, bf16, o[e].data());
  }
  run_decode(jobs);
  for (size_t e = 0; e < E; ++e) {
    const int64_t M = items[e].rows.size(), out = o[e].size() / std::max<int64_t>(M, 1);
    for (int64_t m = 0; m < M; ++m) {
      float* dst = acc + items[e].rows[m] * ldacc;
      for (int64_t i = 0; i < out; ++i) dst[i] += round_to(o[e][m * out + i], bf16);
    }
  }
}

// Whether the tensor-free path takes this expert for x rows of width D.
inline bool expert_takes(const ExpertW& ex, int64_t D, int64_t out, bool bf16) {
  const auto& [w1, w2, w3] = ex;
  const int64_t F = std::get<1>(w1).size(0);
  return decode_takes(w1, D, bf16) && decode_takes(w3, D, bf16) && decode_takes(w2, F, bf16) &&
         std::get<1>(w3).size(0) == F && std::get<1>(w2).size(0) == out;
}

// x's rows as fp32 values.
inline std::vector<float> rows_f32(const torch::Tensor& x) {
  const auto xc = x.contiguous();
  std::vector<float> xf(xc.numel());
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  for (int64_t i = 0; i < xc.numel(); ++i)
    xf[i] = bf16 ? static_cast<float>(xc.data_ptr<at::BFloat16>()[i]) : xc.data_ptr<float>()[i];
  return xf;
}

// MoE.add_routed, each token routed to its own experts: acc [T, D] fp32 (in place) += for each expert
// e in list order, its SwiGLU output on x's rows rows[e], scaled by scales[e] (one weight per row):
// what a torch.where + expert_mlp + index_add per expert computes. prefill_rows: empty (a few tokens:
// every expert the decode products take runs on them), or kernels.PREFILL_ROWS' {FP8, MXFP4}
// thresholds for x (a prefill chunk): an expert with fewer rows than its w1's threshold runs on the
// decode products, the others take expert_out, which switches to the GEMM at the same thresholds as
// ops.linear. The decode-product experts run as two batches of decode products; the others, when
// more than one, in parallel, one expert per thread (their GEMMs single-threaded: a chunk's experts
// are many small GEMMs, each too small to pay for waking threads). The sums are added in list order.
torch::Tensor experts_rows(const torch::Tensor& x, const std::vector<ExpertW>& experts,
                           const std::vector<std::vector<int64_t>>& rows, const std::vector<std::vector<double>>& scales,
                           double limit, torch::Tensor acc, const std::vector<int64_t>& prefill_rows) {
  check_float(x, "experts_rows x");
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(x.dim() == 2 && experts.size() == rows.size() && rows.size() == scales.size() &&
                  acc.scalar_type() == torch::kFloat && acc.is_contiguous() && acc.dim() == 2 && acc.size(0) == T,
              "experts_rows: x [T, D], acc fp32 [T, D'], rows and scales per expert");
  TORCH_CHECK(prefill_rows.empty() || prefill_rows.size() == 2, "experts_rows: prefill_rows {FP8, MXFP4} or none");
  const int64_t rows_f8 = prefill_rows.empty() ? kDecodeOnly : prefill_rows[0];
  const int64_t rows_mx = prefill_rows.empty() ? kDecodeOnly : prefill_rows[1];
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const size_t E = experts.size();
  std::vector<char> decode(E, 0);
  std::vector<size_t> tensor_path;
  for (size_t e = 0; e < E; ++e) {
    const int64_t M = rows[e].size();
    TORCH_CHECK(static_cast<int64_t>(scales[e].size()) == M, "experts_rows: a scale per row");
    for (int64_t r : rows[e]) TORCH_CHECK(r >= 0 && r < T, "experts_rows: row ", r, " outside [0, ", T, ")");
    if (M == 0) continue;
    const int64_t below = std::get<0>(std::get<0>(experts[e])) == 1 ? rows_f8 : rows_mx;
    decode[e] = M < below && expert_takes(experts[e], D, acc.size(1), bf16);
    if (!decode[e]) tensor_path.push_back(e);
  }
  // the tensor-path experts' outputs [M_e, D'] fp32, computed before the sums
  std::vector<torch::Tensor> outs(E);
  auto out_of = [&](size_t e) {
    const int64_t M = rows[e].size();
    const auto idx = torch::tensor(rows[e], torch::kLong);
    const auto sc = torch::tensor(std::vector<float>(scales[e].begin(), scales[e].end())).view({M, 1});
    const auto& [w1, w2, w3] = experts[e];
    outs[e] = expert_out(x.index_select(0, idx), w1, w2, w3, limit, sc, 0, rows_f8, rows_mx).to(torch::kFloat);
  };
  if (tensor_path.size() > 1 && at::get_num_threads() > 1) {
    const at::ThreadLocalState tls;  // grad / inference mode, as the caller has them
    std::exception_ptr failed;
    std::mutex failed_mu;
    pool::run(static_cast<int64_t>(tensor_path.size()), 1, [&](int64_t i0, int64_t i1) {
      at::ThreadLocalStateGuard guard(tls);
      const int threads = omp_get_max_threads();
      omp_set_num_threads(1);  // this thread's OpenMP regions (dequant_mm, the bf16 GEMM) run serially
      for (int64_t i = i0; i < i1; ++i) {
        try {
          out_of(tensor_path[i]);
        } catch (...) {  // pool loops must not throw: rethrown below
          std::lock_guard<std::mutex> lk(failed_mu);
          if (!failed) failed = std::current_exception();
        }
      }
      omp_set_num_threads(threads);
    });
    if (failed) std::rethrow_exception(failed);
  } else {
    for (size_t e : tensor_path) out_of(e);
  }
  const auto xf = rows_f32(x);
  std::vector<ExpertRows> items;
  auto flush = [&] {
    if (!items.empty()) experts_into(items, D, bf16, static_cast<float>(limit), acc.data_ptr<float>(), acc.size(1));
    items.clear();
  };
  for (size_t e = 0; e < E; ++e) {
    const int64_t M = rows[e].size();
    if (M == 0) continue;
    if (decode[e]) {
      ExpertRows it{&experts[e], nullptr, std::vector<float>(scales[e].begin(), scales[e].end()), rows[e],
                    std::vector<float>(M * D)};
      for (int64_t m = 0; m < M; ++m) std::memcpy(&it.gathered[m * D], &xf[rows[e][m] * D], D * sizeof(float));
      it.x = it.gathered.data();  // stays valid when `it` is moved: the vector keeps its buffer
      items.push_back(std::move(it));
      continue;
    }
    flush();  // this one's output, in the same order
    const auto of = f32c(outs[e]);
    const float* O = of.data_ptr<float>();
    float* A = acc.data_ptr<float>();
    const int64_t out = acc.size(1);
    TORCH_CHECK(of.dim() == 2 && of.size(0) == M && of.size(1) == out, "experts_rows: expert output ", of.sizes());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < out; ++i) A[rows[e][m] * out + i] += O[m * out + i];
  }
  flush();
  return acc;
}

// Several experts for a few rows, summed in list order into fp32: acc (zeros when not given) +=
// expert_i(x) scaled by route[:, slots[i]] (unscaled where slots[i] < 0: the shared expert).
// One call for a decode token's MoE (MoE.add_experts).
torch::Tensor experts_sum(const torch::Tensor& x, const std::vector<ExpertW>& experts,
                          const std::vector<int64_t>& slots, const torch::Tensor& route_in, double limit,
                          c10::optional<torch::Tensor> acc_in) {
  check_float(x, "experts_sum x");
  TORCH_CHECK(x.dim() == 2 && !experts.empty() && experts.size() == slots.size(),
              "experts_sum: x [M, D] and a slot per expert");
  const auto route = f32c(route_in);
  const int64_t M = x.size(0), D = x.size(1), out = std::get<1>(std::get<1>(experts[0])).size(0);
  torch::Tensor acc = acc_in.has_value() ? *acc_in : torch::zeros({M, out}, torch::kFloat);
  TORCH_CHECK(acc.scalar_type() == torch::kFloat && acc.is_contiguous() && acc.dim() == 2 && acc.size(0) == M &&
                  acc.size(1) == out,
              "experts_sum: acc fp32 contiguous [", M, ", ", out, "], got ", acc.sizes());
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const auto xf = rows_f32(x);
  std::vector<int64_t> all(M);
  for (int64_t m = 0; m < M; ++m) all[m] = m;
  // The experts the tensor-free path takes go as one batch; any other (a strided weight, a format
  // the decode kernels lack) takes expert_out, its sum added in the same list order.
  std::vector<ExpertRows> items;
  auto flush = [&] {
    if (!items.empty()) experts_into(items, D, bf16, static_cast<float>(limit), acc.data_ptr<float>(), out);
    items.clear();
  };
  for (size_t i = 0; i < experts.size(); ++i) {
    const int64_t slot = slots[i];
    TORCH_CHECK(slot < 0 || slot < route.size(-1), "experts_sum: slot ", slot, " of route ", route.sizes());
    if (expert_takes(experts[i], D, out, bf16)) {
      std::vector<float> scale;
      for (int64_t m = 0; slot >= 0 && m < M; ++m) scale.push_back(route.data_ptr<float>()[m * route.size(-1) + slot]);
      items.push_back(ExpertRows{&experts[i], xf.data(), std::move(scale), all, {}});
    } else {
      flush();
      const auto& [w1, w2, w3] = experts[i];
      add_into(acc, expert_out(x, w1, w2, w3, limit, route, slot));
    }
  }
  flush();
  return acc;
}

}  // namespace fused
