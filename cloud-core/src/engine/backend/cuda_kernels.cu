// The CUDA backend's kernels, compiled at run time by NVRTC (no nvcc at build time).
// Activations are f32 row-major matrices; weight matrices are bf16; the paged KV cache
// is bf16, addressed through tables of block addresses.
// Every kernel declares MAX_THREADS(n) (a number or a `#define`d one): the most threads a
// block of it is launched with. The backend refuses a launch beyond it and checks at
// start-up that the device runs blocks that size; CI checks with ptxas that the kernel's
// registers allow them, without spills. It expands to nothing: `__launch_bounds__`
// changes ptxas's register allocation (under it gemv_bf16 spills on sm_90).

#include <cuda_bf16.h>

typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;

#define WARP 32
#define MAX_THREADS(n)
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Programmatic dependent launch (sm_90 on, where the backend launches every kernel with
// it): each kernel lets the next one in the stream be launched at once, whose blocks are
// then placed on the multiprocessors as this one's last ones finish, and waits, before
// anything else, until the kernel before it has ended and its writes are visible. So
// kernels run one after another as without it, without the gap of a launch between
// them. Every kernel starts with it (a test checks): one that did not would run beside
// the one before it. A no-op before sm_90, and without the launch attribute. The decode
// projections (gemv_parts, gemv_gate_up) take its two halves apart: between them, the
// blocks already placed ask L2 for their weight rows, which no kernel writes, while the
// kernel before them ends.
__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependency() {
    grid_launch_dependents();
    grid_wait();
}

// Asks L2 for `bytes` (a multiple of 16, from a 16-byte aligned address) of data no
// kernel writes (weights), as one bulk request (sm_90 on; nothing before).
__device__ __noinline__ void prefetch_l2(const void* p, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (bytes) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes));
#endif
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024). Call once per kernel.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    v = warp_sum(v);
    int w = threadIdx.x / WARP, l = threadIdx.x % WARP;
    if (l == 0) part[w] = v;
    __syncthreads();
    int nw = (blockDim.x + WARP - 1) / WARP;
    if (w == 0) {
        v = l < nw ? part[l] : 0.f;
        v = warp_sum(v);
        if (l == 0) part[0] = v;
    }
    __syncthreads();
    return part[0];
}

extern "C" __global__ void MAX_THREADS(256) f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y, long n) {
    grid_dependency();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16(x[i]);
}

extern "C" __global__ void MAX_THREADS(256) bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ y, long n) {
    grid_dependency();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = __bfloat162float(x[i]);
}

// Uniform in [-amp, amp] from a counter-based hash (splitmix64): random weights made in
// device memory, for benchmarks of shapes whose checkpoints are not at hand.
extern "C" __global__ void MAX_THREADS(256) fill_uniform_bf16(bf16* __restrict__ y, long n, u64 seed, float amp) {
    grid_dependency();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        u64 z = seed + (u64)i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        y[i] = __float2bfloat16((u * 2.f - 1.f) * amp);
    }
}

// ---- Projections of a few rows (decode) -----------------------------------------------
// A decode step's projections are bound by reading the weights: these kernels read each
// bf16 weight row once, with one warp per output and 16 bytes per lane per load, for every
// one of the m ≤ GEMV_ROWS rows of x (f32 [m, k], k a multiple of 8) at once, straight
// from the f32 activations (no bf16 copy of x).
#define GEMV_ROWS 8

// 8 bf16 weights (16 bytes) dotted with 8 f32 values of a row.
__device__ __forceinline__ float dot8v(uint4 p, float4 a, float4 b) {
    const __nv_bfloat162* h = (const __nv_bfloat162*)&p;
    float2 w0 = __bfloat1622float2(h[0]), w1 = __bfloat1622float2(h[1]);
    float2 w2 = __bfloat1622float2(h[2]), w3 = __bfloat1622float2(h[3]);
    return w0.x * a.x + w0.y * a.y + w1.x * a.z + w1.y * a.w
         + w2.x * b.x + w2.y * b.y + w3.x * b.z + w3.y * b.w;
}

// The same with the 8 values at x (16-byte aligned).
__device__ __forceinline__ float dot8(uint4 p, const float* __restrict__ x) {
    return dot8v(p, ((const float4*)x)[0], ((const float4*)x)[1]);
}

// The 8 values of a row at x as the projection reads them: as they are, or (NORM) times
// the RMSNorm's weights g (its per-row scale is applied to the finished dot product), the
// squares of the raw values added to ss.
template <bool NORM>
__device__ __forceinline__ void row8(const float* __restrict__ x, float4 g0, float4 g1, float4& a,
                                     float4& b, float& ss) {
    a = ((const float4*)x)[0];
    b = ((const float4*)x)[1];
    if (NORM) {
        ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w
            + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
        a.x *= g0.x; a.y *= g0.y; a.z *= g0.z; a.w *= g0.w;
        b.x *= g1.x; b.y *= g1.y; b.z *= g1.z; b.w *= g1.w;
    }
}

// The norm's weights for the 8 columns from 8·i (nothing without NORM).
template <bool NORM>
__device__ __forceinline__ void norm8(const float* __restrict__ nw, int i, float4& g0, float4& g1) {
    if (NORM) {
        g0 = ((const float4*)nw)[2 * i];
        g1 = ((const float4*)nw)[2 * i + 1];
    }
}

// RMSNorm's scale of a row from its lane's sum of squares (1 without NORM).
template <bool NORM>
__device__ __forceinline__ float norm_scale(float ss, int k, float eps) {
    return NORM ? rsqrtf(warp_sum(ss) / k + eps) : 1.f;
}

