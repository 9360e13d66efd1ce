// One decode step of a Llama-style decoder in one call: every layer of every sequence without returning to
// Python (lmforge.inference.native loads it; the engine falls back to the PyTorch path where it cannot build).
//
// Decoding one token per sequence is a matrix-vector product per weight, bound by how fast the weights stream
// from memory, plus ~45 small operators per layer that PyTorch dispatches one by one. Here each weight is read
// once per step in its stored precision (float32, bfloat16, int8 / uint8 codes, or two int4 codes per byte,
// with float16 group scales and mins as transforms/quant.py stores them), widened to float32 in registers and
// accumulated in float32; norms, rotary, SiLU·up, residuals and attention over the paged KV blocks (read in
// place, no gather) are plain loops. With `round_bf16` every intermediate the PyTorch bfloat16 path stores in
// bfloat16 is rounded to bfloat16 at the same place, so both paths agree to bfloat16 rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

enum Kind { F32, BF16, I8, U8, U4 };

struct Linear {
  Kind kind;
  const uint8_t* w;        // (out, row_bytes)
  int64_t out, in, row_bytes, groups;
  const at::Half* scale;   // (out, groups), null for float weights
  const at::Half* mn;      // (out, groups), null unless asymmetric
  at::Tensor bias;         // (out) float32, undefined if none
};

template <int K> inline __m512 load16(const uint8_t* row, int64_t j);
template <> inline __m512 load16<F32>(const uint8_t* row, int64_t j) {
  return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + j);
}
template <> inline __m512 load16<BF16>(const uint8_t* row, int64_t j) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + j));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
template <> inline __m512 load16<I8>(const uint8_t* row, int64_t j) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j))));
}
template <> inline __m512 load16<U8>(const uint8_t* row, int64_t j) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j))));
}
template <> inline __m512 load16<U4>(const uint8_t* row, int64_t j) {  // low nibble = even column
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j / 2));
  __m128i m = _mm_set1_epi8(0x0F);
  __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c));
}

inline float bf16_round(float v) { return static_cast<float>(c10::BFloat16(v)); }

// y[m, n] = sum_k x[m, k] w[n, k] (+ bias) for rows m0..m0+MT of x and outputs n0..n1. Float weights: two
// accumulators (even and odd 16-column chunks) per row of x. Integer codes: each 16-column chunk is widened and
// multiplied by its group's scale (the row's float16 scales widened 16 at a time first), then accumulated the
// same way; the asymmetric (or int4 symmetric, q = code - 8) offset adds min * sum(x over the group).
template <int KIND, int MT>
void rows(const Linear& L, const float* x, const float* xsum, float* y, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t in = L.in, G = L.groups, gs = in / G;
  constexpr bool quant = KIND != F32 && KIND != BF16;
  const float* bias = L.bias.defined() ? L.bias.data_ptr<float>() : nullptr;
  std::vector<float> sc(quant ? G + 16 : 0), of(quant ? G + 16 : 0);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = L.w + n * L.row_bytes;
    if (quant) {
      const at::Half* srow = L.scale + n * G;
      int64_t g = 0;
      for (; g + 16 <= G; g += 16)
        _mm512_storeu_ps(sc.data() + g, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(srow + g))));
      for (; g < G; ++g) sc[g] = static_cast<float>(srow[g]);
      for (g = 0; g < G; ++g)
        of[g] = L.mn ? static_cast<float>(L.mn[n * G + g]) : (KIND == U4 ? -8.f * sc[g] : 0.f);
    }
    __m512 a[MT], b[MT];
    for (int m = 0; m < MT; ++m) a[m] = _mm512_setzero_ps(), b[m] = _mm512_setzero_ps();
    int64_t j = 0, g = 0, gend = gs;  // the group of column j, and where it ends
    __m512 sv = _mm512_set1_ps(quant ? sc[0] : 1.f);
    for (; j + 32 <= in; j += 32) {
      __m512 w0 = load16<KIND>(row, j), w1 = load16<KIND>(row, j + 16);
      if (quant) {
        if (j == gend) sv = _mm512_set1_ps(sc[++g]), gend += gs;
        w0 = _mm512_mul_ps(w0, sv);
        if (j + 16 == gend) sv = _mm512_set1_ps(sc[++g]), gend += gs;
        w1 = _mm512_mul_ps(w1, sv);
      }
      for (int m = 0; m < MT; ++m) {
        const float* xr = x + (m0 + m) * in + j;
        a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a[m]);
        b[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), b[m]);
      }
    }
    if (j < in) {
      __m512 w0 = load16<KIND>(row, j);
      if (quant) w0 = _mm512_mul_ps(w0, j == gend ? _mm512_set1_ps(sc[++g]) : sv);
      for (int m = 0; m < MT; ++m) a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (m0 + m) * in + j), a[m]);
    }
    for (int m = 0; m < MT; ++m) {
      float extra = 0.f;
      if (quant && (L.mn || KIND == U4))
        for (int64_t g = 0; g < G; ++g) extra += of[g] * xsum[(m0 + m) * G + g];
      y[(m0 + m) * L.out + n] = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m])) + extra + (bias ? bias[n] : 0.f);
    }
  }
}

