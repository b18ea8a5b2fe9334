#include "mka/tile_plan.h"

#include <unistd.h>

#include "mka/error.h"

namespace mka {

size_t TilePlan::working_set(int block_q, int block_k, int stages, int head_dim,
                             int elem_bytes, int acc_bytes) {
  const size_t q = size_t(block_q) * head_dim * elem_bytes;
  const size_t kv = size_t(2) * stages * block_k * head_dim * elem_bytes;
  const size_t s = size_t(block_q) * block_k * acc_bytes;
  const size_t o = size_t(block_q) * head_dim * acc_bytes;
  return q + kv + s + o;
}

TilePlan plan_tiles(Target target, int head_dim, int elem_bytes, size_t budget_bytes) {
  MKA_CHECK(head_dim >= 1, "head_dim: must be at least 1, got ", head_dim);
  MKA_CHECK(elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8,
            "elem_bytes: must be 2, 4 or 8, got ", elem_bytes);
  // On the GPU the score tile and O accumulator live in registers, not shared memory; the
  // CPU keeps everything in cache. Accumulators are float32 except for float64 inputs.
  const int acc = elem_bytes == 8 ? 8 : 4;
  const int stages = target == Target::gpu ? 2 : 1;
  const int gpu_acc = target == Target::gpu ? 0 : acc;
  // Largest square-ish tiles first; tiles are multiples of 16 (tensor-core and SIMD width).
  static constexpr int kQ[] = {128, 64, 32, 16};
  static constexpr int kK[] = {128, 64, 32, 16};
  for (int bq : kQ)
    for (int bk : kK) {
      if (target == Target::cpu && (bq > 64 || bk > 64 * 8 / elem_bytes)) continue;
      if (bk > bq * 2) continue;
      const size_t bytes = TilePlan::working_set(bq, bk, stages, head_dim, elem_bytes, gpu_acc);
      if (bytes <= budget_bytes) return TilePlan{bq, bk, stages, bytes};
    }
  fail("plan_tiles: head_dim ", head_dim, " with ", elem_bytes,
       "-byte elements does not fit the on-chip budget of ", budget_bytes, " bytes");
}

size_t cpu_tile_budget() {
  // Half of a core's L2: the other half holds the K/V rows streaming through.
  long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 <= 0) l2 = 1 << 20;
  return size_t(l2) / 2;
}

}  // namespace mka