// One output o of a projection (weight rows w, k wide) for the m ≤ GEMV_ROWS rows of x, by
// one warp: x·w[o]ᵀ (+ b[o]) into y[·, n] (added to what y holds with `accumulate`); with
// NORM of RMSNorm(x) (weights nw[k], epsilon eps).
template <bool NORM>
__device__ __forceinline__ void gemv_one(const float* __restrict__ x, const bf16* __restrict__ w,
                                         const float* __restrict__ b, float* __restrict__ y, int o,
                                         int n, int m, int k, int accumulate,
                                         const float* __restrict__ nw, float eps) {
    int lane = threadIdx.x % WARP;
    const uint4* wr = (const uint4*)(w + (long)o * k);
    float acc[GEMV_ROWS], ss[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) acc[r] = ss[r] = 0.f;
#pragma unroll 4
    for (int i = lane; i < k / 8; i += WARP) {
        uint4 p = wr[i];
        float4 g0, g1, a, c;
        norm8<NORM>(nw, i, g0, g1);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            if (r < m) {
                row8<NORM>(x + (long)r * k + 8 * i, g0, g1, a, c, ss[r]);
                acc[r] += dot8v(p, a, c);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        if (r < m) {
            float v = warp_sum(acc[r]) * norm_scale<NORM>(ss[r], k, eps);
            if (lane == 0) {
                long at = (long)r * n + o;
                if (b) v += b[o];
                y[at] = accumulate ? y[at] + v : v;
            }
        }
    }
}

// The rows of x a projection reads: m consecutive rows k wide, or rows picked by index
// (the tokens routed to an expert).
struct Dense {
    const float* __restrict__ x;
    int k;
    __device__ __forceinline__ const float* row(int r) const { return x + (long)r * k; }
};
struct Picked {
    const float* __restrict__ x;
    const int* __restrict__ at;
    int k;
    __device__ __forceinline__ const float* row(int r) const { return x + (long)at[r] * k; }
};

// Two weight rows wa, wb (k wide) dotted with each of the m ≤ GEMV_ROWS rows of x (with
// NORM, of RMSNorm(x) as gemv_one takes it), by one warp in one pass over both rows:
// va[r] and vb[r] finished, in every lane.
template <bool NORM, class Rows>
__device__ __forceinline__ void dot_two(Rows x, const bf16* __restrict__ wa,
                                        const bf16* __restrict__ wb, int m, int k,
                                        const float* __restrict__ nw, float eps,
                                        float (&va)[GEMV_ROWS], float (&vb)[GEMV_ROWS]) {
    int lane = threadIdx.x % WARP;
    const uint4* a4 = (const uint4*)wa;
    const uint4* b4 = (const uint4*)wb;
    float ss[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) va[r] = vb[r] = ss[r] = 0.f;
#pragma unroll 4
    for (int i = lane; i < k / 8; i += WARP) {
        uint4 pa = a4[i], pb = b4[i];
        float4 g0, g1, a, c;
        norm8<NORM>(nw, i, g0, g1);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            if (r < m) {
                row8<NORM>(x.row(r) + 8 * i, g0, g1, a, c, ss[r]);
                va[r] += dot8v(pa, a, c);
                vb[r] += dot8v(pb, a, c);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        if (r < m) {
            float scale = norm_scale<NORM>(ss[r], k, eps);
            va[r] = warp_sum(va[r]) * scale;
            vb[r] = warp_sum(vb[r]) * scale;
        }
    }
}

// RoPE folded into a projection (the `rope` kernel's rotation, applied to the finished
// outputs): rows at positions pos[r], tables [max_pos, rot / 2], pairs (i, i + rot/2) of
// each head's rotated dimensions, or (2i, 2i + 1) when `interleaved`.
struct RopeArgs {
    const unsigned* pos;
    const float* cos_t;
    const float* sin_t;
    int rot, interleaved;
};

// A rotated pair of outputs (oa, ob) of a projection, the pair's index i among a head's
// rot / 2, by one warp: both weight rows read in the same pass, then
// y[r, oa] = va·cos − vb·sin and y[r, ob] = vb·cos + va·sin at row r's position, va and
// vb the projections (with their biases) as gemv_one makes them.
template <bool NORM>
__device__ __forceinline__ void gemv_pair(const float* __restrict__ x, const bf16* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ y, int oa,
                                          int ob, int i, int n, int m, int k,
                                          const float* __restrict__ nw, float eps, RopeArgs rp) {
    float aa[GEMV_ROWS], ab[GEMV_ROWS];
    dot_two<NORM>(Dense{x, k}, w + (long)oa * k, w + (long)ob * k, m, k, nw, eps, aa, ab);
    int half = rp.rot / 2;
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        if (r < m) {
            float va = aa[r], vb = ab[r];
            if (threadIdx.x % WARP == 0) {
                if (b) {
                    va += b[oa];
                    vb += b[ob];
                }
                long t = (long)rp.pos[r] * half + i;
                float cs = rp.cos_t[t], sn = rp.sin_t[t];
                y[(long)r * n + oa] = va * cs - vb * sn;
                y[(long)r * n + ob] = vb * cs + va * sn;
            }
        }
    }
}

// Up to three projections of the same rows in one launch (one projection; a layer's q, k
// and v; MLA's query and latent): outputs o < n0 are x·w0ᵀ (+ b0) into y0, the next n1
// x·w1ᵀ (+ b1) into y1, the next n2 into y2; a null bias adds nothing. With `accumulate`
// the results are added to what the outputs hold (a residual connection). With NORM the
// rows are first RMSNorm-ed with weights nw[k] and epsilon eps, in the same pass: the norm
// a decode step would otherwise launch before its projections.
//
// With ROPE, part j with dj > 0 is rotated as the `rope` kernel rotates it (heads of dj
// outputs, `rot` dimensions from offj in each): its warps are one per rotated pair
// (gemv_pair) and one per other output, so the step launches no RoPE of its own.
template <bool NORM, bool ROPE>
__device__ __forceinline__ void gemv_parts(const float* __restrict__ x, const bf16* __restrict__ w0,
                                           const bf16* __restrict__ w1, const bf16* __restrict__ w2,
                                           const float* __restrict__ b0, const float* __restrict__ b1,
                                           const float* __restrict__ b2, float* __restrict__ y0,
                                           float* __restrict__ y1, float* __restrict__ y2, int n0,
                                           int n1, int n2, int m, int k, int accumulate,
                                           const float* __restrict__ nw, float eps, RopeArgs rp,
                                           int d0, int off0, int d1, int off1, int d2, int off2) {
    int u = (blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int half = rp.rot / 2;
    // Warps per part: one per output, or per head one per rotated pair and other output.
    int u0 = ROPE && d0 > 0 ? n0 / d0 * (d0 - half) : n0;
    int u1 = ROPE && d1 > 0 ? n1 / d1 * (d1 - half) : n1;
    int u2 = ROPE && d2 > 0 ? n2 / d2 * (d2 - half) : n2;
    const bf16* w; const float* b; float* y; int n, d, off;
    if (u < u0) { w = w0; b = b0; y = y0; n = n0; d = d0; off = off0; }
    else if (u < u0 + u1) { u -= u0; w = w1; b = b1; y = y1; n = n1; d = d1; off = off1; }
    else if (u < u0 + u1 + u2) { u -= u0 + u1; w = w2; b = b2; y = y2; n = n2; d = d2; off = off2; }
    else return;
    // The warp's weight rows: one, or a rotated pair (oa, ob, the pair's index j).
    int oa = u, ob = -1, j = 0;
    if (ROPE && d > 0) {
        int per = d - half, head = u / per;
        j = u % per;
        if (j < half) {
            oa = head * d + off + (rp.interleaved ? 2 * j : j);
            ob = head * d + off + (rp.interleaved ? 2 * j + 1 : j + half);
        } else {
            int c = j - half;
            oa = head * d + (c < off ? c : c + rp.rot);
        }
    }
    // Asked of L2 before the kernel before this one has ended (see grid_dependency).
    int lane = threadIdx.x % WARP;
    if (lane == 0) prefetch_l2(w + (long)oa * k, 2u * k);
    if (ROPE && lane == 1 && ob >= 0) prefetch_l2(w + (long)ob * k, 2u * k);
    grid_wait();
    if (ob >= 0)
        gemv_pair<NORM>(x, w, b, y, oa, ob, j, n, m, k, nw, eps, rp);
    else
        gemv_one<NORM>(x, w, b, y, oa, n, m, k, accumulate, nw, eps);
}

extern "C" __global__ void MAX_THREADS(256) gemv_bf16(const float* __restrict__ x, const bf16* __restrict__ w0,
                                     const bf16* __restrict__ w1, const bf16* __restrict__ w2,
                                     const float* __restrict__ b0, const float* __restrict__ b1,
                                     const float* __restrict__ b2, float* __restrict__ y0,
                                     float* __restrict__ y1, float* __restrict__ y2, int n0, int n1,
                                     int n2, int m, int k, int accumulate) {
    grid_launch_dependents();
    gemv_parts<false, false>(x, w0, w1, w2, b0, b1, b2, y0, y1, y2, n0, n1, n2, m, k, accumulate, nullptr,
                             0.f, RopeArgs{}, 0, 0, 0, 0, 0, 0);
}

// gemv_bf16 of RMSNorm(x) (weights nw[k], a multiple of 8 floats).
extern "C" __global__ void MAX_THREADS(256) gemv_bf16_norm(const float* __restrict__ x, const bf16* __restrict__ w0,
                                     const bf16* __restrict__ w1, const bf16* __restrict__ w2,
                                     const float* __restrict__ b0, const float* __restrict__ b1,
                                     const float* __restrict__ b2, float* __restrict__ y0,
                                     float* __restrict__ y1, float* __restrict__ y2, int n0, int n1,
                                     int n2, int m, int k, int accumulate,
                                     const float* __restrict__ nw, float eps) {
    grid_launch_dependents();
    gemv_parts<true, false>(x, w0, w1, w2, b0, b1, b2, y0, y1, y2, n0, n1, n2, m, k, accumulate, nw, eps,
                            RopeArgs{}, 0, 0, 0, 0, 0, 0);
}

// gemv_bf16 with RoPE folded in (see gemv_parts; `accumulate` is not used with it): the
// rows at positions pos[m], tables cos_t/sin_t [max_pos, rot / 2], part j rotated in heads
// of dj outputs from offj (dj = 0: not rotated).
extern "C" __global__ void MAX_THREADS(256) gemv_bf16_rope(const float* __restrict__ x, const bf16* __restrict__ w0,
                                     const bf16* __restrict__ w1, const bf16* __restrict__ w2,
                                     const float* __restrict__ b0, const float* __restrict__ b1,
                                     const float* __restrict__ b2, float* __restrict__ y0,
                                     float* __restrict__ y1, float* __restrict__ y2, int n0, int n1,
                                     int n2, int m, int k, int accumulate,
                                     const unsigned* __restrict__ pos, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, int rot, int interleaved,
                                     int d0, int off0, int d1, int off1, int d2, int off2) {
    grid_launch_dependents();
    gemv_parts<false, true>(x, w0, w1, w2, b0, b1, b2, y0, y1, y2, n0, n1, n2, m, k, 0, nullptr, 0.f,
                            RopeArgs{pos, cos_t, sin_t, rot, interleaved}, d0, off0, d1, off1, d2, off2);
}

// gemv_bf16_rope of RMSNorm(x) (weights nw[k]).
extern "C" __global__ void MAX_THREADS(256) gemv_bf16_norm_rope(const float* __restrict__ x, const bf16* __restrict__ w0,
                                     const bf16* __restrict__ w1, const bf16* __restrict__ w2,
                                     const float* __restrict__ b0, const float* __restrict__ b1,
                                     const float* __restrict__ b2, float* __restrict__ y0,
                                     float* __restrict__ y1, float* __restrict__ y2, int n0, int n1,
                                     int n2, int m, int k, int accumulate,
                                     const unsigned* __restrict__ pos, const float* __restrict__ cos_t,
                                     const float* __restrict__ sin_t, int rot, int interleaved,
                                     int d0, int off0, int d1, int off1, int d2, int off2,
                                     const float* __restrict__ nw, float eps) {
    grid_launch_dependents();
    gemv_parts<true, true>(x, w0, w1, w2, b0, b1, b2, y0, y1, y2, n0, n1, n2, m, k, 0, nw, eps,
                           RopeArgs{pos, cos_t, sin_t, rot, interleaved}, d0, off0, d1, off1, d2, off2);
}

// The first half of a SwiGLU MLP for a few rows: y[r, o] = silu(x·gate[o]) · (x·up[o]),
// both weight rows read once by one warp; with NORM, of RMSNorm(x) as in gemv_parts.
template <bool NORM>
__device__ __forceinline__ void gemv_gate_up(const float* __restrict__ x, const bf16* __restrict__ wg,
                                             const bf16* __restrict__ wu, float* __restrict__ y, int m,
                                             int n, int k, const float* __restrict__ nw, float eps) {
    int o = (blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (o >= n) return;
    // Asked of L2 before the kernel before this one has ended (see grid_dependency).
    int lane = threadIdx.x % WARP;
    if (lane < 2) prefetch_l2((lane ? wu : wg) + (long)o * k, 2u * k);
    grid_wait();
    float ag[GEMV_ROWS], au[GEMV_ROWS];
    dot_two<NORM>(Dense{x, k}, wg + (long)o * k, wu + (long)o * k, m, k, nw, eps, ag, au);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        if (r < m && threadIdx.x % WARP == 0) {
            float a = ag[r], v = au[r];
            y[(long)r * n + o] = a / (1.f + __expf(-a)) * v;
        }
    }
}

extern "C" __global__ void MAX_THREADS(256) gemv_swiglu(const float* __restrict__ x, const bf16* __restrict__ wg,
                                       const bf16* __restrict__ wu, float* __restrict__ y, int m,
                                       int n, int k) {
    grid_launch_dependents();
    gemv_gate_up<false>(x, wg, wu, y, m, n, k, nullptr, 0.f);
}

extern "C" __global__ void MAX_THREADS(256) gemv_swiglu_norm(const float* __restrict__ x, const bf16* __restrict__ wg,
                                       const bf16* __restrict__ wu, float* __restrict__ y, int m,
                                       int n, int k, const float* __restrict__ nw, float eps) {
    grid_launch_dependents();
    gemv_gate_up<true>(x, wg, wu, y, m, n, k, nw, eps);
}

// x += s * y
extern "C" __global__ void MAX_THREADS(256) axpy(float* __restrict__ x, const float* __restrict__ y, long n, float s) {
    grid_dependency();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] += s * y[i];
}

// x[r, :] += b
extern "C" __global__ void MAX_THREADS(256) add_bias(float* __restrict__ x, const float* __restrict__ b, long total, int n) {
    grid_dependency();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x)
        x[i] += b[i % n];
}

// One block per row.
extern "C" __global__ void MAX_THREADS(256) rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, int d, float eps) {
    grid_dependency();
    const float* xr = x + (long)blockIdx.x * d;
    float* yr = y + (long)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    float inv = rsqrtf(ss / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}

extern "C" __global__ void MAX_THREADS(256) silu_mul(const float* __restrict__ g, const float* __restrict__ u,
                                    float* __restrict__ y, long n) {
    grid_dependency();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float a = g[i];
        y[i] = a / (1.f + __expf(-a)) * u[i];
    }
}

