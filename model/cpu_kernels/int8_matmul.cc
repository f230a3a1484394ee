// y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]: a weight-only int8 matmul on CPU, for a
// decode step's few rows and a prefill chunk's many. q holds one output channel per row
// (int8, contiguous along k), so each weight byte is read once per call (a weight chunk
// stays in L2 while the groups of rows pass over it). The output channels are split in
// chunks over the calling thread and XLA's intra-op thread pool (model/int8_kernel.py
// builds and registers this file). Two inner loops, picked when this file is compiled for
// the machine (-march=native): AVX-512 VNNI where the CPU has it (Zen 4, Ice Lake and
// later), else AVX2 (a scalar loop without either).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerGroup = 4;

// Each row of x is first scaled to int16 (its own scale, max|x| / 32767: a relative error
// under 2e-5 of the row's largest entry, far below the weights' int8 step), so a product
// of 16 weights is one widening load, one multiply-add of int16 pairs (to int32) and one
// add, half the instructions of converting every weight to float for an FMA. The int32
// sums are moved into float every kFlush inputs, before they could overflow (a pair of
// products is at most 2 * 127 * 32767).
constexpr int64_t kFlush = 2048;

// MB rows of xq (int16, stride k) against output channels [n0, n1); V independent
// accumulators a row (V = 4 for one row: a batch-1 step is otherwise a dependent chain).
template <int MB>
void Block(const int16_t* xq, const float* xs, const int8_t* q, const float* scale, float* y,
           int64_t k, int64_t n_total, int64_t n0, int64_t n1) {
  constexpr int V = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * k;
    float out[MB];
    int64_t kk = 0;
#if defined(__AVX2__)
    __m256 accf[MB];
    for (int r = 0; r < MB; ++r) accf[r] = _mm256_setzero_ps();
    while (kk + 16 * V <= k) {
      __m256i acc[MB][V];
      for (int r = 0; r < MB; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_si256();
      const int64_t end = kk + kFlush < k ? kk + kFlush : k;
      for (; kk + 16 * V <= end; kk += 16 * V) {
        __m256i wv[V];
        for (int v = 0; v < V; ++v)
          wv[v] = _mm256_cvtepi8_epi16(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kk + 16 * v)));
        for (int r = 0; r < MB; ++r)
          for (int v = 0; v < V; ++v)
            acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(wv[v], _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(xq + r * k + kk + 16 * v))));
      }
      for (int r = 0; r < MB; ++r)
        for (int v = 0; v < V; ++v)
          accf[r] = _mm256_add_ps(accf[r], _mm256_cvtepi32_ps(acc[r][v]));
    }
    for (int r = 0; r < MB; ++r) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(accf[r]), _mm256_extractf128_ps(accf[r], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      out[r] = _mm_cvtss_f32(h);
    }
#else
    for (int r = 0; r < MB; ++r) out[r] = 0.f;
#endif
    for (int r = 0; r < MB; ++r) {
      int64_t tail = 0;
      for (int64_t j = kk; j < k; ++j) tail += static_cast<int64_t>(xq[r * k + j]) * w[j];
      y[r * n_total + n] = (out[r] + static_cast<float>(tail)) * xs[r] * scale[n];
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
// With AVX-512 VNNI one instruction (vpdpwssd) multiplies 32 int16 pairs and adds them into
// 16 int32 lanes, four times the products per instruction of the AVX2 loop above. A block
// is MB rows x NB output channels (MB * NB <= 16 accumulators in registers): each 32 inputs
// cost NB widened weight loads, MB activation loads and MB * NB multiply-adds, so over a
// prefill chunk each loaded weight serves four rows and each loaded activation four
// channels. Inputs past k are masked off (zeros), so no scalar tail. The 16 accumulators'
// lanes are summed by one transpose-and-add tree (Sum16) at each flush.
constexpr int kVnniRows = 4;

using flaxserve::Sum16;

template <int MB, int NB>
void VnniBlock(const int16_t* xq, const float* xs, const int8_t* q, const float* scale,
               float* y, int64_t k, int64_t n_total, int64_t n) {
  static_assert(MB * NB <= 16, "16 accumulators at most");
  __m512 total = _mm512_setzero_ps();
  const char* next = reinterpret_cast<const char*>(q + (n + NB) * k);
  for (int64_t k0 = 0; k0 < k; k0 += kFlush) {
    const int64_t end = k0 + kFlush < k ? k0 + kFlush : k;
    __m512i acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t kk = k0; kk < end; kk += 32) {
      // the block reads NB rows side by side, which the hardware prefetchers do not follow:
      // fetch the next block's bytes (contiguous) at the pace this one is read
      for (int c = 0; c < (NB + 1) / 2; ++c)
        _mm_prefetch(next + (kk * NB) + 64 * c, _MM_HINT_T0);
      const int64_t left = end - kk;
      const __mmask32 mask = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
      __m512i xv[MB];
      for (int r = 0; r < MB; ++r) xv[r] = _mm512_maskz_loadu_epi16(mask, xq + r * k + kk);
      for (int c = 0; c < NB; ++c) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, q + (n + c) * k + kk));
        for (int r = 0; r < MB; ++r)
          acc[r * NB + c] = _mm512_dpwssd_epi32(acc[r * NB + c], wv, xv[r]);
      }
    }
    __m512 f[16];
    for (int i = 0; i < 16; ++i) f[i] = _mm512_cvtepi32_ps(acc[i]);
    total = _mm512_add_ps(total, Sum16(f));
  }
  alignas(64) float sums[16];
  _mm512_store_ps(sums, total);
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NB; ++c)
      y[r * n_total + n + c] = sums[r * NB + c] * xs[r] * scale[n + c];
}

