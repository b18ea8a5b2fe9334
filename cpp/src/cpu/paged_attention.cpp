// Attention over pages on the CPU (SPEC §7.1), split over keys (flash-decoding): a task is
// (key split, sequence, key/value head, block of query tokens) and serves every query head
// of its key/value head from one read of each key and value row; splits keep both cores busy
// when one sequence decodes one token, and a combine pass merges their partial softmaxes.
// MKA's level 2 rebuilds EMA(k), EMA(v) of each key from its page's checkpoint while the
// raw row is in cache, so a step reads the pages once plus one (G, d) state per page.
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"
#include "mka/memory/paged_ops.h"

namespace mka::cpu {
namespace {

constexpr int64_t kBlockK = 64;        // keys per tile
constexpr int64_t kRowsPerTask = 64;   // query rows (heads x tokens) per task, at most
constexpr int64_t kMinSplitKeys = 512; // keys a split gets at least
constexpr int64_t kDirectRows = 16;    // up to this many rows, scores by dot products
constexpr int64_t kAhead = 8;          // keys between a key row's prefetch and its use

template <class T> MKA_INLINE void prefetch_row(const T* row, int64_t n) {
  for (int64_t x = 0; x < n; x += 64 / int64_t(sizeof(T))) __builtin_prefetch(row + x);
}

template <class T> struct PagedCtx {
  PagedProblem p;
  const T *q, *kp, *vp, *kst, *vst, *lam;
  int64_t qs[3], ks[3], vs[3], lams[3], os[3];  // strides: (b, t, h) / (page, row, head)
  const int32_t *table, *lens;
  int64_t ts0, ts1, ls;
  T *out, *lse;
  int64_t tq, n_qblocks, splits, split_len;
  int levels;
  T* ws;  // partials of each split: [split][b][t][h][level] x (dv + 2)

  int64_t len(int64_t b) const { return lens[b * ls]; }
  int64_t page(int64_t b, int64_t pos) const {
    return table[b * ts0 + (pos / p.S) * ts1];
  }
  T* partial(int64_t s, int64_t b, int64_t t, int64_t h, int l) const {
    return ws + ((((s * p.B + b) * p.T + t) * p.H + h) * levels + l) * (p.dv + 2);
  }
};

// One level's running softmax over R rows.
template <class T> struct Running {
  T *O, *m, *l;
  void reset(int64_t R, int64_t dv) {
    std::fill(O, O + R * dv, T(0));
    std::fill(m, m + R, -std::numeric_limits<T>::infinity());
    std::fill(l, l + R, T(0));
  }
};

template <class T> struct PagedTask {
  using Ctx = PagedCtx<T>;

  // Scores S (R x n) of a tile starting at key j0: masks each row to [lo, hi), updates the
  // running max/sum, rescales O and leaves probabilities in S. Returns false if no row sees
  // any key of the tile.
  MKA_INLINE static bool softmax_tile(const Ctx& c, T* S, int64_t R, int64_t n, int64_t j0,
                                      int64_t i0, int64_t nk, bool windowed, Running<T>& run) {
    const PagedProblem& p = c.p;
    const int64_t grp = p.group();
    const T ninf = -std::numeric_limits<T>::infinity();
    bool any = false;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = i0 + r / grp;
      T* s = S + r * kBlockK;
      const int64_t lo = std::clamp<int64_t>((windowed ? p.key_lo(i, nk) : 0) - j0, 0, n);
      const int64_t hi = std::clamp<int64_t>(p.key_hi(i, nk) - j0, lo, n);
      for (int64_t jj = 0; jj < lo; ++jj) s[jj] = ninf;
      for (int64_t jj = hi; jj < n; ++jj) s[jj] = ninf;
      const T m_new = std::max(run.m[r], lo < hi ? row_max(s + lo, hi - lo) : ninf);
      if (m_new == ninf) {
        std::fill(s, s + n, T(0));
        continue;
      }
      any = true;
      const T alpha = exp_approx(run.m[r] - m_new);
      run.l[r] = run.l[r] * alpha + row_exp_sum(s, n, m_new);
      run.m[r] = m_new;
      if (alpha != T(1))
        for (int64_t x = 0; x < p.dv; ++x) run.O[r * p.dv + x] *= alpha;
    }
    return any;
  }