// One block per output row.
extern "C" __global__ void MAX_THREADS(256) gather_rows_f32(const float* __restrict__ t, const unsigned* __restrict__ ids,
                                           float* __restrict__ y, int d) {
    grid_dependency();
    const float* src = t + (long)ids[blockIdx.x] * d;
    float* dst = y + (long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void MAX_THREADS(256) gather_rows_bf16(const bf16* __restrict__ t, const unsigned* __restrict__ ids,
                                            float* __restrict__ y, int d) {
    grid_dependency();
    const bf16* src = t + (long)ids[blockIdx.x] * d;
    float* dst = y + (long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
}

// y[r, yfrom + j] = x[r, xfrom + j] for j < width (slices and concatenations of columns).
extern "C" __global__ void MAX_THREADS(256) copy_cols(const float* __restrict__ x, int xcols, int xfrom,
                                     float* __restrict__ y, int ycols, int yfrom, int width, long rows) {
    grid_dependency();
    long n = rows * width;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / width;
        int j = (int)(i % width);
        y[r * ycols + yfrom + j] = x[r * xcols + xfrom + j];
    }
}

// dst[rows[i], :] += w[i] * src[i, :], one block per source row (rows are distinct).
extern "C" __global__ void MAX_THREADS(256) add_rows_scaled(float* __restrict__ dst, int d, const float* __restrict__ src,
                                           const unsigned* __restrict__ rows, const float* __restrict__ w) {
    grid_dependency();
    float* o = dst + (long)rows[blockIdx.x] * d;
    const float* s = src + (long)blockIdx.x * d;
    float wi = w[blockIdx.x];
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] += wi * s[i];
}

// MLA, expanded: k[t, h, nope + rope] and v[t, h, dv] from kv[t, h, nope + dv] and k_pe[t, rope].
extern "C" __global__ void MAX_THREADS(128) mla_expand(const float* __restrict__ kv, const float* __restrict__ kpe,
                                      float* __restrict__ k, float* __restrict__ v,
                                      int h, int nope, int dv, int rope) {
    grid_dependency();
    int i = blockIdx.x / h, head = blockIdx.x % h;
    const float* src = kv + ((long)i * h + head) * (nope + dv);
    float* kd = k + ((long)i * h + head) * (nope + rope);
    float* vd = v + ((long)i * h + head) * dv;
    for (int j = threadIdx.x; j < nope; j += blockDim.x) kd[j] = src[j];
    for (int j = threadIdx.x; j < rope; j += blockDim.x) kd[nope + j] = kpe[(long)i * rope + j];
    for (int j = threadIdx.x; j < dv; j += blockDim.x) vd[j] = src[nope + j];
}

// Rotary embedding in place over the rows of one or two tensors of the same positions
// (a layer's queries and keys, in one launch): x[rows, heads, head_dim] rotated over
// `rot` dims from `offset` within each head, then x2[rows, heads2, head_dim2] from
// offset2 (heads2 = 0: none). Block b < rows·heads is a (row, head) of x, the next
// rows·heads2 of x2; row r at position pos[r], tables [max_pos, rot / 2].
extern "C" __global__ void MAX_THREADS(256) rope(float* __restrict__ x, int heads, int head_dim, int offset,
                                float* __restrict__ x2, int heads2, int head_dim2, int offset2,
                                const unsigned* __restrict__ pos, const float* __restrict__ cos_t,
                                const float* __restrict__ sin_t, int rot, int interleaved) {
    grid_dependency();
    int rows = gridDim.x / (heads + heads2);
    int b = blockIdx.x;
    float* t = x; int h = heads, d = head_dim, off = offset;
    if (b >= rows * heads) { b -= rows * heads; t = x2; h = heads2; d = head_dim2; off = offset2; }
    int row = b / h, head = b % h;
    int half = rot / 2;
    float* v = t + ((long)row * h + head) * d + off;
    const float* c = cos_t + (long)pos[row] * half;
    const float* s = sin_t + (long)pos[row] * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        int a = interleaved ? 2 * i : i;
        int e = interleaved ? 2 * i + 1 : i + half;
        float x0 = v[a], x1 = v[e];
        v[a] = x0 * c[i] - x1 * s[i];
        v[e] = x1 * c[i] + x0 * s[i];
    }
}

// ---- Sampling on the device ------------------------------------------------------------
// A row's values in the order the host's sampler sorts them (larger first, the lower index
// first among equals) as distinct 64-bit keys: the value's order-preserving bits, then
// the complement of the index.
__device__ __forceinline__ u64 rank_key(float v, int i) {
    unsigned b = __float_as_uint(v);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((u64)b << 32) | (u64)(0xffffffffu - (unsigned)i);
}

// A block reduction with `op` over shared scratch of blockDim.x entries (a power of two),
// in a fixed order (the same result every run).
template <typename T, typename Op>
__device__ T block_reduce(T v, T* sh, Op op) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = op(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    T r = sh[0];
    __syncthreads();
    return r;
}

struct Sum {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
    template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

#define SAMPLE_MAX_THREADS 1024

// One row as the sampler sees it: a disallowed token at -inf, a seen token's value
// penalised (divided by the penalty if positive, else multiplied), then divided by the
// temperature (unless greedy); keys and weights for the bisections.
struct SampleRow {
    const float* r;
    const unsigned* allowed;
    const unsigned* seen;
    float penalty;
    int cols;
    bool greedy;
    float temp;
    float top;  // the largest scaled value
    double* shd;

    __device__ float scaled(int i) const {
        if (allowed && !((allowed[i / 32] >> (i % 32)) & 1u)) return NEG_INF;
        float v = r[i];
        if (seen && penalty != 1.f && ((seen[i / 32] >> (i % 32)) & 1u)) v = v > 0.f ? v / penalty : v * penalty;
        return greedy ? v : v / temp;
    }

    // The weight of the values whose key is at least t: their count, or Σ exp(v - top)
    // in f64 (as the host computes the probabilities).
    __device__ double weight_from(u64 t, bool count) const {
        double acc = 0.0;
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            float v = scaled(i);
            if (rank_key(v, i) >= t) acc += count ? 1.0 : exp((double)(v - top));
        }
        return block_reduce(acc, shd, Sum());
    }

    // The largest key in [lo, hi] whose weight at or above it is ≥ target (strict: >);
    // the weight at lo must meet it. Keys are distinct, so the answer is a value's key.
    __device__ u64 largest_key(u64 lo, u64 hi, bool count, double target, bool strict) const {
        while (lo < hi) {
            u64 mid = lo + (hi - lo) / 2 + 1;
            double w = weight_from(mid, count);
            if (strict ? w > target : w >= target) lo = mid; else hi = mid - 1;
        }
        return lo;
    }
};

__device__ __forceinline__ int key_index(u64 k) { return (int)(0xffffffffu - (unsigned)(k & 0xffffffffu)); }

// The next token of each row, as the host's sampler picks it (`sampler::Pick::pick`), and
// its log-softmax; one block per row, blockDim.x a power of two ≤ SAMPLE_MAX_THREADS:
// greedy decoding (the largest value, the lowest index on ties: one pass over the row)
// and sampling, without copying the logits back.
// spec: 6 words per row: temperature (f32 bits), top_k, top_p (f32 bits), the row's
// uniform draw in [0, 1) (f64 bits), the repetition penalty (f32 bits) of the tokens
// set in `seen` (bits as `allowed`'s; null: none) and how many alternatives to report
// (at most top_stride). Temperature 0 or top_k 1: the largest (penalised) value.
// Otherwise the values are divided by the temperature, cut to the top_k largest (0: all),
// then to the fewest whose probabilities reach top_p, and the draw picks along the
// cumulative probabilities in the sorted order. With `allowed` (bits of ceil(cols / 32)
// words per row) tokens outside it weigh nothing; the log-softmax is always over the
// whole raw row. Without sorting: each cut and the pick is the largest key whose weight
// at or above it meets a target, found by bisection on the key.
// Alternatives: the row's n largest raw values (the lower index first among equals), one
// pass each, as (token, log-softmax bits) pairs at top[row * 2 * top_stride].
extern "C" __global__ void MAX_THREADS(SAMPLE_MAX_THREADS) sample_rows(const float* __restrict__ x, int cols,
                                       const unsigned* __restrict__ allowed,
                                       const unsigned* __restrict__ seen,
                                       const u64* __restrict__ spec, unsigned* __restrict__ out,
                                       float* __restrict__ logprob, int top_stride,
                                       unsigned* __restrict__ top) {
    grid_dependency();
    __shared__ double shd[SAMPLE_MAX_THREADS];
    __shared__ u64 shk[SAMPLE_MAX_THREADS];
    __shared__ float shf[SAMPLE_MAX_THREADS];
    const u64* sp = spec + 6 * (long)blockIdx.x;
    float temp = __uint_as_float((unsigned)sp[0]);
    long top_k = (long)sp[1];
    float top_p = __uint_as_float((unsigned)sp[2]);
    double draw = __longlong_as_double((long long)sp[3]);
    SampleRow row;
    row.r = x + (long)blockIdx.x * cols;
    long words = (cols + 31) / 32;
    row.allowed = allowed ? allowed + blockIdx.x * words : 0;
    row.seen = seen ? seen + blockIdx.x * words : 0;
    row.penalty = __uint_as_float((unsigned)sp[4]);
    row.cols = cols;
    row.greedy = temp == 0.f || top_k == 1;
    row.temp = temp;
    row.shd = shd;
    // The raw row's log-sum-exp, and the largest scaled value's key.
    float m = NEG_INF, sum = 0.f;
    u64 best = 0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = row.r[i];
        if (v > m) {
            sum = sum * __expf(m - v) + 1.f;
            m = v;
        } else {
            sum += __expf(v - m);
        }
        u64 k = rank_key(row.scaled(i), i);
        if (k > best) best = k;
    }
    float M = block_reduce(m, shf, Max());
    double lse_sum = block_reduce(m == NEG_INF ? 0.0 : (double)(sum * __expf(m - M)), shd, Sum());
    best = block_reduce(best, shk, Max());
    int pick = key_index(best);
    if (!row.greedy) {
        row.top = row.scaled(pick);
        u64 floor_k = 0;
        if (top_k > 0 && top_k < cols) floor_k = row.largest_key(0, best, true, (double)top_k, false);
        double total = row.weight_from(floor_k, false);
        u64 floor_p = floor_k;
        if (top_p < 1.f) floor_p = row.largest_key(floor_k, best, false, (double)top_p * total, false);
        double kept = row.weight_from(floor_p, false);
        double target = draw * kept;
        u64 chosen;
        if (target < kept) {
            chosen = row.largest_key(floor_p, best, false, target, true);
        } else {
            // A draw past the last cumulative sum (rounding): the last kept value.
            u64 lowest = ~0ull;
            for (int i = threadIdx.x; i < cols; i += blockDim.x) {
                u64 k = rank_key(row.scaled(i), i);
                if (k >= floor_p && k < lowest) lowest = k;
            }
            chosen = ~block_reduce(~lowest, shk, Max());
        }
        pick = key_index(chosen);
    }
    float lse = M + logf((float)lse_sum);
    if (threadIdx.x == 0) {
        out[blockIdx.x] = (unsigned)pick;
        logprob[blockIdx.x] = row.r[pick] - lse;
    }
    int n_top = (int)min((long)sp[5], (long)min(top_stride, cols));
    unsigned* alt = top + 2 * (long)blockIdx.x * top_stride;
    u64 below = ~0ull;
    for (int j = 0; j < n_top; j++) {
        u64 k_best = 0;
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            u64 k = rank_key(row.r[i], i);
            if (k < below && k > k_best) k_best = k;
        }
        below = block_reduce(k_best, shk, Max());
        if (threadIdx.x == 0) {
            int i = key_index(below);
            alt[2 * j] = (unsigned)i;
            alt[2 * j + 1] = __float_as_uint(row.r[i] - lse);
        }
    }
}

