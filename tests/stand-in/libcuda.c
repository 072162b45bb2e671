/* A stand-in for the CUDA driver (libcuda.so) that runs ema-tool's kernels on the CPU, so that
 * `--device cuda` can be tested end to end on a machine without a GPU: tests/cuda.rs and
 * `bench/gpu-check.sh` (STAND_IN=1) build it with the host C compiler and put it on
 * LD_LIBRARY_PATH.
 *
 *   cc -shared -fPIC -O2 -ffp-contract=off -I src/fold/cuda -o DIR/libcuda.so tests/stand-in/libcuda.c
 *
 * It answers the driver calls that cudarc makes for ema-tool, one device (compute capability
 * 8.0), and runs every stream operation when it is queued, in order: device memory is host
 * memory, copies are memcpy, a launch runs the kernels of kernels.cu (compiled here as C, as
 * the packing tests do) one block and one thread at a time, events are done when recorded.
 * It checks what it can: the module is the embedded PTX (cuModuleLoadData, with both
 * entries), a launch has the kernels' geometry, and every copy and memset stays within one
 * allocation (else CUDA_ERROR_INVALID_VALUE, with a line on stderr).
 *
 * Environment: EMA_STAND_IN_FREE (bytes of device memory reported free and allocatable;
 * default 80 GiB), EMA_STAND_IN_LOG (a file to which each module load and launch appends a
 * line).
 */
#define EMA_HOST_TEST 1
#include "kernels.cu"

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef u64 CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;

enum {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    NOT_FOUND = 500,
    INVALID_HANDLE = 400,
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- allocations ------------------------------------------------------------------------- */

typedef struct {
    u8* p;
    size_t n;
    int device; /* 1: device memory, 0: pinned host memory */
} Alloc;

static Alloc* allocs;
static size_t nallocs, cap_allocs, device_used;

static size_t total_bytes(void) { return (size_t)80 << 30; }

static size_t free_limit(void) {
    const char* s = getenv("EMA_STAND_IN_FREE");
    return s ? (size_t)strtoull(s, NULL, 10) : total_bytes();
}

static void note(const char* fmt, ...) {
    const char* path = getenv("EMA_STAND_IN_LOG");
    if (!path) return;
    FILE* f = fopen(path, "a");
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

static CUresult alloc(void** out, size_t n, int device) {
    pthread_mutex_lock(&lock);
    if (device && device_used + n > free_limit()) {
        pthread_mutex_unlock(&lock);
        return OUT_OF_MEMORY;
    }
    u8* p = (u8*)malloc(n ? n : 1);
    if (!p) {
        pthread_mutex_unlock(&lock);
        return OUT_OF_MEMORY;
    }
    if (nallocs == cap_allocs) {
        cap_allocs = cap_allocs ? 2 * cap_allocs : 64;
        allocs = (Alloc*)realloc(allocs, cap_allocs * sizeof(Alloc));
    }
    allocs[nallocs++] = (Alloc){p, n, device};
    if (device) device_used += n;
    pthread_mutex_unlock(&lock);
    *out = p;
    return OK;
}

static CUresult release(void* p, int device) {
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nallocs; i++) {
        if (allocs[i].p == p && allocs[i].device == device) {
            if (device) device_used -= allocs[i].n;
            free(p);
            allocs[i] = allocs[--nallocs];
            pthread_mutex_unlock(&lock);
            return OK;
        }
    }
    pthread_mutex_unlock(&lock);
    fprintf(stderr, "stand-in libcuda: freeing %p, which is no allocation\n", p);
    return INVALID_VALUE;
}

/* Whether [p, p + n) lies within one allocation of the kind (device, or -1: host memory that
 * is pinned or not, which the driver accepts for copies). */
static int within(const void* p, size_t n, int device) {
    const u8* q = (const u8*)p;
    int found = device < 0; /* pageable host memory is fine for a copy */
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nallocs; i++) {
        if (device >= 0 && allocs[i].device != device) continue;
        if (q >= allocs[i].p && q <= allocs[i].p + allocs[i].n) {
            found = q + n <= allocs[i].p + allocs[i].n;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return found;
}

static CUresult bad(const char* what, const void* p, size_t n) {
    fprintf(stderr, "stand-in libcuda: %s of %zu bytes at %p outside any allocation\n", what, n, p);
    return INVALID_VALUE;
}

/* ---- driver, device, context ------------------------------------------------------------- */

static int dummy_ctx, dummy_stream, dummy_event, dummy_module;
static __thread CUcontext current;

CUresult cuInit(unsigned int flags) { (void)flags; return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 13020; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }

CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    (void)d;
    snprintf(name, (size_t)len, "ema-tool stand-in (CPU)");
    return OK;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) { (void)d; *bytes = total_bytes(); return OK; }

CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    (void)d;
    switch (attr) {
    case 1: /* MAX_THREADS_PER_BLOCK */
    case 2: case 3: /* MAX_BLOCK_DIM_X, Y */ *v = 1024; break;
    case 4: *v = 64; break;
    case 5: *v = 0x7fffffff; break; /* MAX_GRID_DIM_X */
    case 6: case 7: *v = 65535; break;
    case 16: *v = 4; break;  /* MULTIPROCESSOR_COUNT */
    case 75: *v = 8; break;  /* COMPUTE_CAPABILITY_MAJOR */
    case 76: *v = 0; break;  /* COMPUTE_CAPABILITY_MINOR */
    case 115: *v = 0; break; /* MEMORY_POOLS_SUPPORTED: plain cuMemAlloc */
    default: *v = 0;
    }
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) { (void)d; *c = &dummy_ctx; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { (void)d; return OK; }
CUresult cuCtxSetCurrent(CUcontext c) { current = c; return OK; }
CUresult cuCtxGetCurrent(CUcontext* c) { *c = current; return OK; }
CUresult cuCtxSynchronize(void) { return OK; }

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    pthread_mutex_lock(&lock);
    size_t limit = free_limit();
    *free_bytes = limit > device_used ? limit - device_used : 0;
    pthread_mutex_unlock(&lock);
    *total = total_bytes();
    return OK;
}

