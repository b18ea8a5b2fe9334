// Validation of SPEC §4 (problem.h): good inputs pass and give the right problem; every
// bad input throws mka::Error whose message starts with the argument's name and says what
// was expected. The ops of ops.h run the same checks (plus their buffers') first.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "host_tensor.h"
#include "mka/error.h"
#include "mka/ops.h"
#include "mka/problem.h"

namespace mka::test {
namespace {

// Views with one property changed. Validation reads only shapes, strides, dtype and
// device, so a view may describe more than its storage holds.
TensorRef on(Device dev, int id, TensorRef r) {
  r.device = dev;
  r.device_id = id;
  return r;
}
TensorRef with_dtype(DType dt, TensorRef r) {
  r.dtype = dt;
  return r;
}
TensorRef with_dim(int dim, int64_t n, TensorRef r) {
  r.shape[dim] = n;
  return r;
}
TensorRef with_last_stride(int64_t s, TensorRef r) {
  r.stride[r.ndim - 1] = s;
  return r;
}
TensorRef dropping_last_dim(TensorRef r) {
  --r.ndim;
  return r;
}
TensorRef adding_dim(TensorRef r) {
  r.shape[r.ndim] = 1;
  r.stride[r.ndim] = 1;
  ++r.ndim;
  return r;
}
const TensorRef kAbsent{};

// `stmt` throws mka::Error whose message starts with "<arg>:" and contains every fragment.
void expect_error(const std::function<void()>& stmt, const std::string& arg,
                  const std::vector<std::string>& fragments, int line) {
  SCOPED_TRACE("from line " + std::to_string(line));
  try {
    stmt();
    ADD_FAILURE() << "no error; expected one naming '" << arg << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(arg + ":", 0), 0u) << "message does not start with '" << arg
                                           << ":': " << msg;
    for (const std::string& f : fragments)
      EXPECT_NE(msg.find(f), std::string::npos) << "message lacks '" << f << "': " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not an mka::Error: " << e.what();
  }
}
#define EXPECT_MKA_ERROR(stmt, arg, ...) expect_error([&] { stmt; }, arg, {__VA_ARGS__}, __LINE__)

// --- check_attention ------------------------------------------------------------------

struct AttentionInputs : ::testing::Test {
  HostTensor q{DType::f32, {2, 5, 4, 16}}, k{DType::f32, {2, 7, 2, 16}},
      v{DType::f32, {2, 7, 2, 16}};
  AttnOptions o;
  AttentionProblem check(const TensorRef& q_, const TensorRef& k_, const TensorRef& v_) {
    return check_attention(q_, k_, v_, o);
  }
};

// A window of Tk keys or more hides none: no window, whatever its size (the visibility
// bounds' arithmetic stays in range); a scale float32 kernels cannot take is refused.
TEST_F(AttentionInputs, HugeWindowIsNoWindowAndScaleFitsFloat32) {
  for (int64_t w : {int64_t(7), int64_t(1) << 62, INT64_MAX}) {
    o.window = w;
    EXPECT_EQ(check(q, k, v).window, -1) << w;
  }
  o.window = 6;
  EXPECT_EQ(check(q, k, v).window, 6);
  o.window.reset();
  o.scale = 3e38;
  EXPECT_MKA_ERROR(check(q, k, v), "scale", "float32");
  const HostTensor q64(DType::f64, {2, 5, 4, 16}), k64(DType::f64, {2, 7, 2, 16});
  EXPECT_DOUBLE_EQ(check(q64, k64, k64).scale, 3e38);
}

TEST_F(AttentionInputs, GoodInputsGiveTheProblem) {
  const AttentionProblem p = check(q, k, v);
  EXPECT_EQ(p.B, 2);
  EXPECT_EQ(p.Tq, 5);
  EXPECT_EQ(p.Tk, 7);
  EXPECT_EQ(p.H, 4);
  EXPECT_EQ(p.G, 2);
  EXPECT_EQ(p.d, 16);
  EXPECT_EQ(p.group(), 2);
  EXPECT_TRUE(p.causal);
  EXPECT_DOUBLE_EQ(p.scale, 0.25);
  EXPECT_EQ(p.window, -1);
  EXPECT_EQ(p.dtype, DType::f32);
  EXPECT_EQ(p.device, Device::cpu);

  o.causal = false, o.scale = 0.5, o.window = 3;
  const AttentionProblem p2 = check(q, k, v);
  EXPECT_FALSE(p2.causal);
  EXPECT_DOUBLE_EQ(p2.scale, 0.5);
  EXPECT_EQ(p2.window, 3);
}

TEST_F(AttentionInputs, AcceptsEveryValidVariant) {
  const HostTensor q64(DType::f64, {2, 5, 4, 16}), k64(DType::f64, {2, 7, 2, 16});
  EXPECT_NO_THROW(check(q64, k64, k64));
  const HostTensor mq(DType::f32, {2, 7, 1, 16});  // MQA
  EXPECT_NO_THROW(check(q, mq, mq));
  for (int dim : {0, 1}) {  // empty batch or tokens
    EXPECT_NO_THROW(check(with_dim(dim, 0, q), with_dim(dim, 0, k), with_dim(dim, 0, v)));
  }
  EXPECT_NO_THROW(check(q, with_dim(1, 0, k), with_dim(1, 0, v)));  // Tk = 0
  // Empty tensors: strides are never used, so any last stride passes.
  EXPECT_NO_THROW(check(with_last_stride(7, with_dim(0, 0, q)), with_dim(0, 0, k),
                        with_last_stride(0, with_dim(0, 0, v))));
  const HostTensor q1(DType::f32, {2, 5, 4, 1}), k1(DType::f32, {2, 7, 2, 1});
  EXPECT_NO_THROW(check(with_last_stride(3, q1), k1, k1));  // a size-1 dim has no stride
  const HostTensor q256(DType::f64, {1, 2, 1, 256});
  EXPECT_NO_THROW(check(q256, q256, q256));
  const HostTensor qs(DType::f32, {2, 5, 4, 16}, /*pad=*/5);  // strided outer dims
  EXPECT_NO_THROW(check(qs, k, v));
  for (DType dt : {DType::f16, DType::bf16, DType::f32})
    for (int64_t d : {64, 128}) {
      const HostTensor qc(dt, {1, 3, 2, d});
      EXPECT_NO_THROW(check(on(Device::cuda, 1, qc), on(Device::cuda, 1, qc),
                            on(Device::cuda, 1, qc)));
    }
}

TEST_F(AttentionInputs, MissingOrWrongRank) {
  EXPECT_MKA_ERROR(check(kAbsent, k, v), "q", "None");
  EXPECT_MKA_ERROR(check(q, kAbsent, v), "k", "None");
  EXPECT_MKA_ERROR(check(q, k, kAbsent), "v", "None");
  EXPECT_MKA_ERROR(check(dropping_last_dim(q), k, v), "q", "4-d", "(B, Tq, H, d)");
  EXPECT_MKA_ERROR(check(q, adding_dim(k), v), "k", "4-d");
  EXPECT_MKA_ERROR(check(q, k, dropping_last_dim(v)), "v", "4-d");
}

TEST_F(AttentionInputs, MismatchedShapes) {
  EXPECT_MKA_ERROR(check(q, with_dim(0, 3, k), v), "k", "dim 0 = 2", "(3, 7, 2, 16)");
  EXPECT_MKA_ERROR(check(q, with_dim(3, 8, k), v), "k", "dim 3 = 16");
  EXPECT_MKA_ERROR(check(q, k, with_dim(1, 6, v)), "v", "k's");
  EXPECT_MKA_ERROR(check(q, k, with_dim(2, 1, v)), "v", "k's");
  EXPECT_MKA_ERROR(check(q, k, with_dim(0, 1, v)), "v");
  EXPECT_MKA_ERROR(check(q, k, with_dim(3, 8, v)), "v");
}

TEST_F(AttentionInputs, HeadsMustGroup) {
  EXPECT_MKA_ERROR(check(q, with_dim(2, 3, k), with_dim(2, 3, v)), "q", "H = 4", "G = 3");
  EXPECT_MKA_ERROR(check(with_dim(2, 6, q), with_dim(2, 4, k), with_dim(2, 4, v)), "q",
                   "multiple");
  EXPECT_MKA_ERROR(check(q, with_dim(2, 0, k), with_dim(2, 0, v)), "k", "G = 0");
}

TEST_F(AttentionInputs, HeadDimsPerDevice) {
  EXPECT_MKA_ERROR(check(with_dim(3, 0, q), with_dim(3, 0, k), with_dim(3, 0, v)), "q",
                   "head dim");
  EXPECT_MKA_ERROR(check(with_dim(3, 257, q), with_dim(3, 257, k), with_dim(3, 257, v)), "q",
                   "257", "cpu");
  for (int64_t d : {16, 32, 96, 256}) {
    const TensorRef qc = on(Device::cuda, 0, with_dim(3, d, q)),
                    kc = on(Device::cuda, 0, with_dim(3, d, k));
    EXPECT_MKA_ERROR(check(qc, kc, kc), "q", std::to_string(d), "cuda");
  }
}

TEST_F(AttentionInputs, DtypesMustMatchAndBeSupported) {
  EXPECT_MKA_ERROR(check(q, with_dtype(DType::f64, k), v), "k", "float64", "float32");
  EXPECT_MKA_ERROR(check(q, k, with_dtype(DType::f64, v)), "v", "float64");
  EXPECT_MKA_ERROR(check(q, with_dtype(DType::f64, k), with_dtype(DType::f64, v)), "k");
  for (DType dt : {DType::f16, DType::bf16}) {
    const TensorRef qh = with_dtype(dt, q), kh = with_dtype(dt, k), vh = with_dtype(dt, v);
    EXPECT_MKA_ERROR(check(qh, kh, vh), "q", dtype_name(dt), "cpu");
  }
  const TensorRef q64 = on(Device::cuda, 0, with_dtype(DType::f64, with_dim(3, 64, q))),
                  k64 = on(Device::cuda, 0, with_dtype(DType::f64, with_dim(3, 64, k)));
  EXPECT_MKA_ERROR(check(q64, k64, k64), "q", "float64", "cuda");
}

TEST_F(AttentionInputs, LastDimMustBeContiguous) {
  EXPECT_MKA_ERROR(check(with_last_stride(2, q), k, v), "q", "contiguous", "stride 2");
  EXPECT_MKA_ERROR(check(q, with_last_stride(0, k), v), "k", "contiguous");
  EXPECT_MKA_ERROR(check(q, k, with_last_stride(-1, v)), "v", "contiguous");
}

TEST_F(AttentionInputs, TensorsMustShareADevice) {
  EXPECT_MKA_ERROR(check(q, on(Device::cuda, 0, k), v), "k", "cuda:0", "cpu");
  EXPECT_MKA_ERROR(check(q, k, on(Device::cuda, 0, v)), "v", "cuda");
  const TensorRef qc = on(Device::cuda, 0, with_dim(3, 64, q)),
                  kc = on(Device::cuda, 0, with_dim(3, 64, k));
  EXPECT_MKA_ERROR(check(qc, kc, on(Device::cuda, 1, kc)), "v", "cuda:1", "cuda:0");
  EXPECT_MKA_ERROR(check(qc, on(Device::cpu, 0, kc), kc), "k", "cpu", "cuda");
}

TEST_F(AttentionInputs, Options) {
  for (int64_t w : {0, -1, -5}) {
    o.window = w;
    EXPECT_MKA_ERROR(check(q, k, v), "window", std::to_string(w));
  }
  o.window.reset();
  for (double s : {std::numeric_limits<double>::quiet_NaN(),
                   std::numeric_limits<double>::infinity()}) {
    o.scale = s;
    EXPECT_MKA_ERROR(check(q, k, v), "scale", "finite");
  }
}

// --- check_route ----------------------------------------------------------------------

struct RouteInputsCase : ::testing::Test {
  HostTensor k{DType::f32, {2, 6, 2, 8}}, v{DType::f32, {2, 6, 2, 8}};
  HostTensor lam2{DType::f32, {2, 6, 2}}, lam3{DType::f32, {2, 6, 3}};
  HostTensor x3{DType::f32, {2, 6, 2, 8}}, state{DType::f32, {2, 2, 8}};
  RouteInputs r2() const { return {lam2.ref(), 0.9, {}, {}, {}, {}}; }
  RouteInputs r3() const { return {lam3.ref(), 0.9, x3.ref(), x3.ref(), {}, {}}; }
  // Key-side routing (route_fuse, fastmka) unless `query_side` (mka, over Tq = 4).
  RouteProblem check(const TensorRef& k_, const TensorRef& v_, const RouteInputs& r,
                     bool query_side = false) {
    return query_side ? check_route(k_, v_, r, 4, "(B, Tq, L)", false)
                      : check_route(k_, v_, r, k_.shape[1], "(B, Tk, L)", true);
  }
};

TEST_F(RouteInputsCase, GoodInputsGiveTheProblem) {
  const RouteProblem p = check(k, v, r2());
  EXPECT_EQ(p.B, 2);
  EXPECT_EQ(p.T, 6);
  EXPECT_EQ(p.G, 2);
  EXPECT_EQ(p.d, 8);
  EXPECT_EQ(p.L, 2);
  EXPECT_DOUBLE_EQ(p.beta, 0.9);
  EXPECT_FALSE(p.has_state);
  EXPECT_EQ(p.dtype, DType::f32);
  EXPECT_EQ(check(k, v, r3()).L, 3);

  RouteInputs r = r2();
  r.v_state = state;  // one state alone counts
  EXPECT_TRUE(check(k, v, r).has_state);
  r.k_state = state;
  EXPECT_TRUE(check(k, v, r).has_state);
  for (double beta : {0.0, 0.5, 0.999}) {
    r.beta = beta;
    EXPECT_DOUBLE_EQ(check(k, v, r).beta, beta);
  }
  // float64 inputs: float64 states; lam in float32 or float64.
  const HostTensor k64(DType::f64, {2, 6, 2, 8}), s64(DType::f64, {2, 2, 8});
  const HostTensor lam64(DType::f64, {2, 6, 2});
  EXPECT_NO_THROW(check(k64, k64, {lam64.ref(), 0.5, {}, {}, s64.ref(), s64.ref()}));
  EXPECT_NO_THROW(check(k64, k64, {lam2.ref(), 0.5, {}, {}, s64.ref(), s64.ref()}));
  // mka's query-side lam covers Tq = 4 tokens.
  const HostTensor lam_q(DType::f32, {2, 4, 3});
  EXPECT_EQ(check(k, v, {lam_q.ref(), 0.5, {}, {}, {}, {}}, true).L, 3);
  // No tokens.
  EXPECT_NO_THROW(check(with_dim(1, 0, k), with_dim(1, 0, v),
                        {with_dim(1, 0, lam2), 0.5, {}, {}, {}, {}}));
}

TEST_F(RouteInputsCase, KeysAndValues) {
  EXPECT_MKA_ERROR(check(kAbsent, v, r2()), "k", "None");
  EXPECT_MKA_ERROR(check(k, kAbsent, r2()), "v", "None");
  EXPECT_MKA_ERROR(check(dropping_last_dim(k), v, r2()), "k", "4-d");
  EXPECT_MKA_ERROR(check(k, with_dim(1, 5, v), r2()), "v", "k's");
  EXPECT_MKA_ERROR(check(k, with_dim(3, 4, v), r2()), "v", "k's");
  EXPECT_MKA_ERROR(check(k, with_dtype(DType::f64, v), r2()), "v", "float64");
  EXPECT_MKA_ERROR(check(k, on(Device::cuda, 0, v), r2()), "v", "cuda");
  EXPECT_MKA_ERROR(check(k, with_last_stride(2, v), r2()), "v", "contiguous");
  EXPECT_MKA_ERROR(check(with_dtype(DType::f16, k), with_dtype(DType::f16, v), r2()), "k",
                   "float16");
}

TEST_F(RouteInputsCase, BetaMustBeInZeroOne) {
  for (double beta : {-0.1, 1.0, 1.5, std::numeric_limits<double>::quiet_NaN(),
                      std::numeric_limits<double>::infinity()}) {
    RouteInputs r = r2();
    r.beta = beta;
    EXPECT_MKA_ERROR(check(k, v, r), "beta", "[0, 1)");
  }
}

TEST_F(RouteInputsCase, LamShapeWidthDtypeDevice) {
  auto with_lam = [&](const TensorRef& lam) { return RouteInputs{lam, 0.9, {}, {}, {}, {}}; };
  EXPECT_MKA_ERROR(check(k, v, with_lam(kAbsent)), "lam", "None");
  EXPECT_MKA_ERROR(check(k, v, with_lam(dropping_last_dim(lam2))), "lam", "3-d");
  EXPECT_MKA_ERROR(check(k, v, with_lam(with_dim(0, 1, lam2))), "lam", "(B, Tk, L)");
  EXPECT_MKA_ERROR(check(k, v, with_lam(with_dim(1, 5, lam2))), "lam", "(B, Tk, L)", "dim 1 = 6");
  EXPECT_MKA_ERROR(check(k, v, with_lam(lam2), /*query_side=*/true), "lam", "(B, Tq, L)",
                   "dim 1 = 4");
  for (int64_t L : {0, 1, 4}) {
    EXPECT_MKA_ERROR(check(k, v, with_lam(with_dim(2, L, lam2))), "lam", "L = 2 or 3",
                     std::to_string(L));
  }
  EXPECT_MKA_ERROR(check(k, v, with_lam(with_dtype(DType::f64, lam2))), "lam", "float64",
                   "float32");
  EXPECT_MKA_ERROR(check(k, v, with_lam(on(Device::cuda, 0, lam2))), "lam", "cuda");
  EXPECT_MKA_ERROR(check(k, v, with_lam(with_last_stride(3, lam2))), "lam", "contiguous");
}

TEST_F(RouteInputsCase, LevelThreeVectorsPresentIffLIsThree) {
  RouteInputs r = r3();
  r.k3 = kAbsent;
  EXPECT_MKA_ERROR(check(k, v, r), "k3", "required");
  r = r3();
  r.v3 = kAbsent;
  EXPECT_MKA_ERROR(check(k, v, r), "v3", "required");
  r = r2();
  r.k3 = x3;
  EXPECT_MKA_ERROR(check(k, v, r), "k3", "L = 2");
  r = r2();
  r.v3 = x3;
  EXPECT_MKA_ERROR(check(k, v, r), "v3", "L = 2");
}

TEST_F(RouteInputsCase, LevelThreeVectorsShapeDtypeDevice) {
  auto with_k3 = [&](const TensorRef& t) { RouteInputs r = r3(); r.k3 = t; return r; };
  auto with_v3 = [&](const TensorRef& t) { RouteInputs r = r3(); r.v3 = t; return r; };
  EXPECT_MKA_ERROR(check(k, v, with_k3(with_dim(1, 5, x3))), "k3", "(B, Tk, G, d)");
  EXPECT_MKA_ERROR(check(k, v, with_v3(with_dim(2, 1, x3))), "v3", "(B, Tk, G, d)");
  EXPECT_MKA_ERROR(check(k, v, with_k3(with_dim(3, 4, x3))), "k3");
  EXPECT_MKA_ERROR(check(k, v, with_k3(dropping_last_dim(x3))), "k3", "4-d");
  EXPECT_MKA_ERROR(check(k, v, with_k3(with_dtype(DType::f64, x3))), "k3", "float64");
  EXPECT_MKA_ERROR(check(k, v, with_v3(on(Device::cuda, 0, x3))), "v3", "cuda");
  EXPECT_MKA_ERROR(check(k, v, with_v3(with_last_stride(2, x3))), "v3", "contiguous");
}

// mka takes no k3/v3 (its L3 is the memory tokens): whichever is passed is named.
TEST_F(RouteInputsCase, MkaRejectsLevelThreeVectorsByName) {
  const HostTensor lam_q(DType::f32, {2, 4, 3});
  EXPECT_MKA_ERROR(check(k, v, {lam_q.ref(), 0.5, x3.ref(), {}, {}, {}}, true), "k3");
  EXPECT_MKA_ERROR(check(k, v, {lam_q.ref(), 0.5, {}, x3.ref(), {}, {}}, true), "v3");
}

TEST_F(RouteInputsCase, BadStates) {
  auto with_states = [&](const TensorRef& ks, const TensorRef& vs) {
    RouteInputs r = r2();
    r.k_state = ks, r.v_state = vs;
    return r;
  };
  EXPECT_MKA_ERROR(check(k, v, with_states(with_dtype(DType::f64, state), kAbsent)), "k_state",
                   "float64", "float32");
  EXPECT_MKA_ERROR(check(k, v, with_states(kAbsent, with_dtype(DType::f64, state))), "v_state",
                   "float32");
  const HostTensor k64(DType::f64, {2, 6, 2, 8}), lam64(DType::f64, {2, 6, 2});
  EXPECT_MKA_ERROR(check(k64, k64, {lam64.ref(), 0.5, {}, {}, state.ref(), {}}), "k_state",
                   "float32", "float64");
  EXPECT_MKA_ERROR(check(k, v, with_states(with_dim(2, 9, state), kAbsent)), "k_state",
                   "(B, G, d)");
  EXPECT_MKA_ERROR(check(k, v, with_states(with_dim(0, 1, state), kAbsent)), "k_state");
  EXPECT_MKA_ERROR(check(k, v, with_states(state, with_dim(1, 3, state))), "v_state");
  EXPECT_MKA_ERROR(check(k, v, with_states(state, adding_dim(state))), "v_state", "3-d");
  EXPECT_MKA_ERROR(check(k, v, with_states(state, on(Device::cuda, 0, state))), "v_state",
                   "cuda");
  EXPECT_MKA_ERROR(check(k, v, with_states(with_last_stride(2, state), kAbsent)), "k_state",
                   "contiguous");
}

// --- check_memory ---------------------------------------------------------------------

struct MemoryInputs : ::testing::Test {
  HostTensor q{DType::f32, {2, 5, 4, 16}}, k{DType::f32, {2, 7, 2, 16}};
  HostTensor mem{DType::f32, {2, 3, 2, 16}};
  AttentionProblem p = check_attention(q, k, k, AttnOptions{});
};

TEST_F(MemoryInputs, PresentIffLIsThree) {
  EXPECT_NO_THROW(check_memory(p, q, kAbsent, kAbsent, 2));
  EXPECT_NO_THROW(check_memory(p, q, mem, mem, 3));
  EXPECT_NO_THROW(check_memory(p, q, with_dim(1, 0, mem), with_dim(1, 0, mem), 3));  // M = 0
  EXPECT_MKA_ERROR(check_memory(p, q, mem, kAbsent, 2), "mem_k", "L = 2");
  EXPECT_MKA_ERROR(check_memory(p, q, kAbsent, mem, 2), "mem_v", "L = 2");
  EXPECT_MKA_ERROR(check_memory(p, q, kAbsent, mem, 3), "mem_k", "required");
  EXPECT_MKA_ERROR(check_memory(p, q, mem, kAbsent, 3), "mem_v", "required");
}

TEST_F(MemoryInputs, ShapeDtypeDevice) {
  EXPECT_MKA_ERROR(check_memory(p, q, with_dim(0, 1, mem), mem, 3), "mem_k", "(B, M, G, d)");
  EXPECT_MKA_ERROR(check_memory(p, q, with_dim(2, 4, mem), with_dim(2, 4, mem), 3), "mem_k");
  EXPECT_MKA_ERROR(check_memory(p, q, with_dim(3, 8, mem), with_dim(3, 8, mem), 3), "mem_k");
  EXPECT_MKA_ERROR(check_memory(p, q, mem, with_dim(1, 4, mem), 3), "mem_v", "dim 1 = 3");
  EXPECT_MKA_ERROR(check_memory(p, q, dropping_last_dim(mem), mem, 3), "mem_k", "4-d");
  EXPECT_MKA_ERROR(check_memory(p, q, mem, with_dtype(DType::f64, mem), 3), "mem_v", "float64");
  EXPECT_MKA_ERROR(check_memory(p, q, on(Device::cuda, 0, mem), mem, 3), "mem_k", "cuda");
  EXPECT_MKA_ERROR(check_memory(p, q, mem, with_last_stride(4, mem), 3), "mem_v", "contiguous");
}

// --- check_output ---------------------------------------------------------------------

TEST(OutputBuffers, ShapeDtypeDeviceLayout) {
  const HostTensor t(DType::f32, {2, 3, 4});
  const HostTensor strided(DType::f32, {2, 3, 4}, /*pad=*/2);
  EXPECT_NO_THROW(check_output(t, "out", {2, 3, 4}, DType::f32, Device::cpu));
  EXPECT_NO_THROW(check_output(strided, "out", {2, 3, 4}, DType::f32, Device::cpu));
  EXPECT_MKA_ERROR(check_output(kAbsent, "out", {2, 3, 4}, DType::f32, Device::cpu), "out");
  EXPECT_MKA_ERROR(check_output(t, "lse", {2, 3, 4, 1}, DType::f32, Device::cpu), "lse", "rank");
  EXPECT_MKA_ERROR(check_output(t, "out", {2, 3, 5}, DType::f32, Device::cpu), "out", "(2, 3, 4)");
  EXPECT_MKA_ERROR(check_output(t, "out", {1, 3, 4}, DType::f32, Device::cpu), "out", "dim 0 = 1");
  EXPECT_MKA_ERROR(check_output(t, "lse", {2, 3, 4}, DType::f64, Device::cpu), "lse", "float32",
                   "float64");
  EXPECT_MKA_ERROR(check_output(t, "out", {2, 3, 4}, DType::f32, Device::cuda), "out", "device");
  EXPECT_MKA_ERROR(check_output(with_last_stride(2, t), "out", {2, 3, 4}, DType::f32, Device::cpu),
                   "out", "contiguous");
}

// --- the ops validate inputs and buffers before any kernel runs -------------------------

AttentionFwd attention_fwd(const TensorRef& q, const TensorRef& out, const TensorRef& lse) {
  AttentionFwd a;
  a.q = a.k = a.v = q, a.out = out, a.lse = lse;
  return a;
}

TEST(OpsValidate, AttentionBuffers) {
  const HostTensor q(DType::f32, {1, 4, 2, 8}), out(DType::f32, {1, 4, 2, 8});
  const HostTensor lse(DType::f32, {1, 2, 4}), lse64(DType::f64, {1, 2, 4});
  const HostTensor lse_strided(DType::f32, {1, 2, 4}, /*pad=*/1);
  EXPECT_MKA_ERROR(attention_forward(attention_fwd(q, out, lse64)), "lse", "float32");
  EXPECT_MKA_ERROR(attention_forward(attention_fwd(q, out, lse_strided)), "lse", "contiguous");
  EXPECT_MKA_ERROR(attention_forward(attention_fwd(q, with_dim(1, 3, out), lse)), "out");
  AttentionFwd f = attention_fwd(q, out, lse);
  f.q = with_dim(2, 3, q);
  EXPECT_MKA_ERROR(attention_forward(f), "q", "H = 3");
  AttentionBwd b;
  b.q = b.k = b.v = q, b.out = out, b.lse = lse, b.dout = out, b.dk = b.dv = out;
  EXPECT_MKA_ERROR(attention_backward(b), "dq", "missing");
  b.dq = out, b.dout = kAbsent;
  EXPECT_MKA_ERROR(attention_backward(b), "dout");
}

TEST(OpsValidate, RoutedOpsBuffers) {
  const HostTensor q(DType::f64, {1, 4, 2, 8}), k(DType::f64, {1, 4, 2, 8});
  const HostTensor lam(DType::f64, {1, 4, 2}), lam32(DType::f32, {1, 4, 2});
  const HostTensor state(DType::f64, {1, 2, 8}), lse(DType::f64, {1, 2, 4});
  const RouteInputs r{lam.ref(), 0.5, {}, {}, {}, {}};
  RouteFuseFwd rf;
  rf.k = rf.v = k, rf.route = r, rf.k_fused = rf.v_fused = k;
  rf.k_state_out = rf.v_state_out = state;
  // The CPU kernels read lam in the inputs' dtype (the Python layer casts it).
  RouteFuseFwd bad = rf;
  bad.route.lam = lam32;
  EXPECT_MKA_ERROR(route_fuse_forward(bad), "lam", "float64");
  bad = rf, bad.v_fused = with_dim(1, 2, k);
  EXPECT_MKA_ERROR(route_fuse_forward(bad), "v_fused");
  bad = rf, bad.k_state_out = with_dtype(DType::f32, state);
  EXPECT_MKA_ERROR(route_fuse_forward(bad), "k_state_out", "float64");
  // A state gradient for a state that was not an input.
  RouteFuseBwd rb;
  rb.k = rb.v = k, rb.route = r, rb.dk_fused = rb.dv_fused = k, rb.dk = rb.dv = k;
  rb.grads.dk_state = state;
  EXPECT_MKA_ERROR(route_fuse_backward(rb), "dk_state", "not given");
  FastmkaFwd ff;
  ff.q = q, ff.k = ff.v = k, ff.route = {lam.ref(), 0.5, k.ref(), {}, {}, {}};
  ff.out = q, ff.lse = lse, ff.k_state_out = ff.v_state_out = state;
  EXPECT_MKA_ERROR(fastmka_forward(ff), "k3", "L = 2");
  const HostTensor o_levels(DType::f64, {3, 1, 4, 2, 8}), lse_levels(DType::f64, {2, 1, 2, 4});
  MkaFwd mf;
  mf.q = q, mf.k = mf.v = k, mf.route = r, mf.out = q, mf.o_levels = o_levels;
  mf.lse_levels = lse_levels, mf.k_state_out = mf.v_state_out = state;
  EXPECT_MKA_ERROR(mka_forward(mf), "o_levels");
}

}  // namespace
}  // namespace mka::test