#define ATT_WARPS 8
static_assert(ATT_WARPS * WARP == 256, "attention_batch is compiled for blocks of 256 threads");
#define MAX_DV 512

// ---- One step's attention over the paged caches of many sequences -------------------
// The step's metadata, `n` sequences, 64-bit words (read from device memory, so a step
// captured in a CUDA graph replays with new tables and lengths), the same for every
// layer:
//   [0, n)        each sequence's block table (device address of its u64 entries)
//   [n, 2n)       each sequence's cache length before the step (its first new position)
//   [2n, 3n + 1)  each sequence's first row among the step's rows (prefix sums; the last
//                 entry is the number of rows)
// A block holds `block_rows` positions of every layer; the layer's key rows start
// `kbase` bytes into it, its value rows `vbase` bytes (kbase itself when the values are
// the keys' columns: absorbed MLA keeps no value rows).
#define META_TAB(m, n, s) ((const u64*)(m)[s])
#define META_POS0(m, n, s) ((long)(m)[(n) + (s)])
#define META_ROW0(m, n, s) ((long)(m)[2 * (n) + (s)])

// Row `p` of a layer's keys or values (`base`: its offset in a block, `cols` wide).
__device__ __forceinline__ bf16* cache_row(const u64* __restrict__ tab, long base, int block_rows, long p,
                                           long cols) {
    return (bf16*)(tab[p / block_rows] + base) + (p % block_rows) * cols;
}

// The sequence row `r` belongs to: the last s with row0[s] <= r.
__device__ __forceinline__ int meta_seq_of_row(const u64* __restrict__ meta, int n, long r) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (META_ROW0(meta, n, mid) <= r) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// 4 f32 (16-byte aligned) rounded to bf16, packed as the cache holds them.
__device__ __forceinline__ uint2 bf16x4(const float* x) {
    float4 f = *(const float4*)x;
    uint2 p;
    bf16* h = (bf16*)&p;
    h[0] = __float2bfloat16(f.x);
    h[1] = __float2bfloat16(f.y);
    h[2] = __float2bfloat16(f.z);
    h[3] = __float2bfloat16(f.w);
    return p;
}

// 4 bf16 (8 bytes) dotted with 4 f32.
__device__ __forceinline__ float dot4(uint2 p, float4 x) {
    const __nv_bfloat162* h = (const __nv_bfloat162*)&p;
    float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    return a.x * x.x + a.y * x.y + b.x * x.z + b.y * x.w;
}

// A position's key or value row for attention_batch, 4 columns at a time as bf16: in the
// cache, or one of the step's own f32 rows rounded as the cache will hold it.
struct CacheRow {
    const bf16* r;
    __device__ __forceinline__ uint2 at(int i) const { return *(const uint2*)(r + i); }
};
struct OwnRow {
    const float* r;
    __device__ __forceinline__ uint2 at(int i) const { return bf16x4(r + i); }
};

// One position of a warp's online softmax: the key dotted with the query (qs, scaled),
// then the running maximum m, sum and output acc (lane l holds value columns 4l..4l+3 of
// every 4·WARP: acc[4j + c] is column 4·WARP·j + 4l + c) brought up to date.
template <class Row>
__device__ __forceinline__ void attend_position(Row k, Row v, const float* qs, int lane, int dk, int dv,
                                                float& m, float& sum, float (&acc)[MAX_DV / WARP]) {
    float dot = 0.f;
    for (int i = 4 * lane; i < dk; i += 4 * WARP) dot += dot4(k.at(i), *(const float4*)(qs + i));
    dot = warp_sum(dot);
    float mn = fmaxf(m, dot);
    float c = __expf(m - mn);
    float e = __expf(dot - mn);
    sum = sum * c + e;
#pragma unroll
    for (int j = 0; j < MAX_DV / (4 * WARP); j++) {
        int i = 4 * WARP * j + 4 * lane;
        if (i < dv) {
            uint2 pv = v.at(i);
            const __nv_bfloat162* hv = (const __nv_bfloat162*)&pv;
            float2 a = __bfloat1622float2(hv[0]), b = __bfloat1622float2(hv[1]);
            acc[4 * j] = acc[4 * j] * c + e * a.x;
            acc[4 * j + 1] = acc[4 * j + 1] * c + e * a.y;
            acc[4 * j + 2] = acc[4 * j + 2] * c + e * b.x;
            acc[4 * j + 3] = acc[4 * j + 3] * c + e * b.y;
        }
    }
    m = mn;
}

// The end of a split attention_batch block, its part written: it takes its (row, head)'s
// ticket, and the block with the last merges the `gridDim.y` parts (the running maximum,
// sum and unnormalised output of each, in split order) into out[blockIdx.x, dv] and
// gives the ticket back. `flag` and `weights` are the block's shared memory (one value,
// and gridDim.y ≤ ATT_WARPS·dv values; the caller no longer reads them). Not inlined:
// inlined, attention_batch takes 82 registers on sm_80 (2 blocks per multiprocessor
// instead of 3).
__device__ __noinline__ void merge_splits(const float* __restrict__ part, unsigned* __restrict__ tickets,
                                          int dv, float* flag, float* weights, float* __restrict__ out) {
    int splits = gridDim.y;
    // This block's part is written (every thread's writes seen device-wide) before its
    // ticket is taken.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
        flag[0] = atomicAdd(&tickets[blockIdx.x], 1u) == (unsigned)splits - 1 ? 1.f : 0.f;
    __syncthreads();
    if (flag[0] == 0.f) return;
    // The last: every other block's part is written. Read from L2 (this SM's L1 may not
    // have seen the other multiprocessors' writes).
    __threadfence();
    const float* pr = part + (long)blockIdx.x * splits * (dv + 2);
    float M = NEG_INF;
    for (int s = 0; s < splits; s++) M = fmaxf(M, __ldcg(pr + s * (dv + 2)));
    // A split with no positions (m = -inf) weighs nothing.
    float S = 0.f;
    for (int s = 0; s < splits; s++) {
        float m = __ldcg(pr + s * (dv + 2));
        float e = m == NEG_INF ? 0.f : __expf(m - M);
        S += __ldcg(pr + s * (dv + 2) + 1) * e;
        if (threadIdx.x == 0) weights[s] = e;
    }
    __syncthreads();
    float* o = out + (long)blockIdx.x * dv;
    for (int i = threadIdx.x; i < dv; i += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; s++) a += __ldcg(pr + s * (dv + 2) + 2 + i) * weights[s];
        o[i] = a / S;
    }
    if (threadIdx.x == 0) tickets[blockIdx.x] = 0;
}

