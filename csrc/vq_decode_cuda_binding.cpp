// pybind11 binding of the CUDA vq_decode (module vla_rft_engine._vq_cuda): checks, then launch.
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "vq_decode_common.h"
#include "vq_decode_cuda.h"

namespace vq {
namespace {

void require_cuda(const at::Tensor& t, const char* name) {
  if (!t.is_cuda())
    throw pybind11::value_error(std::string(name) + " must be a CUDA tensor for _vq_cuda, got " + t.device().str());
}

FsqLevels pack_levels(const std::vector<int64_t>& levels, int64_t ncodes) {
  if (static_cast<int64_t>(levels.size()) > kMaxD)
    throw pybind11::value_error("the CUDA kernel supports at most 16 FSQ levels");
  if (ncodes > std::numeric_limits<int32_t>::max())
    throw pybind11::value_error("the CUDA kernel supports at most 2^31-1 FSQ codes");
  FsqLevels f{};
  for (size_t k = 0; k < levels.size(); ++k) f.levels[k] = static_cast<int>(levels[k]);
  return f;
}

// The kernel only flags bad ids; the message with the actual range is built here, on the error path.
void raise_if_flagged(const at::Tensor& err, const at::Tensor& ids, int64_t ncodes) {
  if (err.item<int>() != 0) throw_bad_ids(ids.min().item<int64_t>(), ids.max().item<int64_t>(), ncodes);
}

at::Tensor decode(const at::Tensor& ids_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
                  int64_t gh, int64_t gw, int64_t patch, const std::vector<int64_t>& levels,
                  const c10::optional<at::Tensor>& codebook) {
  const DecodeArgs a = check_decode_args(ids_in, weight_in, bias_in, gh, gw, patch, levels, codebook);
  require_cuda(ids_in, "ids");
  require_cuda(weight_in, "weight");
  const c10::cuda::CUDAGuard guard(weight_in.device());
  CudaDecode d;
  d.fsq = a.fsq ? pack_levels(levels, a.ncodes) : FsqLevels{};
  d.ids = ids_in.contiguous();
  d.weight = weight_in.to(at::kFloat).contiguous();
  if (bias_in.has_value()) d.bias = bias_in->to(at::kFloat).contiguous();
  if (!a.fsq) d.codebook = codebook_as_float(*codebook, weight_in.scalar_type());
  d.out = at::empty({a.B, a.C, gh * patch, gw * patch}, weight_in.options());
  if (d.out.numel() == 0) return d.out;
  d.err = at::zeros({1}, weight_in.options().dtype(at::kInt));
  d.D = static_cast<int>(a.D);
  d.ncodes = a.ncodes;
  d.B = a.B;
  d.gh = static_cast<int>(gh);
  d.gw = static_cast<int>(gw);
  d.p = static_cast<int>(patch);
  d.C = static_cast<int>(a.C);
  launch_decode(d);
  raise_if_flagged(d.err, d.ids, a.ncodes);
  return d.out;
}

at::Tensor fsq_codes(const at::Tensor& ids_in, const std::vector<int64_t>& levels) {
  if (ids_in.scalar_type() != at::kLong && ids_in.scalar_type() != at::kInt)
    throw pybind11::type_error(std::string("token ids must be int32/int64, got ") +
                               c10::toString(ids_in.scalar_type()));
  if (levels.empty()) throw pybind11::value_error("levels must not be empty");
  require_cuda(ids_in, "ids");
  const c10::cuda::CUDAGuard guard(ids_in.device());
  int64_t ncodes = 0;
  check_levels(levels, ncodes);
  const FsqLevels f = pack_levels(levels, ncodes);
  const at::Tensor ids = ids_in.contiguous();
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(static_cast<int64_t>(levels.size()));
  at::Tensor out = at::empty(shape, ids.options().dtype(at::kFloat));
  at::Tensor err = at::zeros({1}, ids.options().dtype(at::kInt));
  launch_fsq_codes(ids, f, static_cast<int>(levels.size()), ncodes, out, err);
  if (ids.numel()) raise_if_flagged(err, ids, ncodes);
  return out;
}

}  // namespace
}  // namespace vq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA vq_decode (token ids -> latent grid); see vla_rft_engine.ops.vq_decode";
  m.def("decode", &vq::decode, "ids (B, gh*gw) -> latents (B, C, gh*p, gw*p)", pybind11::arg("ids"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("gh"), pybind11::arg("gw"),
        pybind11::arg("patch"), pybind11::arg("levels"), pybind11::arg("codebook"));
  m.def("fsq_codes", &vq::fsq_codes, "FSQ ids -> float32 codes (..., len(levels))", pybind11::arg("ids"),
        pybind11::arg("levels"));
}
