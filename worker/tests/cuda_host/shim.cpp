// The CPU standing in for GPUs: the parts of the CUDA driver API, cuBLAS, NVRTC and NCCL that
// the CUDA backend and the nccl data plane call (through cudarc), on host memory, with the
// backend's own kernels compiled for the CPU under `cuda_host.h`. `build_shim.sh` builds it as
// libcuda.so, libcublas.so, libnvrtc.so and libnccl.so in one directory; with that directory as
// LD_LIBRARY_PATH, the GPU tests (`tests/gpu.rs`) run the whole CUDA backend here: its
// allocations, copies, page tables, launch arguments and cuBLAS shapes (leading dimensions,
// transposes, offsets), against the CPU backend and the transformers goldens; and NCCL's
// grouped sends and receives between the ranks of one process, which complete in the
// background as a GPU's would, so that waiting on them, their deadlines and aborts run too.
// CUDA_HOST_DEVICES says how many devices there are (1 when unset); CUDA_HOST_FAIL_AFTER=N makes
// the process's kernel launch after the first N fail, as a GPU that faults mid-step does (once:
// a worker started again gets a new context), and with CUDA_HOST_BROKEN=FILE it breaks the GPU
// for good: the failure creates FILE, and while FILE exists every launch of every process fails.
//
// What it shows: that the backend asks the driver, cuBLAS and NCCL for the right things in the
// right order. What it does not: anything about a GPU's memory model, concurrency or timing, or
// the real libraries; "device" memory is host memory, every call but NCCL's completes before it
// returns, and the device names itself a stand-in.
#include "cuda_host.h"  // first: it sets what the system headers see

#include <dlfcn.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

namespace {
constexpr int kSuccess = 0;
constexpr int kInvalidValue = 1;
constexpr int kInvalidDevice = 101;
constexpr int kNotFound = 500;
constexpr int kNotReady = 600;
constexpr size_t kTotalMemory = size_t(16) << 30;

std::mutex allocations_lock;
std::unordered_map<uintptr_t, size_t> allocations;
size_t allocated = 0;

int contexts[64];
thread_local void* current_context = nullptr;

int device_count() {
    const char* set = std::getenv("CUDA_HOST_DEVICES");
    int n = set ? std::atoi(set) : 1;
    return n < 1 ? 1 : (n > 64 ? 64 : n);
}

// A stream: the work given to it completes in order. Everything but NCCL's groups runs when it
// is given, after what the stream has pending; a group counts as pending until its receives
// have arrived.
struct Stream {
    std::mutex lock;
    std::condition_variable changed;
    uint64_t issued = 0, done = 0;

    void drain() {
        std::unique_lock<std::mutex> guard(lock);
        changed.wait(guard, [&] { return done >= issued; });
    }
};
Stream default_stream;
Stream* stream_of(void* s) { return s ? static_cast<Stream*>(s) : &default_stream; }

struct Event {
    Stream* stream = nullptr;
    uint64_t at = 0;
};

void* allocate(size_t bytes) {
    size_t rounded = (bytes + 255) / 256 * 256;
    void* p = std::aligned_alloc(256, rounded == 0 ? 256 : rounded);
    if (!p) return nullptr;
    std::lock_guard<std::mutex> guard(allocations_lock);
    allocations[reinterpret_cast<uintptr_t>(p)] = rounded;
    allocated += rounded;
    return p;
}

int release(uintptr_t p) {
    std::lock_guard<std::mutex> guard(allocations_lock);
    auto at = allocations.find(p);
    if (at == allocations.end()) return kInvalidValue;
    allocated -= at->second;
    allocations.erase(at);
    std::free(reinterpret_cast<void*>(p));
    return kSuccess;
}

// A launch_NAME of this library (`MOEBIUS_EXPORT`), found by name.
using Launch = void (*)(const unsigned*, const unsigned*, void**);
Launch find_launch(const char* name) {
    Dl_info self;
    if (!dladdr(reinterpret_cast<void*>(&find_launch), &self)) return nullptr;
    void* library = dlopen(self.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!library) return nullptr;
    std::string symbol = std::string("launch_") + name;
    auto launch = reinterpret_cast<Launch>(dlsym(library, symbol.c_str()));
    dlclose(library);
    return launch;
}

struct Program {
    std::string source;
};

// op(M) of cuBLAS' column-major M (leading dimension ld) as `rows` dense rows of `len` f32
// values: element (r, c) of op(M) at r * len + c when `along_rows`, else its transpose.
std::vector<float> dense(const void* m, int type, bool transposed, long rows, long cols, long ld,
                         bool along_rows) {
    std::vector<float> out(size_t(rows * cols));
    for (long r = 0; r < rows; r++) {
        for (long c = 0; c < cols; c++) {
            long at = transposed ? c + r * ld : r + c * ld;
            float v;
            if (type == 0) {  // CUDA_R_32F
                v = static_cast<const float*>(m)[at];
            } else {  // CUDA_R_16BF
                uint32_t wide = uint32_t(static_cast<const uint16_t*>(m)[at]) << 16;
                std::memcpy(&v, &wide, 4);
            }
            out[size_t(along_rows ? r * cols + c : c * rows + r)] = v;
        }
    }
    return out;
}
}  // namespace