// Causal attention of every sequence's new rows over its cache. q[rows, h, dk] (f32); key
// rows kcols = hk·dk wide, value rows `vcols` wide with head j's values at column j·vhead
// (bf16, in blocks of `block_rows` positions, from kbase and vbase bytes into a block;
// dk, dv, vhead and vcols multiples of 4); row r
// of sequence s is position pos0 + (r - row0) and sees positions 0..=it. Output
// [rows, h, dv] (f32).
//
// With `knew` (the step's key rows, f32, kcols wide) and `vnew` (its value rows, vcols
// wide; `knew` itself when the values are read from the keys), the step's rows are not
// in the caches yet: this launch appends them (the first split of the first query head
// of each key head writes that head's columns, as bf16), and every block reads positions
// pos0.. from knew and vnew instead, rounded to bf16 as the cache holds them, so no block
// waits for another's write and the result is the same as after a separate append.
// Without them (null), the caches already hold every position.
//
// One block (ATT_WARPS warps) per (row, head) and split: the grid's y dimension splits
// each row's positions into gridDim.y contiguous ranges (flash decoding: a decode step
// of a few sequences has too few (row, head) pairs to fill the GPU, and a block alone
// would walk the whole cache one position per warp at a time). Each warp keeps an online
// softmax over every ATT_WARPS-th position of its block's range; the warps merge at the
// end. With one split the block writes the output; with more, it writes its running
// maximum, sum and unnormalised output, dv + 2 floats, to part[(row·h + head)·splits +
// split], and takes a ticket of its (row, head) (tickets[blockIdx.x], zero before the
// launch): the block that takes the last one merges every split's part into the output
// and puts the ticket back to zero for the next launch. So a split step is one launch,
// whatever order the blocks run in.
extern "C" __global__ void MAX_THREADS(256) attention_batch(const float* __restrict__ q, const u64* __restrict__ meta,
                                           int n, float* __restrict__ out, float* __restrict__ part,
                                           unsigned* __restrict__ tickets,
                                           int h, int hk, int dk, int dv, int vcols, int vhead,
                                           float scale, int block_rows, long kbase, long vbase,
                                           const float* __restrict__ knew, const float* __restrict__ vnew) {
    grid_dependency();
    extern __shared__ float sm[];
    float* qs = sm;                  // dk
    float* wm = qs + dk;             // ATT_WARPS
    float* ws = wm + ATT_WARPS;      // ATT_WARPS
    float* wacc = ws + ATT_WARPS;    // ATT_WARPS * dv
    long row = blockIdx.x / h;
    int head = blockIdx.x % h;
    int s = meta_seq_of_row(meta, n, row);
    const u64* tab = META_TAB(meta, n, s);
    long pos0 = META_POS0(meta, n, s), row0 = META_ROW0(meta, n, s);
    long len = pos0 + (row - row0) + 1;
    long chunk = (len + gridDim.y - 1) / gridDim.y;
    long from = blockIdx.y * chunk, to = min(len, from + chunk);
    int kvh = head / (h / hk);
    long kcols = (long)hk * dk, koff = (long)kvh * dk, voff = (long)kvh * vhead;
    // Positions from `fresh` on are the step's own rows, read from knew/vnew.
    long fresh = knew ? pos0 : len;
    if (knew && blockIdx.y == 0 && head % (h / hk) == 0) {
        long p = len - 1;
        bf16* kd = cache_row(tab, kbase, block_rows, p, kcols) + koff;
        const float* kf = knew + row * kcols + koff;
        for (int i = threadIdx.x; i < dk; i += blockDim.x) kd[i] = __float2bfloat16(kf[i]);
        if (vnew != knew) {
            bf16* vd = cache_row(tab, vbase, block_rows, p, vcols) + voff;
            const float* vf = vnew + row * (long)vcols + voff;
            for (int i = threadIdx.x; i < dv; i += blockDim.x) vd[i] = __float2bfloat16(vf[i]);
        }
    }
    const float* qr = q + (row * h + head) * dk;
    for (int i = threadIdx.x; i < dk; i += blockDim.x) qs[i] = qr[i] * scale;
    __syncthreads();
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    float m = NEG_INF, sum = 0.f;
    float acc[MAX_DV / WARP];  // as attend_position keeps it
#pragma unroll
    for (int j = 0; j < MAX_DV / WARP; j++) acc[j] = 0.f;
    // The warp's positions in the cache, then those of the step's own rows.
    long p = from + warp;
    for (; p < min(to, fresh); p += ATT_WARPS) {
        attend_position(CacheRow{cache_row(tab, kbase, block_rows, p, kcols) + koff},
                        CacheRow{cache_row(tab, vbase, block_rows, p, vcols) + voff}, qs, lane, dk, dv, m, sum,
                        acc);
    }
    for (; p < to; p += ATT_WARPS) {
        long r = row0 + p - pos0;
        attend_position(OwnRow{knew + r * kcols + koff}, OwnRow{vnew + r * vcols + voff}, qs, lane, dk,
                        dv, m, sum, acc);
    }
    if (lane == 0) {
        wm[warp] = m;
        ws[warp] = sum;
    }
#pragma unroll
    for (int j = 0; j < MAX_DV / (4 * WARP); j++) {
        int i = 4 * WARP * j + 4 * lane;
        if (i < dv)
            for (int c = 0; c < 4; c++) wacc[warp * dv + i + c] = acc[4 * j + c];
    }
    __syncthreads();
    // A warp (or a whole split) with no positions has m = -inf and weighs nothing.
    float M = NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, wm[w]);
    float f[ATT_WARPS];
    float S = 0.f;
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = wm[w] == NEG_INF ? 0.f : __expf(wm[w] - M);
        S += ws[w] * f[w];
    }
    // One split: the normalised output. More: maximum, sum, then the unnormalised output.
    float* o = out + (row * h + head) * dv;
    float div = S;
    if (gridDim.y > 1) {
        o = part + ((long)blockIdx.x * gridDim.y + blockIdx.y) * (dv + 2);
        if (threadIdx.x == 0) {
            o[0] = M;
            o[1] = S;
        }
        o += 2;
        div = 1.f;
    }
    for (int i = threadIdx.x; i < dv; i += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) a += wacc[w * dv + i] * f[w];
        o[i] = a / div;
    }
    if (gridDim.y > 1) merge_splits(part, tickets, dv, wm, wacc, out);
}

// ---- Mixture of experts on the device ----------------------------------------------
// Routing (DeepSeek's gate), one thread per token: n experts, k chosen. scoring: 0
// softmax, 1 sigmoid; method: 0 greedy, 1 group-limited greedy, 2 noaux_tc (choice
// scores corrected by `bias`, groups scored by their top two). Mirrors the CPU `route`.
#define MOE_MAX_EXPERTS 512
#define MOE_MAX_GROUPS 64
extern "C" __global__ void MAX_THREADS(64) moe_route(const float* __restrict__ logits, const float* __restrict__ bias,
                                     int t, int n, int k, int scoring, int method, int n_group,
                                     int topk_group, int norm_topk, float scaling,
                                     int* __restrict__ ids, float* __restrict__ weights) {
    grid_dependency();
    int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= t) return;
    const float* l = logits + (long)tok * n;
    float score[MOE_MAX_EXPERTS];
    unsigned char allowed[MOE_MAX_EXPERTS];
    if (scoring == 0) {
        float m = NEG_INF;
        for (int e = 0; e < n; e++) m = fmaxf(m, l[e]);
        float s = 0.f;
        for (int e = 0; e < n; e++) { score[e] = expf(l[e] - m); s += score[e]; }
        for (int e = 0; e < n; e++) score[e] /= s;
    } else {
        for (int e = 0; e < n; e++) score[e] = 1.f / (1.f + expf(-l[e]));
    }
    bool corrected = method == 2 && bias != 0;
    for (int e = 0; e < n; e++) allowed[e] = 1;
    if (method != 0) {
        int per = n / n_group;
        float gs[MOE_MAX_GROUPS];
        for (int g = 0; g < n_group; g++) {
            float a = NEG_INF, b = NEG_INF;
            for (int e = g * per; e < (g + 1) * per; e++) {
                float c = corrected ? score[e] + bias[e] : score[e];
                if (c > a) { b = a; a = c; } else if (c > b) { b = c; }
            }
            gs[g] = method == 2 ? a + (per > 1 ? b : 0.f) : a;
        }
        unsigned char keep[MOE_MAX_GROUPS];
        for (int g = 0; g < n_group; g++) keep[g] = 0;
        for (int i = 0; i < topk_group; i++) {
            int best = -1;
            for (int g = 0; g < n_group; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            if (best >= 0) keep[best] = 1;
        }
        for (int e = 0; e < n; e++) allowed[e] = keep[e / per];
    }
    float sum = 0.f;
    for (int i = 0; i < k; i++) {
        int best = -1;
        float bv = NEG_INF;
        for (int e = 0; e < n; e++) {
            if (allowed[e] != 1) continue;
            float c = corrected ? score[e] + bias[e] : score[e];
            if (best < 0 || c > bv) { best = e; bv = c; }
        }
        if (best < 0) best = 0;
        allowed[best] = 2;
        ids[tok * k + i] = best;
        weights[tok * k + i] = score[best];
        sum += score[best];
    }
    for (int i = 0; i < k; i++) {
        float w = weights[tok * k + i];
        if (k > 1 && norm_topk) {
            w /= sum + 1e-20f;
            if (method == 2) w *= scaling;
        } else {
            w *= scaling;
        }
        weights[tok * k + i] = w;
    }
}

// The tiles of the grouped expert GEMMs (below): rows (slots) and outputs of a block's
// tile, its depth per stage, its threads.
#define GG_M 64
#define GG_N 64
#define GG_K 32
#define GG_THREADS 128

