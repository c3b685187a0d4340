// Fused CPU vq_decode: token ids -> (FSQ digits | codebook rows) -> linear projection -> de-patchified grid.
// Semantics: vq_decode_reference in python/vla_rft_engine/ops/vq_decode.py.
//
// Work unit = one (batch, token row i). Its gw codes are decoded once into a small planar buffer
// (expanded p times along x), then every output row out[b, c, i*p+u, :] is produced in 8-wide blocks
// straight from those codes: no (B, N, C*p*p) intermediate, each output element written once.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "vq_decode_common.h"

namespace vq {
namespace {

constexpr int VW = 8;  // block width: one AVX register of floats

template <typename T>
inline float round_through(float x) { return static_cast<float>(static_cast<T>(x)); }
template <>
inline float round_through<float>(float x) { return x; }

// The reference computes y = T(codes @ W.T) and then T(y + b): two roundings for half types.
template <typename T, bool HasBias>
inline T finish(float acc, float b) {
  if constexpr (HasBias) return static_cast<T>(round_through<T>(acc) + b);
  else return static_cast<T>(acc);
}

struct Plan {
  int64_t B, gh, gw, p, C, D, R, H, W, M, Mp;
  const float* wt;     // (D, R) transposed weight, float
  const float* bias;   // (R) or nullptr
  const float* lut;    // FSQ: per-level code tables, concatenated; else nullptr
  const int64_t* lut_off;
  const int64_t* basis;
  const int64_t* levels;
  const float* cb;     // VQ: (ncodes, D) float codebook; else nullptr
};

// Fills cs[k*Mp + m] with code k of token (m / p), m < M; zero padding up to Mp.
template <typename I>
inline void decode_codes(const Plan& pl, const I* id_row, float* cs) {
  const int64_t p = pl.p;
  for (int64_t j = 0; j < pl.gw; ++j) {
    const int64_t id = static_cast<int64_t>(id_row[j]);
    for (int64_t k = 0; k < pl.D; ++k) {
      float c;
      if (pl.cb) c = pl.cb[id * pl.D + k];
      else c = pl.lut[pl.lut_off[k] + (id / pl.basis[k]) % pl.levels[k]];
      float* dst = cs + k * pl.Mp + j * p;
      for (int64_t v = 0; v < p; ++v) dst[v] = c;
    }
  }
  for (int64_t k = 0; k < pl.D; ++k)
    for (int64_t m = pl.M; m < pl.Mp; ++m) cs[k * pl.Mp + m] = 0.f;
}

// One output row (length M) for weight rows r0 .. r0+p-1, when p divides VW: the weight pattern
// along x repeats every VW elements, so a VW-wide block needs D broadcasts of one small vector.
template <typename T, bool HasBias>
inline void row_fast(const Plan& pl, const float* cs, int64_t r0, T* out) {
  const int64_t D = pl.D, p = pl.p, R = pl.R;
  float wrep[32][VW];  // D <= 32 on this path
  float brep[VW];
  for (int64_t k = 0; k < D; ++k)
    for (int t = 0; t < VW; ++t) wrep[k][t] = pl.wt[k * R + r0 + (t % p)];
  for (int t = 0; t < VW; ++t) brep[t] = HasBias ? pl.bias[r0 + (t % p)] : 0.f;
  const int64_t M = pl.M, Mp = pl.Mp;
  for (int64_t m0 = 0; m0 < Mp; m0 += VW) {
    float acc[VW];
    for (int t = 0; t < VW; ++t) acc[t] = wrep[0][t] * cs[m0 + t];
    for (int64_t k = 1; k < D; ++k) {
      const float* c = cs + k * Mp + m0;
      for (int t = 0; t < VW; ++t) acc[t] += wrep[k][t] * c[t];
    }
    if (m0 + VW <= M) {
      for (int t = 0; t < VW; ++t) out[m0 + t] = finish<T, HasBias>(acc[t], brep[t]);
    } else {
      for (int64_t t = 0; m0 + t < M; ++t) out[m0 + t] = finish<T, HasBias>(acc[t], brep[t]);
    }
  }
}

// Any p / D: plain loops (same summation order as row_fast).
template <typename T, bool HasBias>
inline void row_generic(const Plan& pl, const float* cs, int64_t r0, T* out) {
  const int64_t D = pl.D, p = pl.p, R = pl.R, Mp = pl.Mp;
  for (int64_t m = 0; m < pl.M; ++m) {
    const int64_t r = r0 + m % p;
    float acc = pl.wt[r] * cs[m];
    for (int64_t k = 1; k < D; ++k) acc += pl.wt[k * R + r] * cs[k * Mp + m];
    out[m] = finish<T, HasBias>(acc, HasBias ? pl.bias[r] : 0.f);
  }
}

template <typename T, typename I, bool HasBias>
void run_decode(const Plan& pl, const I* ids, T* out) {
  const bool fast = (VW % pl.p == 0) && pl.D <= 32;
  const int64_t units = pl.B * pl.gh;
  const int64_t work_per_unit = std::max<int64_t>(1, pl.C * pl.p * pl.M * pl.D);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / work_per_unit);
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(static_cast<size_t>(pl.D * pl.Mp));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / pl.gh, i = unit % pl.gh;
      decode_codes(pl, ids + (b * pl.gh + i) * pl.gw, cs.data());
      for (int64_t c = 0; c < pl.C; ++c) {
        T* plane = out + ((b * pl.C + c) * pl.H + i * pl.p) * pl.W;
        for (int64_t u = 0; u < pl.p; ++u) {
          const int64_t r0 = (c * pl.p + u) * pl.p;
          if (fast) row_fast<T, HasBias>(pl, cs.data(), r0, plane + u * pl.W);
          else row_generic<T, HasBias>(pl, cs.data(), r0, plane + u * pl.W);
        }
      }
    }
  });
}

