// attention on the GPU: launchers. Half-precision inputs with 16-byte aligned rows take the
// tensor-core kernels; float32 (and unaligned views) take the float32 CUDA-core kernels.
// Attention dropout runs in the kernels' dropout instantiations (their kDrop flag). On Hopper
// the wgmma backwards and forwards have one.
#include <algorithm>

#include "attention/bwd_mma.cuh"
#include "attention/bwd_wgmma.cuh"
#include "attention/bwd_wgmma_ws.cuh"
#include "attention/fwd_mma.cuh"
#include "attention/fwd_wgmma.cuh"
#include "attention/fwd_wgmma_pingpong.cuh"
#include "attention/fwd_wgmma_tma.cuh"
#include "attention/fwd_wgmma_tma_persistent.cuh"
#include "attention/simt.cuh"
#include "ops/building_blocks.h"
#include "mka/cuda/kernels.h"
#include "mka/environment.h"
#include "mka/tile_plan.h"

namespace mka::cuda {
namespace {

// Shared memory a forward block may plan with: two mma.sync blocks per SM fit on sm_80 and
// sm_90; the Hopper kernel runs one 8-warp block per SM with deeper tiles.
constexpr size_t kFwdSmemBudget = 96 * 1024;
constexpr size_t kWgmmaSmemBudget = 160 * 1024;

bool use_tensor_cores(const AttentionProblem& p, std::initializer_list<Rows> views) {
  if (p.dtype != DType::f16 && p.dtype != DType::bf16) return false;
  for (const Rows& x : views)
    if (!aligned16(x)) return false;
  return true;
}

// Calls f(std::integral_constant<int, d>) for the supported head dims.
template <class F> void dispatch_head_dim(int64_t d, F&& f) {
  if (d == 64) return f(std::integral_constant<int, 64>{});
  if (d == 128) return f(std::integral_constant<int, 128>{});
  fail("attention: head dim ", d, " has no CUDA kernel (64 or 128)");
}

// A (B, Tk, G, d) key-side view in p.dtype as a tensor (for accumulate's zero fill).
TensorRef kv_view(const Rows& x, const AttentionProblem& p) {
  TensorRef t;
  t.data = x.data, t.ndim = 4, t.dtype = p.dtype, t.device = Device::cuda;
  const int64_t shape[4] = {p.B, p.Tk, p.G, p.d}, stride[4] = {x.sb, x.st, x.sh, 1};
  for (int i = 0; i < 4; ++i) t.shape[i] = shape[i], t.stride[i] = stride[i];
  return t;
}

// The Hopper (wgmma) kernels run where the loaded image is sm_90a code, i.e. on an sm_90
// device of a build that includes arch 90a.
template <class Kernel> bool has_sm90a_image(Kernel k) {
  static KernelMemo images;  // per kernel and device: the query costs host time every call
  return images.get(reinterpret_cast<const void*>(k), [&] {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, k) != cudaSuccess) {
      (void)cudaGetLastError();  // no image for this device: not an error of this call
      return 0;
    }
    return int(attr.binaryVersion == 90);
  }) != 0;
}