// Groups the t·k (token, expert) pairs by expert, in one block of MOE_MAX_EXPERTS
// threads: count[e], start[e], and per slot (sorted by expert; within an expert in no
// set order, which no result depends on: every slot is computed on its own) its token
// and weight; slot_of[pair] the slot of pair `tok * k + i`. tiles[e]: the first of
// expert e's row tiles of GG_M slots among every expert's, in expert order; tiles[n]:
// how many there are (what the grouped GEMMs' blocks are numbered by).
extern "C" __global__ void MAX_THREADS(MOE_MAX_EXPERTS) moe_group(const int* __restrict__ ids, const float* __restrict__ weights,
                                     int pairs, int k, int n, int* __restrict__ count,
                                     int* __restrict__ start, int* __restrict__ tiles,
                                     int* __restrict__ slot_tok, float* __restrict__ slot_w,
                                     int* __restrict__ slot_of) {
    grid_dependency();
    __shared__ int fill[MOE_MAX_EXPERTS];
    __shared__ int at[MOE_MAX_EXPERTS];
    __shared__ int tile_at[MOE_MAX_EXPERTS];
    int e = threadIdx.x;
    fill[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd(&fill[ids[p]], 1);
    __syncthreads();
    // Inclusive prefix sums of the counts and of the row tiles (Hillis–Steele), then
    // exclusive ones.
    int c = e < n ? fill[e] : 0, ct = (c + GG_M - 1) / GG_M;
    at[e] = c;
    tile_at[e] = ct;
    __syncthreads();
    for (int o = 1; o < MOE_MAX_EXPERTS; o <<= 1) {
        int add = e >= o ? at[e - o] : 0, add_t = e >= o ? tile_at[e - o] : 0;
        __syncthreads();
        at[e] += add;
        tile_at[e] += add_t;
        __syncthreads();
    }
    at[e] -= c;
    fill[e] = 0;
    if (e < n) {
        count[e] = c;
        start[e] = at[e];
        tiles[e] = tile_at[e] - ct;
        if (e == n - 1) tiles[n] = tile_at[e];
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        int x = ids[p];
        int s = at[x] + atomicAdd(&fill[x], 1);
        slot_tok[s] = p / k;
        slot_w[s] = weights[p];
        slot_of[p] = s;
    }
}

// The experts' projections read each expert's weight rows once per GEMV_ROWS of the
// tokens routed to it, with the decode projections' warp dot products: gate and up rows
// in one pass (dot_two, the tokens' rows picked by slot), down rows with gemv_one (an
// expert's slots are consecutive rows of h and y).

// h[slot, r] = silu(gate_e[r] · x_tok) · (up_e[r] · x_tok) for every slot of expert e;
// grid (n experts, ceil(inter / warps)), one warp per row r. Weight tables hold each
// expert's bf16 matrix address ([inter, hidden]).
extern "C" __global__ void MAX_THREADS(256) moe_gate_up(const float* __restrict__ x, const u64* __restrict__ gate_w,
                                       const u64* __restrict__ up_w, const int* __restrict__ count,
                                       const int* __restrict__ start, const int* __restrict__ slot_tok,
                                       int hidden, int inter, float* __restrict__ h) {
    grid_dependency();
    int e = blockIdx.x;
    int n_e = count[e];
    if (n_e == 0) return;
    int warps = blockDim.x / WARP;
    int r = blockIdx.y * warps + threadIdx.x / WARP;
    if (r >= inter) return;
    const bf16* g = (const bf16*)gate_w[e] + (long)r * hidden;
    const bf16* u = (const bf16*)up_w[e] + (long)r * hidden;
    int s0 = start[e];
    for (int c = 0; c < n_e; c += GEMV_ROWS) {
        int nx = min(GEMV_ROWS, n_e - c);
        float gv[GEMV_ROWS], uv[GEMV_ROWS];
        dot_two<false>(Picked{x, slot_tok + s0 + c, hidden}, g, u, nx, hidden, nullptr, 0.f, gv, uv);
#pragma unroll
        for (int j = 0; j < GEMV_ROWS; j++) {
            if (j < nx && threadIdx.x % WARP == 0) {
                float a = gv[j];
                h[(long)(s0 + c + j) * inter + r] = a / (1.f + __expf(-a)) * uv[j];
            }
        }
    }
}

// y[slot, r] = down_e[r] · h[slot]; grid (n experts, ceil(hidden / warps)).
extern "C" __global__ void MAX_THREADS(256) moe_down(const float* __restrict__ h, const u64* __restrict__ down_w,
                                    const int* __restrict__ count, const int* __restrict__ start,
                                    int hidden, int inter, float* __restrict__ y) {
    grid_dependency();
    int e = blockIdx.x;
    int n_e = count[e];
    if (n_e == 0) return;
    int warps = blockDim.x / WARP;
    int r = blockIdx.y * warps + threadIdx.x / WARP;
    if (r >= hidden) return;
    const bf16* d = (const bf16*)down_w[e];
    int s0 = start[e];
    for (int c = 0; c < n_e; c += GEMV_ROWS) {
        long s = s0 + c;
        gemv_one<false>(h + s * inter, d, nullptr, y + s * hidden, r, hidden,
                        min(GEMV_ROWS, n_e - c), inter, 0, nullptr, 0.f);
    }
}

// ---- Experts of many rows: grouped GEMMs on tensor cores ------------------------------
// A prompt (or a large decode batch) routes enough tokens to each expert for matrix
// products. These kernels compute every expert's rows in one launch per projection, on
// bf16 tensor cores (mma.sync, sm_80 and later) with f32 accumulation: no launch per
// expert, and no read of the experts' row counts by the host, so they need no
// synchronisation and can be captured.
// A block computes a GG_M × GG_N tile of one expert's output: grid (outputs / GG_N, row
// tiles), the row tiles numbered across experts as moe_group's `tiles` says; the grid
// has as many as the step can have (ceil(pairs / GG_M) + experts, or fewer), and the
// blocks past the step's own return at once.
// Its GG_THREADS threads are four warps, each a 32 × 32 quarter of the tile as 2 × 4
// products of 16 × 8. The operands pass through shared memory GG_K columns at a time
// (rounded to bf16 on the way); the next columns' global loads are issued before the
// current ones' products, so their latency hides behind the tensor cores.
// The row pitch of the operand tiles in shared memory, in bf16: 20 words, so the 8 rows
// and 4 column pairs a warp reads at once fall in 32 different banks.
#define GG_LD (GG_K + 8)
// Each thread stages GG_CHUNKS chunks of 8 columns of each operand tile (the left
// operand's GG_M rows and each right operand's GG_N, the same chunks of both).
#define GG_CHUNKS (GG_M * GG_K / 8 / GG_THREADS)
static_assert(GG_M == GG_N && GG_CHUNKS * GG_THREADS * 8 == GG_M * GG_K, "the staging's chunks cover the tiles");

// One tensor-core product of a warp, d += a · b: a a 16 × 16 bf16 tile (row-major), b a
// 16 × 8 one (column-major), d 16 × 8 f32, in PTX's mma.m16n8k16 fragments: lane
// (g = lane / 4, t = lane % 4) holds a[g][2t, 2t+1], a[g+8][2t, 2t+1], a[g][2t+8, 2t+9] and
// a[g+8][2t+8, 2t+9] (two bf16 per register, the first in the low half), b[2t, 2t+1][g]
// and b[2t+8, 2t+9][g], and d[g][2t, 2t+1], d[g+8][2t, 2t+1].
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
    __trap();  // no bf16 tensor cores before sm_80: the backend does not launch these there
#else
    emu_mma_16816(d, a, b);  // the tests' CPU emulation of the kernels
#endif
}

// 8 f32 values rounded to 8 bf16, packed as 16 bytes.
__device__ __forceinline__ uint4 gg_bf16x8(float4 a, float4 b) {
    uint4 r;
    bf16* h = (bf16*)&r;
    h[0] = __float2bfloat16(a.x); h[1] = __float2bfloat16(a.y);
    h[2] = __float2bfloat16(a.z); h[3] = __float2bfloat16(a.w);
    h[4] = __float2bfloat16(b.x); h[5] = __float2bfloat16(b.y);
    h[6] = __float2bfloat16(b.z); h[7] = __float2bfloat16(b.w);
    return r;
}

// The left operand of the gate and up projections: f32 rows of x picked by the slots'
// tokens (`tok`: the tile's first slot's entry of slot_tok), rounded to bf16 as staged.
struct GgPicked {
    const float* __restrict__ x;
    const int* __restrict__ tok;
    int k;
    struct Chunk { float4 a, b; };
    __device__ __forceinline__ Chunk load(int r, int c) const {
        const float4* p = (const float4*)(x + (long)tok[r] * k + c);
        return {p[0], p[1]};
    }
    __device__ __forceinline__ static Chunk zero() { return {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}}; }
    __device__ __forceinline__ static uint4 packed(Chunk c) { return gg_bf16x8(c.a, c.b); }
};

// The left operand of the down projection: consecutive bf16 rows (the tile's first at x).
struct GgRows {
    const bf16* __restrict__ x;
    int k;
    typedef uint4 Chunk;
    __device__ __forceinline__ Chunk load(int r, int c) const { return *(const uint4*)(x + (long)r * k + c); }
    __device__ __forceinline__ static Chunk zero() { return {0u, 0u, 0u, 0u}; }
    __device__ __forceinline__ static uint4 packed(Chunk c) { return c; }
};

// The expert and the first slot (of its own) of row tile i; false: a tile past the last.
__device__ __forceinline__ bool gg_tile(const int* __restrict__ tiles, int n, int i, int& e, int& r0) {
    if (i >= tiles[n]) return false;
    // tiles[lo] <= i < tiles[hi]; experts without slots have no tiles (tiles[e] ==
    // tiles[e + 1]), so the last expert with tiles[e] <= i has tile i.
    int lo = 0, hi = n;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (tiles[mid] <= i) lo = mid;
        else hi = mid;
    }
    e = lo;
    r0 = (i - tiles[lo]) * GG_M;
    return true;
}

// Two bf16 of a tile in shared memory, as one fragment register.
__device__ __forceinline__ unsigned gg_pair(const bf16* p) { return *(const unsigned*)p; }

// The products of one tile: acc[j] = A · W_jᵀ over k columns for the tile's m ≤ GG_M rows
// of A and its GG_N outputs from c0 (of n) of each of the NW weight matrices w[j] ([n, k]
// bf16, k a multiple of 8): acc[j][i][l] is the warp's 16 × 8 product at rows
// wm + 16i, outputs wn + 8l of its quarter (wm, wn). Rows past m and outputs past n are
// computed from zeros.
template <int NW, class A>
__device__ __forceinline__ void gg_products(A a, int m, const bf16* const (&w)[NW], int n, int c0, int k,
                                            float (&acc)[NW][2][4][4]) {
    __shared__ __align__(16) bf16 sa[GG_M * GG_LD];
    __shared__ __align__(16) bf16 sb[NW * GG_N * GG_LD];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int g = lane / 4, t = lane % 4;
    int wm = warp / 2 * 32, wn = warp % 2 * 32;
#pragma unroll
    for (int j = 0; j < NW; j++)
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int l = 0; l < 4; l++)
#pragma unroll
                for (int q = 0; q < 4; q++) acc[j][i][l][q] = 0.f;
    typename A::Chunk pa[GG_CHUNKS];
    uint4 pb[NW][GG_CHUNKS];
    // Chunk h of this thread: row q / (GG_K / 8) of a tile, columns from 8 · (q % (GG_K / 8)).
    auto fetch = [&](int k0) {
#pragma unroll
        for (int h = 0; h < GG_CHUNKS; h++) {
            int q = threadIdx.x + h * GG_THREADS, r = q / (GG_K / 8), c = k0 + q % (GG_K / 8) * 8;
            pa[h] = r < m && c < k ? a.load(r, c) : A::zero();
#pragma unroll
            for (int j = 0; j < NW; j++)
                pb[j][h] = c0 + r < n && c < k ? *(const uint4*)(w[j] + (long)(c0 + r) * k + c)
                                               : uint4{0u, 0u, 0u, 0u};
        }
    };
    fetch(0);
    for (int k0 = 0; k0 < k; k0 += GG_K) {
        __syncthreads();  // every warp is done with the previous columns
#pragma unroll
        for (int h = 0; h < GG_CHUNKS; h++) {
            int q = threadIdx.x + h * GG_THREADS, r = q / (GG_K / 8), c = q % (GG_K / 8) * 8;
            *(uint4*)(sa + r * GG_LD + c) = A::packed(pa[h]);
#pragma unroll
            for (int j = 0; j < NW; j++) *(uint4*)(sb + (j * GG_N + r) * GG_LD + c) = pb[j][h];
        }
        __syncthreads();
        if (k0 + GG_K < k) fetch(k0 + GG_K);
#pragma unroll
        for (int kk = 0; kk < GG_K; kk += 16) {
            unsigned fa[2][4];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const bf16* p = sa + (wm + 16 * i + g) * GG_LD + kk + 2 * t;
                fa[i][0] = gg_pair(p);
                fa[i][1] = gg_pair(p + 8 * GG_LD);
                fa[i][2] = gg_pair(p + 8);
                fa[i][3] = gg_pair(p + 8 * GG_LD + 8);
            }
#pragma unroll
            for (int j = 0; j < NW; j++)
#pragma unroll
                for (int l = 0; l < 4; l++) {
                    // W's rows are the product's columns: Wᵀ, read column-major.
                    const bf16* p = sb + (j * GG_N + wn + 8 * l + g) * GG_LD + kk + 2 * t;
                    unsigned fb[2] = {gg_pair(p), gg_pair(p + 8)};
#pragma unroll
                    for (int i = 0; i < 2; i++) mma_16816(acc[j][i][l], fa[i], fb);
                }
        }
    }
}

