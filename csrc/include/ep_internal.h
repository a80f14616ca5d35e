/* Internal to the C kernels: the shapes, the argument block every ISA file reads, and the table
 * of kernels an ISA file provides.  The layout constants are edgepanel.h's (EP_TILE, EP_IN_ALIGN,
 * EP_MAX_PLANES); the layout itself is specified in edgepanel/bits.py. */
#ifndef EP_INTERNAL_H
#define EP_INTERNAL_H
#include <math.h>
#include <string.h>

#include "edgepanel.h"

static inline int64_t ep_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t ep_min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The shapes (bits.padded_in, padded_out, n_groups), inline so that every file, the specification
 * ref.c first, computes them alike without calling another file; ep_padded_in etc. in the ABI
 * wrap these. */
static inline int64_t ep_in_pad(int64_t in) { return ep_ceil_div(in, EP_IN_ALIGN) * EP_IN_ALIGN; }
static inline int64_t ep_out_pad(int64_t out) { return ep_ceil_div(out, EP_TILE) * EP_TILE; }
static inline int64_t ep_groups(int64_t in, int64_t group) {
    if (in <= 0 || group <= 0) return 0;
    return group >= in ? 1 : ep_ceil_div(in, group);
}

/* Bytes per token of the table area: the i8 tables take 8 bytes per padded input (four 16-entry
 * tables per 8 inputs), the xnor tables 4; every ISA fits in this. */
static inline int64_t ep_tab_stride(int64_t in) { return ep_in_pad(in) * 8; }

/* One GEMM call, as seen by an ISA's tile kernel. */
typedef struct {
    const uint8_t *planes;  /* (k, tiles, ncol, 16) */
    const void *scales;     /* (k, tiles, ng, 16) as scales_kind says (EP_SCALES_*) */
    int scales_kind;
    const float *scale_rows; /* EP_SCALES_U8: (tiles, 16) multipliers of the codes */
    int64_t k, out, in, group;
    int64_t in_pad;         /* in rounded up to 64 */
    int64_t tiles;          /* out_pad / 16 */
    int64_t ncol;           /* in_pad / 8: byte columns */
    int64_t ng;             /* groups per row */
    int64_t n;              /* tokens */
    const uint8_t *tab;     /* per-token tables built by the ISA's table builder: (n, tab_stride) */
    int64_t tab_stride;     /* bytes */
    const int32_t *gsum;    /* (n, ng): i8 path, sum of q over the group; xnor path, valid inputs */
    const float *ascale;    /* (n,) activation scales */
    float *acc;             /* (n, tiles*16): partial sums between group chunks */
    float *y;               /* (n, out) */
    int int_scales;         /* 8-bit scales summed as integers per group (ep_int_scales) */
    int short_groups;       /* every group's D fits int16 (at most 258 inputs): code * D by pmaddwd */
    const int16_t *x16;     /* i16_tiles: the activations widened, (n, in_pad), zero past `in` */
} ep_gemm_args;

/* The same call for tokens t0 .. t0+cnt-1 alone: every per-token array moved to token t0. */
static inline ep_gemm_args ep_gemm_tokens(const ep_gemm_args *a, int64_t t0, int64_t cnt) {
    ep_gemm_args s = *a;
    s.n = cnt;
    if (a->tab) s.tab = a->tab + t0 * a->tab_stride;
    if (a->gsum) s.gsum = a->gsum + t0 * a->ng;
    if (a->x16) s.x16 = a->x16 + t0 * a->in_pad;
    s.ascale = a->ascale + t0;
    s.acc = a->acc + t0 * a->tiles * EP_TILE;
    s.y = a->y + t0 * a->out;
    return s;
}

#define EP_I16_CHUNK 2048  /* inputs an i16_tiles kernel widens at a time: 64 KiB of int16 codes */

/* Longest group of a row: the last one runs to in_pad. */
static inline int64_t ep_longest_group(int64_t in_pad, int64_t group, int64_t ng) {
    const int64_t last = in_pad - (ng - 1) * group;
    return last > group ? last : group;
}

