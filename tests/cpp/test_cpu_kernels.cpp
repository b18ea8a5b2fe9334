// The CPU kernels, reached through the ops of mka/ops.h, against the naive float64
// reference (reference.h): every output and every gradient, float64 and float32, over
// GQA/MQA, causal or not, windows, Tq < Tk and Tq > Tk, EMA states, L = 2/3, odd and
// empty sizes and strided (padded) tensors. Also: the thread pool gives bit-identical
// results with 1 and 2 threads, and a sequence fused in pieces equals one call.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <thread>
#include <vector>

#include "host_tensor.h"
#include "mka/ops.h"
#include "mka/cpu/thread_pool.h"
#include "op_harness.h"

namespace mka::test {
namespace {

// B, Tq, Tk, H, G, d, M, L, causal, window, scale (overridden), beta.
std::vector<Case> cases() {
  return {
      {"mha_causal", {2, 33, 33, 2, 2, 16, 0, 2, true, -1, 0, 0.9}},
      {"gqa_noncausal_l3", {1, 7, 7, 4, 2, 8, 0, 3, false, -1, 0, 0.6}, {}, States::both},
      {"mqa_window", {2, 40, 40, 3, 1, 7, 0, 2, true, 5, 0, 0.8}, {}, States::both},
      {"kv_cache_tq_lt_tk", {1, 5, 33, 4, 2, 16, 9, 3, true, -1, 0, 0.7}, {}, States::both},
      {"decode_one_query", {2, 1, 33, 2, 1, 33, 7, 3, true, 8, 0, 0.5}, {}, States::k_only},
      {"tq_gt_tk_rows_see_nothing", {1, 9, 4, 2, 2, 8, 0, 2, true, -1, 0, 0.5}, {}, States::v_only},
      {"unit_sizes", {1, 1, 1, 1, 1, 1, 1, 3, true, -1, 0, 0.3}, {}, States::both},
      {"tiles_window_noncausal", {1, 150, 150, 2, 1, 16, 0, 2, false, 70, 0, 0.9}},
      {"tiles_causal_window_cache", {1, 70, 140, 2, 1, 16, 0, 2, true, 50, 0, 0.95}, {}, States::both},
      {"head_dim_256", {1, 20, 20, 2, 1, 256, 5, 3, true, -1, 0, 0.9}, {}, States::both},
      {"head_dim_65_chunks", {2, 17, 19, 2, 2, 65, 0, 2, true, -1, 0, 0.9}, {}, States::both},
      {"strided_views", {2, 21, 21, 4, 2, 16, 6, 3, true, 6, 0, 0.8}, {}, States::both, true, 3},
      {"custom_scale", {1, 12, 12, 2, 2, 8, 0, 2, true, -1, 0, 0.5}, 0.37},
      {"no_state_seeds", {1, 11, 11, 2, 1, 8, 0, 2, true, -1, 0, 0.5}, {}, States::both, false},
      {"no_route_grads", {1, 10, 10, 2, 1, 8, 4, 3, true, -1, 0, 0.5}, {}, States::both, true, 0,
       false},
      {"beta_zero", {1, 9, 9, 2, 1, 8, 0, 3, true, -1, 0, 0.0}, {}, States::both},
      {"empty_batch", {0, 5, 5, 2, 1, 8, 3, 3, true, -1, 0, 0.5}, {}, States::both},
      {"empty_queries", {2, 0, 6, 2, 1, 8, 3, 3, true, -1, 0, 0.5}, {}, States::both},
      {"empty_keys", {2, 4, 0, 2, 1, 8, 3, 3, true, -1, 0, 0.5}, {}, States::both},
      {"empty_memory", {1, 6, 6, 2, 2, 8, 0, 3, true, -1, 0, 0.5}, {}, States::both},
  };
}

// Softmax statistics are compared on rows that see at least one key; other rows' values
// are the kernels' own business (-inf by convention) and are masked on both sides.
void mask_empty_rows(Vec& got, Vec& want) {
  if (got.size() != want.size()) return;
  for (size_t i = 0; i < want.size(); ++i)
    if (std::isinf(want[i]) && want[i] < 0) got[i] = want[i] = 0;
}

// Every output and gradient of one run within SPEC §5's tolerance of the reference.
void expect_matches_reference(const OpRun& run, DType dtype) {
  Result got = run.native();
  Result want = run.reference();
  const double tol = tolerance(dtype);
  for (const Field& f : fields(got, want)) {
    ASSERT_EQ(f.got->size(), f.want->size()) << f.name << ": present on one side only";
    const double err = rel_err(*f.got, *f.want);
    EXPECT_TRUE(err < tol) << f.name << ": relative error " << err << " (tolerance " << tol << ")";
  }
  mask_empty_rows(got.out.lse, want.out.lse);
  const double lse_err = rel_err(got.out.lse, want.out.lse);
  EXPECT_TRUE(lse_err < tol) << "lse: relative error " << lse_err;
  EXPECT_TRUE(got.padding_intact) << "a kernel wrote outside an output's strided view";
}

std::string dtype_op_name(const ::testing::TestParamInfo<std::tuple<DType, Op>>& info) {
  return std::string(dtype_name(std::get<0>(info.param))) + "_" + op_name(std::get<1>(info.param));
}

using Param = std::tuple<Case, DType, Op>;

class CpuKernel : public ::testing::TestWithParam<Param> {};

TEST_P(CpuKernel, MatchesFloat64Reference) {
  const auto& [c, dtype, op] = GetParam();
  const OpRun run(op, c, dtype, /*seed=*/std::hash<std::string>{}(c.name + op_name(op)));
  expect_matches_reference(run, dtype);
}

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  const auto& [c, dtype, op] = info.param;
  return c.name + "_" + dtype_name(dtype) + "_" + op_name(op);
}

INSTANTIATE_TEST_SUITE_P(Ops, CpuKernel,
                         ::testing::Combine(::testing::ValuesIn(cases()),
                                            ::testing::Values(DType::f64, DType::f32),
                                            ::testing::Values(Op::attention, Op::route_fuse,
                                                              Op::fastmka, Op::mka)),
                         param_name);

// Random problems beyond the hand-picked cases: any mix of sizes (zeros included), heads,
// windows down to 1, levels, states and strides. Seeded, so a failure names a replayable case.
class RandomProblems : public ::testing::TestWithParam<std::tuple<DType, Op>> {};

TEST_P(RandomProblems, MatchFloat64Reference) {
  const auto& [dtype, op] = GetParam();
  std::mt19937_64 rng(1234 + int(op));
  auto pick = [&](int64_t lo, int64_t hi) {  // uniform in [lo, hi]
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  for (int n = 0; n < 25; ++n) {
    Case c;
    ref::Dims& p = c.dims;
    p.B = pick(0, 2), p.Tq = pick(0, 40), p.Tk = pick(0, 40), p.G = pick(1, 3);
    p.H = p.G * pick(1, 3), p.d = pick(1, 70), p.L = pick(2, 3), p.M = pick(0, 5);
    p.causal = pick(0, 3) > 0;
    p.window = pick(0, 1) ? pick(1, 12) : -1;
    p.beta = pick(0, 99) / 100.0;
    if (pick(0, 1)) c.scale = pick(1, 20) / 10.0;
    c.states = States(pick(0, 3));
    c.state_seeds = pick(0, 1);
    c.pad = pick(0, 1) * 2;
    c.route_grads = pick(0, 3) > 0;
    c.name = "random_" + std::to_string(n);
    SCOPED_TRACE(::testing::PrintToString(c));
    expect_matches_reference(OpRun(op, c, dtype, rng()), dtype);
  }
}

INSTANTIATE_TEST_SUITE_P(Ops, RandomProblems,
                         ::testing::Combine(::testing::Values(DType::f64, DType::f32),
                                            ::testing::Values(Op::attention, Op::route_fuse,
                                                              Op::fastmka, Op::mka)),
                         dtype_op_name);

// --- the thread pool ----------------------------------------------------------------

// Restores the default pool size however a test ends.
struct ThreadsGuard {
  ~ThreadsGuard() { set_num_threads(0); }
};

TEST(ThreadPool, SetNumThreadsIsObserved) {
  ThreadsGuard guard;
  set_num_threads(1);
  EXPECT_EQ(num_threads(), 1);
  set_num_threads(2);
  EXPECT_EQ(num_threads(), 2);
  set_num_threads(3);
  EXPECT_EQ(num_threads(), 3);
}

TEST(ThreadPool, ParallelForVisitsEveryIndexOnce) {
  ThreadsGuard guard;
  for (int threads : {1, 2, 4})
    for (int64_t n : {0, 1, 2, 7, 1000}) {
      set_num_threads(threads);
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      parallel_for(n, [&](int64_t i) { hits[size_t(i)].fetch_add(1); });
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(hits[size_t(i)].load(), 1) << "index " << i << " of " << n << ", " << threads
                                             << " threads";
    }
}

TEST(ThreadPool, NestedCallsRunAndComplete) {
  ThreadsGuard guard;
  set_num_threads(2);
  std::atomic<int64_t> sum{0};
  parallel_for(8, [&](int64_t i) { parallel_for(5, [&](int64_t j) { sum += i * 5 + j; }); });
  EXPECT_EQ(sum.load(), 40 * 39 / 2);
}

// The caller does not wait for workers that wake late: such a worker must neither repeat nor
// skip an item of the job after the one it woke for (items are claimed per generation).
TEST(ThreadPool, LateWorkersNeverRepeatOrSkipItems) {
  ThreadsGuard guard;
  set_num_threads(4);
  for (int job = 0; job < 20000; ++job) {
    const int64_t n = 2 + job % 5;
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    parallel_for(n, [&](int64_t i) { hits[size_t(i)].fetch_add(1); });
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(hits[size_t(i)].load(), 1) << "job " << job << ", index " << i;
  }
}

// Many consecutive jobs: a worker that misses a wake-up would hang here.
TEST(ThreadPool, ManyShortJobsComplete) {
  ThreadsGuard guard;
  set_num_threads(2);
  std::atomic<int64_t> sum{0};
  for (int rep = 0; rep < 2000; ++rep) parallel_for(3, [&](int64_t i) { sum += i; });
  EXPECT_EQ(sum.load(), 2000 * 3);
}

// Every op's outputs and gradients are bit-identical with 1 and 2 threads: no reduction
// depends on which worker ran which task.
class ThreadCount : public ::testing::TestWithParam<std::tuple<DType, Op>> {};

TEST_P(ThreadCount, OneAndTwoThreadsAgreeBitwise) {
  const auto& [dtype, op] = GetParam();
  ThreadsGuard guard;
  const Case c{"threads", {2, 37, 45, 4, 2, 24, 5, 3, true, 30, 0, 0.8}, {}, States::both};
  const OpRun run(op, c, dtype, /*seed=*/11);
  set_num_threads(1);
  const Result one = run.native();
  set_num_threads(2);
  const Result two = run.native();
  for (const Field& f : fields(one, two)) EXPECT_EQ(*f.got, *f.want) << f.name;
  EXPECT_EQ(one.out.lse, two.out.lse) << "lse";
}

INSTANTIATE_TEST_SUITE_P(Ops, ThreadCount,
                         ::testing::Combine(::testing::Values(DType::f64, DType::f32),
                                            ::testing::Values(Op::attention, Op::route_fuse,
                                                              Op::fastmka, Op::mka)),
                         dtype_op_name);

// Two caller threads running ops at once (as PyTorch's inter-op threads may) share the
// pool: both finish, and each gets exactly its single-caller result.
TEST(ThreadPool, ConcurrentCallersGetTheirOwnResults) {
  ThreadsGuard guard;
  set_num_threads(2);
  const Case c{"concurrent", {1, 29, 29, 4, 2, 16, 3, 3, true, 9, 0, 0.7}, {}, States::both};
  const OpRun runs[2] = {OpRun(Op::mka, c, DType::f64, 21), OpRun(Op::fastmka, c, DType::f32, 22)};
  const Result alone[2] = {runs[0].native(), runs[1].native()};
  Result shared[2][10];
  std::thread callers[2];
  for (int t = 0; t < 2; ++t)
    callers[t] = std::thread([&, t] {
      for (Result& r : shared[t]) r = runs[t].native();
    });
  for (std::thread& th : callers) th.join();
  for (int t = 0; t < 2; ++t)
    for (const Result& r : shared[t])
      for (const Field& f : fields(r, alone[t])) ASSERT_EQ(*f.got, *f.want) << f.name;
}

// --- chunked processing (SPEC §2) ---------------------------------------------------

// route_fuse over [0, T1) and then [T1, T) with the returned states equals one call.
TEST(RouteFuseChunks, PiecesWithStateEqualOneCall) {
  std::mt19937_64 rng(5);
  const int64_t B = 2, T = 23, T1 = 9, G = 2, d = 12;
  const double beta = 0.85;
  auto k = HostTensor::random(DType::f64, {B, T, G, d}, rng);
  auto v = HostTensor::random(DType::f64, {B, T, G, d}, rng);
  auto lam = HostTensor::random(DType::f64, {B, T, 2}, rng, 0, 0.0, 1.0);
  auto slice = [](const HostTensor& x, int64_t t0, int64_t t1) {  // tokens [t0, t1)
    std::vector<int64_t> shape = x.shape();
    const int64_t T = shape[1];
    shape[1] = t1 - t0;
    HostTensor s(x.ref().dtype, shape);
    const int64_t inner = x.numel() / (shape[0] * T);
    for (int64_t b = 0; b < shape[0]; ++b)
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t i = 0; i < inner; ++i)
          s.set((b * (t1 - t0) + t - t0) * inner + i, x.get((b * T + t) * inner + i));
    return s;
  };
  auto fuse = [&](int64_t t0, int64_t t1, const HostTensor& ks, const HostTensor& vs,
                  HostTensor& ks_out, HostTensor& vs_out) {
    const HostTensor kc = slice(k, t0, t1), vc = slice(v, t0, t1), lc = slice(lam, t0, t1);
    HostTensor kf(DType::f64, kc.shape()), vf(DType::f64, vc.shape());
    RouteFuseFwd f;
    f.k = kc, f.v = vc, f.route = RouteInputs{lc.ref(), beta, {}, {}, ks.ref(), vs.ref()};
    f.k_fused = kf, f.v_fused = vf, f.k_state_out = ks_out, f.v_state_out = vs_out;
    route_fuse_forward(f);
    return std::pair{kf, vf};
  };
  HostTensor ks_all(DType::f64, {B, G, d}), vs_all(DType::f64, {B, G, d});
  const auto [kf_all, vf_all] = fuse(0, T, HostTensor(), HostTensor(), ks_all, vs_all);
  HostTensor ks1(DType::f64, {B, G, d}), vs1(DType::f64, {B, G, d});
  HostTensor ks2(DType::f64, {B, G, d}), vs2(DType::f64, {B, G, d});
  const auto [kf1, vf1] = fuse(0, T1, HostTensor(), HostTensor(), ks1, vs1);
  const auto [kf2, vf2] = fuse(T1, T, ks1, vs1, ks2, vs2);
  EXPECT_LT(rel_err(slice(kf_all, 0, T1).values(), kf1.values()), 1e-14);
  EXPECT_LT(rel_err(slice(kf_all, T1, T).values(), kf2.values()), 1e-14);
  EXPECT_LT(rel_err(slice(vf_all, T1, T).values(), vf2.values()), 1e-14);
  EXPECT_LT(rel_err(ks_all.values(), ks2.values()), 1e-14);
  EXPECT_LT(rel_err(vs_all.values(), vs2.values()), 1e-14);
}

}  // namespace
}  // namespace mka::test
