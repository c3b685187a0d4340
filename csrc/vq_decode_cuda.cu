// CUDA vq_decode: one thread per output pixel (b, y, x) and a tile of kChanTile channels.
// The thread decodes its token's code once into registers (FSQ digits or a codebook row), then writes
// out[b, c, y, x] for its channels; consecutive threads own consecutive x, so every store is coalesced.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a minimal toolkit lacks.
// Id validation happens on the device: a thread that meets an id outside [0, ncodes) sets an error
// flag and writes nothing; the host reads the flag after the launch (one 4-byte copy, which syncs the
// stream) and raises ValueError. The output is never returned when the flag is set.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "vq_decode_cuda.h"

namespace vq {
namespace {

constexpr int kThreads = 256;
constexpr int kChanTile = 16;  // channels per thread: one code decode amortised over 16 outputs

template <typename T> __device__ __forceinline__ T to_out(float x);
template <> __device__ __forceinline__ float to_out<float>(float x) { return x; }
template <> __device__ __forceinline__ __half to_out<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> __device__ __forceinline__ float from_out(T x);
template <> __device__ __forceinline__ float from_out<float>(float x) { return x; }
template <> __device__ __forceinline__ float from_out<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float from_out<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// Same value as the reference's fp32 (d - L//2) / (L//2), rounded through the weight dtype.
// __fdiv_rn keeps the division IEEE-exact under --use_fast_math.
template <typename T>
__device__ __forceinline__ float fsq_code(int d, int L) {
  const int half = L / 2;
  return from_out<T>(to_out<T>(__fdiv_rn(static_cast<float>(d - half), static_cast<float>(half))));
}

// FSQ codes or codebook row -> registers (D <= kMaxD). Returns false on a bad id.
template <typename T, typename I>
__device__ __forceinline__ bool load_code(I raw, const FsqLevels& fsq, const float* __restrict__ cb, int D,
                                          int64_t ncodes, float (&code)[kMaxD]) {
  const int64_t id = static_cast<int64_t>(raw);
  if (id < 0 || id >= ncodes) return false;
  if (cb == nullptr) {
    uint32_t q = static_cast<uint32_t>(id);  // ncodes < 2^31 is checked on the host
#pragma unroll
    for (int k = 0; k < kMaxD; ++k) {
      if (k < D) {
        const uint32_t L = static_cast<uint32_t>(fsq.levels[k]);
        code[k] = fsq_code<T>(static_cast<int>(q % L), static_cast<int>(L));
        q /= L;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kMaxD; ++k)
      if (k < D) code[k] = __ldg(cb + id * D + k);
  }
  return true;
}

template <typename T, bool HasBias>
__device__ __forceinline__ T finish(float acc, const float* __restrict__ bias, int r) {
  // Matches the reference's two roundings for half types: T(codes @ W.T), then T(y + b).
  if (HasBias) return to_out<T>(from_out<T>(to_out<T>(acc)) + __ldg(bias + r));
  return to_out<T>(acc);
}

template <typename T, typename I, bool HasBias>
__global__ void __launch_bounds__(kThreads) decode_kernel(
    const I* __restrict__ ids, const float* __restrict__ w, const float* __restrict__ bias,
    const float* __restrict__ cb, FsqLevels fsq, int D, int64_t ncodes, int64_t B, int gh, int gw, int p,
    int C, T* __restrict__ out, int* __restrict__ err) {
  const int Wd = gw * p;
  const int64_t HW = static_cast<int64_t>(gh) * p * Wd;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= B * HW) return;
  const int64_t b = pos / HW;
  const int rem = static_cast<int>(pos - b * HW);
  const int yy = rem / Wd, xx = rem - (rem / Wd) * Wd;
  const int i = yy / p, u = yy - i * p, j = xx / p, v = xx - j * p;
  const I raw = ids[b * gh * gw + static_cast<int64_t>(i) * gw + j];
  const int c0 = blockIdx.y * kChanTile;
  const int c1 = min(C, c0 + kChanTile);
  T* o = out + (b * C + c0) * HW + rem;

  if (D <= kMaxD) {
    float code[kMaxD];
    if (!load_code<T>(raw, fsq, cb, D, ncodes, code)) {
      atomicOr(err, 1);
      return;
    }
    for (int c = c0; c < c1; ++c, o += HW) {
      const int r = (c * p + u) * p + v;
      const float* wr = w + static_cast<int64_t>(r) * D;
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < kMaxD; ++k)
        if (k < D) acc = fmaf(__ldg(wr + k), code[k], acc);
      *o = finish<T, HasBias>(acc, bias, r);
    }
  } else {  // wide codebooks (VQ only): read the code row from global/L1 in the dot product
    const int64_t id = static_cast<int64_t>(raw);
    if (id < 0 || id >= ncodes) {
      atomicOr(err, 1);
      return;
    }
    const float* cr = cb + id * D;
    for (int c = c0; c < c1; ++c, o += HW) {
      const int r = (c * p + u) * p + v;
      const float* wr = w + static_cast<int64_t>(r) * D;
      float acc = 0.f;
      for (int k = 0; k < D; ++k) acc = fmaf(__ldg(wr + k), __ldg(cr + k), acc);
      *o = finish<T, HasBias>(acc, bias, r);
    }
  }
}

template <typename I>
__global__ void fsq_codes_kernel(const I* __restrict__ ids, FsqLevels fsq, int D, int64_t ncodes, int64_t n,
                                 float* __restrict__ out, int* __restrict__ err) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  float code[kMaxD];
  if (!load_code<float>(ids[t], fsq, nullptr, D, ncodes, code)) {
    atomicOr(err, 1);
    return;
  }
#pragma unroll
  for (int k = 0; k < kMaxD; ++k)
    if (k < D) out[t * D + k] = code[k];
}

