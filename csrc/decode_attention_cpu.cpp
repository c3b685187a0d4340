// The CPU decode step's C++ (fp32), module vla_rft_engine._attn_cpu; the kernels are csrc/decode_attention_cpu.h.
//
// decode_attention: queries over the group's prompt prefix and each row's own suffix slots
// (kernels/decode_attention_cpu.py holds the launcher and the PyTorch reference):
//   q (B, H, D)   prefix k/v (G, Hkv, P, D) with valid lengths plens (G,)   suffix k/v (B, Hkv, Smax, D), slots [0, S)
//   out[b, h] = softmax(q . [prefix[:plens[g]] | suffix[:S]] / sqrt(D)) @ [prefix | suffix]     g = b / (B / G)
// or a chunk of L tokens per row, q (B, L, H, D), whose last L suffix slots are the chunk's own: position l sees
// suffix[:S - L + 1 + l] (the frame's last token + the next action, in one step).
//
// decode_layer: one world-model layer for a decode step, all of it in one call (kernels/decode_layer_cpu.py holds
// the launcher and the reference): at the CPU RFT shape a step's ~45 small torch ops per layer (norms, rotary,
// cache writes, layout copies) cost more in dispatch than in arithmetic.
#include "decode_attention_cpu.h"

#include <vector>

namespace {

using vla_attn::attend;
using vla_gemm::kCols;

void check_cpu_fp32(const torch::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "decode_attention_cpu / decode_layer: every tensor must be a contiguous fp32 CPU tensor");
}

const int64_t* checked_lens(const torch::Tensor& plens, int64_t G, int64_t P) {
  TORCH_CHECK(plens.device().is_cpu() && plens.scalar_type() == at::kLong && plens.is_contiguous() &&
                  plens.numel() == G,
              "decode_attention_cpu: plens must hold G int64 lengths on the CPU");
  const int64_t* pl = plens.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(pl[g] >= 0 && pl[g] <= P, "decode_attention_cpu: plens must be in [0, P = ", P, "], got ", pl[g],
                " for group ", g);
  }
  return pl;
}

// The prefix caches (G, Hkv, P, D), valid for [0, plens[g]), as the GEMM's panels; zeros past plens[g].
std::vector<torch::Tensor> pack_prefix(torch::Tensor pk, torch::Tensor pv, torch::Tensor plens) {
  check_cpu_fp32(pk);
  check_cpu_fp32(pv);
  TORCH_CHECK(pk.dim() == 4 && pv.sizes() == pk.sizes(), "decode_attention_cpu: prefix k/v must be (G, Hkv, P, D)");
  const int64_t G = pk.size(0), HKV = pk.size(1), P = pk.size(2), D = pk.size(3);
  const int64_t Pp = (P + kCols - 1) / kCols * kCols, DP = (D + kCols - 1) / kCols;
  const int64_t* pl = checked_lens(plens, G, P);
  auto kp = torch::zeros({G, HKV, Pp / kCols, D, kCols}, pk.options());
  auto vp = torch::zeros({G, HKV, DP, Pp, kCols}, pk.options());
  const float *pkp = pk.data_ptr<float>(), *pvp = pv.data_ptr<float>();
  float *kpp = kp.data_ptr<float>(), *vpp = vp.data_ptr<float>();
  for (int64_t gh = 0; gh < G * HKV; ++gh) {
    const int64_t plen = pl[gh / HKV];
    const float *k = pkp + gh * P * D, *v = pvp + gh * P * D;
    vla_gemm::pack_panels(k, D, plen, D, D, kpp + gh * Pp * D);  // "weight" rows = prefix slots
    float* vdst = vpp + gh * DP * Pp * kCols;  // "weight" rows = head dims, K = prefix slots
    for (int64_t j = 0; j < plen; ++j) {
      for (int64_t d = 0; d < D; ++d) vdst[(d / kCols) * Pp * kCols + j * kCols + d % kCols] = v[j * D + d];
    }
  }
  return {kp, vp};
}

