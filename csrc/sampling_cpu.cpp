// The top-p check of the CPU sampler (kernels/sampling.py: _nucleus_argmax is its PyTorch reference), per row:
// the Gumbel-max winner t over the values left is the sort-based reference's token when the mass strictly above
// p_t, plus its ties, is below top_p by more than the rounding margin; when that mass reaches top_p (same margin)
// every value <= p_t is dropped and the next winner is checked. Rows with no certain verdict (within the margin,
// non-finite values, `rounds` used up) come back with done = false and go to the sorted cut.
//
// Why C++: each round is two passes over the V values of a row; as torch ops they are a dozen full-tensor
// kernels per round (bench/results/cpu_inference_cpu.json, sampling_*).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace {

// Mass strictly above pt and the count of values equal to it. Blocks of 256 summed in float, the blocks in double:
// the error stays far below the margin, which allows V * 2^-24 for this sum.
VLA_CLONES void mass_above(const float* p, int64_t V, float pt, double* above, int64_t* equal) {
  double acc = 0.0;
  int64_t eq = 0;
  for (int64_t j0 = 0; j0 < V; j0 += 256) {
    const int64_t j1 = std::min(V, j0 + 256);
    float a = 0.f;
    int64_t e = 0;
#pragma omp simd reduction(+ : a, e)
    for (int64_t j = j0; j < j1; ++j) {
      a += p[j] > pt ? p[j] : 0.f;
      e += p[j] == pt ? 1 : 0;
    }
    acc += a;
    eq += e;
  }
  *above = acc;
  *equal = eq;
}

// argmax of s (no NaN) over the values with p > thr, the first index on ties (as torch.argmax); -1 if none.
// Two passes, the first a vectorised max, the second stopping at the first index that reaches it.
VLA_CLONES int64_t argmax_above(const float* p, const float* s, int64_t V, float thr) {
  float bv = -INFINITY;
#pragma omp simd reduction(max : bv)
  for (int64_t j = 0; j < V; ++j) bv = std::max(bv, p[j] > thr ? s[j] : -INFINITY);
  for (int64_t j = 0; j < V; ++j) {
    if (p[j] > thr && s[j] == bv) return j;
  }
  return -1;
}

// No p is inf or NaN and no score is NaN (-inf scores are top-k's cut).
VLA_CLONES bool all_finite(const float* p, const float* s, int64_t V) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < V; ++j) bad |= static_cast<int>(!(p[j] - p[j] == 0.f)) | static_cast<int>(s[j] != s[j]);
  return bad == 0;
}

std::tuple<torch::Tensor, torch::Tensor> nucleus_argmax(torch::Tensor p, torch::Tensor score, double top_p,
                                                        int64_t rounds) {
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous() && p.dim() == 2,
              "nucleus_argmax: p must be a contiguous (B, V) fp32 CPU tensor");
  TORCH_CHECK(score.sizes() == p.sizes() && score.scalar_type() == at::kFloat && score.is_contiguous(),
              "nucleus_argmax: score must be contiguous fp32 with p's shape ", p.sizes(), ", got ", score.sizes());
  const int64_t B = p.size(0), V = p.size(1);
  auto tok = torch::zeros({B}, p.options().dtype(at::kLong));
  auto done = torch::zeros({B}, p.options().dtype(at::kBool));
  const float *pp = p.data_ptr<float>(), *sp = score.data_ptr<float>();
  int64_t* tp = tok.data_ptr<int64_t>();
  bool* dp = done.data_ptr<bool>();
  const double tol = static_cast<double>(V) * std::ldexp(1.0, -22);
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const float *pr = pp + b * V, *sr = sp + b * V;
      if (!all_finite(pr, sr, V)) continue;
      float thr = -INFINITY;  // values <= thr are dropped
      for (int64_t r = 0; r < rounds; ++r) {
        const int64_t t = argmax_above(pr, sr, V, thr);
        if (t < 0) break;
        const float pt = pr[t];
        double above;
        int64_t equal;
        mass_above(pr, V, pt, &above, &equal);
        if (above + static_cast<double>(equal - 1) * pt < top_p - tol) {  // certainly in the top-p set
          tp[b] = t;
          dp[b] = true;
          break;
        }
        if (!(above >= top_p + tol)) break;  // within the margin: the sorted cut decides
        thr = pt;  // certainly out, and so is every value <= p_t
      }
    }
  });
  return {tok, done};
}

#if defined(__GNUC__) && !defined(__clang__)
using f16v = vla_simd::v16;
using i16v = vla_simd::i16;

// Natural log of 16 normal positive floats: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) = f - f^2/2 + f^3 P(f)
// for f = m - 1 (P: the minimax polynomial of Cephes' logf), e ln 2 added in two parts. Within ~1 ulp of logf.
VLA_INLINE f16v log16(f16v x) {
  i16v i;
  std::memcpy(&i, &x, sizeof i);
  i16v e = ((i >> 23) & 0xff) - 126;
  i = (i & 0x807fffff) | 0x3f000000;  // m in [0.5, 1)
  f16v m;
  std::memcpy(&m, &i, sizeof m);
  const i16v small = m < 0.707106781186547524f;  // all ones where true
  e += small;                                     // e - 1 there
  const f16v mm = small ? m + m : m;
  const f16v f = mm - 1.0f;
  const f16v z = f * f;
  f16v y = 7.0376836292e-2f * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  f16v ef;
  for (int j = 0; j < 16; ++j) ef[j] = static_cast<float>(e[j]);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return f + y + 0.693359375f * ef;
}

#endif

// u <- -log(-log(clamp(u, lo, hi))) in place, 16 at a time where GCC's vector extensions are (the Gumbel noise of
// the rollout's sampler)
VLA_CLONES void gumbel_loop(float* u, int64_t n, float lo, float hi) {
  int64_t j = 0;
#if defined(__GNUC__) && !defined(__clang__)
  for (; j + 16 <= n; j += 16) {
    f16v v;
    std::memcpy(&v, u + j, sizeof v);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    v = -log16(-log16(v));
    std::memcpy(u + j, &v, sizeof v);
  }
#endif
  for (; j < n; ++j) u[j] = -std::log(-std::log(std::min(std::max(u[j], lo), hi)));
}

torch::Tensor gumbel_(torch::Tensor u, double lo, double hi) {
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.is_contiguous(),
              "gumbel_: u must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(lo > 0 && hi < 1 && lo < hi, "gumbel_: the clamp must lie inside (0, 1)");
  gumbel_loop(u.data_ptr<float>(), u.numel(), static_cast<float>(lo), static_cast<float>(hi));
  return u;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nucleus_argmax", &nucleus_argmax, "the CPU sampler's top-p check (kernels/sampling.py: _nucleus_argmax)",
        py::arg("p"), py::arg("score"), py::arg("top_p"), py::arg("rounds") = 16);
  m.def("gumbel_", &gumbel_, "u <- -log(-log(clamp(u, lo, hi))) in place (fp32, vectorised log)");
}
