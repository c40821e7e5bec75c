// linear on CPU for a few rows: y (M, N) = x (M, K) weight^T + bias, the matrix-vector products of decoding.
//
// Decoding one token multiplies a single row by every weight matrix, so it reads each weight once and does two
// flops per weight: bound by memory, not arithmetic. torch's CPU GEMM runs such a product on one thread at about a
// third of the machine's read rate (measured on the 2-core AMD EPYC: 12-16 GB/s of ~40 GB/s), so this kernel splits
// the weight's rows over the threads instead and streams them at the machine's rate:
//   - a block of kOut weight rows is read once, with kRows rows of x at a time (up to 4, all in registers), each
//     (x row, weight row) pair summing into its own vector accumulator; a weight block of K <= a few thousand stays
//     in L1 for the next 4 rows of x when M > 4;
//   - each weight row is prefetched kPrefetch floats ahead of its use, which keeps enough misses in flight for one
//     core's share of the bandwidth;
//   - every output is summed by one thread in a fixed order (vector lanes, then the lanes in a tree, then the K tail),
//     so the result does not depend on the thread count.
// For many rows the product is arithmetic-bound and a blocked GEMM (torch's) is the right tool:
// kernels/chargpt_kernels/ext_linear.py sends calls of more than GEMV_MAX_ROWS rows there. float32 only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../checks.h"
#include "../host_utils.h"
#include "parallel.h"
#include "vec.h"

namespace chargpt {
namespace {

using vec::kWidth;
using vec::vfloat;

constexpr int kOut = 4;  // weight rows per block
constexpr int kMaxRows = 4;  // x rows per pass over a block
constexpr int64_t kPrefetch = 512;  // floats ahead (2 KB): measured best of 0, 128 and 512 on the EPYC

struct Operands {
  const float* x;
  int64_t x_stride;  // between rows of x
  const float* w;
  int64_t w_stride;  // between rows of weight
  const float* bias;  // null without bias
  float* y;  // (M, N), contiguous
  int64_t n, k;
};

// y[m0 .. m0 + kRows) x [o0 .. o0 + kOut) from one pass over the weight block; rows past N repeat the block's first
// row (a valid read) and are not stored.
template <int kRows>
void dot_block(const Operands& a, int64_t m0, int64_t o0) {
  const int live = static_cast<int>(std::min<int64_t>(kOut, a.n - o0));
  const float* w[kOut];
  const float* x[kRows];
  for (int r = 0; r < kOut; ++r) w[r] = a.w + (o0 + (r < live ? r : 0)) * a.w_stride;
  for (int m = 0; m < kRows; ++m) x[m] = a.x + (m0 + m) * a.x_stride;
  vfloat acc[kRows][kOut] = {};
  int64_t i = 0;
  for (; i + kWidth <= a.k; i += kWidth) {
    vfloat wv[kOut];
    for (int r = 0; r < kOut; ++r) {
      wv[r] = vec::load(w[r] + i);
      __builtin_prefetch(w[r] + i + kPrefetch, 0, 0);  // past the row's end it fetches the next row: harmless
    }
    for (int m = 0; m < kRows; ++m) {
      const vfloat xv = vec::load(x[m] + i);
      for (int r = 0; r < kOut; ++r) acc[m][r] = vec::fma(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < kRows; ++m) {
    for (int r = 0; r < live; ++r) {
      float sum = vec::reduce_add(acc[m][r]);
      for (int64_t j = i; j < a.k; ++j) sum += w[r][j] * x[m][j];
      a.y[(m0 + m) * a.n + o0 + r] = a.bias ? sum + a.bias[o0 + r] : sum;
    }
  }
}

at::Tensor linear_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias) {
  check_linear_args(x_in, weight_in, bias);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "chargpt::linear_fwd: the CPU kernel takes float32, got ",
              x_in.scalar_type());
  const at::Tensor x = unit_last_dim(x_in), weight = unit_last_dim(weight_in);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const Operands a{x.const_data_ptr<float>(), x.stride(0), weight.const_data_ptr<float>(), weight.stride(0),
                   b.defined() ? b.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), n, k};
  const int64_t blocks = (n + kOut - 1) / kOut;
  parallel_blocks(blocks, parallel_grain(kOut * m * std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o0 = block * kOut;
      int64_t row = 0;
      for (; row + kMaxRows <= m; row += kMaxRows) dot_block<kMaxRows>(a, row, o0);
      switch (m - row) {
        case 3: dot_block<3>(a, row, o0); break;
        case 2: dot_block<2>(a, row, o0); break;
        case 1: dot_block<1>(a, row, o0); break;
        default: break;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(chargpt, CPU, m) { m.impl("linear_fwd", &linear_fwd_cpu); }

}  // namespace chargpt
