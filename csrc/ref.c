/* The portable kernels: the C specification of edgepanel's arithmetic.
 *
 * Every ISA file reproduces these results bit for bit: the same integers per (token, plane, row,
 * group), and the same float operations in the same order:
 *     acc = 0; for each group j: for each plane i: acc = fmaf(alpha[i][row][j], (float)D, acc);
 *     y = acc * activation_scale
 * where D is the exact integer dot product of the plane's signs with the activations of group j.
 * 8-bit scales (codes c times a row multiplier m) sum each group's planes as integers first
 * (ep_int_scales: when the sum fits int32, always at the converter's group sizes):
 *     acc = 0; for each group j: E = sum over planes i of c[i][row][j] * D; acc = fmaf(m[row], (float)E, acc);
 * E is then the exact integer dot product of the group's weight codes, sum_i c_i * sign_i, with
 * the activations, which a kernel may also compute from those codes widened to 16 bits.
 * Written for clarity, not speed; it calls nothing outside this file but ep_internal.h's inline
 * helpers. */
#include <math.h>
#include <string.h>

#include "ep_internal.h"

void ep_ref_quantize_i8(const float *x, int64_t in, int8_t *q, float *scale) {
    float amax = 0.0f;
    for (int64_t j = 0; j < in; j++) {
        float a = fabsf(x[j]);
        if (a > amax) amax = a;  /* NaN compares false: ignored */
    }
    if (amax == 0.0f) {
        memset(q, 0, (size_t)in);
        *scale = 0.0f;
        return;
    }
    float inv = 127.0f / amax;
    for (int64_t j = 0; j < in; j++) q[j] = ep_quantize_one(x[j], inv);  /* nearbyintf: half to even */
    *scale = amax / 127.0f;
}

/* mean |x| summed in a fixed order: eight float lanes, lane l holding x[l], x[l+8], ... in turn,
 * combined as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)).  Fixing the order keeps every ISA identical. */
float ep_ref_abs_mean(const float *x, int64_t in) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < in; j++) lane[j & 7] += fabsf(x[j]);
    float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    return in > 0 ? s / (float)in : 0.0f;
}

void ep_ref_binarize(const float *x, int64_t in, uint8_t *bits, float *scale) {
    int64_t nbytes = ep_in_pad(in) / 8;
    memset(bits, 0, (size_t)nbytes);
    for (int64_t j = 0; j < in; j++)
        if (x[j] < 0.0f) bits[j >> 3] |= (uint8_t)(1u << (j & 7));
    *scale = ep_ref_abs_mean(x, in);
}

void ep_ref_group_sums(const int8_t *q, int64_t in, int64_t group, int32_t *gsum) {
    int64_t ng = ep_groups(in, group);
    for (int64_t j = 0; j < ng; j++) {
        int64_t e = ep_min64(ng == 1 ? in : (j + 1) * group, in);
        int32_t s = 0;
        for (int64_t u = j * group; u < e; u++) s += q[u];
        gsum[j] = s;
    }
}

void ep_ref_group_valid(int64_t in, int64_t group, int32_t *nvalid) {
    int64_t ng = ep_groups(in, group);
    for (int64_t j = 0; j < ng; j++) {
        int64_t e = ep_min64(ng == 1 ? in : (j + 1) * group, in);
        nvalid[j] = (int32_t)(e - j * group);
    }
}

void ep_store_tile(float *y_row, int64_t out, int64_t t, const float *acc16, float s) {
    int64_t rows = ep_min64(EP_TILE, out - t * EP_TILE);
    for (int64_t r = 0; r < rows; r++) y_row[t * EP_TILE + r] = acc16[r] * s;
}

float ep_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float32 to float16, rounded to nearest even, as F16C's vcvtps2ph and NEON's fcvtn do (and
 * NumPy's astype(float16)): overflow to infinity, float16 subnormals kept, a NaN stays a quiet NaN
 * with its payload's high bits. */
uint16_t ep_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   /* >= 65520: rounds past 65504 */
    uint32_t h, rem, half;
    if (ax >= 0x38800000u) {   /* normal: rebias the exponent, keep 10 of 23 mantissa bits */
        h = (ax - (112u << 23)) >> 13;
        rem = ax & 0x1fffu;
        half = 0x1000u;
    } else {                   /* subnormal in float16: units of 2^-24 */
        const uint32_t e = ax >> 23, shift = 126u - e;
        if (shift > 24) return (uint16_t)sign;
        const uint32_t man = (ax & 0x7fffffu) | 0x800000u;
        h = man >> shift;
        rem = man & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
    }
    if (rem > half || (rem == half && (h & 1u))) h++;   /* a carry moves into the exponent */
    return (uint16_t)(sign | h);
}

