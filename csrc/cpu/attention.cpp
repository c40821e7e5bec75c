// Causal / full attention on CPU (float32 and bfloat16), flash style.
//   forward : one task per (batch, head, 64-query tile); key tiles of 64 stream through an online softmax
//             (running max m, running sum l, rescaled fp32 accumulator), key tiles past the diagonal are
//             skipped, and log-sum-exp m + log(l) is saved for the backward. A row whose scores are all -inf
//             (fully masked) gives output 0 and lse +inf, so its backward is 0 too, as in torch's SDPA.
//             Decoding (few queries, many keys): a GQA group's heads share a task, key tiles widen, too few
//             tasks split their keys (flash-decoding), the splits' partial softmaxes combined at the end, and
//             float32 tasks of up to 16 rows compute their scores (up to 4 rows their P V too) in loops that
//             prefetch the KV cache.
//   backward: one task per (batch, key/value head): for each key tile, each query head of its group and each
//             visible query tile recomputes P = exp(S - lse) (S bit for bit the forward's: see dot_scores), then
//             dV += W^T dO, dS = P * (dP - delta), dK += dS^T Q, dQ += dS K, with delta = rowsum(dO * O). A kv
//             head and its query group are owned by one task, so GQA's sum over the group and every other sum run
//             in a fixed order (no atomics), and results do not depend on the thread count.
// GQA: query head h reads key/value head h / (Hq / Hk). attn_mask (bool or additive) is read through its strides
// (a (B, 1, 1, Tk) padding mask broadcast to (B, Hq, Tq, Tk) has stride 0 on H and Tq) and applied to each score
// tile before the softmax, in the forward and again in the backward.
// Tile products go to BLAS sgemm (torch's MKL) with its threading pinned to 1 inside each task; without a BLAS
// they fall back to a plain loop nest. bfloat16 inputs keep their tile products in bfloat16 (MKL's
// gemm_bf16bf16f32, which uses AMX tiles, AVX512-BF16 or AVX2 as the CPU has them, chosen at run time), with fp32
// accumulation; P and dS are rounded to bfloat16 as operands of the second products, as FlashAttention does on GPUs.
// Softmax statistics, accumulators and dQ/dK/dV sums stay fp32.
// Dropout keeps weight (i, j) iff philox_uniform(seed, offset) >= p (philox.h), regenerated tile by tile in the
// backward, never stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../host_utils.h"
#include "buffer_pool.h"
#include "parallel.h"
#include "simd.h"
#include "vec.h"

// Weak: present when torch links a BLAS (MKL on x86 wheels); null otherwise, and the fallback runs.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void gemm_bf16bf16f32_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const uint16_t* a, const int* lda, const uint16_t* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // the C entry point (lower case is Fortran)
}

namespace chargpt {
namespace {

using simd::kWidth;
using simd::vfloat;

constexpr int64_t kTileQ = 64;
constexpr int64_t kTileK = 64;  // a multiple of kWidth: score rows are padded to it
// Decoding (few query rows against many keys), forward only:
constexpr int64_t kFewRows = 16;        // a task of at most this many query rows takes key tiles up to
constexpr int64_t kWideTileK = 1024;    //   this wide (a multiple of kTileK)
constexpr int64_t kSplitBelow = 16;     // fewer tasks than this split their keys, into up to
constexpr int64_t kMaxSplits = 16;      //   this many splits
constexpr int64_t kMinSplitKeys = 256;  //   of at least this many keys

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Column-major C (m x n) = alpha * op(A) op(B) + beta * C, the BLAS convention.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ != nullptr) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  for (int64_t col = 0; col < n; ++col) {
    float* cc = c + col * ldc;
    for (int64_t row = 0; row < m; ++row) cc[row] = beta == 0.f ? 0.f : beta * cc[row];
    for (int64_t p = 0; p < k; ++p) {
      const float bv = alpha * (trans_b ? b[p * ldb + col] : b[col * ldb + p]);
      if (trans_a) {
        for (int64_t row = 0; row < m; ++row) cc[row] += a[row * lda + p] * bv;
      } else {
        const float* ac = a + p * lda;
        for (int64_t row = 0; row < m; ++row) cc[row] += ac[row] * bv;
      }
    }
  }
}

// The same product of bfloat16 operands, accumulated and returned in fp32. Without MKL the used part of each operand
// is widened to fp32 (packed) for the float path.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
          int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (gemm_bf16bf16f32_ != nullptr) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
    gemm_bf16bf16f32_(&ta, &tb, &mi, &ni, &ki, &alpha, vec::bits(a), &la, vec::bits(b), &lb, &beta, c, &lc);
    return;
  }
  const auto widened = [](const c10::BFloat16* x, int64_t ld, int64_t rows, int64_t cols) {
    std::vector<float> out(rows * cols);
    for (int64_t col = 0; col < cols; ++col) vec::widen(x + col * ld, out.data() + col * rows, rows);
    return out;
  };
  const std::vector<float> af = widened(a, lda, trans_a ? k : m, trans_a ? m : k);
  const std::vector<float> bf = widened(b, ldb, trans_b ? n : k, trans_b ? k : n);
  gemm(trans_a, trans_b, m, n, k, alpha, af.data(), trans_a ? k : m, bf.data(), trans_b ? n : k, beta, c, ldc);
}