// One core keeps too few cache-line misses in flight to stream at the memory's bandwidth with the hardware
// prefetcher alone (about 10 GB/s per core here); prefetching the weight stream this many bytes ahead reaches
// it (a 57 MB bf16 head: 16 -> 23 GB/s on 2 cores, as fast as a float32 sum).
constexpr int64_t PREFETCH = 8192;
template <int KIND> constexpr int ESZ = KIND == F32 ? 4 : 2;  // bytes per weight

// y[n] = sum_k x[k] w[n, k] (+ bias) for one row of x and float weights: four output rows at a time, each with
// its own accumulator, so the loads of four weight rows are in flight together and no FMA waits on the last.
template <int KIND>
void rows_single(const Linear& L, const float* x, float* y, int64_t n0, int64_t n1) {
  const int64_t in = L.in;
  const float* bias = L.bias.defined() ? L.bias.data_ptr<float>() : nullptr;
  int64_t n = n0;
  const char* first = reinterpret_cast<const char*>(L.w + n0 * L.row_bytes);
  for (int64_t b = 0; b < std::min<int64_t>(PREFETCH, (n1 - n0) * L.row_bytes); b += 64)
    _mm_prefetch(first + b, _MM_HINT_T0);  // the first rows, before the loop's prefetches run ahead of them
  for (; n + 4 <= n1; n += 4) {
    const uint8_t* r = L.w + n * L.row_bytes;
    const int64_t rb = L.row_bytes;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const char* pf = reinterpret_cast<const char*>(r) + PREFETCH;
    for (int64_t j = 0; j < in; j += 16, pf += 64 * ESZ<KIND>) {
      for (int c = 0; c < ESZ<KIND>; ++c) _mm_prefetch(pf + 64 * c, _MM_HINT_T0);
      const __m512 xv = _mm512_loadu_ps(x + j);
      a0 = _mm512_fmadd_ps(load16<KIND>(r, j), xv, a0);
      a1 = _mm512_fmadd_ps(load16<KIND>(r + rb, j), xv, a1);
      a2 = _mm512_fmadd_ps(load16<KIND>(r + 2 * rb, j), xv, a2);
      a3 = _mm512_fmadd_ps(load16<KIND>(r + 3 * rb, j), xv, a3);
    }
    y[n] = _mm512_reduce_add_ps(a0) + (bias ? bias[n] : 0.f);
    y[n + 1] = _mm512_reduce_add_ps(a1) + (bias ? bias[n + 1] : 0.f);
    y[n + 2] = _mm512_reduce_add_ps(a2) + (bias ? bias[n + 2] : 0.f);
    y[n + 3] = _mm512_reduce_add_ps(a3) + (bias ? bias[n + 3] : 0.f);
  }
  if (n < n1) rows<KIND, 1>(L, x, nullptr, y, 0, n, n1);
}

// Weights of output rows [n0, n1) widened to float32 (integer codes times their group's scale, plus its offset),
// row after row, `in` floats each.
template <int KIND>
void widen(const Linear& L, int64_t n0, int64_t n1, float* out) {
  constexpr bool quant = KIND != F32 && KIND != BF16;
  const int64_t in = L.in, G = L.groups, gs = in / G;
  for (int64_t n = n0; n < n1; ++n, out += in) {
    const uint8_t* row = L.w + n * L.row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const float sc = quant ? static_cast<float>(L.scale[n * G + g]) : 1.f;
      const __m512 s = _mm512_set1_ps(sc);
      const __m512 off = _mm512_set1_ps(!quant ? 0.f : L.mn ? static_cast<float>(L.mn[n * G + g])
                                                      : KIND == U4 ? -8.f * sc : 0.f);
      for (int64_t j = g * gs; j < (g + 1) * gs; j += 16)
        _mm512_storeu_ps(out + j, quant ? _mm512_fmadd_ps(load16<KIND>(row, j), s, off) : load16<KIND>(row, j));
    }
  }
}