// The warp-specialised forward, where TMA can describe the views (16-byte strides, a driver
// with the encoder); false: the caller takes the ping-pong kernel.
template <class T, int D, int BN> bool fwd_wgmma_tma(const AttnParams& a, cudaStream_t s) {
  FwdMaps maps;
  if (a.Tk < 1 || !rows_tensor_map(&maps.q, a.q, a.B, a.Tq, a.H, D, kWgBlockM) ||
      !rows_tensor_map(&maps.k, a.k, a.B, a.Tk, a.G, D, BN) ||
      !rows_tensor_map(&maps.v, a.v, a.B, a.Tk, a.G, D, BN))
    return false;
  // Persistent up to 1024 keys: there a block's few tile steps leave its prologue and
  // write-out exposed, which the persistent kernel's producer overlaps with the next item's
  // loads (measured 1.05-1.08x at 1k causal, 0.91-0.96x from 4k on an H100: kernels.md §4).
  // Its item counter stays in 32 bits: more items take the one-block-per-item grid.
  static const std::optional<bool> persistent_env = fwd_persistent_from_environment();
  const int64_t items = ceil_div(a.Tq, kWgBlockM) * a.H * a.B;
  if (persistent_env.value_or(a.Tk <= 1024) && items <= int64_t(INT32_MAX)) {
    // one block per SM, taking items (128 query rows of one head)
    if (items < 1) return false;
    constexpr int smem = tma_fwd_persistent_smem_bytes<D, BN>();
    auto kernel = a.dropout.active() ? attention_fwd_wgmma_tma_persistent<T, D, BN, true>
                                     : attention_fwd_wgmma_tma_persistent<T, D, BN>;
    set_smem(kernel, smem);
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    Workspace next_item(sizeof(unsigned), s, true);
    maps.next_item = next_item.as<unsigned>();
    kernel<<<unsigned(std::min<int64_t>(items, num_sms(device))), kTmaThreads, smem, s>>>(maps, a);
    check_launch("attention_fwd_wgmma_tma_persistent");
    return true;
  }
  constexpr int smem = tma_fwd_smem_bytes<D, BN>();
  auto kernel = a.dropout.active() ? attention_fwd_wgmma_tma<T, D, BN, true>
                                   : attention_fwd_wgmma_tma<T, D, BN>;
  set_smem(kernel, smem);
  const dim3 grid(unsigned(ceil_div(a.Tq, kWgBlockM)), unsigned(a.H), unsigned(a.B));
  maps.next_item = nullptr;
  kernel<<<grid, kTmaThreads, smem, s>>>(maps, a);
  check_launch("attention_fwd_wgmma_tma");
  return true;
}

// The forward on Hopper: by default the three-stage ping-pong pipeline (in interleaved A/B
// rounds it matched or beat the two-stage lockstep one at every length measured:
// docs/kernels.md); the warp-specialised one where asked for.
template <class T, int D> bool fwd_wgmma(const AttnParams& a, AttnKernel kernel_choice,
                                         cudaStream_t s) {
  constexpr int BN = 128;
  if (kernel_choice == AttnKernel::mma || !has_sm90a_image(attention_fwd_wgmma<T, D, BN>))
    return false;
  const bool drop = a.dropout.active();
  const TilePlan plan = plan_tiles(Target::gpu, D, 2, kWgmmaSmemBudget);
  MKA_CHECK(plan.block_q == kWgBlockM && plan.block_k == BN,
            "attention: TilePlan (", plan.block_q, "x", plan.block_k,
            ") has no compiled wgmma kernel for head dim ", D);
  if (kernel_choice == AttnKernel::tma && fwd_wgmma_tma<T, D, BN>(a, s)) return true;
  const bool pp = kernel_choice != AttnKernel::lockstep;
  const int smem = pp ? wg_fwd_smem_bytes<D, BN, 3>() : wg_fwd_smem_bytes<D, BN, 2>();
  auto kernel = pp ? (drop ? attention_fwd_wgmma_pp<T, D, BN, true> : attention_fwd_wgmma_pp<T, D, BN>)
                   : (drop ? attention_fwd_wgmma<T, D, BN, true> : attention_fwd_wgmma<T, D, BN>);
  set_smem(kernel, smem);
  const dim3 grid(unsigned(ceil_div(a.Tq, kWgBlockM)), unsigned(a.H), unsigned(a.B));
  kernel<<<grid, kWgThreads, smem, s>>>(a);
  check_launch(pp ? "attention_fwd_wgmma_pp" : "attention_fwd_wgmma");
  return true;
}