// Decoding's products, for a few float32 query rows against a tile of keys. Each key (value) row is read once,
// with every query row at hand, and prefetched kRowPrefetch rows ahead: the KV cache comes from memory (a decoding
// step's weights have pushed it out of the caches), and BLAS's GEMM, which packs its operands first and does not
// prefetch for this shape, read it at ~15 GB/s of the 2-core EPYC's ~40.
constexpr int64_t kDotRows = 4;  // query rows a call takes at most
constexpr int64_t kRowPrefetch = 24;  // rows ahead (6 KB at D = 64); 8 measured within noise of it

// S (rows x bk, row-major, ld lds) = scale * Q K^T: per key, one vector per query row summing D in lanes (the last
// D % 16 through zero-padded vectors), then the lanes in simd::reduce_add's fixed tree. The tail once went through
// a scalar loop of separate multiplies and adds in sequence: at D = 8 (all tail), with |S| ~ 100, 2-3x torch's error
// in S, so in the outputs and gradients (torch's OpInfo samples).
template <int kRows>
void scores_few_rows(const float* k, int64_t ldk, const float* q, int64_t ldq, int64_t bk, int64_t D, float scale,
                     float* s, int64_t lds) {
  const int64_t d_vec = D / kWidth * kWidth, tail = D - d_vec;
  vfloat q_tail[kRows];
  for (int r = 0; r < kRows; ++r) q_tail[r] = simd::load_partial(q + r * ldq + d_vec, tail);
  for (int64_t j = 0; j < bk; ++j) {
    const float* kj = k + j * ldk;
    simd::prefetch(kj + kRowPrefetch * ldk);
    vfloat acc[kRows] = {};
    for (int64_t d = 0; d < d_vec; d += kWidth) {
      const vfloat kv = simd::load(kj + d);
      for (int r = 0; r < kRows; ++r) acc[r] = simd::fma(kv, simd::load(q + r * ldq + d), acc[r]);
    }
    if (tail > 0) {
      const vfloat kv = simd::load_partial(kj + d_vec, tail);
      for (int r = 0; r < kRows; ++r) acc[r] = simd::fma(kv, q_tail[r], acc[r]);
    }
    for (int r = 0; r < kRows; ++r) s[r * lds + j] = scale * simd::reduce_add(acc[r]);
  }
}

// acc (rows x D, row-major) += P V for P (rows x bk, ld ldp).
template <int kRows>
void accumulate_few_rows(const float* v, int64_t ldv, const float* p, int64_t ldp, int64_t bk, int64_t D,
                         float* acc) {
  const int64_t d_vec = D / kWidth * kWidth;
  for (int64_t j = 0; j < bk; ++j) {
    const float* vj = v + j * ldv;
    simd::prefetch(vj + kRowPrefetch * ldv);
    for (int64_t d = 0; d < d_vec; d += kWidth) {
      const vfloat vv = simd::load(vj + d);
      for (int r = 0; r < kRows; ++r)
        simd::store(acc + r * D + d, simd::fma(simd::splat(p[r * ldp + j]), vv, simd::load(acc + r * D + d)));
    }
    for (int64_t d = d_vec; d < D; ++d)
      for (int r = 0; r < kRows; ++r) acc[r * D + d] += p[r * ldp + j] * vj[d];
  }
}

// Calls f(std::integral_constant<int, rows>) for rows in [1, kDotRows].
template <typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// scores_few_rows for any number of rows (ld ldq), kDotRows at a time. A score is the same operations in the same
// order whatever the row count, the chunk or the tile it falls in, so forward and backward agree on it bit for bit.
inline void scores_dot(const float* k, int64_t ldk, const float* q, int64_t ldq, int64_t rows, int64_t bk, int64_t D,
                       float scale, float* s, int64_t lds) {
  for (int64_t r0 = 0; r0 < rows; r0 += kDotRows)
    with_rows(std::min(kDotRows, rows - r0), [&](auto r) {
      scores_few_rows<r>(k, ldk, q + r0 * ldq, ldq, bk, D, scale, s + r0 * lds, lds);
    });
}

