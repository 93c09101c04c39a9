// Vectorized row kernels. Numerics mirror personakern/backends/native.py step for step (see the
// comments there): the model-dtype add is rounded once, everything after it is float32, and the
// result is rounded once more. The plain residual add and RMSNorm are bit-identical to the
// reference (the latter by reproducing ATen's summation order); projections and clamping are
// dot products whose order differs from the reference's matmuls, so they agree to rounding.
#include "kernels.h"
#include "row_math.h"
#include "sum_squares.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace personakern::cpu {
namespace {

// Rows parked per tile of read-outs (as float32: 16 KB each at d = 4096, 256 KB a tile, in L2),
// and rows sharing a table load within it.
constexpr int64_t kTileRows = 16;
constexpr int kTileR = 4;

// Scratch reused across calls: per-call malloc would be a visible share of a decode step.
struct Scratch {
  std::vector<float> row, excess, gated, weight, keep;
  std::vector<int64_t> active;
  template <typename V>
  static typename V::value_type* of(V& v, int64_t k) {
    if (static_cast<int64_t>(v.size()) < k) v.resize(k);
    return v.data();
  }
};
thread_local Scratch t_scratch;

// The norm weight as float32: converted once per task instead of once per row.
template <typename T>
inline const float* weight_f32(const T* w, int64_t d) {
  float* out = Scratch::of(t_scratch.weight, d);
  for_chunks<Io<T>::W>(d, [&](int64_t i, int64_t n) PK_INLINE {
    VecF f[Io<T>::NV];
    Io<T>::load(w + i, n, f);
    store_f32<Io<T>::NV>(out + i, n, f);
  });
  return out;
}
template <>
inline const float* weight_f32<float>(const float* w, int64_t) { return w; }

// normed = rmsnorm(x) * w for one row whose sum of squares is already known (w as float32).
// x is the row in the model dtype, or (X = float) the float32 copy of it kept in L1 by pass 1.
template <typename T, typename X, typename WT>
inline void norm_row(const X* x, const WT* w, T* out, int64_t d, float sumsq, float eps, bool gemma,
                     bool nt) {
  using IO = Io<T>;
  constexpr int NV = IO::NV;
  const float mean = sumsq / static_cast<float>(d);
  const VecF rs(1.f / std::sqrt(mean + eps));
  const VecF one(1.f);
  for_chunks<IO::W>(d, [&](int64_t i, int64_t n) PK_INLINE {
    VecF f[NV], wf[NV];
    if constexpr (std::is_same_v<X, T>) IO::load(x + i, n, f);
    else load_f32<NV>(x + i, n, f);
    if constexpr (std::is_same_v<WT, T>) IO::load(w + i, n, wf);
    else load_f32<NV>(w + i, n, wf);
    for (int j = 0; j < NV; ++j) f[j] = f[j] * rs;
    if (gemma) {
      for (int j = 0; j < NV; ++j) f[j] = f[j] * (one + wf[j]);
    } else {
      // HF casts the normalised row to the model dtype before the weight multiply.
      IO::round(f);
      for (int j = 0; j < NV; ++j) f[j] = wf[j] * f[j];
    }
    IO::store(out + i, n, f, nt);
  });
}

// The norm of a row after pass 1, of its stored (model-dtype) values: from `out`, still in L1,
// or, where `out` was streamed past the cache, from the float32 copy pass 1 kept (the sum of
// squares in ATen's order is the same over either).
template <typename T>
inline void finish_norm(const SteerArgs& a, int64_t r, const float* keep, const float* weight, bool nt) {
  T* normed = static_cast<T*>(a.normed) + r * a.d;
  if (keep) {
    norm_row<T, float, float>(keep, weight, normed, a.d, sum_squares<float>(keep, a.d), a.eps, a.gemma, nt);
  } else {
    const T* out = static_cast<const T*>(a.out) + r * a.d;
    norm_row<T, T, T>(out, static_cast<const T*>(a.weight), normed, a.d, sum_squares<T>(out, a.d), a.eps, a.gemma,
                      nt);
  }
}

// Outputs of at least stream_threshold() bytes (16 MiB unless set) are written with streaming
// stores when aligned for them: they leave the cache before anyone reads them, so
// read-for-ownership traffic would be pure waste (1.7x on add_rms_norm at 8192 x 4096 fp32
// here). Smaller ones stay cached for the next op. The sizes caches report are no guide under
// a hypervisor (this machine's VM says 320 MB of L3), hence a fixed default.
inline bool large(int64_t n, int64_t d, int64_t elem) { return n * d * elem >= stream_threshold(); }

inline bool streams(const void* p, int64_t n, int64_t d, int64_t elem) {
  return kStreamAlign > 0 && large(n, d, elem) && reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0 &&
         (d * elem) % kStreamAlign == 0;
}

// Whole chunks of float32 for a kept row of d elements (stores write whole chunks).
template <typename T>
inline int64_t kept_size(int64_t d) {
  return (d + Io<T>::W - 1) / Io<T>::W * Io<T>::W;
}

template <typename T>
void steer_rows(const SteerArgs& a, int64_t r0, int64_t r1) {
  using IO = Io<T>;
  constexpr int NV = IO::NV;
  constexpr int64_t W = IO::W;
  const int64_t d = a.d;
  const bool clamping = a.c > 0;
  const bool gating = a.s > 0 && a.gate != nullptr;
  // bf16/fp16 calls of every size take the read-outs over tiles of parked rows while the next
  // tile's inputs are prefetched (tile_reads). Against dot products a row at a time: 1.13-1.50x
  // from 8 rows up below 16 MiB (the table is read from L2 once per 4 rows, not per row), and
  // beyond it 1.10-1.28x, then 1.10-1.17x more from the prefetch. float32 keeps the dot products
  // over one parked row (with the next row prefetched in calls too large for the cache): tiles
  // measured 0.68-1.1x there, and with the tile code in the float32 instantiation its dot path
  // ran 0.89-0.94x as fast (most likely GCC's inliner giving up on the larger function, as it
  // did for read_block once: docs/benchmarks.md), so for float32 the tile branch is compiled
  // out. The two sum in
  // different orders: within a call every row takes the same path, across paths readings agree
  // to float rounding.
  constexpr bool kTiles = sizeof(T) < sizeof(float);
  const bool park_reads = a.m > 0;
  const bool tiled = kTiles && park_reads;
  // tile rows one cache line apart beyond whole vectors: at d = 4096 a power-of-two stride put
  // every row of the tile in the same L1 sets
  const int64_t row_stride = (d + kF - 1) / kF * kF + (tiled ? kF : 0);
  Scratch& sc = t_scratch;
  // The float row (before the final rounding) is parked in scratch whenever later dots need it.
  float* rows = clamping || gating || park_reads ? Scratch::of(sc.row, (tiled ? kTileRows : 1) * row_stride)
                                                 : nullptr;
  VecF tile_acc[kTiles ? kTileRows * 4 : 1];
  float* excess = clamping ? Scratch::of(sc.excess, a.c) : nullptr;
  float* gated = gating ? Scratch::of(sc.gated, a.s) : nullptr;
  int64_t* active_cols = a.s ? Scratch::of(sc.active, a.s) : nullptr;
  const bool nt = streams(a.out, a.n, d, sizeof(T)) && (!a.weight || streams(a.normed, a.n, d, sizeof(T)));
  // streamed rows are kept as float32 for the norm, with the weight
  float* keep = a.weight && nt ? Scratch::of(sc.keep, kept_size<T>(d)) : nullptr;
  const float* weight = keep ? weight_f32<T>(static_cast<const T*>(a.weight), d) : nullptr;
  const bool prefetch = (clamping || (park_reads && !tiled)) && large(a.n, d, sizeof(T));
  // A clamp with bounds (-inf, inf) changes a row only through NaN: its excess p - p is 0 for a
  // finite projection. On rows bounded well inside float range (so p is finite too) it is skipped.
  constexpr float kSafeAbs = 1e15f;
  // Starts `pf` on the inputs of `count` rows from row `first`, spread over `steps` steps.
  auto prefetch_rows = [&](Prefetch& pf, int64_t first, int64_t count, int64_t steps) {
    pf.start(static_cast<const T*>(a.hidden) + first * d,
             a.delta ? static_cast<const T*>(a.delta) + first * d : nullptr, count * d * sizeof(T), steps);
  };

  for (int64_t r = r0; r < r1; ++r) {
    const T* hid = static_cast<const T*>(a.hidden) + r * d;
    const T* del = a.delta ? static_cast<const T*>(a.delta) + r * d : nullptr;
    T* out = static_cast<T*>(a.out) + r * d;
    const float* coef = a.s ? a.coef + r * a.coef_stride : nullptr;
    const int64_t slot = tiled ? (r - r0) % kTileRows : 0;   // the row's place in its tile
    float* row = rows ? rows + slot * row_stride : nullptr;
    // in calls larger than the cache, the next row streams in while this one's dots run
    Prefetch next_row;
    Prefetch* pf = nullptr;
    if (prefetch && r + 1 < r1) {
      prefetch_rows(next_row, r + 1, 1, ((tiled ? 0 : a.m) + a.c) * (d / (4 * kF)));
      pf = &next_row;
    }

    // h = round(hidden + delta) of one chunk, as float.
    auto load_sum = [&](int64_t i, int64_t n, VecF* f) PK_INLINE {
      IO::load(hid + i, n, f);
      if (del) {
        VecF g[NV];
        IO::load(del + i, n, g);
        for (int j = 0; j < NV; ++j) f[j] = f[j] + g[j];
        IO::round(f);
      }
    };

    // Conditional steering: the gates read h before steering, so h goes to scratch first and
    // pass 1 below continues from there with the gated coefficients.
    if (gating) {
      for_chunks<W>(d, [&](int64_t i, int64_t n) PK_INLINE {
        VecF f[NV];
        load_sum(i, n, f);
        store_f32<NV>(row + i, n, f);
      });
      const float* thr = a.gate_thr + r * a.gate_stride;
      // a zero alpha adds nothing whether its gate opens or not: no dot product for it
      for (int64_t k = 0; k < a.s; ++k)
        gated[k] = coef[k] != 0.f && dot(row, a.gate + k * d, d) > thr[k] ? coef[k] : 0.f;
      coef = gated;
    }
    const int64_t n_active = coef ? nonzero(coef, a.s, active_cols) : 0;

    // The final float row of a chunk: read it out, park it if needed, store it rounded.
    auto emit = [&](int64_t i, int64_t n, VecF* f) PK_INLINE {
      if (park_reads) store_f32<NV>(row + i, n, f);
      IO::store(out + i, n, f, nt, keep ? keep + i : nullptr);
    };

    // Pass 1: h = round(hidden + delta) in float, plus the steering sum. Without clamping this
    // is already the final row.
    for_chunks<W>(d, [&](int64_t i, int64_t n) PK_INLINE {
      VecF f[NV];
      if (gating) {
        load_f32<NV>(row + i, n, f);
      } else {
        load_sum(i, n, f);
      }
      if (coef) {
        // a row whose alphas are all zero still adds the zero update (h + 0 turns -0 into +0,
        // exactly as the reference's h + coef @ steer does)
        VecF u[NV];
        combine_at<NV>(coef, active_cols, n_active, a.steer, d, i, n, u);
        for (int j = 0; j < NV; ++j) f[j] = f[j] + u[j];
      }
      if (clamping) store_f32<NV>(row + i, n, f);
      else emit(i, n, f);
    });

    // Clamping: every projection is taken from the same steered h, then one combined
    // correction (the reference's `h - excess @ c`).
    if (clamping) {
      const float* lo = a.lo + r * a.lo_stride;
      const float* hi = a.hi + r * a.hi_stride;
      bool active = false;
      int safe = -1;   // row bounded well inside float range: -1 not yet known, then 0 / 1
      for (int64_t k = 0; k < a.c; ++k) {
        if (lo[k] == -INFINITY && hi[k] == INFINITY) {
          if (safe < 0) safe = max_abs(row, d) <= kSafeAbs;   // false for NaN
          if (safe) { excess[k] = 0.f; continue; }
        }
        const float p = pf ? dot<true>(row, a.clamp + k * d, d, pf) : dot(row, a.clamp + k * d, d);
        excess[k] = p - clamp_like_torch(p, lo[k], hi[k]);
        active |= excess[k] != 0.f;
      }
      for_chunks<W>(d, [&](int64_t i, int64_t n) PK_INLINE {
        VecF f[NV];
        load_f32<NV>(row + i, n, f);
        if (active) {
          VecF u[NV];
          combine<NV>(excess, a.clamp, d, a.c, i, n, u);
          for (int j = 0; j < NV; ++j) f[j] = f[j] - u[j];
          if (a.m) store_f32<NV>(row + i, n, f);
        }
        IO::store(out + i, n, f, nt, keep ? keep + i : nullptr);
      });
    }

    float* readings = a.m ? a.readings + r * a.m : nullptr;
    if constexpr (kTiles) {
      // with read-outs asked, when the tile is full or the task's rows end
      if (tiled && (slot == kTileRows - 1 || r + 1 == r1)) {
        // the next tile's inputs stream towards L2 while this tile's read-outs run
        Prefetch next_tile;
        const int64_t ahead = std::min<int64_t>(kTileRows, r1 - r - 1);
        if (ahead > 0) prefetch_rows(next_tile, r + 1, ahead, tile_read_steps<kTileR>(slot + 1, a.m, d));
        tile_reads<kTileR>(rows, row_stride, slot + 1, a.readout, a.m, d, readings - slot * a.m, tile_acc,
                           ahead > 0 ? &next_tile : nullptr);
      }
    } else if (a.m && pf) {
      for (int64_t k = 0; k < a.m; ++k) readings[k] = dot<true>(row, a.readout + k * d, d, pf);
    } else if (a.m) {
      for (int64_t k = 0; k < a.m; ++k) readings[k] = dot(row, a.readout + k * d, d);
    }
    // The norm is of the stored (model-dtype) residual, from its float copy in L1.
    if (a.weight) finish_norm<T>(a, r, keep, weight, nt);
  }
  if (nt) stream_fence();
}

// Rows per task such that a task is worth waking a pool thread for: decode-sized calls
// (a few rows of a few thousand elements) stay on the calling thread.
int64_t grain_for(int64_t per_row_cost) {
  constexpr int64_t kMinTaskCost = 1 << 18;
  return std::max<int64_t>(1, kMinTaskCost / std::max<int64_t>(per_row_cost, 1));
}

int64_t row_cost(const SteerArgs& a) {
  return a.d * (2 + a.s + (a.gate ? a.s + 2 : 0) + 2 * a.c + a.m + (a.weight ? 2 : 0));
}

template <typename F>
void dispatch(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "personakern cpu: unsupported dtype ", dtype);
  }
}

}  // namespace