extern "C" {
// The driver.
int cuInit(unsigned) { return kSuccess; }
int cuDriverGetVersion(int* version) {
    *version = 12080;
    return kSuccess;
}
int cuDeviceGetCount(int* count) {
    *count = device_count();
    return kSuccess;
}
int cuDeviceGet(int* device, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return kInvalidDevice;
    *device = ordinal;
    return kSuccess;
}
int cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, size_t(len), "cuda_host: the CPU standing in for a GPU");
    return kSuccess;
}
int cuDeviceGetAttribute(int* value, int attribute, int) {
    switch (attribute) {
        case 75: *value = 9; break;  // compute capability 9.0
        case 76: *value = 0; break;
        default: *value = 0;         // no memory pools: cudarc allocates synchronously
    }
    return kSuccess;
}
int cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = kTotalMemory;
    return kSuccess;
}
int cuDevicePrimaryCtxRetain(void** context, int device) {
    *context = &contexts[device];
    return kSuccess;
}
int cuDevicePrimaryCtxRelease_v2(int) { return kSuccess; }
int cuCtxGetCurrent(void** context) {
    *context = current_context;
    return kSuccess;
}
int cuCtxSetCurrent(void* context) {
    current_context = context;
    return kSuccess;
}
int cuCtxSynchronize() {
    default_stream.drain();
    return kSuccess;
}
int cuStreamCreate(void** stream, unsigned) {
    *stream = new Stream;
    return kSuccess;
}
// A destroyed stream is kept: an event or a group's receives may still look at it.
int cuStreamDestroy_v2(void* stream) {
    stream_of(stream)->drain();
    return kSuccess;
}
int cuStreamSynchronize(void* stream) {
    stream_of(stream)->drain();
    return kSuccess;
}
int cuEventCreate(void** event, unsigned) {
    *event = new Event;
    return kSuccess;
}
int cuEventRecord(void* event, void* stream) {
    Event* e = static_cast<Event*>(event);
    e->stream = stream_of(stream);
    std::lock_guard<std::mutex> guard(e->stream->lock);
    e->at = e->stream->issued;
    return kSuccess;
}
int cuEventQuery(void* event) {
    Event* e = static_cast<Event*>(event);
    if (!e->stream) return kSuccess;
    std::lock_guard<std::mutex> guard(e->stream->lock);
    return e->stream->done >= e->at ? kSuccess : kNotReady;
}
int cuEventSynchronize(void* event) {
    Event* e = static_cast<Event*>(event);
    if (!e->stream) return kSuccess;
    std::unique_lock<std::mutex> guard(e->stream->lock);
    e->stream->changed.wait(guard, [&] { return e->stream->done >= e->at; });
    return kSuccess;
}
int cuStreamWaitEvent(void*, void* event, unsigned) { return cuEventSynchronize(event); }
int cuEventDestroy_v2(void* event) {
    delete static_cast<Event*>(event);
    return kSuccess;
}
int cuMemAlloc_v2(uint64_t* pointer, size_t bytes) {
    void* p = allocate(bytes);
    if (!p) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    *pointer = reinterpret_cast<uint64_t>(p);
    return kSuccess;
}
int cuMemFree_v2(uint64_t pointer) { return release(pointer); }
int cuMemGetInfo_v2(size_t* free, size_t* total) {
    std::lock_guard<std::mutex> guard(allocations_lock);
    *total = kTotalMemory;
    *free = allocated < kTotalMemory ? kTotalMemory - allocated : 0;
    return kSuccess;
}
int cuMemsetD8Async(uint64_t pointer, unsigned char value, size_t count, void* stream) {
    stream_of(stream)->drain();
    std::memset(reinterpret_cast<void*>(pointer), value, count);
    return kSuccess;
}
int cuMemsetD8_v2(uint64_t pointer, unsigned char value, size_t count) {
    return cuMemsetD8Async(pointer, value, count, nullptr);
}
int cuMemcpyHtoDAsync_v2(uint64_t to, const void* from, size_t bytes, void* stream) {
    stream_of(stream)->drain();
    std::memcpy(reinterpret_cast<void*>(to), from, bytes);
    return kSuccess;
}
int cuMemcpyHtoD_v2(uint64_t to, const void* from, size_t bytes) {
    return cuMemcpyHtoDAsync_v2(to, from, bytes, nullptr);
}
int cuMemcpyDtoHAsync_v2(void* to, uint64_t from, size_t bytes, void* stream) {
    stream_of(stream)->drain();
    std::memcpy(to, reinterpret_cast<const void*>(from), bytes);
    return kSuccess;
}
int cuMemcpyDtoH_v2(void* to, uint64_t from, size_t bytes) {
    return cuMemcpyDtoHAsync_v2(to, from, bytes, nullptr);
}
int cuMemcpyDtoDAsync_v2(uint64_t to, uint64_t from, size_t bytes, void* stream) {
    stream_of(stream)->drain();
    std::memmove(reinterpret_cast<void*>(to), reinterpret_cast<const void*>(from), bytes);
    return kSuccess;
}
int cuMemcpyDtoD_v2(uint64_t to, uint64_t from, size_t bytes) {
    return cuMemcpyDtoDAsync_v2(to, from, bytes, nullptr);
}
int cuModuleLoadData(void** module, const void*) {
    *module = &contexts[0];
    return kSuccess;
}
int cuModuleUnload(void*) { return kSuccess; }
int cuModuleGetFunction(void** function, void*, const char* name) {
    Launch launch = find_launch(name);
    if (!launch) return kNotFound;
    *function = reinterpret_cast<void*>(launch);
    return kSuccess;
}
int cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                   unsigned by, unsigned bz, unsigned shared_bytes, void* stream, void** params,
                   void**) {
    if (shared_bytes != 0) return kInvalidValue;  // no dynamic shared memory here
    static std::atomic<long> launches{0};
    static const char* fail_after = std::getenv("CUDA_HOST_FAIL_AFTER");
    static const char* broken = std::getenv("CUDA_HOST_BROKEN");
    constexpr int kLaunchFailed = 719;  // CUDA_ERROR_LAUNCH_FAILED
    if (broken != nullptr && access(broken, F_OK) == 0) return kLaunchFailed;
    if (fail_after != nullptr && launches++ == std::atol(fail_after)) {
        if (broken != nullptr) std::fclose(std::fopen(broken, "w"));  // broken for good
        return kLaunchFailed;
    }
    stream_of(stream)->drain();
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    reinterpret_cast<Launch>(function)(grid, block, params);
    return kSuccess;
}
int cuGetErrorString(int, const char** text) {
    *text = "cuda_host: a call the CPU stand-in refused";
    return kSuccess;
}
int cuGetErrorName(int, const char** text) {
    *text = "CUDA_HOST_ERROR";
    return kSuccess;
}

