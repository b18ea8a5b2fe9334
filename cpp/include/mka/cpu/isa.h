// Which vector instruction set the CPU kernels run with, chosen once at load time.
#pragma once

namespace mka {

enum class Isa : int { generic, avx2, avx512 };
Isa cpu_isa();
const char* isa_name(Isa isa);

}  // namespace mka
