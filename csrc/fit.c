/* Calibration-aware fitting (issue 24): GPTQ's column loop for one block of whole groups, the work
 * edgepanel/quantize.py's gptq_planes does column by column in NumPy, here row by row.
 *
 * GPTQ is independent per row once H^-1's upper Cholesky factor U is known: a row's rounding
 * errors only move that row's later columns.  So each row runs alone (rows split among threads;
 * the results do not depend on the thread count): for each group of the block, fit the group's k
 * scales on the row's current values (greedy residual planes + ALS, as quantize.greedy_planes and
 * quantize.als_refine do), then for each column of the group take the nearest of the 2^k levels,
 * feed err = (w - q) / U[j][j] forward to the row's later block columns and record it.  Python
 * applies the block's error to the columns after it with one BLAS product.
 *
 * The arithmetic is NumPy's, operation for operation where the order is fixed (every update,
 * every level comparison, first minimum on ties, scales rounded to float32 where NumPy rounds
 * them); the sums (mean |r|, B w) are taken in double on both sides, where a sum of float32
 * values is exact, or nearly, whatever its order.  Only the k x k solve differs from LAPACK's, by
 * a rounding the float32 scales do not see: the two paths agree bit for bit (tests/test_fit.py).
 * Plain C: the compiler vectorizes what it can, on every target. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "ep_internal.h"

/* A level is a combination of the k planes' signs, numbered in itertools.product((-1, 1), repeat=k)
 * order: bit (k-1-i) of its number is set when plane i is +1 (the first plane varies slowest). */
static inline int combo_sign(int c, int i, int k) { return ((c >> (k - 1 - i)) & 1) ? 1 : -1; }

/* Solve a x = b in place (a: n x n row-major, n <= EP_MAX_PLANES) by Gaussian elimination with
 * partial pivoting (the first largest pivot); b becomes x.  The ridge keeps a positive definite. */
static void solve_small(double *a, double *b, int n) {
    for (int c = 0; c < n; c++) {
        int p = c;
        for (int r = c + 1; r < n; r++)
            if (fabs(a[r * n + c]) > fabs(a[p * n + c])) p = r;
        if (p != c) {
            for (int j = 0; j < n; j++) {
                double t = a[c * n + j];
                a[c * n + j] = a[p * n + j];
                a[p * n + j] = t;
            }
            double t = b[c];
            b[c] = b[p];
            b[p] = t;
        }
        for (int r = c + 1; r < n; r++) {
            double f = a[r * n + c] / a[c * n + c];
            for (int j = c; j < n; j++) a[r * n + j] -= f * a[c * n + j];
            b[r] -= f * b[c];
        }
    }
    for (int c = n - 1; c >= 0; c--) {
        double s = b[c];
        for (int j = c + 1; j < n; j++) s -= a[c * n + j] * b[j];
        b[c] = s / a[c * n + c];
    }
}

/* The 2^k levels sum_i +-alpha_i in double (alpha is float32: the sums are exact), sorted by value
 * and then by number, between sentinels: value[0] = -inf, the levels at 1..n, +inf after them up
 * to EP_LEVEL_SLOTS - 1, so that finding the nearest needs no bounds checks. */
#define EP_LEVEL_SLOTS ((1 << EP_MAX_PLANES) + 2)
typedef struct {
    int n;
    double value[EP_LEVEL_SLOTS];
    int combo[EP_LEVEL_SLOTS];
    int slot[1 << EP_MAX_PLANES];   /* the slot of each level number */
} levels;

static void levels_of(const float *alpha, int k, levels *L) {
    int n = 1 << k;
    L->n = n;
    for (int q = 0; q < EP_LEVEL_SLOTS; q++) {
        L->value[q] = q == 0 ? -INFINITY : INFINITY;
        L->combo[q] = 0;
    }
    for (int c = 0; c < n; c++) {
        double v = 0.0;
        for (int i = 0; i < k; i++) v += combo_sign(c, i, k) * (double)alpha[i];
        int q = c + 1;  /* insertion: equal values keep the lower number first */
        while (q > 1 && L->value[q - 1] > v) {
            L->value[q] = L->value[q - 1];
            L->combo[q] = L->combo[q - 1];
            q--;
        }
        L->value[q] = v;
        L->combo[q] = c;
    }
    for (int q = 1; q <= n; q++) L->slot[L->combo[q]] = q;
}

/* The reference rule, level by level in number order: the first of the nearest. */
static int nearest_scan(double v, const levels *L) {
    int best = 0;
    double bd = fabs(v - L->value[L->slot[0]]);
    for (int c = 1; c < L->n; c++) {
        double d = fabs(v - L->value[L->slot[c]]);
        if (d < bd) {
            bd = d;
            best = c;
        }
    }
    return L->slot[best];
}