// The backward recomputes P = exp(S - lse) with the forward's lse, so its S must be the forward's to the last bit:
// with |S| ~ 100 an ulp of S (~1e-5) is an error of ~1e-5 in the P ~ 1 that dominate dV, dQ and dK (torch's
// OpInfo samples: 10x torch's own fp32 error when the forward took dot products and the backward BLAS, whose sums
// run in another order). The plan below, by shape alone, is shared by both: the forward's query heads per task (a
// kv head's whole group when its queries fit one tile: GQA decoding), its rows per task, and whether its scores are
// dot products (float32 tasks of few rows, decoding) or BLAS products; BLAS's are then computed head by head with
// the backward's tile shapes (a GEMM's rounding may depend on its shape).
inline int64_t group_heads_per_task(int64_t group, int64_t Tq) {
  return group > 1 && Tq > 0 && group * Tq <= kTileQ ? group : 1;
}
inline int64_t task_rows(int64_t group, int64_t Tq) { return group_heads_per_task(group, Tq) * std::min(Tq, kTileQ); }
template <typename T>
inline bool dot_scores(int64_t group, int64_t Tq) {
  return std::is_same_v<T, float> && task_rows(group, Tq) <= kFewRows;
}

// An fp32 tile (or row) as an operand of a product with inputs of type T: itself for float, rounded into `buf`
// for bfloat16.
inline const float* as_operand(const float* x, float*, int64_t) { return x; }
inline const c10::BFloat16* as_operand(const float* x, c10::BFloat16* buf, int64_t n) {
  vec::narrow(x, buf, n);
  return buf;
}
// A row of T as fp32: itself for float, widened into `buf` for bfloat16.
inline const float* as_float(const float* x, float*, int64_t) { return x; }
inline const float* as_float(const c10::BFloat16* x, float* buf, int64_t n) {
  vec::widen(x, buf, n);
  return buf;
}
// An fp32 row stored to T.
inline void store_row(const float* x, float* out, int64_t n) { std::copy(x, x + n, out); }
inline void store_row(const float* x, c10::BFloat16* out, int64_t n) { vec::narrow(x, out, n); }

// Pins BLAS to one thread inside a task: tasks are the parallelism, and a BLAS call must not split (or reorder)
// its sums differently when torch's thread count changes.
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() { previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0; }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);  // 0 restores the global setting
  }
};