template <typename I>
void check_id_range(const I* ids, int64_t n, int64_t ncodes) {
  // One cheap pass before any output is written: a bad id must never index memory.
  int64_t lo = 0, hi = 0;
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    bad |= (v < 0) | (v >= ncodes);
  }
  if (!bad) return;
  lo = hi = static_cast<int64_t>(ids[0]);
  for (int64_t i = 1; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  throw_bad_ids(lo, hi, ncodes);
}

void check_ids_cpu(const at::Tensor& ids, int64_t ncodes) {
  if (ids.numel() == 0) return;
  if (ids.scalar_type() == at::kLong) check_id_range(ids.data_ptr<int64_t>(), ids.numel(), ncodes);
  else check_id_range(ids.data_ptr<int32_t>(), ids.numel(), ncodes);
}

void require_cpu(const at::Tensor& t, const char* name) {
  if (!t.device().is_cpu())
    throw pybind11::value_error(std::string(name) + " must be a CPU tensor for _vq_cpu, got " + t.device().str());
}

// Per-level tables of normalised codes (d - L//2) / (L//2), rounded through the weight dtype.
void fsq_tables(const std::vector<int64_t>& levels, at::ScalarType wdtype, std::vector<float>& lut,
                std::vector<int64_t>& off, std::vector<int64_t>& basis) {
  int64_t acc = 1;
  for (int64_t L : levels) {
    off.push_back(static_cast<int64_t>(lut.size()));
    basis.push_back(acc);
    acc *= L;
    const float half = static_cast<float>(L / 2);
    for (int64_t d = 0; d < L; ++d) {
      const float c = (static_cast<float>(d) - half) / half;
      float r = c;
      if (wdtype == at::kBFloat16) r = round_through<c10::BFloat16>(c);
      else if (wdtype == at::kHalf) r = round_through<c10::Half>(c);
      lut.push_back(r);
    }
  }
}