/* The slot of the level nearest to v, the lowest number among equally near ones: what argmin over
 * |v - level| in number order returns (its first minimum).  Rounded, |v - x| still falls as x
 * rises towards v from below and rises as x moves away above it, so the nearest level is one of
 * the two around v; when the other one, or the next level beyond the nearest, is as near (equal
 * levels, v halfway), the reference scan decides. */
static inline int nearest(double v, const levels *L) {
    int below = 0;  /* levels at or below v, counted without branches (the last slot is +inf) */
    for (int q = 1; q < EP_LEVEL_SLOTS - 1; q++) below += L->value[q] <= v;
    int above = 1 + below;  /* the first slot above v */
    double dl = fabs(v - L->value[above - 1]), dr = fabs(v - L->value[above]);
    int q = dl < dr ? above - 1 : above;
    double d = dl < dr ? dl : dr;
    int next = dl < dr ? q - 1 : q + 1;   /* the next slot away from v (a sentinel at the ends) */
    if (dl == dr || fabs(v - L->value[next]) == d) return nearest_scan(v, L);
    return q;
}

/* The k scales of one group x (n,) float32: greedy residual planes, then `iters` ALS rounds.
 * combo (n,) and r (n,) are workspace; combo[s] numbers the signs of element s as a level does. */
static void fit_group(const float *x, int64_t n, int k, int64_t iters, uint8_t *combo, float *r,
                      float *alpha) {
    memcpy(r, x, (size_t)n * sizeof(float));
    memset(combo, 0, (size_t)n);
    for (int i = 0; i < k; i++) {  /* greedy: B_i = sign(R), alpha_i = mean |R|, R -= alpha_i B_i */
        double part[4] = {0.0, 0.0, 0.0, 0.0};  /* four chains: float32 values, nearly exact sums */
        for (int64_t s = 0; s < n; s++) part[s & 3] += (double)fabsf(r[s]);
        float a = (float)(((part[0] + part[1]) + (part[2] + part[3])) / (double)n);
        int shift = k - 1 - i;
        for (int64_t s = 0; s < n; s++) {  /* branch-free: the signs are a coin toss */
            float ri = r[s];
            int pos = !(ri < 0.0f);
            combo[s] |= (uint8_t)(pos << shift);
            r[s] = ri - (pos ? a : -a);
        }
        alpha[i] = a;
    }
    double ridge = 1e-6 * (double)k * (double)n;
    for (int64_t it = 0; it < iters; it++) {
        /* (a) scales by ridge least squares, signs fixed: (B B^T + ridge I) alpha = B x, from the
         * count and the sum of x of each sign combination (the Gram matrix is integers: exact) */
        int64_t count[1 << EP_MAX_PLANES] = {0};
        double sum[1 << EP_MAX_PLANES] = {0.0};
        for (int64_t s = 0; s < n; s++) {
            count[combo[s]]++;
            sum[combo[s]] += (double)x[s];
        }
        double gram[EP_MAX_PLANES * EP_MAX_PLANES], rhs[EP_MAX_PLANES];
        for (int i = 0; i < k; i++) {
            double bx = 0.0;
            for (int c = 0; c < (1 << k); c++) bx += combo_sign(c, i, k) * sum[c];
            rhs[i] = bx;
            for (int h = 0; h < k; h++) {
                int64_t g = 0;
                for (int c = 0; c < (1 << k); c++) g += combo_sign(c, i, k) * combo_sign(c, h, k) * count[c];
                gram[i * k + h] = (double)g;
            }
            gram[i * k + i] += ridge;
        }
        solve_small(gram, rhs, k);
        for (int i = 0; i < k; i++) alpha[i] = (float)rhs[i];
        if (it == iters - 1) break;  /* the last round's signs are not needed: only its scales */
        /* (b) signs by the nearest level, scales fixed */
        levels L;
        levels_of(alpha, k, &L);
        for (int64_t s = 0; s < n; s++) combo[s] = (uint8_t)L.combo[nearest((double)x[s], &L)];
    }
}

typedef struct {
    double *w;
    int64_t out, nb, ld_w;
    const double *u;
    int64_t ld_u;
    int k;
    int64_t group, als_iters;
    double *err;
    int8_t *signs;
    int64_t ld_s;
    float *alpha;
    int64_t ld_a;
    _Atomic int failed;
} gptq_job;

