// The CUDA thread model on the CPU, for testing this crate's NVRTC kernels without a GPU.
//
// A kernel's source (`worker/src/backend/nvrtc.cu`) compiles here as C++20 with g++. A launch
// runs the grid's blocks one after another, and each block's threads as fibers (ucontext) on
// the launching thread: every thread runs until it meets a barrier (`__syncthreads`, or its
// warp's, inside the warp shuffles), and a barrier opens when every live thread it binds has
// reached it. The warps run last first, each as far as it can before the next, so a read of
// another warp's data without the barrier that orders it sees a value from before or after the
// one it needs, every time, and the wrong result shows as it may on a GPU; a barrier that some
// threads never reach stops the process with a message. A thread that
// returns leaves its block's and its warp's barriers, as a finished thread does on Volta and
// later. Launches and their blocks run one at a time, so a `__shared__` array is a function's
// `static`.
//
// What it does not model: memory ordering between blocks, occupancy and timing. Passing here
// shows that a kernel computes the right thing, not that it is fast or correct on a GPU.
#pragma once

// Fibers switch with _setjmp/_longjmp between stacks, which fortified longjmp refuses.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace cuda_host {
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

// Where a thread of the running block stands.
enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

// One thread of a block: where it starts (a context on its own stack), and where it stopped.
struct Fiber {
    ucontext_t start;
    jmp_buf stopped;
    bool started = false;
    State state = State::Runnable;
};

// The threads of one block and what they share while it runs.
struct Block {
    static constexpr std::size_t kStack = 64 << 10;

    explicit Block(unsigned threads)
        : fibers(threads), stacks(new char[std::size_t(threads) * kStack]),
          lanes(((threads + 31) / 32) * 32) {}

    std::vector<Fiber> fibers;
    std::unique_ptr<char[]> stacks;  // kStack bytes per thread, left unwritten until used
    std::vector<uint64_t> lanes;  // each lane's value in a shuffle
    ucontext_t first_entry;  // where the scheduler was when it started a thread
    jmp_buf scheduler;
    unsigned current = 0;
    std::function<void()> body;

    // Runs thread t until it stops at a barrier or returns. A thread starts with one
    // swapcontext (a system call, for the signal mask) and then switches with _longjmp, which
    // makes none: a switch per barrier and thread is what a launch costs here.
    void resume(unsigned t) {
        current = t;
        Fiber& f = fibers[t];
        if (_setjmp(scheduler) == 0) {
            if (!f.started) {
                f.started = true;
                swapcontext(&first_entry, &f.start);
            } else {
                _longjmp(f.stopped, 1);
            }
        }
    }

    // Parks the running thread at a barrier until the scheduler opens it.
    void wait(State at) {
        Fiber& f = fibers[current];
        f.state = at;
        if (_setjmp(f.stopped) == 0) _longjmp(scheduler, 1);
    }

    // Opens the block's barrier when every live thread has reached it; whether it opened.
    bool open_block() {
        return open(0, fibers.size(), State::AtBlockBarrier);
    }

    // Opens warp w's barrier when every live thread of the warp has reached it.
    bool open_warp(std::size_t w) {
        return open(w * 32, std::min(fibers.size(), w * 32 + 32), State::AtWarpBarrier);
    }

    bool open(std::size_t from, std::size_t to, State at) {
        bool all = true, any = false;
        for (std::size_t t = from; t < to; t++) {
            if (fibers[t].state == State::Done) continue;
            all &= fibers[t].state == at;
            any |= fibers[t].state == at;
        }
        if (!all || !any) return false;
        for (std::size_t t = from; t < to; t++)
            if (fibers[t].state == at) fibers[t].state = State::Runnable;
        return true;
    }
};
inline thread_local Block* block = nullptr;
inline thread_local unsigned linear_tid = 0;

inline void sync_warp() { block->wait(State::AtWarpBarrier); }

// The value `lane` of this thread's warp offers in a shuffle that every live lane joins.
template <class T>
T shuffle(T v, unsigned lane) {
    static_assert(sizeof(T) <= 8);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    block->lanes[linear_tid] = bits;
    sync_warp();
    unsigned base = linear_tid / 32 * 32;
    T out = v;
    if (lane < 32 && base + lane < block->lanes.size()) {
        std::memcpy(&out, &block->lanes[base + lane], sizeof(T));
    }
    sync_warp();
    return out;
}

inline void run_fiber() {
    block->body();
    block->fibers[block->current].state = State::Done;
    _longjmp(block->scheduler, 1);
}

// Runs `kernel(args...)` over `grid` blocks of `threads`, as cuLaunchKernel would.
template <class... A>
void launch(void (*kernel)(A...), dim3 grid, dim3 threads, A... args) {
    // One launch at a time in the process: `__shared__` arrays are statics.
    static std::mutex one_at_a_time;
    std::lock_guard<std::mutex> guard(one_at_a_time);
    unsigned per_block = threads.x * threads.y * threads.z;
    Block shared(per_block);
    shared.body = [&] { kernel(args...); };
    Block* outer = block;
    block = &shared;
    block_dim = threads;
    grid_dim = grid;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                block_idx = {bx, by, bz};
                for (unsigned t = 0; t < per_block; t++) {
                    Fiber& f = shared.fibers[t];
                    f.state = State::Runnable;
                    f.started = false;
                    getcontext(&f.start);
                    f.start.uc_stack.ss_sp = shared.stacks.get() + std::size_t(t) * Block::kStack;
                    f.start.uc_stack.ss_size = Block::kStack;
                    f.start.uc_link = nullptr;
                    makecontext(&f.start, run_fiber, 0);
                }
                // The last warp first, each as far as its own barriers let it, before the
                // next: a thread that reads what another warp writes without the barrier
                // between them reads it too early or too late.
                for (;;) {
                    bool ran = false, live = false;
                    for (unsigned w = (per_block + 31) / 32; w-- > 0;) {
                        unsigned end = std::min(per_block, w * 32 + 32);
                        do {
                            for (unsigned t = w * 32; t < end; t++) {
                                if (shared.fibers[t].state != State::Runnable) continue;
                                linear_tid = t;
                                thread_idx = {t % threads.x, t / threads.x % threads.y,
                                              t / (threads.x * threads.y)};
                                shared.resume(t);
                                ran = true;
                            }
                        } while (shared.open_warp(w));
                        for (unsigned t = w * 32; t < end; t++)
                            live |= shared.fibers[t].state != State::Done;
                    }
                    if (!live) break;
                    if (!shared.open_block() && !ran) {
                        std::fprintf(stderr,
                                     "cuda_host: block (%u, %u, %u) deadlocked: its threads "
                                     "wait at barriers that not all of them reach\n",
                                     bx, by, bz);
                        std::abort();
                    }
                }
            }
    block = outer;
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

inline void __syncthreads() { cuda_host::block->wait(cuda_host::State::AtBlockBarrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_host::sync_warp(); }

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
