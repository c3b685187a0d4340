// Argument checks shared by the CPU and CUDA bindings of vq_decode.
// Exception types follow the Python reference: bad values -> ValueError, bad dtypes -> TypeError.
#pragma once

#include <torch/extension.h>

#include <sstream>
#include <string>
#include <vector>

namespace vq {

struct DecodeArgs {
  int64_t B, gh, gw, p, C, D, R, ncodes;
  bool fsq;
};

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << (t.dim() == 1 ? ",)" : ")");
  return s.str();
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void throw_bad_ids(int64_t lo, int64_t hi, int64_t ncodes) {
  std::ostringstream s;
  s << "token ids out of range: got [" << lo << ", " << hi << "], codebook has " << ncodes
    << " codes (ids must be in [0, " << ncodes
    << "); vocabulary ids must have their offset removed first)";
  throw pybind11::value_error(s.str());
}

inline void check_levels(const std::vector<int64_t>& levels, int64_t& ncodes) {
  ncodes = 1;
  for (int64_t L : levels) {
    if (L < 2) throw pybind11::value_error("FSQ levels must all be >= 2");
    if (ncodes > (int64_t(1) << 40) / L) throw pybind11::value_error("FSQ levels: too many codes");
    ncodes *= L;
  }
}

// Validates everything except the id values; returns the derived sizes.
inline DecodeArgs check_decode_args(const at::Tensor& ids, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, int64_t gh, int64_t gw,
                                    int64_t patch, const std::vector<int64_t>& levels,
                                    const c10::optional<at::Tensor>& codebook) {
  DecodeArgs a{};
  a.fsq = !levels.empty();
  if (a.fsq == codebook.has_value())
    throw pybind11::value_error("give exactly one of levels (FSQ) or codebook (VQ)");
  if (ids.scalar_type() != at::kLong && ids.scalar_type() != at::kInt)
    throw pybind11::type_error(std::string("token ids must be int32/int64, got ") +
                               c10::toString(ids.scalar_type()));
  if (!is_float_dtype(weight.scalar_type()))
    throw pybind11::type_error(std::string("weight must be float32/float16/bfloat16, got ") +
                               c10::toString(weight.scalar_type()));
  if (gh <= 0 || gw <= 0 || patch <= 0) throw pybind11::value_error("grid and patch must be positive");
  if (a.fsq) {
    check_levels(levels, a.ncodes);
    a.D = static_cast<int64_t>(levels.size());
  } else {
    const auto& cb = *codebook;
    if (cb.dim() != 2) throw pybind11::value_error("codebook must be (num_codes, dim), got " + shape_str(cb));
    if (!is_float_dtype(cb.scalar_type()))
      throw pybind11::type_error(std::string("codebook must be a float tensor, got ") +
                                 c10::toString(cb.scalar_type()));
    if (cb.device() != weight.device())
      throw pybind11::value_error("codebook and weight must be on the same device");
    a.ncodes = cb.size(0);
    a.D = cb.size(1);
  }
  if (ids.dim() != 2 || ids.size(1) != gh * gw) {
    std::ostringstream s;
    s << "ids must be (B, " << gh * gw << ") for grid " << gh << "x" << gw << ", got " << shape_str(ids);
    throw pybind11::value_error(s.str());
  }
  if (weight.dim() != 2 || weight.size(1) != a.D || weight.size(0) % (patch * patch) || weight.size(0) == 0) {
    std::ostringstream s;
    s << "weight must be (C*" << patch << "*" << patch << ", " << a.D << "), got " << shape_str(weight);
    throw pybind11::value_error(s.str());
  }
  if (bias.has_value()) {
    const auto& b = *bias;
    if (b.dim() != 1 || b.size(0) != weight.size(0)) {
      std::ostringstream s;
      s << "bias must be (" << weight.size(0) << ",), got " << shape_str(b);
      throw pybind11::value_error(s.str());
    }
    if (b.scalar_type() != weight.scalar_type())
      throw pybind11::type_error("bias dtype must match weight dtype");
    if (b.device() != weight.device()) throw pybind11::value_error("bias and weight must be on the same device");
  }
  if (ids.device() != weight.device())
    throw pybind11::value_error("ids and weight must be on the same device, got " + ids.device().str() +
                                " and " + weight.device().str());
  a.B = ids.size(0);
  a.gh = gh;
  a.gw = gw;
  a.p = patch;
  a.R = weight.size(0);
  a.C = a.R / (patch * patch);
  return a;
}

// Codebook rows rounded through the weight dtype (as the reference does), kept as float32.
inline at::Tensor codebook_as_float(const at::Tensor& cb, at::ScalarType wdtype) {
  return cb.to(wdtype).to(at::kFloat).contiguous();
}

}  // namespace vq
