// The norm family on CPU: LayerNorm, RMSNorm, and add_norm (h = residual + dropout(x), y = norm(h)), in float32, and in
// bfloat16 and float16 through float32 scratch.
// Rows in parallel (jobs past kParallelGrain elements of work, blocks handed out dynamically), native-width vectors
// (vec.h) within a row. One statistics helper and one affine helper serve all three: RMSNorm is LayerNorm with the mean
// fixed at 0 and no bias, and add_norm normalises the h it has just built (in a scratch row in L1) exactly as
// layer_norm/rms_norm normalise x.
//   forward : h (add_norm only: written out, and kept in L1), statistics per row (sum, then squared deviations),
//             then normalise and apply the affine in one sweep. Memory: read x (and residual), write y (and h).
//   backward: dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) per row (RMSNorm: without the mean(g*w) term),
//             add_norm adds h's own gradient and, with dropout, also writes x's gradient through the dropout mask,
//             regenerated from the seed. dW = sum g*xhat and dB = sum g as partial sums over fixed chunks of rows,
//             reduced once in chunk order, so the result is the same for any thread count.
//   16-bit  : rows widened to float32 a block at a time, the float32 routines run on them unchanged, results rounded
//             back (see "bfloat16 and float16" below); statistics and every sum stay float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../host_utils.h"
#include "buffer_pool.h"
#include "parallel.h"
#include "simd.h"
#include "vec.h"

