#include "mka/cpu/isa.h"

#include <cstdlib>
#include <cstring>

namespace mka {

Isa cpu_isa() {
  static const Isa isa = [] {
    // MKA_CPU_ISA=generic|avx2 caps the choice (for testing every code path).
    const char* cap = std::getenv("MKA_CPU_ISA");
    __builtin_cpu_init();
    if (cap && std::strcmp(cap, "generic") == 0) return Isa::generic;
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (cap && std::strcmp(cap, "avx2") == 0) return avx2 ? Isa::avx2 : Isa::generic;
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
