// Validation and dispatch of the paged ops: shapes, dtypes and devices of every tensor, and
// on the CPU every block-table entry a call will touch, before any page is read or written.
#include "mka/memory/paged_ops.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../ops/checks.h"
#include "mka/error.h"

namespace mka {
namespace {

using checks::check_dtype;
using checks::check_shape;
using checks::dtype_supported;

// Every tensor of a paged op lives where the pages do.
void check_device(const TensorRef& t, const char* name, const TensorRef& pages) {
  checks::check_same_device(t, name, pages, "k_pages");
}

// The pages, the table and the per-sequence lengths (B,) int32.
PagedProblem check_pages(const PagedKV& kv, const TensorRef& lens, const char* lens_name,
                         int64_t B) {
  const TensorRef &kp = kv.k_pages, &vp = kv.v_pages;
  check_shape(kp, "k_pages", {-1, -1, -1, -1}, "(P, S, G, dk)");
  check_shape(vp, "v_pages", {kp.shape[0], kp.shape[1], kp.shape[2], -1},
              "(P, S, G, dv) matching k_pages' P, S, G");
  check_device(vp, "v_pages", kp);
  MKA_CHECK(dtype_supported(kp.dtype, kp.device), "k_pages: dtype ", dtype_name(kp.dtype),
            " is not supported on ", device_name(kp.device));
  check_dtype(vp, "v_pages", kp.dtype);
  PagedProblem p;
  p.P = kp.shape[0], p.S = kp.shape[1], p.G = kp.shape[2], p.dk = kp.shape[3];
  p.dv = vp.shape[3], p.B = B;
  MKA_CHECK(p.S >= 1, "k_pages: page size must be at least 1, got ", p.S);
  MKA_CHECK(p.G >= 1, "k_pages: needs at least one key/value head, got G = ", p.G);
  // Rows of a page and heads of a row are addressed by stride; tokens of a page are not
  // assumed contiguous with the next page.
  check_shape(kv.block_table, "block_table", {B, -1}, "(B, W) int32");
  check_dtype(kv.block_table, "block_table", DType::i32);
  check_device(kv.block_table, "block_table", kp);
  p.W = kv.block_table.shape[1];
  check_shape(lens, lens_name, {B}, "(B,) int32");
  check_dtype(lens, lens_name, DType::i32);
  check_device(lens, lens_name, kp);
  p.dtype = kp.dtype, p.device = kp.device, p.device_id = kp.device_id;
  return p;
}

// Sequence b's tokens [begin, end) — the slots a call touches — must lie in valid pages of
// its table row. Entries before `begin` may be -1: pages the DRAM tier gave back (SPEC §7.3).
void check_table_row(const PagedProblem& p, const TensorRef& table, int64_t b, int64_t begin,
                     int64_t end, const char* lens_name, int64_t len) {
  MKA_CHECK(end <= p.W * p.S, lens_name, ": sequence ", b, " needs ", end,
            " token slots, more than its block table row holds (", p.W, " pages of ", p.S,
            " tokens)");
  const int32_t* row = ptr<const int32_t>(table) + b * table.stride[0];
  for (int64_t i = begin / p.S; i * p.S < end; ++i) {
    const int32_t page = row[i * table.stride[1]];
    MKA_CHECK(page >= 0 && page < p.P, "block_table: entry [", b, ", ", i, "] = ", page,
              " is not a page index in [0, ", p.P, ") (sequence ", b, " has ", len,
              " tokens)");
  }
}

void check_ema(PagedProblem& p, const PagedEma& e, const TensorRef& pages, int64_t d) {
  p.ema = e.k_page_states.present() || e.v_page_states.present();
  if (!p.ema) return;
  MKA_CHECK(std::isfinite(e.beta) && e.beta >= 0.0 && e.beta < 1.0,
            "beta: must be in [0, 1), got ", e.beta);
  MKA_CHECK(p.dk == p.dv, "v_pages: MKA's level 2 needs dv = dk, got ", p.dv, " and ", p.dk);
  for (auto [t, name] : {std::pair{&e.k_page_states, "k_page_states"},
                         std::pair{&e.v_page_states, "v_page_states"}}) {
    check_shape(*t, name, {p.P, p.G, d}, "(P, G, d) matching the pages");
    check_dtype(*t, name, stats_dtype(p.dtype));
    check_device(*t, name, pages);
    MKA_CHECK(is_contiguous(*t), name, ": must be contiguous");
  }
  p.beta = e.beta;
}

// On the CPU, before a write: every slot written must be a valid page of its row, and no
// page may be written by two sequences (a shared page must be copied first, as
// PageTable::reserve does).
void check_written_slots(const PagedProblem& p, const TensorRef& table, const TensorRef& starts) {
  const int32_t* lens = ptr<const int32_t>(starts);
  std::vector<std::pair<int32_t, int64_t>> written;
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t start = lens[b * starts.stride[0]];
    MKA_CHECK(start >= 0, "cache_seqlens: entry ", b, " is negative (", start, ")");
    if (p.T == 0) continue;
    check_table_row(p, table, b, start, start + p.T, "cache_seqlens", start);
    const int32_t* row = ptr<const int32_t>(table) + b * table.stride[0];
    for (int64_t i = start / p.S; i * p.S < start + p.T; ++i)
      written.emplace_back(row[i * table.stride[1]], b);
  }
  std::sort(written.begin(), written.end());
  for (size_t i = 1; i < written.size(); ++i)
    MKA_CHECK(written[i].first != written[i - 1].first || written[i].second == written[i - 1].second,
              "block_table: page ", written[i].first, " is written by sequences ",
              written[i - 1].second, " and ", written[i].second,
              " (a shared page must be copied before a write: PageTable.reserve does)");
}

// The new rows k (B, T, G, dk) of a write and the pages they go to.
PagedProblem check_write_rows(const TensorRef& k, const PagedKV& pages, const TensorRef& starts) {
  check_shape(k, "k", {-1, -1, -1, -1}, "(B, T, G, dk)");
  PagedProblem p = check_pages(pages, starts, "cache_seqlens", k.shape[0]);
  p.T = k.shape[1];
  check_shape(k, "k", {p.B, p.T, p.G, p.dk}, "(B, T, G, dk) matching k_pages' G and dk");
  check_device(k, "k", pages.k_pages);
  check_dtype(k, "k", p.dtype);
  return p;
}

void run_cuda_write(const PagedProblem& p, const PagedWrite& a) {
#if MKA_WITH_CUDA
  cuda::paged_write(p, a);
#else
  (void)p, (void)a;
  fail("paged_write: this build of mka has no CUDA kernels");
#endif
}

void run_cuda_attention(const PagedProblem& p, const PagedAttentionFwd& a) {
#if MKA_WITH_CUDA
  cuda::paged_attention(p, a);
#else
  (void)p, (void)a;
  fail("paged_attention: this build of mka has no CUDA kernels");
#endif
}

}  // namespace

