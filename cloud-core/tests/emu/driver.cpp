// The parts of the CUDA driver, cuBLAS and NVRTC that the CUDA backend (through cudarc)
// calls, on the CPU: "device" memory is host memory (with a configurable capacity, so
// out-of-memory is reachable), kernels are the emulated ones (`emu_bind`), GEMMs follow
// cuBLAS's column-major definition. Work is done when it is issued, except on a stream
// being captured: there kernels, GEMMs, device copies and memsets are recorded (their
// arguments read at capture, as CUDA does) into a graph that `cuGraphLaunch` replays.
// What CUDA refuses during a capture (host copies, allocations, synchronisation) is
// refused here too and invalidates the capture, so the backend's graphs are checked on
// machines without a GPU. Built into three libraries named libcuda.so, libcublas.so and
// libnvrtc.so for tests of the backend.
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

extern "C" void* emu_bind(const char*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                          unsigned, void**);
extern "C" int emu_has_kernel(const char*);

namespace {
std::mutex mem_lock;
std::map<unsigned long long, size_t> live;
size_t used = 0;
size_t capacity() {
    const char* c = std::getenv("EMU_CUDA_MEMORY");
    return c ? std::strtoull(c, nullptr, 10) : (size_t(4) << 30);
}
thread_local void* current_ctx = nullptr;
int ctx_token, module_token, pool_token, prog_token;
const char* PTX = "// emulated: the kernels run on the CPU\n";

enum : int {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
    CAPTURE_UNSUPPORTED = 900,
    CAPTURE_INVALIDATED = 901,
};

// Kernels' attribute 8: the most dynamic shared memory a launch may ask for (CUDA's 48 KiB
// unless raised).
std::map<std::string, int> max_dynamic_shared;

using Op = std::function<void()>;

struct Stream {
    bool capturing = false;
    bool invalidated = false;
    std::vector<Op> ops;
};
Stream default_stream;
// Streams capturing on this thread (thread-local capture mode: this thread's unsafe
// calls are refused while any of its streams captures).
thread_local int capturing_here = 0;

Stream* S(void* s) { return s ? (Stream*)s : &default_stream; }

// Runs `op` now, or records it when `s` is being captured.
int issue(void* s, Op op) {
    Stream* st = S(s);
    if (st->capturing) {
        st->ops.push_back(std::move(op));
        return OK;
    }
    op();
    return OK;
}

// A call CUDA refuses while this thread captures: invalidates every capture.
bool refuse_in_capture(void* s = nullptr) {
    Stream* st = s ? S(s) : nullptr;
    if ((st && st->capturing) || capturing_here > 0) {
        if (st) st->invalidated = true;
        return true;
    }
    return false;
}

struct Graph {
    std::vector<Op> ops;
};
}  // namespace

