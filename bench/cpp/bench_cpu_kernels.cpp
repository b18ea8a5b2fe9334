// Google Benchmark of the CPU kernels through mka/ops.h: attention forward, attention
// forward+backward, fastmka forward and mka forward; float32, B = 1, H = G = 8, d = 64,
// causal, T in {256, 1024}. Counters: items/s (items = tokens) and GFLOP/s, counting the
// two attention matmuls only: forward 4*B*H*T^2*d halved for causal, backward 2.5x forward
// (EMA and routing are O(T*d) and not counted; mka runs one attention per level, L = 2).
#include <benchmark/benchmark.h>

#include <random>
#include <string>

#include "host_tensor.h"
#include "mka/cpu/isa.h"
#include "mka/ops.h"
#include "mka/cpu/thread_pool.h"
#include "mka/tile_plan.h"

namespace {

using mka::DType;
using mka::RouteInputs;
using mka::test::HostTensor;

constexpr int64_t kB = 1, kH = 8, kD = 64, kL = 2;
constexpr double kBeta = 0.9;

double causal_attention_flops(int64_t T) { return 4.0 * kB * kH * T * T * kD / 2; }

void report(benchmark::State& state, int64_t T, double flops_per_iteration) {
  state.SetItemsProcessed(state.iterations() * kB * T);
  state.counters["GFLOP"] = benchmark::Counter(
      flops_per_iteration * double(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

// Random q, k, v (B, T, H, d) and softmax-like routing rows lam (B, T, L).
struct Inputs {
  explicit Inputs(int64_t T) {
    std::mt19937_64 rng(T);
    q = HostTensor::random(DType::f32, {kB, T, kH, kD}, rng);
    k = HostTensor::random(DType::f32, {kB, T, kH, kD}, rng);
    v = HostTensor::random(DType::f32, {kB, T, kH, kD}, rng);
    lam = HostTensor::random(DType::f32, {kB, T, kL}, rng, 0, 0.05, 1.0);
    for (int64_t row = 0; row < kB * T; ++row) {
      const double s = lam.get(row * kL) + lam.get(row * kL + 1);
      for (int64_t l = 0; l < kL; ++l) lam.set(row * kL + l, lam.get(row * kL + l) / s);
    }
  }
  RouteInputs route() const { return {lam.ref(), kBeta, {}, {}, {}, {}}; }
  HostTensor q, k, v, lam;
};

void BM_attention_fwd(benchmark::State& state) {
  const int64_t T = state.range(0);
  const Inputs in(T);
  HostTensor out(DType::f32, {kB, T, kH, kD}), lse(DType::f32, {kB, kH, T});
  mka::AttentionFwd f;
  f.q = in.q, f.k = in.k, f.v = in.v, f.out = out, f.lse = lse;
  for (auto _ : state) {
    mka::attention_forward(f);
    benchmark::ClobberMemory();
  }
  report(state, T, causal_attention_flops(T));
}

// Forward, then backward into gradient buffers zeroed each step (the kernels accumulate).
void BM_attention_fwd_bwd(benchmark::State& state) {
  const int64_t T = state.range(0);
  const Inputs in(T);
  HostTensor out(DType::f32, {kB, T, kH, kD}), lse(DType::f32, {kB, kH, T});
  std::mt19937_64 rng(1);
  const HostTensor dout = HostTensor::random(DType::f32, {kB, T, kH, kD}, rng);
  HostTensor dq(DType::f32, {kB, T, kH, kD}), dk(DType::f32, {kB, T, kH, kD}),
      dv(DType::f32, {kB, T, kH, kD});
  mka::AttentionFwd f;
  f.q = in.q, f.k = in.k, f.v = in.v, f.out = out, f.lse = lse;
  mka::AttentionBwd b;
  b.q = in.q, b.k = in.k, b.v = in.v, b.out = out, b.lse = lse, b.dout = dout;
  b.dq = dq, b.dk = dk, b.dv = dv;
  for (auto _ : state) {
    mka::attention_forward(f);
    dq.zero(), dk.zero(), dv.zero();
    mka::attention_backward(b);
    benchmark::ClobberMemory();
  }
  report(state, T, 3.5 * causal_attention_flops(T));
}

void BM_fastmka_fwd(benchmark::State& state) {
  const int64_t T = state.range(0);
  const Inputs in(T);
  HostTensor out(DType::f32, {kB, T, kH, kD}), lse(DType::f32, {kB, kH, T});
  HostTensor ks(DType::f32, {kB, kH, kD}), vs(DType::f32, {kB, kH, kD});
  mka::FastmkaFwd f;
  f.q = in.q, f.k = in.k, f.v = in.v, f.route = in.route(), f.out = out, f.lse = lse;
  f.k_state_out = ks, f.v_state_out = vs;
  for (auto _ : state) {
    mka::fastmka_forward(f);
    benchmark::ClobberMemory();
  }
  report(state, T, causal_attention_flops(T));
}

void BM_mka_fwd(benchmark::State& state) {
  const int64_t T = state.range(0);
  const Inputs in(T);
  HostTensor out(DType::f32, {kB, T, kH, kD});
  HostTensor o_levels(DType::f32, {kL, kB, T, kH, kD}), lse_levels(DType::f32, {kL, kB, kH, T});
  HostTensor ks(DType::f32, {kB, kH, kD}), vs(DType::f32, {kB, kH, kD});
  mka::MkaFwd f;
  f.q = in.q, f.k = in.k, f.v = in.v, f.route = in.route(), f.out = out, f.o_levels = o_levels;
  f.lse_levels = lse_levels, f.k_state_out = ks, f.v_state_out = vs;
  for (auto _ : state) {
    mka::mka_forward(f);
    benchmark::ClobberMemory();
  }
  report(state, T, kL * causal_attention_flops(T));
}

// Wall time: the kernels run on the worker pool, so the main thread's CPU time says little.
#define MKA_BENCH(fn) \
  BENCHMARK(fn)->ArgName("T")->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime()
MKA_BENCH(BM_attention_fwd);
MKA_BENCH(BM_attention_fwd_bwd);
MKA_BENCH(BM_fastmka_fwd);
MKA_BENCH(BM_mka_fwd);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("mka_isa", mka::isa_name(mka::cpu_isa()));
  benchmark::AddCustomContext("mka_threads", std::to_string(mka::num_threads()));
  benchmark::AddCustomContext("mka_cpu_tile_budget_bytes", std::to_string(mka::cpu_tile_budget()));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