// NVRTC: the "PTX" is the source, which cuModuleLoadData does not read.
int nvrtcVersion(int* major, int* minor) {
    *major = 12;
    *minor = 8;
    return 0;
}
int nvrtcCreateProgram(Program** program, const char* source, const char*, int,
                       const char* const*, const char* const*) {
    *program = new Program{source};
    return 0;
}
int nvrtcCompileProgram(Program*, int, const char* const*) { return 0; }
int nvrtcGetPTXSize(Program* program, size_t* size) {
    *size = program->source.size() + 1;
    return 0;
}
int nvrtcGetPTX(Program* program, char* ptx) {
    std::memcpy(ptx, program->source.c_str(), program->source.size() + 1);
    return 0;
}
int nvrtcGetProgramLogSize(Program*, size_t* size) {
    *size = 1;
    return 0;
}
int nvrtcGetProgramLog(Program*, char* log) {
    log[0] = 0;
    return 0;
}
int nvrtcDestroyProgram(Program** program) {
    delete *program;
    *program = nullptr;
    return 0;
}

// cuBLAS: column-major C = alpha op(A) op(B) + beta C, f32 or bf16 operands, f32 results
// accumulated in f32.
int cublasCreate_v2(void** handle) {
    *handle = new void*(nullptr);  // its stream
    return 0;
}
int cublasDestroy_v2(void* handle) {
    delete static_cast<void**>(handle);
    return 0;
}
int cublasSetStream_v2(void* handle, void* stream) {
    *static_cast<void**>(handle) = stream;
    return 0;
}
int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha,
                 const void* a, int a_type, int lda, const void* b, int b_type, int ldb,
                 const void* beta, void* c, int c_type, int ldc, int compute, int) {
    const int ok_types[] = {0, 14};  // CUDA_R_32F, CUDA_R_16BF
    auto known = [&](int t) { return t == ok_types[0] || t == ok_types[1]; };
    if (!known(a_type) || !known(b_type) || c_type != 0 || compute != 68) {
        return 7;  // CUBLAS_STATUS_INVALID_VALUE; 68 is CUBLAS_COMPUTE_32F
    }
    if (m < 0 || n < 0 || k < 0 || lda < (transa ? k : m) || ldb < (transb ? n : k) ||
        ldc < m) {
        return 7;
    }
    stream_of(*static_cast<void**>(handle))->drain();
    float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    float* out = static_cast<float*>(c);
    // op(A) as m rows of k, op(B) as n rows of k (its transpose): dot products of rows.
    std::vector<float> rows_a = dense(a, a_type, transa != 0, m, k, lda, true);
    std::vector<float> rows_b = dense(b, b_type, transb != 0, k, n, ldb, false);
    for (long j = 0; j < n; j++) {
        const float* bj = rows_b.data() + j * k;
        for (long i = 0; i < m; i++) {
            const float* ai = rows_a.data() + i * k;
            float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            long l = 0;
            for (; l + 8 <= k; l += 8)
                for (int u = 0; u < 8; u++) part[u] += ai[l + u] * bj[l + u];
            float sum = 0.0f;
            for (; l < k; l++) sum += ai[l] * bj[l];
            for (float p : part) sum += p;
            float& slot = out[i + j * long(ldc)];
            slot = al * sum + (be == 0.0f ? 0.0f : be * slot);
        }
    }
    return 0;
}

