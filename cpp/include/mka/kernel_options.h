// Which CUDA kernels an op runs. Chosen by the caller per call (the Python layer reads
// mka.use_kernels / mka.set_kernels at forward time and passes the same value to the
// backward, whose kernels depend on what the forward left behind). The CPU kernels have one
// path per op and ignore it. Nothing here reads the environment.
#pragma once

namespace mka {

// The attention kernels on tensor cores. pingpong, lockstep and tma run the Hopper (wgmma) kernels
// where the device is sm_90 and the build has sm_90a code, else the mma.sync ones.
enum class AttnKernel : int {
  pingpong,  // wgmma; forward in a three-stage ping-pong pipeline
  lockstep,  // wgmma; forward in the two-stage lockstep pipeline
  mma,       // the sm_80 mma.sync kernels in both directions
  tma,       // wgmma; forward and backward warp-specialised: a TMA producer, two consumers
};

// The EMA-route scan's forward on the GPU.
enum class ScanKernel : int {
  one_pass,    // single pass with decoupled look-back (32-token chunks)
  three_pass,  // local, carry and final passes over chunks sized by ema_scan_chunk
};

// The recall op's tensor-core kernels (16-bit inputs, head dim 64 or 128;
// cuda/memory/recall_attention.cu says when each wins).
enum class RecallKernel : int {
  chunks,  // chunk-major: each chosen chunk's keys read once per kv head, partials merged
  rows,    // row-major: a block per row block reads the chunks its rows chose
};

// The options' names across the native boundary, in enum order.
inline constexpr const char* kAttnKernelNames[] = {"pingpong", "lockstep", "mma", "tma"};
inline constexpr const char* kScanKernelNames[] = {"1pass", "3pass"};
inline constexpr const char* kRecallKernelNames[] = {"chunks", "rows"};

struct KernelOptions {
  AttnKernel attention = AttnKernel::tma;
  ScanKernel scan = ScanKernel::one_pass;
  // fastmka's and mka's EMA backward inside the Hopper attention backward's write-out, where
  // it can run (attention_bwd_can_scan); false: separate scan passes.
  bool scan_through = true;
  RecallKernel recall = RecallKernel::chunks;
};

}  // namespace mka
