// Runs one of the four ops (forward and backward) through the public entry points of
// mka/ops.h on random host tensors, and the naive reference (reference.h) on the same
// values, returning both in the same form so a test can compare them field by field.
#pragma once
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "host_tensor.h"
#include "mka/ops.h"
#include "reference.h"

namespace mka {
inline void PrintTo(DType dt, std::ostream* os) { *os << dtype_name(dt); }  // for gtest
}  // namespace mka

namespace mka::test {

enum class Op { attention, route_fuse, fastmka, mka };
inline const char* op_name(Op op) {
  switch (op) {
    case Op::attention: return "attention";
    case Op::route_fuse: return "route_fuse";
    case Op::fastmka: return "fastmka";
    case Op::mka: return "mka";
  }
  return "?";
}

enum class States { none, both, k_only, v_only };

// One problem: sizes/options plus which optional inputs are given.
struct Case {
  std::string name;
  ref::Dims dims;                  // dims.scale is ignored unless `scale` is set
  std::optional<double> scale;     // none: the default 1/sqrt(d)
  States states = States::none;    // EMA states given as inputs
  bool state_seeds = true;         // incoming gradients of the returned states given
  int64_t pad = 0;                 // stride padding of every tensor (HostTensor)
  bool route_grads = true;         // request dlam, dk3/dv3 and the state gradients
};

// Readable test parameters in gtest's failure messages.
inline void PrintTo(const Case& c, std::ostream* os) {
  const ref::Dims& p = c.dims;
  *os << c.name << " {B=" << p.B << " Tq=" << p.Tq << " Tk=" << p.Tk << " H=" << p.H
      << " G=" << p.G << " d=" << p.d << " L=" << p.L << " M=" << p.M
      << " causal=" << p.causal << " window=" << p.window << " beta=" << p.beta
      << " states=" << int(c.states) << " state_seeds=" << c.state_seeds
      << " route_grads=" << c.route_grads << " pad=" << c.pad << "}";
}
inline void PrintTo(Op op, std::ostream* os) { *os << op_name(op); }

// Everything one op returns, forward and backward, as plain vectors.
struct Result {
  ref::Outputs out;
  ref::Grads grads;
  bool padding_intact = true;  // no kernel wrote outside its outputs' views
};

class OpRun {
 public:
  OpRun(Op op, const Case& c, DType dtype, uint64_t seed) : op_(op), c_(c), dt_(dtype) {
    dims_ = c.dims;
    dims_.scale = c.scale ? *c.scale : 1.0 / std::sqrt(double(dims_.d));
    std::mt19937_64 rng(seed);
    const auto& p = dims_;
    const int64_t pad = c.pad;
    const DType sdt = stats_dtype(dtype);
    if (op != Op::route_fuse) q_ = HostTensor::random(dt_, {p.B, p.Tq, p.H, p.d}, rng, pad);
    k_ = HostTensor::random(dt_, {p.B, p.Tk, p.G, p.d}, rng, pad);
    v_ = HostTensor::random(dt_, {p.B, p.Tk, p.G, p.d}, rng, pad);
    if (op != Op::attention) {
      // Routing weights as a router makes them: positive rows summing to one.
      const int64_t T = op == Op::mka ? p.Tq : p.Tk;
      lam_ = HostTensor::random(dt_, {p.B, T, p.L}, rng, pad, 0.05, 1.0);
      for (int64_t row = 0; row < p.B * T; ++row) {
        double s = 0;
        for (int64_t l = 0; l < p.L; ++l) s += lam_.get(row * p.L + l);
        for (int64_t l = 0; l < p.L; ++l) lam_.set(row * p.L + l, lam_.get(row * p.L + l) / s);
      }
      if (p.L == 3 && op != Op::mka) {
        k3_ = HostTensor::random(dt_, {p.B, p.Tk, p.G, p.d}, rng, pad);
        v3_ = HostTensor::random(dt_, {p.B, p.Tk, p.G, p.d}, rng, pad);
      }
      if (p.L == 3 && op == Op::mka) {
        mem_k_ = HostTensor::random(dt_, {p.B, p.M, p.G, p.d}, rng, pad);
        mem_v_ = HostTensor::random(dt_, {p.B, p.M, p.G, p.d}, rng, pad);
      }
      if (c.states == States::both || c.states == States::k_only)
        k_state_ = HostTensor::random(sdt, {p.B, p.G, p.d}, rng, pad);
      if (c.states == States::both || c.states == States::v_only)
        v_state_ = HostTensor::random(sdt, {p.B, p.G, p.d}, rng, pad);
      if (c.state_seeds) {
        dk_state_seed_ = HostTensor::random(sdt, {p.B, p.G, p.d}, rng, pad);
        dv_state_seed_ = HostTensor::random(sdt, {p.B, p.G, p.d}, rng, pad);
      }
    }
    if (op == Op::route_fuse) {
      dout_ = HostTensor::random(dt_, {p.B, p.Tk, p.G, p.d}, rng, pad);
      dout2_ = HostTensor::random(dt_, {p.B, p.Tk, p.G, p.d}, rng, pad);
    } else {
      dout_ = HostTensor::random(dt_, {p.B, p.Tq, p.H, p.d}, rng, pad);
    }
  }

