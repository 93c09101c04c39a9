// Device helpers of persona_kernels.cu: dtype conversions, vector accesses, reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace personakern_cuda {
namespace detail {

constexpr int kWarp = 32;

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// One round-to-nearest-even to the model dtype, as torch's casts do.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return Cvt<T>::to(Cvt<T>::from(x));
}

// VEC elements of T as one aligned aggregate: a 16-byte access when VEC * sizeof(T) == 16,
// and, unlike a cast through uint4, no type punning for the optimiser to break.
template <typename T, int VEC>
struct alignas(VEC * sizeof(T)) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_t(const T* __restrict__ p, float (&o)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) o[j] = Cvt<T>::to(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_t(T* __restrict__ p, const float (&v)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = Cvt<T>::from(v[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

template <int VEC>
__device__ __forceinline__ void load_f(const float* __restrict__ p, float (&o)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(p)[q];
      o[4 * q] = f.x;
      o[4 * q + 1] = f.y;
      o[4 * q + 2] = f.z;
      o[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = p[j];
  }
}

template <int VEC>
__device__ __forceinline__ void store_f(float* __restrict__ p, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      reinterpret_cast<float4*>(p)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = v[j];
  }
}

template <int VEC>
__device__ __forceinline__ float dot_acc(float acc, const float (&v)[VEC], const float* __restrict__ u) {
  float w[VEC];
  load_f<VEC>(u, w);
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc = fmaf(v[j], w[j], acc);
  return acc;
}

// torch.minimum / torch.maximum propagate NaN where fminf / fmaxf drop it.
__device__ __forceinline__ float nan_min(float a, float b) {
  return (isnan(a) || isnan(b)) ? __int_as_float(0x7fc00000) : fminf(a, b);
}
__device__ __forceinline__ float nan_max(float a, float b) {
  return (isnan(a) || isnan(b)) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
}

// Sums v[0..n) over the row's group; every thread gets the totals. The xor butterfly gives
// every lane bit-identical sums (each step adds the same two values, in either order), so
// all threads apply the same clamp corrections.
template <int NV>
__device__ __forceinline__ void group_sum(float (&v)[NV], int n, float* scratch, int warps) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    if (k < n) {
#pragma unroll
      for (int off = kWarp / 2; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
    }
  }
  if (warps > 1) {
    const int warp = threadIdx.x / kWarp;
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int k = 0; k < NV; ++k)
        if (k < n) scratch[warp * NV + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (k < n) {
        float s = 0.f;
        for (int w = 0; w < warps; ++w) s += scratch[w * NV + k];
        v[k] = s;
      }
    }
    __syncthreads();  // scratch is reused by the next reduction
  }
}

}  // namespace detail
}  // namespace personakern_cuda