/* ---- memory ------------------------------------------------------------------------------ */

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) { return alloc((void**)p, n, 1); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream s) { (void)s; return alloc((void**)p, n, 1); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release((void*)(uintptr_t)p, 1); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) { (void)s; return release((void*)(uintptr_t)p, 1); }
CUresult cuMemHostAlloc(void** p, size_t n, unsigned int flags) { (void)flags; return alloc(p, n, 0); }
CUresult cuMemFreeHost(void* p) { return release(p, 0); }

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    (void)s;
    void* d = (void*)(uintptr_t)dst;
    if (!within(d, n, 1)) return bad("copy to the device", d, n);
    if (!within(src, n, -1)) return bad("copy from the host", src, n);
    memcpy(d, src, n);
    return OK;
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    (void)s;
    void* p = (void*)(uintptr_t)src;
    if (!within(p, n, 1)) return bad("copy from the device", p, n);
    memcpy(dst, p, n);
    return OK;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) { return cuMemcpyHtoDAsync_v2(dst, src, n, NULL); }
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, NULL); }

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    (void)s;
    void* d = (void*)(uintptr_t)dst;
    if (!within(d, n, 1)) return bad("memset", d, n);
    memset(d, v, n);
    return OK;
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return cuMemsetD8Async(dst, v, n, NULL); }

/* ---- streams and events: every operation is done when it is queued ------------------------ */

CUresult cuStreamCreate(CUstream* s, unsigned int flags) { (void)flags; *s = &dummy_stream; return OK; }
CUresult cuStreamDestroy_v2(CUstream s) { (void)s; return OK; }
CUresult cuStreamSynchronize(CUstream s) { (void)s; return OK; }
CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned int flags) { (void)s; (void)e; (void)flags; return OK; }
CUresult cuEventCreate(CUevent* e, unsigned int flags) { (void)flags; *e = &dummy_event; return OK; }
CUresult cuEventDestroy_v2(CUevent e) { (void)e; return OK; }
CUresult cuEventRecord(CUevent e, CUstream s) { (void)e; (void)s; return OK; }
CUresult cuEventSynchronize(CUevent e) { (void)e; return OK; }
CUresult cuEventQuery(CUevent e) { (void)e; return OK; }