  const ref::Dims& dims() const { return dims_; }

  // The values the native op sees (rounded to its dtype), for the reference.
  ref::Inputs inputs() const {
    return {q_.values(),      k_.values(),       v_.values(),     lam_.values(),
            k3_.values(),     v3_.values(),      k_state_.values(), v_state_.values(),
            mem_k_.values(),  mem_v_.values()};
  }
  ref::Seeds seeds() const {
    return {dout_.values(), dout2_.values(), dk_state_seed_.values(), dv_state_seed_.values()};
  }

  Result reference() const {
    const ref::Inputs in = inputs();
    const ref::Seeds s = seeds();
    Result r;
    switch (op_) {
      case Op::attention: r = {ref::attention(dims_, in), ref::attention_bwd(dims_, in, s)}; break;
      case Op::route_fuse: r = {ref::route_fuse(dims_, in), ref::route_fuse_bwd(dims_, in, s)}; break;
      case Op::fastmka: r = {ref::fastmka(dims_, in), ref::fastmka_bwd(dims_, in, s)}; break;
      case Op::mka: r = {ref::mka(dims_, in), ref::mka_bwd(dims_, in, s)}; break;
    }
    if (!c_.route_grads)  // not requested: the op computes none of them
      for (Vec* g : {&r.grads.dlam, &r.grads.dk3, &r.grads.dv3, &r.grads.dk_state, &r.grads.dv_state})
        g->clear();
    return r;
  }