template <int MB>
void VnniRows(const int16_t* xq, const float* xs, const int8_t* q, const float* scale,
              float* y, int64_t k, int64_t n_total, int64_t n0, int64_t n1) {
  constexpr int NB = MB == 2 ? 8 : 4;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) VnniBlock<MB, NB>(xq, xs, q, scale, y, k, n_total, n);
  for (; n < n1; ++n) VnniBlock<MB, 1>(xq, xs, q, scale, y, k, n_total, n);
}
#endif

// Row r of x as int16 with its scale.
void QuantizeRows(const float* x, int64_t m, int64_t k, int16_t* xq, float* xs) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    float amax = 0.f;
    int64_t j = 0;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps();
    for (; j + 16 <= k; j += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + j)));
    amax = _mm512_reduce_max_ps(vmax);
#endif
    for (; j < k; ++j) amax = std::max(amax, std::fabs(xr[j]));
    const float s = amax > 0.f ? amax / 32767.f : 1.f;
    const float inv = 1.f / s;
    j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // |x| * inv <= 32767 by construction: the saturating pack keeps the clamp exact
    for (; j + 16 <= k; j += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + j), _mm512_set1_ps(inv)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + r * k + j), _mm512_cvtsepi32_epi16(v));
    }
#endif
    for (; j < k; ++j) {
      float v = std::nearbyint(xr[j] * inv);
      v = std::min(32767.f, std::max(-32767.f, v));
      xq[r * k + j] = static_cast<int16_t>(v);
    }
    xs[r] = s;
  }
}

void Rows(const int16_t* xq, const float* xs, const int8_t* q, const float* scale, float* y,
          int64_t m, int64_t k, int64_t n, int64_t n0, int64_t n1) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
  for (int64_t r = 0; r < m; r += kVnniRows) {
    const int16_t* xr = xq + r * k;
    float* yr = y + r * n;
    switch (m - r >= kVnniRows ? kVnniRows : m - r) {
      case 4: VnniRows<4>(xr, xs + r, q, scale, yr, k, n, n0, n1); break;
      case 3: VnniRows<3>(xr, xs + r, q, scale, yr, k, n, n0, n1); break;
      case 2: VnniRows<2>(xr, xs + r, q, scale, yr, k, n, n0, n1); break;
      default: VnniRows<1>(xr, xs + r, q, scale, yr, k, n, n0, n1); break;
    }
  }
  return;
#endif
  for (int64_t r = 0; r < m; r += kRowsPerGroup) {
    const int16_t* xr = xq + r * k;
    float* yr = y + r * n;
    switch (m - r >= kRowsPerGroup ? kRowsPerGroup : m - r) {
      case 4: Block<4>(xr, xs + r, q, scale, yr, k, n, n0, n1); break;
      case 3: Block<3>(xr, xs + r, q, scale, yr, k, n, n0, n1); break;
      case 2: Block<2>(xr, xs + r, q, scale, yr, k, n, n0, n1); break;
      default: Block<1>(xr, xs + r, q, scale, yr, k, n, n0, n1); break;
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
  std::vector<int16_t> xq_buf(m * k);
  std::vector<float> xs_buf(m);
  QuantizeRows(xp, m, k, xq_buf.data(), xs_buf.data());
  const int16_t* xq = xq_buf.data();
  const float* xs = xs_buf.data();
  flaxserve::ParallelFor(pool, (n + chunk - 1) / chunk, [=](int64_t c) {
    const int64_t n0 = c * chunk, n1 = n0 + chunk < n ? n0 + chunk : n;
    Rows(xq, xs, qp, sp, yp, m, k, n, n0, n1);
  }, /*every_thread=*/m > 4);
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

// Which inner loop this build runs (model/int8_kernel.py `vector_path`).
extern "C" const char* FlaxserveInt8Path() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
  return "avx512-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}
