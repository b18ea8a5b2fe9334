// TilePlan: every plan fits its budget, tiles are multiples of 16, more budget never gives
// smaller tiles, the smallest plan is exactly the feasibility threshold, and the budgets
// the kernels really use (cpu_tile_budget, GPU shared memory) give useful tiles.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "mka/error.h"
#include "mka/tile_plan.h"

namespace mka {
namespace {

const Target kTargets[] = {Target::cpu, Target::gpu};
const int kElemBytes[] = {2, 4, 8};

std::vector<int> head_dims() {
  std::vector<int> d;
  for (int x = 16; x <= 256; x += 16) d.push_back(x);
  for (int x : {1, 7, 33, 65, 100, 255}) d.push_back(x);  // odd dims the CPU accepts
  return d;
}

std::string where(Target t, int d, int e, size_t budget) {
  return std::string(t == Target::cpu ? "cpu" : "gpu") + " d=" + std::to_string(d) +
         " elem=" + std::to_string(e) + " budget=" + std::to_string(budget);
}

// The smallest budget that plan_tiles accepts, by bisection (plans are monotone in budget).
size_t threshold(Target t, int d, int e) {
  size_t lo = 0, hi = size_t(1) << 30;  // lo fails, hi succeeds
  while (hi - lo > 1) {
    const size_t mid = lo + (hi - lo) / 2;
    try {
      plan_tiles(t, d, e, mid);
      hi = mid;
    } catch (const Error&) {
      lo = mid;
    }
  }
  return hi;
}

TEST(TilePlan, PlansFitTheBudgetWithTilesOfSixteen) {
  for (Target t : kTargets)
    for (int d : head_dims())
      for (int e : kElemBytes)
        for (size_t budget = size_t(1) << 14; budget <= size_t(1) << 22; budget += budget / 3) {
          TilePlan p;
          try {
            p = plan_tiles(t, d, e, budget);
          } catch (const Error&) {
            EXPECT_LT(budget, threshold(t, d, e)) << where(t, d, e, budget);
            continue;
          }
          SCOPED_TRACE(where(t, d, e, budget));
          EXPECT_LE(p.bytes, budget);
          EXPECT_GE(p.block_q, 16);
          EXPECT_GE(p.block_k, 16);
          EXPECT_EQ(p.block_q % 16, 0);
          EXPECT_EQ(p.block_k % 16, 0);
          EXPECT_GE(p.stages, 1);
          // The plan accounts at least for the Q tile and its K/V tiles in flight.
          EXPECT_GE(p.bytes, TilePlan::working_set(p.block_q, p.block_k, p.stages, d, e, 0));
        }
}

TEST(TilePlan, LargerBudgetsNeverGiveSmallerTiles) {
  for (Target t : kTargets)
    for (int d : head_dims())
      for (int e : kElemBytes) {
        TilePlan prev{};
        for (size_t budget = threshold(t, d, e); budget <= size_t(1) << 22; budget += budget / 8) {
          const TilePlan p = plan_tiles(t, d, e, budget);
          SCOPED_TRACE(where(t, d, e, budget));
          EXPECT_GE(p.block_q, prev.block_q);
          EXPECT_GE(int64_t(p.block_q) * p.block_k, int64_t(prev.block_q) * prev.block_k);
          EXPECT_GE(p.bytes, prev.bytes);
          prev = p;
        }
      }
}

// At the threshold the plan is the smallest tile and uses the budget exactly; one byte
// less throws an mka::Error that says what did not fit.
TEST(TilePlan, SmallestPlanIsTheFeasibilityThreshold) {
  for (Target t : kTargets)
    for (int d : head_dims())
      for (int e : kElemBytes) {
        const size_t min_budget = threshold(t, d, e);
        SCOPED_TRACE(where(t, d, e, min_budget));
        const TilePlan p = plan_tiles(t, d, e, min_budget);
        EXPECT_EQ(p.block_q, 16);
        EXPECT_EQ(p.block_k, 16);
        EXPECT_EQ(p.bytes, min_budget);
        try {
          plan_tiles(t, d, e, min_budget - 1);
          ADD_FAILURE() << "expected mka::Error";
        } catch (const Error& err) {
          EXPECT_NE(std::string(err.what()).find("budget"), std::string::npos) << err.what();
        }
      }
}

TEST(TilePlan, ImpossibleRequestsThrowNamingTheArgument) {
  for (Target t : kTargets) {
    EXPECT_THROW(plan_tiles(t, 64, 4, 0), Error);
    EXPECT_THROW(plan_tiles(t, 64, 4, 1024), Error);
    for (int d : {0, -16}) {
      try {
        plan_tiles(t, d, 4, size_t(1) << 20);
        ADD_FAILURE() << "head_dim " << d << " accepted";
      } catch (const Error& err) {
        EXPECT_NE(std::string(err.what()).find("head_dim"), std::string::npos) << err.what();
      }
    }
    for (int e : {0, 1, 3, 16}) {
      try {
        plan_tiles(t, 64, e, size_t(1) << 20);
        ADD_FAILURE() << "elem_bytes " << e << " accepted";
      } catch (const Error& err) {
        EXPECT_NE(std::string(err.what()).find("elem_bytes"), std::string::npos) << err.what();
      }
    }
  }
}

// CPU plans keep one K/V tile in cache; GPU plans keep several in flight (pipelining).
TEST(TilePlan, GpuPlansPipelineCpuPlansDoNot) {
  for (int d : head_dims())
    for (int e : kElemBytes) {
      const size_t budget = size_t(1) << 20;
      const TilePlan cpu = plan_tiles(Target::cpu, d, e, budget);
      const TilePlan gpu = plan_tiles(Target::gpu, d, e, budget);
      SCOPED_TRACE(where(Target::gpu, d, e, budget));
      EXPECT_EQ(cpu.stages, 1);
      EXPECT_GE(gpu.stages, 2);
    }
}

// Shared memory per block of the GPUs we target: the head dims CUDA serves get full tiles.
TEST(TilePlan, GpuSharedMemoryBudgetsGiveUsefulTiles) {
  for (size_t smem : {size_t(99) << 10, size_t(163) << 10, size_t(227) << 10})
    for (int d : {64, 128})
      for (int e : {2, 4}) {
        const TilePlan p = plan_tiles(Target::gpu, d, e, smem);
        SCOPED_TRACE(where(Target::gpu, d, e, smem));
        EXPECT_GE(p.block_q, 64);
        EXPECT_GE(p.block_q * p.block_k, 64 * 32);
      }
}

TEST(TilePlan, CpuTileBudgetIsSane) {
  const size_t b = cpu_tile_budget();
  EXPECT_GE(b, size_t(16) << 10);   // no CPU has less than 32 KiB of L2 per core
  EXPECT_LE(b, size_t(512) << 20);  // nor half a GiB
  EXPECT_EQ(b, cpu_tile_budget());  // a property of the machine, not of the call
}

// The kernels plan with cpu_tile_budget() for every head dim the CPU accepts (d <= 256,
// float32 and float64): that must succeed, or attention throws for a valid input.
TEST(TilePlan, CpuBudgetServesEveryCpuHeadDim) {
  for (int d = 1; d <= 256; ++d)
    for (int e : {4, 8}) {
      EXPECT_NO_THROW(plan_tiles(Target::cpu, d, e, cpu_tile_budget())) << "d=" << d
                                                                        << " elem=" << e;
    }
}

}  // namespace
}  // namespace mka