// y[c, r] = sum_k x[c, k] w[r, k] for R rows of float32 weights and C rows of x (both `in` apart): R x C
// accumulators, each weight and x vector loaded once per 16 columns for C and R FMAs.
template <int R, int C>
void tile(const float* w, const float* x, int64_t in, float* y, int64_t ystride) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < in; j += 16) {
    __m512 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm512_loadu_ps(x + c * in + j);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * in + j);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(wv, xv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[c * ystride + r] = _mm512_reduce_add_ps(acc[r][c]);
}

using Tile = void (*)(const float*, const float*, int64_t, float*, int64_t);
constexpr Tile TILES[4][4] = {{tile<1, 1>, tile<1, 2>, tile<1, 3>, tile<1, 4>},
                              {tile<2, 1>, tile<2, 2>, tile<2, 3>, tile<2, 4>},
                              {tile<3, 1>, tile<3, 2>, tile<3, 3>, tile<3, 4>},
                              {tile<4, 1>, tile<4, 2>, tile<4, 3>, tile<4, 4>}};

// Many rows of x (M >= MULTI): output rows go in blocks of about BLOCK bytes of float32 weights, widened once per
// block (float32 weights read in place); each 4 weight rows of a block meet every row of x, 4 at a time, while
// they are in L1. The weights stream from memory once and each widening serves all M rows.
constexpr int64_t BLOCK = 65536;

template <int KIND>
void rows_multi(const Linear& L, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  const int64_t in = L.in, nb = std::max<int64_t>(4, BLOCK / (4 * in) / 4 * 4);
  thread_local std::vector<float> buf;
  if (KIND != F32) buf.resize(nb * in);
  const float* bias = L.bias.defined() ? L.bias.data_ptr<float>() : nullptr;
  for (int64_t b0 = n0; b0 < n1; b0 += nb) {
    const int64_t b1 = std::min(n1, b0 + nb);
    const float* w = reinterpret_cast<const float*>(L.w + b0 * L.row_bytes);
    if (KIND != F32) widen<KIND>(L, b0, b1, buf.data()), w = buf.data();
    for (int64_t r0 = b0; r0 < b1; r0 += 4)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t rc = std::min<int64_t>(4, b1 - r0), mc = std::min<int64_t>(4, M - m0);
        TILES[rc - 1][mc - 1](w + (r0 - b0) * in, x + m0 * in, in, y + m0 * L.out + r0, L.out);
      }
  }
  if (bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) y[m * L.out + n] += bias[n];
}

// A few rows of x (M < MULTI): each weight row is widened in registers for a tile of up to 4 rows of x.
template <int KIND>
void rows_tiled(const Linear& L, const float* x, const float* xs, int64_t M, float* y, int64_t n0, int64_t n1) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) rows<KIND, 4>(L, x, xs, y, m0, n0, n1);
  switch (M - m0) {
    case 3: rows<KIND, 3>(L, x, xs, y, m0, n0, n1); break;
    case 2: rows<KIND, 2>(L, x, xs, y, m0, n0, n1); break;
    case 1: rows<KIND, 1>(L, x, xs, y, m0, n0, n1); break;
    default: break;
  }
}

// From this many rows of x on, widening blocks of weights once (rows_multi) beats widening each weight row in
// registers for every tile of 4 rows of x (rows_tiled). A bf16 49152 x 576 head on 2 cores: 16 rows 15.0 -> 7.4 ms,
// 8 rows 7.4 -> 4.9 ms; but 4 rows 4.1 -> 4.9 ms, 2 rows 3.5 -> 4.8 ms.
constexpr int64_t MULTI = 8;

template <int KIND>
void rows_of(const Linear& L, const float* x, const float* xs, int64_t M, float* y, int64_t n0, int64_t n1) {
  if constexpr (KIND == F32 || KIND == BF16)
    if (M == 1) return rows_single<KIND>(L, x, y, n0, n1);
  if (M < MULTI) return rows_tiled<KIND>(L, x, xs, M, y, n0, n1);
  rows_multi<KIND>(L, x, M, y, n0, n1);
}