  template <Isa I> MKA_INLINE static void run(const Ctx& c, int64_t task) {
    const PagedProblem& p = c.p;
    const int64_t dk = p.dk, dv = p.dv, grp = p.group();
    const int64_t qb = task % c.n_qblocks;
    int64_t rest = task / c.n_qblocks;
    const int64_t g = rest % p.G;
    rest /= p.G;
    const int64_t b = rest % p.B, split = rest / p.B;
    const int64_t i0 = qb * c.tq, tq = std::min(c.tq, p.T - i0), R = tq * grp;
    const int64_t nk = c.len(b);
    const bool ema = c.levels == 2;

    T* Q = scratch<T>(R * dk + 2 * dk * kBlockK + kBlockK * dv + 2 * R * kBlockK +
                      c.levels * R * (dv + 2) + dk + dv);
    T* Kt = Q + R * dk;             // dk x kBlockK, keys of the tile transposed
    T* EKt = Kt + dk * kBlockK;      // dk x kBlockK, their EMA (level 2)
    T* EV = EKt + dk * kBlockK;      // kBlockK x dv, EMA of the values (level 2)
    T* S = EV + kBlockK * dv;        // R x kBlockK scores of level 1
    T* S2 = S + R * kBlockK;         // and of level 2
    T* acc = S2 + R * kBlockK;
    Running<T> lv[2];
    for (int l = 0; l < c.levels; ++l) {
      lv[l] = {acc, acc + R * dv, acc + R * dv + R};
      lv[l].reset(R, dv);
      acc += R * (dv + 2);
    }
    T* sk = acc;  // running EMA states of level 2
    T* sv = sk + dk;

    // Keys this task reads: its split of [lo, hi) (level 2 reads from 0: no window).
    const int64_t hi = std::min(p.key_hi(i0 + tq - 1, nk), (split + 1) * c.split_len);
    const int64_t lo1 = p.key_lo(i0, nk);
    const int64_t lo = std::max(ema ? int64_t(0) : lo1, split * c.split_len);
    if (lo < hi) {
      const T scale = T(p.scale);
      for (int64_t ii = 0; ii < tq; ++ii)
        for (int64_t hh = 0; hh < grp; ++hh) {
          const T* src = c.q + b * c.qs[0] + (i0 + ii) * c.qs[1] + (g * grp + hh) * c.qs[2];
          T* dst = Q + (ii * grp + hh) * dk;
          for (int64_t x = 0; x < dk; ++x) dst[x] = src[x] * scale;
        }
      const T beta = T(p.beta), one_m = T(1) - T(p.beta);
      for (int64_t j0 = lo; j0 < hi; j0 += kBlockK) {
        const int64_t n = std::min(kBlockK, hi - j0);
        // Few rows (decode): scores by dot products straight from the pages. Many rows
        // (a prefill chunk): the tile's keys transposed once, then GEMMs.
        const bool direct = R <= kDirectRows;
        for (int64_t jj = 0; jj < n; ++jj) {
          const int64_t pos = j0 + jj, pg = c.page(b, pos), row = pos % p.S;
          const T* kr = c.kp + pg * c.ks[0] + row * c.ks[1] + g * c.ks[2];
          if (direct) {
            // Rows of scattered pages defeat the hardware prefetcher: ask for the key row a
            // few keys ahead and for this key's value row (read by P V after the tile).
            if (pos + kAhead < hi) {
              const int64_t pa = pos + kAhead;
              prefetch_row(c.kp + c.page(b, pa) * c.ks[0] + (pa % p.S) * c.ks[1] + g * c.ks[2], dk);
            }
            prefetch_row(c.vp + pg * c.vs[0] + row * c.vs[1] + g * c.vs[2], dv);
            if (j0 + jj >= lo1) dot_many<T, I>(R, Q, dk, kr, S + jj, kBlockK);
          } else {
            for (int64_t x = 0; x < dk; ++x) Kt[x * kBlockK + jj] = kr[x];
          }
          if (!ema) continue;
          if (row == 0) {  // a page starts: the EMA restarts from its checkpoint
            std::copy(c.kst + (pg * p.G + g) * dk, c.kst + (pg * p.G + g + 1) * dk, sk);
            std::copy(c.vst + (pg * p.G + g) * dv, c.vst + (pg * p.G + g + 1) * dv, sv);
          }
          const T* vr = c.vp + pg * c.vs[0] + row * c.vs[1] + g * c.vs[2];
          for (int64_t x = 0; x < dk; ++x) sk[x] = beta * sk[x] + one_m * kr[x];
          for (int64_t x = 0; x < dv; ++x) {
            sv[x] = beta * sv[x] + one_m * vr[x];
            EV[jj * dv + x] = sv[x];
          }
          if (direct) dot_many<T, I>(R, Q, dk, sk, S2 + jj, kBlockK);
          else
            for (int64_t x = 0; x < dk; ++x) EKt[x * kBlockK + jj] = sk[x];
        }
        // Level 1: raw keys, within the window.
        if (j0 + n > lo1) {
          if (!direct) gemm_nn<T, I>(R, n, dk, Q, dk, Kt, kBlockK, S, kBlockK, false);
          if (softmax_tile(c, S, R, n, j0, i0, nk, true, lv[0])) {
            for (int64_t s0 = 0; s0 < n;) {  // P V, one page segment at a time
              const int64_t pos = j0 + s0, row = pos % p.S;
              const int64_t seg = std::min(n - s0, p.S - row);
              const T* vr = c.vp + c.page(b, pos) * c.vs[0] + row * c.vs[1] + g * c.vs[2];
              gemm_nn<T, I>(R, dv, seg, S + s0, kBlockK, vr, c.vs[1], lv[0].O, dv, true);
              s0 += seg;
            }
          }
        }
        if (ema) {  // Level 2: EMA keys/values, no window.
          if (!direct) gemm_nn<T, I>(R, n, dk, Q, dk, EKt, kBlockK, S2, kBlockK, false);
          if (softmax_tile(c, S2, R, n, j0, i0, nk, false, lv[1]))
            gemm_nn<T, I>(R, dv, n, S2, kBlockK, EV, dv, lv[1].O, dv, true);
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = i0 + r / grp, h = g * grp + r % grp;
      if (c.splits > 1) {
        for (int l = 0; l < c.levels; ++l) {
          T* dst = c.partial(split, b, i, h, l);
          std::copy(lv[l].O + r * dv, lv[l].O + (r + 1) * dv, dst);
          dst[dv] = lv[l].m[r];
          dst[dv + 1] = lv[l].l[r];
        }
        continue;
      }
      finish(c, b, i, h, [&](int l) { return lv[l].O + r * dv; },
             [&](int l) { return lv[l].m[r]; }, [&](int l) { return lv[l].l[r]; });
    }
  }

  // out = O / l (or lam0 O1 / l1 + lam1 O2 / l2), lse = m + log l; rows seeing nothing: 0.
  template <class OF, class MF, class LF>
  MKA_INLINE static void finish(const Ctx& c, int64_t b, int64_t i, int64_t h, OF O, MF m, LF l) {
    const int64_t dv = c.p.dv;
    T* dst = c.out + b * c.os[0] + i * c.os[1] + h * c.os[2];
    std::fill(dst, dst + dv, T(0));
    for (int lev = 0; lev < c.levels; ++lev) {
      T w = T(1);
      if (c.levels == 2) w = c.lam[b * c.lams[0] + i * c.lams[1] + lev * c.lams[2]];
      const T li = l(lev);
      if (li > 0) {
        const T f = w / li;
        const T* o = O(lev);
        for (int64_t x = 0; x < dv; ++x) dst[x] += o[x] * f;
      }
    }
    if (c.lse) {
      const T li = l(0);
      c.lse[(b * c.p.H + h) * c.p.T + i] =
          li > 0 ? m(0) + std::log(li) : -std::numeric_limits<T>::infinity();
    }
  }
};

// Merges the splits' partial softmaxes of one (b, t, h).
template <class T> void combine(const PagedCtx<T>& c, int64_t bth) {
  const PagedProblem& p = c.p;
  const int64_t h = bth % p.H, t = (bth / p.H) % p.T, b = bth / (p.H * p.T), dv = p.dv;
  T O[2][256], M[2], L[2];
  for (int l = 0; l < c.levels; ++l) {
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t s = 0; s < c.splits; ++s) m = std::max(m, c.partial(s, b, t, h, l)[dv]);
    std::fill(O[l], O[l] + dv, T(0));
    T sum = 0;
    if (m != -std::numeric_limits<T>::infinity())
      for (int64_t s = 0; s < c.splits; ++s) {
        const T* part = c.partial(s, b, t, h, l);
        if (part[dv + 1] == T(0)) continue;
        const T f = std::exp(part[dv] - m);
        sum += part[dv + 1] * f;
        for (int64_t x = 0; x < dv; ++x) O[l][x] += part[x] * f;
      }
    M[l] = m, L[l] = sum;
  }
  PagedTask<T>::finish(c, b, t, h, [&](int l) { return O[l]; }, [&](int l) { return M[l]; },
                       [&](int l) { return L[l]; });
}

// Splits the keys, runs the tasks, merges the splits.
template <class T> void run(PagedCtx<T>& c) {
  const PagedProblem& p = c.p;
  if (p.B == 0 || p.T == 0 || p.H == 0) return;
  c.tq = std::max<int64_t>(1, kRowsPerTask / p.group());
  c.n_qblocks = (p.T + c.tq - 1) / c.tq;
  int64_t max_len = 0;
  for (int64_t b = 0; b < p.B; ++b) max_len = std::max<int64_t>(max_len, c.len(b));
  // Splits: enough tasks for every thread to have several, each at least kMinSplitKeys keys
  // and a whole number of units: pages with level 2 (its checkpoints are per page), else
  // key tiles.
  const int64_t base = p.B * p.G * c.n_qblocks, want = 4 * int64_t(num_threads());
  const int64_t splits = std::max<int64_t>(
      1, std::min((want + base - 1) / base, (max_len + kMinSplitKeys - 1) / kMinSplitKeys));
  const int64_t unit = p.ema ? p.S : kBlockK;
  const int64_t units = (std::max<int64_t>(max_len, 1) + unit - 1) / unit;
  c.split_len = ((units + splits - 1) / splits) * unit;
  c.splits = std::max<int64_t>(1, (max_len + c.split_len - 1) / c.split_len);
  std::vector<T> ws;
  if (c.splits > 1) {
    ws.resize(size_t(c.splits * p.B * p.T * p.H * c.levels * (p.dv + 2)));
    c.ws = ws.data();
  }
  run_tasks<PagedTask<T>>(c.splits * base, c, double(p.B) * p.T * p.H * max_len * (p.dk + p.dv));
  if (c.splits > 1)
    parallel_for(p.B * p.T * p.H, [&](int64_t i) { combine(c, i); },
                 double(c.splits) * p.B * p.T * p.H * c.levels * p.dv);
}

template <class T> void attend(const PagedProblem& p, const PagedAttentionFwd& a) {
  PagedCtx<T> c{};
  c.p = p;
  c.q = ptr<const T>(a.q), c.kp = ptr<const T>(a.pages.k_pages), c.vp = ptr<const T>(a.pages.v_pages);
  for (int i = 0; i < 3; ++i) {
    c.qs[i] = a.q.stride[i];
    c.ks[i] = a.pages.k_pages.stride[i];
    c.vs[i] = a.pages.v_pages.stride[i];
    c.os[i] = a.out.stride[i];
  }
  c.table = ptr<const int32_t>(a.pages.block_table);
  c.ts0 = a.pages.block_table.stride[0], c.ts1 = a.pages.block_table.stride[1];
  c.lens = ptr<const int32_t>(a.seqlens), c.ls = a.seqlens.stride[0];
  c.out = ptr<T>(a.out);
  c.lse = a.lse.present() ? ptr<T>(a.lse) : nullptr;
  c.levels = p.ema ? 2 : 1;
  if (p.ema) {
    c.kst = ptr<const T>(a.ema.k_page_states), c.vst = ptr<const T>(a.ema.v_page_states);
    c.lam = ptr<const T>(a.lam);
    for (int i = 0; i < 3; ++i) c.lams[i] = a.lam.stride[i];
  }
  run(c);
}

// Attention over a contiguous cache (B, Tk, G, d) with few query rows: the decode kernel with
// one page of Tk tokens per sequence, the cache's own strides.
template <class T> void attend_contiguous(const AttentionProblem& ap, const TensorRef& q,
                                          const TensorRef& k, const TensorRef& v,
                                          const TensorRef& out, const TensorRef& lse) {
  PagedProblem p;
  p.B = ap.B, p.T = ap.Tq, p.H = ap.H, p.G = ap.G, p.dk = p.dv = ap.d;
  p.P = ap.B, p.S = std::max<int64_t>(ap.Tk, 1), p.W = 1;
  p.causal = ap.causal, p.scale = ap.scale, p.window = ap.window;
  p.dtype = ap.dtype, p.device = ap.device;
  std::vector<int32_t> table(size_t(ap.B)), lens(size_t(ap.B), int32_t(ap.Tk));
  for (int64_t b = 0; b < ap.B; ++b) table[size_t(b)] = int32_t(b);
  PagedCtx<T> c{};
  c.p = p;
  c.q = ptr<const T>(q), c.kp = ptr<const T>(k), c.vp = ptr<const T>(v);
  for (int i = 0; i < 3; ++i) {
    c.qs[i] = q.stride[i], c.ks[i] = k.stride[i], c.vs[i] = v.stride[i], c.os[i] = out.stride[i];
  }
  c.table = table.data(), c.ts0 = 1, c.ts1 = 0;
  c.lens = lens.data(), c.ls = 1;
  c.out = ptr<T>(out), c.lse = ptr<T>(lse);
  c.levels = 1;
  run(c);
}

}  // namespace

bool decode_shaped(const AttentionProblem& p) {
  return p.group() * p.Tq <= kDirectRows && p.Tk >= 1 && p.Tk <= INT32_MAX && p.B <= INT32_MAX;
}

void decode_attention(const AttentionProblem& p, const TensorRef& q, const TensorRef& k,
                      const TensorRef& v, const TensorRef& out, const TensorRef& lse) {
  if (p.dtype == DType::f64) attend_contiguous<double>(p, q, k, v, out, lse);
  else attend_contiguous<float>(p, q, k, v, out, lse);
}

void paged_attention(const PagedProblem& p, const PagedAttentionFwd& a) {
  if (p.dtype == DType::f64) attend<double>(p, a);
  else attend<float>(p, a);
}

}  // namespace mka::cpu