// Rows a multiple of groups, heads of kv heads, prefix packed for the same D, suffix of B rows
void check_shapes(int64_t B, int64_t H, int64_t D, const torch::Tensor& kp, const torch::Tensor& vp,
                  const torch::Tensor& sk) {
  const int64_t G = kp.size(0), HKV = kp.size(1), P = kp.size(2) * kCols;
  TORCH_CHECK(G > 0 && B % G == 0 && HKV > 0 && H % HKV == 0 && kp.size(3) == D && kp.size(4) == kCols &&
                  vp.size(0) == G && vp.size(1) == HKV && vp.size(2) == (D + kCols - 1) / kCols &&
                  vp.size(3) == P && vp.size(4) == kCols && sk.size(0) == B && sk.size(1) == HKV && sk.size(3) == D,
              "decode_attention_cpu: shapes do not agree (rows a multiple of groups, heads of kv heads, same D)");
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor kp, torch::Tensor vp, torch::Tensor plens,
                               torch::Tensor sk, torch::Tensor sv, int64_t S) {
  for (const auto* t : {&q, &kp, &vp, &sk, &sv}) check_cpu_fp32(*t);
  TORCH_CHECK((q.dim() == 3 || q.dim() == 4) && kp.dim() == 5 && vp.dim() == 5 && sk.dim() == 4 &&
                  sv.sizes() == sk.sizes(),
              "decode_attention_cpu: q (B, H, D) or (B, L, H, D), prefix from pack_prefix, suffix (B, Hkv, Smax, D)");
  if (q.dim() == 3) return decode_attention(q.unsqueeze(1), kp, vp, plens, sk, sv, S).squeeze(1);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3), G = kp.size(0), HKV = kp.size(1);
  check_shapes(B, H, D, kp, vp, sk);
  TORCH_CHECK(S >= L && S <= sk.size(2), "decode_attention_cpu: S must be in [L = ", L, ", Smax = ", sk.size(2),
              "], got ", S);
  const int64_t* pl = checked_lens(plens, G, kp.size(2) * kCols);
  const int64_t N = B / G, rep = H / HKV;
  const auto qs = q.mul(1.0 / std::sqrt(static_cast<double>(D))).view({G, N, L, HKV, rep, D})
                      .permute({0, 3, 1, 2, 4, 5}).contiguous();
  const auto out = attend(qs, N, L, rep, kp, vp, pl, sk, sv, S);
  return out.view({G, HKV, N, L, rep, D}).permute({0, 2, 3, 1, 4, 5}).reshape({B, L, H, D});
}

