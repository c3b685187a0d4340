// Interface between the pybind11 binding (host C++) and the CUDA kernels (nvcc), kept free of pybind11.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace vq {

constexpr int kMaxD = 16;  // code width held in registers; FSQ must fit, wider VQ codebooks use a slower path

struct FsqLevels {
  int levels[kMaxD];
};

struct CudaDecode {
  at::Tensor ids;       // (B, gh*gw) int32/int64, contiguous
  at::Tensor weight;    // (R, D) float32, contiguous
  at::Tensor bias;      // (R) float32 or undefined
  at::Tensor codebook;  // (ncodes, D) float32 or undefined (FSQ)
  at::Tensor out;       // (B, C, gh*p, gw*p), weight dtype
  at::Tensor err;       // (1) int32 zero; set to 1 by the kernel on a bad id
  FsqLevels fsq;
  int D;
  int64_t ncodes, B;
  int gh, gw, p, C;
};

void launch_decode(const CudaDecode& a);
void launch_fsq_codes(const at::Tensor& ids, const FsqLevels& fsq, int D, int64_t ncodes, at::Tensor& out,
                      at::Tensor& err);

}  // namespace vq