void rows_any(const Linear& L, const float* x, const float* xs, int64_t M, float* y, int64_t n0, int64_t n1) {
  switch (L.kind) {
    case F32: return rows_of<F32>(L, x, xs, M, y, n0, n1);
    case BF16: return rows_of<BF16>(L, x, xs, M, y, n0, n1);
    case I8: return rows_of<I8>(L, x, xs, M, y, n0, n1);
    case U8: return rows_of<U8>(L, x, xs, M, y, n0, n1);
    case U4: return rows_of<U4>(L, x, xs, M, y, n0, n1);
  }
}

// The share of items [0, n) that thread t of a team of T takes: whole chunks of `grain`, contiguous.
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t grain, int t, int T) {
  const int64_t chunks = (n + grain - 1) / grain;
  return {std::min(n, chunks * t / T * grain), std::min(n, chunks * (t + 1) / T * grain)};
}

struct Job {
  const Linear* L;
  float* y;                 // (M, L->out)
  std::vector<float> sums;  // (M, groups) of x for integer codes, empty for float weights
};

// Sums of x (M, in) over each group of columns of an integer layer, for its offsets (empty for float weights).
void group_sums(Job& j, const float* x, int64_t M) {
  const Linear& L = *j.L;
  if (L.kind == F32 || L.kind == BF16) return;
  const int64_t G = L.groups, gs = L.in / G;
  j.sums.assign(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < gs; ++k) j.sums[m * G + g] += x[m * L.in + g * gs + k];
}

// Called by every thread of the team: layers that read the same input x (M, in) (q, k and v; gate and up) split
// their output rows, as one range, between the threads, so a small layer costs no fork, join or barrier of its own.
void linears(std::vector<Job>& js, const float* x, int64_t M, bool rnd, int t, int T) {
  int64_t total = 0;
  for (auto& j : js) total += j.L->out;
  const auto [a, b] = share(total, 16, t, T);
  int64_t start = 0;
  for (auto& j : js) {
    const int64_t lo = std::max(a, start) - start, hi = std::min(b, start + j.L->out) - start;
    if (lo < hi) {
      rows_any(*j.L, x, j.sums.data(), M, j.y, lo, hi);
      if (rnd)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = lo; n < hi; ++n) j.y[m * j.L->out + n] = bf16_round(j.y[m * j.L->out + n]);
    }
    start += j.L->out;
  }
}

// A linear layer from its four tensors (weight or codes, scale, min, bias; absent ones empty) and input width.
Linear make_linear(const std::vector<at::Tensor>& t, size_t i, int64_t in) {
  const at::Tensor &w = t[i], &scale = t[i + 1], &mn = t[i + 2], &bias = t[i + 3];
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && in % 16 == 0, "native decode: weight ", i, " unsupported");
  Linear L;
  L.w = static_cast<const uint8_t*>(w.data_ptr());
  L.out = w.size(0);
  L.in = in;
  L.row_bytes = w.size(1) * w.element_size();
  if (w.scalar_type() == at::kFloat) L.kind = F32;
  else if (w.scalar_type() == at::kBFloat16) L.kind = BF16;
  else if (w.scalar_type() == at::kChar) L.kind = I8;
  else if (w.scalar_type() == at::kByte) L.kind = w.size(1) * 2 == in ? U4 : U8;
  else TORCH_CHECK(false, "native decode: weight dtype ", w.scalar_type(), " unsupported");
  const bool quant = L.kind == I8 || L.kind == U8 || L.kind == U4;
  L.groups = quant ? scale.size(1) : 1;
  TORCH_CHECK(!quant || (scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                         (in / L.groups) % 16 == 0 && in % L.groups == 0), "native decode: scales of ", i);
  L.scale = quant ? scale.data_ptr<at::Half>() : nullptr;
  L.mn = quant && mn.numel() ? mn.data_ptr<at::Half>() : nullptr;
  if (bias.numel()) L.bias = bias.to(at::kFloat).contiguous();
  return L;
}

// A norm's weight, read in place in float32 or bfloat16.
struct NormWeight {
  const float* f = nullptr;
  const at::BFloat16* b = nullptr;
  explicit NormWeight(const at::Tensor& w) {
    TORCH_CHECK(w.is_contiguous() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
                "native decode: norm weight dtype ", w.scalar_type());
    if (w.scalar_type() == at::kFloat) f = w.data_ptr<float>();
    else b = w.data_ptr<at::BFloat16>();
  }
  float operator[](int64_t c) const { return f ? f[c] : static_cast<float>(b[c]); }
};

