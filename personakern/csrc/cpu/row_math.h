// Vector building blocks of the row kernels (kernels.cpp): model-dtype chunks as float vectors,
// float32 table rows, dot products, the steering combination, and read-outs over tiles of
// parked rows. Included by kernels.cpp only: it relies on that translation unit's build flags.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace personakern::cpu {
namespace {

// Lambdas over a row's chunks must inline into their loop: out of line, the float vectors they
// take and return go through memory on every chunk.
#if defined(__GNUC__)
#define PK_INLINE __attribute__((always_inline))
#else
#define PK_INLINE
#endif

using at::vec::Vectorized;
using VecF = Vectorized<float>;
constexpr int64_t kF = VecF::size();

// A full vector to memory that no cache needs soon (non-temporal: no read-for-ownership, no
// eviction of what is cached). `p` aligned to the vector's size (kStreamAlign).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kStreamAlign = 64;
inline void stream(float* p, const VecF& v) { _mm512_stream_ps(p, v); }
template <typename V>
inline void stream(void* p, const V& v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
inline void stream_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kStreamAlign = 32;
inline void stream(float* p, const VecF& v) { _mm256_stream_ps(p, v); }
template <typename V>
inline void stream(void* p, const V& v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
inline void stream_fence() { _mm_sfence(); }
#else
constexpr int64_t kStreamAlign = 0;  // no streaming stores: plain ones
inline void stream(float* p, const VecF& v) { v.store(p); }
template <typename V>
inline void stream(void* p, const V& v) { v.store(p); }
inline void stream_fence() {}
#endif

// Two float vectors rounded to one vector of the model dtype (round to nearest even), ATen's way.
template <typename T>
inline Vectorized<T> from_float(const VecF& a, const VecF& b) {
  return at::vec::convert_from_float<T>(a, b);
}
#if defined(PK_AVX512_BF16)
// One vcvtne2ps2bf16 for ATen's eight integer operations per vector: the same round to nearest
// even, bit for bit, for every normal value, zero, inf and NaN (a NaN stays a NaN; its payload
// may differ). Subnormal floats (|x| < 1.2e-38) become zero, as the instruction treats them.
template <>
inline Vectorized<c10::BFloat16> from_float<c10::BFloat16>(const VecF& a, const VecF& b) {
  return Vectorized<c10::BFloat16>((__m512i)_mm512_cvtne2ps_pbh(b, a));
}
#endif

// Io<T>: a chunk of W model-dtype elements as NV float vectors. `n < W` only for the row tail,
// where loads zero-fill (so tails add nothing to dot products) and stores are masked. `nt`
// stores stream full chunks past the cache; `keep` (optional) receives the stored values as
// float32, so later passes over the row read L1 instead of the output.
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
    V v = from_float<T>(f[0], f[1]);
    std::tie(f[0], f[1]) = at::vec::convert_to_float<T>(v);
  }
  static inline void store(T* p, int64_t n, const VecF* f, bool nt = false, float* keep = nullptr) {
    V v = from_float<T>(f[0], f[1]);
    if (n != W) v.store(p, n);
    else if (nt) stream(p, v);
    else v.store(p);
    if (keep) {
      VecF g[2];
      std::tie(g[0], g[1]) = at::vec::convert_to_float<T>(v);
      g[0].store(keep);
      g[1].store(keep + kF);  // keep has room for whole chunks
    }
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
  static inline void store(float* p, int64_t n, const VecF* f, bool nt = false, float* keep = nullptr) {
    if (n != W) f[0].store(p, n);
    else if (nt) stream(p, f[0]);
    else f[0].store(p);
    if (keep) f[0].store(keep);  // keep has room for whole chunks
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
// Fetches the next row's inputs towards L2 while the current row's dot products run: those
// work on cached data and would otherwise leave the memory idle between two rows' streams.
// `per_step` cache lines per dot-loop iteration, spread over the dots the row has.
struct Prefetch {
  const char* base[2] = {nullptr, nullptr};
  int64_t lines = 0, next = 0, per_step = 1;
  void start(const void* a, const void* b, int64_t bytes, int64_t steps) {
    base[0] = static_cast<const char*>(a);
    base[1] = static_cast<const char*>(b);
    lines = (bytes + 63) / 64;
    next = 0;
    const int64_t total = (b ? 2 : 1) * lines;
    per_step = std::max<int64_t>(1, (total + std::max<int64_t>(steps, 1) - 1) / std::max<int64_t>(steps, 1));
  }
  inline void step() {
    for (int64_t k = 0; k < per_step && next < 2 * lines; ++k, ++next) {
      const char* p = base[next & 1];
      if (p) __builtin_prefetch(p + (next >> 1) * 64, 0, 2);
    }
  }
};

template <bool kPrefetch = false>
inline float dot(const float* x, const float* y, int64_t d, Prefetch* pf = nullptr) {
  VecF s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  int64_t i = 0;
  for (; i + 4 * kF <= d; i += 4 * kF) {
    if constexpr (kPrefetch) pf->step();
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

// Read-outs of a tile of parked float rows: readings[q * m + k] = <x_q, v_k>, q < t, k < m. Each
// (row, read-out) is ONE float-vector accumulator taking the row's float vectors in order, so a
// row's readings do not depend on the rows that share its tile (vLLM batch-mates). The table
// goes in blocks of kReadBlock floats a row, small enough to stay in L1 while every row of the
// tile passes, and R rows share each table load: per row the table is read from L2 once per R
// rows, not once per row as dot products over one row at a time read it (those were L2-bound:
// ~3 cycles per FMA at 8192 x 4096 with 8 read-outs; blocked, the FMAs are most of the cost).
constexpr int64_t kReadBlock = 512;

template <int M, int R>
inline void read_block(const float* const* x, const float* const* v, int64_t i, int64_t end, VecF* acc_mem,
                       Prefetch* pf) {
  VecF acc[R * M];  // in registers for the block (through acc_mem every FMA would wait on a store)
  for (int q = 0; q < R * M; ++q) acc[q] = acc_mem[q];
  auto step = [&](int64_t j, int64_t n) PK_INLINE {
    VecF xr[R];
    for (int r = 0; r < R; ++r) xr[r] = n == kF ? VecF::loadu(x[r] + j) : VecF::loadu(x[r] + j, n);
#pragma GCC unroll 8
    for (int k = 0; k < M; ++k) {
      const VecF t = n == kF ? VecF::loadu(v[k] + j) : VecF::loadu(v[k] + j, n);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r * M + k] = at::vec::fmadd(xr[r], t, acc[r * M + k]);
    }
  };
  for (; i + kF <= end; i += kF) {
    if (pf) pf->step();
    step(i, kF);
  }
  if (i < end) step(i, end - i);  // the row's tail
  for (int q = 0; q < R * M; ++q) acc_mem[q] = acc[q];
}

// One group of up to M read-outs (`count` of them, from `vecs`) over t rows; `acc` holds t * M
// vectors. Slots past `count` repeat the last vector; their sums are dropped.
template <int M, int R>
inline void tile_read_group(const float* rows, int64_t stride, int64_t t, const float* vecs, int64_t count,
                            int64_t d, float* readings, int64_t m, VecF* acc, Prefetch* pf) {
  const float* v[M];
  for (int k = 0; k < M; ++k) v[k] = vecs + std::min<int64_t>(k, count - 1) * d;
  for (int64_t q = 0; q < t * M; ++q) acc[q] = VecF(0.f);
  for (int64_t i0 = 0; i0 < d; i0 += kReadBlock) {
    const int64_t i1 = std::min(d, i0 + kReadBlock);
    int64_t q = 0;
    for (; q + R <= t; q += R) {
      const float* x[R];
      for (int r = 0; r < R; ++r) x[r] = rows + (q + r) * stride;
      read_block<M, R>(x, v, i0, i1, acc + q * M, pf);
    }
    for (; q < t; ++q) {
      const float* x[1] = {rows + q * stride};
      read_block<M, 1>(x, v, i0, i1, acc + q * M, pf);
    }
  }
  for (int64_t q = 0; q < t; ++q)
    for (int64_t k = 0; k < count; ++k) readings[q * m + k] = hsum(acc[q * M + k]);
}

// All m read-outs of a tile, in groups of 4 (4 rows x 4 read-outs: 16 accumulators, measured
// fastest in isolation here: 4.7-5.9 G FMA/s against 3.2 for 2 x 8). `acc`: room for t * 4.
// `pf` (optional) is stepped once per full chunk of every R-row block (tile_read_steps times):
// the next tile's inputs stream in while these FMAs run on cached data.
template <int R>
inline void tile_reads(const float* rows, int64_t stride, int64_t t, const float* vecs, int64_t m, int64_t d,
                       float* readings, VecF* acc, Prefetch* pf = nullptr) {
  for (int64_t k0 = 0; k0 < m; k0 += 4) {
    const int64_t count = std::min<int64_t>(4, m - k0);
    const float* v = vecs + k0 * d;
    float* out = readings + k0;
    if (count == 1) tile_read_group<1, R>(rows, stride, t, v, count, d, out, m, acc, pf);
    else if (count == 2) tile_read_group<2, R>(rows, stride, t, v, count, d, out, m, acc, pf);
    else tile_read_group<4, R>(rows, stride, t, v, count, d, out, m, acc, pf);
  }
}

// How many times tile_reads steps its prefetch for t rows, m read-outs of d elements.
template <int R>
inline int64_t tile_read_steps(int64_t t, int64_t m, int64_t d) {
  return (m + 3) / 4 * (d / kF) * (t / R + t % R);
}

}  // namespace
}  // namespace personakern::cpu
