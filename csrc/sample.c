/* Choosing the next token from one position's logits: edgepanel/sample.py's Sampler in one call.
 *
 * The order of operations is Sampler's, step for step, in float64: repetition penalty on each
 * token seen (once per distinct token), division by the temperature, top-k's cut at the k-th
 * largest value, exp(x - max), the sum, min-p's bar (min_p times the best probability), top-p
 * over min-p's kept set (or the nucleus when min-p is off: the same candidates-then-widen search
 * as sample.nucleus), and the draw: the running sums over the kept tokens in index order,
 * normalized by their last, the first above u.
 *
 * What differs from NumPy is only rounding: exp (here a polynomial whose error is a few units in
 * the last place, the same bits on every machine since the build keeps multiplications and
 * additions apart), the sums (here in a fixed order of eight running sums, where NumPy sums
 * pairwise), and, in the draw over the whole vocabulary, a multiplication by the total's
 * reciprocal where NumPy divides.  The probabilities then agree with NumPy's to about 1e-15
 * relative, so the same tokens come out for a seed unless u falls that close to a boundary of the
 * running sums (tests/test_sample.py compares the two over thousands of draws).
 *
 * NumPy took 0.35-0.45 ms a token over a 49152-token vocabulary (a dozen passes over float64
 * copies); here it is three passes, the exp loop written so that the compiler vectorizes it. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ep_internal.h"

#if defined(__GNUC__) && !defined(__clang__)
/* No floating-point traps are enabled, so the compiler may compute both sides of the exp's
 * selects: without this its loop is not vectorized.  The results do not change. */
#pragma GCC optimize("no-trapping-math")
#endif

/* exp(x) for x <= 0, 0 below -708 (where exp is under 2^-1021: such a token can neither pass a
 * cut nor be drawn).  x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to r^13
 * (remainder under 5e-18), times 2^n built in the exponent bits.  Branch-free so that it
 * vectorizes; -inf gives 0. */
static inline double exp_nonpositive(double x) {
    const double shift = 0x1.8p52, log2e = 1.4426950408889634;
    const double ln2_hi = 0x1.62e42fee00000p-1, ln2_lo = 0x1.a39ef35793c76p-33;  /* n * ln2_hi is exact */
    const double xc = x < -708.0 ? -708.0 : x;
    double kd = xc * log2e + shift;               /* round(x / ln2) in the low bits */
    uint64_t ki;
    memcpy(&ki, &kd, sizeof ki);
    kd -= shift;
    const double r = (xc - kd * ln2_hi) - kd * ln2_lo;
    double p = 1.0 / 6227020800.0;                 /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const uint64_t sbits = (ki + 1023u) << 52;    /* ki = 3 * 2^51 + n: 2^n, n in [-1022, 0] */
    double s;
    memcpy(&s, &sbits, sizeof s);
    const double y = p * s;
    return x < -708.0 ? 0.0 : y;
}

/* The two passes over the whole vocabulary that cost most, compiled for AVX-512 and AVX2 as well
 * on x86-64 (the loader picks the widest this CPU runs): the same operations in the same order,
 * so the same bits, with 8 or 4 lanes instead of 2. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)   /* ifunc: glibc */
#define EP_WIDE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EP_WIDE
#endif

EP_WIDE static void exp_pass(double *x, int64_t n, double mx) {
    for (int64_t i = 0; i < n; i++) x[i] = exp_nonpositive(x[i] - mx);
}

EP_WIDE static void div_pass(double *x, int64_t n, double d) {
    for (int64_t i = 0; i < n; i++) x[i] /= d;
}

/* x = the logits in float64; returns how many are not finite. */
EP_WIDE static int64_t widen(const float *l, double *x, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = l[i];
        bad += !isfinite(l[i]);
    }
    return bad;
}

/* The largest of x[0..n) (exact in any order).  In GCC's vector types: the compiler does not
 * vectorize a max of doubles written as a loop (its NaN rules forbid reordering it). */
typedef double ep_v8d __attribute__((vector_size(64)));
typedef int64_t ep_v8l __attribute__((vector_size(64)));

EP_WIDE static double max_of(const double *x, int64_t n) {
    ep_v8d m = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        ep_v8d v;
        memcpy(&v, x + i, sizeof v);
        const ep_v8l gt = v > m;
        m = (ep_v8d)(((ep_v8l)v & gt) | ((ep_v8l)m & ~gt));
    }
    double r = -INFINITY;
    for (int j = 0; j < 8; j++) r = m[j] > r ? m[j] : r;
    for (; i < n; i++) r = x[i] > r ? x[i] : r;
    return r;
}