template <class T, int D> void fwd_tensor_cores(const AttnParams& a, AttnKernel kernel_choice,
                                                cudaStream_t s) {
  if (fwd_wgmma<T, D>(a, kernel_choice, s)) return;
  // The kernel is compiled for the tile sizes TilePlan picks for this head dim and budget.
  constexpr int BN = D == 64 ? 128 : 64;
  const TilePlan plan = plan_tiles(Target::gpu, D, 2, kFwdSmemBudget);
  MKA_CHECK(plan.block_q == kFwdBlockM && plan.block_k == BN,
            "attention: TilePlan (", plan.block_q, "x", plan.block_k,
            ") has no compiled tensor-core kernel for head dim ", D);
  constexpr int smem = fwd_smem_bytes<D, BN>();
  auto kernel = a.dropout.active() ? attention_fwd_mma<T, D, BN, true>
                                   : attention_fwd_mma<T, D, BN, false>;
  set_smem(kernel, smem);
  const dim3 grid(unsigned(ceil_div(a.Tq, kFwdBlockM)), unsigned(a.H), unsigned(a.B));
  kernel<<<grid, kFwdThreads, smem, s>>>(a);
  check_launch("attention_fwd_mma");
}

// The warp-specialised backward, where TMA can describe the views and statistics (and d = 64
// with ScanThrough's dlam: its shared memory); false: the caller takes the lockstep one. BM:
// query rows per step.
template <class T, int D, int BM> bool bwd_wgmma_ws(const AttnParams& a, cudaStream_t s) {
  const bool dlam = a.scan.link && a.scan.dlam;
  if (a.Tk < 1 || (dlam && !ws_bwd_takes_dlam<D, BM>())) return false;
  BwdMaps maps;
  const int64_t rows = a.B * a.H * a.Tq, w_rows = a.w.data ? a.B * a.Tq : 0;
  Workspace w(size_t(w_rows) * 4, s, false);  // row weights as float32 (ws_row_weights)
  constexpr int box = ws_stat_box<BM>();
  if (!floats_tensor_map(&maps.lse, a.lse, rows, box) ||
      !floats_tensor_map(&maps.delta, a.delta, rows, box) ||
      (w_rows && !floats_tensor_map(&maps.w, w.as<float>(), w_rows, box)) ||
      !rows_tensor_map(&maps.q, a.q, a.B, a.Tq, a.H, D, BM) ||
      !rows_tensor_map(&maps.dout, a.dout, a.B, a.Tq, a.H, D, BM) ||
      !rows_tensor_map(&maps.k, a.k, a.B, a.Tk, a.G, D, kWgBwdBlockN) ||
      !rows_tensor_map(&maps.v, a.v, a.B, a.Tk, a.G, D, kWgBwdBlockN) ||
      !rows_tensor_map_f32(&maps.dq, a.dq, a.B, a.Tq, a.H, D, kWsDqRows))
    return false;
  if (w_rows) {
    ws_row_weights<<<unsigned(ceil_div(w_rows, int64_t(256))), 256, 0, s>>>(a.w, w.as<float>(), a.Tq,
                                                                          w_rows);
    check_launch("ws_row_weights");
  }
  auto kernel = a.dropout.active() ? attention_bwd_wgmma_ws<T, D, BM, true> : attention_bwd_wgmma_ws<T, D, BM>;
  const int smem = ws_bwd_smem_bytes<D, BM>(dlam);
  set_smem(kernel, smem);
  const dim3 grid(unsigned(ceil_div(a.Tk, kWgBwdBlockN)), unsigned(a.G), unsigned(a.B));
  kernel<<<grid, kWsBwdThreads, smem, s>>>(maps, a);
  check_launch("attention_bwd_wgmma_ws");
  return true;
}
// 128 query rows per step at d = 64 (MKA_CUDA_BWD_BLOCK_M=64: 64), except with ScanThrough's
// dlam, whose region fits only beside the 64-row stages; 64 at d = 128.
template <class T, int D> bool bwd_wgmma_ws(const AttnParams& a, cudaStream_t s) {
  static const int block_m = bwd_block_m_from_environment().value_or(128);
  if constexpr (D == 64)
    if (block_m == 128 && !(a.scan.link && a.scan.dlam)) return bwd_wgmma_ws<T, D, 128>(a, s);
  return bwd_wgmma_ws<T, D, 64>(a, s);
}

