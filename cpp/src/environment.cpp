#include "mka/environment.h"

#include <cerrno>
#include <cstdlib>
#include <optional>
#include <string>

#include "mka/error.h"

namespace mka {
namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// v as a whole base-10 integer in range of long long; nullopt otherwise.
std::optional<long long> integer(const std::string& v) {
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(v.c_str(), &end, 10);
  if (end == v.c_str() || *end != '\0' || errno == ERANGE) return std::nullopt;
  return n;
}

}  // namespace

KernelOptions kernel_options_from_environment() {
  KernelOptions o;
  const std::string wgmma = env("MKA_CUDA_WGMMA"), scan = env("MKA_CUDA_SCAN"),
                    through = env("MKA_CUDA_SCAN_THROUGH");
  if (wgmma == "0") o.attention = AttnKernel::mma;
  else if (wgmma == "lockstep") o.attention = AttnKernel::lockstep;
  else if (wgmma == "pingpong") o.attention = AttnKernel::pingpong;
  else MKA_CHECK(wgmma.empty() || wgmma == "tma",
                 "MKA_CUDA_WGMMA: expected 0, lockstep, pingpong or tma, got '", wgmma, "'");
  MKA_CHECK(scan.empty() || scan == "1pass" || scan == "3pass",
            "MKA_CUDA_SCAN: expected 1pass or 3pass, got '", scan, "'");
  if (scan == "3pass") o.scan = ScanKernel::three_pass;
  MKA_CHECK(through.empty() || through == "0" || through == "1",
            "MKA_CUDA_SCAN_THROUGH: expected 0 or 1, got '", through, "'");
  o.scan_through = through != "0";
  const std::string recall = env("MKA_CUDA_RECALL");
  MKA_CHECK(recall.empty() || recall == "chunks" || recall == "rows",
            "MKA_CUDA_RECALL: expected chunks or rows, got '", recall, "'");
  if (recall == "rows") o.recall = RecallKernel::rows;
  return o;
}

std::optional<int64_t> recall_scratch_from_environment() {
  const std::string v = env("MKA_CUDA_RECALL_SCRATCH");
  if (v.empty()) return std::nullopt;
  const std::optional<long long> n = integer(v);
  MKA_CHECK(n && *n > 0, "MKA_CUDA_RECALL_SCRATCH: expected a positive number of bytes, got '", v, "'");
  return int64_t(*n);
}

std::optional<bool> fwd_persistent_from_environment() {
  const std::string v = env("MKA_CUDA_FWD_PERSISTENT");
  MKA_CHECK(v.empty() || v == "0" || v == "1",
            "MKA_CUDA_FWD_PERSISTENT: expected 0 or 1, got '", v, "'");
  if (v.empty()) return std::nullopt;
  return v == "1";
}

std::optional<int> bwd_block_m_from_environment() {
  const std::string v = env("MKA_CUDA_BWD_BLOCK_M");
  MKA_CHECK(v.empty() || v == "64" || v == "128",
            "MKA_CUDA_BWD_BLOCK_M: expected 64 or 128, got '", v, "'");
  if (v.empty()) return std::nullopt;
  return v == "64" ? 64 : 128;
}

int decode_cluster_from_environment() {
  const std::string v = env("MKA_CUDA_DECODE_CLUSTER");
  if (v.empty()) return 0;
  const std::optional<long long> n = integer(v);
  MKA_CHECK(n && (*n == 0 || (*n >= 2 && *n <= 16)),
            "MKA_CUDA_DECODE_CLUSTER: expected 0 or an integer from 2 to 16, got '", v, "'");
  return int(*n);
}

int decode_splits_from_environment() {
  const std::string v = env("MKA_CUDA_DECODE_SPLITS");
  if (v.empty()) return 0;
  const std::optional<long long> n = integer(v);
  MKA_CHECK(n && *n >= 0 && *n <= (1 << 20),
            "MKA_CUDA_DECODE_SPLITS: expected 0 or a positive number of splits, got '", v, "'");
  return int(*n);
}

std::optional<int> num_threads_from_environment() {
  const int n = std::atoi(env("MKA_NUM_THREADS").c_str());
  return n > 0 ? std::optional<int>(n) : std::nullopt;
}

std::optional<Isa> cpu_isa_cap_from_environment() {
  const std::string cap = env("MKA_CPU_ISA");
  if (cap == "generic") return Isa::generic;
  if (cap == "avx2") return Isa::avx2;
  return std::nullopt;
}

}  // namespace mka
