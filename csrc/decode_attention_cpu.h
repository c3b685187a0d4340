// The CPU decode attention's kernels (fp32), shared by csrc/decode_attention_cpu.cpp's two ops: queries over the
// group's prompt prefix and each row's own suffix slots.
//
// The prefix is shared by a group's rows: its scores and its share of the output are one GEMM each per (group,
// kv head) over the group's queries (csrc/linear_cpu.h), so it is read once per group, not once per row. Each
// row's suffix is its own and each (row, head) has one query there, so those products are matrix-vector: a plain
// pass over the suffix K/V (tens of MB per step at the CPU RFT shape, past any cache) reads it faster than
// per-matrix GEMM calls (bench/results/cpu_inference_cpu.json). That pass must compute faster than memory
// delivers, or the two add up: for head sizes that are multiples of 16, 16 keys are dotted at once into 16 vectors
// of partial sums that one shuffle tree reduces (a horizontal sum per key cost ~30 instructions and held the pass
// to ~40 GB/s from cache), and four blocks are read side by side to keep more lines in flight. The softmax runs
// between the two passes (torch's vectorised one).
//
// Include inside one translation unit: everything here is internal.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "linear_cpu.h"  // the prefix's GEMM (and simd.h)

#if defined(__GNUC__) && !defined(__clang__)
#define VLA_VEC 1  // GCC vector extensions: lowered per clone (one zmm, two ymm, or four xmm per v16)
#else
#define VLA_VEC 0
#endif

namespace vla_attn {
namespace {

using vla_gemm::kCols;

// Each (row, kv head) suffix block is a 10-150 KB stream, read once per step, past any cache. One stream at a time
// keeps too few lines in flight on one core; kWays blocks read side by side, a key of each in turn, do not
// (interleaved passes measured ~20 GB/s here against ~13 for one block with software prefetch).
constexpr int kWays = 4;

#if VLA_VEC
using vla_simd::i16;
using vla_simd::load16;
using vla_simd::v16;

// Lane j of the result = the sum of p[j]'s 16 lanes. Each level folds lane halves of two vectors into one, keys
// kept in order: 15 folds of two shuffles and an add for 16 keys.
VLA_INLINE v16 fold(v16 a, v16 b, i16 lo, i16 hi) { return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi); }

VLA_INLINE v16 hsum16(const v16* p) {
  const i16 a0 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const i16 a1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const i16 b0 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const i16 b1 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const i16 c0 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const i16 c1 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const i16 d0 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const i16 d1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  v16 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i) x[i] = fold(p[2 * i], p[2 * i + 1], a0, a1);
  for (int i = 0; i < 4; ++i) y[i] = fold(x[2 * i], x[2 * i + 1], b0, b1);
  for (int i = 0; i < 2; ++i) z[i] = fold(y[2 * i], y[2 * i + 1], c0, c1);
  return fold(z[0], z[1], d0, d1);
}

// out[w][j] = q[w] . k[w][j] for j < n and each of the W blocks, D = DT a multiple of 16
template <int DT, int W>
VLA_INLINE void dot_keys_vec(const float* const* q, const float* const* k, int64_t n, float* const* out) {
  constexpr int C = DT / 16;
  v16 qv[W][C], p[W][16];
  for (int w = 0; w < W; ++w) {
    for (int c = 0; c < C; ++c) qv[w][c] = load16(q[w] + 16 * c);
  }
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int t = 0; t < 16; ++t) {
      for (int w = 0; w < W; ++w) {
        const float* kt = k[w] + (j + t) * DT;
        v16 a = qv[w][0] * load16(kt);
        for (int c = 1; c < C; ++c) a += qv[w][c] * load16(kt + 16 * c);
        p[w][t] = a;
      }
    }
    for (int w = 0; w < W; ++w) {
      const v16 s = hsum16(p[w]);
      std::memcpy(out[w] + j, &s, sizeof s);
    }
  }
  if (j < n) {  // the last 1-15 keys
    const int64_t m = n - j;
    for (int w = 0; w < W; ++w) {
      for (int t = 0; t < 16; ++t) {
        p[w][t] = v16{};
        if (t < m) {
          for (int c = 0; c < C; ++c) p[w][t] += qv[w][c] * load16(k[w] + (j + t) * DT + 16 * c);
        }
      }
      const v16 s = hsum16(p[w]);
      std::memcpy(out[w] + j, &s, m * sizeof(float));
    }
  }
}

// acc[w][0:D] += sum_j p[w][j] * v[w][j] for j < n and each of the W blocks
template <int DT, int W>
VLA_INLINE void axpy_rows_vec(const float* const* p, const float* const* v, int64_t n, v16 (*acc)[DT / 16]) {
  constexpr int C = DT / 16;
  for (int64_t j = 0; j < n; ++j) {
    for (int w = 0; w < W; ++w) {
      const float pj = p[w][j];
      for (int c = 0; c < C; ++c) acc[w][c] += pj * load16(v[w] + j * DT + 16 * c);
    }
  }
}
#endif

