// Writing new keys/values into pages on the GPU (SPEC §7.1), with MKA's EMA checkpoints.
// A block is (sequence, kv head, 32 columns of k or v) and cuts the new tokens into up to 32
// chunks, one per warp: each warp copies its chunk's rows into their pages and runs the EMA
// of its chunk from zero; the chunks' carries are chained in shared memory (a chunk's state
// is beta^len times the one before it plus its own); then each warp runs its chunk again from
// its true start state, writing the state before every page's first token (the checkpoint
// that lets the decode kernel rebuild EMA(k), EMA(v) without a scan). Up to 16 new tokens (a
// decode step, a short verification) are one chunk: its start state is the state before the
// write, and the third pass alone does the work, copying the rows too.
//
// FastMKA's write (kFused) is the same three passes without the copy in the first: the third,
// from each chunk's true start state, writes the fused rows lam0 x + lam1 EMA(x) (+ lam2 x3)
// instead of checkpoints, and the running state is read and overwritten in place.
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
  // kFused: the routing weights of each token and level 3's rows (k3 null: L = 2).
  TokenScalar lam[3];
  const void *k3, *v3;
  int64_t k3s[3], v3s[3];
};

template <class T, bool kFused> __global__ void paged_write_kernel(const WriteArgs a) {
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
  const bool ema = kFused || a.kck != nullptr;
  const float beta = a.beta, one_m = 1.f - a.beta;
  auto slot_of = [&](int64_t pos) -> T* {  // the page slot of position pos, or null
    const int64_t slot = pos / a.S;
    const int page = a.table[b * a.ts0 + slot * a.ts1];
    return page >= 0 && page < a.P ? pages + page * ps[0] + (pos - slot * a.S) * ps[1] + g * ps[2] + col
                                   : nullptr;
  };

  const float* in = is_v ? a.v_in : a.k_in;
  const int64_t* is = is_v ? a.vin_s : a.kin_s;
  float* out = is_v ? a.v_out : a.k_out;
  const int64_t* os = is_v ? a.vout_s : a.kout_s;
  const T* x3 = static_cast<const T*>(is_v ? a.v3 : a.k3);
  const int64_t* s3 = is_v ? a.v3s : a.k3s;
  float* ck = is_v ? a.vck : a.kck;
  // The third pass: tokens [u0, u1) from the EMA state s before u0, writing the fused rows
  // (kFused) or the checkpoints (the state before each page's first token) and, with copy, the
  // rows themselves; returns the state after them.
  auto from_state = [&](float s, int u0, int u1, bool copy) {
    for (int t = u0; t < u1; ++t) {
      const T xt = src[b * ss[0] + t * ss[1] + g * ss[2] + col];
      const int64_t pos = start + t;
      if constexpr (kFused) {
        const float x = to_f(xt);
        s = fmaf(beta, s, one_m * x);
        float y = a.lam[0].load(b, t, 0.f) * x + a.lam[1].load(b, t, 0.f) * s;
        if (x3) y = fmaf(a.lam[2].load(b, t, 0.f), to_f(x3[b * s3[0] + t * s3[1] + g * s3[2] + col]), y);
        if (T* dst = slot_of(pos)) *dst = from_f<T>(y);
      } else {
        if (T* dst = slot_of(pos)) {
          if (copy) *dst = xt;
          if (pos % a.S == 0) ck[(int64_t(a.table[b * a.ts0 + pos / a.S * a.ts1]) * a.G + g) * d + col] = s;
        }
        s = fmaf(beta, s, one_m * to_f(xt));
      }
    }
    return s;
  };

  // One chunk (up to 16 new tokens: a decode step) with the EMA: its start state is the state
  // before the write, so the first two passes have nothing to do and the third runs alone,
  // copying the rows too. Its loads (rows, state, lam) are in flight together, where the
  // three passes were three dependent load latencies (a FastMKA step at B 1, 4k cached tokens
  // took 1.065x MHA's on an H100 with them).
  if (ema && blockDim.y == 1) {
    if (!active) return;
    const float s0 = in ? in[b * is[0] + g * is[1] + col] : 0.f;
    out[b * os[0] + g * os[1] + col] = from_state(s0, 0, a.T, true);
    return;
  }

  // Pass 1: copy (not when fusing: the rows written are the third pass's); the chunk's EMA
  // from zero.
  float e = 0.f;
  if (active)
    for (int t = t0; t < t1; ++t) {
      const T x = src[b * ss[0] + t * ss[1] + g * ss[2] + col];
      if constexpr (!kFused)
        if (T* dst = slot_of(start + t)) *dst = x;
      e = fmaf(beta, e, one_m * to_f(x));
    }
  if (!ema) return;
  carry[w][threadIdx.x] = e;
  __syncthreads();
  // Pass 2: each chunk's start state, from the state before the write.
  if (w == 0 && active) {
    float s = in ? in[b * is[0] + g * is[1] + col] : 0.f;
    for (int u = 0; u < blockDim.y; ++u) {
      const int len = max(0, min(a.T, (u + 1) * a.chunk) - u * a.chunk);
      const float local = carry[u][threadIdx.x];
      carry[u][threadIdx.x] = s;
      s = powf(beta, float(len)) * s + local;
    }
    out[b * os[0] + g * os[1] + col] = s;
  }
  __syncthreads();
  // Pass 3, from the chunk's true start state (the rows are copied already).
  if (active) from_state(carry[w][threadIdx.x], t0, t1, false);
}

