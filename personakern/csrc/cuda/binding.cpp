// Torch binding of persona_kernels.cu: tensor checks, output allocation, the current stream.
// Built just in time by personakern/backends/cuda.py, only where torch has CUDA. The Python
// side has already made the inputs contiguous and float32 where the contract says so; the
// checks here keep a wrong call from reaching the kernel as a bad pointer.
#include <torch/extension.h>

// c10's stream header rather than ATen/cuda/CUDAContext.h: the same current stream
// (at::cuda::getCurrentCUDAStream is this function) without the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "persona_kernels.h"

namespace {

using torch::Tensor;
using OptTensor = std::optional<Tensor>;

personakern_cuda::DType to_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return personakern_cuda::DType::kFloat32;
    case at::kHalf:
      return personakern_cuda::DType::kFloat16;
    case at::kBFloat16:
      return personakern_cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "personakern cuda: unsupported dtype ", t.scalar_type());
  }
}

void check_on(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "personakern cuda: ", name, " is on ", t.device(),
              ", expected ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "personakern cuda: ", name, " must be contiguous");
}

void check_rows(const Tensor& t, const Tensor& ref, const char* name) {
  check_on(t, ref, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "personakern cuda: ", name, " is ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), "personakern cuda: ", name, " has shape ", t.sizes(),
              ", expected ", ref.sizes());
}

// A float32 [rows, cols] matrix; returns its row count.
int64_t check_f32(const Tensor& t, const Tensor& ref, const char* name, int64_t cols) {
  check_on(t, ref, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "personakern cuda: ", name, " must be float32");
  TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, "personakern cuda: ", name, " has shape ", t.sizes(),
              ", expected [*, ", cols, "]");
  return t.size(0);
}

void check_per_row(const Tensor& t, const Tensor& ref, const char* name, int64_t rows, int64_t cols) {
  const int64_t got = check_f32(t, ref, name, cols);
  TORCH_CHECK(got == rows, "personakern cuda: ", name, " has ", got, " rows, expected ", rows);
}

// The whole row pipeline of persona_kernels.h. Returns (out, normed, readings); the ones not
// asked for (want_out false, weight None, readout None) are empty tensors.
std::tuple<Tensor, Tensor, Tensor> rows(const Tensor& a, const OptTensor& b, const OptTensor& weight, double eps,
                                        bool gemma, bool want_out, const OptTensor& steer_vecs,
                                        const OptTensor& coef, const OptTensor& clamp_vecs,
                                        const OptTensor& clamp_lo, const OptTensor& clamp_hi,
                                        const OptTensor& readout, const OptTensor& gate_vecs,
                                        const OptTensor& gate_thr) {
  TORCH_CHECK(a.is_cuda(), "personakern cuda: tensors must be on a CUDA device, got ", a.device());
  TORCH_CHECK(a.dim() == 2, "personakern cuda: rows must be 2-D [N, D], got ", a.sizes());
  TORCH_CHECK(a.is_contiguous(), "personakern cuda: rows must be contiguous");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t n = a.size(0), d = a.size(1);

  personakern_cuda::RowsParams p;
  p.dtype = to_dtype(a);
  p.rows = n;
  p.dim = d;
  p.a = a.data_ptr();
  p.eps = static_cast<float>(eps);
  p.gemma = gemma;
  if (b.has_value()) {
    check_rows(*b, a, "delta");
    p.b = b->data_ptr();
  }

  Tensor out, normed, readings;
  if (want_out) {
    out = torch::empty_like(a);
    p.out = out.data_ptr();
  }
  if (weight.has_value()) {
    check_on(*weight, a, "weight");
    TORCH_CHECK(weight->scalar_type() == a.scalar_type(), "personakern cuda: weight is ", weight->scalar_type(),
                ", expected ", a.scalar_type());
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == d, "personakern cuda: weight has shape ",
                weight->sizes(), ", expected [", d, "]");
    p.weight = weight->data_ptr();
    normed = torch::empty_like(a);
    p.normed = normed.data_ptr();
  }
  if (steer_vecs.has_value()) {
    TORCH_CHECK(coef.has_value(), "personakern cuda: steer_vecs without coef");
    const int64_t s = check_f32(*steer_vecs, a, "steer_vecs", d);
    check_per_row(*coef, a, "coef", n, s);
    p.steer = steer_vecs->data_ptr<float>();
    p.coef = coef->data_ptr<float>();
    p.num_steer = static_cast<int32_t>(s);
    if (gate_vecs.has_value()) {
      TORCH_CHECK(gate_thr.has_value(), "personakern cuda: gate_vecs without gate_thr");
      TORCH_CHECK(s <= personakern_cuda::kMaxProj, "personakern cuda: at most ", personakern_cuda::kMaxProj,
                  " conditional steering vectors, got ", s);
      TORCH_CHECK(check_f32(*gate_vecs, a, "gate_vecs", d) == s, "personakern cuda: gate_vecs must have ", s,
                  " rows");
      check_per_row(*gate_thr, a, "gate_thr", n, s);
      p.gate = gate_vecs->data_ptr<float>();
      p.gate_thr = gate_thr->data_ptr<float>();
    }
  }
  if (clamp_vecs.has_value()) {
    TORCH_CHECK(clamp_lo.has_value() && clamp_hi.has_value(), "personakern cuda: clamp_vecs without bounds");
    const int64_t c = check_f32(*clamp_vecs, a, "clamp_vecs", d);
    TORCH_CHECK(c <= personakern_cuda::kMaxProj, "personakern cuda: at most ", personakern_cuda::kMaxProj,
                " clamp vectors, got ", c);
    check_per_row(*clamp_lo, a, "clamp_lo", n, c);
    check_per_row(*clamp_hi, a, "clamp_hi", n, c);
    p.clamp = clamp_vecs->data_ptr<float>();
    p.clamp_lo = clamp_lo->data_ptr<float>();
    p.clamp_hi = clamp_hi->data_ptr<float>();
    p.num_clamp = static_cast<int32_t>(c);
  }
  if (readout.has_value()) {
    const int64_t m = check_f32(*readout, a, "readout", d);
    readings = torch::empty({n, m}, a.options().dtype(at::kFloat));
    p.readout = readout->data_ptr<float>();
    p.readings = readings.data_ptr<float>();
    p.num_readout = static_cast<int32_t>(m);
  }

  const cudaError_t err = personakern_cuda::launch_rows(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "personakern cuda: kernel launch failed: ", cudaGetErrorString(err));
  const auto empty = [&] { return torch::empty({0}, a.options()); };
  return {out.defined() ? out : empty(), normed.defined() ? normed : empty(),
          readings.defined() ? readings : empty()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "personakern fused CUDA row kernels";
  m.attr("max_clamp") = personakern_cuda::kMaxProj;
  m.def("rows", &rows, "add, steer, clamp, read out and RMS-normalise [N, D] rows");
}