// The backward on Hopper: warp-specialised with the `tma` kernels (the default), else the
// lockstep kernel (also where TMA cannot describe a view, and d = 128 with ScanThrough's dlam).
template <class T, int D> bool bwd_wgmma(const AttnParams& a, AttnKernel kernel_choice,
                                         cudaStream_t s) {
  auto kernel = a.dropout.active() ? attention_bwd_wgmma<T, D, true> : attention_bwd_wgmma<T, D>;
  if (kernel_choice == AttnKernel::mma || !has_sm90a_image(kernel)) return false;
  // 32-bit positions in their masks (wg_bwd_key_band) and statistics' TMA coordinates.
  if (a.Tq + a.Tk >= (int64_t(1) << 30) || a.B * a.H * a.Tq >= (int64_t(1) << 31)) return false;
  if (kernel_choice == AttnKernel::tma && bwd_wgmma_ws<T, D>(a, s)) return true;
  const int smem = wg_bwd_smem_bytes<D>() + (a.scan.dlam ? wg_bwd_dlam_smem_bytes<D>() : 0);
  set_smem(kernel, smem);
  if (a.Tk > 0) {
    const dim3 grid(unsigned(ceil_div(a.Tk, kWgBwdBlockN)), unsigned(a.G), unsigned(a.B));
    kernel<<<grid, kWgBwdThreads, smem, s>>>(a);
    check_launch("attention_bwd_wgmma");
  }
  return true;
}

template <class T, int D> void bwd_tensor_cores(const AttnParams& a, AttnKernel kernel_choice,
                                                cudaStream_t s) {
  if (bwd_wgmma<T, D>(a, kernel_choice, s)) return;
  MKA_CHECK(!a.scan.link, "attention backward: ScanThrough needs the wgmma kernel");
  constexpr int smem = bwd_smem_bytes<D>();
  auto kernel = a.dropout.active() ? attention_bwd_mma<T, D, true> : attention_bwd_mma<T, D, false>;
  set_smem(kernel, smem);
  if (a.Tk > 0) {
    const dim3 grid(unsigned(ceil_div(a.Tk, kBwdBlockN)), unsigned(a.G), unsigned(a.B));
    kernel<<<grid, kBwdThreads, smem, s>>>(a);
    check_launch("attention_bwd_mma");
  }
}

}  // namespace

void attention_fwd_rows(const AttentionProblem& p, Rows q, Rows k, Rows v, Rows out, float* lse,
                        cudaStream_t s, bool out_f32) {
  if (p.B == 0 || p.Tq == 0 || p.H == 0) return;
  AttnParams a = attn_params(p);
  a.q = q, a.k = k, a.v = v, a.out = out, a.lse = lse, a.out_f32 = out_f32;
  const bool tc = use_tensor_cores(p, {q, k, v, out});
  dispatch_dtype(p.dtype, "attention", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dispatch_head_dim(p.d, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if constexpr (!std::is_same_v<T, float>) {
        if (tc) return fwd_tensor_cores<T, D>(a, p.kernels.attention, s);
      }
      const dim3 grid(unsigned(ceil_div(p.Tq, kSimtWarps)), unsigned(p.H), unsigned(p.B));
      auto kernel = a.dropout.active() ? attention_fwd_simt<T, D / 32, true>
                                       : attention_fwd_simt<T, D / 32, false>;
      kernel<<<grid, kSimtWarps * 32, 0, s>>>(a);
      check_launch("attention_fwd_simt");
    });
  });
}

