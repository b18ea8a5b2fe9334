// Small device-side building blocks shared by every CUDA kernel of mka: element
// conversions, warp reductions, strided views, launch checks and stream-ordered scratch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "mka/error.h"
#include "mka/tensor.h"

namespace mka::cuda {

// --- element conversions (all arithmetic is float32) --------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// --- programmatic dependent launch (sm_90) ---------------------------------------------
// A kernel launched with launch_after (the programmatic-serialization attribute) may start
// while the kernel before it in the stream still runs, once that kernel's blocks have all
// called allow_dependents (or ended): its launch overlaps their last work. It must call
// wait_for_prior_grid before reading what that kernel writes (the wait ends when it has ended
// and its writes are visible). Both are no-ops below sm_90.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sums each of N values (N a power of two, 2 <= N <= 32) over the warp's lanes in
// N - 1 + log2(32 / N) shuffles, where a warp_sum per value takes 5 N: each round, lanes
// keep half of their values and take the partner's share of that half. On return, v[0] of
// lane l holds the sum of value l / (32 / N).
template <int N, int K = 0>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[N]) {
  static_assert(N >= 2 && N <= 32 && (N & (N - 1)) == 0);
  constexpr int o = 16 >> K, n = N >> (K + 1);  // partner lane ^ o; values kept after
  if constexpr (n == 0) {  // one value left: plain butterflies
    #pragma unroll
    for (int off = o; off > 0; off >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
    return v[0];
  } else {
    const bool upper = threadIdx.x & o;
    #pragma unroll
    for (int i = 0; i < n; ++i) {
      const float keep = upper ? v[i + n] : v[i], give = upper ? v[i] : v[i + n];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, give, o);
    }
    if constexpr (o == 1) return v[0];
    else return warp_reduce_scatter<N, K + 1>(v);
  }
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// A strided (B, T, heads, d) tensor with a contiguous last dim; strides in elements.
struct Rows {
  void* data = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  template <class T> __host__ __device__ T* at(int64_t b, int64_t t, int64_t h) const {
    return static_cast<T*>(data) + b * sb + t * st + h * sh;
  }
};
// Rows with 16-byte aligned starts and 8-element strides: the 16-byte vector
// paths (tensor-core tiles, load_v/store_v with V = 8) may read them. An absent view passes.
inline bool aligned16(const Rows& x) {
  return !x.data || (reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && x.sb % 8 == 0 &&
                     x.st % 8 == 0 && x.sh % 8 == 0);
}

// V consecutive elements to/from float: V = 1, or V a multiple of 8 (16-byte accesses; the
// pointer must be 16-byte aligned).
template <int V, class T> __device__ __forceinline__ void load_v(const T* p, float (&x)[V]) {
  if constexpr (V == 1) {
    x[0] = to_f(*p);
  } else if constexpr (sizeof(T) == 4) {
    #pragma unroll
    for (int i = 0; i < V; i += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + i);
      x[i] = f.x, x[i + 1] = f.y, x[i + 2] = f.z, x[i + 3] = f.w;
    }
  } else {
    #pragma unroll
    for (int i = 0; i < V; i += 8) {
      const uint4 u = *reinterpret_cast<const uint4*>(p + i);
      const T* e = reinterpret_cast<const T*>(&u);
      #pragma unroll
      for (int j = 0; j < 8; ++j) x[i + j] = to_f(e[j]);
    }
  }
}
template <int V, class T> __device__ __forceinline__ void store_v(T* p, const float (&x)[V]) {
  if constexpr (V == 1) {
    *p = from_f<T>(x[0]);
  } else if constexpr (sizeof(T) == 4) {
    #pragma unroll
    for (int i = 0; i < V; i += 4)
      *reinterpret_cast<float4*>(p + i) = make_float4(x[i], x[i + 1], x[i + 2], x[i + 3]);
  } else {
    #pragma unroll
    for (int i = 0; i < V; i += 8) {
      uint4 u;
      T* e = reinterpret_cast<T*>(&u);
      #pragma unroll
      for (int j = 0; j < 8; ++j) e[j] = from_f<T>(x[i + j]);
      *reinterpret_cast<uint4*>(p + i) = u;
    }
  }
}

