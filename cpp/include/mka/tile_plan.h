// TilePlan: block sizes of the tiled kernels, chosen from head dim, element size and the
// on-chip memory budget (a core's L2 share on CPU, shared memory per block on GPU).
#pragma once
#include <cstddef>
#include <cstdint>

namespace mka {

enum class Target : int { cpu, gpu };

struct TilePlan {
  int block_q = 0;    // query rows per tile
  int block_k = 0;    // key rows per tile
  int stages = 1;     // key/value tiles in flight (GPU pipelining)
  size_t bytes = 0;   // on-chip bytes the plan uses

  // Working set of one tile step: Q tile, K and V tiles (x stages), score tile, O accumulator.
  static size_t working_set(int block_q, int block_k, int stages, int head_dim, int elem_bytes,
                            int acc_bytes);
};

// Budget-aware choice. Throws mka::Error if even the smallest tile does not fit.
TilePlan plan_tiles(Target target, int head_dim, int elem_bytes, size_t budget_bytes);

// Budget of this machine's CPU core (per-core L2, from sysconf; 1 MiB if unknown).
size_t cpu_tile_budget();

}  // namespace mka
