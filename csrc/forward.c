/* The forward pass of a decoder-only transformer over a KV cache, in portable C, calling the
 * ISA kernels (ep_kernels) for every product.  Mirrors edgepanel/model/reference.py step by step:
 * embed; per layer: norm, q/k/v, RoPE, attention over the cache, (sub-norm), o, residual, norm,
 * MLP, (sub-norm), residual; final norm; head.  Products that read the same input (q/k/v,
 * gate/up) share one activation quantization and one set of tables and run in one parallel pass
 * (one token: each thread builds the tables it reads, products_team).
 * Longer than 400 lines on purpose: one pass read top to bottom, as the reference it mirrors. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ep_internal.h"

#define MAX_CONCURRENT 3
#define UNIT_ROWS 16  /* rows per work unit for dense products */
#define HEAD_ROWS 32  /* tokens per pass of the output head (bounds its buffers) */

static int64_t align64(int64_t v) { return (v + 63) & ~(int64_t)63; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

typedef struct {
    const ep_kernels *kt;
    const ep_model *m;
    int threads;
    int64_t n;            /* tokens in this pass */
    int64_t dmax;         /* widest activation */
    /* the batch: token t belongs to sequence tok_seq[t], at position tok_pos[t] */
    int32_t *tok_seq;
    int64_t *tok_pos;
    /* workspace */
    float *x, *h, *q, *k, *v, *att, *g, *u, *o, *rope_cs, *hb;
    int8_t *qa;
    float *qs;
    uint8_t *tab;
    int16_t *x16;         /* the activations widened, for i16_tiles (n, in_pad) */
    int32_t *gsum;        /* MAX_CONCURRENT * n * ng_max */
    float *acc;           /* partial sums of chunked GEMMs, per matrix */
    /* one token: each further thread's own quantized input, tables and group sums (products_team) */
    int8_t *team_qa;
    uint8_t *team_tab;
    int32_t *team_gsum;
    int team_parts;       /* the parts those buffers serve: 1 + the further threads */
    int64_t tab_stride, ng_max, acc_per_mat;
} fwd;

static int64_t workspace_layout(const ep_model *m, int64_t n, int threads, fwd *f, uint8_t *base) {
    int64_t q_dim = (int64_t)m->n_heads * m->head_dim, kv_dim = (int64_t)m->n_kv_heads * m->head_dim;
    int64_t dmax = max64(max64(m->dim, q_dim), m->hidden_dim);
    int64_t omax = max64(q_dim, max64(m->hidden_dim, m->dim));  /* the head runs in chunks */
    int64_t ng_max = dmax / 32 + 2;
    /* a slot per concurrent product; the head runs alone, so its (larger) accumulator is slot 0
     * running on into the others: MAX_CONCURRENT head-sized slots would be 12 MiB more for SmolLM2 */
    int64_t acc_per_mat = n * ep_out_pad(omax);
    int64_t acc_total = max64(MAX_CONCURRENT * acc_per_mat, HEAD_ROWS * ep_out_pad(m->vocab));
    int64_t off = 0;
#define TAKE(field, type, count)                                   \
    do {                                                           \
        if (f) f->field = (type *)(base + off);                    \
        off += align64((int64_t)sizeof(type) * (count));           \
    } while (0)
    TAKE(x, float, n * m->dim);
    TAKE(h, float, n * dmax);
    TAKE(q, float, n * q_dim);
    TAKE(k, float, n * kv_dim);
    TAKE(v, float, n * kv_dim);
    TAKE(att, float, n * q_dim);
    TAKE(g, float, n * m->hidden_dim);
    TAKE(u, float, n * m->hidden_dim);
    TAKE(o, float, n * omax);
    TAKE(rope_cs, float, n * m->head_dim);
    TAKE(hb, float, HEAD_ROWS * m->vocab);
    TAKE(tok_seq, int32_t, n);
    TAKE(tok_pos, int64_t, n);
    TAKE(qa, int8_t, n * dmax);
    TAKE(qs, float, n);
    TAKE(tab, uint8_t, n * ep_tab_stride(dmax));
    TAKE(x16, int16_t, n * ep_in_pad(dmax));
    TAKE(gsum, int32_t, MAX_CONCURRENT * n * ng_max);
    TAKE(acc, float, acc_total);
    const int64_t others = (int64_t)ep_pool_threads(threads) - 1;   /* a one-token pass's team (the last token's head too) */
    TAKE(team_qa, int8_t, others * ep_in_pad(dmax));
    TAKE(team_tab, uint8_t, others * ep_tab_stride(dmax));
    TAKE(team_gsum, int32_t, others * ng_max);
#undef TAKE
    if (f) {
        f->dmax = dmax;
        f->tab_stride = ep_tab_stride(dmax);
        f->ng_max = ng_max;
        f->acc_per_mat = acc_per_mat;
        f->team_parts = (int)others + 1;
    }
    return off;
}

int64_t ep_forward_workspace(const ep_model *m, int64_t n, int threads) {
    if (!m || n <= 0) return 0;
    return workspace_layout(m, n, threads, NULL, NULL);
}

/* ---- products ------------------------------------------------------------------------------ */

typedef struct {
    fwd *f;
    int count;
    const ep_matrix *mat[MAX_CONCURRENT];
    float *y[MAX_CONCURRENT];
    const float *x;
    int64_t in;
    ep_gemm_args args[MAX_CONCURRENT];
    int64_t units[MAX_CONCURRENT];   /* tiles (planes) or blocks of UNIT_ROWS rows */
} products;

static void products_range(void *ctx, int64_t b, int64_t e) {
    products *p = (products *)ctx;
    const ep_kernels *kt = p->f->kt;
    int64_t base = 0;
    for (int i = 0; i < p->count; i++) {
        const int64_t lo = b > base ? b : base, hi = ep_min64(e, base + p->units[i]);
        if (lo < hi) {
            const ep_matrix *mt = p->mat[i];
            int64_t u0 = lo - base, u1 = hi - base;
            if (mt->kind == EP_MAT_PLANES) {
                if (p->args[i].x16)
                    kt->i16_tiles(&p->args[i], u0, u1);
                else
                    kt->i8_tiles(&p->args[i], u0, u1);
            } else {
                int64_t r0 = u0 * UNIT_ROWS, r1 = ep_min64(u1 * UNIT_ROWS, mt->rows);
                if (mt->kind == EP_MAT_I8ROWS)
                    kt->i8_rows(p->f->qa, p->f->qs, p->f->n, p->in, (const int8_t *)mt->weight, mt->row_scale,
                                p->y[i], mt->rows, r0, r1);
                else
                    kt->dense_rows(p->x, p->f->n, p->in, mt->weight, mt->kind == EP_MAT_F16, p->y[i], mt->rows, r0, r1);
            }
        }
        base += p->units[i];
    }
}

/* Many tokens over planes matrices on several threads: tasks of EP_TOKEN_PIECE tokens, each every
 * matrix's every tile, claimed in turn (ep_parallel_claim), so a thread whose core is also
 * running other work takes fewer tasks instead of holding up the pass with its fixed share of
 * tiles.  Each task keeps its tokens' tables in L1 over every tile and streams all the weights
 * once per block of tokens, as the threads of a split by tiles stream their shares (SmolLM2's
 * calls: 220-440 KiB, from L2).  A token's outputs do not depend on the tokens beside it (every
 * variant gives the specification's bits for any token count). */
#define EP_TOKEN_PIECE (2 * EP_TOKEN_BLOCK)
typedef struct {
    const products *p;
    int64_t total;
} token_job;

static void products_tokens(void *ctx, int64_t b, int64_t e) {
    const token_job *j = (const token_job *)ctx;
    products sub = *j->p;
    for (int64_t task = b; task < e; task++) {
        const int64_t t0 = task * EP_TOKEN_PIECE, cnt = ep_min64(EP_TOKEN_PIECE, j->p->f->n - t0);
        for (int i = 0; i < sub.count; i++) sub.args[i] = ep_gemm_tokens(&j->p->args[i], t0, cnt);
        products_range(&sub, 0, j->total);
    }
}

/* Per token: the int8 activations, then (group > 0) their tables and group sums (ng a token),
 * and (x16) the same activations widened for i16_tiles. */
typedef struct {
    const ep_kernels *kt;
    const float *x;
    int8_t *qa;
    float *qs;
    int64_t in, group;
    uint8_t *tab;
    int64_t stride;
    int32_t *gsum;
    int64_t ng;
    int16_t *x16;
} tab_job;

static void tables_range(void *ctx, int64_t b, int64_t e) {
    tab_job *j = (tab_job *)ctx;
    for (int64_t t = b; t < e; t++) {
        j->kt->quantize_i8(j->x + t * j->in, j->in, j->qa + t * j->in, j->qs + t);
        if (j->group)
            j->kt->i8_tables(j->qa + t * j->in, j->in, j->group, j->tab + t * j->stride, j->gsum + t * j->ng);
        if (j->x16) ep_widen_i8(j->qa + t * j->in, j->in, ep_in_pad(j->in), j->x16 + t * ep_in_pad(j->in));
    }
}

/* One token's products as a team (ep_parallel_team): part 0 quantizes the input and builds its
 * tables into the shared buffers, every other part the same into its own (the same bits), then each
 * runs the share of the products' units ep_parallel_for would give it.  The tables are built on
 * every core at once, and no core reads another's: a decode step measured 1.04x (k=2) to 1.08x
 * (k=1) faster at 2 threads than with the tables built on one core first (a few KiB each pass,
 * crossing between cores, and a core waiting meanwhile). */
typedef struct {
    products *p;        /* the ranges' contexts (ep_parallel_for's callbacks take them writable) */
    tab_job *tj;
    int64_t total;
} team_job;

static void products_team(void *ctx, int part, int parts) {
    const team_job *j = (const team_job *)ctx;
    tab_job *tj = j->tj;
    const fwd *f = j->p->f;
    const int64_t b = j->total * part / parts, e = j->total * (part + 1) / parts;
    if (part == 0) {
        tables_range(tj, 0, 1);
        if (b < e) products_range(j->p, b, e);
        return;
    }
    const int o = part - 1;
    tab_job own = *tj;
    float own_scale;
    own.qa = f->team_qa + o * ep_in_pad(f->dmax);
    own.qs = &own_scale;
    own.tab = f->team_tab + o * ep_tab_stride(f->dmax);
    own.gsum = f->team_gsum + o * f->ng_max;
    tables_range(&own, 0, 1);
    products p = *j->p;
    for (int i = 0; i < p.count; i++)
        if (p.mat[i]->kind == EP_MAT_PLANES) {
            p.args[i].tab = own.tab;
            p.args[i].gsum = own.gsum;
            p.args[i].ascale = own.qs;
        }
    if (b < e) products_range(&p, b, e);
}

typedef struct { const ep_kernels *kt; const float *g; float *u; int64_t d; } silu_job;

static void silu_range(void *ctx, int64_t b, int64_t e) {
    silu_job *j = (silu_job *)ctx;
    j->kt->silu_mul(j->g + b * j->d, j->u + b * j->d, (e - b) * j->d);
}

/* y_i = x W_i^T + b_i for matrices sharing the input x (n, in). */
static void run_products(fwd *f, const float *x, int64_t in, int count, const ep_matrix *const *mats, float *const *ys) {
    const ep_kernels *kt = f->kt;
    const int64_t n = f->n;
    products p;
    memset(&p, 0, sizeof(p));
    p.f = f;
    p.count = count;
    p.x = x;
    p.in = in;
    int need_q = 0, tables_group = 0, wide = 0, other_groups = 0, has_i8rows = 0, all_planes = 1;
    for (int i = 0; i < count; i++) {
        const ep_matrix *mt = mats[i];
        p.mat[i] = mt;
        p.y[i] = ys[i];
        if (mt->kind == EP_MAT_PLANES || mt->kind == EP_MAT_I8ROWS) need_q = 1;
        if (mt->kind == EP_MAT_PLANES && tables_group && mt->group != tables_group) other_groups = 1;
        if (mt->kind == EP_MAT_I8ROWS) has_i8rows = 1;
        if (mt->kind != EP_MAT_PLANES) {
            all_planes = 0;
            continue;
        }
        ep_gemm_args *a = &p.args[i];  /* the arguments were checked on entry (planes_ok) */
        ep_gemm_args_init(a, mt->planes, mt->scales, mt->scales_kind, mt->scale_rows, mt->k, mt->rows, in, mt->group, n);
        if (ep_use_i16(kt, a)) {
            a->x16 = f->x16;
            wide = 1;
        } else if (!tables_group) {
            tables_group = (int)mt->group;
        }
    }
    tab_job tj = {kt, x, f->qa, f->qs, in, tables_group, f->tab, f->tab_stride, f->gsum,
                  tables_group ? ep_groups(in, tables_group) : 0, wide ? f->x16 : NULL};
    /* one token over planes matrices that read one set of tables: tables and products as a team */
    const int team = n == 1 && f->team_parts > 1 && tables_group && !wide && !other_groups && !has_i8rows;
    if (need_q && !team)  /* tables once for every planes matrix that reads them, their group sums in gsum's first slot */
        ep_parallel_for(f->threads, n, tables_range, &tj);
    for (int i = 0; i < count; i++) {
        const ep_matrix *mt = mats[i];
        if (mt->kind == EP_MAT_PLANES) {
            ep_gemm_args *a = &p.args[i];
            if (!a->x16) {  /* the lookups: tables and group sums (i16_tiles reads x16 alone) */
                a->tab = f->tab;
                a->tab_stride = f->tab_stride;
                int32_t *gs = f->gsum;   /* the tables' sums, ng a token, when the groups match */
                if (mt->group != tables_group) {
                    gs = f->gsum + (int64_t)i * n * f->ng_max;   /* slot i > 0: the first such matrix matches */
                    for (int64_t t = 0; t < n; t++) ep_ref_group_sums(f->qa + t * in, in, a->group, gs + t * a->ng);
                }
                a->gsum = gs;
            }
            a->ascale = f->qs;
            a->acc = f->acc + (int64_t)i * f->acc_per_mat;
            a->y = ys[i];
            p.units[i] = a->tiles;
        } else {
            p.units[i] = ep_ceil_div(mt->rows, UNIT_ROWS);
        }
    }
    int64_t total = 0;
    for (int i = 0; i < count; i++) total += p.units[i];
    if (team) {
        team_job tm = {&p, &tj, total};
        ep_parallel_team(f->team_parts, products_team, &tm);   /* at most the parts the workspace serves */
    } else if (n > EP_TOKEN_BLOCK && f->threads != 1 && all_planes && !wide) {
        token_job tk = {&p, total};
        ep_parallel_claim(f->threads, ep_ceil_div(n, EP_TOKEN_PIECE), products_tokens, &tk);
    } else {
        ep_parallel_for(f->threads, total, products_range, &p);
    }
    for (int i = 0; i < count; i++)
        if (mats[i]->bias)
            for (int64_t t = 0; t < n; t++)
                for (int64_t r = 0; r < mats[i]->rows; r++) ys[i][t * mats[i]->rows + r] += mats[i]->bias[r];
}

static void run_one(fwd *f, const float *x, int64_t in, const ep_matrix *mat, float *y) {
    run_products(f, x, in, 1, &mat, &y);
}

/* ---- the rest ---------------------------------------------------------------------------- */

#define EP_NORM_ROWS 8  /* RMS rows whose sums of squares run side by side */

static void norm_rows(const ep_model *m, const ep_norm *nw, int kind, const float *x, float *y, int64_t n, int64_t d) {
    int64_t t0 = 0;
    if (kind == EP_NORM_RMS)  /* each row's sum in its own order, as below, but 8 rows' chains interleaved:
                               * one row's additions wait on each other (a prefill spent 2.7% there) */
        for (; t0 + EP_NORM_ROWS <= n; t0 += EP_NORM_ROWS) {
            const float *xt = x + t0 * d;
            float ss[EP_NORM_ROWS] = {0};
            for (int64_t i = 0; i < d; i++)
                for (int b = 0; b < EP_NORM_ROWS; b++) ss[b] += xt[b * d + i] * xt[b * d + i];
            for (int b = 0; b < EP_NORM_ROWS; b++) {
                const float r = 1.0f / sqrtf(ss[b] / (float)d + m->norm_eps);
                float *yt = y + (t0 + b) * d;
                for (int64_t i = 0; i < d; i++) yt[i] = nw->weight[i] * (xt[b * d + i] * r);
            }
        }
    for (int64_t t = t0; t < n; t++) {
        const float *xt = x + t * d;
        float *yt = y + t * d;
        if (kind == EP_NORM_RMS) {
            float ss = 0.0f;
            for (int64_t i = 0; i < d; i++) ss += xt[i] * xt[i];
            float r = 1.0f / sqrtf(ss / (float)d + m->norm_eps);
            for (int64_t i = 0; i < d; i++) yt[i] = nw->weight[i] * (xt[i] * r);
        } else {
            float mean = 0.0f, var = 0.0f;
            for (int64_t i = 0; i < d; i++) mean += xt[i];
            mean /= (float)d;
            for (int64_t i = 0; i < d; i++) var += (xt[i] - mean) * (xt[i] - mean);
            float r = 1.0f / sqrtf(var / (float)d + m->norm_eps);
            for (int64_t i = 0; i < d; i++) yt[i] = (xt[i] - mean) * r * nw->weight[i] + (nw->bias ? nw->bias[i] : 0.0f);
        }
    }
}

static float act(int kind, float x) {
    switch (kind) {
    case EP_ACT_SILU: return x / (1.0f + ep_expf(-x));   /* as kt->silu_mul */
    case EP_ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case EP_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case EP_ACT_RELU2: return x > 0.0f ? x * x : 0.0f;
    default: return x > 0.0f ? x : 0.0f;
    }
}

static void rope_rows(const fwd *f, float *x, int64_t heads) {
    const int64_t hd = f->m->head_dim, half = hd / 2;
    for (int64_t t = 0; t < f->n; t++) {
        const float *cs = f->rope_cs + t * hd;  /* cos[0..half), sin[0..half) */
        for (int64_t h = 0; h < heads; h++) {
            float *p = x + (t * heads + h) * hd;
            for (int64_t i = 0; i < half; i++) {
                float x1 = p[i], x2 = p[i + half], c = cs[i], s = cs[half + i];
                p[i] = x1 * c - x2 * s;
                p[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

typedef struct {
    const fwd *f;
    const void *kc, *vc;   /* this layer's cache of sequence 0; sequence s is seq_stride elements on */
    int flags;             /* kt->attend's: EP_ATTEND_F16 (the cache holds float16, else float32), and
                            * EP_ATTEND_WHOLE_ROWS when every sequence steps one token */
    int64_t seq_stride, max_t;
    int64_t split;         /* tasks per key/value head: 1, or G (one query head each) */
    int failed;
} attn_job;

/* One task per (token, key/value head): the query heads of its group share the keys; a token
 * sees its own sequence's positions 0..tok_pos.  Tasks visit the tokens from both ends in turn
 * (0, n-1, 1, n-2, ...), so that contiguous ranges of tasks hold similar numbers of keys to read:
 * in token order, a causal prefill's second half costs three times its first.  With fewer such
 * tasks than twice the threads (decode: 3 key heads for SmolLM2), each query head is a task of
 * its own (split = G): 9 tasks share 2 threads 5/4 where 3 shared them 2/1.  Every kernel
 * computes a query head alone, whatever G: the same bits either way. */
static void attention_range(void *ctx, int64_t b, int64_t e) {
    attn_job *j = (attn_job *)ctx;
    const fwd *f = j->f;
    const ep_model *m = f->m;
    const int64_t H = m->n_heads, Hkv = m->n_kv_heads, hd = m->head_dim, G = H / Hkv;
    const float scale = 1.0f / sqrtf((float)hd);
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(G * j->max_t));
    if (!scratch) {
        j->failed = 1;
        return;
    }
    const int64_t split = j->split, per = G / split;
    for (int64_t task = b; task < e; task++) {
        const int64_t head = task / split, u = head / Hkv, kh = head % Hkv, t = (u & 1) ? f->n - 1 - u / 2 : u / 2;
        const int64_t T = f->tok_pos[t] + 1, g0 = kh * G + task % split * per;
        const int64_t off = f->tok_seq[t] * j->seq_stride + kh * hd;
        const int64_t at = off * (j->flags & EP_ATTEND_F16 ? 2 : 4);
        f->kt->attend(f->q + (t * H + g0) * hd, per, (const char *)j->kc + at, (const char *)j->vc + at, j->flags,
                      Hkv * hd, T, hd, scale, f->att + (t * H + g0) * hd, scratch);
    }
    free(scratch);
}

/* ---- the rotation (kt->rotate_row on each row) ------------------------------------------- */
typedef struct {
    const ep_kernels *kt;
    const float *signs, *mix;
    int64_t P, M;
    float *x;
    float *tmp;     /* rows * D floats (a range uses the slot of its first row), or NULL: allocate */
    int failed;
} rotate_job;

static void rotate_range(void *ctx, int64_t b, int64_t e) {
    rotate_job *j = (rotate_job *)ctx;
    const int64_t D = j->P * j->M;
    float *tmp = j->tmp ? j->tmp + b * D : NULL;
    if (!tmp && j->M > 1 && !(tmp = (float *)malloc(sizeof(float) * (size_t)D))) {
        j->failed = 1;
        return;
    }
    for (int64_t t = b; t < e; t++) j->kt->rotate_row(j->signs, j->mix, j->P, j->M, j->x + t * D, tmp);
    if (!j->tmp) free(tmp);
}

int ep_rotate_rows(const float *signs, const float *mix, int64_t n, float *x, int64_t rows, int threads) {
    if (!signs || !mix || !x || n <= 0 || rows < 0) return EP_EINVAL;
    const int64_t P = n & -n;
    rotate_job j = {ep_kernels_get(NULL), signs, mix, P, n / P, x, NULL, 0};
    ep_parallel_for(threads, rows, rotate_range, &j);
    return j.failed ? EP_ENOMEM : EP_OK;
}

static void embed_rows(const ep_matrix *e, const int32_t *tokens, int64_t n, int64_t d, float *x) {
    for (int64_t t = 0; t < n; t++) {
        int64_t id = tokens[t];
        float *xt = x + t * d;
        if (e->kind == EP_MAT_PLANES) {  /* x = a_0 B_0, then += a_i B_i (as bits.PlaneMatrix.rows) */
            const int64_t tiles = ep_out_pad(e->rows) / EP_TILE, ncol = ep_in_pad(d) / 8;
            const int64_t ng = ep_groups(d, e->group), g = ng == 1 ? d : e->group;
            const int64_t t0 = id / EP_TILE, lane = id % EP_TILE;
            for (int64_t i = 0; i < e->k; i++) {
                const uint8_t *p = e->planes + ((i * tiles + t0) * ncol) * EP_TILE + lane;
                for (int64_t c = 0; c < d; c++) {
                    const int64_t si = ((i * tiles + t0) * ng + c / g) * EP_TILE + lane;
                    const float a = ep_scale_value(e->scales, e->scales_kind, e->scale_rows, si, t0 * EP_TILE + lane);
                    const float v = (p[(c / 8) * EP_TILE] >> (c % 8)) & 1 ? -a : a;
                    xt[c] = i == 0 ? v : xt[c] + v;
                }
            }
        } else if (e->kind == EP_MAT_I8ROWS) {
            const int8_t *r = (const int8_t *)e->weight + id * d;
            for (int64_t i = 0; i < d; i++) xt[i] = (float)r[i] * e->row_scale[id];
        } else if (e->kind == EP_MAT_F16) {
            const uint16_t *r = (const uint16_t *)e->weight + id * d;
            for (int64_t i = 0; i < d; i++) xt[i] = ep_half_to_float(r[i]);
        } else {
            memcpy(xt, (const float *)e->weight + id * d, sizeof(float) * (size_t)d);
        }
    }
}

/* log-softmax of one row of logits at each of its n_targets ids (< 0: 0), one normalizer for all,
 * in double (the order is fixed: any ISA, any thread count gives the same value) */
static void row_logprobs(const float *row, int64_t vocab, const int32_t *targets, int64_t n_targets, float *out) {
    float mx = row[0];
    for (int64_t i = 1; i < vocab; i++) mx = row[i] > mx ? row[i] : mx;
    double sum = 0.0;
    for (int64_t i = 0; i < vocab; i++) sum += exp((double)row[i] - (double)mx);
    const double lse = log(sum);
    for (int64_t j = 0; j < n_targets; j++)
        out[j] = targets[j] < 0 ? 0.0f : (float)((double)row[targets[j]] - (double)mx - lse);
}

typedef struct {
    const float *logits;     /* (rows, vocab) */
    int64_t vocab;
    const int32_t *targets;  /* (rows, n_targets) */
    int64_t n_targets;
    float *out;              /* (rows, n_targets) */
} logprob_job;

static void logprob_range(void *ctx, int64_t b, int64_t e) {
    const logprob_job *j = (const logprob_job *)ctx;
    for (int64_t r = b; r < e; r++)
        row_logprobs(j->logits + r * j->vocab, j->vocab, j->targets + r * j->n_targets, j->n_targets,
                     j->out + r * j->n_targets);
}

/* A planes matrix's arguments, checked by the GEMMs' rule (ep_gemm_args_init); other kinds pass. */
static int planes_ok(const ep_matrix *mt) {
    ep_gemm_args a;
    return mt->kind != EP_MAT_PLANES || ep_gemm_args_init(&a, mt->planes, mt->scales, mt->scales_kind, mt->scale_rows,
                                                          mt->k, mt->rows, mt->cols, mt->group, 0) == EP_OK;
}

static int all_planes_ok(const ep_model *m) {
    if (!planes_ok(&m->embed) || !planes_ok(&m->head)) return 0;
    for (int32_t li = 0; li < m->n_layers; li++) {
        const ep_layer *L = &m->layers[li];
        const ep_matrix *mats[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++)
            if (!planes_ok(mats[i])) return 0;
    }
    return 1;
}

int ep_forward_batch(const ep_kernels *kt, const ep_model *m, void *k_cache, void *v_cache, int32_t kv_type, int64_t cap,
                     const int32_t *tokens, int64_t n, const int64_t *seq_len, const int64_t *seq_pos,
                     int64_t n_seqs, int32_t out_kind, const int32_t *targets, int64_t n_targets,
                     float *out, void *work, int64_t work_bytes, int threads) {
    if (!kt) kt = ep_kernels_get(NULL);
    if (!m || !k_cache || !v_cache || (kv_type != EP_KV_F32 && kv_type != EP_KV_F16) || !tokens || !out || !seq_len || !seq_pos || n <= 0 || n_seqs <= 0 ||
        n_seqs > n || out_kind < EP_OUT_LAST || out_kind > EP_OUT_LOGPROB || (out_kind == EP_OUT_LOGPROB && (!targets || n_targets < 1)) ||
        !all_planes_ok(m))
        return EP_EINVAL;
    if (!work || ((uintptr_t)work % EP_WORK_ALIGN) || work_bytes < ep_forward_workspace(m, n, threads)) return EP_ENOMEM;
    int64_t total = 0, max_t = 0;
    for (int64_t s = 0; s < n_seqs; s++) {
        if (seq_len[s] <= 0 || seq_pos[s] < 0 || seq_pos[s] + seq_len[s] > cap || seq_pos[s] + seq_len[s] > m->max_seq)
            return EP_EINVAL;
        total += seq_len[s];
        max_t = max64(max_t, seq_pos[s] + seq_len[s]);
    }
    if (total != n) return EP_EINVAL;
    for (int64_t t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= m->vocab) return EP_EINVAL;
    if (out_kind == EP_OUT_LOGPROB)
        for (int64_t i = 0; i < n * n_targets; i++)
            if (targets[i] >= m->vocab) return EP_EINVAL;
    fwd f;
    memset(&f, 0, sizeof(f));
    f.kt = kt;
    f.m = m;
    f.threads = threads;
    f.n = n;
    workspace_layout(m, n, threads, &f, (uint8_t *)work);
    const int64_t D = m->dim, H = m->n_heads, Hkv = m->n_kv_heads, hd = m->head_dim;
    const int64_t q_dim = H * hd, kv_dim = Hkv * hd, F = m->hidden_dim;
    const int64_t layer_stride = cap * kv_dim, seq_stride = (int64_t)m->n_layers * layer_stride;
    for (int64_t s = 0, t = 0; s < n_seqs; s++)
        for (int64_t i = 0; i < seq_len[s]; i++, t++) {
            f.tok_seq[t] = (int32_t)s;
            f.tok_pos[t] = seq_pos[s] + i;
        }

    embed_rows(&m->embed, tokens, n, D, f.x);
    if (m->pos_embed)
        for (int64_t t = 0; t < n; t++)
            for (int64_t i = 0; i < D; i++) f.x[t * D + i] += m->pos_embed[f.tok_pos[t] * D + i];
    if (m->inv_freq)
        for (int64_t t = 0; t < n; t++)
            for (int64_t i = 0; i < hd / 2; i++) {
                float fr = (float)f.tok_pos[t] * m->inv_freq[i];
                f.rope_cs[t * hd + i] = cosf(fr);
                f.rope_cs[t * hd + hd / 2 + i] = sinf(fr);
            }

    const int f16 = kv_type == EP_KV_F16;
    const int64_t es = f16 ? 2 : 4;   /* bytes of a cache element */
    for (int32_t li = 0; li < m->n_layers; li++) {
        const ep_layer *L = &m->layers[li];
        char *kc = (char *)k_cache + (int64_t)li * layer_stride * es, *vc = (char *)v_cache + (int64_t)li * layer_stride * es;
        norm_rows(m, &L->attn_norm, m->norm, f.x, f.h, n, D);
        const ep_matrix *qkv[3] = {&L->wq, &L->wk, &L->wv};
        float *qkv_out[3] = {f.q, f.k, f.v};
        run_products(&f, f.h, D, 3, qkv, qkv_out);
        if (m->inv_freq) {
            rope_rows(&f, f.q, H);
            rope_rows(&f, f.k, Hkv);
        }
        for (int64_t s = 0, t = 0; s < n_seqs; t += seq_len[s], s++) {
            const int64_t at = (s * seq_stride + seq_pos[s] * kv_dim) * es, len = seq_len[s] * kv_dim;
            if (f16) {
                kt->to_half(f.k + t * kv_dim, len, (uint16_t *)(kc + at));
                kt->to_half(f.v + t * kv_dim, len, (uint16_t *)(vc + at));
            } else {
                memcpy(kc + at, f.k + t * kv_dim, sizeof(float) * (size_t)len);
                memcpy(vc + at, f.v + t * kv_dim, sizeof(float) * (size_t)len);
            }
        }
        const int64_t nt = ep_pool_threads(threads);
        const int64_t split = nt > 1 && n * Hkv < 2 * nt ? H / Hkv : 1;
        const int flags = (f16 ? EP_ATTEND_F16 : 0) | (n == n_seqs ? EP_ATTEND_WHOLE_ROWS : 0);
        attn_job aj = {&f, kc, vc, flags, seq_stride, max_t, split, 0};
        ep_parallel_for(threads, n * Hkv * split, attention_range, &aj);
        if (aj.failed) return EP_ENOMEM;
        const float *a_in = f.att;
        if (L->attn_sub_norm.weight) {
            norm_rows(m, &L->attn_sub_norm, EP_NORM_RMS, f.att, f.h, n, q_dim);
            a_in = f.h;
        }
        run_one(&f, a_in, q_dim, &L->wo, f.o);
        for (int64_t i = 0; i < n * D; i++) f.x[i] += f.o[i];

        norm_rows(m, &L->mlp_norm, m->norm, f.x, f.h, n, D);
        if (m->gated) {
            const ep_matrix *gu[2] = {&L->w_gate, &L->w_up};
            float *gu_out[2] = {f.g, f.u};
            run_products(&f, f.h, D, 2, gu, gu_out);
            if (m->act == EP_ACT_SILU) {
                silu_job sj = {kt, f.g, f.u, F};
                ep_parallel_for(threads, n, silu_range, &sj);   /* elementwise: the same values */
            } else
                for (int64_t i = 0; i < n * F; i++) f.u[i] = act(m->act, f.g[i]) * f.u[i];
        } else {
            run_one(&f, f.h, D, &L->w_up, f.u);
            for (int64_t i = 0; i < n * F; i++) f.u[i] = act(m->act, f.u[i]);
        }
        float *d_in = f.u;
        if (L->mlp_sub_norm.weight) {
            norm_rows(m, &L->mlp_sub_norm, EP_NORM_RMS, f.u, f.g, n, F);
            d_in = f.g;
        }
        if (m->rot_signs) {
            rotate_job rj = {kt, m->rot_signs, m->rot_mix, m->rot_p, m->rot_m, d_in, d_in == f.u ? f.g : f.u, 0};
            ep_parallel_for(threads, n, rotate_range, &rj);   /* rows apart: the same values */
        }
        run_one(&f, d_in, F, &L->w_down, f.o);
        for (int64_t i = 0; i < n * D; i++) f.x[i] += f.o[i];
    }

    /* the head, HEAD_ROWS rows at a time, over the rows it scores: every token, or the last
     * token of each sequence (gathered into x's first rows) */
    int64_t rows = n;
    if (out_kind == EP_OUT_LAST) {
        rows = n_seqs;
        for (int64_t s = 0, end = 0; s < n_seqs; s++) {
            end += seq_len[s];
            memmove(f.x + s * D, f.x + (end - 1) * D, sizeof(float) * (size_t)D);
        }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += HEAD_ROWS) {
        const int64_t nr = ep_min64(HEAD_ROWS, rows - r0);
        norm_rows(m, &m->final_norm, m->norm, f.x + r0 * D, f.h, nr, D);
        f.n = nr;
        float *dst = out_kind == EP_OUT_LOGPROB ? f.hb : out + r0 * m->vocab;
        run_one(&f, f.h, D, &m->head, dst);
        if (out_kind == EP_OUT_LOGPROB) {
            logprob_job lj = {f.hb, m->vocab, targets + r0 * n_targets, n_targets, out + r0 * n_targets};
            ep_parallel_for(threads, nr, logprob_range, &lj);   /* rows apart: the same values */
        }
    }
    return EP_OK;
}

int ep_forward(const ep_kernels *kt, const ep_model *m, void *k_cache, void *v_cache, int32_t kv_type, int64_t cap,
               const int32_t *tokens, int64_t n, int64_t pos, int32_t all_logits, float *logits,
               void *work, int64_t work_bytes, int threads) {
    const int64_t len = n, at = pos;
    return ep_forward_batch(kt, m, k_cache, v_cache, kv_type, cap, tokens, n, &len, &at, 1,
                            all_logits ? EP_OUT_ALL : EP_OUT_LAST, NULL, 0, logits, work, work_bytes, threads);
}
