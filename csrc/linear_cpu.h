// The packed-panel fp32 GEMM shared by csrc/linear_cpu.cpp (the decode step's weights) and
// csrc/decode_attention_cpu.cpp (the group-shared prompt prefix): out (M, N) (+)= x (M, K) @ w.T with w (N, K)
// packed into panels of 32 of its rows, (ceil(N / 32), K, 32), zero-padded. A 6-row x 32-column register tile;
// each panel is read once for all M rows, and the next one is prefetched while the rows of this one are computed,
// so weight reads from memory overlap the multiply-adds (the decode step's weights are always cold: the K/V pass
// evicted them). Include inside an anonymous namespace user: everything here is internal.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace vla_gemm {
namespace {

constexpr int64_t kCols = 32;  // panel width: two 16-float vectors
constexpr int kRows = 6;       // rows per register tile: 6 x 2 accumulators

using vla_simd::load16;
using vla_simd::v16;

// MR rows x 32 columns of out from one panel; `pf`: the next panel's part to prefetch (or null)
template <int MR>
VLA_INLINE void tile(const float* x, int64_t ldx, int64_t K, const float* panel, float* out, int64_t ldo, int64_t cols,
                     bool accumulate, const float* pf) {
  v16 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    if (pf != nullptr) __builtin_prefetch(pf + k * kCols, 0, 3), __builtin_prefetch(pf + k * kCols + 16, 0, 3);
    const v16 w0 = load16(panel + k * kCols), w1 = load16(panel + k * kCols + 16);
    for (int r = 0; r < MR; ++r) {
      const float xr = x[r * ldx + k];
      acc[r][0] += xr * w0;
      acc[r][1] += xr * w1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* o = out + r * ldo;
    float tmp[kCols];
    std::memcpy(tmp, acc[r], sizeof tmp);
    if (accumulate) {
      for (int64_t j = 0; j < cols; ++j) o[j] += tmp[j];
    } else {
      std::memcpy(o, tmp, cols * sizeof(float));
    }
  }
}

// out[m, n] (+)= sum_k x[m, k] w[n, k] for m < M, n < N, k < K. x rows ldx apart, out rows ldo apart; panel p
// of w at packed + p * ldp (ldp >= K * 32: a panel packed for more rows of K than are used here).
VLA_CLONES void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const float* packed, int64_t ldp, int64_t N,
                     float* out, int64_t ldo, bool accumulate) {
  const int64_t panels = (N + kCols - 1) / kCols;
  for (int64_t p = 0; p < panels; ++p) {
    const float* panel = packed + p * ldp;
    const float* next = p + 1 < panels ? panel + ldp : nullptr;
    const int64_t n0 = p * kCols, cols = std::min(kCols, N - n0);
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) {  // the first row tile prefetches the next panel
      tile<kRows>(x + m * ldx, ldx, K, panel, out + m * ldo + n0, ldo, cols, accumulate, m == 0 ? next : nullptr);
    }
    const float* pf = m == 0 ? next : nullptr;
    const float* xm = x + m * ldx;
    float* om = out + m * ldo + n0;
    switch (M - m) {
      case 5: tile<5>(xm, ldx, K, panel, om, ldo, cols, accumulate, pf); break;
      case 4: tile<4>(xm, ldx, K, panel, om, ldo, cols, accumulate, pf); break;
      case 3: tile<3>(xm, ldx, K, panel, om, ldo, cols, accumulate, pf); break;
      case 2: tile<2>(xm, ldx, K, panel, om, ldo, cols, accumulate, pf); break;
      case 1: tile<1>(xm, ldx, K, panel, om, ldo, cols, accumulate, pf); break;
      default: break;
    }
  }
}

// dst[p, k, j] = w[(p * 32 + j) * ldw + k] for the N rows of w (K floats used of each), zero past N and past K
// up to Kp: the panels gemm reads.
inline void pack_panels(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, float* dst) {
  const int64_t panels = (N + kCols - 1) / kCols;
  std::memset(dst, 0, panels * Kp * kCols * sizeof(float));
  for (int64_t n = 0; n < N; ++n) {
    float* d = dst + (n / kCols) * Kp * kCols + n % kCols;
    for (int64_t k = 0; k < K; ++k) d[k * kCols] = w[n * ldw + k];
  }
}

}  // namespace
}  // namespace vla_gemm