// A (B, H, T, D) tensor of T whose rows (T) may be strided but whose D is contiguous; anything else is copied
// once (O(T*D), small next to the O(T^2*D) attention itself).
template <typename T>
struct Matrices {
  at::Tensor t;
  const T* data;
  int64_t sb, sh, st;
  explicit Matrices(const at::Tensor& in) {
    const bool usable = in.stride(3) == 1 && (in.size(2) == 1 || in.stride(2) >= in.size(3));
    t = usable ? in : in.contiguous();
    data = t.const_data_ptr<T>();
    sb = t.stride(0);
    sh = t.stride(1);
    st = t.size(2) == 1 ? t.size(3) : t.stride(2);
  }
  const T* at_head(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

// attn_mask as the kernels read it: a (B, Hq, Tq, Tk) view through its strides, never expanded in memory. A bool
// mask replaces a masked score by -inf (masked_fill, so a NaN score there takes no part); an additive one (of the
// inputs' type T) is added.
template <typename T>
class AttnMask {
 public:
  explicit AttnMask(const std::optional<at::Tensor>& mask) {
    if (!mask.has_value()) return;
    data_ = mask->const_data_ptr();
    is_bool_ = mask->scalar_type() == at::kBool;
    sb_ = mask->stride(0), sh_ = mask->stride(1), sq_ = mask->stride(2), sk_ = mask->stride(3);
  }
  bool present() const { return data_ != nullptr; }

  // Score row (b, h, i) over keys j0 .. j0 + n - 1.
  void apply(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, float* s) const {
    const int64_t at = b * sb_ + h * sh_ + i * sq_ + j0 * sk_;
    if (is_bool_) {
      const bool* keep = static_cast<const bool*>(data_) + at;
      for (int64_t j = 0; j < n; ++j)
        if (!keep[j * sk_]) s[j] = -std::numeric_limits<float>::infinity();
    } else {
      const T* add = static_cast<const T*>(data_) + at;
      if (sk_ == 1) {
        for (int64_t j = 0; j < n; ++j) s[j] += static_cast<float>(add[j]);  // the common layout: vectorised
      } else {
        for (int64_t j = 0; j < n; ++j) s[j] += static_cast<float>(add[j * sk_]);
      }
    }
  }

  // True when a bool mask removes every key of tile [i0, i0 + bq) x [j0, j0 + bk): the tile contributes nothing and
  // is skipped (the causal half of a transformers 4-D mask, the padding of a short sequence). An additive mask is
  // never skipped: a NaN score plus -inf stays NaN there, as in torch.
  bool removes_tile(int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0, int64_t bk) const {
    if (!is_bool_) return false;
    const bool* keep = static_cast<const bool*>(data_) + b * sb_ + h * sh_ + i0 * sq_ + j0 * sk_;
    const int64_t rows = sq_ == 0 ? 1 : bq;  // a padding mask repeats one row
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < bk; ++j)
        if (keep[r * sq_ + j * sk_]) return false;
    return true;
  }

  // dS = 0 where the mask removes the key (false, or -inf added), also when the row's delta is NaN, as for the
  // causal mask.
  void zero_masked(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, float* ds) const {
    const int64_t at = b * sb_ + h * sh_ + i * sq_ + j0 * sk_;
    if (is_bool_) {
      const bool* keep = static_cast<const bool*>(data_) + at;
      for (int64_t j = 0; j < n; ++j)
        if (!keep[j * sk_]) ds[j] = 0.f;
    } else {
      const T* add = static_cast<const T*>(data_) + at;
      for (int64_t j = 0; j < n; ++j)
        if (static_cast<float>(add[j * sk_]) == -std::numeric_limits<float>::infinity()) ds[j] = 0.f;
    }
  }

 private:
  const void* data_ = nullptr;
  bool is_bool_ = false;
  int64_t sb_ = 0, sh_ = 0, sq_ = 0, sk_ = 0;
};

// The dropout seed's value (a CPU tensor: reading it costs no sync), 0 when dropout is off.
inline uint64_t seed_value(const DropoutArgs& drop) { return drop.p > 0.f ? static_cast<uint64_t>(*drop.seed) : 0; }

// Number of keys of tile [j0, j0 + bk) that query i may see.
inline int64_t visible_keys(bool causal, int64_t i, int64_t j0, int64_t bk) {
  return causal ? std::clamp<int64_t>(i - j0 + 1, 0, bk) : bk;
}

// A score row (padded to kTileK) becomes exp(s - shift) over its first `visible` entries and exactly 0 after, even
// when shift is NaN (a NaN row): masked entries take no part, as in the CUDA kernels.
inline void exp_row(float* s, int64_t visible, float shift) {
  for (int64_t j = 0; j < kTileK; j += kWidth) simd::store(s + j, simd::exp(simd::load(s + j) - shift));
  std::fill(s + visible, s + kTileK, 0.f);
}

// The inputs' types the CPU kernels take.
void check_cpu_dtype(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op,
              " on CPU supports float32 and bfloat16, got ", q.scalar_type());
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, bool is_causal, double dropout_p,
                                                 double scale_d, const std::optional<at::Tensor>& seed,
                                                 const std::optional<at::Tensor>& attn_mask) {
  const Matrices<T> q(q_in), k(k_in), v(v_in);
  const AttnMask<T> mask(attn_mask);
  const int64_t B = q_in.size(0), H = q_in.size(1), Tq = q_in.size(2), Tk = k_in.size(2), D = q_in.size(3);
  const int64_t group = H / k_in.size(1);  // query heads per key/value head
  const float scale = static_cast<float>(scale_d);
  const DropoutArgs drop = dropout_args(dropout_p, seed);
  const bool dropout = drop.p > 0.f;
  const uint64_t drop_seed = seed_value(drop);
  at::Tensor out = pooled_empty({B, H, Tq, D}, q_in.scalar_type());
  at::Tensor lse = at::empty({B, H, Tq}, q_in.options().dtype(at::kFloat));
  T* out_p = out.mutable_data_ptr<T>();
  float* lse_p = lse.mutable_data_ptr<float>();

  // The work, decided by shape alone (so results never depend on the thread count):
  //  - a task is one head's tile of up to kTileQ queries, or, when a kv head's whole query group fits one tile
  //    (GQA decoding), all the group's heads at once, so K and V come from memory once per group, not per head;
  //  - a task of few rows (decoding) takes wide key tiles: fewer, longer products and fewer rescales;
  //  - too few tasks to fill the machine split their keys (flash-decoding): each split keeps its own (m, l, acc),
  //    combined below.
  const int64_t heads_per_task = group_heads_per_task(group, Tq);
  const int64_t tile_q = heads_per_task > 1 ? Tq : kTileQ;
  const int64_t q_tiles = ceil_div(Tq, tile_q);
  const int64_t head_blocks = H / heads_per_task;
  const int64_t tasks = B * head_blocks * q_tiles;
  const int64_t max_rows = task_rows(group, Tq);
  const int64_t splits = tasks > 0 && tasks < kSplitBelow && Tk >= 2 * kMinSplitKeys
                             ? std::min({ceil_div(kSplitBelow, tasks), Tk / kMinSplitKeys, kMaxSplits})
                             : 1;
  const int64_t split_len = round_up(ceil_div(Tk, splits), kTileK);
  const int64_t key_tile = max_rows <= kFewRows ? std::clamp(split_len, kTileK, kWideTileK) : kTileK;
  const bool by_dot = dot_scores<T>(group, Tq);
  // A group's query rows side by side for one product (they share K): dot products, and bfloat16's wide key tiles,
  // whose products the backward does not recompute bit for bit anyway (it rounds P to bfloat16).
  const bool packed = heads_per_task > 1 && max_rows <= kFewRows;
  // Per (task, split) partial results when the keys are split: acc (rows x D), then m and l per row.
  const int64_t partial_size = max_rows * (D + 2);
  std::vector<float> partials(splits > 1 ? tasks * splits * partial_size : 0);

  const int64_t grain = parallel_grain(max_rows * std::min(Tk, split_len) * D);  // a unit: its rows x its keys
  at::parallel_for(0, tasks * splits, grain, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single;
    std::vector<float> s(max_rows * key_tile), z(key_tile), acc(max_rows * D), m(max_rows), l(max_rows), orow(D);
    std::vector<T> p_op(max_rows * key_tile);                        // P as a product operand (bfloat16 inputs)
    std::vector<T> q_pack(packed ? max_rows * D : 0);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t task = unit / splits, split = unit % splits;
      const int64_t b = task / q_tiles / head_blocks, h_first = task / q_tiles % head_blocks * heads_per_task;
      const int64_t i0 = task % q_tiles * tile_q, bq = std::min(tile_q, Tq - i0), rows = heads_per_task * bq;
      const auto head_of = [&](int64_t r) { return h_first + r / bq; };  // row r is query i0 + r % bq of this head
      const T* qp = q.at_head(b, h_first) + i0 * q.st;
      int64_t ldq = q.st;
      if (packed) {
        for (int64_t r = 0; r < rows; ++r) {
          const T* row = q.at_head(b, head_of(r)) + (i0 + r % bq) * q.st;
          std::copy(row, row + D, q_pack.data() + r * D);
        }
        qp = q_pack.data();
        ldq = D;
      }
      const bool few_rows = std::is_same_v<T, float> && rows <= kDotRows;
      const T* kp = k.at_head(b, h_first / group);
      const T* vp = v.at_head(b, h_first / group);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t key_end = is_causal ? std::min(Tk, i0 + bq) : Tk;  // causal: later key tiles are skipped
      const int64_t split_end = std::min(key_end, (split + 1) * split_len);
      for (int64_t j0 = split * split_len; j0 < split_end; j0 += key_tile) {
        const int64_t bk = std::min(key_tile, split_end - j0), width = round_up(bk, kWidth);
        if (mask.present()) {
          bool removed = true;
          for (int64_t g = 0; g < heads_per_task && removed; ++g)
            removed = mask.removes_tile(b, h_first + g, i0, bq, j0, bk);
          if (removed) continue;
        }
        // S (rows x bk, row-major, ld key_tile) = scale * Q K^T, i.e. column-major S^T = K Q^T, as the backward
        // recomputes it (see dot_scores).
        if (by_dot) {
          if constexpr (std::is_same_v<T, float>)
            scores_dot(kp + j0 * k.st, k.st, qp, ldq, rows, bk, D, scale, s.data(), key_tile);
        } else if (packed) {
          gemm(true, false, bk, rows, D, scale, kp + j0 * k.st, k.st, qp, ldq, 0.f, s.data(), key_tile);
        } else {
          for (int64_t g = 0; g < heads_per_task; ++g)
            gemm(true, false, bk, bq, D, scale, kp + j0 * k.st, k.st, q.at_head(b, h_first + g) + i0 * q.st, q.st,
                 0.f, s.data() + g * bq * key_tile, key_tile);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t h = head_of(r), i = i0 + r % bq;
          float* sr = s.data() + r * key_tile;
          const int64_t visible = visible_keys(is_causal, i, j0, bk);
          if (visible == 0) {  // this query sees none of the tile
            std::fill(sr, sr + width, 0.f);
            continue;
          }
          if (mask.present()) mask.apply(b, h, i, j0, visible, sr);
          // Masked and padding columns become -inf, so the vector max and exp below need no bounds.
          for (int64_t j = visible; j < width; ++j) sr[j] = -std::numeric_limits<float>::infinity();
          vfloat vmax = simd::load(sr);
          for (int64_t j = kWidth; j < width; j += kWidth) vmax = simd::vmax(vmax, simd::load(sr + j));
          const float m_new = simd::max_keep_nan(m[r], simd::reduce_max(vmax));  // NaN scores make the row NaN
          // A row that has seen only -inf scores (fully masked so far) keeps m = -inf and l = 0: exponentiating
          // against 0 instead of -inf gives P = 0 and alpha = 0, not exp(-inf + inf) = NaN.
          const float m_ref = m_new == -std::numeric_limits<float>::infinity() ? 0.f : m_new;
          const float alpha = std::exp(m[r] - m_ref);  // 0 on the first tile (m = -inf)
          vfloat sum = simd::splat(0.f);
          for (int64_t j = 0; j < width; j += kWidth) {
            const vfloat e = simd::exp(simd::load(sr + j) - m_ref);
            simd::store(sr + j, e);
            sum += e;
          }
          l[r] = l[r] * alpha + simd::reduce_add(sum);
          m[r] = m_new;
          if (alpha != 1.f) {
            float* ar = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
          }
          if (dropout) {  // the row sum above is taken before dropout, as softmax-then-dropout requires
            const uint64_t base = static_cast<uint64_t>(((b * H + h) * Tq + i) * Tk + j0);
            // Only the visible keys need a draw: past them P is exactly 0 and z stays finite from earlier rows.
            simd::dropout_factors(z.data(), visible, drop_seed, base, drop.p, drop.keep_scale);
            for (int64_t j = 0; j < width; j += kWidth)
              simd::store(sr + j, simd::load(sr + j) * simd::load(z.data() + j));
          }
        }
        // acc (rows x D, row-major) += P V, i.e. column-major acc^T += V^T P^T.
        if (few_rows) {
          if constexpr (std::is_same_v<T, float>)
            with_rows(rows, [&](auto r) {
              accumulate_few_rows<r>(vp + j0 * v.st, v.st, s.data(), key_tile, bk, D, acc.data());
            });
        } else {
          gemm(false, false, D, rows, bk, 1.f, vp + j0 * v.st, v.st,
               as_operand(s.data(), p_op.data(), rows * key_tile), key_tile, 1.f, acc.data(), D);
        }
      }
      if (splits > 1) {  // this split's share; the combine below normalises
        float* part = partials.data() + unit * partial_size;
        std::copy(acc.begin(), acc.begin() + rows * D, part);
        std::copy(m.begin(), m.begin() + rows, part + max_rows * D);
        std::copy(l.begin(), l.begin() + rows, part + max_rows * (D + 1));
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = (b * H + head_of(r)) * Tq + i0 + r % bq;
        // l = 0: every score was -inf (a fully masked row). Its output is 0, as in torch's SDPA, and its lse +inf, so
        // the backward's P = exp(S - lse) is 0 there as well. A NaN l (NaN or inf scores) stays NaN.
        const float inv = l[r] == 0.f ? 0.f : 1.f / l[r];
        const float* ar = acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = ar[d] * inv;
        store_row(orow.data(), out_p + row * D, D);
        lse_p[row] = l[r] == 0.f ? std::numeric_limits<float>::infinity() : m[r] + std::log(l[r]);
      }
    }
  });
  if (splits > 1) {  // out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s m_s; few rows, one thread
    std::vector<float> orow(D);
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / q_tiles / head_blocks, h_first = task / q_tiles % head_blocks * heads_per_task;
      const int64_t i0 = task % q_tiles * tile_q, bq = std::min(tile_q, Tq - i0);
      const float* part = partials.data() + task * splits * partial_size;
      for (int64_t r = 0; r < heads_per_task * bq; ++r) {
        float m_all = -std::numeric_limits<float>::infinity(), l_all = 0.f;
        for (int64_t sp = 0; sp < splits; ++sp)
          m_all = simd::max_keep_nan(m_all, part[sp * partial_size + max_rows * D + r]);
        const float m_ref = m_all == -std::numeric_limits<float>::infinity() ? 0.f : m_all;
        std::fill(orow.begin(), orow.end(), 0.f);
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float* ps = part + sp * partial_size;
          const float w = std::exp(ps[max_rows * D + r] - m_ref);  // 0 for a split that saw no key
          l_all += w * ps[max_rows * (D + 1) + r];
          for (int64_t d = 0; d < D; ++d) orow[d] += w * ps[r * D + d];
        }
        const float inv = l_all == 0.f ? 0.f : 1.f / l_all;
        for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
        const int64_t row = (b * H + h_first + r / bq) * Tq + i0 + r % bq;
        store_row(orow.data(), out_p + row * D, D);
        lse_p[row] = l_all == 0.f ? std::numeric_limits<float>::infinity() : m_all + std::log(l_all);
      }
    }
  }
  return {out, lse};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, bool is_causal, double dropout_p, double scale_d,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& attn_mask) {
  const Matrices<T> q(q_in), k(k_in), v(v_in), dout(grad_out_in), o(out_in);
  const AttnMask<T> mask(attn_mask);
  const at::Tensor lse = lse_in.contiguous();
  const int64_t B = q_in.size(0), H = q_in.size(1), Tq = q_in.size(2), Tk = k_in.size(2), D = q_in.size(3);
  const int64_t Hk = k_in.size(1), group = H / Hk;
  const float scale = static_cast<float>(scale_d);
  const DropoutArgs drop = dropout_args(dropout_p, seed);
  const bool dropout = drop.p > 0.f;
  const uint64_t drop_seed = seed_value(drop);
  // fp32 sums (the outputs themselves for float32 inputs). Not zero-filled: each tile's first contribution is
  // written with beta = 0 (and unvisited key rows zeroed).
  at::Tensor dq = pooled_empty({B, H, Tq, D});
  at::Tensor dk = pooled_empty({B, Hk, Tk, D});
  at::Tensor dv = pooled_empty({B, Hk, Tk, D});
  const float* lse_p = lse.const_data_ptr<float>();
  float* dq_p = dq.mutable_data_ptr<float>();
  float* dk_p = dk.mutable_data_ptr<float>();
  float* dv_p = dv.mutable_data_ptr<float>();
  const int64_t q_tiles = (Tq + kTileQ - 1) / kTileQ;
  const bool by_dot = dot_scores<T>(group, Tq);

  at::parallel_for(0, B * Hk, parallel_grain(group * Tq * Tk * D), [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single;
    std::vector<float> p(kTileQ * kTileK), ds(kTileQ * kTileK), w(dropout ? kTileQ * kTileK : 0), z(kTileK),
        delta(group * Tq), do_row(D), o_row(D);
    std::vector<T> w_op(kTileQ * kTileK), ds_op(kTileQ * kTileK);  // W and dS as product operands (bfloat16)
    for (int64_t bkv = begin; bkv < end; ++bkv) {
      const int64_t b = bkv / Hk, h0 = bkv % Hk * group;  // this kv head's query heads: h0 .. h0 + group - 1
      const T* kh = k.at_head(b, bkv % Hk);
      const T* vh = v.at_head(b, bkv % Hk);
      const int64_t dv_end = D / kWidth * kWidth;
      float* dq_group = dq_p + (b * H + h0) * Tq * D;  // the group's query heads are adjacent
      if (mask.present()) std::fill(dq_group, dq_group + group * Tq * D, 0.f);
      for (int64_t g = 0; g < group; ++g) {  // delta = rowsum(dO * O): the softmax Jacobian's correction term
        const T* doh = dout.at_head(b, h0 + g);
        const T* oh = o.at_head(b, h0 + g);
        for (int64_t i = 0; i < Tq; ++i) {
          const float* dor = as_float(doh + i * dout.st, do_row.data(), D);
          const float* orow = as_float(oh + i * o.st, o_row.data(), D);
          // Multiply-adds in lanes (fused where the CPU has FMA), the tail zero-padded, then a tree: dS = P (dP -
          // delta) cancels where P ~ 1, so delta's rounding shows in dQ and dK; a scalar tail summed in sequence
          // (all of D = 8) made dK 1.8x torch's error on the AVX2 path (torch's OpInfo samples).
          vfloat acc_v = simd::splat(0.f);
          for (int64_t d = 0; d < dv_end; d += kWidth)
            acc_v = simd::fma(simd::load(dor + d), simd::load(orow + d), acc_v);
          if (dv_end < D) {
            const int64_t tail = D - dv_end;
            acc_v = simd::fma(simd::load_partial(dor + dv_end, tail), simd::load_partial(orow + dv_end, tail), acc_v);
          }
          delta[g * Tq + i] = simd::reduce_add(acc_v);
        }
      }
      for (int64_t j0 = 0; j0 < Tk; j0 += kTileK) {
        const int64_t bk = std::min(kTileK, Tk - j0);
        const T* kj = kh + j0 * k.st;
        const T* vj = vh + j0 * v.st;
        float* dk_j = dk_p + (bkv * Tk + j0) * D;
        float* dv_j = dv_p + (bkv * Tk + j0) * D;
        const int64_t first_q_tile = is_causal ? std::min(j0, Tq) / kTileQ : 0;  // earlier queries see none of it
        float kv_beta = 0.f;  // dK/dV rows of this key tile: the first visiting query tile writes, later ones add
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = h0 + g, bh = b * H + h;
          const T* qh = q.at_head(b, h);
          const T* doh = dout.at_head(b, h);
          const float* lse_h = lse_p + bh * Tq;
          const float* delta_h = delta.data() + g * Tq;
          float* dq_h = dq_p + bh * Tq * D;
          for (int64_t qt = first_q_tile; qt < q_tiles; ++qt) {
            const int64_t i0 = qt * kTileQ, bq = std::min(kTileQ, Tq - i0);
            if (is_causal && i0 + bq - 1 < j0) continue;
            if (mask.present() && mask.removes_tile(b, h, i0, bq, j0, bk)) continue;
            const T* qi = qh + i0 * q.st;
            const T* doi = doh + i0 * dout.st;
            // S as the forward computed it (dot_scores): a causal forward tile ends at its last query's key.
            const int64_t s_bk = is_causal ? std::min(bk, i0 + bq - j0) : bk;
            if (by_dot) {
              if constexpr (std::is_same_v<T, float>)
                scores_dot(kj, k.st, qi, q.st, bq, s_bk, D, scale, p.data(), kTileK);
            } else {
              gemm(true, false, s_bk, bq, D, scale, kj, k.st, qi, q.st, 0.f, p.data(), kTileK);
            }
            gemm(true, false, bk, bq, D, 1.f, vj, v.st, doi, dout.st, 0.f, ds.data(), kTileK);   // dP = dO V^T
            for (int64_t r = 0; r < bq; ++r) {
              const int64_t i = i0 + r;
              float* pr = p.data() + r * kTileK;
              float* dsr = ds.data() + r * kTileK;
              const int64_t visible = visible_keys(is_causal, i, j0, bk);
              if (mask.present()) mask.apply(b, h, i, j0, visible, pr);
              exp_row(pr, visible, lse_h[i]);  // P, 0 where masked
              const vfloat dl = simd::splat(delta_h[i]);
              if (dropout) {
                float* wr = w.data() + r * kTileK;
                const uint64_t base = static_cast<uint64_t>((bh * Tq + i) * Tk + j0);
                simd::dropout_factors(z.data(), visible, drop_seed, base, drop.p, drop.keep_scale);
                for (int64_t j = 0; j < kTileK; j += kWidth) {
                  const vfloat pv = simd::load(pr + j), zv = simd::load(z.data() + j);
                  simd::store(wr + j, pv * zv);
                  simd::store(dsr + j, pv * (simd::load(dsr + j) * zv - dl));
                }
              } else {
                for (int64_t j = 0; j < kTileK; j += kWidth)
                  simd::store(dsr + j, simd::load(pr + j) * (simd::load(dsr + j) - dl));
              }
              // Masked entries: dS = 0 exactly, also when delta is NaN (0 * NaN above).
              if (visible < bk) std::fill(dsr + visible, dsr + bk, 0.f);
              if (mask.present()) mask.zero_masked(b, h, i, j0, visible, dsr);
            }
            const T* wts = as_operand(dropout ? w.data() : p.data(), w_op.data(), bq * kTileK);
            const T* dst = as_operand(ds.data(), ds_op.data(), bq * kTileK);
            gemm(false, true, D, bk, bq, 1.f, doi, dout.st, wts, kTileK, kv_beta, dv_j, D);   // dV += W^T dO
            gemm(false, true, D, bk, bq, scale, qi, q.st, dst, kTileK, kv_beta, dk_j, D);     // dK += dS^T Q
            kv_beta = 1.f;
            // dQ += dS K. Without a mask key tile 0 is every query tile's first (causal rows all see key 0), which
            // writes; with one that tile may be skipped, so dQ starts zeroed instead.
            gemm(false, false, D, bq, bk, scale, kj, k.st, dst, kTileK, j0 == 0 && !mask.present() ? 0.f : 1.f,
                 dq_h + i0 * D, D);
          }
        }
        if (kv_beta == 0.f) {  // no query sees these keys (causal, Tk > Tq): their gradients are zero
          std::fill(dk_j, dk_j + bk * D, 0.f);
          std::fill(dv_j, dv_j + bk * D, 0.f);
        }
      }
    }
  });
  if constexpr (std::is_same_v<T, float>) return {dq, dk, dv};
  const auto in_type = q_in.scalar_type();
  return {dq.to(in_type), dk.to(in_type), dv.to(in_type)};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool is_causal, double dropout_p, double scale,
                                                     const std::optional<at::Tensor>& seed,
                                                     const std::optional<at::Tensor>& attn_mask) {
  const char* op = "chargpt::attention_fwd";
  check_attention_args(op, q, k, v, dropout_p, scale, seed);
  check_attention_mask(op, q, k, attn_mask);
  check_cpu_dtype(op, q);
  return q.scalar_type() == at::kBFloat16
             ? attention_fwd<c10::BFloat16>(q, k, v, is_causal, dropout_p, scale, seed, attn_mask)
             : attention_fwd<float>(q, k, v, is_causal, dropout_p, scale, seed, attn_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, bool is_causal, double dropout_p, double scale, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& attn_mask) {
  const char* op = "chargpt::attention_bwd";
  check_attention_args(op, q, k, v, dropout_p, scale, seed);
  check_attention_mask(op, q, k, attn_mask);
  check_attention_bwd_args(grad_out, q, out, lse);
  check_cpu_dtype(op, q);
  return q.scalar_type() == at::kBFloat16
             ? attention_bwd<c10::BFloat16>(grad_out, q, k, v, out, lse, is_causal, dropout_p, scale, seed, attn_mask)
             : attention_bwd<float>(grad_out, q, k, v, out, lse, is_causal, dropout_p, scale, seed, attn_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(chargpt, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace chargpt