extern "C" {
typedef int CUresult;
typedef unsigned long long CUdeviceptr;

CUresult cuInit(unsigned) { return 0; }
CUresult cuDeviceGet(int* d, int ordinal) { if (ordinal != 0) return 101; *d = 0; return 0; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &ctx_token; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return 0; }
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    // 16: multiprocessors (few: enough that a decode step of the test models splits its
    // attention, as the step of a real model does on a real GPU); 75, 76: compute
    // capability 9.0; 97: the shared memory a block may opt in to (an H100's 227 KiB);
    // 115: memory pools.
    *v = attr == 16 ? 16 : attr == 75 ? 9 : attr == 76 ? 0 : attr == 97 ? 227 << 10 : attr == 115 ? 1 : 0;
    return 0;
}
CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "CUDA device emulated on the CPU");
    return 0;
}
CUresult cuDeviceTotalMem_v2(size_t* b, int) { *b = capacity(); return 0; }
CUresult cuCtxGetCurrent(void** c) { *c = current_ctx; return 0; }
CUresult cuCtxSetCurrent(void* c) { current_ctx = c; return 0; }
CUresult cuCtxSynchronize() { return refuse_in_capture() ? CAPTURE_UNSUPPORTED : OK; }
CUresult cuStreamCreate(void** s, unsigned) { *s = new Stream; return 0; }
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) { *s = new Stream; return 0; }
CUresult cuStreamDestroy_v2(void* s) { if (s) delete (Stream*)s; return 0; }
CUresult cuStreamSynchronize(void* s) { return refuse_in_capture(s) ? CAPTURE_UNSUPPORTED : OK; }
CUresult cuStreamQuery(void* s) { return refuse_in_capture(s) ? CAPTURE_UNSUPPORTED : OK; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return 0; }
// An event holds the time it was recorded: work is done when it is issued, so that is
// when the work before it ended.
double emu_now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}
CUresult cuEventCreate(void** e, unsigned) { *e = new double(0); return 0; }
CUresult cuEventRecord(void* e, void*) { *(double*)e = emu_now_ms(); return 0; }
CUresult cuEventSynchronize(void*) { return refuse_in_capture() ? CAPTURE_UNSUPPORTED : OK; }
CUresult cuEventQuery(void*) { return 0; }
CUresult cuEventElapsedTime(float* ms, void* a, void* b) { *ms = float(*(double*)b - *(double*)a); return 0; }
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }
CUresult cuEventDestroy_v2(void* e) { delete (double*)e; return 0; }
CUresult cuModuleLoadData(void** m, const void*) { *m = &module_token; return 0; }
CUresult cuModuleUnload(void*) { return 0; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    if (!emu_has_kernel(name)) return NOT_FOUND;
    *f = strdup(name);
    return 0;
}
// Attribute 0 is the most threads per block: CUDA's 1024 (fibers have no register file to
// run out of); the others are 0.
CUresult cuFuncGetAttribute(int* v, int attr, void*) { *v = attr == 0 ? 1024 : 0; return 0; }
CUresult cuFuncSetAttribute(void* f, int attr, int v) {
    if (attr == 8) max_dynamic_shared[(const char*)f] = v;
    return 0;
}
CUresult cuDeviceGetDefaultMemPool(void** p, int) { *p = &pool_token; return 0; }
CUresult cuMemPoolSetAttribute(void*, int, void*) { return 0; }

