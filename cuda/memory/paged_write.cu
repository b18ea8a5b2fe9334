// Writing new keys/values into pages on the GPU (SPEC §7.1), with MKA's EMA checkpoints.
// A block is (sequence, kv head, 32 columns of k or v) and cuts the new tokens into up to 32
// chunks, one per warp: each warp copies its chunk's rows into their pages and runs the EMA
// of its chunk from zero; the chunks' carries are chained in shared memory (a chunk's state
// is beta^len times the one before it plus its own); then each warp runs its chunk again from
// its true start state, writing the state before every page's first token (the checkpoint
// that lets the decode kernel rebuild EMA(k), EMA(v) without a scan). A decode step (one
// token) is one pass.
//
// The host has checked every slot written (the Python layer, before the launch); a block that
// meets an invalid page anyway writes nothing there.
#include <algorithm>

#include "common/device_utils.cuh"
#include "mka/memory/paged_ops.h"

namespace mka::cuda {
namespace {

constexpr int kMaxChunks = 32;

struct WriteArgs {
  const void *k, *v;
  void *kp, *vp;
  int64_t ks[3], vs[3], kps[3], vps[3];  // (b, t, g) and (page, row, head) strides
  const int32_t* table;
  int64_t ts0, ts1;
  const int32_t* start;
  int64_t ss;
  int B, T, G, dk, dv, S, chunk;
  int64_t P;
  // EMA (kck null: none): page checkpoints (P, G, d) and running states (b, g, x strides).
  float beta;
  float *kck, *vck;
  const float *k_in, *v_in;
  float *k_out, *v_out;
  int64_t kin_s[2], vin_s[2], kout_s[2], vout_s[2];
};

template <class T> __global__ void paged_write_kernel(const WriteArgs a) {
  __shared__ float carry[kMaxChunks][32];
  const int b = blockIdx.x / a.G, g = blockIdx.x % a.G;
  const int c = blockIdx.y * 32 + threadIdx.x, w = threadIdx.y;
  const bool is_v = c >= a.dk;
  const int col = is_v ? c - a.dk : c, d = is_v ? a.dv : a.dk;
  const bool active = c < a.dk + a.dv;
  const T* src = static_cast<const T*>(is_v ? a.v : a.k);
  const int64_t* ss = is_v ? a.vs : a.ks;
  T* pages = static_cast<T*>(is_v ? a.vp : a.kp);
  const int64_t* ps = is_v ? a.vps : a.kps;
  const int64_t start = a.start[b * a.ss];
  const int t0 = w * a.chunk, t1 = min(a.T, t0 + a.chunk);
  const bool ema = a.kck != nullptr;
  const float beta = a.beta, one_m = 1.f - a.beta;

  // Pass 1: copy; the chunk's EMA from zero.
  float e = 0.f;
  if (active)
    for (int t = t0; t < t1; ++t) {
      const T x = src[b * ss[0] + t * ss[1] + g * ss[2] + col];
      const int64_t pos = start + t, slot = pos / a.S;
      const int page = a.table[b * a.ts0 + slot * a.ts1];
      if (page >= 0 && page < a.P) pages[page * ps[0] + (pos - slot * a.S) * ps[1] + g * ps[2] + col] = x;
      e = fmaf(beta, e, one_m * to_f(x));
    }
  if (!ema) return;
  carry[w][threadIdx.x] = e;
  __syncthreads();
  // Pass 2: each chunk's start state, from the state before the write.
  if (w == 0 && active) {
    const float* in = is_v ? a.v_in : a.k_in;
    const int64_t* is = is_v ? a.vin_s : a.kin_s;
    float s = in ? in[b * is[0] + g * is[1] + col] : 0.f;
    for (int u = 0; u < blockDim.y; ++u) {
      const int len = max(0, min(a.T, (u + 1) * a.chunk) - u * a.chunk);
      const float local = carry[u][threadIdx.x];
      carry[u][threadIdx.x] = s;
      s = powf(beta, float(len)) * s + local;
    }
    float* out = is_v ? a.v_out : a.k_out;
    const int64_t* os = is_v ? a.vout_s : a.kout_s;
    out[b * os[0] + g * os[1] + col] = s;
  }
  __syncthreads();
  if (!active) return;
  // Pass 3: checkpoints (the state before each page's first token).
  float* ck = is_v ? a.vck : a.kck;
  float s = carry[w][threadIdx.x];
  for (int t = t0; t < t1; ++t) {
    const int64_t pos = start + t, slot = pos / a.S;
    if (pos == slot * a.S) {
      const int page = a.table[b * a.ts0 + slot * a.ts1];
      if (page >= 0 && page < a.P) ck[(int64_t(page) * a.G + g) * d + col] = s;
    }
    s = fmaf(beta, s, one_m * to_f(src[b * ss[0] + t * ss[1] + g * ss[2] + col]));
  }
}

void strides3(int64_t (&dst)[3], const TensorRef& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride[i];
}
void strides2(int64_t (&dst)[2], const TensorRef& t) { dst[0] = t.stride[0], dst[1] = t.stride[1]; }

}  // namespace

void paged_write(const PagedProblem& p, const PagedWrite& a) {
  if (p.B == 0 || p.G == 0 || (p.T == 0 && !p.ema)) return;
  MKA_CHECK(p.B * p.G < (int64_t(1) << 31), "k: too many sequences x heads for the CUDA kernel");
  MKA_CHECK(p.dk + p.dv <= 32 * 65535, "k_pages: head dims too large for the CUDA kernel");
  DeviceGuard guard(p.device_id);
  auto s = static_cast<cudaStream_t>(a.launch.stream);
  WriteArgs w{};
  w.k = a.k.data, w.v = a.v.data, w.kp = a.pages.k_pages.data, w.vp = a.pages.v_pages.data;
  strides3(w.ks, a.k), strides3(w.vs, a.v);
  strides3(w.kps, a.pages.k_pages), strides3(w.vps, a.pages.v_pages);
  w.table = static_cast<const int32_t*>(a.pages.block_table.data);
  w.ts0 = a.pages.block_table.stride[0], w.ts1 = a.pages.block_table.stride[1];
  w.start = static_cast<const int32_t*>(a.cache_seqlens.data), w.ss = a.cache_seqlens.stride[0];
  w.B = int(p.B), w.T = int(p.T), w.G = int(p.G), w.dk = int(p.dk), w.dv = int(p.dv);
  w.S = int(p.S), w.P = p.P;
  const int chunks = int(std::clamp<int64_t>((p.T + 15) / 16, 1, kMaxChunks));
  w.chunk = int(std::max<int64_t>(1, ceil_div(p.T, chunks)));
  if (p.ema) {
    w.beta = float(p.beta);
    w.kck = static_cast<float*>(a.ema.k_page_states.data);
    w.vck = static_cast<float*>(a.ema.v_page_states.data);
    w.k_in = a.k_state.present() ? static_cast<const float*>(a.k_state.data) : nullptr;
    w.v_in = a.v_state.present() ? static_cast<const float*>(a.v_state.data) : nullptr;
    if (w.k_in) strides2(w.kin_s, a.k_state);
    if (w.v_in) strides2(w.vin_s, a.v_state);
    w.k_out = static_cast<float*>(a.k_state_out.data);
    w.v_out = static_cast<float*>(a.v_state_out.data);
    strides2(w.kout_s, a.k_state_out), strides2(w.vout_s, a.v_state_out);
  }
  const dim3 grid(unsigned(p.B * p.G), unsigned(ceil_div(p.dk + p.dv, 32)));
  const dim3 block(32, unsigned(chunks));
  dispatch_dtype(p.dtype, "paged_write", [&](auto* t) {
    paged_write_kernel<std::remove_pointer_t<decltype(t)>><<<grid, block, 0, s>>>(w);
  });
  check_launch("paged_write_kernel");
}

}  // namespace mka::cuda
