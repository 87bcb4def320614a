// Softmax cross-entropy's two passes as XLA FFI CPU kernels: benchmark-only reference points
// (research/bench/ffi_kernel.py), not part of the library.
//
//   xent_bench_softmax_stats: lse[i] = log sum_j exp(z[i, j]),
//                             smooth[i] = sum_j (lse[i] - z[i, j])   (label smoothing's sum)
//     one read of each row from memory (the row maximum), then the sums from the cache.
//   xent_bench_softmax_hinted_stats: total[i] = sum_j exp(z[i, j] - hint[i]),
//                                    centred[i] = sum_j (hint[i] - z[i, j])
//     one read of each row, no maximum (xent_jax's CPU formulation: the label logit as hint).
//   xent_bench_softmax_grad:  out[i, j] = exp(z[i, j] - lse[i]) * scale[i] + offset[i]
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
#include <initializer_list>

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
  // The clamps also send NaN to `lowest` (comparisons with NaN are false), so that no NaN
  // reaches the float-to-int conversion; the NaN itself is restored at the end.
  v16f clamped = x >= lowest ? x : lowest;
  clamped = clamped <= highest ? clamped : highest;
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

inline float sum_lanes(v16f v) {
  float total = 0.0f;
  for (int lane = 0; lane < 16; ++lane) total += v[lane];
  return total;
}

// s = sum_j exp(row[j] - c) and t = sum_j (row[j] - c) over one row of k classes.
inline void shifted_sums(const float* row, int64_t k, float c, float& s, float& t) {
  const v16f shift = splat(c);
  v16f s0 = {}, s1 = {}, t0 = {}, t1 = {};
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    v16f a, b;
    std::memcpy(&a, row + j, sizeof(a));
    std::memcpy(&b, row + j + 16, sizeof(b));
    a = a - shift;
    b = b - shift;
    s0 += vexp(a);
    s1 += vexp(b);
    t0 += a;
    t1 += b;
  }
  for (; j + 16 <= k; j += 16) {
    v16f a;
    std::memcpy(&a, row + j, sizeof(a));
    a = a - shift;
    s0 += vexp(a);
    t0 += a;
  }
  if (j < k) {  // the last partial block: padded with -inf, whose exp adds nothing
    v16f a = splat(-INFINITY);
    std::memcpy(&a, row + j, sizeof(float) * (k - j));
    a = a - shift;
    s1 += vexp(a);
    for (int64_t lane = 0; lane < k - j; ++lane) t1[lane] += a[lane];
  }
  s = sum_lanes(s0 + s1);
  t = sum_lanes(t0 + t1);
}

// Rows [first, last) of the statistics: the maximum m (a read from memory), then from the cache
// s = sum exp(z - m) and t = sum (z - m) <= 0, so lse = m + log s and smooth = K log s - t: both
// terms >= 0, nothing cancels at a large common offset of the logits.
void stats_rows(const float* z, float* lse, float* smooth, int64_t k, int64_t first,
                int64_t last) {
  for (int64_t i = first; i < last; ++i) {
    const float* row = z + i * k;
    v16f m0 = splat(-INFINITY), m1 = m0;
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
      v16f a, b;
      std::memcpy(&a, row + j, sizeof(a));
      std::memcpy(&b, row + j + 16, sizeof(b));
      m0 = a > m0 ? a : m0;
      m1 = b > m1 ? b : m1;
    }
    m0 = m1 > m0 ? m1 : m0;
    float m = -INFINITY;
    for (int lane = 0; lane < 16; ++lane) m = std::max(m, m0[lane]);
    for (; j < k; ++j) m = std::max(m, row[j]);
    if (!std::isfinite(m)) {  // a row of -inf or NaN (the max skips NaN), or +inf in it
      bool has_nan = false;
      for (j = 0; j < k; ++j) has_nan |= row[j] != row[j];
      lse[i] = has_nan ? NAN : m;
      smooth[i] = NAN;
      continue;
    }
    float s, t;
    shifted_sums(row, k, m, s, t);
    const float log_s = std::log(s);  // NaN in the row gives NaN here and below
    lse[i] = m + log_s;
    smooth[i] = static_cast<float>(k) * log_s - t;
  }
}