// CUBLAS_VERSION as the library reports it (major * 10000 + minor * 100 + patch): 12.8, or
// CUDA_HOST_CUBLAS_VERSION's, to stand in for an older cuBLAS.
int cublasGetVersion_v2(void*, int* version) {
    const char* forced = std::getenv("CUDA_HOST_CUBLAS_VERSION");
    *version = forced && *forced ? std::atoi(forced) : 120800;
    return 0;
}

// `batch` products of one shape, each cublasGemmEx's, from device arrays of their operands'
// addresses (host memory here, read once the stream has written them).
int cublasGemmBatchedEx(void* handle, int transa, int transb, int m, int n, int k,
                        const void* alpha, const void* const* a, int a_type, int lda,
                        const void* const* b, int b_type, int ldb, const void* beta,
                        void* const* c, int c_type, int ldc, int batch, int compute, int algo) {
    if (batch < 0) return 7;
    stream_of(*static_cast<void**>(handle))->drain();
    for (int i = 0; i < batch; i++) {
        int status = cublasGemmEx(handle, transa, transb, m, n, k, alpha, a[i], a_type, lda, b[i],
                                  b_type, ldb, beta, c[i], c_type, ldc, compute, algo);
        if (status != 0) return status;
    }
    return 0;
}

// Groups of products, each group its own shape (host arrays, one entry per group) and
// group_size[g] products, whose operands' addresses lie in device arrays (host memory here,
// read once the stream has written them), group after group. cuBLAS 12.5 and later.
int cublasGemmGroupedBatchedEx(void* handle, const int* transa, const int* transb, const int* m,
                               const int* n, const int* k, const void* alpha,
                               const void* const* a, int a_type, const int* lda,
                               const void* const* b, int b_type, const int* ldb,
                               const void* beta, void* const* c, int c_type, const int* ldc,
                               int groups, const int* group_size, int compute) {
    int version = 0;
    cublasGetVersion_v2(handle, &version);
    if (version < 120500) return 7;  // the library has no such function
    if (groups < 0 || a_type != 0 || b_type != 0 || c_type != 0) return 7;  // f32 only here
    stream_of(*static_cast<void**>(handle))->drain();
    long at = 0;
    for (int g = 0; g < groups; g++) {
        const float* al = static_cast<const float*>(alpha) + g;
        const float* be = static_cast<const float*>(beta) + g;
        for (int i = 0; i < group_size[g]; i++, at++) {
            int status = cublasGemmEx(handle, transa[g], transb[g], m[g], n[g], k[g], al, a[at],
                                      a_type, lda[g], b[at], b_type, ldb[g], be, c[at], c_type,
                                      ldc[g], compute, 0);
            if (status != 0) return status;
        }
    }
    return 0;
}
}

