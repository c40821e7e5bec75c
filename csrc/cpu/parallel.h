// When the CPU kernels split work over threads. at::parallel_for opens an OpenMP region only for more iterations
// than its grain; there every thread of the pool wakes (and, when the machine is busy, spin-waits for the others),
// which costs more than a small job itself. So each kernel states a job's work and runs jobs below kParallelGrain
// on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace chargpt {

// Elements (or multiply-adds) of work below which a job stays on one thread: ATen's at::internal::GRAIN_SIZE.
constexpr int64_t kParallelGrain = 32768;

// The at::parallel_for grain, in iterations, for iterations of `work_per_iteration` each: a job of n iterations
// opens a region iff n > grain, i.e. about when its total work exceeds kParallelGrain.
inline int64_t parallel_grain(int64_t work_per_iteration) {
  return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, work_per_iteration));
}

// body(begin, end) over [0, n) in parallel when n > grain iterations, else on the calling thread (small jobs open
// no parallel region). Blocks of iterations are handed out through an atomic counter rather than split statically as
// at::parallel_for does: on a busy machine a thread whose core is shared then takes fewer blocks instead of holding up
// the others (measured on the 2-core machine under load). Which thread runs a block never changes a result.
template <typename F>
void parallel_blocks(int64_t n, int64_t grain, const F& body) {
  const int threads = at::get_num_threads();
  if (n <= grain || threads == 1 || at::in_parallel_region()) return body(int64_t{0}, n);
  const int64_t block = std::max<int64_t>(grain, (n + 8 * threads - 1) / (8 * threads));  // ~8 blocks a thread
  const int64_t blocks = (n + block - 1) / block;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, blocks, 1, [&](int64_t, int64_t) {  // each thread drains the counter, whatever its share
    for (int64_t b = next++; b < blocks; b = next++) body(b * block, std::min(n, (b + 1) * block));
  });
}

}  // namespace chargpt
