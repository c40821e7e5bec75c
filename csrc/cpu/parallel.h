// When the CPU kernels split work over threads. at::parallel_for opens an OpenMP region only for more iterations
// than its grain; there every thread of the pool wakes (and, when the machine is busy, spin-waits for the others),
// which costs more than a small job itself. So each kernel states a job's work and runs jobs below kParallelGrain
// on the calling thread.
#pragma once

#include <algorithm>
#include <cstdint>

namespace chargpt {

// Elements (or multiply-adds) of work below which a job stays on one thread: ATen's at::internal::GRAIN_SIZE.
constexpr int64_t kParallelGrain = 32768;

// The at::parallel_for grain, in iterations, for iterations of `work_per_iteration` each: a job of n iterations
// opens a region iff n > grain, i.e. about when its total work exceeds kParallelGrain.
inline int64_t parallel_grain(int64_t work_per_iteration) {
  return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, work_per_iteration));
}

}  // namespace chargpt