namespace {

// Bytes of ScanThrough::link for p: aggregates and end values per key block and memory.
size_t scan_link_bytes(const AttentionProblem& p) {
  return size_t(2 * p.B * ceil_div(p.Tk, int64_t(kWgBwdBlockN)) * 2 * p.G * p.d) * 4;
}

}  // namespace

bool attention_bwd_can_scan(const AttentionProblem& p, std::initializer_list<Rows> views,
                            bool dlam) {
  // The wgmma backward runs ScanThrough (with or without dropout).
  if (!p.kernels.scan_through || p.B == 0 || p.Tq == 0 || p.Tk == 0 || p.H == 0 ||
      (p.d != 64 && p.d != 128) || !use_tensor_cores(p, views) ||
      p.kernels.attention == AttnKernel::mma)
    return false;
  const auto image = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return p.d == 64 ? has_sm90a_image(attention_bwd_wgmma<T, 64>)
                     : has_sm90a_image(attention_bwd_wgmma<T, 128>);  // kDrop: the same image
  };
  if (!(p.dtype == DType::bf16 ? image(static_cast<__nv_bfloat16*>(nullptr))
                               : image(static_cast<__half*>(nullptr))))
    return false;
  int device = 0, sms = 0, smem = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  const int need = p.d == 64 ? wg_bwd_smem_bytes<64>() + wg_bwd_dlam_smem_bytes<64>()
                             : wg_bwd_smem_bytes<128>() + wg_bwd_dlam_smem_bytes<128>();
  return ceil_div(p.Tk, int64_t(kWgBwdBlockN)) <= sms && (!dlam || need <= smem);
}

ScanThroughScratch::ScanThroughScratch(const AttentionProblem& p, float beta, TokenScalar l0,
                                       TokenScalar l1, const StateView (&dstate_out)[2],
                                       const StateView (&dstate_in)[2], bool add_state,
                                       cudaStream_t s)
    : link(scan_link_bytes(p), s, false) {
  if (scan_link_bytes(p) > 0)
    check_cuda(cudaMemsetAsync(link.as<void>(), 0xff, scan_link_bytes(p), s), "cudaMemsetAsync");
  scan.link = link.as<float>();
  scan.n_blocks = ceil_div(p.Tk, int64_t(kWgBwdBlockN));
  scan.beta = beta, scan.l0 = l0, scan.l1 = l1, scan.add_state = add_state;
  for (int m = 0; m < 2; ++m) scan.dstate_out[m] = dstate_out[m], scan.dstate_in[m] = dstate_in[m];
}

