// Launchers of the EMA-route scan: the forward single-pass (ema_scan_1pass.cuh) by default,
// else the chunked 3-pass scan (ema_scan.cuh), which serves every backward. Keys and values
// go in one launch per pass.
#include <cmath>

#include "scan/ema_scan.cuh"
#include "scan/ema_scan_1pass.cuh"
#include "ops/building_blocks.h"

namespace mka::cuda {
namespace {

ScanArgs scan_args(const RouteProblem& p, const TensorRef& lam, const ScanOperand& k,
                   const ScanOperand& v) {
  ScanArgs a;
  a.B = p.B, a.T = p.T, a.G = p.G, a.d = p.d;
  a.chunk = p.chunk > 0 ? p.chunk : ema_scan_chunk(p.B, p.T, p.G * p.d, p.kernels.scan);
  a.n_chunks = ceil_div(p.T, a.chunk);
  a.L = lam.present() ? int(p.L) : 2;
  a.beta = float(p.beta);
  a.w = {lam_level(lam, 0), lam_level(lam, 1), a.L == 3 ? lam_level(lam, 2) : TokenScalar{}};
  a.m[0] = k, a.m[1] = v;
  return a;
}

// Every view of both memories allows 16-byte accesses.
bool views_aligned16(const ScanArgs& a) {
  for (const ScanOperand& m : a.m)
    for (const Rows* x : {&m.x, &m.x3, &m.y, &m.dy, &m.dx, &m.dx3})
      if (!aligned16(*x)) return false;
  return true;
}
// Eight channels per thread when every view allows 16-byte accesses (see ema_scan.cuh).
int vector_width(const ScanArgs& a) { return a.d % 8 == 0 && views_aligned16(a) ? 8 : 1; }
// Calls f(std::integral_constant<int, V>) for this scan's vector width.
template <class F> void dispatch_width(const ScanArgs& a, F&& f) {
  if (vector_width(a) == 8) return f(std::integral_constant<int, 8>{});
  f(std::integral_constant<int, 1>{});
}

// Grids: channel blocks x chunks x (2 memories x batch) (per chunk, V channels per thread);
// channel blocks x 1 x (2 x batch) (carry, one channel per thread).
dim3 chunk_grid(const ScanArgs& a, int V) {
  return dim3(unsigned(ceil_div(a.channels(), kScanThreads * V)), unsigned(a.n_chunks),
              unsigned(2 * a.B));
}
dim3 carry_grid(const ScanArgs& a) {
  return dim3(unsigned(ceil_div(a.channels(), kScanThreads)), 1, unsigned(2 * a.B));
}

// Chunk start states of the forward scan into m.carry (the first two passes).
template <class T, int V> void forward_carries(const ScanArgs& a, cudaStream_t s) {
  if (a.n_chunks > 0) {
    ema_local_fwd<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
    check_launch("ema_local_fwd");
  }
  ema_carry_fwd<<<carry_grid(a), kScanThreads, 0, s>>>(a);
  check_launch("ema_carry_fwd");
}

size_t carry_bytes(const ScanArgs& a) { return size_t(a.B * a.n_chunks * a.channels()) * 4; }

// Scratch for the chunk states of both memories where the caller gave none.
struct CarryScratch {
  Workspace k, v;
  CarryScratch(ScanArgs& a, bool need, cudaStream_t s)
      : k(need && !a.m[0].carry ? carry_bytes(a) : 0, s, false),
        v(need && !a.m[1].carry ? carry_bytes(a) : 0, s, false) {
    if (!a.m[0].carry) a.m[0].carry = k.as<float>();
    if (!a.m[1].carry) a.m[1].carry = v.as<float>();
  }
};

// --- single pass --------------------------------------------------------------------------
// The single pass moves 16-byte pieces of 8 (half) or 4 (float) channels within a head;
// the 3-pass choice (ScanKernel::three_pass, with its own chunk) and other views take the
// 3-pass scan. Either forward leaves the chunk start states a 3-pass backward of the same
// chunk reads.
// Its scan runs in sigma form (divides by 1 - beta: not where beta rounds to 1 in float), and
// its index arithmetic in 32 bits.
bool single_pass(const ScanArgs& a, const RouteProblem& p) {
  const DType dt = p.dtype;
  const int64_t blocks = ceil_div(a.T, int64_t(kPassChunk)) * 2 * a.B *
                         ceil_div(a.channels(), int64_t(kScanThreads) * 2);
  return p.kernels.scan == ScanKernel::one_pass && kPassChunk % a.chunk == 0 &&
         a.n_chunks > 0 && a.d % (16 / dtype_bytes(dt)) == 0 && views_aligned16(a) &&
         1.f - a.beta > 0.f &&
         a.channels() < (int64_t(1) << 30) && blocks < (int64_t(1) << 31) - 1;
}

void unset(void* p, size_t bytes, cudaStream_t s) {
  check_cuda(cudaMemsetAsync(p, 0xff, bytes, s), "cudaMemsetAsync (scan)");
}
// One single-pass launch's aggregates of both memories, kUnset.
struct PassScratch {
  Workspace w;
  PassArgs pa;
  static size_t bytes(const ScanArgs& a) {  // one memory's
    return size_t(a.B * ceil_div(a.T, int64_t(kPassChunk)) * a.channels()) * 4;
  }
  PassScratch(const ScanArgs& a, cudaStream_t s) : w(2 * bytes(a), s, false) {
    unset(w.as<void>(), 2 * bytes(a), s);
    pa.agg[0] = w.as<float>();
    pa.agg[1] = pa.agg[0] + bytes(a) / 4;
    pa.n_cb = ceil_div(a.channels(), int64_t(kScanThreads) * 2);
    pa.n_blocks = ceil_div(a.T, int64_t(kPassChunk));
    pa.per_chunk = FastDiv(pa.n_cb * 2 * a.B), pa.cb = FastDiv(pa.n_cb), pa.d = FastDiv(a.d);
    pa.decay = float(std::pow(double(a.beta), double(kPassChunk)));
    pa.c = 1.f - a.beta, pa.inv_c = 1.f / pa.c;
  }
  unsigned blocks(const ScanArgs& a) const { return unsigned(pa.n_blocks * 2 * a.B * pa.n_cb); }
};
// The look-back polls chunk start states at block boundaries only: those rows of m.carry
// ((B, n_chunks, G*d), a boundary every kPassChunk / chunk rows of each sequence) start
// kUnset; where sequences do not start on a boundary row, all of it.
void unset_boundaries(const ScanArgs& a, float* carry, cudaStream_t s) {
  const size_t row = size_t(a.channels()) * 4, every = size_t(kPassChunk / a.chunk);
  if (a.n_chunks % int64_t(every) != 0) return unset(carry, carry_bytes(a), s);
  check_cuda(cudaMemset2DAsync(carry, every * row, 0xff, row, size_t(a.B * a.n_chunks) / every, s),
             "cudaMemset2DAsync (scan)");
}

// Level 3's views are read (the kernel stages them only then).
bool has3(const ScanArgs& a) { return a.L == 3 && (a.m[0].x3.data || a.m[1].x3.data); }

// Writes m.carry (both memories' chunk start states) and y.
template <class T> void single_pass_fwd(const ScanArgs& a, cudaStream_t s) {
  for (const ScanOperand& m : a.m) unset_boundaries(a, m.carry, s);
  PassScratch ps(a, s);
  const bool l3 = has3(a);
  auto kernel = l3 ? ema_route_fwd_1pass<T, true> : ema_route_fwd_1pass<T, false>;
  const size_t smem = stage_bytes<T>(l3 ? 2 : 1);
  set_smem(kernel, int(smem));
  kernel<<<ps.blocks(a), kScanThreads, smem, s>>>(a, ps.pa);
  check_launch("ema_route_fwd_1pass");
}

}  // namespace

size_t ema_carry_bytes(const RouteProblem& p) {
  return carry_bytes(scan_args(p, TensorRef{}, ScanOperand{}, ScanOperand{}));
}

void ema_route_fwd(const RouteProblem& p, const TensorRef& lam, ScanOperand k, ScanOperand v,
                   cudaStream_t s) {
  if (p.B == 0) return;
  ScanArgs a = scan_args(p, lam, k, v);
  CarryScratch scratch(a, true, s);
  dispatch_dtype(p.dtype, "ema_route", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (single_pass(a, p)) return single_pass_fwd<T>(a, s);
    dispatch_width(a, [&](auto width) {
      constexpr int V = decltype(width)::value;
      forward_carries<T, V>(a, s);
      if (a.n_chunks == 0) return;
      ema_route_out<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
      check_launch("ema_route_out");
    });
  });
}

