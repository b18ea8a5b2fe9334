// Full MKA on the GPU: one attention per memory level, mixed per query token by lam.
// L1 attends to k/v (with the window), L2 to their EMA (made from k/v here by the scan, so
// a decode cache holds only k/v), L3 to the recalled memory tokens without a causal mask.
// The forward keeps the EMA keys/values in the caller's SavedKeys (else scratch, remade by
// the backward). Backward: each level's attention backward with its dout rows weighted by
// lam[., l] (folded into the kernels), the EMA backward for L2; dq through a float32
// accumulator; level 1 stores (or adds) dk, dv in the inputs' dtype, level 2 stores the EMA
// keys' gradients in scratch of that dtype and the scan's backward adds them onto dk, dv.
#include "ops/building_blocks.h"
#include "mka/cuda/kernels.h"

namespace mka::cuda {
namespace {

constexpr int kMaxLevels = 3;

struct Levels {
  Rows o[kMaxLevels];
  TokenScalar w[kMaxLevels];
  int L = 2;
};

Levels levels(const TensorRef& o_levels, const TensorRef& lam) {
  Levels lv;
  lv.L = int(lam.shape[2]);
  for (int l = 0; l < lv.L; ++l) {
    lv.o[l] = rows(select0(o_levels, l));
    lv.w[l] = lam_level(lam, l);
  }
  return lv;
}

// The levels' outputs O_l are float32 (the backward's row sums <dout, O_l> would lose the
// state gradient's accuracy to rounded O_l: its terms cancel). Both per-token kernels are
// memory-bound: one block per token, V consecutive elements per thread (V = 8: 16-byte
// accesses of dout/out, where every view allows them), the token's routing weights read once.
constexpr int kMixThreads = 256;

// out = sum_l lam[., l] * O_l.
template <class T, int V> __global__ void mix_fwd(Levels lv, Rows out, int64_t Tq, int64_t H,
                                                  int64_t d) {
  const int64_t b = blockIdx.x / Tq, t = blockIdx.x % Tq;
  float w[kMaxLevels];
  for (int l = 0; l < lv.L; ++l) w[l] = lv.w[l].load(b, t, 0.f);
  for (int64_t e = int64_t(threadIdx.x) * V; e < H * d; e += kMixThreads * V) {
    const int64_t h = e / d, c = e % d;
    float y[V] = {}, x[V];
    for (int l = 0; l < lv.L; ++l) {
      load_v<V>(lv.o[l].at<const float>(b, t, h) + c, x);
      #pragma unroll
      for (int i = 0; i < V; ++i) y[i] += w[l] * x[i];
    }
    store_v<V>(out.at<T>(b, t, h) + c, y);
  }
}

// The row sums r_l[b, h, t] = <dout, O_l> over c, in one read of dout and the levels: each
// level attention's backward takes them as its delta (B, H, Tq), and dlam[b, t, l] (float32
// (B, Tq, L), optional) = sum_h r_l. Dynamic shared memory: L * H floats.
template <class T, int V> __global__ void level_dots(Levels lv, Rows dout, int64_t Tq, int64_t H,
                                                     int64_t d, float* delta, float* dlam) {
  extern __shared__ float dots[];  // [L][H]
  const int64_t b = blockIdx.x / Tq, t = blockIdx.x % Tq, B = gridDim.x / Tq;
  for (int i = threadIdx.x; i < lv.L * H; i += kMixThreads) dots[i] = 0.f;
  __syncthreads();
  for (int64_t e = int64_t(threadIdx.x) * V; e < H * d; e += kMixThreads * V) {
    const int64_t h = e / d, c = e % d;
    float g[V], x[V];
    load_v<V>(dout.at<const T>(b, t, h) + c, g);
    for (int l = 0; l < lv.L; ++l) {
      load_v<V>(lv.o[l].at<const float>(b, t, h) + c, x);
      float acc = 0.f;
      #pragma unroll
      for (int i = 0; i < V; ++i) acc += g[i] * x[i];
      atomicAdd(&dots[l * H + h], acc);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < lv.L * H; i += kMixThreads) {
    const int64_t l = i / H, h = i % H;
    delta[((l * B + b) * H + h) * Tq + t] = dots[i];
  }
  if (dlam && threadIdx.x < lv.L) {
    float s = 0.f;
    for (int64_t h = 0; h < H; ++h) s += dots[threadIdx.x * H + h];
    dlam[(b * Tq + t) * lv.L + threadIdx.x] = s;
  }
}

// Calls f(std::integral_constant<int, V>): 8 where d and every view allow 16-byte accesses.
template <class F> void dispatch_mix_width(const Levels& lv, const Rows& x, int64_t d, F&& f) {
  bool wide = d % 8 == 0 && aligned16(x);
  for (int l = 0; l < lv.L; ++l) wide = wide && aligned16(lv.o[l]);
  if (wide) return f(std::integral_constant<int, 8>{});
  f(std::integral_constant<int, 1>{});
}

// Level 2's keys and values: EMA(k), EMA(v) from the given states (no routing).
void ema_keys(const RouteProblem& rp, const TensorRef& k, const TensorRef& v,
              const RouteInputs& r, Rows ke, Rows ve, StateView k_state_out,
              StateView v_state_out, cudaStream_t s) {
  ScanOperand km = scan_operand(rows(k), Rows{}, state(r.k_state));
  ScanOperand vm = scan_operand(rows(v), Rows{}, state(r.v_state));
  km.y = ke, km.state_out = k_state_out, vm.y = ve, vm.state_out = v_state_out;
  ema_route_fwd(rp, TensorRef{}, km, vm, s);
}

float* lse_level(const TensorRef& lse_levels, int l) {
  return static_cast<float*>(select0(lse_levels, l).data);
}

}  // namespace

void mka_fwd(const AttentionProblem& ap, const RouteProblem& rp, const MkaFwd& a) {
  DeviceGuard guard(a.q.device_id);
  auto s = static_cast<cudaStream_t>(a.launch.stream);
  const Levels lv = levels(a.o_levels, a.route.lam);
  attention_fwd_rows(level_problem(ap, 0, 0), rows(a.q), rows(a.k), rows(a.v), lv.o[0],
                     lse_level(a.lse_levels, 0), s, true);
  const bool keep = a.saved.k.present();
  KVScratch e(keep ? AttentionProblem{} : ap, s);
  const Rows ke = keep ? rows(a.saved.k) : e.kr, ve = keep ? rows(a.saved.v) : e.vr;
  ema_keys(rp, a.k, a.v, a.route, ke, ve, state(a.k_state_out), state(a.v_state_out), s);
  attention_fwd_rows(level_problem(ap, 1, 0), rows(a.q), ke, ve, lv.o[1],
                     lse_level(a.lse_levels, 1), s, true);
  if (lv.L == 3)
    attention_fwd_rows(level_problem(ap, 2, a.mem_k.shape[1]), rows(a.q), rows(a.mem_k),
                       rows(a.mem_v), lv.o[2], lse_level(a.lse_levels, 2), s, true);
  if (ap.B * ap.Tq * ap.H * ap.d == 0) return;
  dispatch_dtype(ap.dtype, "mka", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_mix_width(lv, rows(a.out), ap.d, [&](auto width) {
      constexpr int V = decltype(width)::value;
      mix_fwd<T, V><<<unsigned(ap.B * ap.Tq), kMixThreads, 0, s>>>(lv, rows(a.out), ap.Tq, ap.H,
                                                                    ap.d);
    });
    check_launch("mix_fwd");
  });
}

void mka_bwd(const AttentionProblem& ap, const RouteProblem& rp, const MkaBwd& a) {
  DeviceGuard guard(a.q.device_id);
  auto s = static_cast<cudaStream_t>(a.launch.stream);
  const Levels lv = levels(a.o_levels, a.route.lam);
  const RouteGrads& g = a.grads;
  const bool add = a.accumulate;
  // Each level's delta (B, H, Tq) and dlam from one pass over dout and the levels.
  const int64_t level_rows = ap.B * ap.H * ap.Tq;
  Workspace delta(size_t(lv.L * level_rows) * 4, s, false);
  Workspace dlam(g.dlam.present() ? size_t(ap.B * ap.Tq * lv.L) * 4 : 0, s, false);
  if (ap.B * ap.Tq > 0) {
    dispatch_dtype(ap.dtype, "mka backward", [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      dispatch_mix_width(lv, rows(a.dout), ap.d, [&](auto width) {
        constexpr int V = decltype(width)::value;
        level_dots<T, V><<<unsigned(ap.B * ap.Tq), kMixThreads, size_t(lv.L * ap.H) * 4, s>>>(
            lv, rows(a.dout), ap.Tq, ap.H, ap.d, delta.as<float>(), dlam.as<float>());
      });
      check_launch("level_dots");
    });
    if (g.dlam.present()) accumulate(dlam.as<float>(), g.dlam, s, add);
  }
  const auto level_delta = [&](int l) { return delta.as<float>() + l * level_rows; };
  // dq: float32 accumulator over the levels' key blocks (atomics or TMA reductions).
  Workspace dq_acc(size_t(ap.B * ap.Tq * ap.H * ap.d) * 4, s, true);
  const Rows dq_rows = dense_rows(dq_acc.as<float>(), ap.Tq, ap.H, ap.d);
  const auto lse = [&](int l) { return lse_level(a.lse_levels, l); };
  const KVGrad io = add ? KVGrad::add_io : KVGrad::store_io;

  attention_bwd_rows(level_problem(ap, 0, 0), rows(a.q), rows(a.k), rows(a.v), lv.o[0], lse(0),
                     rows(a.dout), lv.w[0], dq_rows, rows(a.dk), rows(a.dv), io, s,
                     level_delta(0));
  {
    const bool kept = a.saved.k.present();
    KVScratch e(kept ? AttentionProblem{} : ap, s);
    const Rows ke = kept ? rows(a.saved.k) : e.kr, ve = kept ? rows(a.saved.v) : e.vr;
    if (!kept) ema_keys(rp, a.k, a.v, a.route, ke, ve, StateView{}, StateView{}, s);
    const AttentionProblem p2 = level_problem(ap, 1, 0);
    // Level 2's scan backward through its attention backward's write-out (ScanThrough),
    // which adds dk, dv onto level 1's; else separate passes after it.
    if (attention_bwd_can_scan(p2, {rows(a.q), ke, ve, rows(a.dout), rows(a.dk), rows(a.dv)})) {
      const ScanThroughScratch through(p2, float(rp.beta), TokenScalar{}, TokenScalar{},
                                       {state(a.dk_state_out), state(a.dv_state_out)},
                                       {state(g.dk_state), state(g.dv_state)}, add, s);
      attention_bwd_rows(p2, rows(a.q), ke, ve, lv.o[1], lse(1), rows(a.dout), lv.w[1], dq_rows,
                         rows(a.dk), rows(a.dv), KVGrad::add_io, s, level_delta(1), {},
                         through.scan);
    } else {
      KVScratch de(ap, s);  // the EMA keys' gradients, stored (no zero fill)
      // The scan's chunk sums come from level 2's attention backward where it can make them.
      const RouteProblem rs = attn_chunk_route(rp);
      ScanSumsScratch sums(rs, TensorRef{}, s);
      const bool made =
          attention_bwd_rows(p2, rows(a.q), ke, ve, lv.o[1], lse(1),
                             rows(a.dout), lv.w[1], dq_rows, de.kr, de.vr, KVGrad::store_io, s,
                             level_delta(1), sums.sums);
      // Added onto level 1's dk, dv; the states' gradients are the scan's alone.
      ScanOperand km = scan_operand(rows(a.k), Rows{}, state(a.route.k_state));
      ScanOperand vm = scan_operand(rows(a.v), Rows{}, state(a.route.v_state));
      km.dy = de.kr, km.dstate_out = state(a.dk_state_out), km.dx = rows(a.dk);
      km.dstate_in = state(g.dk_state);
      vm.dy = de.vr, vm.dstate_out = state(a.dv_state_out), vm.dx = rows(a.dv);
      vm.dstate_in = state(g.dv_state);
      ema_route_bwd(rs, TensorRef{}, km, vm, nullptr, true, add, s,
                    made ? &sums.sums : nullptr);
    }
  }
  if (lv.L == 3) {
    const AttentionProblem p3 = level_problem(ap, 2, a.mem_k.shape[1]);
    attention_bwd_rows(p3, rows(a.q), rows(a.mem_k), rows(a.mem_v), lv.o[2], lse(2),
                       rows(a.dout), lv.w[2], dq_rows, rows(a.dmem_k), rows(a.dmem_v), io, s,
                       level_delta(2));
  }
  accumulate(dq_acc.as<float>(), a.dq, s, add);
}

}  // namespace mka::cuda
