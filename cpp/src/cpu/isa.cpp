#include "mka/cpu/isa.h"

#include "mka/environment.h"

namespace mka {

Isa cpu_isa() {
  static const Isa isa = [] {
    // A cap from the environment tests every code path on one machine.
    const std::optional<Isa> cap = cpu_isa_cap_from_environment();
    __builtin_cpu_init();
    if (cap == Isa::generic) return Isa::generic;
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (cap == Isa::avx2) return avx2 ? Isa::avx2 : Isa::generic;
    return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::generic;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace mka
