// Launchers of the chunked EMA-route scan (ema_scan.cuh).
#include <optional>

#include "ema_scan.cuh"
#include "launchers.h"

namespace mka::cuda {
namespace {

ScanArgs scan_args(const RouteProblem& p, const TensorRef& lam, Rows x, Rows x3,
                   StateView state_in) {
  ScanArgs a;
  a.B = p.B, a.T = p.T, a.G = p.G, a.d = p.d;
  a.chunk = ema_scan_chunk(p.B, p.T, p.G * p.d);  // mka/problem.h
  a.n_chunks = ceil_div(p.T, a.chunk);
  a.L = lam.present() ? int(p.L) : 2;
  a.beta = float(p.beta);
  a.w = {lam_level(lam, 0), lam_level(lam, 1), a.L == 3 ? lam_level(lam, 2) : TokenScalar{}};
  a.x = x, a.x3 = x3, a.state_in = state_in;
  return a;
}

// Eight channels per thread when every view allows 16-byte accesses (see ema_scan.cuh).
int vector_width(const ScanArgs& a) {
  if (a.d % 8 != 0) return 1;
  for (const Rows* x : {&a.x, &a.x3, &a.y, &a.dy, &a.dx, &a.dx3})
    if (!aligned16(*x)) return 1;
  return 8;
}
// Calls f(std::integral_constant<int, V>) for this scan's vector width.
template <class F> void dispatch_width(const ScanArgs& a, F&& f) {
  if (vector_width(a) == 8) return f(std::integral_constant<int, 8>{});
  f(std::integral_constant<int, 1>{});
}

// Grids: channel blocks x chunks x batch (per chunk, V channels per thread), channel blocks
// x 1 x batch (carry, one channel per thread).
dim3 chunk_grid(const ScanArgs& a, int V) {
  return dim3(unsigned(ceil_div(a.channels(), kScanThreads * V)), unsigned(a.n_chunks),
              unsigned(a.B));
}
dim3 carry_grid(const ScanArgs& a) {
  return dim3(unsigned(ceil_div(a.channels(), kScanThreads)), 1, unsigned(a.B));
}

// Chunk start states of the forward scan into a.carry (the first two passes).
template <class T, int V> void forward_carries(ScanArgs& a, cudaStream_t s) {
  if (a.n_chunks > 0) {
    ema_local_fwd<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
    check_launch("ema_local_fwd");
  }
  ema_carry_fwd<<<carry_grid(a), kScanThreads, 0, s>>>(a);
  check_launch("ema_carry_fwd");
}

size_t carry_bytes(const ScanArgs& a) { return size_t(a.B * a.n_chunks * a.channels()) * 4; }

}  // namespace

size_t ema_carry_bytes(const RouteProblem& p) {
  return carry_bytes(scan_args(p, TensorRef{}, Rows{}, Rows{}, StateView{}));
}

void ema_route_fwd(const RouteProblem& p, const TensorRef& lam, Rows x, Rows x3,
                   StateView state_in, Rows y, StateView state_out, cudaStream_t s,
                   float* carry_out) {
  if (p.B == 0) return;
  ScanArgs a = scan_args(p, lam, x, x3, state_in);
  a.y = y, a.state_out = state_out;
  Workspace carry(carry_out ? 0 : carry_bytes(a), s, false);
  a.carry = carry_out ? carry_out : carry.as<float>();
  dispatch_dtype(p.dtype, "ema_route", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_width(a, [&](auto width) {
      constexpr int V = decltype(width)::value;
      forward_carries<T, V>(a, s);
      if (a.n_chunks == 0) return;
      ema_route_out<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
      check_launch("ema_route_out");
    });
  });
}

namespace {
template <class T, int V> void backward_passes(ScanArgs& a, bool have_carries, cudaStream_t s) {
  if (a.n_chunks > 0) {
    if (a.dlam) {  // dlam needs the forward EMA, recomputed chunk by chunk from its carries
      if (!have_carries) forward_carries<T, V>(a, s);
      ema_route_dlam<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
      check_launch("ema_route_dlam");
    } else {
      ema_local_bwd<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
      check_launch("ema_local_bwd");
    }
  }
  ema_carry_bwd<<<carry_grid(a), kScanThreads, 0, s>>>(a);
  check_launch("ema_carry_bwd");
  if (a.n_chunks > 0) {
    ema_route_dx<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
    check_launch("ema_route_dx");
  }
}
}  // namespace

void ema_route_bwd(const RouteProblem& p, const TensorRef& lam, Rows x, Rows x3,
                   StateView state_in, Rows dy, StateView dstate_out, Rows dx, Rows dx3,
                   float* dlam, StateView dstate_in, bool add, cudaStream_t s,
                   const float* fwd_carry, std::optional<bool> add_state) {
  if (p.B == 0) return;
  ScanArgs a = scan_args(p, lam, x, x3, state_in);
  a.dy = dy, a.dstate_out = dstate_out, a.dx = dx, a.dx3 = dx3, a.dstate_in = dstate_in;
  a.dlam = lam.present() ? dlam : nullptr;
  a.add = add;
  a.add_state = add_state.value_or(add);
  const bool have = fwd_carry != nullptr;
  Workspace carry(a.dlam && !have ? carry_bytes(a) : 0, s, false), rcarry(carry_bytes(a), s, false);
  a.carry = have ? const_cast<float*>(fwd_carry) : carry.as<float>();
  a.rcarry = rcarry.as<float>();
  dispatch_dtype(p.dtype, "ema_route backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_width(a, [&](auto width) { backward_passes<T, decltype(width)::value>(a, have, s); });
  });
}

}  // namespace mka::cuda
