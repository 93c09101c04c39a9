// Row kernels of the CPU backend. This interface is deliberately torch-free (raw pointers and
// sizes) so the vectorized translation unit builds without the heavy Python/autograd headers.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace personakern::cpu {

// One call of steer_project, optionally followed by the RMSNorm of its output (the fused op).
// Model-dtype rows are `n` x `d`, row-major. Every "group" is optional: a null pointer (or a zero
// count) switches it off. Row strides of the per-row float tables may be 0 (one row broadcast).
struct SteerArgs {
  const void* hidden = nullptr;
  const void* delta = nullptr;  // null: h = hidden
  void* out = nullptr;
  int64_t n = 0, d = 0;

  const float* steer = nullptr;  // [s, d]
  const float* coef = nullptr;   // rows of s, stride coef_stride
  int64_t s = 0, coef_stride = 0;
  // Conditional steering (optional): vector k is added only where <h, gate[k]> > thr[k], the
  // projection taken before any steering.
  const float* gate = nullptr;   // [s, d] unit vectors
  const float* gate_thr = nullptr;  // rows of s, stride gate_stride
  int64_t gate_stride = 0;

  const float* clamp = nullptr;  // [c, d] unit vectors
  const float* lo = nullptr;     // rows of c
  const float* hi = nullptr;
  int64_t c = 0, lo_stride = 0, hi_stride = 0;

  const float* readout = nullptr;  // [m, d]
  float* readings = nullptr;       // [n, m]
  int64_t m = 0;

  const void* weight = nullptr;  // non-null: also write normed = rmsnorm(out) * w
  void* normed = nullptr;
  float eps = 0.f;
  bool gemma = false;
};

// dtype is the model dtype of hidden/delta/out/weight/normed: Float, BFloat16 or Half.
void steer_project(c10::ScalarType dtype, const SteerArgs& a);

void rms_norm(c10::ScalarType dtype, const void* x, const void* weight, void* out, int64_t n,
              int64_t d, float eps, bool gemma);

// Outputs of at least this many bytes count as too large for the cache: streaming stores, and
// read-outs taken as rows stream. $PERSONAKERN_CPU_STREAM_MB sets it at start (default 16);
// set_bytes >= 0 changes it (tests run both paths on small data).
int64_t stream_threshold(int64_t set_bytes = -1);

// Rough element operations of one call, used by the binding to decide whether to drop the GIL.
int64_t steer_cost(const SteerArgs& a);

}  // namespace personakern::cpu