void rmsnorm(const float* x, const NormWeight& w, double eps, float* y, int64_t M, int64_t C, bool rnd) {
  for (int64_t m = 0; m < M; ++m) {
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(x[m * C + c]) * x[m * C + c];
    const float r = 1.f / std::sqrt(static_cast<float>(ss / C) + static_cast<float>(eps));
    for (int64_t c = 0; c < C; ++c) {
      const float v = x[m * C + c] * r * w[c];
      y[m * C + c] = rnd ? bf16_round(v) : v;
    }
  }
}

// Rotate the halves of each of `heads` vectors of width D at `v` by position `p` (Hugging Face layout).
void rope(float* v, int64_t heads, int64_t D, int64_t p, const float* inv_freq, bool rnd) {
  const int64_t h2 = D / 2;
  for (int64_t i = 0; i < h2; ++i) {
    const float ang = static_cast<float>(p) * inv_freq[i];
    float c = std::cos(ang), s = std::sin(ang);
    if (rnd) c = bf16_round(c), s = bf16_round(s);
    for (int64_t h = 0; h < heads; ++h) {
      float* x = v + h * D;
      const float a = x[i], b = x[i + h2];
      x[i] = a * c - b * s;
      x[i + h2] = b * c + a * s;
      if (rnd) x[i] = bf16_round(x[i]), x[i + h2] = bf16_round(x[i + h2]);
    }
  }
}

template <int KIND>
inline float dot(const float* q, const uint8_t* k, int64_t D) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; j += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), load16<KIND>(k, j), a);
  return _mm512_reduce_add_ps(a);
}

template <int KIND>
inline void axpy(float a, const uint8_t* v, float* y, int64_t D) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t j = 0; j < D; j += 16)
    _mm512_storeu_ps(y + j, _mm512_fmadd_ps(av, load16<KIND>(v, j), _mm512_loadu_ps(y + j)));
}

// Called by every thread of the team. Each sequence b attends with its H query heads (q (B, H*D)) over its keys
// 0..pos[b] (the last `window` only if window > 0), read in place from the pools (K, NB, bs, D) through its block
// table; out (B, H*D). The (sequence, head) pairs are split between the threads.
template <int KIND>
void attend(const float* q, const at::Tensor& kp, const at::Tensor& vp, const int64_t* pos, const int64_t* tables,
            int64_t nb, int64_t B, int64_t H, int64_t K, int64_t D, int64_t window, float* out, bool rnd, int t,
            int T) {
  const int64_t G = H / K, NB = kp.size(1), bs = kp.size(2), esz = kp.element_size();
  const uint8_t* kbase = static_cast<const uint8_t*>(kp.data_ptr());
  const uint8_t* vbase = static_cast<const uint8_t*>(vp.data_ptr());
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const auto [i0, i1] = share(B * H, 1, t, T);
  std::vector<float> p;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / H, h = i % H, kh = h / G, len = pos[b] + 1;
    const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    p.resize(len - start);
    const float* qh = q + (b * H + h) * D;
    float mx = -INFINITY;
    for (int64_t s = start; s < len; ++s) {
      const int64_t slot = (kh * NB + tables[b * nb + s / bs]) * bs + s % bs;
      p[s - start] = dot<KIND>(qh, kbase + slot * D * esz, D) * scale;
      mx = std::max(mx, p[s - start]);
    }
    float sum = 0.f;
    for (auto& e : p) sum += (e = std::exp(e - mx));
    float* o = out + (b * H + h) * D;
    std::fill(o, o + D, 0.f);
    for (int64_t s = start; s < len; ++s) {
      const int64_t slot = (kh * NB + tables[b * nb + s / bs]) * bs + s % bs;
      axpy<KIND>(p[s - start] / sum, vbase + slot * D * esz, o, D);
    }
    if (rnd)
      for (int64_t d = 0; d < D; ++d) o[d] = bf16_round(o[d]);
  }
}