  // Forward then backward through mka/ops.h, into fresh (zero-filled, padded) buffers.
  Result native() const {
    const auto& p = dims_;
    const int64_t pad = c_.pad;
    const DType sdt = stats_dtype(dt_);
    AttnOptions o;
    o.causal = p.causal;
    o.scale = c_.scale;
    if (p.window > 0) o.window = p.window;
    const RouteInputs r{lam_.ref(), p.beta, k3_.ref(), v3_.ref(), k_state_.ref(), v_state_.ref()};
    auto like = [&](const HostTensor& t) {
      return t.present() ? HostTensor(t.ref().dtype, t.shape(), pad) : HostTensor();
    };
    auto route_grad = [&](const HostTensor& t) { return c_.route_grads ? like(t) : HostTensor(); };
    HostTensor dq = like(q_), dk = like(k_), dv = like(v_), dmk = like(mem_k_), dmv = like(mem_v_);
    HostTensor dlam = route_grad(lam_), dk3 = route_grad(k3_), dv3 = route_grad(v3_),
               dks = route_grad(k_state_), dvs = route_grad(v_state_);
    const RouteGrads g{dlam.ref(), dk3.ref(), dv3.ref(), dks.ref(), dvs.ref()};
    HostTensor ks_out(sdt, {p.B, p.G, p.d}, pad), vs_out(sdt, {p.B, p.G, p.d}, pad);
    Result res;
    std::vector<const HostTensor*> written{&dq, &dk, &dv, &dlam, &dk3, &dv3, &dks, &dvs, &dmk, &dmv};

    if (op_ == Op::route_fuse) {
      HostTensor kf = like(k_), vf = like(v_);
      RouteFuseFwd f;
      f.k = k_, f.v = v_, f.route = r, f.k_fused = kf, f.v_fused = vf;
      f.k_state_out = ks_out, f.v_state_out = vs_out;
      route_fuse_forward(f);
      RouteFuseBwd b;
      b.k = k_, b.v = v_, b.route = r, b.dk_fused = dout_, b.dv_fused = dout2_;
      b.dk_state_out = dk_state_seed_, b.dv_state_out = dv_state_seed_;
      b.dk = dk, b.dv = dv, b.grads = g;
      route_fuse_backward(b);
      res.out = {kf.values(), vf.values(), {}, ks_out.values(), vs_out.values()};
      res.padding_intact = kf.padding_intact() && vf.padding_intact();
    } else if (op_ == Op::mka) {
      HostTensor out(dt_, {p.B, p.Tq, p.H, p.d}, pad);
      HostTensor o_levels(dt_, {p.L, p.B, p.Tq, p.H, p.d}, pad);
      HostTensor lse_levels(sdt, {p.L, p.B, p.H, p.Tq});  // statistics are dense rows
      MkaFwd f;
      f.q = q_, f.k = k_, f.v = v_, f.route = r, f.mem_k = mem_k_, f.mem_v = mem_v_, f.opts = o;
      f.out = out, f.o_levels = o_levels, f.lse_levels = lse_levels;
      f.k_state_out = ks_out, f.v_state_out = vs_out;
      mka_forward(f);
      MkaBwd b;
      b.q = q_, b.k = k_, b.v = v_, b.route = r, b.mem_k = mem_k_, b.mem_v = mem_v_, b.opts = o;
      b.o_levels = o_levels, b.lse_levels = lse_levels, b.dout = dout_;
      b.dk_state_out = dk_state_seed_, b.dv_state_out = dv_state_seed_;
      b.dq = dq, b.dk = dk, b.dv = dv, b.dmem_k = dmk, b.dmem_v = dmv, b.grads = g;
      mka_backward(b);
      res.out = {out.values(), {}, {}, ks_out.values(), vs_out.values()};
      res.padding_intact = out.padding_intact() && o_levels.padding_intact();
    } else {
      HostTensor out(dt_, {p.B, p.Tq, p.H, p.d}, pad);
      HostTensor lse(sdt, {p.B, p.H, p.Tq});
      if (op_ == Op::attention) {
        AttentionFwd f;
        f.q = q_, f.k = k_, f.v = v_, f.opts = o, f.out = out, f.lse = lse;
        attention_forward(f);
        AttentionBwd b;
        b.q = q_, b.k = k_, b.v = v_, b.opts = o, b.out = out, b.lse = lse, b.dout = dout_;
        b.dq = dq, b.dk = dk, b.dv = dv;
        attention_backward(b);
        res.out = {out.values(), {}, lse.values(), {}, {}};
      } else {
        FastmkaFwd f;
        f.q = q_, f.k = k_, f.v = v_, f.route = r, f.opts = o, f.out = out, f.lse = lse;
        f.k_state_out = ks_out, f.v_state_out = vs_out;
        fastmka_forward(f);
        FastmkaBwd b;
        b.q = q_, b.k = k_, b.v = v_, b.route = r, b.opts = o, b.out = out, b.lse = lse;
        b.dout = dout_, b.dk_state_out = dk_state_seed_, b.dv_state_out = dv_state_seed_;
        b.dq = dq, b.dk = dk, b.dv = dv, b.grads = g;
        fastmka_backward(b);
        res.out = {out.values(), {}, lse.values(), ks_out.values(), vs_out.values()};
      }
      res.padding_intact = out.padding_intact();
    }
    if (op_ != Op::attention)
      res.padding_intact = res.padding_intact && ks_out.padding_intact() && vs_out.padding_intact();
    for (const HostTensor* t : written) res.padding_intact = res.padding_intact && t->padding_intact();
    res.grads = {dq.values(),  dk.values(),  dv.values(),  dlam.values(), dk3.values(),
                 dv3.values(), dks.values(), dvs.values(), dmk.values(),  dmv.values()};
    return res;
  }

 private:
  Op op_;
  Case c_;
  DType dt_;
  ref::Dims dims_;
  HostTensor q_, k_, v_, lam_, k3_, v3_, k_state_, v_state_, mem_k_, mem_v_;
  HostTensor dout_, dout2_, dk_state_seed_, dv_state_seed_;
};

// The named result fields of an op, paired for comparison: (name, native, reference).
struct Field {
  const char* name;
  const Vec* got;
  const Vec* want;
};
inline std::vector<Field> fields(const Result& got, const Result& want) {
  return {{"out", &got.out.out, &want.out.out},
          {"out2 (v_fused)", &got.out.out2, &want.out.out2},
          {"k_state_out", &got.out.k_state, &want.out.k_state},
          {"v_state_out", &got.out.v_state, &want.out.v_state},
          {"dq", &got.grads.dq, &want.grads.dq},
          {"dk", &got.grads.dk, &want.grads.dk},
          {"dv", &got.grads.dv, &want.grads.dv},
          {"dlam", &got.grads.dlam, &want.grads.dlam},
          {"dk3", &got.grads.dk3, &want.grads.dk3},
          {"dv3", &got.grads.dv3, &want.grads.dv3},
          {"dk_state", &got.grads.dk_state, &want.grads.dk_state},
          {"dv_state", &got.grads.dv_state, &want.grads.dv_state},
          {"dmem_k", &got.grads.dmem_k, &want.grads.dmem_k},
          {"dmem_v", &got.grads.dmem_v, &want.grads.dmem_v}};
}

}  // namespace mka::test
