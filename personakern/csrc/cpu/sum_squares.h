// Sum of squares of a row in ATen's exact summation order (see sum_squares below). Included by
// kernels.cpp only: it relies on that translation unit's vector types and build flags.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace personakern::cpu {
namespace {

using SumVec = at::vec::Vectorized<float>;
constexpr int64_t kSumVecLanes = SumVec::size();
#if defined(__x86_64__) || defined(_M_X64)
constexpr int64_t kLanes = 8;  // see the order note below
#else
constexpr int64_t kLanes = kSumVecLanes;  // ATen's own width; bit-exactness verified on x86 only
#endif
static_assert(kSumVecLanes % kLanes == 0 && (4 * kLanes) % kSumVecLanes == 0,
              "a register holds whole lane-vectors and a group whole registers");

// Sum of squares associated exactly as ATen's CPU sum kernel does for `x.pow(2).sum(-1)`, so
// our RMSNorm is bit-identical to the reference's (and an idle patched model to the unpatched
// one). ATen's order: the terms are 8-lane vectors on x86 (its sum kernel runs at 256-bit
// width on AVX512 machines too, and in the portable build), four interleaved partial sums, each summed
// in blocks of 2^level_power terms cascaded through four levels; then leftover vectors into
// partial 0, partials 1..3 into partial 0, and finally the scalar tail followed by the lanes.
// Rows shorter than one such vector follow the same scheme on scalars.

// The four interleaved partial sums of one cascade level: scalars, or kLanes-wide vectors
// packed into our (possibly wider) registers, partial k at lanes [kLanes k, kLanes (k + 1)).
template <int Regs>
struct Partials {
  SumVec r[Regs];
  Partials() {
    for (SumVec& v : r) v = SumVec(0.f);
  }
  void operator+=(const Partials& o) {
    for (int j = 0; j < Regs; ++j) r[j] = r[j] + o.r[j];
  }
};
struct ScalarPartials {
  float s[4] = {0.f, 0.f, 0.f, 0.f};
  void operator+=(const ScalarPartials& o) {
    for (int k = 0; k < 4; ++k) s[k] = s[k] + o.s[k];
  }
};

template <typename P, typename Load>
P cascade_groups(int64_t groups, const Load& load) {
  constexpr int kLevels = 4;
  const int64_t ceil_log2 = groups <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(groups - 1));
  const int64_t level_power = std::max<int64_t>(4, ceil_log2 / kLevels);
  const int64_t mask = (int64_t(1) << level_power) - 1;
  P acc[kLevels];
  int64_t i = 0;
  while (i + mask + 1 <= groups) {
    for (int64_t j = 0; j <= mask; ++j, ++i) acc[0] += load(i);
    for (int l = 1; l < kLevels; ++l) {
      acc[l] += acc[l - 1];
      acc[l - 1] = P();
      if ((i & (mask << (l * level_power))) != 0) break;
    }
  }
  for (; i < groups; ++i) acc[0] += load(i);
  for (int l = 1; l < kLevels; ++l) acc[0] += acc[l];
  return acc[0];
}

// kSumVecLanes consecutive model-dtype values as one float vector.
template <typename T>
inline SumVec load_vec(const T* p) {
  SumVec out;
  at::vec::load_to_float<T>(p, out);
  return out;
}
template <>
inline SumVec load_vec<float>(const float* p) {
  return SumVec::loadu(p);
}

// Squares are rounded before they are added: the build uses -ffp-contract=off for this.
template <typename T>
float sum_squares(const T* x, int64_t d) {
  auto sq = [x](int64_t e) {
    const float v = static_cast<float>(x[e]);
    return v * v;
  };
  if (d < kLanes) {
    const ScalarPartials p = cascade_groups<ScalarPartials>(d / 4, [&](int64_t i) {
      ScalarPartials q;
      for (int k = 0; k < 4; ++k) q.s[k] = sq(4 * i + k);
      return q;
    });
    float total = p.s[0];
    for (int64_t e = d / 4 * 4; e < d; ++e) total += sq(e);
    return ((total + p.s[1]) + p.s[2]) + p.s[3];
  }
  constexpr int kRegs = 4 * kLanes / kSumVecLanes;
  constexpr int64_t kGroup = 4 * kLanes;
  const int64_t nvec = d / kLanes, groups = nvec / 4;
  const auto p = cascade_groups<Partials<kRegs>>(groups, [&](int64_t i) {
    Partials<kRegs> q;
    for (int j = 0; j < kRegs; ++j) {
      const SumVec f = load_vec<T>(x + kGroup * i + j * kSumVecLanes);
      q.r[j] = f * f;
    }
    return q;
  });
  __at_align__ float part[kGroup];
  for (int j = 0; j < kRegs; ++j) p.r[j].store(part + j * kSumVecLanes);
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = part[l];
  for (int64_t t = groups * 4; t < nvec; ++t)
    for (int l = 0; l < kLanes; ++l) lanes[l] += sq(kLanes * t + l);
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < kLanes; ++l) lanes[l] += part[kLanes * k + l];
  float total = 0.f;
  for (int64_t e = nvec * kLanes; e < d; ++e) total += sq(e);
  for (float lane : lanes) total += lane;
  return total;
}

}  // namespace
}  // namespace personakern::cpu