/* 8-bit scales are integers: alpha = code * scale_rows[row].  Each group's planes then combine
 * exactly, E = sum over planes of code * D, when |E| <= k * glen * 255 * 127 fits int32; the
 * float pass is then one fused multiply-add per group, acc = fmaf(scale_rows[row], (float)E, acc).
 * Longer groups (one group over a very wide row) keep the per-plane pass. */
static inline int ep_int_scales(int kind, int64_t k, int64_t glen) {
    return kind == EP_SCALES_U8 && k * glen * 255 * 127 <= (int64_t)2147483647;
}

/* Check one planes matrix's arguments and fill the matrix part of *a (the rest zeroed; the caller
 * points tab, tab_stride, gsum, ascale, acc and y at its buffers): EP_OK or EP_EINVAL.
 * dispatch.c's GEMMs and forward.c's products both fill their blocks here. */
static inline int ep_gemm_args_init(ep_gemm_args *a, const uint8_t *planes, const void *scales,
                                    int scales_kind, const float *scale_rows, int64_t k, int64_t out,
                                    int64_t in, int64_t group, int64_t n) {
    if (!planes || !scales || k < 1 || k > EP_MAX_PLANES || out <= 0 || in <= 0 || group <= 0 ||
        n < 0 || scales_kind < EP_SCALES_F32 || scales_kind > EP_SCALES_U8 ||
        (scales_kind == EP_SCALES_U8 && !scale_rows) || (group < in && group % 32 != 0))
        return EP_EINVAL;
    memset(a, 0, sizeof(*a));
    a->planes = planes;
    a->scales = scales;
    a->scales_kind = scales_kind;
    a->scale_rows = scale_rows;
    a->k = k;
    a->out = out;
    a->in = in;
    a->ng = ep_groups(in, group);
    a->in_pad = ep_in_pad(in);
    a->group = a->ng == 1 ? a->in_pad : group;  /* one group: it spans the padded row */
    a->tiles = ep_out_pad(out) / EP_TILE;
    a->ncol = a->in_pad / 8;
    a->n = n;
    a->int_scales = ep_int_scales(scales_kind, k, ep_longest_group(a->in_pad, a->group, a->ng));
    a->short_groups = (a->ng == 1 ? in : group) <= 258;   /* |D| <= 127 * inputs < 2^15: padding adds 0 */
    return EP_OK;
}

/* Byte columns [c0, c1) of group j: groups are whole multiples of 32 inputs, the last one runs to
 * in_pad (its inputs past `in` are padding whose activations are zero or masked). */
static inline void ep_group_cols(const ep_gemm_args *a, int64_t j, int64_t *c0, int64_t *c1) {
    *c0 = j * (a->group / 8);
    *c1 = (j == a->ng - 1) ? a->ncol : (j + 1) * (a->group / 8);
}

/* The first byte column of group j; the bytes between one plane and the next; tile t's bytes of
 * plane 0 (planes are (k, tiles, ncol, 16)). */
static inline int64_t ep_group_col0(const ep_gemm_args *a, int64_t j) { return j * (a->group / 8); }
static inline int64_t ep_plane_stride(const ep_gemm_args *a) { return a->tiles * a->ncol * EP_TILE; }
static inline const uint8_t *ep_tile_planes(const ep_gemm_args *a, int64_t t) { return a->planes + t * a->ncol * EP_TILE; }

/* The 16 scales of plane i, tile t, group j start at this element index. */
static inline int64_t ep_scale_index(const ep_gemm_args *a, int64_t i, int64_t t, int64_t j) {
    return ((i * a->tiles + t) * a->ng + j) * EP_TILE;
}

float ep_half_to_float(uint16_t h);
uint16_t ep_float_to_half(float f);

/* One plane scale: element idx of `scales` (kind EP_SCALES_*), for row `row` (its multiplier
 * when the scales are codes).  The specification every vectorized load reproduces. */
