// The CUDA thread model on the CPU, for testing this crate's NVRTC kernels without a GPU.
//
// A kernel's source (`worker/src/backend/nvrtc.cu`) compiles here as C++20 with g++. A launch
// runs the grid's blocks one after another and each block's threads as OS threads, so that
// `__syncthreads` and the warp shuffles synchronise real concurrent threads: a missing barrier
// or a read of another lane's data shows as a wrong result, as on a GPU. A thread that returns
// leaves its block's and its warp's barriers, as a finished thread does on Volta and later.
// Blocks run one at a time, so a `__shared__` array is a function's `static`.
//
// What it does not model: memory ordering between blocks, occupancy and timing. Passing here
// shows that a kernel computes the right thing, not that it is fast or correct on a GPU.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace cuda_host {
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

// What the threads of one block share while it runs.
struct Block {
    explicit Block(unsigned threads)
        : sync(threads), warps((threads + 31) / 32), lanes(((threads + 31) / 32) * 32) {
        for (unsigned w = 0; w < warps.size(); w++) {
            unsigned in_warp = std::min(32u, threads - 32 * w);
            warps[w] = std::make_unique<std::barrier<>>(in_warp);
        }
    }
    std::barrier<> sync;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> lanes;  // each lane's value in a shuffle
};
inline thread_local Block* block = nullptr;
inline thread_local unsigned linear_tid = 0;

inline std::barrier<>& warp() { return *block->warps[linear_tid / 32]; }

// The value `lane` of this thread's warp offers in a shuffle that every live lane joins.
template <class T>
T shuffle(T v, unsigned lane) {
    static_assert(sizeof(T) <= 8);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    block->lanes[linear_tid] = bits;
    warp().arrive_and_wait();
    unsigned base = linear_tid / 32 * 32;
    T out = v;
    if (lane < 32 && base + lane < block->lanes.size()) {
        std::memcpy(&out, &block->lanes[base + lane], sizeof(T));
    }
    warp().arrive_and_wait();
    return out;
}

// Runs `kernel(args...)` over `grid` blocks of `threads`, as cuLaunchKernel would.
template <class... A>
void launch(void (*kernel)(A...), dim3 grid, dim3 threads, A... args) {
    unsigned per_block = threads.x * threads.y * threads.z;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                Block shared(per_block);
                std::vector<std::thread> team;
                team.reserve(per_block);
                for (unsigned t = 0; t < per_block; t++) {
                    team.emplace_back([&, t] {
                        block = &shared;
                        linear_tid = t;
                        thread_idx = {t % threads.x, t / threads.x % threads.y,
                                      t / (threads.x * threads.y)};
                        block_idx = {bx, by, bz};
                        block_dim = threads;
                        grid_dim = grid;
                        kernel(args...);
                        warp().arrive_and_drop();
                        shared.sync.arrive_and_drop();
                    });
                }
                for (auto& t : team) t.join();
            }
}

template <class... A>
constexpr std::size_t arity(void (*)(A...)) {
    return sizeof...(A);
}

// cuLaunchKernel's form: `params[i]` points to argument i.
template <class... A, std::size_t... I>
void launch_params(void (*kernel)(A...), dim3 grid, dim3 threads, void** params,
                   std::index_sequence<I...>) {
    launch<A...>(kernel, grid, threads, *static_cast<A*>(params[I])...);
}
}  // namespace cuda_host

#define threadIdx (cuda_host::thread_idx)
#define blockIdx (cuda_host::block_idx)
#define blockDim (cuda_host::block_dim)
#define gridDim (cuda_host::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { cuda_host::block->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_host::warp().arrive_and_wait(); }

template <class T>
T __shfl_sync(unsigned, T v, int lane, int = 32) {
    return cuda_host::shuffle(v, unsigned(lane) % 32);
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    return cuda_host::shuffle(v, cuda_host::linear_tid % 32 + delta);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
    return cuda_host::shuffle(v, (cuda_host::linear_tid % 32) ^ unsigned(mask));
}

inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
inline unsigned __float_as_uint(float v) { unsigned i; std::memcpy(&i, &v, 4); return i; }
inline float __expf(float v) { return std::exp(v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

// `extern "C" void launch_NAME(grid, block, params)` for a kernel NAME.
#define MOEBIUS_EXPORT(name)                                                                  \
    extern "C" void launch_##name(const unsigned* grid, const unsigned* threads,              \
                                  void** params) {                                            \
        cuda_host::launch_params(name, dim3{grid[0], grid[1], grid[2]},                       \
                                 dim3{threads[0], threads[1], threads[2]}, params,            \
                                 std::make_index_sequence<cuda_host::arity(name)>{});         \
    }