template <typename T>
struct CudaType { using type = T; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename T, typename I>
void launch_typed(const CudaDecode& a, cudaStream_t stream) {
  using CT = typename CudaType<T>::type;
  const int64_t total = a.B * a.gh * a.p * a.gw * a.p;
  const dim3 grid(static_cast<unsigned>((total + kThreads - 1) / kThreads),
                  static_cast<unsigned>((a.C + kChanTile - 1) / kChanTile));
  const I* ip = a.ids.data_ptr<I>();
  CT* op = reinterpret_cast<CT*>(a.out.data_ptr<T>());
  const float* bp = a.bias.defined() ? a.bias.data_ptr<float>() : nullptr;
  const float* cbp = a.codebook.defined() ? a.codebook.data_ptr<float>() : nullptr;
  int* ep = a.err.data_ptr<int>();
  if (bp)
    decode_kernel<CT, I, true><<<grid, kThreads, 0, stream>>>(ip, a.weight.data_ptr<float>(), bp, cbp, a.fsq,
                                                              a.D, a.ncodes, a.B, a.gh, a.gw, a.p, a.C, op, ep);
  else
    decode_kernel<CT, I, false><<<grid, kThreads, 0, stream>>>(ip, a.weight.data_ptr<float>(), bp, cbp, a.fsq,
                                                               a.D, a.ncodes, a.B, a.gh, a.gw, a.p, a.C, op, ep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename I>
void launch_by_out(const CudaDecode& a, cudaStream_t s) {
  switch (a.out.scalar_type()) {
    case at::kFloat: launch_typed<float, I>(a, s); break;
    case at::kHalf: launch_typed<c10::Half, I>(a, s); break;
    case at::kBFloat16: launch_typed<c10::BFloat16, I>(a, s); break;
    default: TORCH_CHECK(false, "vq_decode: unsupported output dtype");
  }
}

}  // namespace

void launch_decode(const CudaDecode& a) {
  // Grid limits: x blocks fit in 2^31-1 for any tensor that fits in memory; y = C / 16.
  TORCH_CHECK((a.C + kChanTile - 1) / kChanTile <= 65535, "vq_decode: too many channels");
  cudaStream_t s = c10::cuda::getCurrentCUDAStream();
  if (a.ids.scalar_type() == at::kLong) launch_by_out<int64_t>(a, s);
  else launch_by_out<int32_t>(a, s);
}

void launch_fsq_codes(const at::Tensor& ids, const FsqLevels& fsq, int D, int64_t ncodes, at::Tensor& out,
                      at::Tensor& err) {
  const int64_t n = ids.numel();
  if (n == 0) return;
  cudaStream_t s = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  if (ids.scalar_type() == at::kLong)
    fsq_codes_kernel<int64_t><<<blocks, kThreads, 0, s>>>(ids.data_ptr<int64_t>(), fsq, D, ncodes, n,
                                                          out.data_ptr<float>(), err.data_ptr<int>());
  else
    fsq_codes_kernel<int32_t><<<blocks, kThreads, 0, s>>>(ids.data_ptr<int32_t>(), fsq, D, ncodes, n,
                                                          out.data_ptr<float>(), err.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vq