// A per-token scalar such as one routing weight lam[b, t, l], in lam's own dtype (it may be
// float32 while the inputs are half precision). data == nullptr reads as `absent`.
struct TokenScalar {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t sb = 0, st = 0;
  __device__ __forceinline__ float load(int64_t b, int64_t t, float absent) const {
    if (!data) return absent;
    const int64_t i = b * sb + t * st;
    switch (dtype) {
      case DType::f16: return to_f(static_cast<const __half*>(data)[i]);
      case DType::bf16: return to_f(static_cast<const __nv_bfloat16*>(data)[i]);
      default: return static_cast<const float*>(data)[i];
    }
  }
  // The element's bits, unconverted (absent: those of `absent`), and their value: a kernel
  // that loads a value long before it uses it converts it late, so nothing waits on the load
  // early.
  __device__ __forceinline__ unsigned bits(int64_t b, int64_t t, float absent) const {
    if (!data) return __float_as_uint(absent);
    const int64_t i = b * sb + t * st;
    if (dtype == DType::f32) return __float_as_uint(static_cast<const float*>(data)[i]);
    return static_cast<const unsigned short*>(data)[i];
  }
  __device__ __forceinline__ float value(unsigned x) const {
    if (!data || dtype == DType::f32) return __uint_as_float(x);
    if (dtype == DType::bf16) return __uint_as_float(x << 16);
    return __half2float(__ushort_as_half(static_cast<unsigned short>(x)));
  }
};

// A (B, G, d) float32 EMA state; data == nullptr: absent (zeros in, nothing out).
struct StateView {
  float* data = nullptr;
  int64_t sb = 0, sg = 0;
  __device__ __forceinline__ float* at(int64_t b, int64_t g) const { return data + b * sb + g * sg; }
};

inline Rows rows(const TensorRef& t) {
  if (!t.present()) return {};
  return {t.data, t.stride[0], t.stride[1], t.stride[2]};
}
inline StateView state(const TensorRef& t) {
  if (!t.present()) return {};
  return {static_cast<float*>(t.data), t.stride[0], t.stride[1]};
}
// Level l of lam (B, T, L) as a per-token scalar.
inline TokenScalar lam_level(const TensorRef& lam, int64_t l) {
  if (!lam.present()) return {};
  const int64_t elem = lam.dtype == DType::f32 ? 4 : 2;
  return {static_cast<const char*>(lam.data) + l * lam.stride[2] * elem, lam.dtype,
          lam.stride[0], lam.stride[1]};
}
// Slice i of the leading dimension (o_levels, lse_levels).
inline TensorRef select0(const TensorRef& t, int64_t i) {
  TensorRef s = t;
  s.ndim = t.ndim - 1;
  const int64_t elem = int64_t(dtype_bytes(t.dtype));
  s.data = static_cast<char*>(t.data) + i * t.stride[0] * elem;
  for (int d = 0; d < s.ndim; ++d) {
    s.shape[d] = t.shape[d + 1];
    s.stride[d] = t.stride[d + 1];
  }
  return s;
}

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(what, ": CUDA error: ", cudaGetErrorString(e));
}
// After every launch: a bad configuration surfaces here, not at the next sync.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// A device attribute, queried once per device (the query costs host time every call);
// `fallback` where the device number is out of range or the query fails.
template <cudaDeviceAttr kAttr> int device_attribute(int device, int fallback) {
  static std::once_flag once[64];
  static int value[64];
  if (device < 0 || device >= 64) return fallback;
  std::call_once(once[device], [device, fallback] {
    if (cudaDeviceGetAttribute(&value[device], kAttr, device) != cudaSuccess) {
      (void)cudaGetLastError();
      value[device] = fallback;
    }
  });
  return value[device];
}

// Compute capability major of a device.
inline int cc_major(int device) {
  return device_attribute<cudaDevAttrComputeCapabilityMajor>(device, 0);
}

// Whether the code the device runs for Kernel was compiled for sm_90 or later: its ptxVersion
// (compute_80 code JIT-compiled for a Hopper or later GPU has the sm_90 instructions, such as
// griddepcontrol and clusters, compiled out). Not memoised: its callers keep the answer.
template <auto Kernel> bool runs_sm90_code(int device) {
  if (cc_major(device) < 9) return false;
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, Kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // no image for this device: not an error of the call
    return false;
  }
  return fa.ptxVersion >= 90;
}