// NCCL between the ranks of this process: a group's sends are posted when it ends, its
// receives complete in the background when their messages arrive, in the order each pair
// sent them, and the stream counts the group as pending until then.
namespace {
constexpr int kNcclSuccess = 0, kNcclSystemError = 2, kNcclInvalidArgument = 4,
              kNcclInvalidUsage = 5;

struct Clique {
    int world = 0;
    int joined = 0;
    std::mutex lock;
    std::condition_variable changed;
    std::map<std::pair<int, int>, std::deque<std::vector<uint8_t>>> mail;  // (from, to)
};

struct Comm {
    std::shared_ptr<Clique> clique;
    int rank = 0;
    std::atomic<bool> stopped{false};  // aborted or destroyed: its waits end
    std::atomic<int> error{kNcclSuccess};
};

struct Op {
    bool send;
    uint8_t* buffer;
    size_t bytes;
    int peer;
    Comm* comm;
    Stream* stream;
};

std::mutex cliques_lock;
std::map<std::string, std::shared_ptr<Clique>> cliques;
std::atomic<uint64_t> next_id{1};
thread_local int group_depth = 0;
thread_local std::vector<Op> group_ops;

void run_group(std::vector<Op> ops) {
    std::vector<Op> recvs;
    for (Op& op : ops) {
        if (!op.send) {
            recvs.push_back(op);
            continue;
        }
        op.stream->drain();
        Clique& c = *op.comm->clique;
        std::lock_guard<std::mutex> guard(c.lock);
        c.mail[{op.comm->rank, op.peer}].emplace_back(op.buffer, op.buffer + op.bytes);
        c.changed.notify_all();
    }
    if (ops.empty()) return;
    Stream* stream = ops.front().stream;
    {
        std::lock_guard<std::mutex> guard(stream->lock);
        stream->issued++;
    }
    std::thread([recvs, stream] {
        for (const Op& op : recvs) {
            Clique& c = *op.comm->clique;
            std::unique_lock<std::mutex> guard(c.lock);
            auto& box = c.mail[{op.peer, op.comm->rank}];
            while (box.empty() && !op.comm->stopped) {
                c.changed.wait_for(guard, std::chrono::milliseconds(10));
            }
            if (box.empty()) break;  // stopped: the rest never arrive
            std::vector<uint8_t> message = std::move(box.front());
            box.pop_front();
            if (message.size() != op.bytes) op.comm->error = kNcclInvalidUsage;
            std::memcpy(op.buffer, message.data(), std::min(message.size(), op.bytes));
        }
        std::lock_guard<std::mutex> guard(stream->lock);
        stream->done++;
        stream->changed.notify_all();
    }).detach();
}

int enqueue(bool send, void* buffer, size_t count, int type, int peer, Comm* comm,
            void* stream) {
    if (type != 0 && type != 1) return kNcclInvalidArgument;  // ncclInt8, ncclUint8
    if (peer < 0 || peer >= comm->clique->world) return kNcclInvalidArgument;
    if (comm->stopped) return kNcclInvalidUsage;
    Op op{send, static_cast<uint8_t*>(buffer), count, peer, comm, stream_of(stream)};
    if (group_depth == 0) {
        run_group({op});
    } else {
        group_ops.push_back(op);
    }
    return kNcclSuccess;
}
}  // namespace