// Rows [first, last) of the hinted statistics, in one read of each row from memory and no
// maximum: total = sum exp(z - hint) and centred = sum (hint - z), the caller's hint being a
// logit of the row (the label's), so total >= 1. total overflows (to +inf) when some logit lies
// more than ~88.7 above the hint; the caller then takes the max-shifted kernel instead.
void hinted_rows(const float* z, const float* hint, float* total, float* centred, int64_t k,
                 int64_t first, int64_t last) {
  for (int64_t i = first; i < last; ++i) {
    float s, t;
    shifted_sums(z + i * k, k, hint[i], s, t);
    total[i] = s;
    centred[i] = -t;
  }
}

void grad_rows(const float* z, const float* lse, const float* scale, const float* offset,
               float* out, int64_t k, int64_t first, int64_t last) {
  for (int64_t i = first; i < last; ++i) {
    const float* row = z + i * k;
    float* row_out = out + i * k;
    const v16f shift = splat(lse[i]);
    const float c = scale[i], d = offset[i];
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      v16f x;
      std::memcpy(&x, row + j, sizeof(x));
      store(row_out + j, vexp(x - shift) * c + d);
    }
    if (j < k) {  // the last partial block, through the same exp as the others
      v16f x = splat(0.0f);
      std::memcpy(&x, row + j, sizeof(float) * (k - j));
      const v16f y = vexp(x - shift) * c + d;
      std::memcpy(row_out + j, &y, sizeof(float) * (k - j));
    }
  }
  _mm_sfence();  // streaming stores are weakly ordered: publish them before reporting done
}

// Runs body(first, last) over [0, n) split into one range per thread of XLA's intra-op pool:
// every range but the first goes to the pool, this thread takes the first and then waits.
template <typename Body>
void parallel_rows(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  const int64_t tasks = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n);
  if (tasks <= 1) {
    body(0, n);
    return;
  }
  std::mutex mutex;
  std::condition_variable done;
  int64_t pending = tasks - 1;
  for (int64_t t = 1; t < tasks; ++t) {
    const int64_t first = n * t / tasks, last = n * (t + 1) / tasks;
    pool.Schedule([&, first, last] {
      body(first, last);
      std::lock_guard<std::mutex> lock(mutex);
      if (--pending == 0) done.notify_one();
    });
  }
  body(0, n / tasks);
  std::unique_lock<std::mutex> lock(mutex);
  done.wait(lock, [&] { return pending == 0; });
}

// Sets (n, k) to the rows and classes of z; an error when a per-row operand does not have one
// value per row.
ffi::Error row_shape(const ffi::Buffer<ffi::F32>& z, std::initializer_list<int64_t> per_row,
                     int64_t& n, int64_t& k) {
  const auto dims = z.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("z must have a class axis");
  k = dims.back();
  n = k == 0 ? 0 : z.element_count() / k;
  for (int64_t count : per_row)
    if (count != n) return ffi::Error::InvalidArgument("need one value per row of z");
  return ffi::Error::Success();
}

ffi::Error SoftmaxStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z,
                        ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> smooth) {
  int64_t n, k;
  ffi::Error error = row_shape(z, {lse->element_count(), smooth->element_count()}, n, k);
  if (error.failure()) return error;
  parallel_rows(pool, n, [&](int64_t first, int64_t last) {
    stats_rows(z.typed_data(), lse->typed_data(), smooth->typed_data(), k, first, last);
  });
  return ffi::Error::Success();
}

ffi::Error SoftmaxHintedStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z,
                              ffi::Buffer<ffi::F32> hint, ffi::ResultBuffer<ffi::F32> total,
                              ffi::ResultBuffer<ffi::F32> centred) {
  int64_t n, k;
  ffi::Error error = row_shape(
      z, {hint.element_count(), total->element_count(), centred->element_count()}, n, k);
  if (error.failure()) return error;
  parallel_rows(pool, n, [&](int64_t first, int64_t last) {
    hinted_rows(z.typed_data(), hint.typed_data(), total->typed_data(), centred->typed_data(), k,
                first, last);
  });
  return ffi::Error::Success();
}

ffi::Error SoftmaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> lse,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                       ffi::ResultBuffer<ffi::F32> out) {
  int64_t n, k;
  ffi::Error error =
      row_shape(z, {lse.element_count(), scale.element_count(), offset.element_count()}, n, k);
  if (error.failure()) return error;
  parallel_rows(pool, n, [&](int64_t first, int64_t last) {
    grad_rows(z.typed_data(), lse.typed_data(), scale.typed_data(), offset.typed_data(),
              out->typed_data(), k, first, last);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(xent_bench_softmax_stats, SoftmaxStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(xent_bench_softmax_hinted_stats, SoftmaxHintedStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(xent_bench_softmax_grad, SoftmaxGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
