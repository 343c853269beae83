// The parts of the CUDA driver, cuBLAS and NVRTC that the CUDA backend (through cudarc)
// calls, on the CPU: "device" memory is host memory (with a configurable capacity, so
// out-of-memory is reachable), every operation is synchronous, kernels are the emulated
// ones (`emu_launch`), GEMMs follow cuBLAS's column-major definition. Built into three
// libraries named libcuda.so, libcublas.so and libnvrtc.so for tests of the backend on
// machines without a GPU.
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

extern "C" int emu_launch(const char*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
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
int ctx_token, stream_token, module_token, pool_token, event_token, blas_token, prog_token;
const char* PTX = "// emulated: the kernels run on the CPU\n";
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
    *v = attr == 75 ? 9 : attr == 76 ? 0 : attr == 115 ? 1 : 0;
    return 0;
}
CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "CUDA device emulated on the CPU");
    return 0;
}
CUresult cuDeviceTotalMem_v2(size_t* b, int) { *b = capacity(); return 0; }
CUresult cuCtxGetCurrent(void** c) { *c = current_ctx; return 0; }
CUresult cuCtxSetCurrent(void* c) { current_ctx = c; return 0; }
CUresult cuCtxSynchronize() { return 0; }
CUresult cuStreamCreate(void** s, unsigned) { *s = &stream_token; return 0; }
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) { *s = &stream_token; return 0; }
CUresult cuStreamDestroy_v2(void*) { return 0; }
CUresult cuStreamSynchronize(void*) { return 0; }
CUresult cuStreamQuery(void*) { return 0; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return 0; }
CUresult cuEventCreate(void** e, unsigned) { *e = new int(0); return 0; }
CUresult cuEventRecord(void*, void*) { return 0; }
CUresult cuEventSynchronize(void*) { return 0; }
CUresult cuEventQuery(void*) { return 0; }
CUresult cuEventElapsedTime(float* ms, void*, void*) { *ms = 1.0f; return 0; }
CUresult cuEventDestroy_v2(void* e) { delete (int*)e; return 0; }
CUresult cuModuleLoadData(void** m, const void*) { *m = &module_token; return 0; }
CUresult cuModuleUnload(void*) { return 0; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    if (!emu_has_kernel(name)) return 500;
    *f = strdup(name);
    return 0;
}
CUresult cuFuncGetAttribute(int* v, int, void*) { *v = 0; return 0; }
CUresult cuFuncSetAttribute(void*, int, int) { return 0; }
CUresult cuDeviceGetDefaultMemPool(void** p, int) { *p = &pool_token; return 0; }
CUresult cuMemPoolSetAttribute(void*, int, void*) { return 0; }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    std::lock_guard<std::mutex> g(mem_lock);
    if (used + bytes > capacity()) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    void* m = std::aligned_alloc(256, ((bytes + 255) / 256) * 256 + 256);
    if (!m) return 2;
    *p = (CUdeviceptr)m;
    live[*p] = bytes;
    used += bytes;
    return 0;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(mem_lock);
    auto it = live.find(p);
    if (it == live.end()) return 1;
    used -= it->second;
    live.erase(it);
    std::free((void*)p);
    return 0;
}
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    std::lock_guard<std::mutex> g(mem_lock);
    *total = capacity();
    *free_b = capacity() > used ? capacity() - used : 0;
    return 0;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) { std::memset((void*)d, v, n); return 0; }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { std::memset((void*)d, v, n); return 0; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) { std::memcpy((void*)d, s, n); return 0; }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) { std::memcpy((void*)d, s, n); return 0; }
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) { std::memcpy(d, (const void*)s, n); return 0; }
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) { std::memcpy(d, (const void*)s, n); return 0; }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { std::memmove((void*)d, (const void*)s, n); return 0; }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { std::memmove((void*)d, (const void*)s, n); return 0; }
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, void*, void** params, void**) {
    return emu_launch((const char*)f, gx, gy, gz, bx, by, bz, shared, params) == 0 ? 0 : 400;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == 2 ? "out of memory" : "emulated CUDA error";
    return 0;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == 2 ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_EMULATED";
    return 0;
}

// cuBLAS
int cublasCreate_v2(void** h) { *h = &blas_token; return 0; }
int cublasDestroy_v2(void*) { return 0; }
int cublasSetStream_v2(void*, void*) { return 0; }
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

int cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int at,
                 int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct, int ldc,
                 int, int) {
    gemm(ta, tb, m, n, k, *(const float*)alpha, a, at, lda, b, bt, ldb, *(const float*)beta, c, ct, ldc);
    return 0;
}

int cublasSgemmStridedBatched(void*, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* a, int lda, long long sa, const float* b, int ldb,
                              long long sb, const float* beta, float* c, int ldc, long long sc,
                              int batch) {
    for (int i = 0; i < batch; i++)
        gemm(ta, tb, m, n, k, *alpha, a + i * sa, 0, lda, b + i * sb, 0, ldb, *beta, c + i * sc, 0, ldc);
    return 0;
}

int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha, const float* a,
                   int lda, const float* b, int ldb, const float* beta, float* c, int ldc) {
    gemm(ta, tb, m, n, k, *alpha, a, 0, lda, b, 0, ldb, *beta, c, 0, ldc);
    return 0;
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