bool attention_bwd_rows(const AttentionProblem& p, Rows q, Rows k, Rows v, Rows out,
                        const float* lse, Rows dout, TokenScalar w, Rows dq, Rows dk, Rows dv,
                        KVGrad kv_grad, cudaStream_t s, const float* delta_in,
                        const ScanSums& sums, const ScanThrough& scan, bool zero_dq) {
  MKA_CHECK(!zero_dq || !delta_in, "attention backward: zero_dq needs the delta kernel");
  if (p.B == 0) return false;
  MKA_CHECK(!scan.link || (p.Tq > 0 && p.H > 0 && p.Tk > 0),
            "attention backward: ScanThrough without queries or keys");
  if (p.Tq == 0 || p.H == 0) {  // no query: nothing flows; stored dk/dv must still be zeros
    if (kv_grad == KVGrad::store_io)
      for (const Rows* x : {&dk, &dv}) accumulate(nullptr, kv_view(*x, p), s, false);
    return false;
  }
  AttnParams a = attn_params(p);
  a.q = q, a.k = k, a.v = v, a.out = out, a.lse = const_cast<float*>(lse);
  a.dout = dout, a.dq = dq, a.dk = dk, a.dv = dv, a.w = w, a.kv_grad = kv_grad;
  Workspace delta(delta_in ? 0 : size_t(p.B * p.H * p.Tq) * 4, s, false);
  a.delta = delta_in ? const_cast<float*>(delta_in) : delta.as<float>();
  a.zero_dq = zero_dq;
  // With delta given, out is not read; dk, dv are written in 16-byte pieces.
  const bool tc = use_tensor_cores(p, {q, k, v, delta_in ? Rows{} : out, dout, dk, dv});
  // Both tensor-core kernels make the scan sums in their write-out (bwd_rows.cuh).
  if (tc) a.sums = sums;
  MKA_CHECK(!scan.link || tc, "attention backward: ScanThrough needs the tensor-core kernels");
  a.scan = scan;  // only where attention_bwd_can_scan; bwd_tensor_cores checks the kernel
  dispatch_dtype(p.dtype, "attention backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t rows_total = p.B * p.Tq * p.H;
    if (!delta_in) {
      if (p.d % 8 == 0 && aligned16(out) && aligned16(dout))
        attention_bwd_delta<T, 8><<<unsigned(ceil_div(rows_total * 16, 256)), 256, 0, s>>>(a);
      else
        attention_bwd_delta<T, 1><<<unsigned(ceil_div(rows_total * 32, 256)), 256, 0, s>>>(a);
      check_launch("attention_bwd_delta");
    }
    dispatch_head_dim(p.d, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if constexpr (!std::is_same_v<T, float>) {
        if (tc) return bwd_tensor_cores<T, D>(a, p.kernels.attention, s);
      }
      const bool drop = a.dropout.active();
      const dim3 qgrid(unsigned(ceil_div(p.Tq, kSimtWarps)), unsigned(p.H), unsigned(p.B));
      auto dq_kernel = drop ? attention_bwd_dq_simt<T, D / 32, true>
                            : attention_bwd_dq_simt<T, D / 32, false>;
      dq_kernel<<<qgrid, kSimtWarps * 32, 0, s>>>(a);
      check_launch("attention_bwd_dq_simt");
      if (p.Tk == 0) return;
      const dim3 kgrid(unsigned(ceil_div(p.Tk, kSimtWarps)), unsigned(p.G), unsigned(p.B));
      auto dkdv_kernel = drop ? attention_bwd_dkdv_simt<T, D / 32, true>
                              : attention_bwd_dkdv_simt<T, D / 32, false>;
      dkdv_kernel<<<kgrid, kSimtWarps * 32, 0, s>>>(a);
      check_launch("attention_bwd_dkdv_simt");
    });
  });
  return tc && sums.k;
}

void attention_fwd(const AttentionProblem& p, const AttentionFwd& a) {
  if (decode_shaped(p)) return decode_attention(p, a);
  DeviceGuard guard(a.q.device_id);
  attention_fwd_rows(p, rows(a.q), rows(a.k), rows(a.v), rows(a.out),
                     static_cast<float*>(a.lse.data), static_cast<cudaStream_t>(a.launch.stream));
}

void attention_bwd(const AttentionProblem& p, const AttentionBwd& a) {
  DeviceGuard guard(a.q.device_id);
  auto s = static_cast<cudaStream_t>(a.launch.stream);
  // dq gathers every key block's share in float32 (atomics or TMA reductions), rounded once at
  // the end; a key block's dk and dv come from one thread block, which adds or stores them
  // itself. The delta kernel zeroes dq (one launch fewer than a memset).
  Workspace dq_acc(size_t(p.B * p.Tq * p.H * p.d) * 4, s, false);
  attention_bwd_rows(p, rows(a.q), rows(a.k), rows(a.v), rows(a.out),
                     static_cast<const float*>(a.lse.data), rows(a.dout), TokenScalar{},
                     dense_rows(dq_acc.as<float>(), p.Tq, p.H, p.d), rows(a.dk), rows(a.dv),
                     a.accumulate ? KVGrad::add_io : KVGrad::store_io, s, nullptr, {}, {}, true);
  accumulate(dq_acc.as<float>(), a.dq, s, a.accumulate);
}

}  // namespace mka::cuda