void paged_write(const PagedWrite& a) {
  PagedProblem p = check_write_rows(a.k, a.pages, a.cache_seqlens);
  check_shape(a.v, "v", {p.B, p.T, p.G, p.dv}, "(B, T, G, dv) matching k and v_pages' dv");
  check_device(a.v, "v", a.pages.k_pages);
  check_dtype(a.v, "v", p.dtype);
  check_ema(p, a.ema, a.pages.k_pages, p.dk);
  const DType sdt = stats_dtype(p.dtype);
  for (auto [t, name] : {std::pair{&a.k_state, "k_state"}, std::pair{&a.v_state, "v_state"},
                         std::pair{&a.k_state_out, "k_state_out"},
                         std::pair{&a.v_state_out, "v_state_out"}}) {
    if (!t->present()) continue;
    MKA_CHECK(p.ema, name, ": given, but no page states (k_page_states, v_page_states)");
    check_shape(*t, name, {p.B, p.G, p.dk}, "(B, G, d)");
    check_dtype(*t, name, sdt);
    check_device(*t, name, a.pages.k_pages);
  }
  if (p.ema)
    MKA_CHECK(a.k_state_out.present() && a.v_state_out.present(),
              "k_state_out: required with page states (the running EMA state after the write)");
  if (p.device != Device::cpu) {
    // The table and lengths are on the device: the Python layer checked the slots written.
    for (auto [t, name] : {std::pair{&a.k_state, "k_state"}, std::pair{&a.v_state, "v_state"},
                           std::pair{&a.k_state_out, "k_state_out"},
                           std::pair{&a.v_state_out, "v_state_out"}})
      MKA_CHECK(!t->present() || t->stride[2] == 1, name, ": its last dim must be contiguous");
    run_cuda_write(p, a);
    return;
  }
  check_written_slots(p, a.pages.block_table, a.cache_seqlens);
  cpu::paged_write(p, a);
}