void store(const float* src, at::Tensor& pool, int64_t kh, int64_t block, int64_t off, int64_t D) {
  const int64_t NB = pool.size(1), bs = pool.size(2);
  const int64_t at = ((kh * NB + block) * bs + off) * D;
  if (pool.scalar_type() == at::kBFloat16) {
    auto* d = pool.data_ptr<at::BFloat16>() + at;
    for (int64_t j = 0; j < D; ++j) d[j] = c10::BFloat16(src[j]);
  } else {
    std::copy(src, src + D, pool.data_ptr<float>() + at);
  }
}

}  // namespace

// A model's weights, held for every step: per layer [attn_norm, q, k, v, o, mlp_norm, gate, up, down] with each
// linear as four tensors (weight or codes, scale, min, bias), then the final norm; dims = [H, K, D, F, window,
// round_bf16]. The tensors are the model's own (no copy), so updates made in place are seen by the next step.
struct Decoder {
  std::vector<at::Tensor> weights;
  std::vector<int64_t> dims;
  double eps;

  Decoder(std::vector<at::Tensor> w, std::vector<int64_t> d, double e)
      : weights(std::move(w)), dims(std::move(d)), eps(e) {
    TORCH_CHECK(weights.size() % 30 == 1, "native decode: weight list length");
    TORCH_CHECK(dims[2] % 16 == 0 && dims[0] % dims[1] == 0, "native decode: head sizes");
  }