static CUresult alloc(CUdeviceptr* p, size_t bytes) {
    std::lock_guard<std::mutex> g(mem_lock);
    if (used + bytes > capacity()) return OUT_OF_MEMORY;
    // Exactly `bytes` (so that, built with AddressSanitizer, an access past the end is
    // caught), 256-aligned as CUDA's, and not zeroed: every byte 0xff, a NaN as f32 and
    // as bf16 and -1 as an integer, so a kernel that reads what nothing wrote shows it
    // (EMU_NO_POISON set: left as the host gives it, untouched, to time the host's
    // work without the page faults of filling new memory).
    void* m = nullptr;
    if (posix_memalign(&m, 256, bytes ? bytes : 1) != 0) return OUT_OF_MEMORY;
    static const bool poison = std::getenv("EMU_NO_POISON") == nullptr;
    if (poison) std::memset(m, 0xff, bytes);
    *p = (CUdeviceptr)m;
    live[*p] = bytes;
    used += bytes;
    return 0;
}
static CUresult release(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(mem_lock);
    auto it = live.find(p);
    if (it == live.end()) return INVALID_VALUE;
    used -= it->second;
    live.erase(it);
    std::free((void*)p);
    return 0;
}
// Allocations and frees are refused during a capture: the backend's graphed steps take
// their memory from an arena allocated beforehand.
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    return refuse_in_capture() ? CAPTURE_UNSUPPORTED : alloc(p, bytes);
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* s) {
    return refuse_in_capture(s) ? CAPTURE_UNSUPPORTED : alloc(p, bytes);
}
CUresult cuMemFree_v2(CUdeviceptr p) { return refuse_in_capture() ? CAPTURE_UNSUPPORTED : release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
    return refuse_in_capture(s) ? CAPTURE_UNSUPPORTED : release(p);
}
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    std::lock_guard<std::mutex> g(mem_lock);
    *total = capacity();
    *free_b = capacity() > used ? capacity() - used : 0;
    return 0;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* s) {
    return issue(s, [=] { std::memset((void*)d, v, n); });
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    if (refuse_in_capture()) return CAPTURE_UNSUPPORTED;
    std::memset((void*)d, v, n);
    return 0;
}
// Copies from or to host memory are refused during a capture (CUDA refuses pageable
// ones; the backend stages host data and uploads it before launching the graph).
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* src, size_t n, void* s) {
    if (refuse_in_capture(s)) return CAPTURE_UNSUPPORTED;
    std::memcpy((void*)d, src, n);
    return 0;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* src, size_t n) {
    if (refuse_in_capture()) return CAPTURE_UNSUPPORTED;
    std::memcpy((void*)d, src, n);
    return 0;
}
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr src, size_t n, void* s) {
    if (refuse_in_capture(s)) return CAPTURE_UNSUPPORTED;
    std::memcpy(d, (const void*)src, n);
    return 0;
}
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr src, size_t n) {
    if (refuse_in_capture()) return CAPTURE_UNSUPPORTED;
    std::memcpy(d, (const void*)src, n);
    return 0;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, void* s) {
    return issue(s, [=] { std::memmove((void*)d, (const void*)src, n); });
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr src, size_t n) {
    if (refuse_in_capture()) return CAPTURE_UNSUPPORTED;
    std::memmove((void*)d, (const void*)src, n);
    return 0;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, void* s, void** params, void**) {
    // What the device refuses: empty or oversized grids and blocks (1024 threads, z ≤ 64,
    // grid y and z ≤ 65535), more dynamic shared memory than allowed.
    auto limit = max_dynamic_shared.find((const char*)f);
    unsigned most_shared = limit == max_dynamic_shared.end() ? 48u << 10 : unsigned(limit->second);
    if (!gx || !gy || !gz || !bx || !by || !bz || gx > 0x7fffffffu || gy > 65535 || gz > 65535 ||
        bx > 1024 || by > 1024 || bz > 64 || (unsigned long long)bx * by * bz > 1024 ||
        shared > most_shared)
        return INVALID_VALUE;
    auto* k = (std::function<void()>*)emu_bind((const char*)f, gx, gy, gz, bx, by, bz, shared, params);
    if (!k) return LAUNCH_FAILED;
    Op op = std::move(*k);
    delete k;
    return issue(s, std::move(op));
}
// cuLaunchKernelEx's configuration (cuda.h's CUlaunchConfig and CUlaunchAttribute): of
// the attributes, programmatic stream serialization (6) alone, which the emulation,
// running one kernel after another, honours by doing nothing else. With EMU_REFUSE_PDL
// set it refuses that attribute in a stream capture, as a driver whose graphs cannot
// hold it would, invalidating the capture.
struct LaunchAttribute {
    int id;
    char pad[4];
    union {
        char bytes[64];
        int programmatic;
    } value;
};
struct LaunchConfig {
    unsigned gx, gy, gz, bx, by, bz, shared;
    void* stream;
    LaunchAttribute* attrs;
    unsigned n_attrs;
};
CUresult cuLaunchKernelEx(const LaunchConfig* c, void* f, void** params, void** extra) {
    if (!c || (c->n_attrs && !c->attrs)) return INVALID_VALUE;
    static const bool refuse = std::getenv("EMU_REFUSE_PDL") != nullptr;
    for (unsigned i = 0; i < c->n_attrs; i++) {
        if (c->attrs[i].id != 6 || (c->attrs[i].value.programmatic != 0 && c->attrs[i].value.programmatic != 1))
            return INVALID_VALUE;
        if (refuse && c->attrs[i].value.programmatic && S(c->stream)->capturing) {
            S(c->stream)->invalidated = true;
            return NOT_SUPPORTED;
        }
    }
    return cuLaunchKernel(f, c->gx, c->gy, c->gz, c->bx, c->by, c->bz, c->shared, c->stream, params, extra);
}

