// The gradient pass of softmax cross-entropy as an XLA FFI CPU kernel: a benchmark-only
// reference point (research/bench/ffi_kernel.py), not part of the library.
//
//   out[i, j] = exp(z[i, j] - lse[i]) * scale[i]
//
// What it tries that XLA:CPU does not emit: a hand-vectorised exp (16 lanes, Cephes expf
// polynomial, ~2 ulp), streaming (non-temporal) stores of the fresh output, so the writes do not
// first read every cache line, and rows split over XLA's own intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f splat(float x) { return v16f{} + x; }

// exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by a degree-7 polynomial.
inline v16f vexp(v16f x) {
  const v16f lowest = splat(-86.5f);  // below: 0 (exp < 3e-38, near the subnormals)
  const v16f highest = splat(88.72283f);  // above: +inf
  v16f clamped = x < lowest ? lowest : x;
  clamped = clamped > highest ? highest : clamped;
  // Adding 1.5 * 2^23 rounds to the nearest integer in the float's last bits.
  const v16f magic = splat(12582912.f);
  v16f n = (clamped * 1.44269504088896341f + magic) - magic;
  // r = x - n ln 2 in two steps (Cody-Waite), so that r keeps its digits.
  v16f r = clamped - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  v16f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^(n - 1) * 2 instead of 2^n: n = 128 at the top of the range has no biased exponent.
  v16i bits = (__builtin_convertvector(n, v16i) + 126) << 23;
  v16f result = p * (v16f)bits * 2.0f;
  result = x < lowest ? splat(0.0f) : result;
  result = x > highest ? splat(INFINITY) : result;
  return x != x ? x : result;  // NaN stays NaN
}

inline void store(float* out, v16f value) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(out) & 63) == 0) {
    _mm512_stream_ps(out, reinterpret_cast<__m512>(value));
    return;
  }
#endif
  std::memcpy(out, &value, sizeof(value));
}

void rows(const float* z, const float* lse, const float* scale, float* out, int64_t k,
          int64_t first, int64_t last) {
  for (int64_t i = first; i < last; ++i) {
    const float* row = z + i * k;
    float* row_out = out + i * k;
    const v16f shift = splat(lse[i]);
    const float c = scale[i];
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      v16f x;
      std::memcpy(&x, row + j, sizeof(x));
      store(row_out + j, vexp(x - shift) * c);
    }
    for (; j < k; ++j) row_out[j] = std::exp(row[j] - lse[i]) * c;
  }
  _mm_sfence();  // streaming stores are weakly ordered: publish them before reporting done
}

ffi::Error SoftmaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> lse,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = z.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("z must have a class axis");
  const int64_t k = dims.back();
  const int64_t n = k == 0 ? 0 : z.element_count() / k;
  if (lse.element_count() != n || scale.element_count() != n)
    return ffi::Error::InvalidArgument("lse and scale need one value per row of z");
  const float* zp = z.typed_data();
  const float* lp = lse.typed_data();
  const float* sp = scale.typed_data();
  float* op = out->typed_data();
  const int64_t tasks = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n);
  if (tasks <= 1) {
    rows(zp, lp, sp, op, k, 0, n);
    return ffi::Error::Success();
  }
  // Every task but the first goes to XLA's pool; this thread takes the first and then waits.
  std::mutex mutex;
  std::condition_variable done;
  int64_t pending = tasks - 1;
  for (int64_t t = 1; t < tasks; ++t) {
    const int64_t first = n * t / tasks, last = n * (t + 1) / tasks;
    pool.Schedule([&, first, last] {
      rows(zp, lp, sp, op, k, first, last);
      std::lock_guard<std::mutex> lock(mutex);
      if (--pending == 0) done.notify_one();
    });
  }
  rows(zp, lp, sp, op, k, 0, n / tasks);
  std::unique_lock<std::mutex> lock(mutex);
  done.wait(lock, [&] { return pending == 0; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(xent_bench_softmax_grad, SoftmaxGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
