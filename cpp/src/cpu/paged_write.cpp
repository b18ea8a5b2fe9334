// Writes new keys/values into their sequences' pages (SPEC §7.1); with MKA's page states,
// also carries the EMA through the new tokens and checkpoints it at every page start.
#include <algorithm>
#include <vector>

#include "mka/cpu/thread_pool.h"
#include "mka/memory/paged_ops.h"

namespace mka::cpu {
namespace {

template <class T> void write(const PagedProblem& p, const PagedWrite& a) {
  const TensorRef &k = a.k, &v = a.v, &kp = a.pages.k_pages, &vp = a.pages.v_pages;
  const TensorRef& table = a.pages.block_table;
  const int32_t* lens = ptr<const int32_t>(a.cache_seqlens);
  const int64_t dk = p.dk, dv = p.dv;
  const T beta = T(p.beta), one_m = T(1) - T(p.beta);
  parallel_for(p.B * p.G, [&](int64_t bg) {
    const int64_t b = bg / p.G, g = bg % p.G;
    const int64_t start = lens[b * a.cache_seqlens.stride[0]];
    const int32_t* row = ptr<const int32_t>(table) + b * table.stride[0];
    std::vector<T> sk(size_t(p.ema ? dk : 0), T(0)), sv(size_t(p.ema ? dv : 0), T(0));
    if (p.ema && a.k_state.present())
      std::copy_n(ptr<const T>(a.k_state) + b * a.k_state.stride[0] + g * a.k_state.stride[1],
                  dk, sk.begin());
    if (p.ema && a.v_state.present())
      std::copy_n(ptr<const T>(a.v_state) + b * a.v_state.stride[0] + g * a.v_state.stride[1],
                  dv, sv.begin());
    for (int64_t t = 0; t < p.T; ++t) {
      const int64_t pos = start + t, page = row[(pos / p.S) * table.stride[1]], slot = pos % p.S;
      const T* ks = ptr<const T>(k) + b * k.stride[0] + t * k.stride[1] + g * k.stride[2];
      const T* vs = ptr<const T>(v) + b * v.stride[0] + t * v.stride[1] + g * v.stride[2];
      T* kd = ptr<T>(kp) + page * kp.stride[0] + slot * kp.stride[1] + g * kp.stride[2];
      T* vd = ptr<T>(vp) + page * vp.stride[0] + slot * vp.stride[1] + g * vp.stride[2];
      std::copy_n(ks, dk, kd);
      std::copy_n(vs, dv, vd);
      if (!p.ema) continue;
      if (slot == 0) {  // the state before the page's first token
        std::copy(sk.begin(), sk.end(), ptr<T>(a.ema.k_page_states) + (page * p.G + g) * dk);
        std::copy(sv.begin(), sv.end(), ptr<T>(a.ema.v_page_states) + (page * p.G + g) * dv);
      }
      for (int64_t x = 0; x < dk; ++x) sk[size_t(x)] = beta * sk[size_t(x)] + one_m * ks[x];
      for (int64_t x = 0; x < dv; ++x) sv[size_t(x)] = beta * sv[size_t(x)] + one_m * vs[x];
    }
    if (!p.ema) return;
    const TensorRef &ko = a.k_state_out, &vo = a.v_state_out;
    std::copy(sk.begin(), sk.end(), ptr<T>(ko) + b * ko.stride[0] + g * ko.stride[1]);
    std::copy(sv.begin(), sv.end(), ptr<T>(vo) + b * vo.stride[0] + g * vo.stride[1]);
  }, double(p.B) * p.T * p.G * (p.dk + p.dv) * (p.ema ? 4 : 1));
}

}  // namespace

void paged_write(const PagedProblem& p, const PagedWrite& a) {
  if (p.dtype == DType::f64) write<double>(p, a);
  else write<float>(p, a);
}

}  // namespace mka::cpu