int64_t stream_threshold(int64_t set_bytes) {
  static std::atomic<int64_t> threshold{[] {
    const char* env = std::getenv("PERSONAKERN_CPU_STREAM_MB");
    return (env && *env ? static_cast<int64_t>(std::atoll(env)) : int64_t(16)) << 20;
  }()};
  if (set_bytes >= 0) threshold.store(set_bytes, std::memory_order_relaxed);
  return threshold.load(std::memory_order_relaxed);
}

int64_t steer_cost(const SteerArgs& a) { return a.n * row_cost(a); }

void steer_project(c10::ScalarType dtype, const SteerArgs& a) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, a.n, grain_for(row_cost(a)),
                     [&](int64_t r0, int64_t r1) { steer_rows<T>(a, r0, r1); });
  });
}

void rms_norm(c10::ScalarType dtype, const void* x, const void* weight, void* out, int64_t n,
              int64_t d, float eps, bool gemma) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = static_cast<const T*>(x);
    const T* w = static_cast<const T*>(weight);
    T* o = static_cast<T*>(out);
    const bool nt = streams(o, n, d, sizeof(T));
    at::parallel_for(0, n, grain_for(3 * d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        norm_row<T, T, T>(xs + r * d, w, o + r * d, d, sum_squares<T>(xs + r * d, d), eps, gemma, nt);
      if (nt) stream_fence();
    });
  });
}

}  // namespace personakern::cpu