/* Dot products in a fixed order, so that every ISA gives the same bits: eight lanes, lane l
 * accumulating a[i]*b[i] for i = l, l+8, ... with one fused multiply-add each, combined as
 * ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)). */
float ep_ref_dot(const float *a, const float *b, int64_t n) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i++) lane[i & 7] = fmaf(a[i], b[i], lane[i & 7]);
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

void ep_ref_dense_rows(const float *x, int64_t n, int64_t in, const void *w, int f16, float *y,
                       int64_t ldy, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < n; t++) {
            const float *xt = x + t * in;
            float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (f16) {
                const uint16_t *wr = (const uint16_t *)w + r * in;
                for (int64_t u = 0; u < in; u++) lane[u & 7] = fmaf(xt[u], ep_half_to_float(wr[u]), lane[u & 7]);
                y[t * ldy + r] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
            } else {
                y[t * ldy + r] = ep_ref_dot(xt, (const float *)w + r * in, in);
            }
        }
}

void ep_ref_i8_rows(const int8_t *q, const float *qs, int64_t n, int64_t in, const int8_t *w,
                    const float *ws, float *y, int64_t ldy, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < n; t++) {
            int32_t d = 0;
            for (int64_t u = 0; u < in; u++) d += (int32_t)q[t * in + u] * w[r * in + u];
            y[t * ldy + r] = ((float)d * ws[r]) * qs[t];
        }
}

/* exp(x) as every ISA computes it: x = n ln2 + r (n = round-half-even(x log2 e), ln2 in two
 * parts), e^r by a degree-6 Taylor polynomial in Horner form with fused multiply-adds, times
 * 2^n built from its exponent bits.  Within EP_EXP_MAX_ULP of exp (ep_internal.h); 0 below
 * EP_EXP_LO, inf above EP_EXP_HI. */
float ep_expf(float x) {
    if (x != x) return x;
    if (!(x > EP_EXP_LO)) return 0.0f;
    if (x > EP_EXP_HI) return INFINITY;
    const float n = nearbyintf(x * EP_LOG2E);
    float r = fmaf(n, -EP_LN2_HI, x);
    r = fmaf(n, -EP_LN2_LO, r);
    float p = EP_EXP_C6;
    p = fmaf(p, r, EP_EXP_C5);
    p = fmaf(p, r, EP_EXP_C4);
    p = fmaf(p, r, EP_EXP_C3);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    union { uint32_t u; float f; } two_n = {(uint32_t)((int32_t)n + 127) << 23};
    return p * two_n.f;
}

/* The gated MLP's SiLU times the up projection, in place in u. */
void ep_ref_silu_mul(const float *g, float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) u[i] = (g[i] / (1.0f + ep_expf(-g[i]))) * u[i];
}

/* The scale tuner's gather: w[i] = lev[codes[i]], every code < L <= 16. */
void ep_ref_lookup16_u16(const uint16_t *lev, int L, const uint8_t *codes, int64_t n, uint16_t *w) {
    (void)L;
    for (int64_t i = 0; i < n; i++) w[i] = lev[codes[i]];
}

void ep_ref_lookup16_f32(const float *lev, int L, const uint8_t *codes, int64_t n, float *w) {
    (void)L;
    for (int64_t i = 0; i < n; i++) w[i] = lev[codes[i]];
}

void ep_ref_plane_sums(const float *gw, const uint8_t *codes, int64_t n, int k, float *out) {
    for (int i = 0; i < k; i++) {
        float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t c = 0; c < n; c++)
            lane[c & 7] += ((codes[c] >> (k - 1 - i)) & 1) ? gw[c] : -gw[c];
        out[i] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    }
}

/* Softmax of one head's scores in place: e_s = ep_expf(score_s - max); the sum in 8 lanes
 * (lane s mod 8, in order of s) joined by the canonical tree; w_s = e_s * (1 / sum). */
void ep_softmax_weights(float *scores, int64_t T) {
    float mx = -INFINITY, lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t s = 0; s < T; s++)
        if (scores[s] > mx) mx = scores[s];
    for (int64_t s = 0; s < T; s++) {
        scores[s] = ep_expf(scores[s] - mx);
        lane[s & 7] += scores[s];
    }
    const float inv = 1.0f / (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])));
    for (int64_t s = 0; s < T; s++) scores[s] *= inv;
}