/* w[t] -= e * u[t]: one product and one subtraction each, as NumPy's outer-product update. */
static void feed_error(double *restrict w, const double *restrict u, double e, int64_t n) {
    for (int64_t t = 0; t < n; t++) w[t] -= e * u[t];
}

static void gptq_rows(void *ctx, int64_t r0, int64_t r1) {
    gptq_job *J = (gptq_job *)ctx;
    int k = J->k;
    int64_t nb = J->nb, gmax = ep_min64(J->group, nb);
    float *part = malloc((size_t)gmax * (2 * sizeof(float) + 1));
    if (!part) {
        atomic_store(&J->failed, 1);
        return;
    }
    float *resid = part + gmax;
    uint8_t *combo = (uint8_t *)(resid + gmax);
    for (int64_t r = r0; r < r1; r++) {
        double *w = J->w + r * J->ld_w;
        double *e = J->err + r * nb;
        for (int64_t g0 = 0; g0 < nb; g0 += J->group) {
            int64_t n = ep_min64(J->group, nb - g0);
            /* the group's codebook, fitted on the row's values as error feedback has left them */
            float alpha[EP_MAX_PLANES];
            for (int64_t s = 0; s < n; s++) part[s] = (float)w[g0 + s];
            fit_group(part, n, k, J->als_iters, combo, resid, alpha);
            levels L;
            levels_of(alpha, k, &L);
            for (int i = 0; i < k; i++) J->alpha[(i * J->out + r) * J->ld_a + g0 / J->group] = alpha[i];
            for (int64_t j = g0; j < g0 + n; j++) {
                int q = nearest(w[j], &L), c = L.combo[q];
                for (int i = 0; i < k; i++)
                    J->signs[(i * J->out + r) * J->ld_s + j] = (int8_t)combo_sign(c, i, k);
                const double *uj = J->u + j * J->ld_u;
                double ej = (w[j] - L.value[q]) / uj[j];
                feed_error(w + j + 1, uj + j + 1, ej, nb - j - 1);
                e[j] = ej;
            }
        }
    }
    free(part);
}

int ep_gptq_block(double *w, int64_t out, int64_t nb, int64_t ld_w, const double *u, int64_t ld_u,
                  int64_t k, int64_t group, int64_t als_iters, double *err, int8_t *signs,
                  int64_t ld_s, float *alpha, int64_t ld_a, int threads) {
    if (!w || !u || !err || !signs || !alpha || out <= 0 || nb <= 0 || k < 1 ||
        k > EP_MAX_PLANES || group <= 0 || als_iters < 0 || ld_w < nb || ld_u < nb || ld_s < nb ||
        ld_a < ep_ceil_div(nb, group))
        return EP_EINVAL;
    gptq_job job = {.w = w, .out = out, .nb = nb, .ld_w = ld_w, .u = u, .ld_u = ld_u, .k = (int)k,
                    .group = group, .als_iters = als_iters, .err = err, .signs = signs,
                    .ld_s = ld_s, .alpha = alpha, .ld_a = ld_a};
    atomic_init(&job.failed, 0);
    ep_parallel_for(threads, out, gptq_rows, &job);
    return atomic_load(&job.failed) ? EP_ENOMEM : EP_OK;
}

/* ---- the scale tuner's plane layers (edgepanel/convert/recover.py's PlaneLinear) ------------- */

typedef struct {
    const void *in;     /* levels (ep_plane_weights) or gw (ep_plane_grads) */
    const uint8_t *codes;
    int64_t ng, gs, n_in, ld, L, rows;
    int k;              /* planes: L = 2^k */
    void *out;
    atomic_int bad;     /* a code >= 2^k was met (its weight read level 0 instead) */
    const ep_kernels *kt;   /* its lookup16 for tables of up to 16 levels (k <= 4), its plane_sums */
} plane_job;

static inline uint8_t max_code(const uint8_t *c, int64_t n) {
    uint8_t m = 0;
    for (int64_t i = 0; i < n; i++) m = c[i] > m ? c[i] : m;
    return m;
}

/* w[o][c] = levels[o][c / gs][codes[o][c]], for float32 (T = float) or 16-bit values (T = uint16_t:
 * bfloat16 or float16 bits, copied); a group whose codes are all valid, with at most 16 levels,
 * through the ISA's LOOKUP (a table lookup in registers) */
