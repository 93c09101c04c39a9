// Torch-free interface of the CUDA kernels: raw pointers, sizes and a stream, so that
// persona_kernels.cu compiles with plain `nvcc -c` on machines whose torch has no CUDA
// headers, and the torch binding (binding.cpp) stays a thin layer of checks.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace personakern_cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Clamp projections are held in registers and reduced in one round, so their count is
// bounded; readouts are reduced in rounds of this many and are unbounded.
constexpr int kMaxProj = 8;

// One launch serves all four ops of personakern/backends/native.py, which are special cases
// of one row pipeline:
//   h   = round(a + b)                        (b optional; the sum is exact in fp32)
//   h32 = float(h) + coef'[n, :] @ steer      (S may be 0)
//         coef'[n, s] = coef[n, s] if <float(h), gate_s> > gate_thr[n, s] (when gate is
//         given; S <= kMaxProj then), else coef[n, s]
//   h32 -= sum_k (p_k - clamp(p_k, lo, hi)) c_k,  p_k = <h32, c_k> before any subtraction
//   readings[n, m] = <h32, readout_m>;  out = round(h32)
//   normed = rmsnorm(float(out)) * w   (llama) or * (1 + w) (gemma), when weight is given.
// Row tensors (a, b, out, normed) are [rows, dim] row-major in `dtype`, weight is [dim] in
// `dtype`; every float pointer is float32: steer [S, dim], coef [rows, S], clamp [C, dim],
// lo/hi [rows, C], readout [M, dim], readings [rows, M]. Optional pointers may be null
// (their count must then be 0); `out` null means the row output is not wanted (rms_norm).
struct RowsParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t dim = 0;
  const void* a = nullptr;
  const void* b = nullptr;
  const void* weight = nullptr;
  void* out = nullptr;
  void* normed = nullptr;
  float eps = 0.f;
  bool gemma = false;
  const float* steer = nullptr;
  const float* coef = nullptr;
  int32_t num_steer = 0;
  const float* gate = nullptr;      // [S, dim] unit vectors, or null (unconditional steering)
  const float* gate_thr = nullptr;  // [rows, S]
  const float* clamp = nullptr;
  const float* clamp_lo = nullptr;
  const float* clamp_hi = nullptr;
  int32_t num_clamp = 0;
  const float* readout = nullptr;
  float* readings = nullptr;
  int32_t num_readout = 0;
};

// Enqueues the kernel on `stream`. Returns cudaErrorInvalidValue for inconsistent
// parameters (num_clamp > kMaxProj, gated num_steer > kMaxProj, a missing pointer for a nonzero count) and otherwise the
// launch status.
cudaError_t launch_rows(const RowsParams& p, cudaStream_t stream);

}  // namespace personakern_cuda
