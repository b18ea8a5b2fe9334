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

// Element (b, t, l) of lam (float32 or the pages' dtype) in T.
template <class T> T lam_at(const TensorRef& lam, int64_t b, int64_t t, int64_t l) {
  const int64_t i = b * lam.stride[0] + t * lam.stride[1] + l * lam.stride[2];
  return lam.dtype == DType::f64 ? T(ptr<const double>(lam)[i]) : T(ptr<const float>(lam)[i]);
}

// route_fuse's rows (SPEC §3.2) written into the pages: per (sequence, head) the EMA runs
// from the held state through the new tokens, each fused row goes where paged_write would
// put the raw one, and the state after them replaces the held one.
template <class T> void write_fused(const PagedProblem& p, int64_t L, const PagedWriteFused& a) {
  const TensorRef &kp = a.pages.k_pages, &vp = a.pages.v_pages, &table = a.pages.block_table;
  const RouteInputs& r = a.route;
  const int32_t* lens = ptr<const int32_t>(a.cache_seqlens);
  const int64_t d = p.dk;
  const T beta = T(p.beta), one_m = T(1) - T(p.beta);
  parallel_for(p.B * p.G, [&](int64_t bg) {
    const int64_t b = bg / p.G, g = bg % p.G;
    const int64_t start = lens[b * a.cache_seqlens.stride[0]];
    const int32_t* row = ptr<const int32_t>(table) + b * table.stride[0];
    for (int side = 0; side < 2; ++side) {
      const TensorRef& x = side ? a.v : a.k;
      const TensorRef& x3 = side ? r.v3 : r.k3;
      const TensorRef& st = side ? r.v_state : r.k_state;
      const TensorRef& pages = side ? vp : kp;
      T* state = ptr<T>(st) + b * st.stride[0] + g * st.stride[1];
      std::vector<T> s(static_cast<size_t>(d));
      for (int64_t c = 0; c < d; ++c) s[size_t(c)] = state[c * st.stride[2]];
      for (int64_t t = 0; t < p.T; ++t) {
        const int64_t pos = start + t, page = row[(pos / p.S) * table.stride[1]], slot = pos % p.S;
        const T* xs = ptr<const T>(x) + b * x.stride[0] + t * x.stride[1] + g * x.stride[2];
        const T* x3s = L == 3 ? ptr<const T>(x3) + b * x3.stride[0] + t * x3.stride[1] + g * x3.stride[2]
                              : nullptr;
        T* dst = ptr<T>(pages) + page * pages.stride[0] + slot * pages.stride[1] + g * pages.stride[2];
        const T w0 = lam_at<T>(r.lam, b, t, 0), w1 = lam_at<T>(r.lam, b, t, 1);
        const T w2 = L == 3 ? lam_at<T>(r.lam, b, t, 2) : T(0);
        for (int64_t c = 0; c < d; ++c) {
          T& e = s[size_t(c)];
          e = beta * e + one_m * xs[c * x.stride[3]];
          T y = w0 * xs[c * x.stride[3]] + w1 * e;
          if (x3s) y += w2 * x3s[c * x3.stride[3]];
          dst[c * pages.stride[3]] = y;
        }
      }
      for (int64_t c = 0; c < d; ++c) state[c * st.stride[2]] = s[size_t(c)];
    }
  }, double(p.B) * p.T * p.G * 2 * d * 6);
}

}  // namespace

void paged_write(const PagedProblem& p, const PagedWrite& a) {
  if (p.dtype == DType::f64) write<double>(p, a);
  else write<float>(p, a);
}

void paged_write_fused(const PagedProblem& p, int64_t L, const PagedWriteFused& a) {
  if (p.dtype == DType::f64) write_fused<double>(p, L, a);
  else write_fused<float>(p, L, a);
}

}  // namespace mka::cpu
