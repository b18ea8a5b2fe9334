// The library's environment variables, parsed in one place (environment.cpp). Each only
// sets a default: the kernel options a call takes when its caller names none, the CPU
// thread count and the CPU's vector instruction set. docs/configuration.md lists them.
#pragma once
#include <cstdint>
#include <optional>

#include "mka/cpu/isa.h"
#include "mka/kernel_options.h"

namespace mka {

// MKA_CUDA_WGMMA (0 -> mma, lockstep, pingpong, tma), MKA_CUDA_SCAN (1pass, 3pass),
// MKA_CUDA_SCAN_THROUGH (0, 1), MKA_CUDA_RECALL (chunks, rows); unset: KernelOptions'
// defaults; other values raise.
KernelOptions kernel_options_from_environment();

// MKA_CUDA_RECALL_SCRATCH: bytes of float32 partials one slab of the chunk-major CUDA recall
// kernels may hold (cuda/memory/recall_attention.cu), or nullopt (unset); other values than a
// positive integer raise. A knob for tests and memory-tight runs, read at the first call.
std::optional<int64_t> recall_scratch_from_environment();

// MKA_CUDA_FWD_PERSISTENT (0, 1): whether the Hopper warp-specialised forward runs one block
// per query block (0) or its persistent kernel, one block per SM taking query blocks from a
// counter (1); nullopt (unset): the launcher's rule (persistent up to 1024 keys). Other values
// raise. Read at the first call.
std::optional<bool> fwd_persistent_from_environment();

// MKA_CUDA_BWD_BLOCK_M (64, 128): the query rows per step of the Hopper warp-specialised
// backward at d = 64 (128 by default; 64 with ScanThrough's dlam whatever it says); nullopt
// (unset): the default. Other values raise. Read at the first call.
std::optional<int> bwd_block_m_from_environment();

// MKA_CUDA_DECODE_CLUSTER (0, the default, or 2 to 16): the largest thread-block cluster in
// which the tensor-core paged decode kernel merges its key splits itself (sm_90), so that no
// combine kernel runs where the split plan gives at most that many splits; 0: always the
// combine kernel. Other values raise. Read at the first call that splits keys on that kernel.
int decode_cluster_from_environment();

// MKA_CUDA_DECODE_SPLITS (unset or 0: the split plan's; else a positive count): the number of
// key splits of every CUDA paged decode call, capped at one per 128 keys of the capacity (and
// at 1024) — for tuning the plan and for tests of the split and merge paths. Other values
// raise. Read at the first CUDA decode call.
int decode_splits_from_environment();

// MKA_NUM_THREADS: a positive thread count, or nullopt (unset or not a positive integer).
std::optional<int> num_threads_from_environment();

// MKA_CPU_ISA (generic, avx2): a cap on the detected instruction set, for testing every path.
std::optional<Isa> cpu_isa_cap_from_environment();

}  // namespace mka
