// A CPU emulator for the CUDA kernels of csrc/cuda, so that their code runs in the test suite on machines without
// a GPU (tests/test_cuda_emulated.py). It covers what those kernels use and nothing more:
//   - a block's threads are cooperative fibers (ucontext) on one OS thread, run round-robin, in thread order and
//     in reverse order in alternate blocks (which comes first is set per test); they switch only at
//     __syncthreads, __syncwarp and shuffles, which are barriers (exited threads stop counting, as on the GPU);
//     a round in which no barrier opens and no thread ends is reported as a deadlock;
//   - blocks run one after another, so `static` storage serves as __shared__; dynamic shared memory is refilled
//     with 0xff bytes (NaN as floats) before every block, so reading what no thread wrote shows up in results;
//   - WMMA fragments hold whole 16x16 tiles; every lane loads and multiplies its own copy in fp32, and the lane
//     that runs last does the store, so a lane that reads a stored tile without a __syncwarp reads stale data.
// It checks indexing, masking, tiling, synchronisation placement and numerics, not timing, coalescing or bank
// conflicts. A read of shared data that a missing barrier leaves unordered shows up in one of the two thread
// orders; races the orders cannot expose (between threads that both run before the next barrier) are not caught.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define CHARGPT_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
using cudaError_t = int;
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace cuda_emu {

struct Barrier {
  int live = 0, arrived = 0;
  unsigned generation = 0;
};

struct Thread {
  dim3 idx;
  int warp = 0, lane = 0;
  bool done = false;
  ucontext_t context;
};

struct Block {
  dim3 idx, dim, grid;
  std::vector<Thread> threads;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> exchange;  // shuffle slots, 32 per warp
  int current = 0;
  bool reverse = false;            // run the threads in reverse order
  uint64_t progress = 0;           // barriers opened + threads finished
  ucontext_t scheduler;
};

inline Block* block = nullptr;               // the block being run
inline std::function<void()> kernel_body;    // the kernel call with its arguments
inline int compute_capability_major = 9;     // what cudaDeviceGetAttribute reports
inline bool reverse_first_block = false;     // the thread order of a grid's first block
inline std::vector<unsigned char> dynamic_smem_storage;
inline unsigned char* dynamic_smem = nullptr;

inline Thread& self() { return block->threads[block->current]; }
inline void yield() { swapcontext(&self().context, &block->scheduler); }

inline void open(Barrier& b) {
  b.arrived = 0;
  ++b.generation;
  ++block->progress;
}

inline void wait(Barrier& b) {
  const unsigned generation = b.generation;
  if (++b.arrived == b.live) return open(b);
  while (b.generation == generation) yield();
}

inline void leave(Barrier& b) {  // an exited thread no longer counts
  --b.live;
  if (b.arrived > 0 && b.arrived == b.live) open(b);
}

inline void thread_main() {
  kernel_body();
  Thread& t = self();
  t.done = true;
  ++block->progress;
  leave(block->block_barrier);
  leave(block->warp_barriers[t.warp]);
}  // returns to the scheduler through uc_link

inline void run_block(dim3 grid, dim3 idx, dim3 dim, size_t smem, bool reverse) {
  constexpr size_t kStack = 256 << 10;
  static std::vector<std::unique_ptr<char[]>> stacks;
  const int n = static_cast<int>(dim.x * dim.y * dim.z), warps = (n + 31) / 32;
  while (stacks.size() < static_cast<size_t>(n)) stacks.emplace_back(new char[kStack]);
  Block b;
  b.idx = idx;
  b.dim = dim;
  b.grid = grid;
  b.threads.resize(n);
  b.warp_barriers.resize(warps);
  b.exchange.assign(32 * warps, 0);
  b.block_barrier.live = n;
  b.reverse = reverse;
  std::memset(dynamic_smem, 0xff, smem);
  block = &b;
  for (int tid = 0; tid < n; ++tid) {
    Thread& t = b.threads[tid];
    t.idx = dim3(tid % dim.x, tid / dim.x % dim.y, tid / (dim.x * dim.y));
    t.warp = tid / 32;
    t.lane = tid % 32;
    ++b.warp_barriers[t.warp].live;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = stacks[tid].get();
    t.context.uc_stack.ss_size = kStack;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, thread_main, 0);
  }
  for (bool running = true; running;) {
    running = false;
    const uint64_t before = b.progress;
    for (int i = 0; i < n; ++i) {
      const int tid = reverse ? n - 1 - i : i;
      if (b.threads[tid].done) continue;
      running = true;
      b.current = tid;
      swapcontext(&b.scheduler, &b.threads[tid].context);
    }
    TORCH_CHECK(!running || b.progress != before, "cuda emulator: deadlock in block (", idx.x, ", ", idx.y,
                "): threads wait at barriers that can never open");
  }
  block = nullptr;
}

inline void run_grid(dim3 grid, dim3 dim, size_t smem, std::function<void()> body) {
  dynamic_smem_storage.resize(smem + 128);
  unsigned char* base = dynamic_smem_storage.data();
  dynamic_smem = base + (128 - reinterpret_cast<uintptr_t>(base) % 128);
  kernel_body = std::move(body);
  bool reverse = reverse_first_block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x, reverse = !reverse) run_block(grid, dim3(x, y, z), dim, smem, reverse);
  kernel_body = nullptr;
}

template <typename V>
V shuffle(V v, int source_lane) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  Thread& t = self();
  uint64_t* slots = block->exchange.data() + 32 * t.warp;
  std::memcpy(&slots[t.lane], &v, sizeof(V));
  wait(block->warp_barriers[t.warp]);
  V out;
  std::memcpy(&out, &slots[source_lane & 31], sizeof(V));
  wait(block->warp_barriers[t.warp]);  // everyone has read before the slots are reused
  return out;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::self().idx)
#define blockIdx (::cuda_emu::block->idx)
#define blockDim (::cuda_emu::block->dim)
#define gridDim (::cuda_emu::block->grid)

inline void __syncthreads() { cuda_emu::wait(cuda_emu::block->block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  cuda_emu::wait(cuda_emu::block->warp_barriers[cuda_emu::self().warp]);
}
template <typename V>
V __shfl_xor_sync(unsigned, V v, int lane_mask) { return cuda_emu::shuffle(v, cuda_emu::self().lane ^ lane_mask); }
template <typename V>
V __shfl_sync(unsigned, V v, int source_lane) { return cuda_emu::shuffle(v, source_lane); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
[[noreturn]] inline void __trap() { TORCH_CHECK(false, "cuda emulator: __trap() reached"); }
template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = cuda_emu::compute_capability_major;
  return 0;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }

// The two seams of csrc/cuda/common.cuh.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);  // converted once, as a launch does
  cuda_emu::run_grid(grid, block, smem, [&] { std::apply(kernel, params); });
}
template <typename S>
S& dynamic_shared() { return *reinterpret_cast<S*>(cuda_emu::dynamic_smem); }
