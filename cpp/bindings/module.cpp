// The native module mka._C: converts arrays to TensorRef views and calls the ops of
// mka/ops.h with the GIL released. Torch never crosses this boundary, only DLPack views.
#include <nanobind/stl/string.h>

#include <exception>

#include "mka/cpu/isa.h"
#include "mka/ops.h"
#include "mka/cpu/thread_pool.h"
#include "mka/tile_plan.h"
#include "tensor_ref.h"

namespace nb = nanobind;
using namespace nb::literals;
using mka::bind::Array;
using mka::bind::OptArray;
using mka::bind::ref;

namespace {

using OptF = std::optional<double>;
using OptI = std::optional<int64_t>;
void* as_stream(uintptr_t s) { return reinterpret_cast<void*>(s); }

mka::AttnOptions opts(bool causal, OptF scale, OptI window) { return {causal, scale, window}; }

// Runs f with the GIL released. An error leaves the released region as a value and is
// rethrown only once the GIL is back: unwinding through the release guard (what
// nb::call_guard does) crashed on Python 3.12 with torch tensors.
template <class F> void without_gil(F&& f) {
  std::exception_ptr err;
  {
    nb::gil_scoped_release release;
    try {
      f();
    } catch (...) {
      err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

mka::RouteInputs route(const Array& lam, double beta, const OptArray& k3, const OptArray& v3,
                       const OptArray& ks, const OptArray& vs) {
  return {ref(lam, "lam"), beta, ref(k3, "k3"), ref(v3, "v3"), ref(ks, "k_state"),
          ref(vs, "v_state")};
}

mka::RouteGrads grads(const OptArray& dlam, const OptArray& dk3, const OptArray& dv3,
                      const OptArray& dks, const OptArray& dvs) {
  return {ref(dlam, "dlam"), ref(dk3, "dk3"), ref(dv3, "dv3"), ref(dks, "dk_state"),
          ref(dvs, "dv_state")};
}

mka::SavedKeys saved(const OptArray& k, const OptArray& v, const OptArray& carry) {
  return {ref(k, "saved k"), ref(v, "saved v"), ref(carry, "saved carry")};
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "MKA native kernels (framework-free; tensors cross as DLPack views)";

  m.def("attention_forward",
        [](const Array& q, const Array& k, const Array& v, bool causal, OptF scale, OptI window,
           const Array& out, const Array& lse, uintptr_t stream) {
          without_gil([&] {
            mka::attention_forward(ref(q, "q"), ref(k, "k"), ref(v, "v"),
                                   opts(causal, scale, window), ref(out, "out"), ref(lse, "lse"),
                                   as_stream(stream));
          });
        });
  m.def("attention_backward",
        [](const Array& q, const Array& k, const Array& v, bool causal, OptF scale, OptI window,
           const Array& out, const Array& lse, const Array& dout, const Array& dq,
           const Array& dk, const Array& dv, bool accumulate, uintptr_t stream) {
          without_gil([&] {
            mka::attention_backward(ref(q, "q"), ref(k, "k"), ref(v, "v"),
                                    opts(causal, scale, window), ref(out, "out"), ref(lse, "lse"),
                                    ref(dout, "dout"), ref(dq, "dq"), ref(dk, "dk"),
                                    ref(dv, "dv"), as_stream(stream), accumulate);
          });
        });
  m.def("route_fuse_forward",
        [](const Array& k, const Array& v, const Array& lam, double beta, const OptArray& k3,
           const OptArray& v3, const OptArray& ks, const OptArray& vs, const Array& kf,
           const Array& vf, const Array& ks_out, const Array& vs_out, uintptr_t stream) {
          without_gil([&] {
            mka::route_fuse_forward(ref(k, "k"), ref(v, "v"), route(lam, beta, k3, v3, ks, vs),
                                    ref(kf, "k_fused"), ref(vf, "v_fused"),
                                    ref(ks_out, "k_state_out"), ref(vs_out, "v_state_out"),
                                    as_stream(stream));
          });
        });
  m.def("route_fuse_backward",
        [](const Array& k, const Array& v, const Array& lam, double beta, const OptArray& k3,
           const OptArray& v3, const OptArray& ks, const OptArray& vs, const Array& dkf,
           const Array& dvf, const OptArray& dks_out, const OptArray& dvs_out, const Array& dk,
           const Array& dv, const OptArray& dlam, const OptArray& dk3, const OptArray& dv3,
           const OptArray& dks, const OptArray& dvs, bool accumulate, uintptr_t stream) {
          without_gil([&] {
            mka::route_fuse_backward(ref(k, "k"), ref(v, "v"), route(lam, beta, k3, v3, ks, vs),
                                     ref(dkf, "dk_fused"), ref(dvf, "dv_fused"),
                                     ref(dks_out, "dk_state_out"), ref(dvs_out, "dv_state_out"),
                                     ref(dk, "dk"), ref(dv, "dv"),
                                     grads(dlam, dk3, dv3, dks, dvs), as_stream(stream),
                                     accumulate);
          });
        });
  m.def("fastmka_forward",
        [](const Array& q, const Array& k, const Array& v, const Array& lam, double beta,
           const OptArray& k3, const OptArray& v3, const OptArray& ks, const OptArray& vs,
           bool causal, OptF scale, OptI window, const Array& out, const Array& lse,
           const Array& ks_out, const Array& vs_out, const OptArray& kf, const OptArray& vf,
           const OptArray& carry, uintptr_t stream) {
          without_gil([&] {
            mka::fastmka_forward(ref(q, "q"), ref(k, "k"), ref(v, "v"),
                                 route(lam, beta, k3, v3, ks, vs), opts(causal, scale, window),
                                 ref(out, "out"), ref(lse, "lse"), ref(ks_out, "k_state_out"),
                                 ref(vs_out, "v_state_out"), as_stream(stream),
                                 saved(kf, vf, carry));
          });
        });
  m.def("fastmka_backward",
        [](const Array& q, const Array& k, const Array& v, const Array& lam, double beta,
           const OptArray& k3, const OptArray& v3, const OptArray& ks, const OptArray& vs,
           bool causal, OptF scale, OptI window, const Array& out, const Array& lse,
           const Array& dout, const OptArray& dks_out, const OptArray& dvs_out, const Array& dq,
           const Array& dk, const Array& dv, const OptArray& dlam, const OptArray& dk3,
           const OptArray& dv3, const OptArray& dks, const OptArray& dvs, const OptArray& kf,
           const OptArray& vf, const OptArray& carry, bool accumulate, uintptr_t stream) {
          without_gil([&] {
            mka::fastmka_backward(ref(q, "q"), ref(k, "k"), ref(v, "v"),
                                  route(lam, beta, k3, v3, ks, vs), opts(causal, scale, window),
                                  ref(out, "out"), ref(lse, "lse"), ref(dout, "dout"),
                                  ref(dks_out, "dk_state_out"), ref(dvs_out, "dv_state_out"),
                                  ref(dq, "dq"), ref(dk, "dk"), ref(dv, "dv"),
                                  grads(dlam, dk3, dv3, dks, dvs), as_stream(stream),
                                  saved(kf, vf, carry), accumulate);
          });
        });
  m.def("mka_forward",
        [](const Array& q, const Array& k, const Array& v, const Array& lam, double beta,
           const OptArray& mem_k, const OptArray& mem_v, const OptArray& ks, const OptArray& vs,
           bool causal, OptF scale, OptI window, const Array& out, const Array& o_levels,
           const Array& lse_levels, const Array& ks_out, const Array& vs_out,
           const OptArray& ke, const OptArray& ve, uintptr_t stream) {
          without_gil([&] {
            mka::mka_forward(ref(q, "q"), ref(k, "k"), ref(v, "v"),
                             route(lam, beta, std::nullopt, std::nullopt, ks, vs),
                             ref(mem_k, "mem_k"), ref(mem_v, "mem_v"),
                             opts(causal, scale, window), ref(out, "out"),
                             ref(o_levels, "o_levels"), ref(lse_levels, "lse_levels"),
                             ref(ks_out, "k_state_out"), ref(vs_out, "v_state_out"),
                             as_stream(stream), saved(ke, ve, std::nullopt));
          });
        });
  m.def("mka_backward",
        [](const Array& q, const Array& k, const Array& v, const Array& lam, double beta,
           const OptArray& mem_k, const OptArray& mem_v, const OptArray& ks, const OptArray& vs,
           bool causal, OptF scale, OptI window, const Array& o_levels, const Array& lse_levels,
           const Array& dout, const OptArray& dks_out, const OptArray& dvs_out, const Array& dq,
           const Array& dk, const Array& dv, const OptArray& dmem_k, const OptArray& dmem_v,
           const OptArray& dlam, const OptArray& dks, const OptArray& dvs, const OptArray& ke,
           const OptArray& ve, bool accumulate, uintptr_t stream) {
          without_gil([&] {
            mka::mka_backward(ref(q, "q"), ref(k, "k"), ref(v, "v"),
                              route(lam, beta, std::nullopt, std::nullopt, ks, vs),
                              ref(mem_k, "mem_k"), ref(mem_v, "mem_v"),
                              opts(causal, scale, window), ref(o_levels, "o_levels"),
                              ref(lse_levels, "lse_levels"), ref(dout, "dout"),
                              ref(dks_out, "dk_state_out"), ref(dvs_out, "dv_state_out"),
                              ref(dq, "dq"), ref(dk, "dk"), ref(dv, "dv"), ref(dmem_k, "dmem_k"),
                              ref(dmem_v, "dmem_v"),
                              grads(dlam, std::nullopt, std::nullopt, dks, dvs),
                              as_stream(stream), saved(ke, ve, std::nullopt), accumulate);
          });
        });

  m.def("set_num_threads", &mka::set_num_threads, "n"_a);
  m.def("num_threads", &mka::num_threads);
  m.def("cpu_isa", [] { return std::string(mka::isa_name(mka::cpu_isa())); });
  m.def("built_with_cuda", &mka::built_with_cuda);
  m.def("fastmka_carry_numel", [](int64_t B, int64_t Tk, int64_t G, int64_t d, bool cuda) {
    return mka::fastmka_carry_numel(B, Tk, G, d, cuda ? mka::Device::cuda : mka::Device::cpu);
  }, "B"_a, "Tk"_a, "G"_a, "d"_a, "cuda"_a);
  m.def("cpu_tile_budget", &mka::cpu_tile_budget);
  m.def("plan_tiles",
        [](const std::string& target, int head_dim, int elem_bytes, size_t budget) {
          const mka::TilePlan p = mka::plan_tiles(
              target == "gpu" ? mka::Target::gpu : mka::Target::cpu, head_dim, elem_bytes, budget);
          return nb::make_tuple(p.block_q, p.block_k, p.stages, p.bytes);
        },
        "target"_a, "head_dim"_a, "elem_bytes"_a, "budget_bytes"_a);
}
