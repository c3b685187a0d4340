// Shared by the CPU kernels in csrc/: one function body compiled per ISA (AVX-512, AVX2, baseline) and chosen at
// load time, and 16-lane vectors in GCC's vector extensions, lowered per clone (one zmm, two ymm or four xmm).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VLA_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#define VLA_INLINE __attribute__((always_inline)) inline  // inlined into each clone, so compiled for its ISA
#else
#define VLA_CLONES
#define VLA_INLINE inline
#endif

namespace vla_simd {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

VLA_INLINE v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace vla_simd
