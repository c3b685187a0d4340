// Single-token decode attention on the CPU, fp32: one query per (row, head) over the group's prompt prefix and
// the row's own suffix slots. The rollout's CPU decode step (engine/cpu_decode.py) calls it through
// kernels/decode_attention_cpu.py, which also holds the PyTorch reference.
//
//   q (B, H, D)   prefix k/v (G, Hkv, P, D) with valid lengths plens (G,)   suffix k/v (B, Hkv, Smax, D), slots [0, S)
//   out[b, h] = softmax(q . [prefix[:plens[g]] | suffix[:S]] / sqrt(D)) @ [prefix | suffix]     g = b / (B / G)
//
// Why a loop and not batched matmuls: each (row, head) has one query, so the products are matrix-vector; a plain
// pass over each row's suffix K/V (tens of MB per step at the CPU RFT shape, past any cache) reads it 1.3-1.8x
// faster than per-matrix GEMM calls (bench/results/cpu_inference_cpu.json). Each row re-reads its group's prefix,
// which stays in cache. Scores are dotted four keys at a time so the FMA chains do not set the pace; the softmax
// runs between the two passes (torch's vectorised one).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VLA_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#define VLA_INLINE __attribute__((always_inline)) inline  // inlined into each clone, so compiled for its ISA
#else
#define VLA_CLONES
#define VLA_INLINE inline
#endif

namespace {

// out[j] = scale * q . k[j] for j < n (k rows of D floats). DT > 0: D known at compile time.
template <int DT>
VLA_INLINE void dot_keys(const float* q, const float* k, int64_t n, int64_t Drt, float scale, float* out) {
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
    out[j] = s0 * scale;
    out[j + 1] = s1 * scale;
    out[j + 2] = s2 * scale;
    out[j + 3] = s3 * scale;
  }
  for (; j < n; ++j) {
    const float* kj = k + j * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += q[d] * kj[d];
    out[j] = s * scale;
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

// Scores of the rep query heads that share one kv head: rows of Ptot + S, -inf on the prefix padding.
template <int DT>
VLA_CLONES void scores_block(const float* q, const float* pk, const float* sk, float* out, int64_t Ptot,
                             int64_t plen, int64_t S, int64_t rep, int64_t D, float scale) {
  for (int64_t r = 0; r < rep; ++r) {  // rep > 1 re-reads this kv head's block from L2, not from memory
    float* o = out + r * (Ptot + S);
    dot_keys<DT>(q + r * D, pk, plen, D, scale, o);
    for (int64_t j = plen; j < Ptot; ++j) o[j] = -INFINITY;
    dot_keys<DT>(q + r * D, sk, S, D, scale, o + Ptot);
  }
}

template <int DT>
VLA_CLONES void values_block(const float* p, const float* pv, const float* sv, float* out, int64_t Ptot,
                             int64_t plen, int64_t S, int64_t rep, int64_t D) {
  for (int64_t r = 0; r < rep; ++r) {
    float* acc = out + r * D;
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
    const float* pr = p + r * (Ptot + S);
    axpy_rows<DT>(pr, pv, plen, D, acc);  // padding has probability 0: skipped
    axpy_rows<DT>(pr + Ptot, sv, S, D, acc);
  }
}

template <int DT>
torch::Tensor run(const torch::Tensor& q, const torch::Tensor& pk, const torch::Tensor& pv, const int64_t* pl,
                  const torch::Tensor& sk, const torch::Tensor& sv, int64_t S) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = pk.size(0), HKV = pk.size(1), P = pk.size(2);
  const int64_t Smax = sk.size(2), N = B / G, rep = H / HKV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto scores = torch::empty({B, H, P + S}, q.options());
  const float *qp = q.data_ptr<float>(), *pkp = pk.data_ptr<float>(), *skp = sk.data_ptr<float>();
  const float *pvp = pv.data_ptr<float>(), *svp = sv.data_ptr<float>();
  float* scp = scores.data_ptr<float>();
  at::parallel_for(0, B * HKV, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / HKV, h = i % HKV, g = b / N;
      scores_block<DT>(qp + (b * H + h * rep) * D, pkp + (g * HKV + h) * P * D, skp + (b * HKV + h) * Smax * D,
                       scp + (b * H + h * rep) * (P + S), P, pl[g], S, rep, D, scale);
    }
  });
  auto prob = scores.softmax(-1);
  const float* prp = prob.data_ptr<float>();
  auto out = torch::empty({B, H, D}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * HKV, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / HKV, h = i % HKV, g = b / N;
      values_block<DT>(prp + (b * H + h * rep) * (P + S), pvp + (g * HKV + h) * P * D,
                       svp + (b * HKV + h) * Smax * D, op + (b * H + h * rep) * D, P, pl[g], S, rep, D);
    }
  });
  return out;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor pk, torch::Tensor pv, torch::Tensor plens,
                               torch::Tensor sk, torch::Tensor sv, int64_t S) {
  for (const auto* t : {&q, &pk, &pv, &sk, &sv}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "decode_attention_cpu: q, prefix and suffix caches must be contiguous fp32 CPU tensors");
  }
  TORCH_CHECK(q.dim() == 3 && pk.dim() == 4 && sk.dim() == 4 && pv.sizes() == pk.sizes() && sv.sizes() == sk.sizes(),
              "decode_attention_cpu: q (B, H, D), prefix (G, Hkv, P, D), suffix (B, Hkv, Smax, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = pk.size(0), HKV = pk.size(1);
  TORCH_CHECK(G > 0 && B % G == 0 && HKV > 0 && H % HKV == 0 && pk.size(3) == D && sk.size(0) == B &&
                  sk.size(1) == HKV && sk.size(3) == D,
              "decode_attention_cpu: shapes do not agree (rows a multiple of groups, heads of kv heads, same D)");
  TORCH_CHECK(S >= 1 && S <= sk.size(2), "decode_attention_cpu: S must be in [1, Smax = ", sk.size(2), "], got ", S);
  auto pl = plens.to(at::kLong).contiguous();
  TORCH_CHECK(pl.device().is_cpu() && pl.numel() == G, "decode_attention_cpu: plens must hold G lengths on the CPU");
  const int64_t* plp = pl.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(plp[g] >= 0 && plp[g] <= pk.size(2), "decode_attention_cpu: plens must be in [0, P = ", pk.size(2),
                "], got ", plp[g], " for group ", g);
  }
  switch (D) {  // the head sizes of the presets (tiny 16, small/paper 64) and common LLaMA ones
    case 16: return run<16>(q, pk, pv, plp, sk, sv, S);
    case 32: return run<32>(q, pk, pv, plp, sk, sv, S);
    case 64: return run<64>(q, pk, pv, plp, sk, sv, S);
    case 128: return run<128>(q, pk, pv, plp, sk, sv, S);
  }
  return run<0>(q, pk, pv, plp, sk, sv, S);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "single-token decode attention over a shared prefix + own suffix (fp32)");
}