static inline float ep_scale_value(const void *scales, int kind, const float *scale_rows, int64_t idx, int64_t row) {
    if (kind == EP_SCALES_U8) return (float)((const uint8_t *)scales)[idx] * scale_rows[row];
    if (kind == EP_SCALES_F16) return ep_half_to_float(((const uint16_t *)scales)[idx]);
    return ((const float *)scales)[idx];
}

/* One element of int8 quantization (the rule of ep_ref_quantize_i8), for the SIMD files' tails. */
static inline int8_t ep_quantize_one(float x, float inv) {
    float v = nearbyintf(x * inv);
    if (v != v) v = 0.0f;
    if (v > 127.0f) v = 127.0f;
    if (v < -127.0f) v = -127.0f;
    return (int8_t)v;
}

/* Bits of byte column c that are real inputs (xnor tables mask the rest). */
static inline uint8_t ep_valid_bits(int64_t in, int64_t c) {
    int64_t left = in - 8 * c;
    return left >= 8 ? 0xFF : left <= 0 ? 0 : (uint8_t)((1u << left) - 1);
}

/* Groups per chunk so that a block of tb tokens' tables (bytes_per_input each) stays in half a
 * 32 KiB L1 while a thread's tiles pass under them. */
static inline int64_t ep_groups_per_chunk(const ep_gemm_args *a, int64_t tb, int64_t bytes_per_input) {
    int64_t gpc = (16384 / (tb * bytes_per_input)) / a->group;
    return gpc < 1 ? 1 : gpc;
}

#define EP_TOKEN_BLOCK 4  /* tokens sharing one pass over a tile's weights */

/* Groups per chunk of the tile loop: one block of tokens (decode) reads whole rows, the weights
 * streamed once in order (chunks of columns, so that wide rows' tables stay in L1, measured 1.5-2x
 * slower from DRAM: the strided reads cost more than the tables' L2 traffic); more tokens take
 * chunks of groups whose tables stay in L1. */
static inline int64_t ep_chunk_groups(const ep_gemm_args *a, int64_t bytes_per_input) {
    if (a->n <= EP_TOKEN_BLOCK) return a->ng;
    const int64_t gpc = ep_groups_per_chunk(a, EP_TOKEN_BLOCK, bytes_per_input);
    /* up to a quarter over the budget, one chunk: 576 inputs (9 groups of 64) as 8 + 1 cost every
     * tile a second call and a round trip of its sums for one group (2-6% of a product, Zen 4) */
    return a->ng * 4 <= gpc * 5 ? a->ng : gpc;
}

/* The loop every ISA's *_tiles function runs over this thread's tiles [t0, t1): chunks of groups
 * outer (ep_chunk_groups), token blocks, then tiles, so a token block's tables stay in L1 while
 * the tiles pass under them (partial sums kept in a->acc between chunks; every row still sums
 * its groups in order).
 * CALL(tb) handles one tile for tokens tok0 .. tok0+tb-1 and groups [j0, j1); the ISA file
 * instantiates it per constant tb. */
