// Runs the backend's CUDA C kernels on the CPU, for tests on machines without a GPU:
// every CUDA thread of a block is a fiber (a stack of its own) run by the
// launching OS thread, switched at __syncthreads and warp shuffles, which block the fiber
// until every live thread of its block (or warp) has arrived, as on the device; blocks
// run one after another (so `__shared__` can be static storage); device pointers are host
// pointers. A barrier that can never complete (a kernel bug) aborts with its name. Only
// what the kernels use is provided.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <ucontext.h>
#include <vector>

using std::max;
using std::min;

struct dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))

// With CUDA's alignments: on the device a load of a vector type from an address it does
// not divide faults (misaligned address); the emulated kernels are compiled to check it.
struct alignas(2) __nv_bfloat16 { uint16_t bits; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

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
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// One barrier: how many live threads it waits for, how many have arrived.
struct EmuBarrier {
    unsigned expected = 0;
    std::vector<unsigned> waiters;  // fibers blocked here, in arrival order
};

// Switching between fibers. On x86-64, a switch of the callee-saved registers and the
// stack pointer (no system call: glibc's swapcontext also saves the signal mask, which
// costs a system call per switch); elsewhere, ucontext.
#if defined(__x86_64__)
struct EmuContext {
    void* sp = nullptr;
};
extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .p2align 4
    .type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch,.-emu_switch
    .p2align 4
    .type emu_fiber_start,@function
emu_fiber_start:
    movq %r13, %rdi
    callq *%r12
    ud2
    .size emu_fiber_start,.-emu_fiber_start
)");
extern "C" void emu_fiber_start();
inline void emu_swap(EmuContext* from, EmuContext* to) { emu_switch(&from->sp, to->sp); }
// A context that starts `fn(arg)` on `stack` (`fn` never returns: it switches away).
inline void emu_make(EmuContext* c, char* stack, size_t size, void (*fn)(void*), void* arg) {
    uintptr_t top = (uintptr_t(stack) + size - 128) & ~uintptr_t(15);
    uint64_t* f = reinterpret_cast<uint64_t*>(top);
    uint32_t csr[2] = {0x1f80u, 0x037fu};  // MXCSR, x87 control word: the defaults
    std::memcpy(&f[0], csr, 8);
    f[1] = 0;                          // r15
    f[2] = 0;                          // r14
    f[3] = uint64_t(arg);              // r13
    f[4] = uint64_t(fn);               // r12
    f[5] = 0;                          // rbx
    f[6] = 0;                          // rbp
    f[7] = uint64_t(&emu_fiber_start);  // return address
    c->sp = f;
}
#else
struct EmuContext {
    ucontext_t uc;
};
inline void emu_swap(EmuContext* from, EmuContext* to) { swapcontext(&from->uc, &to->uc); }
inline void emu_make(EmuContext* c, char* stack, size_t size, void (*fn)(void*), void* arg) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    uintptr_t a = uintptr_t(fn), b = uintptr_t(arg);
    makecontext(&c->uc, (void (*)())+[](unsigned a0, unsigned a1, unsigned b0, unsigned b1) {
        auto f = reinterpret_cast<void (*)(void*)>((uintptr_t(a1) << 32) | a0);
        f(reinterpret_cast<void*>((uintptr_t(b1) << 32) | b0));
    }, 4, unsigned(a), unsigned(a >> 32), unsigned(b), unsigned(b >> 32));
}
#endif

struct EmuFiber {
    EmuContext ctx;
    dim3 idx;
    bool done = false;
};

// The block being run: its fibers, the queue of those ready to run, its barrier and its
// warps' barriers, the warps' shuffle slots, and its dynamic shared memory.
struct Block {
    std::vector<EmuFiber> fibers;
    std::vector<unsigned> ready;
    size_t next = 0;
    EmuBarrier all;
    std::vector<EmuBarrier> warps;
    std::vector<float> slots;
    std::vector<float> sums;                // per warp: the reduction being read
    std::vector<unsigned char> summed;      // per warp: whether it was computed
    std::vector<uint32_t> mma;              // per thread: its mma.sync operands
    std::unique_ptr<unsigned char[]> dynamic_shared;
    unsigned current = 0;
    EmuContext scheduler;
};
thread_local Block* current_block = nullptr;

// Stacks are kept for the thread's life and reused by every block.
constexpr size_t EMU_STACK = 256 << 10;
thread_local std::vector<std::unique_ptr<char[]>> emu_stacks;