ScanSumsScratch::ScanSumsScratch(const RouteProblem& p, const TensorRef& lam, cudaStream_t s)
    : k(ema_carry_bytes(p), s, false), v(ema_carry_bytes(p), s, false) {
  const ScanArgs a = scan_args(p, lam, {}, {});
  MKA_CHECK(a.chunk == 8 || a.chunk == 16, "ScanSums: chunk ", a.chunk, " (ema_attn_chunk)");
  sums.k = k.as<float>(), sums.v = v.as<float>();
  sums.l1 = a.w.l1, sums.beta = a.beta, sums.chunk = int(a.chunk), sums.n_chunks = a.n_chunks;
}

// The staged final pass (ema_route_dx_staged, with or without dlam): half precision in
// 16-byte pieces, given chunk sums and a chunk a warp's 16 attention rows hold.
template <class T> bool staged_dx(const ScanArgs& a, int V) {
  return sizeof(T) == 2 && V == 8 && (a.chunk == 8 || a.chunk == 16);
}
template <class T, int C> void launch_dx_staged(const ScanArgs& a, cudaStream_t s) {
  const auto launch = [&](auto kernel) {
    const size_t smem = dx_staged_smem_bytes(C, a.dlam, a.add);
    set_smem(kernel, int(smem));
    kernel<<<chunk_grid(a, 8), kScanThreads, smem, s>>>(a);
    check_launch("ema_route_dx_staged");
  };
  const bool l3 = a.L == 3;  // dx3 is written with or without dlam
  if (!a.dlam)
    return l3 ? launch(ema_route_dx_staged<T, C, false, true>)
              : launch(ema_route_dx_staged<T, C, false, false>);
  l3 ? launch(ema_route_dx_staged<T, C, true, true>) : launch(ema_route_dx_staged<T, C, true, false>);
}

