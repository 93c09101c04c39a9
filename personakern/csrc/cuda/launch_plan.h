// The shape of a rows_kernel launch (persona_kernels.cu), decided from sizes alone. Plain C++
// with no CUDA header, so tests compile it with the host compiler and check the decision on
// machines without a GPU (tests/test_cuda_launch_plan.py).
#pragma once

#include <cstddef>
#include <cstdint>

namespace personakern_cuda {
namespace launch {

constexpr int kWarp = 32;
// 512 rather than 1024 so that __launch_bounds__ leaves 128 registers a thread: the
// projection accumulators live in registers.
constexpr int kMaxThreads = 512;
constexpr int kVecsPerThread = 4;
constexpr int kWarpRowMaxVecs = kWarp * kVecsPerThread;
constexpr int kRowsPerWarpBlock = 4;
// Threads that keep a GPU's memory busy (an H100/H200 holds 132 SMs x 2048). A launch whose
// rows, at kVecsPerThread vectors a thread, give fewer threads than this (decode: a handful of
// rows) spreads each row over a thread per vector instead: the row's passes then take one
// memory latency each rather than kVecsPerThread.
constexpr int64_t kFillThreads = 65536;

struct Plan {
  int group = 0;             // threads per row: one warp, or a block of up to kMaxThreads
  int rows_per_block = 0;
  bool cached = false;       // the fp32 rows stay in dynamic shared memory between passes
  size_t dynamic_smem = 0;   // bytes of dynamic shared memory the launch asks for
  bool opt_in = false;       // the kernel must first be allowed dynamic_smem
                             // (cudaFuncAttributeMaxDynamicSharedMemorySize)
};

// dim: the row length; vec: elements per vector access; static_smem: the kernel's own
// __shared__ arrays (cudaFuncAttributes::sharedSizeBytes); default_limit: what a block may use
// without asking (cudaDevAttrMaxSharedMemoryPerBlock, 48 KB); optin_limit: what it may use when
// the kernel is allowed more (cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KB on H100/H200,
// 163 KB on A100, 0 if unknown). Both limits bound the static and the dynamic memory together,
// so the sum is what is compared: a row cache that fits in 48 KB on its own can still take the
// block past 48 KB. Rows whose cache fits nowhere are recomputed from global memory instead.
// rows: the launch's row count; -1 (unknown) plans for many rows.
inline Plan plan(int64_t dim, int vec, size_t static_smem, size_t default_limit, size_t optin_limit,
                 int64_t rows = -1) {
  Plan p;
  const int64_t nvec = dim / vec;
  if (nvec <= kWarpRowMaxVecs) {
    p.group = kWarp;
    p.rows_per_block = kRowsPerWarpBlock;
  } else {
    int64_t want = (nvec + kVecsPerThread - 1) / kVecsPerThread;
    if (rows >= 0 && rows * want < kFillThreads) want = nvec;
    const int64_t rounded = (want + kWarp - 1) / kWarp * kWarp;
    p.group = static_cast<int>(rounded < kMaxThreads ? rounded : kMaxThreads);
    p.rows_per_block = 1;
  }
  const size_t rows_bytes = static_cast<size_t>(p.rows_per_block) * static_cast<size_t>(dim) * sizeof(float);
  const size_t total = rows_bytes + static_smem;
  if (total <= default_limit || total <= optin_limit) {
    p.cached = true;
    p.dynamic_smem = rows_bytes;
    p.opt_in = total > default_limit;
  }
  return p;
}

}  // namespace launch
}  // namespace personakern_cuda
