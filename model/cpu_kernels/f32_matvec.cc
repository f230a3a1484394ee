// Few-row float32 matmuls on CPU: a batch-1 (or few-row) decode step's products, which read
// every weight once and do two flops per 4 bytes, so only the rate at which the weights
// stream from memory counts. XLA:CPU's one-row dot reads them at a third to two thirds of
// what this machine's memory gives (docs/speed.md, "Float32 matvec on CPU"); these loops read
// each weight as a few long sequential streams the hardware prefetchers follow, split over
// the calling thread and XLA's intra-op pool (parallel.h). Two layouts:
//   KN: y[m, n] = sum_k x[m, k] * w[k, n]   (a layer's weight, [in, out])
//   NK: y[m, n] = sum_k x[m, k] * w[n, k]   (the tied embedding as the LM head, [vocab, embed])
// Every output is summed in one fixed order whatever the threads do, so results are the
// same from call to call (KN's partial sums over input chunks are added in chunk order).
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;          // a guard: the Python side sends at most 4 rows
constexpr int64_t kTileBytes = 256 * 1024;
constexpr int64_t kMaxTiles = 16;
constexpr int64_t kColumns = 4096;        // a KN tile's widest column span (16 KB a row)
constexpr int64_t kBlock = 256;           // columns a block keeps in L1 across the rows

// acc[r, c0:c1] = x[r, i0:i1] @ w[i0:i1, c0:c1] (acc's row stride n), one input row of w
// at a time: each row's span is read front to back, one sequential stream, which the
// hardware prefetchers follow (four rows side by side ran at half the rate); a block of
// kBlock columns stays in L1 across the rows of x.
void KnTile(const float* x, const float* w, float* acc, int64_t m, int64_t k, int64_t n,
            int64_t i0, int64_t i1, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < m; ++r) std::memset(acc + r * n + c0, 0, (c1 - c0) * sizeof(float));
  for (int64_t i = i0; i < i1; ++i) {
    const float* wi = w + i * n;
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t b1 = b0 + kBlock < c1 ? b0 + kBlock : c1;
      for (int64_t r = 0; r < m; ++r) {
        const float xi = x[r * k + i];
        float* a = acc + r * n;
#pragma omp simd
        for (int64_t c = b0; c < b1; ++c) a[c] += xi * wi[c];
      }
    }
  }
}

void RunKn(ffi::ThreadPool& pool, const float* xp, const float* wp, float* yp, int64_t m,
           int64_t k, int64_t n) {
  if (k == 0) {
    std::memset(yp, 0, m * n * sizeof(float));
    return;
  }
  // Tiles: column spans of at most kColumns, and input spans splitting each into enough
  // tiles of >= kTileBytes for both threads to stay busy. Input span 0 writes y; span j > 0
  // its own partial buffer, added into y in order afterwards.
  const int64_t col_spans = (n + kColumns - 1) / kColumns;
  const int64_t width = ((n + col_spans - 1) / col_spans + 15) / 16 * 16;
  int64_t want = k * n * 4 / kTileBytes;
  want = want < 1 ? 1 : (want > kMaxTiles ? kMaxTiles : want);
  int64_t row_spans = (want + col_spans - 1) / col_spans;
  if (row_spans > k / 4) row_spans = k / 4 > 0 ? k / 4 : 1;
  const int64_t rows = ((k + row_spans - 1) / row_spans + 3) / 4 * 4;
  row_spans = (k + rows - 1) / rows;
  std::vector<float> partial((row_spans - 1) * m * n);
  flaxserve::ParallelFor(pool, row_spans * col_spans, [=, &partial](int64_t t) {
    const int64_t rs = t / col_spans, cs = t % col_spans;
    const int64_t i0 = rs * rows, i1 = i0 + rows < k ? i0 + rows : k;
    const int64_t c0 = cs * width, c1 = c0 + width < n ? c0 + width : n;
    float* acc = rs == 0 ? yp : partial.data() + (rs - 1) * m * n;
    KnTile(xp, wp, acc, m, k, n, i0, i1, c0, c1);
  });
  for (int64_t rs = 1; rs < row_spans; ++rs) {
    const float* p = partial.data() + (rs - 1) * m * n;
#pragma omp simd
    for (int64_t j = 0; j < m * n; ++j) yp[j] += p[j];
  }
}

// x[0:k] . w[0:k] in one fixed order: four partial sums, 64 inputs a step (the AVX-512 loop
// keeps four vector accumulators: one would be a chain of dependent multiply-adds).
inline float Dot(const float* x, const float* w, int64_t k) {
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t c = 0;
  for (; c + 64 <= k; c += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), _mm512_loadu_ps(w + c), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 16), _mm512_loadu_ps(w + c + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 32), _mm512_loadu_ps(w + c + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 48), _mm512_loadu_ps(w + c + 48), a3);
  }
  for (; c < k; c += 16) {
    const __mmask16 mask = k - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k - c)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + c), _mm512_maskz_loadu_ps(mask, w + c), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  const int64_t q = k / 4;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < q; ++c) {
    s0 += x[c] * w[c];
    s1 += x[q + c] * w[q + c];
    s2 += x[2 * q + c] * w[2 * q + c];
    s3 += x[3 * q + c] * w[3 * q + c];
  }
  for (int64_t c = 4 * q; c < k; ++c) s0 += x[c] * w[c];
  return (s0 + s1) + (s2 + s3);
#endif
}

// y[r, n0:n1] = x[r] . w[j] for each output channel j in the span: the channels' rows lie
// one after another, so the span is one sequential stream; a row stays in L1 for the rows
// of x after the first.
void NkSpan(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n,
            int64_t n0, int64_t n1) {
  for (int64_t j = n0; j < n1; ++j)
    for (int64_t r = 0; r < m; ++r) y[r * n + j] = Dot(x + r * k, w + j * k, k);
}

void RunNk(ffi::ThreadPool& pool, const float* xp, const float* wp, float* yp, int64_t m,
           int64_t k, int64_t n) {
  // spans of ~kTileBytes of weights
  int64_t span = kTileBytes / (k > 0 ? 4 * k : 4);
  span = span < 1 ? 1 : span;
  const int64_t spans = (n + span - 1) / span;
  flaxserve::ParallelFor(pool, spans, [=](int64_t t) {
    const int64_t n0 = t * span, n1 = n0 + span < n ? n0 + span : n;
    NkSpan(xp, wp, yp, m, k, n, n0, n1);
  });
}

// One handler body for both layouts: w is [k, n] (KN) or, `kNk`, [n, k].
template <bool kNk>
ffi::Error MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[kNk ? 1 : 0] || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument(kNk ? "f32 matvec: x [m <= 8, k], w [n, k]"
                                           : "f32 matvec: x [m <= 8, k], w [k, n]");
  const int64_t m = xd[0], k = xd[1], n = wd[kNk ? 0 : 1];
  if (m == 0 || n == 0) return ffi::Error::Success();
  (kNk ? RunNk : RunKn)(pool, x.typed_data(), w.typed_data(), y->typed_data(), m, k, n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxserveF32MatvecKn, MatvecImpl<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxserveF32MatvecNk, MatvecImpl<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

