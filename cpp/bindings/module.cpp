// The native module mka._C: fills the ops' descriptors (mka/op_args.h) from keyword
// arguments and calls the ops of mka/ops.h with the GIL released. Torch never crosses this
// boundary, only DLPack views.
#include <nanobind/stl/string.h>

#include <exception>

#include "mka/cpu/isa.h"
#include "mka/environment.h"
#include "mka/layers/linear_ops.h"
#include "mka/layers/norm_ops.h"
#include "mka/ops.h"
#include "mka/cpu/thread_pool.h"
#include "mka/tile_plan.h"
#include "module_parts.h"

namespace nb = nanobind;
using namespace nb::literals;

using mka::bind::def_op;

NB_MODULE(_C, m) {
  m.doc() = "MKA native kernels (framework-free; tensors cross as DLPack views)";

  def_op(m, "attention_forward", &mka::attention_forward);
  def_op(m, "attention_backward", &mka::attention_backward);
  def_op(m, "route_fuse_forward", &mka::route_fuse_forward);
  def_op(m, "route_fuse_backward", &mka::route_fuse_backward);
  def_op(m, "fastmka_forward", &mka::fastmka_forward);
  def_op(m, "fastmka_backward", &mka::fastmka_backward);
  def_op(m, "mka_forward", &mka::mka_forward);
  def_op(m, "mka_backward", &mka::mka_backward);
  def_op(m, "add_layer_norm", &mka::add_layer_norm);
  def_op(m, "linear_small", &mka::linear_small);
  mka::bind::bind_memory(m);

  m.def("set_num_threads", &mka::set_num_threads, "n"_a);
  m.def("num_threads", &mka::num_threads);
  m.def("cpu_isa", [] { return std::string(mka::isa_name(mka::cpu_isa())); });
  m.def("built_with_cuda", &mka::built_with_cuda);
  m.def("fastmka_carry_numel",
        [](int64_t B, int64_t Tk, int64_t G, int64_t d, bool cuda, const std::string& scan) {
          return mka::fastmka_carry_numel(B, Tk, G, d, cuda ? mka::Device::cuda : mka::Device::cpu,
                                          mka::bind::scan_kernel(scan, "scan"));
        },
        "B"_a, "Tk"_a, "G"_a, "d"_a, "cuda"_a, "scan"_a);
  // The kernel options' names and their defaults from the environment (environment.h).
  m.def("kernel_option_names", [] {
    nb::list attention, scan, recall;
    for (const char* n : mka::kAttnKernelNames) attention.append(n);
    for (const char* n : mka::kScanKernelNames) scan.append(n);
    for (const char* n : mka::kRecallKernelNames) recall.append(n);
    return nb::make_tuple(attention, scan, recall);
  });
  m.def("kernel_options_from_environment", [] {
    const mka::KernelOptions o = mka::kernel_options_from_environment();
    return nb::make_tuple(mka::kAttnKernelNames[int(o.attention)],
                          mka::kScanKernelNames[int(o.scan)], o.scan_through,
                          mka::kRecallKernelNames[int(o.recall)]);
  });
  m.def("cpu_tile_budget", &mka::cpu_tile_budget);
  m.def("plan_tiles",
        [](const std::string& target, int head_dim, int elem_bytes, size_t budget) {
          const mka::TilePlan p = mka::plan_tiles(
              target == "gpu" ? mka::Target::gpu : mka::Target::cpu, head_dim, elem_bytes, budget);
          return nb::make_tuple(p.block_q, p.block_k, p.stages, p.bytes);
        },
        "target"_a, "head_dim"_a, "elem_bytes"_a, "budget_bytes"_a);
}