#define EP_TILE_LOOP(a, t0, t1, bytes_per_input, CALL)                                            \
    do {                                                                                         \
        const int64_t ep_gpc_ = ep_chunk_groups((a), (bytes_per_input));                         \
        for (int64_t j0 = 0; j0 < (a)->ng; j0 += ep_gpc_) {                                      \
            const int64_t j1 = ep_min64(j0 + ep_gpc_, (a)->ng);                                  \
            for (int64_t tok0 = 0; tok0 < (a)->n; tok0 += EP_TOKEN_BLOCK) {                      \
                const int64_t ep_tb_ = ep_min64(EP_TOKEN_BLOCK, (a)->n - tok0);                  \
                for (int64_t t = (t0); t < (t1); t++) {                                          \
                    switch (ep_tb_) {                                                            \
                    case 4: CALL(4); break;                                                      \
                    case 3: CALL(3); break;                                                      \
                    case 2: CALL(2); break;                                                      \
                    default: CALL(1); break;                                                     \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    } while (0)

/* Blocks per group when the kernels unroll them (32-input blocks), else 0. */
static inline int ep_blocks_per_group(const ep_gemm_args *a) {
    if (a->ng == 1) return 0;
    switch (a->group) {
    case 32: return 1;
    case 64: return 2;
    case 128: return 4;
    case 256: return 8;
    default: return 0;
    }
}

/* Instantiate call(..., GB) for the unrolled group sizes (gb = ep_blocks_per_group(a)), or the
 * general path (GB = 0). */
#define EP_SWITCH_GB(call, ...)                                                          \
    switch (gb) {                                                                        \
    case 1: call(__VA_ARGS__, 1); break;                                                 \
    case 2: call(__VA_ARGS__, 2); break;                                                 \
    case 4: call(__VA_ARGS__, 4); break;                                                 \
    case 8: call(__VA_ARGS__, 8); break;                                                 \
    default: call(__VA_ARGS__, 0); break;                                                \
    }

/* The decode kernels (i8_dec in x86_avx2.c and arm_neon.c): one token over rows whose unrolled
 * groups fill the padded row, each instantiated per group length (GB blocks) and scales kind (SK),
 * 8-bit scales taken only when summed as integers (groups of at most 256 inputs: short_groups too). */
enum { EP_SK_F32, EP_SK_F16, EP_SK_U8 };

/* ep_kernels.attend's flags */
enum { EP_ATTEND_F16 = 1, EP_ATTEND_WHOLE_ROWS = 2 };
typedef void (*ep_dec_fn)(const ep_gemm_args *a, int64_t t0, int64_t t1);
static inline int ep_dec_blocks(const ep_gemm_args *a) {
    const int gb = ep_blocks_per_group(a);
    if (a->n != 1 || gb == 0 || a->ncol != a->ng * 4 * gb) return 0;
    return a->scales_kind == EP_SCALES_U8 && !(a->int_scales && a->short_groups) ? 0 : gb;
}
#define EP_DEC_FN(KERNEL, GB, SK)                                                                 \
    static __attribute__((noinline)) void KERNEL##_##GB##_##SK(const ep_gemm_args *a, int64_t t0, int64_t t1) { \
        KERNEL(a, t0, t1, GB, SK);                                                                \
    }
#define EP_DEC_FNS(KERNEL, SK) EP_DEC_FN(KERNEL, 1, SK) EP_DEC_FN(KERNEL, 2, SK) EP_DEC_FN(KERNEL, 4, SK) EP_DEC_FN(KERNEL, 8, SK)
#define EP_DEC_ROW(KERNEL, SK) {KERNEL##_1_##SK, KERNEL##_2_##SK, KERNEL##_4_##SK, KERNEL##_8_##SK}
/* KERNEL's instances and KERNEL_for(a): the instance for a's shape, or NULL */
#define EP_DEC_KERNELS(KERNEL)                                                                    \
    EP_DEC_FNS(KERNEL, EP_SK_F32)                                                                 \
    EP_DEC_FNS(KERNEL, EP_SK_F16)                                                                 \
    EP_DEC_FNS(KERNEL, EP_SK_U8)                                                                  \
    static ep_dec_fn KERNEL##_for(const ep_gemm_args *a) {                                        \
        static const ep_dec_fn table[3][4] = {EP_DEC_ROW(KERNEL, EP_SK_F32), EP_DEC_ROW(KERNEL, EP_SK_F16), \
                                              EP_DEC_ROW(KERNEL, EP_SK_U8)};                     \
        const int gb = ep_dec_blocks(a);                                                          \
        if (!gb) return NULL;                                                                     \
        const int sk = a->scales_kind == EP_SCALES_U8 ? EP_SK_U8 : a->scales_kind == EP_SCALES_F16 ? EP_SK_F16 : EP_SK_F32; \
        return table[sk][gb == 1 ? 0 : gb == 2 ? 1 : gb == 4 ? 2 : 3];                            \
    }

struct ep_kernels {
    const char *name;
    int (*supported)(void);
    /* one token */
    void (*quantize_i8)(const float *x, int64_t in, int8_t *q, float *scale);
    void (*binarize)(const float *x, int64_t in, uint8_t *bits, float *scale);
    void (*i8_tables)(const int8_t *q, int64_t in, int64_t group, uint8_t *tab, int32_t *gsum);
    void (*xnor_tables)(const uint8_t *bits, int64_t in, int64_t group, uint8_t *tab,
                        int32_t *nvalid);
    /* tiles [t0, t1) for all tokens */
    void (*i8_tiles)(const ep_gemm_args *a, int64_t t0, int64_t t1);
    /* The same product as i8_tiles for int_scales matrices whose groups fit EP_I16_CHUNK, from
     * a->x16 instead of tables: each tile's weight codes widened to int16 once per call, then
     * multiplied with every token's activations: its cost does not grow with k as the lookups'
     * does.  NULL where the ISA has none; the callers (ep_use_i16) take it for k planes from
     * i16_min_tokens[k] tokens on (0: never), where it measured faster than i8_tiles. */
    void (*i16_tiles)(const ep_gemm_args *a, int64_t t0, int64_t t1);
    int i16_min_tokens[EP_MAX_PLANES + 1];
    void (*xnor_tiles)(const ep_gemm_args *a, int64_t t0, int64_t t1);
    /* rows [r0, r1) of dense products for n tokens, y[t * ldy + r]:
     * dense_rows: x (n, in) float32 times W (out, in) float32 or float16 (f16 != 0);
     * i8_rows: exact int32 dots of q (n, in) int8 with W (out, in) int8 (entries in -127..127),
     *          y = ((float)dot * ws[r]) * qs[t] */
    void (*dense_rows)(const float *x, int64_t n, int64_t in, const void *w, int f16, float *y,
                       int64_t ldy, int64_t r0, int64_t r1);
    void (*i8_rows)(const int8_t *q, const float *qs, int64_t n, int64_t in, const int8_t *w,
                    const float *ws, float *y, int64_t ldy, int64_t r0, int64_t r1);
    float (*dot)(const float *a, const float *b, int64_t n);
    /* Attention of G query heads sharing one key/value head over positions 0..T-1: q (G, hd);
     * key and value of position s at k + s*kstride and v + s*kstride elements, float32, or float16
     * when flags has EP_ATTEND_F16 (widened exactly, so the same results as float32 holding the
     * same values); EP_ATTEND_WHOLE_ROWS: the rows are cold (decode), fetch each whole (every key
     * head's kstride elements) for the other heads' calls, a hint; out (G, hd); scratch >= G*T
     * floats.  Specification (ep_ref_attend): score = dot(q, k_s) * scale
     * (the canonical dot), softmax with expf after subtracting the max, w_s = e_s * (1 / sum),
     * out = fmaf(w_s, v_s, out) over s. */
    void (*attend)(const float *q, int64_t G, const void *k, const void *v, int flags, int64_t kstride,
                   int64_t T, int64_t hd, float scale, float *out, float *scratch);
    /* h[i] = x[i] as float16, rounded to nearest even (overflow to infinity, subnormals kept):
     * ep_float_to_half, the cache's store when it holds float16. */
    void (*to_half)(const float *x, int64_t n, uint16_t *h);
    /* One row of the MLP's rotation, in place (edgepanel/rotation.py; ep_ref_rotate_row): v (D =
     * P * M) <- mix(FWHT_P(signs * v) / sqrt(P)), P a power of two; tmp: D floats when M > 1. */
    void (*rotate_row)(const float *signs, const float *mix, int64_t P, int64_t M, float *v, float *tmp);
    /* The gated MLP's SiLU: u[i] = (g[i] / (1 + ep_expf(-g[i]))) * u[i] (ep_ref_silu_mul). */
    void (*silu_mul)(const float *g, float *u, int64_t n);
    /* The scale tuner's gather (fit.c's plane weights): w[i] = lev[codes[i]] for i < n, a table of
     * L <= 16 values (16-bit values copied as bits, or float32), every code < L (checked by the
     * caller). */
    void (*lookup16_u16)(const uint16_t *lev, int L, const uint8_t *codes, int64_t n, uint16_t *w);
    void (*lookup16_f32)(const float *lev, int L, const uint8_t *codes, int64_t n, float *w);
    /* The scale tuner's gradient (fit.c's plane grads), one group of n columns: out[i] (i < k) =
     * the sum of s_i(codes[c]) * gw[c], s_i = +1 where bit k-1-i of the code is set, else -1;
     * column c in lane c % 8, in order of c, the lanes joined by the canonical tree (ref.c). */
    void (*plane_sums)(const float *gw, const uint8_t *codes, int64_t n, int k, float *out);
};

/* Whether a product (a: a planes matrix over n tokens of int8 activations) takes kt->i16_tiles. */
static inline int ep_use_i16(const ep_kernels *kt, const ep_gemm_args *a) {
    return kt->i16_tiles && a->int_scales && kt->i16_min_tokens[a->k] > 0 && a->n >= kt->i16_min_tokens[a->k] &&
           ep_longest_group(a->in_pad, a->group, a->ng) <= EP_I16_CHUNK;
}

/* Groups an i16_tiles chunk holds (at most EP_I16_CHUNK inputs): the last group of a row may run
 * 63 inputs past the group size. */
static inline int64_t ep_i16_chunk_groups(const ep_gemm_args *a) {
    return a->ng == 1 || a->group > EP_I16_CHUNK - 64 ? 1 : (EP_I16_CHUNK - 64) / a->group;
}

/* i16_tiles' loops: per tile and chunk of groups, WIDEN(a, t, j0, j1, buf), then the tokens in
 * blocks of TBMAX (at most 8) and the rest through BLOCK(a, buf, t, tok0, TB, j0, j1), TB a
 * constant. */
#define EP_I16_LOOP(a, t0, t1, buf, TBMAX, WIDEN, BLOCK)                                        \
    do {                                                                                         \
        _Static_assert((TBMAX) >= 1 && (TBMAX) <= 8, "the rest's cases cover up to 7 tokens");   \
        const int64_t ep_gpc_ = ep_i16_chunk_groups(a);                                          \
        for (int64_t t = (t0); t < (t1); t++)                                                    \
            for (int64_t j0 = 0; j0 < (a)->ng; j0 += ep_gpc_) {                                  \
                const int64_t j1 = ep_min64(j0 + ep_gpc_, (a)->ng);                              \
                WIDEN(a, t, j0, j1, buf);                                                        \
                int64_t tok0 = 0;                                                                \
                for (; tok0 + (TBMAX) <= (a)->n; tok0 += (TBMAX)) BLOCK(a, buf, t, tok0, (TBMAX), j0, j1); \
                switch ((a)->n - tok0) {  /* the rest: fewer than TBMAX tokens */                \
                case 0: break;                                                                   \
                case 1: BLOCK(a, buf, t, tok0, 1, j0, j1); break;                                \
                case 2: BLOCK(a, buf, t, tok0, 2 < (TBMAX) ? 2 : 1, j0, j1); break;              \
                case 3: BLOCK(a, buf, t, tok0, 3 < (TBMAX) ? 3 : 1, j0, j1); break;              \
                case 4: BLOCK(a, buf, t, tok0, 4 < (TBMAX) ? 4 : 1, j0, j1); break;              \
                case 5: BLOCK(a, buf, t, tok0, 5 < (TBMAX) ? 5 : 1, j0, j1); break;              \
                case 6: BLOCK(a, buf, t, tok0, 6 < (TBMAX) ? 6 : 1, j0, j1); break;              \
                default: BLOCK(a, buf, t, tok0, 7 < (TBMAX) ? 7 : 1, j0, j1); break;             \
                }                                                                                \
            }                                                                                    \
    } while (0)

/* One token's int8 activations widened for i16_tiles: x16 (in_pad), zero past `in`. */
static inline void ep_widen_i8(const int8_t *q, int64_t in, int64_t in_pad, int16_t *x16) {
    for (int64_t u = 0; u < in; u++) x16[u] = q[u];
    for (int64_t u = in; u < in_pad; u++) x16[u] = 0;
}

/* The portable specification: every ISA file matches it bit for bit (integers and floats). */
extern const ep_kernels ep_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64) || defined(EP_SIMDE)
extern const ep_kernels ep_kernels_avx2;
extern const ep_kernels ep_kernels_avx512bw;
extern const ep_kernels ep_kernels_avx512vnni;  /* + VNNI, VBMI, BITALG */
/* the AVX-512 table reuses these two (every AVX-512 CPU has AVX2 and FMA) */
void ep_avx2_quantize_i8(const float *x, int64_t in, int8_t *q, float *scale);
void ep_avx2_binarize(const float *x, int64_t in, uint8_t *bits, float *scale);
void ep_avx2_dense_rows(const float *x, int64_t n, int64_t in, const void *w, int f16, float *y,
                        int64_t ldy, int64_t r0, int64_t r1);
void ep_avx2_i8_rows(const int8_t *q, const float *qs, int64_t n, int64_t in, const int8_t *w,
                     const float *ws, float *y, int64_t ldy, int64_t r0, int64_t r1);
float ep_avx2_dot(const float *a, const float *b, int64_t n);
void ep_avx2_silu_mul(const float *g, float *u, int64_t n);
void ep_avx2_lookup16_u16(const uint16_t *lev, int L, const uint8_t *codes, int64_t n, uint16_t *w);
void ep_avx2_lookup16_f32(const float *lev, int L, const uint8_t *codes, int64_t n, float *w);
void ep_avx2_plane_sums(const float *gw, const uint8_t *codes, int64_t n, int k, float *out);
void ep_avx2_attend(const float *q, int64_t G, const void *k, const void *v, int flags, int64_t kstride,
                    int64_t T, int64_t hd, float scale, float *out, float *scratch);
void ep_avx2_to_half(const float *x, int64_t n, uint16_t *h);
void ep_avx2_rotate_row(const float *signs, const float *mix, int64_t P, int64_t M, float *v, float *tmp);
#endif
#if defined(__aarch64__)
extern const ep_kernels ep_kernels_neon;
extern const ep_kernels ep_kernels_neon_dotprod;  /* + Armv8.2 dot product, chosen at run time */
#endif

/* Shared pieces of the specification, used by the ISA files for their cold paths. */
void ep_ref_quantize_i8(const float *x, int64_t in, int8_t *q, float *scale);
void ep_ref_binarize(const float *x, int64_t in, uint8_t *bits, float *scale);
float ep_ref_abs_mean(const float *x, int64_t in);
void ep_ref_group_sums(const int8_t *q, int64_t in, int64_t group, int32_t *gsum);
void ep_ref_group_valid(int64_t in, int64_t group, int32_t *nvalid);

/* ep_ref_group_sums from the sums of consecutive chunks of inputs, as a table builder reads them
 * (chunks of 8, 16 or 32: a group, whole 32s when there are several, never splits one; chunks
 * past `in` sum to zero and fall into the last group). */
typedef struct { int64_t ng, glen, end, g; int32_t s; } ep_group_walk;
static inline ep_group_walk ep_group_walk_start(int64_t in, int64_t group) {
    const int64_t ng = ep_groups(in, group);
    ep_group_walk w = {ng, ng == 1 ? INT64_MAX : group, ng == 1 ? INT64_MAX : group, 0, 0};
    return w;
}
/* the chunk starting at input j sums to s */
static inline void ep_group_walk_add(ep_group_walk *w, int64_t j, int32_t *gsum, int32_t s) {
    if (j == w->end && w->g < w->ng - 1) {
        gsum[w->g++] = w->s;
        w->s = 0;
        w->end += w->glen;
    }
    w->s += s;
}
static inline void ep_group_walk_end(ep_group_walk *w, int32_t *gsum) { gsum[w->g] = w->s; }
void ep_ref_dense_rows(const float *x, int64_t n, int64_t in, const void *w, int f16, float *y,
                       int64_t ldy, int64_t r0, int64_t r1);
void ep_ref_i8_rows(const int8_t *q, const float *qs, int64_t n, int64_t in, const int8_t *w,
                    const float *ws, float *y, int64_t ldy, int64_t r0, int64_t r1);
float ep_ref_dot(const float *a, const float *b, int64_t n);
void ep_ref_attend(const float *q, int64_t G, const void *k, const void *v, int flags, int64_t kstride,
                    int64_t T, int64_t hd, float scale, float *out, float *scratch);
void ep_ref_to_half(const float *x, int64_t n, uint16_t *h);
void ep_ref_rotate_row(const float *signs, const float *mix, int64_t P, int64_t M, float *v, float *tmp);
void ep_ref_silu_mul(const float *g, float *u, int64_t n);
void ep_ref_lookup16_u16(const uint16_t *lev, int L, const uint8_t *codes, int64_t n, uint16_t *w);
void ep_ref_lookup16_f32(const float *lev, int L, const uint8_t *codes, int64_t n, float *w);
void ep_ref_plane_sums(const float *gw, const uint8_t *codes, int64_t n, int k, float *out);
/* the softmax weights of one head from its scores (the specification every attend follows) */
void ep_softmax_weights(float *scores, int64_t T);
/* exp as the softmax computes it (ref.c); the constants, for the SIMD versions */
float ep_expf(float x);
#define EP_EXP_MAX_ULP 3.0f  /* ep_expf's distance from exp over (EP_EXP_LO, EP_EXP_HI), as kernel_check bounds it */
#define EP_EXP_LO (-87.0f)
#define EP_EXP_HI 88.0f
#define EP_LOG2E 1.44269504088896341f
#define EP_LN2_HI 0.693145751953125f     /* ln 2 to 16 bits: n * EP_LN2_HI is exact */
#define EP_LN2_LO 1.42860682030941723e-6f
#define EP_EXP_C3 (1.0f / 6.0f)
#define EP_EXP_C4 (1.0f / 24.0f)
#define EP_EXP_C5 (1.0f / 120.0f)
#define EP_EXP_C6 (1.0f / 720.0f)
/* Store the final outputs of one tile for one token: y_row[r] = acc[r] * s for rows < out. */
void ep_store_tile(float *y_row, int64_t out, int64_t t, const float *acc16, float s);

#define EP_MAX_THREADS 256  /* the pool's threads at most */

/* Thread pool: calls fn(ctx, begin, end) on contiguous, disjoint ranges covering [0, n). */
typedef void (*ep_range_fn)(void *ctx, int64_t begin, int64_t end);
/* The threads a pass may use: threads, or every processor when threads <= 0, at most EP_MAX_THREADS. */
int ep_pool_threads(int threads);
void ep_parallel_for(int threads, int64_t n, ep_range_fn fn, void *ctx);
void ep_parallel_for_brief(int threads, int64_t n, ep_range_fn fn, void *ctx);
/* fn(ctx, i, i + 1) for every i in [0, n), each thread claiming the next i when done with its
 * last: a thread slowed by other work on its core does fewer. */
void ep_parallel_claim(int threads, int64_t n, ep_range_fn fn, void *ctx);
/* A team: fn(ctx, part, parts) on every part at once (parts = 1, inline, when threads is 1 or the
 * pool is busy). */
typedef void (*ep_team_fn)(void *ctx, int part, int parts);
void ep_parallel_team(int threads, ep_team_fn fn, void *ctx);

#endif