inline unsigned emu_thread_in_block() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// The order in which the threads that become ready together (at a block's start, at a
// barrier) run, and the order of a grid's blocks: `EMU_ORDER` = `forward` (the default:
// by index), `reverse`, or a number, the seed of a shuffle. The device promises no order,
// so a kernel that reads what another thread writes without a barrier between them, or
// that depends on the order of its blocks, gives different results under different
// orders: the tests run under more than one.
struct EmuOrder {
    int kind = 0;  // 0 forward, 1 reverse, 2 shuffled
    uint64_t state = 0;
    EmuOrder() {
        const char* o = std::getenv("EMU_ORDER");
        if (!o || !*o || !std::strcmp(o, "forward")) return;
        if (!std::strcmp(o, "reverse")) {
            kind = 1;
            return;
        }
        kind = 2;
        state = std::strtoull(o, nullptr, 10) * 0x9e3779b97f4a7c15ull + 1;
    }
    uint64_t next() {  // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        return state * 0x2545f4914f6cdd1dull;
    }
    template <typename T>
    void apply(T* v, size_t n) {
        if (kind == 1) std::reverse(v, v + n);
        if (kind == 2)
            for (size_t i = n; i > 1; i--) std::swap(v[i - 1], v[next() % i]);
    }
};
inline EmuOrder& emu_order() {
    thread_local EmuOrder order;
    return order;
}

// Once every live thread of `b`'s scope has arrived, its waiters (but `except`) are ready
// again; returns whether it completed.
inline bool emu_release_if_complete(Block* blk, EmuBarrier* b, unsigned except) {
    if (b->waiters.empty() || b->waiters.size() < b->expected) return false;
    emu_order().apply(b->waiters.data(), b->waiters.size());
    for (unsigned f : b->waiters)
        if (f != except) blk->ready.push_back(f);
    b->waiters.clear();
    return true;
}

// Blocks the current fiber on `b` until every live thread of its scope has arrived.
__attribute__((noinline)) inline void emu_wait(EmuBarrier* b) {
    Block* blk = current_block;
    unsigned me = blk->current;
    b->waiters.push_back(me);
    if (emu_release_if_complete(blk, b, me)) return;  // the last to arrive goes on
    emu_swap(&blk->fibers[me].ctx, &blk->scheduler);
}

inline void __syncthreads() { emu_wait(&current_block->all); }

// A block's fibers run one at a time and switch only at barriers: a plain update is atomic.
inline int atomicAdd(int* a, int v) {
    int old = *a;
    *a = old + v;
    return old;
}
inline unsigned atomicAdd(unsigned* a, unsigned v) {
    unsigned old = *a;
    *a = old + v;
    return old;
}
// Blocks run one after another: every write of the blocks before is already seen.
inline void __threadfence() {}
inline float __ldcg(const float* p) { return *p; }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    unsigned t = emu_thread_in_block();
    unsigned w = t / 32, lane = t % 32;
    Block* b = current_block;
    b->slots[t] = v;
    emu_wait(&b->warps[w]);
    float o = b->slots[w * 32 + (lane ^ unsigned(mask))];
    emu_wait(&b->warps[w]);
    return o;
}

// The kernels' `warp_sum` (an xor butterfly of five shuffles), in one exchange: every
// lane posts its value, and the first lane to go on computes the butterfly over the
// warp's 32 values in the device's order of additions (every lane's result is the same,
// bit for bit, on the device too).
inline float emu_warp_sum(float v) {
    unsigned t = emu_thread_in_block();
    unsigned w = t / 32;
    Block* b = current_block;
    b->slots[t] = v;
    emu_wait(&b->warps[w]);
    if (!b->summed[w]) {
        float x[32], y[32];
        for (unsigned i = 0; i < 32; i++) x[i] = w * 32 + i < b->slots.size() ? b->slots[w * 32 + i] : 0.f;
        for (unsigned o = 16; o > 0; o >>= 1) {
            for (unsigned i = 0; i < 32; i++) y[i] = x[i] + x[i ^ o];
            std::memcpy(x, y, sizeof x);
        }
        b->sums[w] = x[0];
        b->summed[w] = 1;
    }
    float r = b->sums[w];
    emu_wait(&b->warps[w]);
    b->summed[w] = 0;
    return r;
}