/* Element i of a cache row: float32, or float16 widened. */
static inline float kv_value(const void *p, int f16, int64_t i) {
    return f16 ? ep_half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

void ep_ref_attend(const float *q, int64_t G, const void *k, const void *v, int flags, int64_t kstride,
                   int64_t T, int64_t hd, float scale, float *out, float *scratch) {
    const int f16 = flags & EP_ATTEND_F16;
    for (int64_t g = 0; g < G; g++) {
        float *w = scratch + g * T, *o = out + g * hd;
        const float *qg = q + g * hd;
        for (int64_t s = 0; s < T; s++) {   /* ep_ref_dot of q and the widened key */
            float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t i = 0; i < hd; i++) lane[i & 7] = fmaf(qg[i], kv_value(k, f16, s * kstride + i), lane[i & 7]);
            w[s] = (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))) * scale;
        }
        ep_softmax_weights(w, T);
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t s = 0; s < T; s++)
            for (int64_t i = 0; i < hd; i++) o[i] = fmaf(w[s], kv_value(v, f16, s * kstride + i), o[i]);
    }
}

/* The rotation: v <- mix(FWHT(signs * v)) for one row of D = P * M, as edgepanel/rotation.py:
 * butterflies over distances 1, 2, 4, ... within each block of P, scaled by 1/sqrt(P), then the
 * M x M mix of the blocks, each output the sum over k = 0..M-1 in order from 0.0f.  tmp: D floats
 * (M > 1). */
void ep_ref_rotate_row(const float *signs, const float *mix, int64_t P, int64_t M, float *v, float *tmp) {
    const int64_t D = P * M;
    const float norm = 1.0f / sqrtf((float)P);
    for (int64_t i = 0; i < D; i++) v[i] *= signs[i];
    for (int64_t b = 0; b < M; b++) {
        float *blk = v + b * P;
        int64_t h = 1;
        if (P >= 4) {   /* distances 1 and 2 in one pass over each 4 entries: the same sums */
            for (int64_t s = 0; s < P; s += 4) {
                const float a0 = blk[s] + blk[s + 1], a1 = blk[s] - blk[s + 1];
                const float a2 = blk[s + 2] + blk[s + 3], a3 = blk[s + 2] - blk[s + 3];
                blk[s] = a0 + a2;
                blk[s + 1] = a1 + a3;
                blk[s + 2] = a0 - a2;
                blk[s + 3] = a1 - a3;
            }
            h = 4;
        }
        for (; h < P; h *= 2)
            for (int64_t s = 0; s < P; s += 2 * h)
                for (int64_t i = s; i < s + h; i++) {
                    float a = blk[i], c = blk[i + h];
                    blk[i] = a + c;
                    blk[i + h] = a - c;
                }
    }
    for (int64_t i = 0; i < D; i++) v[i] *= norm;
    if (M > 1) {
        for (int64_t i = 0; i < M; i++) {   /* k outer, j inner: contiguous rows, the same order per output */
            float *o = tmp + i * P;
            for (int64_t j = 0; j < P; j++) o[j] = 0.0f;
            for (int64_t k = 0; k < M; k++) {
                const float c = mix[i * M + k], *src = v + k * P;
                for (int64_t j = 0; j < P; j++) o[j] += c * src[j];
            }
        }
        memcpy(v, tmp, sizeof(float) * (size_t)D);
    } else if (mix[0] != 1.0f) {
        for (int64_t i = 0; i < D; i++) v[i] *= mix[0];
    }
}

void ep_ref_to_half(const float *x, int64_t n, uint16_t *h) {
    for (int64_t i = 0; i < n; i++) h[i] = ep_float_to_half(x[i]);
}

static int ref_supported(void) { return 1; }

/* The scalar "tables" are the activations themselves, zero-padded to in_pad. */
static void ref_i8_tables(const int8_t *q, int64_t in, int64_t group, uint8_t *tab, int32_t *gsum) {
    int64_t in_pad = ep_in_pad(in);
    memcpy(tab, q, (size_t)in);
    memset(tab + in, 0, (size_t)(in_pad - in));
    ep_ref_group_sums(q, in, group, gsum);
}

static void ref_xnor_tables(const uint8_t *bits, int64_t in, int64_t group, uint8_t *tab,
                            int32_t *nvalid) {
    int64_t nbytes = ep_in_pad(in) / 8;
    memcpy(tab, bits, (size_t)nbytes);
    /* padding bits are copied as they are: the kernel below stops at `in`, so neither the
     * activations' nor the weights' padding counts, whatever it holds (bits.py: packing writes 0
     * there, kernels ignore it) */
    ep_ref_group_valid(in, group, nvalid);
}