void strides3(int64_t (&dst)[3], const TensorRef& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride[i];
}
void strides2(int64_t (&dst)[2], const TensorRef& t) { dst[0] = t.stride[0], dst[1] = t.stride[1]; }

// The arguments both writes share: rows, pages, table, starts, chunking.
WriteArgs write_args(const PagedProblem& p, const TensorRef& k, const TensorRef& v,
                     const PagedKV& pages, const TensorRef& starts) {
  WriteArgs w{};
  w.k = k.data, w.v = v.data, w.kp = pages.k_pages.data, w.vp = pages.v_pages.data;
  strides3(w.ks, k), strides3(w.vs, v);
  strides3(w.kps, pages.k_pages), strides3(w.vps, pages.v_pages);
  w.table = static_cast<const int32_t*>(pages.block_table.data);
  w.ts0 = pages.block_table.stride[0], w.ts1 = pages.block_table.stride[1];
  w.start = static_cast<const int32_t*>(starts.data), w.ss = starts.stride[0];
  w.B = int(p.B), w.T = int(p.T), w.G = int(p.G), w.dk = int(p.dk), w.dv = int(p.dv);
  w.S = int(p.S), w.P = p.P;
  return w;
}

template <bool kFused> void launch_write(const PagedProblem& p, WriteArgs& w, cudaStream_t s) {
  const int chunks = int(std::clamp<int64_t>((p.T + 15) / 16, 1, kMaxChunks));
  w.chunk = int(std::max<int64_t>(1, ceil_div(p.T, chunks)));
  const dim3 grid(unsigned(p.B * p.G), unsigned(ceil_div(p.dk + p.dv, 32)));
  const dim3 block(32, unsigned(chunks));
  dispatch_dtype(p.dtype, "paged_write", [&](auto* t) {
    paged_write_kernel<std::remove_pointer_t<decltype(t)>, kFused><<<grid, block, 0, s>>>(w);
  });
  check_launch("paged_write_kernel");
}

void check_grid(const PagedProblem& p) {
  MKA_CHECK(p.B * p.G < (int64_t(1) << 31), "k: too many sequences x heads for the CUDA kernel");
  MKA_CHECK(p.dk + p.dv <= 32 * 65535, "k_pages: head dims too large for the CUDA kernel");
}

}  // namespace

void paged_write(const PagedProblem& p, const PagedWrite& a) {
  if (p.B == 0 || p.G == 0 || (p.T == 0 && !p.ema)) return;
  check_grid(p);
  DeviceGuard guard(p.device_id);
  WriteArgs w = write_args(p, a.k, a.v, a.pages, a.cache_seqlens);
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
  launch_write<false>(p, w, static_cast<cudaStream_t>(a.launch.stream));
}

void paged_write_fused(const PagedProblem& p, int64_t L, const PagedWriteFused& a) {
  if (p.B == 0 || p.G == 0 || p.T == 0) return;  // no tokens: the states stay
  check_grid(p);
  DeviceGuard guard(p.device_id);
  const RouteInputs& r = a.route;
  WriteArgs w = write_args(p, a.k, a.v, a.pages, a.cache_seqlens);
  w.beta = float(p.beta);
  // The states are read, then overwritten by the same thread (the second pass): in place.
  w.k_in = w.k_out = static_cast<float*>(r.k_state.data);
  w.v_in = w.v_out = static_cast<float*>(r.v_state.data);
  strides2(w.kin_s, r.k_state), strides2(w.kout_s, r.k_state);
  strides2(w.vin_s, r.v_state), strides2(w.vout_s, r.v_state);
  for (int l = 0; l < int(L); ++l) w.lam[l] = lam_level(r.lam, l);
  if (L == 3) {
    w.k3 = r.k3.data, w.v3 = r.v3.data;
    strides3(w.k3s, r.k3), strides3(w.v3s, r.v3);
  }
  launch_write<true>(p, w, static_cast<cudaStream_t>(a.launch.stream));
}

}  // namespace mka::cuda