// The block's outputs as the products left them: out(r, c, v) for every pair of
// adjacent outputs c, c + 1 (c even) of the tile's row r < m with c < n, v their two
// values in each of the NW products.
template <int NW, class Out>
__device__ __forceinline__ void gg_outputs(const float (&acc)[NW][2][4][4], int m, int n, int c0, Out out) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int wm = warp / 2 * 32 + lane / 4, wn = c0 + warp % 2 * 32 + lane % 4 * 2;
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int l = 0; l < 4; l++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int r = wm + 16 * i + 8 * h, c = wn + 8 * l;
                if (r < m && c < n) {
                    float2 v[NW];
#pragma unroll
                    for (int j = 0; j < NW; j++) v[j] = {acc[j][i][l][2 * h], acc[j][i][l][2 * h + 1]};
                    out(r, c, v);
                }
            }
}

// act[slot, r] = silu(gate_e[r] · x_tok) · (up_e[r] · x_tok), rounded to bf16, for every
// slot of every expert e, its token tok = slot_tok[slot] and r < inter (a multiple of
// 8). Grid (ceil(inter / GG_N), row tiles); weight tables as moe_gate_up's; count,
// start and tiles (of n experts) as moe_group makes them.
extern "C" __global__ void MAX_THREADS(GG_THREADS) moe_gemm_gate_up(const float* __restrict__ x,
                                                const int* __restrict__ slot_tok, const u64* __restrict__ gate_w,
                                                const u64* __restrict__ up_w, const int* __restrict__ count,
                                                const int* __restrict__ start, const int* __restrict__ tiles,
                                                int n, int hidden, int inter, bf16* __restrict__ act) {
    grid_dependency();
    int e, r0;
    if (!gg_tile(tiles, n, blockIdx.y, e, r0)) return;
    int m = min(count[e] - r0, GG_M);
    int s0 = start[e] + r0, c0 = blockIdx.x * GG_N;
    const bf16* const w[2] = {(const bf16*)gate_w[e], (const bf16*)up_w[e]};
    float acc[2][2][4][4];
    gg_products<2>(GgPicked{x, slot_tok + s0, hidden}, m, w, inter, c0, hidden, acc);
    gg_outputs<2>(acc, m, inter, c0, [&](int r, int c, const float2 (&v)[2]) {
        float2 g = v[0], u = v[1];
        __nv_bfloat162 a;
        a.x = __float2bfloat16(g.x / (1.f + __expf(-g.x)) * u.x);
        a.y = __float2bfloat16(g.y / (1.f + __expf(-g.y)) * u.y);
        *(__nv_bfloat162*)(act + (long)(s0 + r) * inter + c) = a;
    });
}

// y[slot, r] = down_e[r] · act[slot] for every slot of every expert e and r < hidden (a
// multiple of 8; act: bf16 rows as moe_gemm_gate_up writes them). Grid (ceil(hidden /
// GG_N), row tiles); the rest as moe_gemm_gate_up's.
extern "C" __global__ void MAX_THREADS(GG_THREADS) moe_gemm_down(const bf16* __restrict__ act,
                                             const u64* __restrict__ down_w, const int* __restrict__ count,
                                             const int* __restrict__ start, const int* __restrict__ tiles,
                                             int n, int hidden, int inter, float* __restrict__ y) {
    grid_dependency();
    int e, r0;
    if (!gg_tile(tiles, n, blockIdx.y, e, r0)) return;
    int m = min(count[e] - r0, GG_M);
    int s0 = start[e] + r0, c0 = blockIdx.x * GG_N;
    const bf16* const w[1] = {(const bf16*)down_w[e]};
    float acc[1][2][4][4];
    gg_products<1>(GgRows{act + (long)s0 * inter, inter}, m, w, hidden, c0, inter, acc);
    gg_outputs<1>(acc, m, hidden, c0, [&](int r, int c, const float2 (&v)[1]) {
        *(float2*)(y + (long)(s0 + r) * hidden + c) = v[0];
    });
}

// out[tok, :] = Σ_i w_s · y[s, :] over the token's slots s = slot_of[tok·k + i], one block
// per token.
extern "C" __global__ void MAX_THREADS(256) moe_combine(const float* __restrict__ y, const int* __restrict__ slot_of,
                                       const float* __restrict__ slot_w, int k, int hidden,
                                       float* __restrict__ out) {
    grid_dependency();
    int tok = blockIdx.x;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float a = 0.f;
        for (int i = 0; i < k; i++) {
            int s = slot_of[tok * k + i];
            a += slot_w[s] * y[(long)s * hidden + c];
        }
        out[(long)tok * hidden + c] = a;
    }
}

// ---- Attention on the tensor cores, query heads grouped -----------------------------
// attention_batch's causal attention (the same parameters, knew and vnew as there) for
// prompts, and for decode steps whose query heads share keys by eight or more (MLA's
// absorbed form shares one key head among all its heads): attention_batch gives each
// (row, head) a block of its own, which reads every key of the row's sequence from L2 and
// dots it on the CUDA cores, so a prompt's attention grows with the square of its length
// at a few percent of the tensor cores' rate, and a decode step reads each key once per
// head (sixteen times for V2-Lite, 128 for V3).
// Here a block takes FA_SLOTS query slots of one key head, the (row, query head) pairs
// of a sequence that share its keys, numbered row-major (slot σ: row σ / g, head σ % g of
// the g = h / hk heads of key head blockIdx.y; MLA's absorbed form has one key head, so a
// block is two rows of sixteen heads), and walks the keys FA_KEYS positions at a time:
// scores S = Q·Kᵀ (bf16 products on the tensor cores, f32 sums), an online softmax per
// slot in f32, and O += P·V with P rounded to bf16. Each key tile is read once for the
// block's slots, from the cache or (the step's own rows) from knew/vnew rounded to bf16
// as the cache holds them; the block with a row's first head of a key head appends that
// row's keys and values to the caches, as attention_batch does.
// The grid's z dimension splits the tile's positions into gridDim.z ranges of whole key
// tiles (flash decoding, as attention_batch's y): each block of a split tile writes its
// slots' running maximum, sum and unnormalised output, dv + 2 floats per slot, to
// part[((x · hk + y) · splits + split) · min(FA_SLOTS, g) + slot], and the block that
// takes the last of the tile's tickets (tickets[x · hk + y]) merges them and puts it
// back to zero. Only steps of one row per sequence (decode steps) are split: a tile has
// at most min(FA_SLOTS, g) slots then.
// Grid (the slot tiles, or a bound on them: those past the step's return at once; hk;
// splits), FA_THREADS threads, fa_shared(dk, dv, values in keys) bytes of
// dynamic shared memory (the host's `fa_shared` computes the same). dk and dv multiples of
// 8, dv ≤ MAX_DV; the values are the keys' columns when vbase == kbase (absorbed MLA).
#define FA_SLOTS 32
#define FA_KEYS 32
#define FA_WARPS 8
#define FA_THREADS 256
// The warps' shares: each of the 8 products of 16 slots × 8 keys of a score tile is one
// warp's; each warp then keeps the output's value columns 8j.. for j ≡ warp (mod 8).
static_assert(FA_SLOTS == 32 && FA_KEYS == 32 && FA_WARPS == 8 && FA_THREADS == FA_WARPS * WARP &&
                  MAX_DV <= 64 * FA_WARPS,
              "attention_mma's warps split its tiles as written");
// Row pitches in shared memory (bf16): the key width rounded up to the products' 16,
// then 8 more, so the rows a warp's fragment reads at once fall in different banks.
__device__ __forceinline__ int fa_ldk(int dk) { return ((dk + 15) & ~15) + 8; }
#define FA_LDS (FA_KEYS + 1)
#define FA_LDP (FA_KEYS + 8)

// A bf16 value of shared memory at (row, column) of a pitch-`ld` tile, and two of them
// (rows r, r + 1 of a column) as one fragment register.
__device__ __forceinline__ unsigned fa_column_pair(const bf16* t, int ld, int r, int c) {
    __nv_bfloat162 v;
    v.x = t[r * ld + c];
    v.y = t[(r + 1) * ld + c];
    return *(const unsigned*)&v;
}

// The slots a tile of a split launch (one row per sequence) has room for in `part`.
__device__ __forceinline__ int fa_part_slots(int g) { return min(FA_SLOTS, g); }

// The end of a split attention_mma block, its part written: as merge_splits, for every
// slot of the tile at once (`slots` of them, from slot σ0 of the sequence whose rows start
// at row0; g query heads per key head, h in all).
__device__ __noinline__ void fa_merge_splits(const float* __restrict__ part, unsigned* __restrict__ tickets,
                                             int slots, int dv, long row0, long sig0, int g, int h,
                                             float* __restrict__ out, int* flag) {
    int splits = gridDim.z;
    long pair = (long)blockIdx.x * gridDim.y + blockIdx.y;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) flag[0] = atomicAdd(&tickets[pair], 1u) == (unsigned)splits - 1;
    __syncthreads();
    if (!flag[0]) return;
    __threadfence();
    const float* pr = part + pair * splits * fa_part_slots(g) * (dv + 2);
    long stride = (long)fa_part_slots(g) * (dv + 2);
    for (int i = threadIdx.x; i < slots * dv; i += blockDim.x) {
        int sl = i / dv, c = i % dv;
        const float* ps = pr + sl * (dv + 2);
        float M = NEG_INF;
        for (int z = 0; z < splits; z++) M = fmaxf(M, __ldcg(ps + z * stride));
        float L = 0.f, a = 0.f;
        for (int z = 0; z < splits; z++) {
            float m = __ldcg(ps + z * stride);
            // A split with none of the slot's positions (m = -inf) weighs nothing.
            float e = m == NEG_INF ? 0.f : __expf(m - M);
            L += __ldcg(ps + z * stride + 1) * e;
            a += __ldcg(ps + z * stride + 2 + c) * e;
        }
        long sg = sig0 + sl;
        out[((row0 + sg / g) * h + blockIdx.y * g + sg % g) * (long)dv + c] = a / L;
    }
    if (threadIdx.x == 0) tickets[pair] = 0;
}