// Graphs.
CUresult cuStreamBeginCapture_v2(void* s, int) {
    Stream* st = S(s);
    if (st->capturing) return CAPTURE_UNSUPPORTED;
    st->capturing = true;
    st->invalidated = false;
    st->ops.clear();
    capturing_here++;
    return 0;
}
CUresult cuStreamEndCapture(void* s, void** graph) {
    Stream* st = S(s);
    if (!st->capturing) return INVALID_VALUE;
    st->capturing = false;
    capturing_here--;
    *graph = nullptr;
    if (st->invalidated) {
        st->ops.clear();
        return CAPTURE_INVALIDATED;
    }
    *graph = new Graph{std::move(st->ops)};
    st->ops.clear();
    return 0;
}
CUresult cuStreamIsCapturing(void* s, int* status) {
    Stream* st = S(s);
    *status = st->capturing ? (st->invalidated ? 2 : 1) : 0;
    return 0;
}
CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    *exec = new Graph(*(Graph*)graph);
    return 0;
}
// EMU_REPLAY_LAST set: a replayed graph runs only its last kernel (a decode step's pick
// of tokens, from the logits the buffers last held), to time the host's walk of a
// replayed step alone.
CUresult cuGraphLaunch(void* exec, void* s) {
    if (S(s)->capturing) return CAPTURE_UNSUPPORTED;
    static const bool last = std::getenv("EMU_REPLAY_LAST") != nullptr;
    auto& ops = ((Graph*)exec)->ops;
    if (last) {
        if (!ops.empty()) ops.back()();
        return 0;
    }
    for (auto& op : ops) op();
    return 0;
}
CUresult cuGraphUpload(void*, void*) { return 0; }
CUresult cuGraphExecDestroy(void* exec) { delete (Graph*)exec; return 0; }
CUresult cuGraphDestroy(void* graph) { delete (Graph*)graph; return 0; }

CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == OUT_OF_MEMORY          ? "out of memory"
         : e == CAPTURE_UNSUPPORTED  ? "operation not permitted when stream is capturing"
         : e == CAPTURE_INVALIDATED  ? "operation failed due to a previous error during capture"
                                     : "emulated CUDA error";
    return 0;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == OUT_OF_MEMORY          ? "CUDA_ERROR_OUT_OF_MEMORY"
         : e == CAPTURE_UNSUPPORTED  ? "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"
         : e == CAPTURE_INVALIDATED  ? "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"
                                     : "CUDA_ERROR_EMULATED";
    return 0;
}

// cuBLAS: a handle remembers its stream; GEMMs on a stream being captured are recorded.
struct Blas {
    void* stream = nullptr;
};
int cublasCreate_v2(void** h) { *h = new Blas; return 0; }
int cublasDestroy_v2(void* h) { delete (Blas*)h; return 0; }
int cublasSetStream_v2(void* h, void* s) { ((Blas*)h)->stream = s; return 0; }
int cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
int cublasSetMathMode(void*, int) { return 0; }
int cublasSetPointerMode_v2(void*, int) { return 0; }

static float load(const void* p, int type, long i) {
    if (type == 0) return ((const float*)p)[i];
    if (type == 14) return __bfloat162float(((const __nv_bfloat16*)p)[i]);
    std::abort();
}

// C = alpha·op(A)·op(B) + beta·C, column-major, op(A) m×k, op(B) k×n.
static void gemm(int ta, int tb, int m, int n, int k, float alpha, const void* a, int at, int lda,
                 const void* b, int bt, int ldb, float beta, void* c, int ct, int ldc) {
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float s = 0.f;
            for (int p = 0; p < k; p++) {
                float av = ta ? load(a, at, p + (long)i * lda) : load(a, at, i + (long)p * lda);
                float bv = tb ? load(b, bt, j + (long)p * ldb) : load(b, bt, p + (long)j * ldb);
                s += av * bv;
            }
            long ci = i + (long)j * ldc;
            float old = beta == 0.f ? 0.f : load(c, ct, ci);
            float v = alpha * s + beta * old;
            if (ct == 0) ((float*)c)[ci] = v;
            else ((__nv_bfloat16*)c)[ci] = __float2bfloat16(v);
        }
}