// A warp's tensor-core product (PTX mma.m16n8k16 with bf16 operands and f32
// accumulators; see the kernels' `mma_16816` for its fragments): every lane posts its
// operand registers, and once the warp has, each computes its four results from the
// warp's. As on the device, every lane of the warp must take part: a warp with exited
// lanes aborts.
inline float emu_bf16_half(uint32_t reg, unsigned k) {
    return __bfloat162float({uint16_t(k % 2 ? reg >> 16 : reg & 0xffffu)});
}
inline void emu_mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    unsigned t = emu_thread_in_block();
    unsigned w = t / 32, lane = t % 32;
    Block* blk = current_block;
    if (blk->warps[w].expected != 32) {
        std::fprintf(stderr, "emulated mma.sync: warp %u has %u live lanes of 32\n", w,
                     blk->warps[w].expected);
        std::abort();
    }
    uint32_t* mine = &blk->mma[t * 6];
    for (int i = 0; i < 4; i++) mine[i] = a[i];
    mine[4] = b[0];
    mine[5] = b[1];
    emu_wait(&blk->warps[w]);
    const uint32_t* warp = &blk->mma[w * 32 * 6];
    // a[r][k]: lane (r % 8, k % 8 / 2), register r / 8 + 2 (k / 8); b[k][c]: lane (c, k % 8 /
    // 2), register 4 + k / 8; the first of a register's two at even k.
    auto av = [&](unsigned r, unsigned k) {
        return emu_bf16_half(warp[((r % 8) * 4 + k % 8 / 2) * 6 + r / 8 + 2 * (k / 8)], k);
    };
    auto bv = [&](unsigned k, unsigned c) {
        return emu_bf16_half(warp[(c * 4 + k % 8 / 2) * 6 + 4 + k / 8], k);
    };
    unsigned g = lane / 4, q = lane % 4;
    for (unsigned i = 0; i < 4; i++) {
        unsigned r = g + 8 * (i / 2), c = 2 * q + i % 2;
        float s = d[i];
        for (unsigned k = 0; k < 16; k++) s += av(r, k) * bv(k, c);
        d[i] = s;
    }
    emu_wait(&blk->warps[w]);  // no lane posts again before every lane has read
}

#define emu_dynamic_shared (current_block->dynamic_shared.get())

template <typename F>
struct EmuKernel {
    static void entry(void* kernel) {
        (*static_cast<F*>(kernel))();
        Block* blk = current_block;
        unsigned me = blk->current;
        blk->fibers[me].done = true;
        // An exited thread no longer holds up its block's or its warp's barriers.
        unsigned t = emu_thread_in_block();
        blk->all.expected--;
        blk->warps[t / 32].expected--;
        emu_release_if_complete(blk, &blk->all, me);
        emu_release_if_complete(blk, &blk->warps[t / 32], me);
        emu_swap(&blk->fibers[me].ctx, &blk->scheduler);  // never resumed
        std::abort();
    }
};

template <typename F>
void emu_run(dim3 grid, dim3 block, unsigned shared, F kernel) {
    gridDim = grid;
    blockDim = block;
    unsigned n = block.x * block.y * block.z;
    while (emu_stacks.size() < n) emu_stacks.emplace_back(new char[EMU_STACK]);
    Block b;
    b.fibers.resize(n);
    b.warps.resize((n + 31) / 32);
    b.slots.assign(n, 0.f);
    b.sums.assign(b.warps.size(), 0.f);
    b.summed.assign(b.warps.size(), 0);
    b.mma.assign(n * 6, 0);
    current_block = &b;
    std::vector<dim3> blocks;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) blocks.push_back({bx, by, bz});
    emu_order().apply(blocks.data(), blocks.size());
    for (dim3 bi : blocks) {
        b.all.expected = n;
        b.all.waiters.clear();
        for (unsigned w = 0; w < b.warps.size(); w++) {
            b.warps[w].expected = std::min(32u, n - w * 32);
            b.warps[w].waiters.clear();
        }
        // Exactly the launch's bytes (an access past them is caught when built with
        // AddressSanitizer), and, as on the device, not zeroed: 0xff bytes (NaN as f32).
        b.dynamic_shared.reset(new unsigned char[shared ? shared : 1]);
        std::memset(b.dynamic_shared.get(), 0xff, shared);
        b.ready.clear();
        b.next = 0;
        blockIdx = bi;
        unsigned i = 0;
        for (unsigned tz = 0; tz < block.z; tz++)
            for (unsigned ty = 0; ty < block.y; ty++)
                for (unsigned tx = 0; tx < block.x; tx++, i++) {
                    EmuFiber& f = b.fibers[i];
                    f.idx = {tx, ty, tz};
                    f.done = false;
                    emu_make(&f.ctx, emu_stacks[i].get(), EMU_STACK, &EmuKernel<F>::entry,
                             &kernel);
                    b.ready.push_back(i);
                }
        emu_order().apply(b.ready.data(), b.ready.size());
        // Run the ready fibers in turn until none is left.
        while (b.next < b.ready.size()) {
            unsigned j = b.ready[b.next++];
            b.current = j;
            threadIdx = b.fibers[j].idx;
            emu_swap(&b.scheduler, &b.fibers[j].ctx);
            if (b.next > 4096 && b.next * 2 > b.ready.size()) {
                b.ready.erase(b.ready.begin(), b.ready.begin() + b.next);
                b.next = 0;
            }
        }
        for (auto& f : b.fibers)
            if (!f.done) {
                std::fprintf(stderr, "emulated kernel deadlocked: a barrier is never reached by every thread\n");
                std::abort();
            }
    }
    current_block = nullptr;
}