extern "C" __global__ void MAX_THREADS(FA_THREADS) attention_mma(const float* __restrict__ q, const u64* __restrict__ meta,
                                              int n, float* __restrict__ out, float* __restrict__ part,
                                              unsigned* __restrict__ tickets, int h, int hk, int dk, int dv,
                                              int vcols, int vhead, float scale, int block_rows, long kbase,
                                              long vbase, const float* __restrict__ knew,
                                              const float* __restrict__ vnew) {
    grid_dependency();
    int g = h / hk, kvh = blockIdx.y;
    // The block's sequence and slot tile within it.
    int s = 0;
    long tile = blockIdx.x, row0 = 0, rows = 0;
    for (;; s++) {
        if (s == n) return;
        row0 = META_ROW0(meta, n, s);
        rows = META_ROW0(meta, n, s + 1) - row0;
        long tiles = (rows * g + FA_SLOTS - 1) / FA_SLOTS;
        if (tile < tiles) break;
        tile -= tiles;
    }
    const u64* tab = META_TAB(meta, n, s);
    bool vin = vbase == kbase;
    long pos0 = META_POS0(meta, n, s), sig0 = tile * FA_SLOTS;
    int slots = (int)min((long)FA_SLOTS, rows * g - sig0);
    long kcols = (long)hk * dk, koff = (long)kvh * dk, voff = (long)kvh * vhead;
    long fresh = knew ? pos0 : (long)(~0ull >> 1);
    // The last position any slot sees: its last row's; this split's share of them, in
    // whole key tiles, from `from` to before `to`.
    long last = pos0 + (sig0 + slots - 1) / g;
    long chunk = ((last + gridDim.z) / gridDim.z + FA_KEYS - 1) / FA_KEYS * FA_KEYS;
    long from = blockIdx.z * chunk, to = min(last + 1, from + chunk);
    int ldk = fa_ldk(dk), ldv = dv + 8, dkp = ldk - 8;
    // Dynamic shared memory starts 16-byte aligned, and every region below is a multiple
    // of 16 bytes.
    extern __shared__ float sm[];
    bf16* sq = (bf16*)sm;                             // FA_SLOTS × ldk
    bf16* sk = sq + FA_SLOTS * ldk;                   // FA_KEYS × ldk
    bf16* sv = vin ? sk : sk + FA_KEYS * ldk;         // FA_KEYS × ldv, unless the keys hold the values
    float* ss = (float*)(vin ? sv + FA_KEYS * ldk : sv + FA_KEYS * ldv);  // FA_SLOTS × FA_LDS
    bf16* sp = (bf16*)(ss + FA_SLOTS * FA_LDS);       // FA_SLOTS × FA_LDP
    float* sm_m = (float*)(sp + FA_SLOTS * FA_LDP);   // per slot: running maximum,
    float* sm_l = sm_m + FA_SLOTS;                    // sum,
    float* sm_c = sm_l + FA_SLOTS;                    // this tile's correction of the output,
    int* slim = (int*)(sm_c + FA_SLOTS);              // and the last position it sees (-1: none)
    int ld8 = dkp / 8;
    // The slots' queries, as bf16 (columns past dk zero).
    for (int i = threadIdx.x; i < FA_SLOTS * ld8; i += blockDim.x) {
        int sl = i / ld8, c = i % ld8 * 8;
        uint4 v = {0u, 0u, 0u, 0u};
        if (sl < slots && c < dk) {
            long sg = sig0 + sl, r = row0 + sg / g;
            const float4* p = (const float4*)(q + (r * h + kvh * g + sg % g) * (long)dk + c);
            v = gg_bf16x8(p[0], p[1]);
        }
        *(uint4*)(sq + sl * ldk + c) = v;
    }
    if (threadIdx.x < FA_SLOTS) {
        int sl = threadIdx.x;
        sm_m[sl] = NEG_INF;
        sm_l[sl] = 0.f;
        slim[sl] = sl < slots ? (int)(pos0 + (sig0 + sl) / g) : -1;
    }
    // The step's rows whose first head is one of this block's slots go into the caches
    // (by the first split).
    if (knew && blockIdx.z == 0) {
        for (int sl = 0; sl < slots; sl++) {
            long sg = sig0 + sl;
            if (sg % g) continue;
            long r = row0 + sg / g, p = pos0 + sg / g;
            bf16* kd = cache_row(tab, kbase, block_rows, p, kcols) + koff;
            const float* kf = knew + r * kcols + koff;
            for (int i = threadIdx.x; i < dk; i += blockDim.x) kd[i] = __float2bfloat16(kf[i]);
            if (!vin) {
                bf16* vd = cache_row(tab, vbase, block_rows, p, vcols) + voff;
                const float* vf = vnew + r * (long)vcols + voff;
                for (int i = threadIdx.x; i < dv; i += blockDim.x) vd[i] = __float2bfloat16(vf[i]);
            }
        }
    }
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int gq = lane / 4, t4 = lane % 4;
    int mi = warp / 4, ni = warp % 4;  // the warp's score product: slots 16mi.., keys 8ni..
    float o[2][8][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[a][j][e] = 0.f;
    for (long kb = from; kb < to; kb += FA_KEYS) {
        __syncthreads();  // the previous tile's keys, values and probabilities are used
        // The tile's keys (and values), positions past `last` and columns past dk zero.
        for (int i = threadIdx.x; i < FA_KEYS * ld8; i += blockDim.x) {
            int kr = i / ld8, c = i % ld8 * 8;
            long p = kb + kr;
            uint4 v = {0u, 0u, 0u, 0u};
            if (p < to && c < dk) {
                if (p >= fresh) {
                    const float4* f = (const float4*)(knew + (row0 + p - pos0) * kcols + koff + c);
                    v = gg_bf16x8(f[0], f[1]);
                } else {
                    v = *(const uint4*)(cache_row(tab, kbase, block_rows, p, kcols) + koff + c);
                }
            }
            *(uint4*)(sk + kr * ldk + c) = v;
        }
        if (!vin) {
            int lv8 = dv / 8;
            for (int i = threadIdx.x; i < FA_KEYS * lv8; i += blockDim.x) {
                int kr = i / lv8, c = i % lv8 * 8;
                long p = kb + kr;
                uint4 v = {0u, 0u, 0u, 0u};
                if (p < to) {
                    if (p >= fresh) {
                        const float4* f = (const float4*)(vnew + (row0 + p - pos0) * (long)vcols + voff + c);
                        v = gg_bf16x8(f[0], f[1]);
                    } else {
                        v = *(const uint4*)(cache_row(tab, vbase, block_rows, p, vcols) + voff + c);
                    }
                }
                *(uint4*)(sv + kr * ldv + c) = v;
            }
        }
        __syncthreads();
        // Scores: the warp's 16 slots × 8 keys, scaled, and -inf where the slot does not
        // see the key.
        {
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            for (int kk = 0; kk < dkp; kk += 16) {
                const bf16* pa = sq + (16 * mi + gq) * ldk + kk + 2 * t4;
                unsigned fa[4] = {gg_pair(pa), gg_pair(pa + 8 * ldk), gg_pair(pa + 8), gg_pair(pa + 8 * ldk + 8)};
                const bf16* pb = sk + (8 * ni + gq) * ldk + kk + 2 * t4;
                unsigned fb[2] = {gg_pair(pb), gg_pair(pb + 8)};
                mma_16816(acc, fa, fb);
            }
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int sl = 16 * mi + gq + 8 * (e / 2), key = 8 * ni + 2 * t4 + e % 2;
                ss[sl * FA_LDS + key] = kb + key <= slim[sl] ? acc[e] * scale : NEG_INF;
            }
        }
        __syncthreads();
        // The online softmax: 8 threads per slot (adjacent lanes), 4 keys each.
        {
            int sl = threadIdx.x / 8, eighth = threadIdx.x % 8;
            float m_old = sm_m[sl];
            float v[4];
            float mx = NEG_INF;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                v[e] = ss[sl * FA_LDS + 4 * eighth + e];
                mx = fmaxf(mx, v[e]);
            }
            for (int w = 1; w < 8; w <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, w));
            float m_new = fmaxf(m_old, mx);
            float sum = 0.f;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float pe = v[e] == NEG_INF ? 0.f : __expf(v[e] - m_new);
                sum += pe;
                sp[sl * FA_LDP + 4 * eighth + e] = __float2bfloat16(pe);
            }
            for (int w = 1; w < 8; w <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, w);
            if (eighth == 0) {
                float c = m_old == NEG_INF ? 0.f : __expf(m_old - m_new);
                sm_c[sl] = c;
                sm_l[sl] = sm_l[sl] * c + sum;
                sm_m[sl] = m_new;
            }
        }
        __syncthreads();
        // O = O · correction + P·V over the warp's value columns.
        const bf16* vt = vin ? sk : sv;
        int ldt = vin ? ldk : ldv;
#pragma unroll
        for (int a = 0; a < 2; a++) {
            float c0 = sm_c[16 * a + gq], c1 = sm_c[16 * a + gq + 8];
            unsigned fa[2][4];
#pragma unroll
            for (int ks = 0; ks < 2; ks++) {
                const bf16* pa = sp + (16 * a + gq) * FA_LDP + 16 * ks + 2 * t4;
                fa[ks][0] = gg_pair(pa);
                fa[ks][1] = gg_pair(pa + 8 * FA_LDP);
                fa[ks][2] = gg_pair(pa + 8);
                fa[ks][3] = gg_pair(pa + 8 * FA_LDP + 8);
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int col = 8 * (warp + FA_WARPS * j);
                if (col >= dv) continue;
                o[a][j][0] *= c0;
                o[a][j][1] *= c0;
                o[a][j][2] *= c1;
                o[a][j][3] *= c1;
#pragma unroll
                for (int ks = 0; ks < 2; ks++) {
                    // Vᵀ read column-major: the fragment's keys 2t, 2t + 1 (and 8 on) of
                    // value column col + gq.
                    unsigned fb[2] = {fa_column_pair(vt, ldt, 16 * ks + 2 * t4, col + gq),
                                      fa_column_pair(vt, ldt, 16 * ks + 2 * t4 + 8, col + gq)};
                    mma_16816(o[a][j], fa[ks], fb);
                }
            }
        }
    }
    // One split: the normalised output, out[row, head, c]. More: each slot's maximum, sum
    // and unnormalised output.
    bool split = gridDim.z > 1;
    float* pz = part + (((long)blockIdx.x * gridDim.y + blockIdx.y) * gridDim.z + blockIdx.z) * fa_part_slots(g) * (dv + 2);
    if (split && threadIdx.x < slots) {
        pz[threadIdx.x * (dv + 2)] = sm_m[threadIdx.x];
        pz[threadIdx.x * (dv + 2) + 1] = sm_l[threadIdx.x];
    }
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            int sl = 16 * a + gq + 8 * hh;
            if (sl >= slots) continue;
            long sg = sig0 + sl, r = row0 + sg / g;
            float inv = split ? 1.f : 1.f / sm_l[sl];
            float* orow = split ? pz + sl * (dv + 2) + 2 : out + (r * h + kvh * g + sg % g) * (long)dv;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int col = 8 * (warp + FA_WARPS * j) + 2 * t4;
                if (col < dv) {
                    orow[col] = o[a][j][2 * hh] * inv;
                    orow[col + 1] = o[a][j][2 * hh + 1] * inv;
                }
            }
        }
    if (split) fa_merge_splits(part, tickets, slots, dv, row0, sig0, g, h, out, slim);
}