extern "C" {
struct NcclUniqueId {
    char internal[128];
};

int ncclGetVersion(int* version) {
    *version = 22005;
    return kNcclSuccess;
}
const char* ncclGetErrorString(int) { return "cuda_host: NCCL's stand-in refused the call"; }
int ncclGetUniqueId(NcclUniqueId* id) {
    std::memset(id->internal, 0, sizeof id->internal);
    std::snprintf(id->internal, sizeof id->internal, "cuda_host nccl %llu",
                  static_cast<unsigned long long>(next_id++));
    return kNcclSuccess;
}
int ncclCommInitRank(Comm** comm, int world, NcclUniqueId id, int rank) {
    if (world < 1 || rank < 0 || rank >= world) return kNcclInvalidArgument;
    std::shared_ptr<Clique> clique;
    {
        std::lock_guard<std::mutex> guard(cliques_lock);
        auto& slot = cliques[std::string(id.internal, sizeof id.internal)];
        if (!slot) {
            slot = std::make_shared<Clique>();
            slot->world = world;
        }
        clique = slot;
    }
    if (clique->world != world) return kNcclInvalidUsage;
    std::unique_lock<std::mutex> guard(clique->lock);
    clique->joined++;
    clique->changed.notify_all();
    // Every rank joins before any returns, as NCCL's bootstrap does.
    if (!clique->changed.wait_for(guard, std::chrono::seconds(60),
                                  [&] { return clique->joined >= clique->world; })) {
        return kNcclSystemError;
    }
    *comm = new Comm{clique, rank};
    return kNcclSuccess;
}
int ncclGroupStart() {
    group_depth++;
    return kNcclSuccess;
}
int ncclGroupEnd() {
    if (group_depth == 0) return kNcclInvalidUsage;
    if (--group_depth == 0) {
        std::vector<Op> ops;
        ops.swap(group_ops);
        run_group(std::move(ops));
    }
    return kNcclSuccess;
}
int ncclSend(const void* buffer, size_t count, int type, int peer, Comm* comm, void* stream) {
    return enqueue(true, const_cast<void*>(buffer), count, type, peer, comm, stream);
}
int ncclRecv(void* buffer, size_t count, int type, int peer, Comm* comm, void* stream) {
    return enqueue(false, buffer, count, type, peer, comm, stream);
}
int ncclCommGetAsyncError(Comm* comm, int* state) {
    *state = comm->error;
    return kNcclSuccess;
}
// A stopped communicator is kept: a receive in the background may still look at it.
int ncclCommAbort(Comm* comm) {
    comm->stopped = true;
    comm->clique->changed.notify_all();
    return kNcclSuccess;
}
int ncclCommDestroy(Comm* comm) { return ncclCommAbort(comm); }
}