// out[j] = q . k[j] for j < n (k rows of D floats). DT > 0: D known at compile time.
template <int DT>
VLA_INLINE void dot_keys(const float* q, const float* k, int64_t n, int64_t Drt, float* out) {
  const int64_t D = DT > 0 ? DT : Drt;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four independent chains
    const float *k0 = k + j * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      s0 += q[d] * k0[d];
      s1 += q[d] * k1[d];
      s2 += q[d] * k2[d];
      s3 += q[d] * k3[d];
    }
    out[j] = s0;
    out[j + 1] = s1;
    out[j + 2] = s2;
    out[j + 3] = s3;
  }
  for (; j < n; ++j) {
    const float* kj = k + j * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += q[d] * kj[d];
    out[j] = s;
  }
}

// acc[0:D] += sum_j p[j] * v[j] for j < n
template <int DT>
VLA_INLINE void axpy_rows(const float* p, const float* v, int64_t n, int64_t Drt, float* acc) {
  const int64_t D = DT > 0 ? DT : Drt;
  for (int64_t j = 0; j < n; ++j) {
    const float w = p[j];
    const float* vj = v + j * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += w * vj[d];
  }
}

// Suffix scores of the queries of `ways` consecutive (row, kv head) blocks: (pre-scaled) L chunk positions x rep
// heads each, R = L * rep rows of Ptot + S per block, block w's at q + w * R * D and out + w * R * (Ptot + S). Query
// r sees the first S - L + 1 + r / rep slots (causal inside the chunk), -inf after them.
template <int DT>
VLA_CLONES void suffix_scores(const float* q, const float* const* sk, float* out, int64_t ways, int64_t Ptot,
                              int64_t S, int64_t L, int64_t rep, int64_t D) {
  const int64_t R = L * rep;
  for (int64_t r = 0; r < R; ++r) {  // more than one query re-reads these blocks from cache, not from memory
    const int64_t Sl = S - L + 1 + r / rep;
    const float* qw[kWays] = {};
    float* ow[kWays] = {};
    for (int64_t w = 0; w < ways; ++w) qw[w] = q + (w * R + r) * D, ow[w] = out + (w * R + r) * (Ptot + S) + Ptot;
#if VLA_VEC
    if constexpr (DT > 0 && DT % 16 == 0) {
      switch (ways) {
        case 4: dot_keys_vec<DT, 4>(qw, sk, Sl, ow); break;
        case 3: dot_keys_vec<DT, 3>(qw, sk, Sl, ow); break;
        case 2: dot_keys_vec<DT, 2>(qw, sk, Sl, ow); break;
        default: dot_keys_vec<DT, 1>(qw, sk, Sl, ow); break;
      }
    } else
#endif
    {
      for (int64_t w = 0; w < ways; ++w) dot_keys<DT>(qw[w], sk[w], Sl, D, ow[w]);
    }
    for (int64_t w = 0; w < ways; ++w) std::fill(ow[w] + Sl, ow[w] + S, -INFINITY);
  }
}

// out rows (holding the prefix's part) += probabilities of the suffix @ its values, the same blocks as above
template <int DT>
VLA_CLONES void suffix_values(const float* p, const float* const* sv, float* out, int64_t ways, int64_t Ptot,
                              int64_t S, int64_t L, int64_t rep, int64_t D) {
  const int64_t R = L * rep;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t Sl = S - L + 1 + r / rep;
    const float* pw[kWays] = {};
    for (int64_t w = 0; w < ways; ++w) pw[w] = p + (w * R + r) * (Ptot + S) + Ptot;
#if VLA_VEC
    if constexpr (DT > 0 && DT % 16 == 0) {
      v16 a[kWays][DT / 16];
      for (int64_t w = 0; w < ways; ++w) std::memcpy(a[w], out + (w * R + r) * D, sizeof a[w]);
      switch (ways) {
        case 4: axpy_rows_vec<DT, 4>(pw, sv, Sl, a); break;
        case 3: axpy_rows_vec<DT, 3>(pw, sv, Sl, a); break;
        case 2: axpy_rows_vec<DT, 2>(pw, sv, Sl, a); break;
        default: axpy_rows_vec<DT, 1>(pw, sv, Sl, a); break;
      }
      for (int64_t w = 0; w < ways; ++w) std::memcpy(out + (w * R + r) * D, a[w], sizeof a[w]);
      continue;
    }
#endif
    for (int64_t w = 0; w < ways; ++w) axpy_rows<DT>(pw[w], sv[w], Sl, D, out + (w * R + r) * D);
  }
}

