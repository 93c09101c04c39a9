// Fused row kernels of the CUDA backend; the contract is personakern/backends/native.py and
// persona_kernels.h. No torch headers here: this file must compile with plain `nvcc -c`.
//
// A row is owned by a group of threads (one warp for short rows, several rows per block; a
// whole block otherwise). Every pass over the row maps element chunk j to the same thread,
// so the fp32 row cached in shared memory needs no barrier between passes: a thread only
// ever reads back what it wrote. Global memory is then read once and written once; rows
// too long for shared memory are recomputed from global memory in each pass instead (same
// arithmetic, so the same values).
#include "persona_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>

#include "launch_plan.h"
#include "row_utils.cuh"

namespace personakern_cuda {
namespace {

using namespace detail;
using launch::kMaxThreads;
using launch::kRowsPerWarpBlock;
using launch::kVecsPerThread;
static_assert(launch::kWarp == kWarp, "launch_plan.h and row_utils.cuh disagree on the warp size");

constexpr int kScratch = (kMaxThreads / kWarp) * (kMaxProj + 1);

template <typename T>
struct Args {
  const T* a;
  const T* b;
  const T* weight;
  T* out;
  T* normed;
  const float* steer;
  const float* coef;
  const float* gate;
  const float* gate_thr;
  const float* clamp;
  const float* lo;
  const float* hi;
  const float* readout;
  float* readings;
  int64_t rows;
  int64_t dim;
  int S;
  int C;
  int M;
  float eps;
  float inv_dim;
  bool gemma;
  bool cached;
  int group;
  int rows_per_block;
};

// h32 of elements [i, i + VEC) before clamping: round(a + b), then the steering sum added
// as one term, the order of native's `h32 + coef @ steer`. `coef` is the row's (possibly
// gated) coefficients, null for no steering.
template <typename T, int VEC>
__device__ __forceinline__ void compute_h(const Args<T>& p, int64_t row, int64_t i, const float* coef,
                                          float (&v)[VEC]) {
  const int64_t off = row * p.dim + i;
  load_t<T, VEC>(p.a + off, v);
  if (p.b != nullptr) {
    float d[VEC];
    load_t<T, VEC>(p.b + off, d);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = round_to<T>(v[j] + d[j]);
  }
  if (coef != nullptr) {
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    for (int s = 0; s < p.S; ++s) {
      const float c = coef[s];
      float w[VEC];
      load_f<VEC>(p.steer + s * p.dim + i, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = fmaf(c, w[j], acc[j]);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] += acc[j];
  }
}

// h32 -= excess @ clamp, the correction summed first as native does.
template <typename T, int VEC>
__device__ __forceinline__ void apply_clamp(const Args<T>& p, int64_t i, const float* ex, float (&v)[VEC]) {
  float corr[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) corr[j] = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxProj; ++k) {
    if (k < p.C) {
      float c[VEC];
      load_f<VEC>(p.clamp + k * p.dim + i, c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) corr[j] = fmaf(ex[k], c[j], corr[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] -= corr[j];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) rows_kernel(const Args<T> p) {
  extern __shared__ float4 dyn_smem[];
  __shared__ float scratch[kScratch];

  const int group = p.group;
  const int g = threadIdx.x / group;
  const int t = threadIdx.x % group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * p.rows_per_block + g;
  // Only whole warps leave: several rows share a block only in warp-per-row mode, which
  // never reaches a block barrier.
  if (row >= p.rows) return;
  const int warps = group / kWarp;
  const int64_t nvec = p.dim / VEC;
  // Chunks whose loads a thread issues together. Measured on an H200 (benchmarks/results/gpu):
  // for 2-byte types this cut decode-size GPU time by a third and kept prefill sizes level; for
  // fp32 (64 registers, now spilling) it cost 6-22 % at 16384 rows. fp32 takes none: the plain
  // loops below. Even a batch of one (a peeled first chunk) took fp32 to 66 registers, fewer
  // resident warps, and 19-28 % more GPU time at 16384 x 4096 than the plain loops.
  constexpr int kBatch = sizeof(T) == 2 ? kVecsPerThread : 0;
  float* cache = p.cached ? reinterpret_cast<float*>(dyn_smem) + g * p.dim : nullptr;
  const float* coef = p.S > 0 ? p.coef + row * p.S : nullptr;

  // Conditional steering: project the unsteered row on the gate vectors, then steer with
  // the coefficients whose gate is open.
  __shared__ float gated_rows[kRowsPerWarpBlock][kMaxProj];
  if (coef != nullptr && p.gate != nullptr) {
    float proj[kMaxProj];
#pragma unroll
    for (int k = 0; k < kMaxProj; ++k) proj[k] = 0.f;
    for (int64_t j = t; j < nvec; j += group) {
      const int64_t i = j * VEC;
      float v[VEC];
      compute_h<T, VEC>(p, row, i, nullptr, v);
#pragma unroll
      for (int k = 0; k < kMaxProj; ++k)
        if (k < p.S) proj[k] = dot_acc<VEC>(proj[k], v, p.gate + k * p.dim + i);
    }
    group_sum(proj, p.S, scratch, warps);
    float* gated = gated_rows[g];
    if (t == 0) {
      const float* thr = p.gate_thr + row * p.S;
#pragma unroll
      for (int k = 0; k < kMaxProj; ++k)
        if (k < p.S) gated[k] = proj[k] > thr[k] ? coef[k] : 0.f;
    }
    if (warps > 1) {
      __syncthreads();
    } else {
      __syncwarp();
    }
    coef = gated;
  }

  if (cache != nullptr) {
    // The thread's first kBatch chunks (all of them, as the launch plan sizes groups, except on
    // rows wider than kMaxThreads * kVecsPerThread vectors) are loaded together, then stored:
    // their global loads are in flight at once rather than one latency each.
    if constexpr (kBatch > 0) {
      float v[kBatch][VEC];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t j = t + static_cast<int64_t>(u) * group;
        if (j < nvec) compute_h<T, VEC>(p, row, j * VEC, coef, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t j = t + static_cast<int64_t>(u) * group;
        if (j < nvec) store_f<VEC>(cache + j * VEC, v[u]);
      }
    }
    for (int64_t j = t + static_cast<int64_t>(kBatch) * group; j < nvec; j += group) {
      float w[VEC];
      compute_h<T, VEC>(p, row, j * VEC, coef, w);
      store_f<VEC>(cache + j * VEC, w);
    }
  }

  // The clamp excesses of the row, in shared memory rather than registers: registers bound
  // the occupancy of this memory-bound kernel.
  __shared__ float ex_rows[kRowsPerWarpBlock][kMaxProj];
  float* ex = ex_rows[g];
  if (p.C > 0) {
    // All projections from the same steered row, reduced together; only then the row moves.
    float proj[kMaxProj];
#pragma unroll
    for (int k = 0; k < kMaxProj; ++k) proj[k] = 0.f;
    for (int64_t j = t; j < nvec; j += group) {
      const int64_t i = j * VEC;
      float v[VEC];
      if (cache != nullptr) {
        load_f<VEC>(cache + i, v);
      } else {
        compute_h<T, VEC>(p, row, i, coef, v);
      }
#pragma unroll
      for (int k = 0; k < kMaxProj; ++k)
        if (k < p.C) proj[k] = dot_acc<VEC>(proj[k], v, p.clamp + k * p.dim + i);
    }
    group_sum(proj, p.C, scratch, warps);
    const float* lo = p.lo + row * p.C;
    const float* hi = p.hi + row * p.C;
    if (t == 0) {
#pragma unroll
      for (int k = 0; k < kMaxProj; ++k)
        if (k < p.C) ex[k] = proj[k] - nan_max(nan_min(proj[k], hi[k]), lo[k]);
    }
    if (warps > 1) {
      __syncthreads();
    } else {
      __syncwarp();
    }
    if (cache != nullptr) {
      for (int64_t j = t; j < nvec; j += group) {
        const int64_t i = j * VEC;
        float v[VEC];
        load_f<VEC>(cache + i, v);
        apply_clamp<T, VEC>(p, i, ex, v);
        store_f<VEC>(cache + i, v);
      }
    }
  }

  auto final_h = [&](int64_t i, float (&v)[VEC]) {
    if (cache != nullptr) {
      load_f<VEC>(cache + i, v);
    } else {
      compute_h<T, VEC>(p, row, i, coef, v);
      if (p.C > 0) apply_clamp<T, VEC>(p, i, ex, v);
    }
  };

  // Readouts in rounds of kMaxProj; the first round also writes the row output and sums
  // the squares of the rounded output for the norm.
  const bool norm = p.normed != nullptr;
  float inv_rms = 0.f;
  for (int m0 = 0; m0 == 0 || m0 < p.M; m0 += kMaxProj) {
    const bool first = m0 == 0;
    const int mc = min(kMaxProj, p.M - m0);
    float acc[kMaxProj + 1];  // [0]: sum of squares, [1 + k]: readout m0 + k
#pragma unroll
    for (int k = 0; k <= kMaxProj; ++k) acc[k] = 0.f;
    for (int64_t j = t; j < nvec; j += group) {
      const int64_t i = j * VEC;
      float v[VEC];
      final_h(i, v);
      if (first) {
        float r[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) r[e] = round_to<T>(v[e]);
        if (p.out != nullptr) store_t<T, VEC>(p.out + row * p.dim + i, r);
        if (norm) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[0] = fmaf(r[e], r[e], acc[0]);
        }
      }
#pragma unroll
      for (int k = 0; k < kMaxProj; ++k)
        if (k < mc) acc[1 + k] = dot_acc<VEC>(acc[1 + k], v, p.readout + (m0 + k) * p.dim + i);
    }
    if (mc > 0 || (first && norm)) {
      group_sum(acc, 1 + (mc > 0 ? mc : 0), scratch, warps);
      if (t == 0) {
        for (int k = 0; k < mc; ++k) p.readings[row * p.M + m0 + k] = acc[1 + k];
      }
      // mean as torch computes it on CUDA: the sum times a float 1/D
      if (first && norm) inv_rms = rsqrtf(acc[0] * p.inv_dim + p.eps);
    }
  }

  if (norm) {
    auto normed = [&](int64_t i, const float (&w)[VEC]) {
      float v[VEC], o[VEC];
      final_h(i, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float x = round_to<T>(v[e]);
        // llama: normalise, round to the dtype, multiply by w in the dtype (store rounds);
        // gemma: scale by (1 + w) in fp32 and round once.
        o[e] = p.gemma ? (x * inv_rms) * (1.f + w[e]) : w[e] * round_to<T>(x * inv_rms);
      }
      store_t<T, VEC>(p.normed + row * p.dim + i, o);
    };
    // the weight chunks loaded together first, as the rows were
    if constexpr (kBatch > 0) {
      float w[kBatch][VEC];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t j = t + static_cast<int64_t>(u) * group;
        if (j < nvec) load_t<T, VEC>(p.weight + j * VEC, w[u]);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t j = t + static_cast<int64_t>(u) * group;
        if (j < nvec) normed(j * VEC, w[u]);
      }
    }
    for (int64_t j = t + static_cast<int64_t>(kBatch) * group; j < nvec; j += group) {
      float wt[VEC];
      load_t<T, VEC>(p.weight + j * VEC, wt);
      normed(j * VEC, wt);
    }
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// The error a call returned, taken off the thread's last-error slot too: the caller gets it as
// a return value (the binding raises it), so a later cudaGetLastError elsewhere, torch's
// launch checks included, must not report it a second time.
cudaError_t take(cudaError_t err) {
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

// The kernel's static shared memory (its __shared__ arrays) on `device`, queried once per
// device: a runtime query on every launch would cost more than a decode-shape kernel.
template <typename T, int VEC>
cudaError_t static_smem(int device, size_t* bytes) {
  constexpr int kDevices = 64;
  static std::atomic<int64_t> known[kDevices];  // bytes + 1; 0 until queried
  const bool slot = device >= 0 && device < kDevices;
  if (slot) {
    const int64_t v = known[device].load(std::memory_order_relaxed);
    if (v > 0) {
      *bytes = static_cast<size_t>(v - 1);
      return cudaSuccess;
    }
  }
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, rows_kernel<T, VEC>);
  if (err != cudaSuccess) return take(err);  // e.g. no kernel image for this GPU
  *bytes = attr.sharedSizeBytes;
  if (slot) known[device].store(static_cast<int64_t>(attr.sharedSizeBytes) + 1, std::memory_order_relaxed);
  return cudaSuccess;
}

template <typename T, int VEC>
cudaError_t launch_typed(Args<T> p, cudaStream_t stream) {
  int device = 0, default_limit = 0, optin = 0;
  size_t static_bytes = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = static_smem<T, VEC>(device, &static_bytes);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&default_limit, cudaDevAttrMaxSharedMemoryPerBlock, device);
  if (err != cudaSuccess) return take(err);
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    optin = 0;  // unknown: stay within the default limit
  }
  launch::Plan plan = launch::plan(p.dim, VEC, static_bytes, static_cast<size_t>(default_limit),
                                   static_cast<size_t>(optin), p.rows);
  if (plan.opt_in && cudaFuncSetAttribute(rows_kernel<T, VEC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(plan.dynamic_smem)) != cudaSuccess) {
    (void)cudaGetLastError();  // refused: not an error of this launch, recompute the rows instead
    plan = launch::plan(p.dim, VEC, static_bytes, static_cast<size_t>(default_limit), 0, p.rows);
  }
  p.group = plan.group;
  p.rows_per_block = plan.rows_per_block;
  p.cached = plan.cached;
  const int64_t blocks = (p.rows + p.rows_per_block - 1) / p.rows_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(p.group * p.rows_per_block));
  config.dynamicSmemBytes = plan.dynamic_smem;
  config.stream = stream;
  // cudaLaunchKernelEx returns this launch's own error (too much shared memory, no kernel image
  // for this GPU, a bad configuration). A <<<>>> launch reports it only through
  // cudaGetLastError, which returns whatever error any earlier call on this thread left behind
  // (torch's, another library's) as if it were this launch's. An earlier kernel that broke the
  // context still shows here: that is the device's state, every call returns it.
  return take(cudaLaunchKernelEx(&config, rows_kernel<T, VEC>, p));
}

template <typename T>
cudaError_t dispatch(const RowsParams& rp, cudaStream_t stream) {
  Args<T> p{};
  p.a = static_cast<const T*>(rp.a);
  p.b = static_cast<const T*>(rp.b);
  p.weight = static_cast<const T*>(rp.weight);
  p.out = static_cast<T*>(rp.out);
  p.normed = static_cast<T*>(rp.normed);
  p.steer = rp.steer;
  p.coef = rp.coef;
  p.gate = rp.num_steer > 0 ? rp.gate : nullptr;
  p.gate_thr = rp.gate_thr;
  p.clamp = rp.clamp;
  p.lo = rp.clamp_lo;
  p.hi = rp.clamp_hi;
  p.readout = rp.readout;
  p.readings = rp.readings;
  p.rows = rp.rows;
  p.dim = rp.dim;
  p.S = rp.num_steer;
  p.C = rp.num_clamp;
  p.M = rp.num_readout;
  p.eps = rp.eps;
  p.inv_dim = 1.0f / static_cast<float>(rp.dim);
  p.gemma = rp.gemma;

  // 16-byte accesses need every row start aligned: the base pointers and a dim that is a
  // multiple of the vector width (then fp32 vector rows, 4 bytes an element, align too).
  constexpr int kVec = 16 / sizeof(T);
  const void* ptrs[] = {rp.a, rp.b, rp.weight, rp.out, rp.normed, rp.steer, rp.clamp, rp.readout, p.gate};
  bool vec = rp.dim % kVec == 0;
  for (const void* ptr : ptrs) vec = vec && aligned16(ptr);  // null is aligned
  return vec ? launch_typed<T, kVec>(p, stream) : launch_typed<T, 1>(p, stream);
}

}  // namespace

cudaError_t launch_rows(const RowsParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.dim < 0 || p.num_steer < 0 || p.num_clamp < 0 || p.num_readout < 0 ||
      p.num_clamp > kMaxProj || p.a == nullptr || (p.normed != nullptr && p.weight == nullptr) ||
      (p.num_steer > 0 && (p.steer == nullptr || p.coef == nullptr)) ||
      (p.num_steer > 0 && p.gate != nullptr && (p.num_steer > kMaxProj || p.gate_thr == nullptr)) ||
      (p.num_clamp > 0 && (p.clamp == nullptr || p.clamp_lo == nullptr || p.clamp_hi == nullptr)) ||
      (p.num_readout > 0 && (p.readout == nullptr || p.readings == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32:
      return dispatch<float>(p, stream);
    case DType::kFloat16:
      return dispatch<__half>(p, stream);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace personakern_cuda