  // x (B, C) embeddings of the step's tokens; pos (B,) their positions; tables (B, nb) block tables; k/v pools
  // per layer (K, NB, bs, D) in bfloat16 or float32; head: the output projection's four tensors; inv_freq
  // (D/2,) the rotary frequencies. Writes this
  // step's keys and values into the pools and returns the logits (B, V) in float32. The whole step runs in one
  // parallel region: the threads split each layer's rows and meet at a barrier between dependent phases.
  at::Tensor step(at::Tensor x, at::Tensor pos, at::Tensor tables, std::vector<at::Tensor> kpool,
                  std::vector<at::Tensor> vpool, std::vector<at::Tensor> head_parts, at::Tensor inv_freq) const {
    at::NoGradGuard no_grad;
    x = x.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();  // (B, C), updated in place
    pos = pos.to(at::kLong).contiguous();
    tables = tables.to(at::kLong).contiguous();
    inv_freq = inv_freq.to(at::kFloat).contiguous();
    const int64_t B = x.size(0), C = x.size(1), H = dims[0], K = dims[1], D = dims[2], F = dims[3];
    const int64_t window = dims[4], layers = static_cast<int64_t>(kpool.size()), nb = tables.size(1);
    const bool rnd = dims[5] != 0;
    TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * 30 + 1 && vpool.size() == kpool.size(),
                "native decode: ", layers, " KV pools for ", weights.size() / 30, " layers");
    // every check before the parallel region, which must not throw
    std::vector<Linear> lin;  // per layer q, k, v, o, gate, up, down; then the head
    std::vector<NormWeight> norms;
    for (int64_t l = 0; l < layers; ++l) {
      const size_t w0 = l * 30;
      const at::Tensor &kp = kpool[l], &vp = vpool[l];
      TORCH_CHECK(kp.is_contiguous() && vp.is_contiguous() && kp.size(3) == D && kp.size(0) == K &&
                  kp.sizes() == vp.sizes() && kp.scalar_type() == vp.scalar_type() &&
                  (kp.scalar_type() == at::kBFloat16 || kp.scalar_type() == at::kFloat), "native decode: KV pools");
      norms.emplace_back(weights[w0]);
      norms.emplace_back(weights[w0 + 17]);
      for (size_t i : {1, 5, 9}) lin.push_back(make_linear(weights, w0 + i, C));
      lin.push_back(make_linear(weights, w0 + 13, H * D));
      for (size_t i : {18, 22}) lin.push_back(make_linear(weights, w0 + i, C));
      lin.push_back(make_linear(weights, w0 + 26, F));
    }
    norms.emplace_back(weights[layers * 30]);
    lin.push_back(make_linear(head_parts, 0, C));
    const int64_t* P = pos.data_ptr<int64_t>();
    const int64_t* T = tables.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(P[b] >= 0 && P[b] / kpool[0].size(2) < nb, "native decode: position past its block table");
    const float* freq = inv_freq.data_ptr<float>();
    at::Tensor logits = at::empty({B, lin.back().out}, at::kFloat);
    float* h = x.data_ptr<float>();  // (B, C) residual stream
    std::vector<float> n(B * std::max(C, H * D)), q(B * H * D), k(B * K * D), v(B * K * D), a(B * H * D),
        o(B * C), g(B * F), u(B * F);
    std::vector<Job> qkv(3), attn_out(1), gate_up(2), down(1), head(1);
    auto add = [&](const float* d) {
      for (int64_t i = 0; i < B * C; ++i) h[i] = rnd ? bf16_round(h[i] + d[i]) : h[i] + d[i];
    };
    auto sums = [&](std::vector<Job>& js, const float* in) {
      for (auto& j : js) group_sums(j, in, B);
    };
#pragma omp parallel num_threads(at::get_num_threads())
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      for (int64_t l = 0; l < layers; ++l) {
        const Linear* L = lin.data() + l * 7;
        const at::Tensor &kp = kpool[l], &vp = vpool[l];
#pragma omp single
        {
          rmsnorm(h, norms[2 * l], eps, n.data(), B, C, rnd);
          qkv = {{L, q.data(), {}}, {L + 1, k.data(), {}}, {L + 2, v.data(), {}}};
          attn_out = {{L + 3, o.data(), {}}};
          gate_up = {{L + 4, g.data(), {}}, {L + 5, u.data(), {}}};
          down = {{L + 6, o.data(), {}}};
          sums(qkv, n.data());
        }
        linears(qkv, n.data(), B, rnd, t, nt);
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < B; ++b) {
          rope(q.data() + b * H * D, H, D, P[b], freq, rnd);
          rope(k.data() + b * K * D, K, D, P[b], freq, rnd);
          const int64_t bs = kp.size(2), block = T[b * nb + P[b] / bs], off = P[b] % bs;
          for (int64_t kh = 0; kh < K; ++kh) {
            store(k.data() + (b * K + kh) * D, kpool[l], kh, block, off, D);
            store(v.data() + (b * K + kh) * D, vpool[l], kh, block, off, D);
          }
        }
        if (kp.scalar_type() == at::kBFloat16)
          attend<BF16>(q.data(), kp, vp, P, T, nb, B, H, K, D, window, a.data(), rnd, t, nt);
        else
          attend<F32>(q.data(), kp, vp, P, T, nb, B, H, K, D, window, a.data(), rnd, t, nt);
#pragma omp barrier
#pragma omp single
        sums(attn_out, a.data());
        linears(attn_out, a.data(), B, rnd, t, nt);
#pragma omp barrier
#pragma omp single
        {
          add(o.data());
          rmsnorm(h, norms[2 * l + 1], eps, n.data(), B, C, rnd);
          sums(gate_up, n.data());
        }
        linears(gate_up, n.data(), B, rnd, t, nt);
#pragma omp barrier
        {
          const auto [i0, i1] = share(B * F, 64, t, nt);
          for (int64_t i = i0; i < i1; ++i) {
            float s = g[i] / (1.f + std::exp(-g[i]));
            if (rnd) s = bf16_round(s);
            g[i] = rnd ? bf16_round(s * u[i]) : s * u[i];
          }
        }
#pragma omp barrier
#pragma omp single
        sums(down, g.data());
        linears(down, g.data(), B, rnd, t, nt);
#pragma omp barrier
#pragma omp single
        add(o.data());
      }
#pragma omp single
      {
        rmsnorm(h, norms.back(), eps, n.data(), B, C, rnd);
        head = {{&lin.back(), logits.data_ptr<float>(), {}}};
        sums(head, n.data());
      }
      linears(head, n.data(), B, rnd, t, nt);
    }
    return logits;
  }
};

// y (M, out) = x (M, in) W^T for one linear layer given as (weight, scale, min, bias): the same kernel, for tests.
at::Tensor linear_op(at::Tensor x, std::vector<at::Tensor> parts) {
  x = x.to(at::kFloat).contiguous();
  const Linear L = make_linear(parts, 0, x.size(1));
  at::Tensor y = at::empty({x.size(0), L.out}, at::kFloat);
  std::vector<Job> js{{&L, y.data_ptr<float>(), {}}};
  group_sums(js[0], x.data_ptr<float>(), x.size(0));
#pragma omp parallel num_threads(at::get_num_threads())
  linears(js, x.data_ptr<float>(), x.size(0), false, omp_get_thread_num(), omp_get_num_threads());
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<at::Tensor>, std::vector<int64_t>, double>())
      .def("step", &Decoder::step, "one decode step of every layer (see decode.cpp)");
  m.def("linear", &linear_op, "x W^T in the weight's stored precision");
}