namespace chargpt {
namespace {

using vec::kWidth;  // native-width vectors (vec.h), not simd.h's 16 lanes: see vec.h for why
using vec::vfloat;

constexpr int64_t kMinElementsPerChunk = 16384;  // of a dW/dB partial-sum chunk: amortises its partials
constexpr int64_t kDropoutWork = 4;  // Philox's cost per element, in elements of the rest (measured: ~4x)
constexpr int kRows = 4;                        // rows per group for short rows (independent dependency chains)
constexpr int64_t kShortRow = 512;              // rows up to this length go kRows at a time

// Outputs much larger than the L2 caches are written with non-temporal stores: the write-allocate read of each
// line is skipped (a third of a plain store's traffic), and the output would not stay in cache anyway. Smaller
// outputs stay cached for the next op to read.
inline bool streaming_output(int64_t m, int64_t n) { return m * n * static_cast<int64_t>(sizeof(float)) >= (8 << 20); }

inline int64_t padded(int64_t n) { return (n + kWidth - 1) / kWidth * kWidth; }

// Prefetch the cache line holding p[j] (into L1), once per line when a vector is shorter than a line.
inline void prefetch_line(const float* p, int64_t j) {
  if (kWidth * 4 >= 64 || j % 16 == 0) simd::prefetch(p + j);
}

// Store a vector, streamed when asked (the caller checked the row is 64-byte aligned). A run-time flag: the branch
// is the same for a whole row, and it halves the kernel instances.
inline void put(float* p, vfloat v, bool stream) {
  if (stream) vec::store_stream(p, v);
  else vec::store(p, v);
}

// Calls f(std::bool_constant<b>...) for the run-time flags b...: one template instance per combination.
template <bool... kDone, typename F>
void with_flags(F&& f) {
  f(std::bool_constant<kDone>{}...);
}
template <bool... kDone, typename F, typename... Rest>
void with_flags(F&& f, bool flag, Rest... rest) {
  if (flag) with_flags<kDone..., true>(f, rest...);
  else with_flags<kDone..., false>(f, rest...);
}

// Independent accumulators per row: 4 hide the add latency with 32 vector registers (AVX-512); with 16 (AVX2), 4 rows
// of 4 would spill, so 2. The same count for every R, so a row's sums do not depend on its group.
constexpr int kAcc = kWidth == 16 ? 4 : 2;

template <int A>
inline vfloat sum_accumulators(const vfloat (&acc)[A]) {
  if constexpr (A == 4) return (acc[0] + acc[1]) + (acc[2] + acc[3]);
  else return acc[0] + acc[1];
}

// Mean and M2 (sum of squared deviations) of R rows; RMSNorm (kRms) takes the mean as 0, so M2 is the sum of
// squares. Two sweeps: the sum, then the squared deviations from the mean; the row is read from memory once and
// the second sweep hits L1 (a row of N floats fits for N up to ~12K, L2 beyond). Numerically the textbook two-pass
// algorithm, at least as accurate as Welford without its dependent division chain. Lanes are summed in a fixed tree
// order. R rows at once (R independent dependency chains for short rows); each row's arithmetic is the same for
// every R, so how rows are grouped (which depends on the thread split) never changes a result.
// kShift sums x - x[0] instead of x (shifted data): a constant row then sums to exactly 0, so its mean is exactly
// x[0], its deviations exactly 0, and it normalises to exactly 0 for any eps; and a large offset no longer swamps
// small deviations. It costs a subtraction per element and registers, so only the rows that need it take it
// (rows_moments below).
template <int R, bool kShift, bool kRms>
inline void two_pass_moments(const float* const* x, int64_t n, float* mean_out, float* m2_out) {
  constexpr int64_t kBlock = kAcc * kWidth;
  const int64_t nb = n / kBlock * kBlock, nv = n / kWidth * kWidth;
  float mu[R] = {};
  if constexpr (!kRms) {
    const float inv_n = 1.f / static_cast<float>(n);
    float origin[R];
    for (int r = 0; r < R; ++r) origin[r] = kShift ? x[r][0] : 0.f;
    vfloat acc[R][kAcc] = {};
    for (int64_t j = 0; j < nb; j += kBlock)
      for (int r = 0; r < R; ++r)
        for (int a = 0; a < kAcc; ++a) {
          const vfloat v = vec::load(x[r] + j + a * kWidth);
          acc[r][a] += kShift ? v - origin[r] : v;
        }
    for (int64_t j = nb; j < nv; j += kWidth)
      for (int r = 0; r < R; ++r) {
        const vfloat v = vec::load(x[r] + j);
        acc[r][0] += kShift ? v - origin[r] : v;
      }
    for (int r = 0; r < R; ++r) {
      float sum = vec::reduce_add(sum_accumulators(acc[r]));
      for (int64_t j = nv; j < n; ++j) sum += kShift ? x[r][j] - origin[r] : x[r][j];
      mu[r] = kShift ? origin[r] + sum * inv_n : sum * inv_n;
    }
  }
  vfloat sq[R][kAcc] = {};
  for (int64_t j = 0; j < nb; j += kBlock)
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < kAcc; ++a) {
        const vfloat d = vec::load(x[r] + j + a * kWidth) - mu[r];
        sq[r][a] = vec::fma(d, d, sq[r][a]);
      }
  for (int64_t j = nb; j < nv; j += kWidth)
    for (int r = 0; r < R; ++r) {
      const vfloat d = vec::load(x[r] + j) - mu[r];
      sq[r][0] = vec::fma(d, d, sq[r][0]);
    }
  for (int r = 0; r < R; ++r) {
    float m2 = vec::reduce_add(sum_accumulators(sq[r]));
    for (int64_t j = nv; j < n; ++j) m2 = std::fma(x[r][j] - mu[r], x[r][j] - mu[r], m2);
    mean_out[r] = mu[r];
    m2_out[r] = m2;
  }
}

// Mean and M2 of R rows (RMSNorm: 0 and the sum of squares). A row whose spread is tiny next to its mean
// (sigma < |mean| / 256; constant rows above all) loses its deviations to the rounding of the plain sum: a few ulps
// of the mean, divided by sqrt(eps) = 1e-6 for BERT's eps, gave outputs of 0.01-1 instead of 0. Such rows (and NaN
// ones) are redone with shifted sums, from cache; other rows never are, so they keep their speed and their bits.
template <int R, bool kRms>
inline void rows_moments(const float* const* x, int64_t n, float* mean_out, float* m2_out) {
  two_pass_moments<R, false, kRms>(x, n, mean_out, m2_out);
  if constexpr (!kRms) {
    for (int r = 0; r < R; ++r) {
      const float mu = mean_out[r];
      if (!(m2_out[r] > static_cast<float>(n) * (mu * mu) * 0x1p-16f))
        two_pass_moments<1, true, false>(&x[r], n, &mean_out[r], &m2_out[r]);
    }
  }
}

// y = (x - mean) * rstd * w + b over one row (RMSNorm: mean 0, no b), prefetching the row `ahead` (one cache line
// per vector).
template <bool kWeight, bool kBias>
void normalize_row(const float* x, float* y, const float* w, const float* b, int64_t n, float mean, float rstd,
                   const float* ahead, bool stream) {
  const int64_t nv = n / kWidth * kWidth;
  for (int64_t j = 0; j < nv; j += kWidth) {
    prefetch_line(ahead, j);
    vfloat v = (vec::load(x + j) - mean) * rstd;
    if constexpr (kWeight && kBias) v = vec::fma(v, vec::load(w + j), vec::load(b + j));
    else if constexpr (kWeight) v *= vec::load(w + j);
    else if constexpr (kBias) v += vec::load(b + j);
    put(y + j, v, stream);
  }
  for (int64_t j = nv; j < n; ++j) {
    float v = (x[j] - mean) * rstd;
    if constexpr (kWeight && kBias) v = std::fma(v, w[j], b[j]);
    else if constexpr (kWeight) v *= w[j];
    else if constexpr (kBias) v += b[j];
    y[j] = v;
  }
}

// The dropout factors of one row: z[j] = 1/(1-p) if philox_uniform(seed, base + j) >= p else 0 (z has room for n
// rounded up to 16). Meanwhile the same columns of up to three rows `ahead` are prefetched: Philox is compute-bound,
// so the next rows' loads from memory overlap it instead of following it.
void dropout_factors_row(float* z, int64_t n, uint64_t seed, uint64_t base, const DropoutArgs& drop,
                         std::initializer_list<const float*> ahead) {
  constexpr int kVectors = vec::kDraws / kWidth;
  for (int64_t j = 0; j < n; j += vec::kDraws) {
    for (const float* a : ahead)
      if (a != nullptr) simd::prefetch(a + j);  // 16 floats: one cache line
    vfloat u[kVectors];
    vec::uniforms16(seed, base + static_cast<uint64_t>(j), u);
    for (int v = 0; v < kVectors; ++v)
      vec::store(z + j + v * kWidth, u[v] >= drop.p ? vec::splat(drop.keep_scale) : vec::splat(0.f));
  }
}

inline int64_t padded_draws(int64_t n) { return (n + vec::kDraws - 1) / vec::kDraws * vec::kDraws; }

// add_norm's h = residual + x * z for one row (z: the dropout factors 0 or 1/(1-p), null without dropout), into
// h (the output) and into hs (scratch, where the statistics and the normalisation read it from L1). x * 0 keeps a
// NaN of x, as torch's dropout does. Prefetches the rows ahead of x and residual.
void residual_add_row(const float* x, const float* res, const float* z, float* h, float* hs, int64_t n, bool stream,
                      const float* x_ahead, const float* res_ahead) {
  const int64_t nv = n / kWidth * kWidth;
  for (int64_t j = 0; j < nv; j += kWidth) {
    prefetch_line(x_ahead, j);
    prefetch_line(res_ahead, j);
    vfloat v = vec::load(x + j);
    if (z != nullptr) v *= vec::load(z + j);
    v = vec::load(res + j) + v;
    vec::store(hs + j, v);
    put(h + j, v, stream);
  }
  for (int64_t j = nv; j < n; ++j) {
    const float v = res[j] + (z != nullptr ? x[j] * z[j] : x[j]);
    hs[j] = v;
    h[j] = v;
  }
}

// What a forward reads besides x: add_norm's residual (then it normalises h = residual + dropout(x) and writes h).
struct ResidualInput {
  const float* residual = nullptr;  // null: normalise x itself
  int64_t residual_stride = 0;
  float* h = nullptr;
  DropoutArgs drop;
  uint64_t seed = 0;
};

// Rows [begin, end) of the forward, on the calling thread: row r of x at x + r * x_row_stride, of y at y + r * n,
// its statistics at mean[r] and rstd[r] (add_norm: residual and h likewise, dropout offset r * n).
template <bool kWeight, bool kBias, bool kRms>
void forward_block(const float* x, int64_t x_row_stride, const ResidualInput& add, float* y, const float* w,
                   const float* b, float* mean, float* rstd, int64_t begin, int64_t end, int64_t n, float eps,
                   bool stream) {
  const bool adding = add.residual != nullptr, dropout = adding && add.drop.p > 0.f;
  const int group = n <= kShortRow ? kRows : 1;
  // add_norm: h of the group's rows and the dropout factors, in L1.
  std::vector<float> scratch(adding ? group * padded(n) : 0), factors(dropout ? padded_draws(n) : 0);
  // The row to normalise: x's row r, or add_norm's h of it (built now into scratch row i).
  auto source = [&](int64_t r, int i, int64_t distance) -> const float* {
    const float* xr = x + r * x_row_stride;
    if (!adding) return xr;
    const float* res = add.residual + r * add.residual_stride;
    const int64_t ahead = r + distance < end ? distance : 0;
    float* h = add.h + r * n;
    if (dropout)
      dropout_factors_row(factors.data(), n, add.seed, static_cast<uint64_t>(r * n), add.drop,
                          {xr + ahead * x_row_stride, res + ahead * add.residual_stride});
    float* hs = scratch.data() + i * padded(n);
    residual_add_row(xr, res, dropout ? factors.data() : nullptr, h, hs, n, stream && vec::aligned(h),
                     xr + ahead * x_row_stride, res + ahead * add.residual_stride);
    return hs;
  };
  // Statistics stored, the row normalised into y, and (plain path) the row `distance` rows on prefetched.
  auto finish = [&](int64_t r, const float* row, float mu, float m2, int64_t distance) {
    const float* ahead = adding ? row : (r + distance < end ? row + distance * x_row_stride : row);
    const float rs = 1.f / std::sqrt(m2 / static_cast<float>(n) + eps);
    if (mean != nullptr) mean[r] = mu;
    rstd[r] = rs;
    float* yr = y + r * n;
    normalize_row<kWeight, kBias>(row, yr, w, b, n, mu, rs, ahead, stream && vec::aligned(yr));
  };
  int64_t r = begin;
  if (group == kRows) {
    for (; r + kRows <= end; r += kRows) {
      const float* rows[kRows];
      float mu[kRows], m2[kRows];
      for (int i = 0; i < kRows; ++i) rows[i] = source(r + i, i, kRows);
      rows_moments<kRows, kRms>(rows, n, mu, m2);
      for (int i = 0; i < kRows; ++i) finish(r + i, rows[i], mu[i], m2[i], kRows);
    }
  }
  for (; r < end; ++r) {
    const float* row = source(r, 0, 1);
    float mu, m2;
    rows_moments<1, kRms>(&row, n, &mu, &m2);
    finish(r, row, mu, m2, 1);
  }
}

// The float32 forward: blocks of rows in parallel, straight from the tensors' memory.
template <bool kWeight, bool kBias, bool kRms>
void forward_rows(const float* x, int64_t x_row_stride, const ResidualInput& add, float* y, const float* w,
                  const float* b, float* mean, float* rstd, int64_t m, int64_t n, float eps) {
  const bool stream = streaming_output(m, n);
  const bool dropout = add.residual != nullptr && add.drop.p > 0.f;
  parallel_blocks(m, parallel_grain(dropout ? kDropoutWork * n : n), [&](int64_t begin, int64_t end) {
    forward_block<kWeight, kBias, kRms>(x, x_row_stride, add, y, w, b, mean, rstd, begin, end, n, eps, stream);
    if (stream) simd::stream_fence();
  });
}

// --- bfloat16 and float16: a conversion layer around the float32 routines --------------------------------------------
// A 16-bit op widens a block of rows into float32 scratch (vec.h), runs the float32 routines on it unchanged, and
// rounds the results into the outputs; statistics stay float32 and every sum is a float32 (or double) one. Per row
// the arithmetic is the float32 op's on the widened values, so blocks and threads change no result. Outputs are
// written with plain stores (the scratch is what stays in cache).

constexpr int64_t kScratchElements = 4096;  // floats per scratch buffer (16 KB: the buffers of a step stay in L1/L2)

// Rows per conversion step: as many as fill a scratch buffer; short rows in whole groups of kRows, as float32 takes.
inline int64_t narrow_block_rows(int64_t n) {
  const int64_t rows = std::max<int64_t>(1, kScratchElements / n);
  return n <= kShortRow ? std::max<int64_t>(kRows, rows / kRows * kRows) : rows;
}

// The 16-bit forward. add_norm builds h = residual + dropout(x) in float32, rounds it into the output h and
// normalises that rounded h: y is the norm of the h returned, the h the backward reads (as the CUDA kernels do).
template <typename T, bool kWeight, bool kBias, bool kRms>
void forward_rows_narrow(const T* x, int64_t x_row_stride, const T* residual, int64_t residual_stride, T* h,
                         const DropoutArgs& drop, uint64_t seed, T* y, const float* w, const float* b, float* mean,
                         float* rstd, int64_t m, int64_t n, float eps) {
  const bool adding = residual != nullptr, dropout = adding && drop.p > 0.f;
  const int64_t block = narrow_block_rows(n);
  parallel_blocks(m, parallel_grain(dropout ? kDropoutWork * n : n), [&](int64_t begin, int64_t end) {
    std::vector<float> xs(block * n), ys(block * n), rs(adding ? n : 0), factors(dropout ? padded_draws(n) : 0);
    for (int64_t r0 = begin; r0 < end; r0 += block) {
      const int64_t rows = std::min(block, end - r0);
      for (int64_t i = 0; i < rows; ++i) vec::widen(x + (r0 + i) * x_row_stride, xs.data() + i * n, n);
      if (adding) {
        for (int64_t i = 0; i < rows; ++i) {
          float* hs = xs.data() + i * n;  // x's row becomes h's, in place
          vec::widen(residual + (r0 + i) * residual_stride, rs.data(), n);
          if (dropout) dropout_factors_row(factors.data(), n, seed, static_cast<uint64_t>((r0 + i) * n), drop, {});
          residual_add_row(hs, rs.data(), dropout ? factors.data() : nullptr, hs, hs, n, false, hs, rs.data());
        }
        vec::narrow(xs.data(), h + r0 * n, rows * n);
        vec::widen(h + r0 * n, xs.data(), rows * n);
      }
      forward_block<kWeight, kBias, kRms>(xs.data(), n, ResidualInput{}, ys.data(), w, b,
                                          mean != nullptr ? mean + r0 : nullptr, rstd + r0, 0, rows, n, eps,
                                          /*stream=*/false);
      vec::narrow(ys.data(), y + r0 * n, rows * n);
    }
  });
}

// The forward of every op of the family: y, h (add_norm; else undefined), mean (layer; else undefined), rstd.
struct ForwardOut {
  at::Tensor y, h, mean, rstd;
};

// T: the storage type of x, residual, weight, bias, y and h (float, c10::BFloat16 or c10::Half).
template <typename T>
ForwardOut norm_forward(const at::Tensor& x_in, const at::Tensor& residual_in, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, double eps, bool rms, const DropoutArgs& drop) {
  const at::Tensor x = unit_last_dim(x_in);  // strided columns are copied once: the vector loads need unit stride
  const int64_t m = x.size(0), n = x.size(1);
  const auto stats = x.options().dtype(at::kFloat);
  ForwardOut out;
  out.y = pooled_empty({m, n}, x.scalar_type());
  if (!rms) out.mean = at::empty({m}, stats);
  out.rstd = at::empty({m}, stats);
  at::Tensor residual;
  if (residual_in.defined()) {
    residual = unit_last_dim(residual_in);
    out.h = pooled_empty({m, n}, x.scalar_type());
  }
  if (m == 0) return out;
  // weight and bias in float32 (16-bit ones widened once: n values).
  const at::Tensor w = weight.has_value() ? weight->contiguous().to(at::kFloat) : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous().to(at::kFloat) : at::Tensor();
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* mp = out.mean.defined() ? out.mean.mutable_data_ptr<float>() : nullptr;
  float* rp = out.rstd.mutable_data_ptr<float>();
  const uint64_t seed = drop.seed != nullptr ? static_cast<uint64_t>(*drop.seed) : 0;
  with_flags(
      [&](auto has_weight, auto has_bias, auto is_rms) {
        constexpr bool kWeight = decltype(has_weight)::value, kBias = decltype(has_bias)::value;
        constexpr bool kRms = decltype(is_rms)::value;
        if constexpr (!(kRms && kBias)) {  // RMSNorm has no bias (checked)
          if constexpr (std::is_same_v<T, float>) {
            ResidualInput add;
            if (residual.defined())
              add = {residual.const_data_ptr<float>(), residual.stride(0), out.h.mutable_data_ptr<float>(), drop, seed};
            forward_rows<kWeight, kBias, kRms>(x.const_data_ptr<float>(), x.stride(0), add,
                                               out.y.mutable_data_ptr<float>(), wp, bp, mp, rp, m, n,
                                               static_cast<float>(eps));
          } else {
            forward_rows_narrow<T, kWeight, kBias, kRms>(
                x.const_data_ptr<T>(), x.stride(0), residual.defined() ? residual.const_data_ptr<T>() : nullptr,
                residual.defined() ? residual.stride(0) : 0, out.h.defined() ? out.h.mutable_data_ptr<T>() : nullptr,
                drop, seed, out.y.mutable_data_ptr<T>(), wp, bp, mp, rp, m, n, static_cast<float>(eps));
          }
        }
      },
      wp != nullptr, bp != nullptr, rms);
  return out;
}

// R rows of the backward, each row's pointers at index r.
template <int R>
struct BackwardRows {
  const float* x[R];   // the normalised input (add_norm: h)
  const float* g[R];   // gradient of y
  const float* gh[R];  // add_norm: gradient of h, added to the norm's
  float* dx[R];        // gradient of the normalised input (add_norm: of h, which is residual's gradient)
  float* dx_drop[R];   // add_norm with dropout: dx * z, x's gradient
  const float* z[R];   // the dropout factors of the row
  const float* x_next[R];   // rows to prefetch meanwhile (without dropout; with it, the factors' sweep does)
  const float* g_next[R];
  const float* gh_next[R];
};

// R rows of the backward: dx, and g*xhat and g added to the chunk's partial sums. The first sweep only reduces
// (2R independent accumulators), the second writes dx and updates the partials once per R rows (the partials stay
// in L1). Rows are grouped from the start of their chunk, and chunks do not depend on the thread count, so neither
// do the results.
template <int R, bool kWeight, bool kRms, bool kGradH, bool kDropout>
inline void backward_rows(const BackwardRows<R>& p, const float* w, float* dw_part, float* db_part, int64_t n,
                          const float* mean, const float* rstd, bool stream) {
  const int64_t nv = n / kWidth * kWidth;
  float mu[R];
  for (int r = 0; r < R; ++r) mu[r] = kRms ? 0.f : mean[r];
  vfloat sum_gw[R] = {}, sum_gwx[R] = {};
  for (int64_t j = 0; j < nv; j += kWidth) {
    const vfloat wv = kWeight ? vec::load(w + j) : vec::splat(1.f);
    for (int r = 0; r < R; ++r) {
      if constexpr (!kDropout) {
        prefetch_line(p.x_next[r], j);
        prefetch_line(p.g_next[r], j);
        if constexpr (kGradH) prefetch_line(p.gh_next[r], j);
      }
      const vfloat xhat = (vec::load(p.x[r] + j) - mu[r]) * rstd[r];
      const vfloat gw = kWeight ? vec::load(p.g[r] + j) * wv : vec::load(p.g[r] + j);
      if constexpr (!kRms) sum_gw[r] += gw;
      sum_gwx[r] = vec::fma(gw, xhat, sum_gwx[r]);
    }
  }
  const float inv_n = 1.f / static_cast<float>(n);
  float c1[R], c2[R];
  for (int r = 0; r < R; ++r) {
    float s_gw = vec::reduce_add(sum_gw[r]), s_gwx = vec::reduce_add(sum_gwx[r]);
    for (int64_t j = nv; j < n; ++j) {
      const float xhat = (p.x[r][j] - mu[r]) * rstd[r];
      const float gw = kWeight ? p.g[r][j] * w[j] : p.g[r][j];
      if constexpr (!kRms) s_gw += gw;
      s_gwx = std::fma(gw, xhat, s_gwx);
    }
    c1[r] = s_gw * inv_n;  // 0 for RMSNorm: its output does not depend on the mean
    c2[r] = s_gwx * inv_n;
  }
  for (int64_t j = 0; j < nv; j += kWidth) {
    const vfloat wv = kWeight ? vec::load(w + j) : vec::splat(1.f);
    vfloat dwv = vec::load(dw_part + j), dbv = vec::load(db_part + j);
    for (int r = 0; r < R; ++r) {
      const vfloat xhat = (vec::load(p.x[r] + j) - mu[r]) * rstd[r];
      const vfloat gv = vec::load(p.g[r] + j);
      const vfloat gw = kWeight ? gv * wv : gv;
      // (gw - c1) first: for N = 1 it is exactly 0 and xhat is 0, so dx is exactly 0.
      vfloat d = vec::fma(xhat, vec::splat(-c2[r]), gw - c1[r]) * rstd[r];
      if constexpr (kGradH) d += vec::load(p.gh[r] + j);
      put(p.dx[r] + j, d, stream);
      if constexpr (kDropout) put(p.dx_drop[r] + j, d * vec::load(p.z[r] + j), stream);
      dwv = vec::fma(gv, xhat, dwv);
      dbv += gv;
    }
    vec::store(dw_part + j, dwv);
    vec::store(db_part + j, dbv);
  }
  for (int64_t j = nv; j < n; ++j)
    for (int r = 0; r < R; ++r) {
      const float xhat = (p.x[r][j] - mu[r]) * rstd[r];
      const float gw = kWeight ? p.g[r][j] * w[j] : p.g[r][j];
      float d = std::fma(xhat, -c2[r], gw - c1[r]) * rstd[r];
      if constexpr (kGradH) d += p.gh[r][j];
      p.dx[r][j] = d;
      if constexpr (kDropout) p.dx_drop[r][j] = d * p.z[r][j];
      dw_part[j] = std::fma(p.g[r][j], xhat, dw_part[j]);
      db_part[j] += p.g[r][j];
    }
}

// A block of rows of the backward: row i (of `rows`) of x at x + i * x_stride (g and gh likewise), of dx and dx_drop
// at + i * n, its statistics at mean[i] (null for RMSNorm) and rstd[i]; its dropout offset is (row0 + i) * n.
struct BackwardBlock {
  const float* x;
  int64_t x_stride;
  const float* g;
  int64_t g_stride;
  const float* gh;  // add_norm: gradient of h, or null
  int64_t gh_stride;
  float* dx;
  float* dx_drop;  // add_norm with dropout, else null
  const float* mean;
  const float* rstd;
  int64_t row0, rows;
};

// The rows of a block on the calling thread, kRows at a time, into the chunk's partial sums dw_part and db_part.
// factors: room for kRows rows of dropout factors.
template <bool kWeight, bool kRms, bool kGradH, bool kDropout>
void backward_block(const BackwardBlock& blk, const float* w, float* dw_part, float* db_part, int64_t n,
                    const DropoutArgs& drop, uint64_t seed, float* factors, bool stream) {
  const int64_t fn = padded_draws(n);
  auto rows = [&](auto group, int64_t r) {
    constexpr int R = decltype(group)::value;
    BackwardRows<R> p;
    for (int i = 0; i < R; ++i) {
      const int64_t next = r + i + R < blk.rows ? r + i + R : r + i;  // the row R on, prefetched meanwhile
      p.x_next[i] = blk.x + next * blk.x_stride;
      p.g_next[i] = blk.g + next * blk.g_stride;
      p.gh_next[i] = kGradH ? blk.gh + next * blk.gh_stride : nullptr;
      p.x[i] = blk.x + (r + i) * blk.x_stride;
      p.g[i] = blk.g + (r + i) * blk.g_stride;
      p.gh[i] = kGradH ? blk.gh + (r + i) * blk.gh_stride : nullptr;
      p.dx[i] = blk.dx + (r + i) * n;
      p.dx_drop[i] = kDropout ? blk.dx_drop + (r + i) * n : nullptr;
      p.z[i] = kDropout ? factors + i * fn : nullptr;
      if constexpr (kDropout)  // the forward's mask, regenerated: offset row * N + col
        dropout_factors_row(factors + i * fn, n, seed, static_cast<uint64_t>((blk.row0 + r + i) * n), drop,
                            {p.x_next[i], p.g_next[i], p.gh_next[i]});
    }
    return p;
  };
  const float* mean = blk.mean;
  int64_t r = 0;
  for (; r + kRows <= blk.rows; r += kRows)
    backward_rows<kRows, kWeight, kRms, kGradH, kDropout>(rows(std::integral_constant<int, kRows>{}, r), w, dw_part,
                                                          db_part, n, mean ? mean + r : nullptr, blk.rstd + r, stream);
  for (; r < blk.rows; ++r)
    backward_rows<1, kWeight, kRms, kGradH, kDropout>(rows(std::integral_constant<int, 1>{}, r), w, dw_part, db_part,
                                                      n, mean ? mean + r : nullptr, blk.rstd + r, stream);
}

// The backward of every op of the family: dx (add_norm: h's, i.e. residual's, gradient), dx_drop (add_norm with
// dropout: x's; else undefined), dw, db (always computed; the caller drops what it does not need).
struct BackwardOut {
  at::Tensor dx, dx_drop, dw, db;
};

// T: the storage type of grad_out, grad_h, x, weight and every output (float, c10::BFloat16 or c10::Half). A 16-bit
// chunk is widened a block of rows at a time into float32 scratch and its gradients rounded back (see the forward).
template <typename T>
BackwardOut norm_backward(const at::Tensor& grad_out_in, const at::Tensor& grad_h_in, const at::Tensor& x_in,
                          const std::optional<at::Tensor>& weight, const at::Tensor& mean_in,
                          const at::Tensor& rstd_in, bool rms, const DropoutArgs& drop) {
  constexpr bool kNarrow = !std::is_same_v<T, float>;
  const at::Tensor x = unit_last_dim(x_in), g = unit_last_dim(grad_out_in);
  const at::Tensor gh = grad_h_in.defined() ? unit_last_dim(grad_h_in) : at::Tensor();
  const at::Tensor mean = rms ? at::Tensor() : mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  const bool dropout = drop.p > 0.f;
  BackwardOut out;
  out.dx = pooled_empty({m, n}, x.scalar_type());
  if (dropout) out.dx_drop = pooled_empty({m, n}, x.scalar_type());
  out.dw = at::empty({n}, x.options());  // every entry is written by the reduction below
  out.db = at::empty({n}, x.options());
  if (m == 0) {
    out.dw.zero_();
    out.db.zero_();
    return out;
  }
  const at::Tensor w = weight.has_value() ? weight->contiguous().to(at::kFloat) : at::Tensor();

  // Fixed chunks of rows (independent of the thread count): at most 64, each big enough to amortise its partials.
  const int64_t rows_per_chunk = std::max<int64_t>({(m + 63) / 64, kMinElementsPerChunk / n, int64_t{1}});
  const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t pn = padded(n);
  std::vector<float> partials(static_cast<size_t>(chunks * 2 * pn), 0.f);

  const T* xp = x.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  const T* ghp = gh.defined() ? gh.const_data_ptr<T>() : nullptr;
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const float* mp = mean.defined() ? mean.const_data_ptr<float>() : nullptr;
  const float* rp = rstd.const_data_ptr<float>();
  T* dxp = out.dx.mutable_data_ptr<T>();
  T* ddp = dropout ? out.dx_drop.mutable_data_ptr<T>() : nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*drop.seed) : 0;
  const bool stream = !kNarrow && streaming_output(m, n);
  // Streaming needs every output row vector-aligned: true for pooled outputs when n is a multiple of kWidth.
  const bool stream_rows = stream && n % kWidth == 0;
  const int64_t chunk_work = rows_per_chunk * n * (dropout ? kDropoutWork : 1);
  const int64_t block = narrow_block_rows(n);
  parallel_blocks(chunks, parallel_grain(chunk_work), [&](int64_t begin, int64_t end) {
    std::vector<float> factors(dropout ? kRows * padded_draws(n) : 0);
    // 16-bit: float32 scratch for a block of rows of x, g, gh (read) and dx, dx_drop (written).
    const int64_t scratch = kNarrow ? block * n : 0;
    std::vector<float> xs(scratch), gs(scratch), ghs(ghp ? scratch : 0), dxs(scratch), dds(dropout ? scratch : 0);
    with_flags(
        [&](auto has_weight, auto is_rms, auto has_grad_h, auto has_dropout) {
          constexpr bool kWeight = decltype(has_weight)::value, kRms = decltype(is_rms)::value;
          constexpr bool kGradH = decltype(has_grad_h)::value, kDropout = decltype(has_dropout)::value;
          for (int64_t c = begin; c < end; ++c) {
            float* dw_part = partials.data() + c * 2 * pn;
            float* db_part = dw_part + pn;
            const int64_t r_begin = c * rows_per_chunk, r_end = std::min(m, (c + 1) * rows_per_chunk);
            if constexpr (!kNarrow) {
              const BackwardBlock blk{xp + r_begin * x.stride(0), x.stride(0),
                                      gp + r_begin * g.stride(0), g.stride(0),
                                      kGradH ? ghp + r_begin * gh.stride(0) : nullptr, kGradH ? gh.stride(0) : 0,
                                      dxp + r_begin * n, kDropout ? ddp + r_begin * n : nullptr,
                                      mp ? mp + r_begin : nullptr, rp + r_begin, r_begin, r_end - r_begin};
              backward_block<kWeight, kRms, kGradH, kDropout>(blk, wp, dw_part, db_part, n, drop, seed,
                                                              factors.data(), stream_rows);
            } else {
              for (int64_t r0 = r_begin; r0 < r_end; r0 += block) {
                const int64_t rows = std::min(block, r_end - r0);
                for (int64_t i = 0; i < rows; ++i) {
                  vec::widen(xp + (r0 + i) * x.stride(0), xs.data() + i * n, n);
                  vec::widen(gp + (r0 + i) * g.stride(0), gs.data() + i * n, n);
                  if constexpr (kGradH) vec::widen(ghp + (r0 + i) * gh.stride(0), ghs.data() + i * n, n);
                }
                const BackwardBlock blk{xs.data(), n, gs.data(), n, kGradH ? ghs.data() : nullptr, n, dxs.data(),
                                        kDropout ? dds.data() : nullptr, mp ? mp + r0 : nullptr, rp + r0, r0, rows};
                backward_block<kWeight, kRms, kGradH, kDropout>(blk, wp, dw_part, db_part, n, drop, seed,
                                                                factors.data(), /*stream=*/false);
                vec::narrow(dxs.data(), dxp + r0 * n, rows * n);
                if constexpr (kDropout) vec::narrow(dds.data(), ddp + r0 * n, rows * n);
              }
            }
          }
        },
        wp != nullptr, rms, ghp != nullptr, dropout);
    if (stream) simd::stream_fence();
  });
  // Reduce the chunk partials once, in chunk order (double accumulators: the sums can span many rows), into float32
  // (16-bit: then rounded once into dw and db).
  std::vector<float> sums(kNarrow ? 2 * n : 0);
  float* dwp = kNarrow ? sums.data() : out.dw.mutable_data_ptr<float>();
  float* dbp = kNarrow ? sums.data() + n : out.db.mutable_data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(256, parallel_grain(2 * chunks)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double sw = 0.0, sb = 0.0;
      for (int64_t c = 0; c < chunks; ++c) {
        sw += partials[c * 2 * pn + j];
        sb += partials[c * 2 * pn + pn + j];
      }
      dwp[j] = static_cast<float>(sw);
      dbp[j] = static_cast<float>(sb);
    }
  });
  if constexpr (kNarrow) {
    vec::narrow(dwp, out.dw.mutable_data_ptr<T>(), n);
    vec::narrow(dbp, out.db.mutable_data_ptr<T>(), n);
  }
  return out;
}