// cuBLAS's status codes, and the argument checks it documents for its GEMMs (a call that
// breaks them is refused, not computed): sizes not negative, operations N (0) or T (1),
// leading dimensions at least the rows of the matrix as stored.
enum : int { BLAS_INVALID_VALUE = 7, BLAS_NOT_SUPPORTED = 15 };
static int check_gemm(int ta, int tb, int m, int n, int k, int lda, int ldb, int ldc) {
    auto op = [](int t) { return t == 0 || t == 1; };
    auto at_least = [](int ld, int rows) { return ld >= (rows > 1 ? rows : 1); };
    if (m < 0 || n < 0 || k < 0 || !op(ta) || !op(tb)) return BLAS_INVALID_VALUE;
    if (!at_least(lda, ta ? k : m) || !at_least(ldb, tb ? n : k) || !at_least(ldc, m))
        return BLAS_INVALID_VALUE;
    return 0;
}

int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int at,
                 int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                 int compute, int) {
    if (int e = check_gemm(ta, tb, m, n, k, lda, ldb, ldc)) return e;
    // The pairs the emulation computes, each one cuBLAS supports with CUBLAS_COMPUTE_32F
    // (68): A and B both f32 (0) or both bf16 (14); C f32 or, for bf16 inputs, bf16.
    if (compute != 68 || at != bt || (at != 0 && at != 14) || (ct != 0 && ct != at))
        return BLAS_NOT_SUPPORTED;
    float al = *(const float*)alpha, be = *(const float*)beta;
    return issue(((Blas*)h)->stream,
                 [=] { gemm(ta, tb, m, n, k, al, a, at, lda, b, bt, ldb, be, c, ct, ldc); });
}

int cublasSgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* a, int lda, long long sa, const float* b, int ldb,
                              long long sb, const float* beta, float* c, int ldc, long long sc,
                              int batch) {
    if (int e = check_gemm(ta, tb, m, n, k, lda, ldb, ldc)) return e;
    if (batch < 0) return BLAS_INVALID_VALUE;
    float al = *alpha, be = *beta;
    return issue(((Blas*)h)->stream, [=] {
        for (int i = 0; i < batch; i++)
            gemm(ta, tb, m, n, k, al, a + i * sa, 0, lda, b + i * sb, 0, ldb, be, c + i * sc, 0, ldc);
    });
}

int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* a,
                   int lda, const float* b, int ldb, const float* beta, float* c, int ldc) {
    if (int e = check_gemm(ta, tb, m, n, k, lda, ldb, ldc)) return e;
    float al = *alpha, be = *beta;
    return issue(((Blas*)h)->stream, [=] { gemm(ta, tb, m, n, k, al, a, 0, lda, b, 0, ldb, be, c, 0, ldc); });
}

// NVRTC: the source is not compiled (the kernels are already built for the CPU).
int nvrtcCreateProgram(void** p, const char*, const char*, int, const char* const*, const char* const*) {
    *p = &prog_token;
    return 0;
}
int nvrtcCompileProgram(void*, int, const char* const*) { return 0; }
int nvrtcGetPTXSize(void*, size_t* n) { *n = std::strlen(PTX) + 1; return 0; }
int nvrtcGetPTX(void*, char* out) { std::memcpy(out, PTX, std::strlen(PTX) + 1); return 0; }
int nvrtcGetProgramLogSize(void*, size_t* n) { *n = 1; return 0; }
int nvrtcGetProgramLog(void*, char* out) { out[0] = 0; return 0; }
int nvrtcDestroyProgram(void** p) { *p = nullptr; return 0; }
const char* nvrtcGetErrorString(int) { return "emulated NVRTC"; }
}
