// The test reference checks itself: every hand-derived backward of reference.h against
// central finite differences of its own forward, in float64 on tiny shapes. Without this
// a kernel and its reference could share one wrong derivation.
#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "reference.h"

namespace mka::test::ref {
namespace {

Vec random_vec(int64_t n, std::mt19937_64& rng, double lo = -1, double hi = 1) {
  std::uniform_real_distribution<double> u(lo, hi);
  Vec v(static_cast<size_t>(n));
  for (double& x : v) x = u(rng);
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) s += a[i] * b[i];
  return s;
}

// The scalar whose gradient the backward computes: sum over outputs of output * seed.
double loss(const Outputs& o, const Seeds& s) {
  return dot(o.out, s.dout) + dot(o.out2, s.dout2) + dot(o.k_state, s.dk_state) +
         dot(o.v_state, s.dv_state);
}

using Forward = std::function<Outputs(const Dims&, const Inputs&)>;
using Backward = std::function<Grads(const Dims&, const Inputs&, const Seeds&)>;

// Central differences of loss() for every element of every present input.
void expect_matches_finite_differences(const Dims& p, const Inputs& in, const Seeds& s,
                                       const Forward& fwd, const Backward& bwd) {
  const Grads g = bwd(p, in, s);
  const std::pair<Vec Inputs::*, const Vec Grads::*> pairs[] = {
      {&Inputs::q, &Grads::dq},         {&Inputs::k, &Grads::dk},
      {&Inputs::v, &Grads::dv},         {&Inputs::lam, &Grads::dlam},
      {&Inputs::k3, &Grads::dk3},       {&Inputs::v3, &Grads::dv3},
      {&Inputs::k_state, &Grads::dk_state}, {&Inputs::v_state, &Grads::dv_state},
      {&Inputs::mem_k, &Grads::dmem_k}, {&Inputs::mem_v, &Grads::dmem_v}};
  const double h = 1e-6;
  int checked = 0;
  for (const auto& [x, dx] : pairs) {
    if ((in.*x).empty()) continue;
    ASSERT_EQ((g.*dx).size(), (in.*x).size());
    Vec numeric((in.*x).size());
    for (size_t i = 0; i < numeric.size(); ++i) {
      Inputs plus = in, minus = in;
      (plus.*x)[i] += h;
      (minus.*x)[i] -= h;
      numeric[i] = (loss(fwd(p, plus), s) - loss(fwd(p, minus), s)) / (2 * h);
    }
    const double err = rel_err(g.*dx, numeric);
    EXPECT_TRUE(err < 1e-7) << "input #" << checked << ": relative error " << err;
    ++checked;
  }
  EXPECT_GT(checked, 2);
}

// GQA, window, Tq < Tk, L = 3 and states: every gradient path of the references.
struct Problem {
  Dims p;
  Inputs in;
  Seeds s;
};
Problem problem(bool mka_side, bool causal) {
  std::mt19937_64 rng(mka_side ? 7 : 13);
  Problem u;
  Dims& p = u.p;
  p.B = 2, p.Tq = 3, p.Tk = 5, p.H = 4, p.G = 2, p.d = 3, p.M = 2, p.L = 3;
  p.causal = causal, p.window = 3, p.scale = 0.6, p.beta = 0.7;
  const int64_t kv = p.B * p.Tk * p.G * p.d, st = p.B * p.G * p.d;
  u.in.q = random_vec(p.B * p.Tq * p.H * p.d, rng);
  u.in.k = random_vec(kv, rng), u.in.v = random_vec(kv, rng);
  u.in.lam = random_vec(p.B * (mka_side ? p.Tq : p.Tk) * p.L, rng, 0, 1);
  if (mka_side) {
    u.in.mem_k = random_vec(p.B * p.M * p.G * p.d, rng);
    u.in.mem_v = random_vec(p.B * p.M * p.G * p.d, rng);
  } else {
    u.in.k3 = random_vec(kv, rng), u.in.v3 = random_vec(kv, rng);
  }
  u.in.k_state = random_vec(st, rng), u.in.v_state = random_vec(st, rng);
  u.s.dk_state = random_vec(st, rng), u.s.dv_state = random_vec(st, rng);
  return u;
}

TEST(Reference, AttentionBackwardMatchesFiniteDifferences) {
  for (bool causal : {true, false}) {
    Problem u = problem(false, causal);
    std::mt19937_64 rng(1);
    u.s.dout = random_vec(int64_t(u.in.q.size()), rng);
    u.in.lam = u.in.k3 = u.in.v3 = u.in.k_state = u.in.v_state = {};
    expect_matches_finite_differences(u.p, u.in, u.s, attention, attention_bwd);
  }
}

TEST(Reference, RouteFuseBackwardMatchesFiniteDifferences) {
  Problem u = problem(false, true);
  std::mt19937_64 rng(2);
  u.s.dout = random_vec(int64_t(u.in.k.size()), rng);
  u.s.dout2 = random_vec(int64_t(u.in.v.size()), rng);
  u.in.q = {};  // not an input of route_fuse
  expect_matches_finite_differences(u.p, u.in, u.s, route_fuse, route_fuse_bwd);
}

TEST(Reference, FastMkaBackwardMatchesFiniteDifferences) {
  Problem u = problem(false, true);
  std::mt19937_64 rng(3);
  u.s.dout = random_vec(int64_t(u.in.q.size()), rng);
  expect_matches_finite_differences(u.p, u.in, u.s, fastmka, fastmka_bwd);
}

TEST(Reference, MkaBackwardMatchesFiniteDifferences) {
  Problem u = problem(true, true);
  std::mt19937_64 rng(4);
  u.s.dout = random_vec(int64_t(u.in.q.size()), rng);
  expect_matches_finite_differences(u.p, u.in, u.s, mka, mka_bwd);
}

// Spot values the formulas pin down exactly, independent of any derivation.
TEST(Reference, KnownValues) {
  Dims p;
  p.B = 1, p.Tq = 2, p.Tk = 2, p.H = 1, p.G = 1, p.d = 1, p.scale = 1.0;
  // Row 0 sees key 0 only: out = v0. Row 1 sees both with equal scores (q = 0): the mean.
  const Outputs a = attention(p, {{5.0, 0.0}, {1.0, 2.0}, {3.0, 7.0}});
  EXPECT_DOUBLE_EQ(a.out[0], 3.0);
  EXPECT_DOUBLE_EQ(a.out[1], 5.0);
  EXPECT_DOUBLE_EQ(a.lse[1], std::log(2.0));
  // Tq > Tk with bottom-right alignment: query 0 sees nothing -> zeros.
  p.Tq = 3;
  const Outputs b = attention(p, {{1.0, 1.0, 1.0}, {1.0, 2.0}, {3.0, 7.0}});
  EXPECT_EQ(b.out[0], 0.0);
  EXPECT_DOUBLE_EQ(b.out[1], 3.0);
  // EMA with beta = 0.5 from state 2: s = 0.5*2 + 0.5*4 = 3, then 0.5*3 + 0.5*1 = 2.
  p.Tk = 2, p.beta = 0.5, p.L = 2;
  const Outputs r = route_fuse(p, {{}, {4.0, 1.0}, {0.0, 0.0}, {0.0, 1.0, 0.0, 1.0}, {}, {},
                                   {2.0}, {0.0}});
  EXPECT_DOUBLE_EQ(r.out[0], 3.0);
  EXPECT_DOUBLE_EQ(r.out[1], 2.0);
  EXPECT_DOUBLE_EQ(r.k_state[0], 2.0);
}

}  // namespace
}  // namespace mka::test::ref
