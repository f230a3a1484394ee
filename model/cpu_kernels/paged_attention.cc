// out[b, h, g] = softmax over j < lengths[b] of q[b, h, g] . K[b, j, h] / sqrt(hd), times V:
// one decode query per row against its keys and values read where they lie in the paged
// pool, through the row's block table (key j: block tables[b, j / bs], offset j % bs).
// XLA:CPU's path gathers each row's blocks into a contiguous copy, masks a second copy and
// runs the products kv_heads times over (model/decoder.py `one_query_attention`); here each
// key and value is read once, from the pool itself. One task per (row, kv head), handed out
// by an atomic counter to the calling thread and XLA's intra-op pool (parallel.h).
// A dense cache [slots, max_len, kvh, hd] is the same pool with one block per slot.
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

struct Shape {
  int64_t rows, kvh, g, hd, num_blocks, bs, max_blocks;
};

inline float Dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Row b, kv head h: its g query heads against keys [0, len).
void Task(const Shape& sh, const float* q, const float* kp, const float* vp,
          const int32_t* tables, int64_t len, int64_t b, int64_t h, float* out,
          std::vector<float>& scores) {
  const int64_t g = sh.g, hd = sh.hd;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const float* qh = q + ((b * sh.kvh + h) * g) * hd;
  float* oh = out + ((b * sh.kvh + h) * g) * hd;
  scores.resize(len * g);
  const int32_t* row = tables + b * sh.max_blocks;
  auto at = [&](const float* pool, int64_t j) {
    int64_t blk = row[j / sh.bs];
    if (blk < 0 || blk >= sh.num_blocks) blk = 0;          // never out of the pool
    return pool + ((blk * sh.bs + j % sh.bs) * sh.kvh + h) * hd;
  };
  std::vector<float> mx(g, -INFINITY), sum(g, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const float* kj = at(kp, j);
    for (int64_t i = 0; i < g; ++i) {
      float s = Dot(qh + i * hd, kj, hd) * scale;
      scores[j * g + i] = s;
      mx[i] = std::max(mx[i], s);
    }
  }
  for (int64_t j = 0; j < len; ++j)
    for (int64_t i = 0; i < g; ++i) {
      float p = std::exp(scores[j * g + i] - mx[i]);
      scores[j * g + i] = p;
      sum[i] += p;
    }
  std::fill(oh, oh + g * hd, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const float* vj = at(vp, j);
    for (int64_t i = 0; i < g; ++i) {
      const float p = scores[j * g + i];
      float* o = oh + i * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) o[d] += p * vj[d];
    }
  }
  for (int64_t i = 0; i < g; ++i) {
    const float inv = 1.f / sum[i];
    float* o = oh + i * hd;
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
  }
}

#if defined(__AVX512F__)
using flaxserve::Sum16;

// e^x for x <= 0 (a softmax's shifted scores): 2^n * 2^f, f in [-0.5, 0.5], a degree-6
// polynomial for 2^f (relative error ~2e-7, float32's own rounding); below -87 it is 0.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// o = inv * sum over j < len of p[j] * V[j], head_dim = 16 * C
template <int C, typename At>
inline void WeightedSum(const float* p, const float* vp, const At& at, int64_t len, float* o,
                        __m512 inv) {
  __m512 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    const float* vj = at(vp, j);
    const __m512 pj = _mm512_set1_ps(p[j]);
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 16 * c), acc[c]);
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[c], inv));
}