void paged_write_fused(const PagedWriteFused& a) {
  PagedProblem p = check_write_rows(a.k, a.pages, a.cache_seqlens);
  MKA_CHECK(p.dv == p.dk, "v_pages: FastMKA's fusion needs dv = dk, got ", p.dv, " and ", p.dk);
  // v, lam, k3/v3 and the states as route_fuse takes them (SPEC §3.2), lam over the T tokens.
  const RouteProblem r = check_route(a.k, a.v, a.route, p.T, "(B, T, L)", true);
  for (auto [t, name] : {std::pair{&a.route.k_state, "k_state"}, std::pair{&a.route.v_state, "v_state"}}) {
    MKA_CHECK(t->present(), name, ": required (the running EMA state, overwritten with the "
              "state after the new tokens)");
    if (p.device != Device::cpu)
      MKA_CHECK(t->stride[2] == 1, name, ": its last dim must be contiguous");
    // Written in place: two elements on one address would be overwritten by each other.
    for (int d = 0; d < 3; ++d)
      MKA_CHECK(t->shape[d] <= 1 || t->stride[d] != 0, name,
                ": an expanded (stride 0) view cannot be updated in place; pass a tensor of its own");
  }
  MKA_CHECK(a.route.k_state.data != a.route.v_state.data,
            "v_state: the same memory as k_state; each needs its own (both are updated in place)");
  p.ema = true, p.beta = r.beta;
  if (p.device != Device::cpu) {
#if MKA_WITH_CUDA
    cuda::paged_write_fused(p, r.L, a);
#else
    fail("paged_write_fused: this build of mka has no CUDA kernels");
#endif
    return;
  }
  check_written_slots(p, a.pages.block_table, a.cache_seqlens);
  cpu::paged_write_fused(p, r.L, a);
}

void paged_attention(const PagedAttentionFwd& a) {
  const TensorRef& q = a.q;
  check_shape(q, "q", {-1, -1, -1, -1}, "(B, Tq, H, dk)");
  PagedProblem p = check_pages(a.pages, a.seqlens, "seqlens", q.shape[0]);
  p.T = q.shape[1], p.H = q.shape[2];
  check_shape(q, "q", {p.B, p.T, p.H, p.dk}, "(B, Tq, H, dk) matching k_pages' dk");
  check_device(q, "q", a.pages.k_pages);
  check_dtype(q, "q", p.dtype);
  MKA_CHECK(p.H % p.G == 0, "q: the number of query heads H = ", p.H,
            " must be a multiple of the key/value heads G = ", p.G);
  MKA_CHECK(p.dk >= 1 && p.dv >= 1, "k_pages: head dims must be at least 1");
  if (p.device == Device::cpu)
    MKA_CHECK(p.dk <= 256 && p.dv <= 256, "k_pages: head dim ", std::max(p.dk, p.dv),
              " is not supported on cpu (at most 256)");
  const AttnOptions& o = a.opts;
  checks::check_attn_options(o, p.dtype);
  p.causal = o.causal;
  p.scale = o.scale ? *o.scale : 1.0 / std::sqrt(double(p.dk));
  // Windows beyond 2^62 hide nothing a table can hold; clamped so bounds never overflow.
  p.window = o.window ? std::min<int64_t>(*o.window, int64_t(1) << 62) : -1;
  check_ema(p, a.ema, a.pages.k_pages, p.dk);
  MKA_CHECK(a.lam.present() == p.ema, p.ema ? "lam: required with page states (MKA's routing)"
                                            : "lam: given, but no page states (k_page_states)");
  if (p.ema) {
    check_shape(a.lam, "lam", {p.B, p.T, -1}, "(B, Tq, L)");
    check_dtype(a.lam, "lam", p.dtype);
    check_device(a.lam, "lam", a.pages.k_pages);
    MKA_CHECK(a.lam.shape[2] >= 2, "lam: expected L >= 2 levels, got ", a.lam.shape[2]);
    MKA_CHECK(!a.lse.present(), "lse: only plain paged attention returns it");
  }
  check_shape(a.out, "out", {p.B, p.T, p.H, p.dv}, "(B, Tq, H, dv)");
  check_dtype(a.out, "out", p.dtype);
  check_device(a.out, "out", a.pages.k_pages);
  if (a.lse.present()) {
    check_shape(a.lse, "lse", {p.B, p.H, p.T}, "(B, H, Tq)");
    check_dtype(a.lse, "lse", stats_dtype(p.dtype));
    MKA_CHECK(is_contiguous(a.lse), "lse: must be contiguous");
  }
  if (p.device != Device::cpu) {
    // Entries and lengths stay on the device (reading them would synchronise every step): a
    // kernel meeting an invalid one reads nothing outside the pages and writes NaN rows.
    MKA_CHECK(std::max(p.dk, p.dv) <= 256, "k_pages: head dim ", std::max(p.dk, p.dv),
              " is not supported on cuda (at most 256)");
    run_cuda_attention(p, a);
    return;
  }
  const int32_t* lens = ptr<const int32_t>(a.seqlens);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t n = lens[b * a.seqlens.stride[0]];
    MKA_CHECK(n >= 0, "seqlens: entry ", b, " is negative (", n, ")");
    // the first row's window start is every row's lowest key; level 2 (ema) reads from 0
    check_table_row(p, a.pages.block_table, b, p.ema ? 0 : p.key_lo(0, n), n, "seqlens", n);
  }
  cpu::paged_attention(p, a);
}

}  // namespace mka