at::Tensor decode(const at::Tensor& ids_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
                  int64_t gh, int64_t gw, int64_t patch, const std::vector<int64_t>& levels,
                  const c10::optional<at::Tensor>& codebook) {
  const DecodeArgs a = check_decode_args(ids_in, weight_in, bias_in, gh, gw, patch, levels, codebook);
  require_cpu(ids_in, "ids");
  require_cpu(weight_in, "weight");
  const at::Tensor ids = ids_in.contiguous();  // no copy when already contiguous
  check_ids_cpu(ids, a.ncodes);

  const auto wdtype = weight_in.scalar_type();
  at::Tensor out = at::empty({a.B, a.C, gh * patch, gw * patch}, weight_in.options());
  if (out.numel() == 0) return out;
  // Small float copies of the parameters (R*D + R values) in the layout the kernel wants.
  const at::Tensor wt = weight_in.to(at::kFloat).t().contiguous();
  at::Tensor bf;
  if (bias_in.has_value()) bf = bias_in->to(at::kFloat).contiguous();
  at::Tensor cbf;
  std::vector<float> lut;
  std::vector<int64_t> off, basis;
  if (a.fsq) fsq_tables(levels, wdtype, lut, off, basis);
  else cbf = codebook_as_float(*codebook, wdtype);

  Plan pl{};
  pl.B = a.B; pl.gh = gh; pl.gw = gw; pl.p = patch; pl.C = a.C; pl.D = a.D; pl.R = a.R;
  pl.H = gh * patch; pl.W = gw * patch; pl.M = pl.W; pl.Mp = (pl.M + VW - 1) / VW * VW;
  pl.wt = wt.data_ptr<float>();
  pl.bias = bias_in.has_value() ? bf.data_ptr<float>() : nullptr;
  pl.lut = a.fsq ? lut.data() : nullptr;
  pl.lut_off = off.data();
  pl.basis = basis.data();
  pl.levels = levels.data();
  pl.cb = a.fsq ? nullptr : cbf.data_ptr<float>();

  auto go = [&](auto tag_out, auto tag_id) {
    using T = decltype(tag_out);
    using I = decltype(tag_id);
    const I* ip = ids.data_ptr<I>();
    T* op = out.data_ptr<T>();
    if (pl.bias) run_decode<T, I, true>(pl, ip, op);
    else run_decode<T, I, false>(pl, ip, op);
  };
  auto by_id = [&](auto tag_out) {
    if (ids.scalar_type() == at::kLong) go(tag_out, int64_t{});
    else go(tag_out, int32_t{});
  };
  if (wdtype == at::kFloat) by_id(float{});
  else if (wdtype == at::kBFloat16) by_id(c10::BFloat16{});
  else by_id(c10::Half{});
  return out;
}

// ids (any shape) -> float32 codes (..., len(levels)); exact FSQ digits, for tests and tooling.
at::Tensor fsq_codes(const at::Tensor& ids_in, const std::vector<int64_t>& levels) {
  if (ids_in.scalar_type() != at::kLong && ids_in.scalar_type() != at::kInt)
    throw pybind11::type_error(std::string("token ids must be int32/int64, got ") +
                               c10::toString(ids_in.scalar_type()));
  if (levels.empty()) throw pybind11::value_error("levels must not be empty");
  require_cpu(ids_in, "ids");
  int64_t ncodes = 0;
  check_levels(levels, ncodes);
  const at::Tensor ids = ids_in.contiguous();
  check_ids_cpu(ids, ncodes);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  const int64_t D = static_cast<int64_t>(levels.size());
  shape.push_back(D);
  at::Tensor out = at::empty(shape, ids.options().dtype(at::kFloat));
  std::vector<float> lut;
  std::vector<int64_t> off, basis;
  fsq_tables(levels, at::kFloat, lut, off, basis);
  float* op = out.data_ptr<float>();
  const int64_t n = ids.numel();
  auto fill = [&](auto* ip) {
    at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t id = static_cast<int64_t>(ip[i]);
        for (int64_t k = 0; k < D; ++k) op[i * D + k] = lut[off[k] + (id / basis[k]) % levels[k]];
      }
    });
  };
  if (ids.scalar_type() == at::kLong) fill(ids.data_ptr<int64_t>());
  else fill(ids.data_ptr<int32_t>());
  return out;
}

}  // namespace
}  // namespace vq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU vq_decode (token ids -> latent grid); see vla_rft_engine.ops.vq_decode";
  m.def("decode", &vq::decode, "ids (B, gh*gw) -> latents (B, C, gh*p, gw*p)", pybind11::arg("ids"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("gh"), pybind11::arg("gw"),
        pybind11::arg("patch"), pybind11::arg("levels"), pybind11::arg("codebook"));
  m.def("fsq_codes", &vq::fsq_codes, "FSQ ids -> float32 codes (..., len(levels))", pybind11::arg("ids"),
        pybind11::arg("levels"));
}
