// Vectorized row kernels. Numerics mirror personakern/backends/native.py step for step (see the
// comments there): the model-dtype add is rounded once, everything after it is float32, and the
// result is rounded once more. The plain residual add and RMSNorm are bit-identical to the
// reference (the latter by reproducing ATen's summation order); projections and clamping are
// dot products whose order differs from the reference's matmuls, so they agree to rounding.
#include "kernels.h"
#include "sum_squares.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace personakern::cpu {
namespace {

using at::vec::Vectorized;
using VecF = Vectorized<float>;
constexpr int64_t kF = VecF::size();

// Io<T>: a chunk of W model-dtype elements as NV float vectors. `n < W` only for the row tail,
// where loads zero-fill (so tails add nothing to dot products) and stores are masked.
template <typename T>
struct Io {
  using V = Vectorized<T>;
  static constexpr int64_t W = V::size();
  static constexpr int NV = W / kF;
  static_assert(NV == 2, "reduced float vectors hold two float vectors");

  static inline void load(const T* p, int64_t n, VecF* f) {
    V v = n == W ? V::loadu(p) : V::loadu(p, n);
    std::tie(f[0], f[1]) = at::vec::convert_to_float<T>(v);
  }
  // Rounds f to T in place, so the caller continues with exactly what the model dtype holds.
  static inline void round(VecF* f) {
    V v = at::vec::convert_from_float<T>(f[0], f[1]);
    std::tie(f[0], f[1]) = at::vec::convert_to_float<T>(v);
  }
  static inline void store(T* p, int64_t n, VecF* f) {
    V v = at::vec::convert_from_float<T>(f[0], f[1]);
    if (n == W) v.store(p); else v.store(p, n);
    std::tie(f[0], f[1]) = at::vec::convert_to_float<T>(v);
  }
};

template <>
struct Io<float> {
  static constexpr int64_t W = kF;
  static constexpr int NV = 1;
  static inline void load(const float* p, int64_t n, VecF* f) {
    f[0] = n == W ? VecF::loadu(p) : VecF::loadu(p, n);
  }
  static inline void round(VecF*) {}
  static inline void store(float* p, int64_t n, VecF* f) {
    if (n == W) f[0].store(p); else f[0].store(p, n);
  }
};

// NV float vectors of a float32 table row starting at element i of a chunk of n elements.
template <int NV>
inline void load_f32(const float* p, int64_t n, VecF* f) {
  for (int j = 0; j < NV; ++j) {
    const int64_t rem = n - j * kF;
    f[j] = rem >= kF ? VecF::loadu(p + j * kF) : rem > 0 ? VecF::loadu(p + j * kF, rem) : VecF(0.f);
  }
}

inline float hsum(const VecF& v) {
  return at::vec::vec_reduce_all<float>([](VecF& a, VecF& b) { return a + b; }, v);
}

// Walks a row in chunks; the full-chunk loop sees a constant chunk size after inlining.
template <int64_t W, typename F>
inline void for_chunks(int64_t d, const F& body) {
  int64_t i = 0;
  for (; i + W <= d; i += W) body(i, W);
  if (i < d) body(i, d - i);
}

// <x, y> over d floats, run on the L1-resident scratch row. Four independent accumulators keep
// it load-bound; accumulating the dots while streaming the row instead chains every chunk
// through one accumulator per vector, which made the clamped op ~2x slower (N=2048, D=576).
inline float dot(const float* x, const float* y, int64_t d) {
  VecF s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  int64_t i = 0;
  for (; i + 4 * kF <= d; i += 4 * kF) {
    s0 = at::vec::fmadd(VecF::loadu(x + i), VecF::loadu(y + i), s0);
    s1 = at::vec::fmadd(VecF::loadu(x + i + kF), VecF::loadu(y + i + kF), s1);
    s2 = at::vec::fmadd(VecF::loadu(x + i + 2 * kF), VecF::loadu(y + i + 2 * kF), s2);
    s3 = at::vec::fmadd(VecF::loadu(x + i + 3 * kF), VecF::loadu(y + i + 3 * kF), s3);
  }
  for (; i + kF <= d; i += kF) s0 = at::vec::fmadd(VecF::loadu(x + i), VecF::loadu(y + i), s0);
  if (i < d) s0 = at::vec::fmadd(VecF::loadu(x + i, d - i), VecF::loadu(y + i, d - i), s0);
  return hsum((s0 + s1) + (s2 + s3));
}

template <int NV>
inline void store_f32(float* p, int64_t n, const VecF* f) {
  for (int j = 0; j < NV; ++j) {
    const int64_t rem = n - j * kF;
    if (rem >= kF) f[j].store(p + j * kF); else if (rem > 0) f[j].store(p + j * kF, rem);
  }
}

// out = sum_k w[k] * table[k, i:i+n], accumulated before it touches h (as the reference's
// matmul `w @ table` is), so h sees a single rounding of the combined update.
template <int NV>
inline void combine(const float* w, const float* table, int64_t d, int64_t count, int64_t i,
                    int64_t n, VecF* out) {
  for (int j = 0; j < NV; ++j) out[j] = VecF(0.f);
  for (int64_t k = 0; k < count; ++k) {
    VecF t[NV];
    load_f32<NV>(table + k * d + i, n, t);
    const VecF wk(w[k]);
    for (int j = 0; j < NV; ++j) out[j] = at::vec::fmadd(wk, t[j], out[j]);
  }
}

// Indices k < count with w[k] != 0, written to idx; returns how many. A zero weight adds exactly
// nothing to combine()'s sum (0 * t is +-0 for the finite tables it reads), so combining over
// these alone gives the same bits; in vLLM's tables most columns are zero for most rows.
inline int64_t nonzero(const float* w, int64_t count, int64_t* idx) {
  int64_t m = 0;
  for (int64_t k = 0; k < count; ++k)
    if (w[k] != 0.f) idx[m++] = k;
  return m;
}

// combine() over the listed indices only.
template <int NV>
inline void combine_at(const float* w, const int64_t* idx, int64_t m, const float* table, int64_t d,
                       int64_t i, int64_t n, VecF* out) {
  for (int j = 0; j < NV; ++j) out[j] = VecF(0.f);
  for (int64_t q = 0; q < m; ++q) {
    const int64_t k = idx[q];
    VecF t[NV];
    load_f32<NV>(table + k * d + i, n, t);
    const VecF wk(w[k]);
    for (int j = 0; j < NV; ++j) out[j] = at::vec::fmadd(wk, t[j], out[j]);
  }
}

// max |x_i| of a float row; NaN when the row holds a NaN (inf when it holds an inf).
inline float max_abs(const float* x, int64_t d) {
  VecF m(0.f);
  int64_t i = 0;
  for (; i + kF <= d; i += kF) m = at::vec::maximum(m, VecF::loadu(x + i).abs());
  float out = 0.f;
  float tail[kF];
  m.store(tail);
  for (int64_t j = 0; j < kF; ++j) out = std::isnan(tail[j]) || std::isnan(out) ? NAN : std::max(out, tail[j]);
  for (; i < d; ++i) out = std::isnan(x[i]) || std::isnan(out) ? NAN : std::max(out, std::fabs(x[i]));
  return out;
}

// torch.maximum(torch.minimum(p, hi), lo), NaN-propagating like the torch ops.
inline float clamp_like_torch(float p, float lo, float hi) {
  if (std::isnan(p) || std::isnan(lo) || std::isnan(hi)) return std::numeric_limits<float>::quiet_NaN();
  return std::max(std::min(p, hi), lo);
}

// Scratch reused across calls: per-call malloc would be a visible share of a decode step.
struct Scratch {
  std::vector<float> row;
  std::vector<float> excess;
  std::vector<float> gated;
  std::vector<int64_t> active;
  float* gated_of(int64_t k) {
    if (static_cast<int64_t>(gated.size()) < k) gated.resize(k);
    return gated.data();
  }
  int64_t* active_of(int64_t k) {
    if (static_cast<int64_t>(active.size()) < k) active.resize(k);
    return active.data();
  }
  float* row_of(int64_t d) {
    if (static_cast<int64_t>(row.size()) < d) row.resize(d);
    return row.data();
  }
  float* excess_of(int64_t k) {
    if (static_cast<int64_t>(excess.size()) < k) excess.resize(k);
    return excess.data();
  }
};
thread_local Scratch t_scratch;

// normed = rmsnorm(x) * w for one row whose sum of squares is already known.
template <typename T>
inline void norm_row(const T* x, const T* w, T* out, int64_t d, float sumsq, float eps, bool gemma) {
  using IO = Io<T>;
  constexpr int NV = IO::NV;
  const float mean = sumsq / static_cast<float>(d);
  const VecF rs(1.f / std::sqrt(mean + eps));
  const VecF one(1.f);
  for_chunks<IO::W>(d, [&](int64_t i, int64_t n) {
    VecF f[NV], wf[NV];
    IO::load(x + i, n, f);
    IO::load(w + i, n, wf);
    for (int j = 0; j < NV; ++j) f[j] = f[j] * rs;
    if (gemma) {
      for (int j = 0; j < NV; ++j) f[j] = f[j] * (one + wf[j]);
    } else {
      // HF casts the normalised row to the model dtype before the weight multiply.
      IO::round(f);
      for (int j = 0; j < NV; ++j) f[j] = wf[j] * f[j];
    }
    IO::store(out + i, n, f);
  });
}

template <typename T>
void steer_rows(const SteerArgs& a, int64_t r0, int64_t r1) {
  using IO = Io<T>;
  constexpr int NV = IO::NV;
  constexpr int64_t W = IO::W;
  const int64_t d = a.d;
  const bool clamping = a.c > 0;
  const bool gating = a.s > 0 && a.gate != nullptr;
  // The float row (before the final rounding) is parked in scratch whenever dots need it.
  const bool keep_row = clamping || a.m > 0 || gating;
  Scratch& sc = t_scratch;
  float* row = keep_row ? sc.row_of(d) : nullptr;
  float* excess = clamping ? sc.excess_of(a.c) : nullptr;
  float* gated = gating ? sc.gated_of(a.s) : nullptr;
  int64_t* active_cols = a.s ? sc.active_of(a.s) : nullptr;
  // A clamp with bounds (-inf, inf) changes a row only through NaN: its excess p - p is 0 for a
  // finite projection. On rows bounded well inside float range (so p is finite too) it is skipped.
  constexpr float kSafeAbs = 1e15f;

  for (int64_t r = r0; r < r1; ++r) {
    const T* hid = static_cast<const T*>(a.hidden) + r * d;
    const T* del = a.delta ? static_cast<const T*>(a.delta) + r * d : nullptr;
    T* out = static_cast<T*>(a.out) + r * d;
    const float* coef = a.s ? a.coef + r * a.coef_stride : nullptr;

    // h = round(hidden + delta) of one chunk, as float.
    auto load_sum = [&](int64_t i, int64_t n, VecF* f) {
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
      for_chunks<W>(d, [&](int64_t i, int64_t n) {
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

    auto emit = [&](int64_t i, int64_t n, VecF* f) {
      if (keep_row && !clamping) store_f32<NV>(row + i, n, f);
      IO::store(out + i, n, f);
    };

    // Pass 1: h = round(hidden + delta) in float, plus the steering sum. Without clamping this
    // is already the final row.
    for_chunks<W>(d, [&](int64_t i, int64_t n) {
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
        const float p = dot(row, a.clamp + k * d, d);
        excess[k] = p - clamp_like_torch(p, lo[k], hi[k]);
        active |= excess[k] != 0.f;
      }
      for_chunks<W>(d, [&](int64_t i, int64_t n) {
        VecF f[NV];
        load_f32<NV>(row + i, n, f);
        if (active) {
          VecF u[NV];
          combine<NV>(excess, a.clamp, d, a.c, i, n, u);
          for (int j = 0; j < NV; ++j) f[j] = f[j] - u[j];
          if (a.m) store_f32<NV>(row + i, n, f);
        }
        emit(i, n, f);
      });
    }

    if (a.m) {
      float* readings = a.readings + r * a.m;
      for (int64_t k = 0; k < a.m; ++k) readings[k] = dot(row, a.readout + k * d, d);
    }
    // The norm is of the stored (model-dtype) residual, re-read while it is still in L1.
    if (a.weight)
      norm_row<T>(out, static_cast<const T*>(a.weight), static_cast<T*>(a.normed) + r * d, d,
                  sum_squares<T>(out, d), a.eps, a.gemma);
  }
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
    at::parallel_for(0, n, grain_for(3 * d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        norm_row<T>(xs + r * d, w, o + r * d, d, sum_squares<T>(xs + r * d, d), eps, gemma);
    });
  });
}

}  // namespace personakern::cpu