// Launches Kernel<<<grid, block, smem, s>>>(args...) as a programmatic dependent of the kernel
// before it in the stream (see allow_dependents) where that is safe: the code the device runs
// for Kernel was compiled for sm_90 or later (its ptxVersion: compute_80 code JIT-compiled for
// a Hopper or later GPU has griddepcontrol.wait compiled out) and the runtime captures such
// launches into CUDA graphs (12.3+). Else a plain launch.
template <auto Kernel, class... Args>
void launch_after(dim3 grid, dim3 block, size_t smem, cudaStream_t s, int device, Args&&... args) {
  static std::once_flag once[64];
  static bool dependent[64];
  const int slot = device >= 0 && device < 64 ? device : 0;
  std::call_once(once[slot], [&] {
    dependent[slot] = CUDART_VERSION >= 12030 && device == slot && runs_sm90_code<Kernel>(device);
  });
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = s;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr, cfg.numAttrs = dependent[slot] ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&cfg, Kernel, std::forward<Args>(args)...), "cudaLaunchKernelEx");
}
// A per-(kernel, device) memo of launch-time facts: a kernel's attributes stay as set (or as
// compiled) for the process, so the launchers pay the runtime's query or setter (about a
// microsecond of host time each, every call of every op) once per kernel and device. Keyed by
// the device number, i.e. its primary context (torch's): a cudaDeviceReset would leave it stale.
class KernelMemo {
 public:
  // The stored value of (kernel, current device), or make() stored and returned.
  template <class Make> int get(const void* kernel, Make make) {
    const Key key{kernel, current_device()};
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = values_.find(key);
      if (it != values_.end()) return it->second;
    }
    const int v = make();  // outside the lock: it may throw
    std::lock_guard<std::mutex> lock(mu_);
    return values_.emplace(key, v).first->second;
  }
  // Raises (kernel, current device)'s value to v, calling set() first, where it is below v
  // (or none is stored); under one lock, so two threads raising the same kernel to different
  // values can never leave the stored value above the one set last.
  template <class Set> void raise(const void* kernel, int v, Set set) {
    const Key key{kernel, current_device()};
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = values_.find(key);
    if (it != values_.end() && it->second >= v) return;
    set();  // may throw: nothing is stored then
    values_[key] = v;
  }

 private:
  using Key = std::pair<const void*, int>;
  static int current_device() {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    return device;
  }
  std::mutex mu_;
  std::map<Key, int> values_;
};

// The device's SM count (132, an H100's, where it cannot be queried).
inline int num_sms(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device, 132); }

// Lets kernel k use `bytes` of dynamic shared memory (needed past 48 KB less its static part);
// the attribute is a ceiling, so it is set only where a launch asks for more than before.
template <class Kernel> void set_smem(Kernel k, int bytes) {
  static KernelMemo ceilings;
  ceilings.raise(reinterpret_cast<const void*>(k), bytes, [&] {
    check_cuda(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute (shared memory)");
  });
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Division by a divisor fixed at launch as a multiply-high, an add and a shift (Granlund and
// Montgomery's round-up method): exact for numerators below 2^31 and divisors 1 to 2^31. A
// kernel's index arithmetic by runtime sizes otherwise costs ~20 instructions per division.
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;
  FastDiv() = default;
  explicit FastDiv(int64_t divisor) : d(uint32_t(divisor)) {
    while ((uint64_t(1) << s) < d) ++s;  // s = ceil(log2 d)
    m = uint32_t((uint64_t(1) << 32) * ((uint64_t(1) << s) - d) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

// Runs the launcher on the tensors' device; restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (device != prev_) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// The default memory pool returns freed memory to the driver at every synchronization
// (release threshold 0), so each call would map its scratch afresh (~1 ms per 100 MB).
// Keep it cached instead, as PyTorch's caching allocator does; once per device.
inline void keep_pool_memory() {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev >= kMaxDevices) return;
  std::call_once(once[dev], [dev] {
    cudaMemPool_t pool;
    check_cuda(cudaDeviceGetDefaultMemPool(&pool, dev), "cudaDeviceGetDefaultMemPool");
    uint64_t keep = UINT64_MAX;
    check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
               "cudaMemPoolSetAttribute");
  });
}

// Stream-ordered scratch memory (fp32 accumulators, fused keys); zero-filled on request.
class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream, bool zero) : stream_(stream) {
    if (bytes == 0) return;
    keep_pool_memory();
    check_cuda(cudaMallocAsync(&ptr_, bytes, stream), "cudaMallocAsync (workspace)");
    if (zero) check_cuda(cudaMemsetAsync(ptr_, 0, bytes, stream), "cudaMemsetAsync");
  }
  ~Workspace() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  template <class T> T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// Calls f with a null pointer of the C++ element type of dt (f16, bf16 or f32).
template <class F> void dispatch_dtype(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f16: f(static_cast<__half*>(nullptr)); return;
    case DType::bf16: f(static_cast<__nv_bfloat16*>(nullptr)); return;
    case DType::f32: f(static_cast<float*>(nullptr)); return;
    default: fail(op, ": dtype ", dtype_name(dt), " has no CUDA kernel");
  }
}

}  // namespace mka::cuda