// One layer for a step of L tokens per row at suffix slots [s0, s0 + L), x (B, L, dim) updated in place:
//   h = x + wo @ attention(rotary(wq @ rms(x)), rotary(wk @ rms(x)) and wv @ rms(x) into the suffix caches)
//   x = h + w2 @ (silu(w1 @ rms(h)) * (w3 @ rms(h)))
// as WorldModel.hidden computes it (HF RMSNorm, rotate_half rotary; cos/sin (G, Smax, D/2) hold suffix slot s's
// angles for group g). Weights come packed (csrc/linear_cpu.h): wqkv (q | k | v rows), wo, w13 (gate | up rows), w2.
torch::Tensor decode_layer(torch::Tensor x, torch::Tensor attn_norm, torch::Tensor wqkv, torch::Tensor wo,
                           torch::Tensor ffn_norm, torch::Tensor w13, torch::Tensor w2, torch::Tensor cos,
                           torch::Tensor sin, torch::Tensor kp, torch::Tensor vp, torch::Tensor plens, torch::Tensor sk,
                           torch::Tensor sv, int64_t s0, int64_t n_head, double eps) {
  for (const auto* t : {&x, &attn_norm, &wqkv, &wo, &ffn_norm, &w13, &w2, &cos, &sin, &kp, &vp, &sk, &sv}) {
    check_cpu_fp32(*t);
  }
  TORCH_CHECK(x.dim() == 3 && kp.dim() == 5 && vp.dim() == 5 && sk.dim() == 4 && sv.sizes() == sk.sizes(),
              "decode_layer: x (B, L, dim), prefix from pack_prefix, suffix (B, Hkv, Smax, D)");
  const int64_t B = x.size(0), L = x.size(1), dim = x.size(2), M = B * L, H = n_head, D = sk.size(3);
  const int64_t G = kp.size(0), HKV = sk.size(1), Smax = sk.size(2), N = B / std::max<int64_t>(G, 1);
  TORCH_CHECK(n_head > 0, "decode_layer: n_head must be positive, got ", n_head);
  check_shapes(B, H, D, kp, vp, sk);
  const int64_t rep = H / HKV, NQKV = (H + 2 * HKV) * D, I = w2.size(1), S = s0 + L, half = D / 2;
  auto panels = [](int64_t n) { return (n + kCols - 1) / kCols; };
  auto packed_as = [&](const torch::Tensor& w, int64_t n, int64_t k) {
    return w.dim() == 3 && w.size(0) == panels(n) && w.size(1) == k && w.size(2) == kCols;
  };
  TORCH_CHECK(packed_as(wqkv, NQKV, dim) && packed_as(wo, dim, H * D) && packed_as(w13, 2 * I, dim) &&
                  packed_as(w2, dim, I) && attn_norm.numel() == dim && ffn_norm.numel() == dim,
              "decode_layer: weights must be linear_cpu packs of wqkv (", NQKV, ", ", dim, "), wo (", dim, ", ",
              H * D, "), w13 (2 I, ", dim, "), w2 (", dim, ", I) and norms of ", dim);
  TORCH_CHECK(D % 2 == 0 && cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(0) == G && cos.size(2) == half &&
                  s0 >= 0 && S <= Smax && S <= cos.size(1),
              "decode_layer: cos/sin must be (G, >= s0 + L, D / 2) and slots s0 + L = ", S, " within Smax = ", Smax);
  const int64_t* pl = checked_lens(plens, G, kp.size(2) * kCols);
  auto x2 = x.view({M, dim});
  float* xp = x2.data_ptr<float>();
  auto gemm = [](const torch::Tensor& in, const torch::Tensor& w, int64_t n, float* out, bool acc) {
    TORCH_CHECK(in.is_contiguous(), "decode_layer: internal, a GEMM input must be contiguous");
    vla_gemm::gemm(in.data_ptr<float>(), in.size(1), in.size(0), in.size(1), w.data_ptr<float>(), w.size(1) * kCols,
                   n, out, n, acc);
  };

  const auto h = at::rms_norm(x2, {dim}, attn_norm, eps);
  auto qkv = torch::empty({M, NQKV}, x.options());
  gemm(h, wqkv, NQKV, qkv.data_ptr<float>(), false);
  // rotary on q and k; k and v into their suffix slots, q pre-scaled in the attention's (G, Hkv, N, L, rep, D) order
  auto qs = torch::empty({G, HKV, N, L, rep, D}, x.options());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const float *qkvp = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  float *qsp = qs.data_ptr<float>(), *skp = sk.data_ptr<float>(), *svp = sv.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t g = b / N, n = b % N;
    for (int64_t l = 0; l < L; ++l) {
      const float* row = qkvp + (b * L + l) * NQKV;
      const float *c = cp + (g * cos.size(1) + s0 + l) * half, *s = snp + (g * cos.size(1) + s0 + l) * half;
      for (int64_t hh = 0; hh < H + HKV; ++hh) {
        const float* src = row + hh * D;
        const bool is_q = hh < H;
        float* dst = is_q ? qsp + ((((g * HKV + hh / rep) * N + n) * L + l) * rep + hh % rep) * D
                          : skp + ((b * HKV + hh - H) * Smax + s0 + l) * D;
        const float f = is_q ? scale : 1.f;
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = src[d], x2v = src[d + half];
          dst[d] = (x1 * c[d] - x2v * s[d]) * f;
          dst[d + half] = (x2v * c[d] + x1 * s[d]) * f;
        }
      }
      for (int64_t hv = 0; hv < HKV; ++hv) {
        std::memcpy(svp + ((b * HKV + hv) * Smax + s0 + l) * D, row + (H + HKV + hv) * D, D * sizeof(float));
      }
    }
  }
  const auto y = attend(qs, N, L, rep, kp, vp, pl, sk, sv, S)
                     .view({G, HKV, N, L, rep, D}).permute({0, 2, 3, 1, 4, 5}).reshape({M, H * D}).contiguous();
  gemm(y, wo, dim, xp, true);

  const auto h2 = at::rms_norm(x2, {dim}, ffn_norm, eps);
  auto gu = torch::empty({M, 2 * I}, x.options());
  gemm(h2, w13, 2 * I, gu.data_ptr<float>(), false);
  auto gate = gu.narrow(1, 0, I);
  const auto act = at::silu_(gate).mul(gu.narrow(1, I, I));  // a new contiguous (M, I)
  gemm(act, w2, dim, xp, true);
  return x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_prefix", &pack_prefix, "the prefix caches as the GEMM's panels (kp, vp), once per rollout");
  m.def("decode_attention", &decode_attention, "decode attention over a shared prefix + own suffix (fp32)");
  m.def("decode_layer", &decode_layer, "one world-model layer for a decode step, x updated in place (fp32)");
}