/* How many of x[0..n) are >= bar. */
EP_WIDE static int64_t count_at_least(const double *x, int64_t n, double bar) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += x[i] >= bar;
    return c;
}

/* The last i with x[i] > 0 (the draw's end when rounding leaves u above every running sum). */
static int64_t last_positive(const double *x, int64_t n) {
    int64_t i = n - 1;
    while (i > 0 && !(x[i] > 0)) i--;
    return i;
}

/* The first i in [from, n) with x[i] >= bar, or n: blocks of 64 counted (vectorized), then the
 * one that holds it walked. */
static int64_t next_at_least(const double *x, int64_t from, int64_t n, double bar) {
    for (int64_t i0 = from; i0 < n; i0 += 64) {
        const int64_t len = n - i0 < 64 ? n - i0 : 64;
        if (!count_at_least(x + i0, len, bar)) continue;
        for (int64_t i = i0; i < i0 + len; i++)
            if (x[i] >= bar) return i;
    }
    return n;
}

/* Eight running sums in a fixed order, then combined pairwise: the same bits whatever the compiler
 * does with the loop. */
static double sum8(const double *x, int64_t n) {
    double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) a[j] += x[i + j];
    for (int j = 0; i < n; i++, j++) a[j] += x[i];
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* Min-heap h[0..k): v settles down from position j. */
static inline void sift_down(double *h, int64_t k, int64_t j, double v) {
    for (int64_t c; (c = 2 * j + 1) < k; j = c) {
        if (c + 1 < k && h[c + 1] < h[c]) c++;
        if (!(h[c] < v)) break;
        h[j] = h[c];
    }
    h[j] = v;
}

/* The k-th largest of x[0..n) (1 <= k <= n), ties counted: a min-heap of the k largest seen so
 * far, in h[0..k).  On a shuffled vocabulary few values displace its root (about k ln(n/k)), so
 * this is a scan of x plus little; NumPy's partition moves every value. */
static double kth_largest(const double *x, int64_t n, int64_t k, double *h) {
    memcpy(h, x, (size_t)k * sizeof *h);
    for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(h, k, i, h[i]);     /* heapify */
    for (int64_t i = k; i < n; i++)
        if (x[i] > h[0]) sift_down(h, k, 0, x[i]);
    return h[0];
}

typedef struct { double p; int64_t i; } cand;

/* A stable merge sort of c[0..m) (tmp: m more): by decreasing p (ties keep their order, so
 * candidates gathered in index order come out as NumPy's stable argsort of -p), or by increasing
 * index. */
static void merge_sort(cand *c, int64_t m, cand *tmp, int by_index) {
    cand *src = c, *dst = tmp;
    for (int64_t w = 1; w < m; w *= 2) {
        for (int64_t lo = 0; lo < m; lo += 2 * w) {
            const int64_t mid = lo + w < m ? lo + w : m, hi = lo + 2 * w < m ? lo + 2 * w : m;
            int64_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi) {
                const int take_b = by_index ? src[b].i < src[a].i : src[b].p > src[a].p;
                dst[o++] = take_b ? src[b++] : src[a++];
            }
            while (a < mid) dst[o++] = src[a++];
            while (b < hi) dst[o++] = src[b++];
        }
        cand *t = src; src = dst; dst = t;
    }
    if (src != c) memcpy(c, src, (size_t)m * sizeof *c);
}

/* c[0..m) in index order: sorted by decreasing p, keep those whose preceding mass (the running
 * sum less the token's own, as NumPy's cumsum(p) - p) is below top_p; returns how many, back in
 * index order.  *last: whether the last of the m was kept. */
static int64_t keep_top_p(cand *c, int64_t m, double top_p, cand *tmp, int *last) {
    merge_sort(c, m, tmp, 0);
    double run = 0.0;
    int64_t kept = 0;
    *last = 0;
    for (int64_t j = 0; j < m; j++) {
        run += c[j].p;
        *last = run - c[j].p < top_p;
        if (*last) c[kept++] = c[j];
    }
    merge_sort(c, kept, tmp, 1);
    return kept;
}

/* sample.nucleus: candidates above the m-th largest probability (m = 64, then 8x more), sorted;
 * done when the set ends inside them; else the whole vocabulary.  Returns the set's size, in c in
 * index order.  q: the probabilities; h: n doubles of scratch. */