void ema_route_bwd(const RouteProblem& p, const TensorRef& lam, ScanOperand k, ScanOperand v,
                   float* dlam, bool add, bool add_state, cudaStream_t s,
                   const ScanSums* sums) {
  if (p.B == 0) return;
  ScanArgs a = scan_args(p, lam, k, v);
  a.dlam = lam.present() ? dlam : nullptr;
  a.add = add, a.add_state = add_state;
  MKA_CHECK(!sums || (sums->chunk == a.chunk && sums->n_chunks == a.n_chunks),
            "ema_route_bwd: chunk sums of ", sums ? sums->chunk : 0, "-token chunks for a scan of ",
            a.chunk, "-token chunks");
  // dlam needs the forward EMA, recomputed chunk by chunk from the chunk start states: the
  // caller's (kept by the forward), or made here.
  const bool have_carries = a.m[0].carry && a.m[1].carry;
  CarryScratch scratch(a, a.dlam && !have_carries, s);
  Workspace rk(sums ? 0 : carry_bytes(a), s, false), rv(sums ? 0 : carry_bytes(a), s, false);
  a.m[0].rcarry = sums ? sums->k : rk.as<float>();
  a.m[1].rcarry = sums ? sums->v : rv.as<float>();
  dispatch_dtype(p.dtype, "ema_route backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_width(a, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const bool staged = sums && staged_dx<T>(a, V);
      if (a.n_chunks > 0) {
        if (a.dlam) {
          if (!have_carries) forward_carries<T, V>(a, s);
          if (!staged) {  // makes the chunk sums too (over any given: the same values)
            ema_route_dlam<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
            check_launch("ema_route_dlam");
          }
        } else if (!sums) {
          ema_local_bwd<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
          check_launch("ema_local_bwd");
        }
      }
      ema_carry_bwd<<<carry_grid(a), kScanThreads, 0, s>>>(a);
      check_launch("ema_carry_bwd");
      if (a.n_chunks == 0) return;
      if constexpr (sizeof(T) == 2) {
        if (staged) return a.chunk == 8 ? launch_dx_staged<T, 8>(a, s) : launch_dx_staged<T, 16>(a, s);
      }
      ema_route_dx<T, V><<<chunk_grid(a, V), kScanThreads, 0, s>>>(a);
      check_launch("ema_route_dx");
    });
  });
}

}  // namespace mka::cuda