// cuBLASLt (12.9 and later), as far as the backend uses it: FP8 products with DeepSeek-V3's
// block scales on Hopper. A is E4M3FN, k × n column-major (a row-major [n, k] weight), taken
// transposed, with one f32 scale per 128 × 128 block, the blocks column-major; B is E4M3FN,
// k × m column-major (row-major [m, k] activations), with one f32 scale per 128 values of a
// column, column after column; C and D are f32 n × m (row-major [m, n]); the scales multiply.
// Anything else is CUBLAS_STATUS_NOT_SUPPORTED, as a cuBLASLt without the combination says.
// CUDA_HOST_CUBLASLT_VERSION stands in for another version (12.8 has no block scales).
namespace {
constexpr int kLtNotSupported = 15, kLtInvalidValue = 7;

struct LtDesc {
    int compute = 0, scale_type = 0, transa = 0, transb = 0, a_mode = 0, b_mode = 0;
    const float* a_scale = nullptr;
    const float* b_scale = nullptr;
};

struct LtLayout {
    int type = 0;
    uint64_t rows = 0, cols = 0;
    int64_t ld = 0;
};

struct LtHeuristic {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};

size_t lt_version() {
    const char* forced = std::getenv("CUDA_HOST_CUBLASLT_VERSION");
    return forced && *forced ? size_t(std::atol(forced)) : 120900;
}

float lt_e4m3fn(uint8_t code) {
    unsigned exp = (code >> 3) & 15u, man = code & 7u;
    float v = exp == 0 ? float(man) / 512.0f : std::ldexp(1.0f + float(man) / 8.0f, int(exp) - 7);
    if (exp == 15 && man == 7) v = NAN;
    return code & 128u ? -v : v;
}

// Whether the product is the one this stand-in computes (see above).
bool lt_supported(const LtDesc& d, const LtLayout& a, const LtLayout& b, const LtLayout& c,
                  const LtLayout& out) {
    constexpr int kE4m3 = 28, kF32 = 0, kCompute32F = 68, kVec128 = 4, kBlock128 = 5;
    return lt_version() >= 120900 && d.compute == kCompute32F && d.scale_type == kF32 &&
           d.transa == 1 && d.transb == 0 && d.a_mode == kBlock128 && d.b_mode == kVec128 &&
           a.type == kE4m3 && b.type == kE4m3 && c.type == kF32 && out.type == kF32 &&
           a.rows == b.rows && a.ld >= int64_t(a.rows) && b.ld >= int64_t(b.rows) &&
           c.rows == a.cols && c.cols == b.cols && out.rows == a.cols && out.cols == b.cols &&
           out.ld >= int64_t(out.rows) && c.ld >= int64_t(c.rows);
}
}  // namespace