// The storage types of the CPU kernels; the checks of checks.h made every other tensor of the op (but the float32
// statistics) of x's type.
void check_cpu_dtype(const char* op, const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              " on CPU supports float32, bfloat16 and float16, got ", t);
}

// norm_forward / norm_backward for x's storage type (checked by check_cpu_dtype).
ForwardOut forward_any(const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, double eps, bool rms, const DropoutArgs& drop) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return norm_forward<c10::BFloat16>(x, residual, weight, bias, eps, rms, drop);
    case at::kHalf: return norm_forward<c10::Half>(x, residual, weight, bias, eps, rms, drop);
    default: return norm_forward<float>(x, residual, weight, bias, eps, rms, drop);
  }
}

BackwardOut backward_any(const at::Tensor& grad_out, const at::Tensor& grad_h, const at::Tensor& x,
                         const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
                         bool rms, const DropoutArgs& drop) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return norm_backward<c10::BFloat16>(grad_out, grad_h, x, weight, mean, rstd, rms, drop);
    case at::kHalf: return norm_backward<c10::Half>(grad_out, grad_h, x, weight, mean, rstd, rms, drop);
    default: return norm_backward<float>(grad_out, grad_h, x, weight, mean, rstd, rms, drop);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps) {
  check_layer_norm_fwd_args(x, weight, bias, eps);
  check_cpu_dtype("chargpt::layer_norm_fwd", x);
  ForwardOut out = forward_any(x, at::Tensor(), weight, bias, eps, /*rms=*/false, {});
  return {out.y, out.mean, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const at::Tensor& mean, const at::Tensor& rstd) {
  check_layer_norm_bwd_args(grad_out, x, weight, mean, rstd);
  check_cpu_dtype("chargpt::layer_norm_bwd", x);
  BackwardOut out = backward_any(grad_out, at::Tensor(), x, weight, mean, rstd, /*rms=*/false, {});
  return {out.dx, out.dw, out.db};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                    double eps) {
  check_rms_norm_fwd_args(x, weight, eps);
  check_cpu_dtype("chargpt::rms_norm_fwd", x);
  ForwardOut out = forward_any(x, at::Tensor(), weight, std::nullopt, eps, /*rms=*/true, {});
  return {out.y, out.rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  check_rms_norm_bwd_args(grad_out, x, weight, rstd);
  check_cpu_dtype("chargpt::rms_norm_bwd", x);
  BackwardOut out = backward_any(grad_out, at::Tensor(), x, weight, at::Tensor(), rstd, /*rms=*/true, {});
  return {out.dx, out.dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view norm, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const bool rms = check_add_norm_fwd_args(x, residual, weight, bias, eps, norm, dropout_p, seed);
  check_cpu_dtype("chargpt::add_norm_fwd", x);
  ForwardOut out = forward_any(x, residual, weight, bias, eps, rms, dropout_args(dropout_p, seed));
  // RMSNorm has no mean: zeros keep the op's outputs the same for both norms.
  return {out.y, out.h, rms ? at::zeros({x.size(0)}, x.options().dtype(at::kFloat)) : out.mean, out.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, c10::string_view norm,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  const bool rms = check_add_norm_bwd_args(grad_y, grad_h, h, weight, mean, rstd, norm, dropout_p, seed);
  check_cpu_dtype("chargpt::add_norm_bwd", h);
  BackwardOut out = backward_any(grad_y, grad_h.has_value() ? *grad_h : at::Tensor(), h, weight, mean, rstd, rms,
                                  dropout_args(dropout_p, seed));
  // Without dropout x's gradient is h's: an empty placeholder instead of a copy (see add_norm_bwd's schema).
  return {out.dx, out.dx_drop.defined() ? out.dx_drop : at::empty({0}, h.options()), out.dw, out.db};
}

}  // namespace

TORCH_LIBRARY_IMPL(chargpt, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("add_norm_fwd", &add_norm_fwd_cpu);
  m.impl("add_norm_bwd", &add_norm_bwd_cpu);
}

}  // namespace chargpt