static int64_t nucleus(const double *q, int64_t n, double top_p, double *h, cand *c, cand *tmp) {
    int last;
    for (int64_t m = 64; m < n; m *= 8) {
        const double bar = kth_largest(q, n, m, h);
        int64_t nc = 0;
        for (int64_t i = 0; i < n; i++)
            if (q[i] > bar) c[nc++] = (cand){q[i], i};
        const int64_t kept = keep_top_p(c, nc, top_p, tmp, &last);
        if (nc && !last) return kept;
    }
    for (int64_t i = 0; i < n; i++) c[i] = (cand){q[i], i};
    return keep_top_p(c, n, top_p, tmp, &last);
}

int64_t ep_sample_work_bytes(int64_t n) {
    return n <= 0 ? 0 : n * (int64_t)(2 * sizeof(double) + 2 * sizeof(cand) + 1);
}

int64_t ep_sample(const float *logits, int64_t n, const int64_t *history, int64_t n_history,
                  double temperature, int64_t top_k, double top_p, double min_p, double penalty,
                  double u, void *work, int64_t work_bytes, int64_t *nonfinite) {
    if (!logits || n <= 0 || (n_history && !history) || n_history < 0 || !nonfinite || !work ||
        !(temperature >= 0) || top_k < 0 || !(top_p > 0 && top_p <= 1) || !(min_p >= 0 && min_p < 1) ||
        !(penalty > 0) || !(u >= 0 && u < 1))
        return EP_EINVAL;
    if (work_bytes < ep_sample_work_bytes(n)) return EP_ENOMEM;
    double *x = work, *v = x + n;
    cand *c = (cand *)(v + n), *tmp = c + n;
    uint8_t *seen = (uint8_t *)(tmp + n);

    const int64_t bad = widen(logits, x, n);
    *nonfinite = bad;
    if (bad) return EP_EINVAL;
    if (penalty != 1.0 && n_history) {
        memset(seen, 0, (size_t)n);
        for (int64_t h = 0; h < n_history; h++) {
            const int64_t t = history[h];
            if (t < 0 || t >= n || seen[t]) continue;
            seen[t] = 1;
            x[t] = x[t] > 0 ? x[t] / penalty : x[t] * penalty;
        }
    }
    const double top = max_of(x, n);
    /* Greedy at temperature 0, and where x / temperature leaves the doubles (a temperature so
     * small that the largest is +-inf after it: the limit of the distribution is the first
     * largest, as greedy picks). */
    const double mx = temperature == 0 ? INFINITY : top / temperature;
    if (!isfinite(mx)) return next_at_least(x, 0, n, top);
    div_pass(x, n, temperature);                  /* mx is their largest: division keeps order */
    if (top_k && top_k < n) {
        const double kth = kth_largest(x, n, top_k, v);
        for (int64_t i = 0; i < n; i++)
            if (x[i] < kth) x[i] = -INFINITY;
    }
    exp_pass(x, n, mx);
    const double total = sum8(x, n);

    int64_t m;                                    /* the kept tokens, c[0..m) in index order */
    if (min_p > 0) {
        /* kept: x / total >= min_p * (1 / total), the best probability being 1 / total.  Only
         * tokens with x near min_p or above can pass: those are divided and compared. */
        const double bar = min_p * (1.0 / total), near = min_p * (1.0 - 1e-9);
        m = 0;
        for (int64_t i = next_at_least(x, 0, n, near); i < n; i = next_at_least(x, i + 1, n, near)) {
            const double q = x[i] / total;
            if (q >= bar) c[m++] = (cand){q, i};
        }
        if (top_p < 1.0) m = keep_top_p(c, m, top_p, tmp, &(int){0});
    } else {
        div_pass(x, n, total);
        if (top_p < 1.0) m = nucleus(x, n, top_p, v, c, tmp);
        else {
            /* No cut: the draw over the whole vocabulary.  The running sum's total is taken first
             * (eight running sums: within rounding of the sequential one) and the walk stops at u;
             * a token of probability 0 adds nothing, so it is never the first above u. */
            const double s = sum8(x, n), inv = 1.0 / s;
            double run = 0.0;
            for (int64_t i = 0; i < n; i++) {
                run += x[i];
                if (run * inv > u && x[i] > 0) return i;
            }
            return last_positive(x, n);
        }
    }
    /* The draw, as sample.draw over probs renormalized to the kept set: running sums of p / s in
     * index order, normalized by the last, the first above u. */
    double s = 0.0;
    for (int64_t j = 0; j < m; j++) s += c[j].p;
    double run = 0.0;
    for (int64_t j = 0; j < m; j++) v[j] = run += c[j].p / s;
    for (int64_t j = 0; j < m; j++)
        if (v[j] / run > u) return c[j].i;
    return m ? c[m - 1].i : EP_EINVAL;            /* not reached: the best token is always kept */
}
