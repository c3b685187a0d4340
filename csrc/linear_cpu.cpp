// fp32 GEMM for the CPU decode step's few rows: out (M, N) = x (M, K) @ w.T, or out += x @ w.T (the residual add),
// w packed once per rollout. The kernel is csrc/linear_cpu.h; kernels/linear_cpu.py holds the launcher, and
// torch.mm is its reference.
//
// Why not MKL: at the CPU RFT shape (34 rows, K = 256/1024) a step's weights (~26 MB) have been pushed out of cache
// by the K/V pass before every GEMM, and MKL's kernels then run at about half their in-cache rate, pre-packed
// weights included (bench/results/cpu_inference_cpu.json, decode_gemms).
#include <torch/extension.h>

#include "linear_cpu.h"

namespace {

using vla_gemm::kCols;

torch::Tensor pack(torch::Tensor w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2,
              "linear_cpu.pack: the weight must be a 2-D fp32 CPU tensor (N, K)");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto out = torch::empty({(N + kCols - 1) / kCols, K, kCols}, w.options());
  vla_gemm::pack_panels(w.data_ptr<float>(), K, N, K, K, out.data_ptr<float>());
  return out;
}

void linear(torch::Tensor x, torch::Tensor packed, int64_t N, torch::Tensor out, bool accumulate) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "linear_cpu: x must be a contiguous 2-D fp32 CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), panels = (N + kCols - 1) / kCols;
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  packed.dim() == 3 && packed.size(0) == panels && packed.size(1) == K && packed.size(2) == kCols,
              "linear_cpu: packed must be linear_cpu.pack(w) of a weight (", N, ", ", K, ")");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == M && out.size(1) == N,
              "linear_cpu: out must be a contiguous fp32 (", M, ", ", N, ") tensor");
  vla_gemm::gemm(x.data_ptr<float>(), K, M, K, packed.data_ptr<float>(), K * kCols, N, out.data_ptr<float>(), N,
                 accumulate);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "pack a (N, K) fp32 weight into (ceil(N/32), K, 32) panels");
  m.def("linear", &linear, "out = x @ w.T (accumulate=False) or out += x @ w.T, w given packed");
}
