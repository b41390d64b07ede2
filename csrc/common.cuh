// Device helpers shared by the rmt_fast kernels: dtype conversion and warp reductions. No torch.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rmt_fast_kernels.h"

namespace rmt_fast {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// Explicit conversions only: torch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// bfloat16 through bit operations, so the same code builds for sm_61 (no native bf16 before sm_80).
__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

__device__ __forceinline__ uint16_t float_to_bf16_bits(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

// Element i of a buffer whose dtype is only known at run time (memory-bound kernels: the branch is uniform).
__device__ __forceinline__ float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, DType t, int64_t i, float x) {
  switch (t) {
    case DType::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(x);
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(x);
      break;
    default:
      static_cast<float*>(p)[i] = x;
  }
}

// x rounded to dtype t and back: what a PyTorch `.to(t)` does to the value.
__device__ __forceinline__ float round_to(DType t, float x) {
  switch (t) {
    case DType::kFloat16:
      return __half2float(__float2half_rn(x));
    case DType::kBFloat16:
      return bf16_bits_to_float(float_to_bf16_bits(x));
    default:
      return x;
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

}  // namespace detail
}  // namespace rmt_fast
