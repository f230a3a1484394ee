// y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]: a weight-only int8 matmul for a decode
// step's few rows on CPU. q holds one output channel per row (int8, contiguous along k),
// so each weight byte is read once per call, whatever the number of rows; the rows of x
// (float32) stay in L1. The output channels are split in chunks over the calling thread
// and XLA's intra-op thread pool (model/int8_kernel.py builds and registers this file).
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerGroup = 4;

// MB rows of x (stride k) against output channels [n0, n1). Each step takes 8 * V weights
// of a channel; V independent accumulators a row hide the FMA latency (V = 8 for one row:
// a batch-1 step would otherwise wait on two dependent chains).
template <int MB>
void Block(const float* x, const int8_t* q, const float* scale, float* y, int64_t k,
           int64_t n_total, int64_t n0, int64_t n1) {
  constexpr int V = MB == 1 ? 8 : (MB == 2 ? 4 : 2);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * k;
    float out[MB];
    int64_t kk = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[MB][V];
    for (int r = 0; r < MB; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
    for (; kk + 8 * V <= k; kk += 8 * V) {
      __m256 wf[V];
      for (int v = 0; v < V; ++v)
        wf[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + kk + 8 * v))));
      for (int r = 0; r < MB; ++r)
        for (int v = 0; v < V; ++v)
          acc[r][v] = _mm256_fmadd_ps(wf[v], _mm256_loadu_ps(x + r * k + kk + 8 * v), acc[r][v]);
    }
    for (; kk + 8 <= k; kk += 8) {
      __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + kk))));
      for (int r = 0; r < MB; ++r)
        acc[r][0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + r * k + kk), acc[r][0]);
    }
    for (int r = 0; r < MB; ++r) {
      __m256 s = acc[r][0];
      for (int v = 1; v < V; ++v) s = _mm256_add_ps(s, acc[r][v]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      out[r] = _mm_cvtss_f32(h);
    }
#else
    for (int r = 0; r < MB; ++r) out[r] = 0.f;
#endif
    for (; kk < k; ++kk)
      for (int r = 0; r < MB; ++r) out[r] += x[r * k + kk] * static_cast<float>(w[kk]);
    for (int r = 0; r < MB; ++r) y[r * n_total + n] = out[r] * scale[n];
  }
}

void Rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t m,
          int64_t k, int64_t n, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < m; r += kRowsPerGroup) {
    const float* xr = x + r * k;
    float* yr = y + r * n;
    switch (m - r >= kRowsPerGroup ? kRowsPerGroup : m - r) {
      case 4: Block<4>(xr, q, scale, yr, k, n, n0, n1); break;
      case 3: Block<3>(xr, q, scale, yr, k, n, n0, n1); break;
      case 2: Block<2>(xr, q, scale, yr, k, n, n0, n1); break;
      default: Block<1>(xr, q, scale, yr, k, n, n0, n1); break;
    }
  }
}

// Chunks handed out by an atomic counter; late pool tasks find none left and return,
// touching only the shared state, so the caller waits for finished chunks, not tasks.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks = 0;
  std::mutex mu;
  std::condition_variable cv;
};

void RunChunks(Work& work, const float* x, const int8_t* q, const float* scale, float* y,
               int64_t m, int64_t k, int64_t n, int64_t chunk) {
  for (;;) {
    int64_t c = work.next.fetch_add(1);
    if (c >= work.chunks) return;
    int64_t n0 = c * chunk, n1 = n0 + chunk < n ? n0 + chunk : n;
    Rows(x, q, scale, y, m, k, n, n0, n1);
    if (work.done.fetch_add(1) + 1 == work.chunks) {
      std::lock_guard<std::mutex> lock(work.mu);
      work.cv.notify_all();
    }
  }
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                          ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || xd[1] != qd[1] || scale.element_count() != qd[0])
    return ffi::Error::InvalidArgument("int8 matmul: x [m, k], q [n, k], scale [n]");
  const int64_t m = xd[0], k = xd[1], n = qd[0];
  const float* xp = x.typed_data();
  const int8_t* qp = q.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  // ~64 KB of weights a chunk: enough chunks to balance, few enough to be cheap to hand out
  int64_t chunk = (64 * 1024) / (k > 0 ? k : 1);
  chunk = chunk < 16 ? 16 : (chunk + 15) / 16 * 16;
  auto work = std::make_shared<Work>();
  work->chunks = (n + chunk - 1) / chunk;
  int64_t helpers = pool.num_threads();
  if (helpers > work->chunks - 1) helpers = work->chunks - 1;
  for (int64_t i = 0; i < helpers; ++i)
    pool.Schedule([=] { RunChunks(*work, xp, qp, sp, yp, m, k, n, chunk); });
  RunChunks(*work, xp, qp, sp, yp, m, k, n, chunk);
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->chunks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxserveInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