/* ---- module and kernels ------------------------------------------------------------------ */

enum { F_ACCUMULATE = 1, F_ENCODE = 2 };
static int functions[3];

CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    const char* ptx = (const char*)image;
    static const char head[] = "// Generated from kernels.cu by gen_ptx.py";
    if (strncmp(ptx, head, sizeof head - 1) != 0 || !strstr(ptx, "\n.target sm_") ||
        !strstr(ptx, ".visible .entry ema_accumulate(") ||
        !strstr(ptx, ".visible .entry ema_encode(")) {
        fprintf(stderr, "stand-in libcuda: the module image is not kernels.ptx\n");
        return INVALID_IMAGE;
    }
    note("module ptx %zu bytes", strlen(ptx));
    *m = &dummy_module;
    return OK;
}

CUresult cuModuleUnload(CUmodule m) { (void)m; return OK; }

CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    (void)m;
    if (!strcmp(name, "ema_accumulate")) *f = &functions[F_ACCUMULATE];
    else if (!strcmp(name, "ema_encode")) *f = &functions[F_ENCODE];
    else return NOT_FOUND;
    return OK;
}

#define ARG(T, i) (*(T*)params[i])
#define PTR(T, i) ((T)(uintptr_t)ARG(u64, i))

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream s, void** params,
                        void** extra) {
    (void)s;
    if (gy != 1 || gz != 1 || bx != BLOCK || by != 1 || bz != 1 || shared != 0 || extra) {
        fprintf(stderr, "stand-in libcuda: launch of %ux%ux%u blocks of %ux%ux%u\n", gx, gy, gz,
                bx, by, bz);
        return INVALID_VALUE;
    }
    /* blockIdx and threadIdx are the kernels' globals: one launch at a time. */
    pthread_mutex_lock(&lock);
    if (f == &functions[F_ACCUMULATE]) {
        note("launch ema_accumulate %u blocks, %u segments", gx, ARG(u32, 1));
        for (u32 b = 0; b < gx; b++)
            for (u32 t = 0; t < BLOCK; t++) {
                blockIdx.x = b;
                threadIdx.x = t;
                ema_accumulate(PTR(const u8*, 0), ARG(u32, 1), ARG(u32, 2), PTR(double*, 3),
                               ARG(u64, 4));
            }
    } else if (f == &functions[F_ENCODE]) {
        note("launch ema_encode %u blocks, %u segments", gx, ARG(u32, 1));
        for (u32 b = 0; b < gx; b++)
            for (u32 t = 0; t < BLOCK; t++) {
                blockIdx.x = b;
                threadIdx.x = t;
                ema_encode(PTR(const u8*, 0), ARG(u32, 1), PTR(const double*, 2),
                           PTR(u8*, 3), PTR(u32*, 4), ARG(u32, 5));
            }
    } else {
        pthread_mutex_unlock(&lock);
        return INVALID_HANDLE;
    }
    pthread_mutex_unlock(&lock);
    return OK;
}

/* ---- errors ------------------------------------------------------------------------------ */

static const char* error_name(CUresult e) {
    switch (e) {
    case OK: return "CUDA_SUCCESS";
    case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    default: return "CUDA_ERROR_UNKNOWN";
    }
}

CUresult cuGetErrorName(CUresult e, const char** s) { *s = error_name(e); return OK; }

CUresult cuGetErrorString(CUresult e, const char** s) {
    switch (e) {
    case OUT_OF_MEMORY: *s = "out of memory"; break;
    case INVALID_VALUE: *s = "invalid argument"; break;
    case INVALID_IMAGE: *s = "device kernel image is invalid"; break;
    default: *s = error_name(e);
    }
    return OK;
}