// Task with 16-wide vectors, for head_dim a multiple of 16: per query head, 16 keys' dot
// products at a time (one accumulator each, summed by Sum16), the softmax over the row's
// scores 16 at a time, then each value row added into the g outputs (held in registers
// for head_dim 64).
void TaskAvx512(const Shape& sh, const float* q, const float* kp, const float* vp,
                const int32_t* tables, int64_t len, int64_t b, int64_t h, float* out,
                std::vector<float>& scores) {
  const int64_t g = sh.g, hd = sh.hd, chunks = hd / 16;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const float* qh = q + ((b * sh.kvh + h) * g) * hd;
  float* oh = out + ((b * sh.kvh + h) * g) * hd;
  const int64_t padded = (len + 15) / 16 * 16;
  scores.resize(g * padded);
  const int32_t* row = tables + b * sh.max_blocks;
  auto at = [&](const float* pool, int64_t j) {
    int64_t blk = row[j / sh.bs];
    if (blk < 0 || blk >= sh.num_blocks) blk = 0;          // never out of the pool
    return pool + ((blk * sh.bs + j % sh.bs) * sh.kvh + h) * hd;
  };
  const float* keys[16];
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, len - j0);
    for (int64_t jj = 0; jj < 16; ++jj) keys[jj] = at(kp, j0 + (jj < nj ? jj : 0));
    for (int64_t i = 0; i < g; ++i) {
      const float* qi = qh + i * hd;
      __m512 acc[16];
      for (int jj = 0; jj < 16; ++jj) acc[jj] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 qv = _mm512_loadu_ps(qi + 16 * c);
        for (int jj = 0; jj < 16; ++jj)
          acc[jj] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(keys[jj] + 16 * c), acc[jj]);
      }
      _mm512_storeu_ps(scores.data() + i * padded + j0,
                       _mm512_mul_ps(Sum16(acc), _mm512_set1_ps(scale)));
    }
  }
  float sum[16];
  for (int64_t i = 0; i < g; ++i) {
    float* si = scores.data() + i * padded;
    const __mmask16 tail = static_cast<__mmask16>((1u << (len % 16 ? len % 16 : 16)) - 1);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < padded; j0 += 16)
      mx = _mm512_mask_max_ps(mx, j0 + 16 >= padded ? tail : 0xFFFF, mx,
                              _mm512_loadu_ps(si + j0));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < padded; j0 += 16) {
      __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(si + j0), m));
      e = _mm512_maskz_mov_ps(j0 + 16 >= padded ? tail : 0xFFFF, e);   // padding: 0
      _mm512_storeu_ps(si + j0, e);
      acc = _mm512_add_ps(acc, e);
    }
    sum[i] = _mm512_reduce_add_ps(acc);
  }
  // per query head, its output in registers (C = head_dim / 16 vectors) over the values
  for (int64_t i = 0; i < g; ++i) {
    const float* pi = scores.data() + i * padded;
    float* o = oh + i * hd;
    const __m512 inv = _mm512_set1_ps(1.f / sum[i]);
    switch (chunks) {
      case 4: WeightedSum<4>(pi, vp, at, len, o, inv); break;
      case 8: WeightedSum<8>(pi, vp, at, len, o, inv); break;
      default:
        for (int64_t c = 0; c < chunks; c += 2) {        // two vectors at a time
          const int64_t nc = std::min<int64_t>(2, chunks - c);
          __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
          for (int64_t j = 0; j < len; ++j) {
            const float* vj = at(vp, j) + 16 * c;
            const __m512 pj = _mm512_set1_ps(pi[j]);
            a0 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj), a0);
            if (nc == 2) a1 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 16), a1);
          }
          _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(a0, inv));
          if (nc == 2) _mm512_storeu_ps(o + 16 * c + 16, _mm512_mul_ps(a1, inv));
        }
    }
  }
}
#endif

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                              ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> lengths,
                              ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), td = tables.dimensions();
  auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || vd.size() != 4 ||
      !std::equal(vd.begin(), vd.end(), kd.begin()) ||
      td[0] != qd[0] || lengths.element_count() != qd[0] || kd[2] != qd[1] || kd[3] != qd[3])
    return ffi::Error::InvalidArgument(
        "paged attention: q [B, kvh, g, hd], pools [blocks, bs, kvh, hd], tables [B, n], "
        "lengths [B]");
  Shape sh{qd[0], qd[1], qd[2], qd[3], kd[0], kd[1], td[1]};
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const int32_t* tp = tables.typed_data();
  const int32_t* lp = lengths.typed_data();
  float* op = out->typed_data();
  const int64_t cap = sh.max_blocks * sh.bs;
  flaxserve::ParallelFor(pool, sh.rows * sh.kvh, [=](int64_t t) {
    thread_local std::vector<float> scores;
    const int64_t b = t / sh.kvh, h = t % sh.kvh;
    const int64_t len = std::min<int64_t>(std::max<int64_t>(lp[b], 1), cap);
#if defined(__AVX512F__)
    if (sh.hd % 16 == 0 && sh.g <= 16) {
      TaskAvx512(sh, qp, kp, vp, tp, len, b, h, op, scores);
    } else {
      Task(sh, qp, kp, vp, tp, len, b, h, op, scores);
    }
#else
    Task(sh, qp, kp, vp, tp, len, b, h, op, scores);
#endif
  }, /*every_thread=*/sh.rows > 4);    // as the int8 kernel: a big batch is compute-bound
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxservePagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