/* Bit u of row r of plane i. */
static inline int plane_bit(const ep_gemm_args *a, int64_t i, int64_t r, int64_t u) {
    int64_t t = r / EP_TILE, rr = r % EP_TILE, c = u >> 3;
    uint8_t byte = a->planes[((i * a->tiles + t) * a->ncol + c) * EP_TILE + rr];
    return (byte >> (u & 7)) & 1;
}

static inline float plane_scale(const ep_gemm_args *a, int64_t i, int64_t r, int64_t j) {
    int64_t idx = ep_scale_index(a, i, r / EP_TILE, j) + r % EP_TILE;
    return ep_scale_value(a->scales, a->scales_kind, a->scale_rows, idx, r);
}

/* The 8-bit code of (plane i, row r, group j): int_scales only. */
static inline uint8_t plane_code(const ep_gemm_args *a, int64_t i, int64_t r, int64_t j) {
    return ((const uint8_t *)a->scales)[ep_scale_index(a, i, r / EP_TILE, j) + r % EP_TILE];
}

static inline int64_t group_end(const ep_gemm_args *a, int64_t j) {
    return ep_min64(a->ng == 1 ? a->in : (j + 1) * a->group, a->in);
}

static void ref_i8_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    for (int64_t tok = 0; tok < a->n; tok++) {
        const int8_t *q = (const int8_t *)(a->tab + tok * a->tab_stride);
        for (int64_t t = t0; t < t1; t++) {
            float acc[EP_TILE];
            for (int64_t rr = 0; rr < EP_TILE; rr++) {
                int64_t r = t * EP_TILE + rr;
                float s = 0.0f;
                if (r < a->out) {
                    for (int64_t j = 0; j < a->ng; j++) {
                        int32_t e = 0;
                        for (int64_t i = 0; i < a->k; i++) {
                            int32_t d = 0;  /* bit 1 means -1 */
                            for (int64_t u = j * a->group; u < group_end(a, j); u++)
                                d += plane_bit(a, i, r, u) ? -q[u] : q[u];
                            if (a->int_scales)
                                e += (int32_t)plane_code(a, i, r, j) * d;
                            else
                                s = fmaf(plane_scale(a, i, r, j), (float)d, s);
                        }
                        if (a->int_scales) s = fmaf(a->scale_rows[r], (float)e, s);
                    }
                }
                acc[rr] = s;
            }
            ep_store_tile(a->y + tok * a->out, a->out, t, acc, a->ascale[tok]);
        }
    }
}

static void ref_xnor_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    for (int64_t tok = 0; tok < a->n; tok++) {
        const uint8_t *x = a->tab + tok * a->tab_stride;
        for (int64_t t = t0; t < t1; t++) {
            float acc[EP_TILE];
            for (int64_t rr = 0; rr < EP_TILE; rr++) {
                int64_t r = t * EP_TILE + rr;
                float s = 0.0f;
                if (r < a->out) {
                    for (int64_t j = 0; j < a->ng; j++) {
                        int32_t e = 0;
                        for (int64_t i = 0; i < a->k; i++) {
                            int32_t differ = 0;
                            for (int64_t u = j * a->group; u < group_end(a, j); u++)
                                differ += plane_bit(a, i, r, u) ^ ((x[u >> 3] >> (u & 7)) & 1);
                            int32_t d = a->gsum[tok * a->ng + j] - 2 * differ;
                            if (a->int_scales)
                                e += (int32_t)plane_code(a, i, r, j) * d;
                            else
                                s = fmaf(plane_scale(a, i, r, j), (float)d, s);
                        }
                        if (a->int_scales) s = fmaf(a->scale_rows[r], (float)e, s);
                    }
                }
                acc[rr] = s;
            }
            ep_store_tile(a->y + tok * a->out, a->out, t, acc, a->ascale[tok]);
        }
    }
}

const ep_kernels ep_kernels_scalar = {
    .name = "scalar",
    .supported = ref_supported,
    .quantize_i8 = ep_ref_quantize_i8,
    .binarize = ep_ref_binarize,
    .i8_tables = ref_i8_tables,
    .xnor_tables = ref_xnor_tables,
    .i8_tiles = ref_i8_tiles,
    .xnor_tiles = ref_xnor_tiles,
    .dense_rows = ep_ref_dense_rows,
    .i8_rows = ep_ref_i8_rows,
    .dot = ep_ref_dot,
    .attend = ep_ref_attend,
    .to_half = ep_ref_to_half,
    .rotate_row = ep_ref_rotate_row,
    .silu_mul = ep_ref_silu_mul,
    .lookup16_u16 = ep_ref_lookup16_u16,
    .lookup16_f32 = ep_ref_lookup16_f32,
    .plane_sums = ep_ref_plane_sums,
};