// Queries come pre-scaled by 1 / sqrt(D), in (G, Hkv, N, L, rep, D) order: the queries of one kv head adjacent, a
// row's L chunk positions together; the output is in the same order. The prefix comes packed (pack_prefix): kp (G,
// Hkv, P / 32, D, 32) and vp (G, Hkv, ceil(D / 32), P, 32), P padded to panels, so that its scores and its share of
// the output are one GEMM each per (group, kv head) over all the group's queries (every chunk position sees the
// whole prefix). Suffix k/v (B, Hkv, Smax, D), slots [0, S) read.
template <int DT>
torch::Tensor attend_d(const torch::Tensor& qs, int64_t N, int64_t L, int64_t rep, const torch::Tensor& kp,
                       const torch::Tensor& vp, const int64_t* pl, const torch::Tensor& sk, const torch::Tensor& sv,
                       int64_t S) {
  const int64_t G = kp.size(0), HKV = kp.size(1), D = kp.size(3), B = G * N;
  const int64_t P = kp.size(2) * kCols, Smax = sk.size(2), R = L * rep, Q = N * R;
  const int64_t W = P + S;
  auto scores = torch::empty({G, HKV, Q, W}, qs.options());
  auto out = torch::empty({G, HKV, Q, D}, qs.options());
  const float *qp = qs.data_ptr<float>(), *kpp = kp.data_ptr<float>(), *vpp = vp.data_ptr<float>();
  const float *skp = sk.data_ptr<float>(), *svp = sv.data_ptr<float>();
  float *scp = scores.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, G * HKV, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t gh = lo; gh < hi; ++gh) {
      const int64_t plen = pl[gh / HKV];
      float* sc = scp + gh * Q * W;
      vla_gemm::gemm(qp + gh * Q * D, D, Q, D, kpp + gh * P * D, D * kCols, plen, sc, W, false);
      for (int64_t m = 0; m < Q; ++m) std::fill(sc + m * W + plen, sc + m * W + P, -INFINITY);
    }
  });
  // fn(i, ways, blocks) over the (row, kv head) blocks i = (g, h, n) of a suffix cache, up to kWays at a time: a
  // group's rows inside each head, block i being row b = g * N + n of head h
  auto over_blocks = [&](const float* cache, auto&& fn) {
    at::parallel_for(0, B * HKV, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; i += kWays) {
        const int64_t ways = std::min<int64_t>(kWays, hi - i);
        const float* blocks[kWays] = {};
        for (int64_t w = 0; w < ways; ++w) {
          const int64_t j = i + w;
          blocks[w] = cache + ((j / (HKV * N) * N + j % N) * HKV + j / N % HKV) * Smax * D;
        }
        fn(i, ways, blocks);
      }
    });
  };
  over_blocks(skp, [&](int64_t i, int64_t ways, const float* const* kw) {
    suffix_scores<DT>(qp + i * R * D, kw, scp + i * R * W, ways, P, S, L, rep, D);
  });
  const auto prob = scores.softmax(-1);
  const float* prp = prob.data_ptr<float>();
  at::parallel_for(0, G * HKV, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t gh = lo; gh < hi; ++gh) {  // padding slots have probability 0 and are not read
      const int64_t plen = pl[gh / HKV];
      if (plen == 0) std::fill(op + gh * Q * D, op + (gh + 1) * Q * D, 0.f);
      else vla_gemm::gemm(prp + gh * Q * W, W, Q, plen, vpp + gh * vp.size(2) * P * kCols, P * kCols, D,
                          op + gh * Q * D, D, false);
    }
  });
  over_blocks(svp, [&](int64_t i, int64_t ways, const float* const* vw) {
    suffix_values<DT>(prp + i * R * W, vw, op + i * R * D, ways, P, S, L, rep, D);
  });
  return out;
}

// attend_d for the head sizes of the presets (tiny 16, small/paper 64) and common LLaMA ones; runtime D otherwise
inline torch::Tensor attend(const torch::Tensor& qs, int64_t N, int64_t L, int64_t rep, const torch::Tensor& kp,
                            const torch::Tensor& vp, const int64_t* pl, const torch::Tensor& sk, const torch::Tensor& sv,
                            int64_t S) {
  switch (kp.size(3)) {
    case 16: return attend_d<16>(qs, N, L, rep, kp, vp, pl, sk, sv, S);
    case 32: return attend_d<32>(qs, N, L, rep, kp, vp, pl, sk, sv, S);
    case 64: return attend_d<64>(qs, N, L, rep, kp, vp, pl, sk, sv, S);
    case 128: return attend_d<128>(qs, N, L, rep, kp, vp, pl, sk, sv, S);
  }
  return attend_d<0>(qs, N, L, rep, kp, vp, pl, sk, sv, S);
}

}  // namespace
}  // namespace vla_attn
