// The pool behind new_output (see buffers.h). A pooled output's storage owns a block of this
// pool; when the storage dies (its last tensor, view, Python storage object and saved tensor
// gone) the block comes back here instead of to the OS. Reuse therefore needs no guess about
// who still holds what: a block is free exactly when its storage no longer exists.
#include "buffers.h"
#include "kernels.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace personakern::cpu {
namespace {

// Below this malloc serves memory its heap already has mapped: nothing to gain.
constexpr int64_t kMinPooledBytes = int64_t(1) << 20;
constexpr size_t kMaxFree = 16;

int64_t default_limit() {
  const char* env = std::getenv("PERSONAKERN_CPU_BUFFER_MB");
  if (env && *env) {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    if (end && *end == '\0' && mb >= 0) return static_cast<int64_t>(mb) << 20;
  }
  return int64_t(1024) << 20;
}

struct Block {
  void* ptr;
  int64_t nbytes;
  uint64_t last_use;
};

struct Pool {
  std::mutex mu;
  std::vector<Block> free;  // blocks whose storage is gone, ready for the next output
  std::atomic<int64_t> limit{default_limit()};  // most bytes kept in `free`
  uint64_t tick = 0, reused = 0, fresh = 0;

  int64_t free_bytes() const {
    int64_t total = 0;
    for (const Block& b : free) total += b.nbytes;
    return total;
  }
  // Releases least recently used blocks until `free` fits the limit and the count.
  void trim() {
    while (!free.empty() && (free_bytes() > limit.load() || free.size() > kMaxFree)) {
      size_t oldest = 0;
      for (size_t i = 1; i < free.size(); ++i)
        if (free[i].last_use < free[oldest].last_use) oldest = i;
      c10::free_cpu(free[oldest].ptr);
      free.erase(free.begin() + static_cast<std::ptrdiff_t>(oldest));
    }
  }
};

// Never destroyed: storages handed out may die after static destruction at exit.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

// The deleter of a pooled storage's memory: the block goes back to the pool (may run on any
// thread, with or without the GIL).
void give_back(void* ctx) {
  Block* block = static_cast<Block*>(ctx);
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (block->nbytes <= p.limit.load()) {
      p.free.push_back({block->ptr, block->nbytes, ++p.tick});
      p.trim();
    } else {
      c10::free_cpu(block->ptr);
    }
  }
  delete block;
}

}  // namespace

at::Tensor new_output(at::IntArrayRef sizes, c10::ScalarType dtype) {
  const int64_t nbytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  Pool& p = pool();
  // decode-sized outputs never touch the lock
  if (nbytes < kMinPooledBytes || nbytes > p.limit.load(std::memory_order_relaxed))
    return at::detail::empty_cpu(sizes, dtype, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  void* ptr = nullptr;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    for (size_t i = 0; i < p.free.size(); ++i) {
      if (p.free[i].nbytes == nbytes) {
        ptr = p.free[i].ptr;
        p.free.erase(p.free.begin() + static_cast<std::ptrdiff_t>(i));
        ++p.reused;
        break;
      }
    }
    if (!ptr) ++p.fresh;
  }
  if (!ptr) ptr = c10::alloc_cpu(static_cast<size_t>(nbytes));
  auto* block = new Block{ptr, nbytes, 0};
  c10::DataPtr data(ptr, block, &give_back, c10::Device(c10::DeviceType::CPU));
  // resizable like any CPU tensor: growing it moves the data to the CPU allocator's memory and
  // hands this block back
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), c10::scalarTypeToTypeMeta(dtype));
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

PyObject* buffers_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs > 1) {
    PyErr_SetString(PyExc_TypeError, "_buffers(limit_bytes=None)");
    return nullptr;
  }
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  if (nargs == 1 && args[0] != Py_None) {
    const long long limit = PyLong_AsLongLong(args[0]);
    if (limit == -1 && PyErr_Occurred()) return nullptr;
    if (limit < 0) {
      PyErr_SetString(PyExc_ValueError, "the buffer limit is a number of bytes >= 0");
      return nullptr;
    }
    p.limit = static_cast<int64_t>(limit);
    p.trim();
  }
  return Py_BuildValue("(LLnKK)", static_cast<long long>(p.limit.load()), static_cast<long long>(p.free_bytes()),
                       static_cast<Py_ssize_t>(p.free.size()), static_cast<unsigned long long>(p.reused),
                       static_cast<unsigned long long>(p.fresh));
}

PyObject* stream_threshold_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  long long set = -1;
  if (nargs > 1 || (nargs == 1 && args[0] != Py_None && ((set = PyLong_AsLongLong(args[0])) < 0))) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_stream_threshold(bytes >= 0 or None)");
    return nullptr;
  }
  return PyLong_FromLongLong(static_cast<long long>(stream_threshold(set)));
}

}  // namespace personakern::cpu