#define PLANE_WEIGHTS_ROWS(NAME, T, LOOKUP)                                                    \
    static void NAME(void *ctx, int64_t b, int64_t e) {                                        \
        plane_job *j = (plane_job *)ctx;                                                       \
        for (int64_t o = b; o < e; o++) {                                                      \
            const uint8_t *c = j->codes + o * j->ng * j->gs;                                   \
            T *w = (T *)j->out + o * j->ld;                                                    \
            for (int64_t g = 0; g < j->ng; g++) {                                              \
                const T *lev = (const T *)j->in + (o * j->ng + g) * j->L;                      \
                const int64_t c0 = g * j->gs, c1 = c0 + j->gs < j->n_in ? c0 + j->gs : j->n_in; \
                if (j->L <= 16 && max_code(c + c0, c1 - c0) < j->L) {                          \
                    j->kt->LOOKUP(lev, (int)j->L, c + c0, c1 - c0, w + c0);                    \
                    continue;                                                                  \
                }                                                                              \
                int bad = 0;                                                                   \
                for (int64_t i = c0; i < c1; i++) {                                            \
                    const int64_t v = c[i];                                                    \
                    bad |= v >= j->L;                                                          \
                    w[i] = lev[v < j->L ? v : 0];                                              \
                }                                                                              \
                if (bad) atomic_store(&j->bad, 1);                                             \
            }                                                                                  \
        }                                                                                      \
    }
PLANE_WEIGHTS_ROWS(weights_rows, float, lookup16_f32)
PLANE_WEIGHTS_ROWS(weights_rows16, uint16_t, lookup16_u16)

/* The scales' gradient straight from gw: plane i's scale of group g in row o gets the sum of
 * gw[o][c] over the group's columns, each times its plane-i sign (the ISA's plane_sums, whose
 * lane order is ep_ref_plane_sums': fixed by the code, whatever the vector width or the threads).
 * The 2^k bins per group this replaced (a scatter-add, then a (2^k, k) product) waited on one
 * store a column. */
static void grads_rows(void *ctx, int64_t b, int64_t e) {
    plane_job *j = (plane_job *)ctx;
    const int k = j->k;
    float sums[8];
    for (int64_t o = b; o < e; o++) {
        const uint8_t *c = j->codes + o * j->ng * j->gs;
        const float *gw = (const float *)j->in + o * j->ld;
        for (int64_t g = 0; g < j->ng; g++) {
            const int64_t c0 = g * j->gs, c1 = c0 + j->gs < j->n_in ? c0 + j->gs : j->n_in;
            if (max_code(c + c0, c1 - c0) >= j->L) atomic_store(&j->bad, 1);
            j->kt->plane_sums(gw + c0, c + c0, c1 - c0, k, sums);
            for (int i = 0; i < k; i++) ((float *)j->out)[((int64_t)i * j->rows + o) * j->ng + g] = sums[i];
        }
    }
}

/* Checks the sizes, runs `rows` over the rows; ld: the row stride of w (weights) or of gw (grads). */
static int plane_run(const void *in, const uint8_t *codes, int64_t out, int64_t ng, int64_t gs, int64_t n_in,
                     int64_t k, void *dst, int64_t ld, int threads, ep_range_fn rows, const ep_kernels *kt) {
    if (!in || !codes || !dst || out < 0 || ng <= 0 || gs <= 0 || n_in <= 0 || n_in > ng * gs || k < 1 ||
        k > 8 || ld < n_in)
        return EP_EINVAL;
    plane_job j = {.in = in, .codes = codes, .ng = ng, .gs = gs, .n_in = n_in, .ld = ld,
                   .L = (int64_t)1 << k, .rows = out, .k = (int)k, .out = dst,
                   .kt = kt ? kt : ep_kernels_get(NULL)};
    atomic_init(&j.bad, 0);
    ep_parallel_for_brief(threads, out, rows, &j);
    return atomic_load(&j.bad) ? EP_EINVAL : EP_OK;
}

int ep_plane_weights(const float *levels, const uint8_t *codes, int64_t out, int64_t ng, int64_t gs,
                     int64_t n_in, int64_t k, float *w, int64_t ld_w, int threads) {
    return plane_run(levels, codes, out, ng, gs, n_in, k, w, ld_w, threads, weights_rows, NULL);
}

int ep_plane_weights16(const uint16_t *levels, const uint8_t *codes, int64_t out, int64_t ng, int64_t gs,
                       int64_t n_in, int64_t k, uint16_t *w, int64_t ld_w, int threads) {
    return plane_run(levels, codes, out, ng, gs, n_in, k, w, ld_w, threads, weights_rows16, NULL);
}

int ep_plane_grads(const float *gw, int64_t ld_gw, const uint8_t *codes, int64_t out, int64_t ng, int64_t gs,
                   int64_t n_in, int64_t k, float *galpha, int threads, const ep_kernels *kt) {
    return plane_run(gw, codes, out, ng, gs, n_in, k, galpha, ld_gw, threads, grads_rows, kt);
}