extern "C" {
size_t cublasLtGetVersion() { return lt_version(); }
int cublasLtCreate(void** handle) {
    *handle = new int(0);
    return 0;
}
int cublasLtDestroy(void* handle) {
    delete static_cast<int*>(handle);
    return 0;
}
int cublasLtMatmulDescCreate(void** desc, int compute, int scale_type) {
    auto* d = new LtDesc;
    d->compute = compute;
    d->scale_type = scale_type;
    *desc = d;
    return 0;
}
int cublasLtMatmulDescDestroy(void* desc) {
    delete static_cast<LtDesc*>(desc);
    return 0;
}
int cublasLtMatmulDescSetAttribute(void* desc, int attribute, const void* value, size_t size) {
    auto* d = static_cast<LtDesc*>(desc);
    auto int_value = [&](int* to) {
        if (size != sizeof(int32_t)) return kLtInvalidValue;
        std::memcpy(to, value, size);
        return 0;
    };
    auto pointer = [&](const float** to) {
        if (size != sizeof(void*)) return kLtInvalidValue;
        std::memcpy(to, value, size);
        return 0;
    };
    switch (attribute) {
        case 3: return int_value(&d->transa);
        case 4: return int_value(&d->transb);
        case 17: return pointer(&d->a_scale);
        case 18: return pointer(&d->b_scale);
        case 31: return int_value(&d->a_mode);
        case 32: return int_value(&d->b_mode);
        default: return kLtNotSupported;
    }
}
int cublasLtMatrixLayoutCreate(void** layout, int type, uint64_t rows, uint64_t cols,
                               int64_t ld) {
    *layout = new LtLayout{type, rows, cols, ld};
    return 0;
}
int cublasLtMatrixLayoutDestroy(void* layout) {
    delete static_cast<LtLayout*>(layout);
    return 0;
}
int cublasLtMatmulPreferenceCreate(void** preference) {
    *preference = new size_t(0);
    return 0;
}
int cublasLtMatmulPreferenceSetAttribute(void* preference, int attribute, const void* value,
                                         size_t size) {
    if (attribute != 1 || size != sizeof(size_t)) return kLtNotSupported;  // workspace bytes
    std::memcpy(preference, value, size);
    return 0;
}
int cublasLtMatmulPreferenceDestroy(void* preference) {
    delete static_cast<size_t*>(preference);
    return 0;
}
int cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void* c, void* d, void*,
                                   int requested, LtHeuristic* results, int* count) {
    *count = 0;
    if (requested < 1) return kLtInvalidValue;
    auto layout = [](void* l) { return *static_cast<LtLayout*>(l); };
    if (!lt_supported(*static_cast<LtDesc*>(desc), layout(a), layout(b), layout(c), layout(d))) {
        return kLtNotSupported;
    }
    results[0] = LtHeuristic{};
    *count = 1;
    return 0;
}
int cublasLtMatmul(void*, void* desc, const void* alpha, const void* a, void* a_layout,
                   const void* b, void* b_layout, const void* beta, const void* c,
                   void* c_layout, void* d, void* d_layout, const void*, void*, size_t,
                   void* stream) {
    const LtDesc& op = *static_cast<LtDesc*>(desc);
    auto layout = [](void* l) { return *static_cast<LtLayout*>(l); };
    LtLayout la = layout(a_layout), lb = layout(b_layout), lc = layout(c_layout),
             ld = layout(d_layout);
    if (!lt_supported(op, la, lb, lc, ld) || !op.a_scale || !op.b_scale) return kLtNotSupported;
    stream_of(stream)->drain();
    const auto* codes_a = static_cast<const uint8_t*>(a);
    const auto* codes_b = static_cast<const uint8_t*>(b);
    long k = long(la.rows), n = long(la.cols), m = long(lb.cols), blocks = (k + 127) / 128;
    float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    const float* in = static_cast<const float*>(c);
    float* out = static_cast<float*>(d);
    for (long i = 0; i < m; i++) {
        for (long j = 0; j < n; j++) {
            float sum = 0.0f;
            for (long l = 0; l < k; l++) {
                float wa = lt_e4m3fn(codes_a[l + j * la.ld]) *
                           op.a_scale[l / 128 + (j / 128) * blocks];
                float xb = lt_e4m3fn(codes_b[l + i * lb.ld]) * op.b_scale[l / 128 + i * blocks];
                sum += wa * xb;
            }
            float prior = be == 0.0f ? 0.0f : be * in[j + i * lc.ld];
            out[j + i * ld.ld] = al * sum + prior;
        }
    }
    return 0;
}
}
