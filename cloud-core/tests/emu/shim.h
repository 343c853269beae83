// Runs the backend's CUDA C kernels on the CPU, for tests on machines without a GPU:
// every CUDA thread of a block is an OS thread (so __syncthreads and warp shuffles
// behave as on the device), blocks run one after another (so `__shared__` can be static
// storage), device pointers are host pointers. Only what the kernels use is provided.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

using std::max;
using std::min;

struct dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static

struct __nv_bfloat16 { uint16_t bits; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct float2 { float x, y; };

inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = uint32_t(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return {uint16_t(u >> 16)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// The block being run: its barrier, its warps' barriers and shuffle slots, and its
// dynamic shared memory.
struct Block {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> slots;
    std::vector<unsigned char> dynamic_shared;
};
static Block* current_block = nullptr;

inline void __syncthreads() { current_block->all->arrive_and_wait(); }

inline unsigned emu_thread_in_block() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    unsigned t = emu_thread_in_block();
    unsigned w = t / 32, lane = t % 32;
    Block* b = current_block;
    b->slots[t] = v;
    b->warps[w]->arrive_and_wait();
    float o = b->slots[w * 32 + (lane ^ unsigned(mask))];
    b->warps[w]->arrive_and_wait();
    return o;
}

#define emu_dynamic_shared (current_block->dynamic_shared.data())

template <typename F>
void emu_run(dim3 grid, dim3 block, unsigned shared, F kernel) {
    gridDim = grid;
    blockDim = block;
    unsigned n = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                Block b;
                b.all = std::make_unique<std::barrier<>>(n);
                for (unsigned w = 0; w < (n + 31) / 32; w++)
                    b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
                b.slots.assign(n, 0.f);
                b.dynamic_shared.assign(shared + 16, 0);
                current_block = &b;
                std::vector<std::thread> threads;
                threads.reserve(n);
                for (unsigned tz = 0; tz < block.z; tz++)
                    for (unsigned ty = 0; ty < block.y; ty++)
                        for (unsigned tx = 0; tx < block.x; tx++)
                            threads.emplace_back([=] {
                                blockIdx = {bx, by, bz};
                                threadIdx = {tx, ty, tz};
                                kernel();
                            });
                for (auto& t : threads) t.join();
                current_block = nullptr;
            }
}
