/* x86-64 AVX2 kernels (with FMA).  Same results as ref.c, bit for bit.
 *
 * k planes x int8 activations, T-MAC style: per token and per 4 inputs, 16-entry tables of the
 * masked sums of the activations (one table serves every plane and every row); a plane byte of a
 * tile holds two 4-input nibbles of one row, and one vpshufb looks up 32 of them.  The int8
 * activation x = 16*h + l is split into l in [0,15] and h in [-8,7] so each table fits in bytes
 * exactly.  Tables per 16 inputs (byte columns c, c+1), four 32-byte vectors, halves c | c+1:
 *   [L lo-nibble] [L hi-nibble] [H lo-nibble] [H hi-nibble]
 * the H entries biased by +32 (a sum of four h in [-32,28] -> [0,60]).
 * Accumulation widths: a 32-input block sums 4 lookups per byte lane (l <= 240, h+128 in [0,240]),
 * then l + 16*(h+128) <= 4080 goes into int16 for at most 8 blocks, or twice that (<= 8160, by
 * vpmaddubsw with (2, 32)) for at most 4; the two halves (byte columns c, c+1) of such a run add in
 * 16 bits as unsigned (<= 65280), then int32.
 *
 * xnor: per 16 inputs two 32-byte tables of popcount((nibble ^ activation nibble) & valid).
 *
 * Longer than 400 lines on purpose: one file per ISA (its table builders and tile kernels share
 * private helpers that no other file may see), as dispatch.c expects. */
#include <math.h>
#include <string.h>

#include "ep_simd_x86.h"
#include "ep_internal.h"

EP_TARGET_PUSH("avx2,fma,f16c")

static int avx2_supported(void) {
    return EP_CPU_SUPPORTS("avx2") && EP_CPU_SUPPORTS("fma") && EP_CPU_F16C();
}

void ep_avx2_quantize_i8(const float *x, int64_t in, int8_t *q, float *scale) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= in; j += 8)
        vmax = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)), vmax);  /* NaN -> keeps vmax */
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; l++) if (lanes[l] > amax) amax = lanes[l];
    for (; j < in; j++) {
        float a = x[j] < 0 ? -x[j] : x[j];
        if (a > amax) amax = a;
    }
    if (amax == 0.0f) {
        memset(q, 0, (size_t)in);
        *scale = 0.0f;
        return;
    }
    const float inv_s = 127.0f / amax;
    const __m256 inv = _mm256_set1_ps(inv_s), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    j = 0;
    for (; j + 32 <= in; j += 32) {
        __m256i v[4];
        for (int u = 0; u < 4; u++) {
            __m256 f = _mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * u), inv);
            f = _mm256_and_ps(f, _mm256_cmp_ps(f, f, _CMP_ORD_Q));  /* NaN -> 0 */
            f = _mm256_min_ps(_mm256_max_ps(f, lo), hi);
            v[u] = _mm256_cvtps_epi32(f);  /* round half to even */
        }
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(q + j), _mm256_permutevar8x32_epi32(p, perm));
    }
    for (; j < in; j++) q[j] = ep_quantize_one(x[j], inv_s);  /* the same rule, one at a time */
    *scale = amax / 127.0f;
}

void ep_avx2_binarize(const float *x, int64_t in, uint8_t *bits, float *scale) {
    const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
    int64_t nbytes = ep_in_pad(in) / 8;
    memset(bits, 0, (size_t)nbytes);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= in; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        bits[j >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ));
        acc = _mm256_add_ps(acc, _mm256_andnot_ps(sign, v));
    }
    float lane[8];
    _mm256_storeu_ps(lane, acc);
    for (; j < in; j++) {
        if (x[j] < 0.0f) bits[j >> 3] |= (uint8_t)(1u << (j & 7));
        lane[j & 7] += x[j] < 0 ? -x[j] : x[j];
    }
    float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    *scale = in > 0 ? s / (float)in : 0.0f;
}

/* byte n of each half: 0xFF where bit b of n is set */
EP_INLINE __m256i nibble_bit_mask(int b) {
    uint8_t m[32];
    for (int n = 0; n < 32; n++) m[n] = ((n & 15) >> b) & 1 ? 0xFF : 0;
    return _mm256_loadu_si256((const __m256i *)m);
}

static void avx2_i8_tables(const int8_t *q, int64_t in, int64_t group, uint8_t *tab, int32_t *gsum) {
    const int64_t in_pad = ep_in_pad(in);
    const __m128i m0f = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m256i mask[4], pick[4];
    for (int b = 0; b < 4; b++) {
        mask[b] = nibble_bit_mask(b);
        pick[b] = _mm256_setr_m128i(_mm_set1_epi8((char)b), _mm_set1_epi8((char)(8 + b)));
    }
    const __m256i four = _mm256_set1_epi8(4), h_bias = _mm256_set1_epi8(32);
    const __m128i flip = _mm_set1_epi8((char)0x80);
    ep_group_walk gw = ep_group_walk_start(in, group);
    for (int64_t j = 0; j < in_pad; j += 16) {
        __m128i x16;
        if (j + 16 <= in) {
            x16 = _mm_loadu_si128((const __m128i *)(q + j));
        } else {
            int8_t tmp[16] = {0};
            if (j < in) memcpy(tmp, q + j, (size_t)(in - j));
            x16 = _mm_loadu_si128((const __m128i *)tmp);
        }
        {   /* the 16 inputs' sum: (x + 128) summed unsigned by vpsadbw, less 16 * 128 */
            const __m128i sad = _mm_sad_epu8(_mm_xor_si128(x16, flip), _mm_setzero_si128());
            ep_group_walk_add(&gw, j, gsum, _mm_cvtsi128_si32(sad) + _mm_extract_epi16(sad, 4) - 16 * 128);
        }
        __m128i l = _mm_and_si128(x16, m0f);
        __m128i h = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(_mm_srli_epi16(x16, 4), m0f), eight), eight);
        __m256i L = _mm256_broadcastsi128_si256(l), H = _mm256_broadcastsi128_si256(h);
        __m256i t[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
        for (int b = 0; b < 4; b++) {
            __m256i plo = pick[b], phi = _mm256_add_epi8(pick[b], four);
            t[0] = _mm256_add_epi8(t[0], _mm256_and_si256(_mm256_shuffle_epi8(L, plo), mask[b]));
            t[1] = _mm256_add_epi8(t[1], _mm256_and_si256(_mm256_shuffle_epi8(L, phi), mask[b]));
            t[2] = _mm256_add_epi8(t[2], _mm256_and_si256(_mm256_shuffle_epi8(H, plo), mask[b]));
            t[3] = _mm256_add_epi8(t[3], _mm256_and_si256(_mm256_shuffle_epi8(H, phi), mask[b]));
        }
        t[2] = _mm256_add_epi8(t[2], h_bias);  /* four lookups: h + 128, unsigned for vpmaddubsw */
        t[3] = _mm256_add_epi8(t[3], h_bias);
        __m256i *dst = (__m256i *)(tab + j * 8);
        for (int u = 0; u < 4; u++) _mm256_store_si256(dst + u, t[u]);
    }
    ep_group_walk_end(&gw, gsum);
}

EP_INLINE __m256i sum_halves_epi16(__m256i s) {
    return _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s, 1)));
}

/* The int32 row sums of an int16 run of the i8 product (rows 0-7 in s[0], 8-15 in s[1], each a
 * byte column per half): the halves add in 16 bits, unsigned (<= 65280), then widen. */
EP_INLINE void widen_run(const __m256i s[2], __m256i m[2]) {
    for (int h = 0; h < 2; h++)
        m[h] = _mm256_cvtepu16_epi32(_mm_add_epi16(_mm256_castsi256_si128(s[h]), _mm256_extracti128_si256(s[h], 1)));
}

/* Finish a tile for TB tokens: keep the partial sums, or scale and store the outputs. */
EP_INLINE void store_acc(const ep_gemm_args *a, int64_t t, int64_t tok0, int TB, __m256 f[][2], int last) {
    for (int b = 0; b < TB; b++) {
        int64_t tok = tok0 + b;
        if (!last) {
            float *p = a->acc + (tok * a->tiles + t) * EP_TILE;
            _mm256_storeu_ps(p, f[b][0]);
            _mm256_storeu_ps(p + 8, f[b][1]);
        } else if ((t + 1) * EP_TILE <= a->out) {
            __m256 s = _mm256_set1_ps(a->ascale[tok]);
            float *y = a->y + tok * a->out + t * EP_TILE;
            _mm256_storeu_ps(y, _mm256_mul_ps(f[b][0], s));
            _mm256_storeu_ps(y + 8, _mm256_mul_ps(f[b][1], s));
        } else {
            float tmp[EP_TILE];
            _mm256_storeu_ps(tmp, f[b][0]);
            _mm256_storeu_ps(tmp + 8, f[b][1]);
            ep_store_tile(a->y + tok * a->out, a->out, t, tmp, a->ascale[tok]);
        }
    }
}

EP_INLINE void load_acc(const ep_gemm_args *a, int64_t t, int64_t tok0, int TB, __m256 f[][2], int first) {
    for (int b = 0; b < TB; b++) {
        if (first) {
            f[b][0] = f[b][1] = _mm256_setzero_ps();
        } else {
            const float *p = a->acc + ((tok0 + b) * a->tiles + t) * EP_TILE;
            f[b][0] = _mm256_loadu_ps(p);
            f[b][1] = _mm256_loadu_ps(p + 8);
        }
    }
}

/* One 32-input block of one plane (byte columns cc..cc+3 at w = the plane's w + 16 cc, tab = the
 * tables' + 64 cc) for TB tokens: s += l + 16*(h+128) per byte lane, in int16 (the H tables carry
 * the +128); twice that when dbl (<= 8160 a block).  Pointers, not column indices: built with
 * -fwrapv (Python's flags), index arithmetic costs more in the loops. */
EP_INLINE void i8_block(const uint8_t *w, const uint8_t *tab, int64_t ts, const int TB, const int dbl,
                        __m256i s[][2]) {
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    const __m256i mul = _mm256_set1_epi16(dbl ? 0x2002 : 0x1001);  /* bytes (2, 32) or (1, 16) */
    __m256i v0 = _mm256_loadu_si256((const __m256i *)w);
    __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + 2 * EP_TILE));
    __m256i lo0 = _mm256_and_si256(v0, m0f), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m0f);
    __m256i lo1 = _mm256_and_si256(v1, m0f), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m0f);
    for (int b = 0; b < TB; b++) {
        const __m256i *T = (const __m256i *)(tab + b * ts);
        __m256i al = _mm256_add_epi8(_mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 0), lo0),
                                                     _mm256_shuffle_epi8(_mm256_load_si256(T + 1), hi0)),
                                     _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 4), lo1),
                                                     _mm256_shuffle_epi8(_mm256_load_si256(T + 5), hi1)));
        __m256i ah = _mm256_add_epi8(_mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 2), lo0),
                                                     _mm256_shuffle_epi8(_mm256_load_si256(T + 3), hi0)),
                                     _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 6), lo1),
                                                     _mm256_shuffle_epi8(_mm256_load_si256(T + 7), hi1)));
        s[b][0] = _mm256_add_epi16(s[b][0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(al, ah), mul));
        s[b][1] = _mm256_add_epi16(s[b][1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(al, ah), mul));
    }
}

/* The integer sums of group j of one plane (w: its tile's columns) for TB tokens, int32 per row:
 * m[b][h][r] = twice the raw sum of (l + 16*(h+128)) over the group (the bias, 2 * 4096 per
 * block, leaves with S).  A group of exactly GB blocks (GB > 0, `whole`) is one unrolled int16 run,
 * doubled in vpmaddubsw when GB <= 4; others (the last group when shorter or longer, or GB == 0:
 * one group per row) take int16 runs of <= 8 blocks, doubled in int32. */
EP_INLINE void i8_group(const ep_gemm_args *a, const uint8_t *w, const uint8_t *tab, int64_t ts, const int TB,
                        int64_t j, const int GB, int whole, __m256i m[][2]) {
    __m256i s[4][2];
    if (GB > 0 && whole) {
        for (int b = 0; b < TB; b++) s[b][0] = s[b][1] = _mm256_setzero_si256();
        const uint8_t *wg = w + j * (4 * GB * EP_TILE), *tg = tab + j * (4 * GB * 64);
        for (int u = 0; u < GB; u++) i8_block(wg + u * 4 * EP_TILE, tg + u * 256, ts, TB, GB <= 4, s);
        for (int b = 0; b < TB; b++) {
            widen_run(s[b], m[b]);
            if (GB > 4) {
                m[b][0] = _mm256_slli_epi32(m[b][0], 1);
                m[b][1] = _mm256_slli_epi32(m[b][1], 1);
            }
        }
        return;
    }
    int64_t c0, c1;
    ep_group_cols(a, j, &c0, &c1);
    for (int b = 0; b < TB; b++) m[b][0] = m[b][1] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; c += 32) {  /* <= 8 blocks per int16 run */
        const int64_t ce = ep_min64(c + 32, c1);
        for (int b = 0; b < TB; b++) s[b][0] = s[b][1] = _mm256_setzero_si256();
        for (int64_t cc = c; cc < ce; cc += 4) i8_block(w + cc * EP_TILE, tab + cc * 64, ts, TB, 0, s);
        for (int b = 0; b < TB; b++) {
            __m256i r[2];
            widen_run(s[b], r);
            m[b][0] = _mm256_add_epi32(m[b][0], r[0]);
            m[b][1] = _mm256_add_epi32(m[b][1], r[1]);
        }
    }
    for (int b = 0; b < TB; b++) {
        m[b][0] = _mm256_slli_epi32(m[b][0], 1);
        m[b][1] = _mm256_slli_epi32(m[b][1], 1);
    }
}

/* The xnor product's D (the integer results of a tile) holds EP_CHUNK_GROUPS groups of every plane
 * at a time (k is at most EP_MAX_PLANES: ep_gemm_args_init checks it). */
#define EP_CHUNK_GROUPS 8
#define EP_TB EP_TOKEN_BLOCK

/* The 16 scales of (plane i, tile t, group j), as ep_scale_value gives them. */
EP_INLINE void load_scales(const ep_gemm_args *a, int64_t i, int64_t t, int64_t j, __m256 *lo, __m256 *hi) {
    const int64_t idx = ep_scale_index(a, i, t, j);
    if (a->scales_kind == EP_SCALES_U8) {
        const __m128i c = _mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + idx));
        const float *m = a->scale_rows + t * EP_TILE;
        *lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), _mm256_loadu_ps(m));
        *hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))), _mm256_loadu_ps(m + 8));
    } else if (a->scales_kind == EP_SCALES_F16) {
        const uint16_t *p = (const uint16_t *)a->scales + idx;
        *lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        *hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    } else {
        const float *p = (const float *)a->scales + idx;
        *lo = _mm256_loadu_ps(p);
        *hi = _mm256_loadu_ps(p + 8);
    }
}

/* One (plane, group)'s exact integers d (two halves of 8 rows) for TB tokens into the running
 * sums, in the specification's order: f += alpha * d, or with integer 8-bit scales (int_scales)
 * e += code * d, which group_pass adds once the group's planes are done. */
EP_INLINE void plane_pass(const ep_gemm_args *a, int64_t i, int64_t t, int64_t j, const int TB, __m256i d[][2],
                          __m256i e[][2], __m256 f[][2], const int SHORT) {
    if (SHORT) {  /* known int_scales and short_groups: no branch in the loop */
        const __m128i c = _mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + ep_scale_index(a, i, t, j)));
        const __m256i c0 = _mm256_cvtepu8_epi32(c), c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(c, 8));
        for (int b = 0; b < TB; b++) {
            e[b][0] = _mm256_add_epi32(e[b][0], _mm256_madd_epi16(d[b][0], c0));
            e[b][1] = _mm256_add_epi32(e[b][1], _mm256_madd_epi16(d[b][1], c1));
        }
        return;
    }
    if (a->int_scales) {
        const __m128i c = _mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + ep_scale_index(a, i, t, j)));
        const __m256i c0 = _mm256_cvtepu8_epi32(c), c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(c, 8));
        for (int b = 0; b < TB; b++) {  /* dword lane: (code, 0) as two int16: pmaddwd gives code * D when D fits int16 */
            e[b][0] = _mm256_add_epi32(e[b][0], a->short_groups ? _mm256_madd_epi16(d[b][0], c0) : _mm256_mullo_epi32(c0, d[b][0]));
            e[b][1] = _mm256_add_epi32(e[b][1], a->short_groups ? _mm256_madd_epi16(d[b][1], c1) : _mm256_mullo_epi32(c1, d[b][1]));
        }
        return;
    }
    __m256 al0, al1;
    load_scales(a, i, t, j, &al0, &al1);
    for (int b = 0; b < TB; b++) {
        f[b][0] = ep_fmadd256(al0, _mm256_cvtepi32_ps(d[b][0]), f[b][0]);
        f[b][1] = ep_fmadd256(al1, _mm256_cvtepi32_ps(d[b][1]), f[b][1]);
    }
}

/* The end of a group under int_scales: f += scale_rows * E, E reset. */
EP_INLINE void group_pass(const ep_gemm_args *a, int64_t t, const int TB, __m256i e[][2], __m256 f[][2]) {
    if (!a->int_scales) return;
    const float *m = a->scale_rows + t * EP_TILE;
    const __m256 m0 = _mm256_loadu_ps(m), m1 = _mm256_loadu_ps(m + 8);
    for (int b = 0; b < TB; b++) {
        f[b][0] = ep_fmadd256(m0, _mm256_cvtepi32_ps(e[b][0]), f[b][0]);
        f[b][1] = ep_fmadd256(m1, _mm256_cvtepi32_ps(e[b][1]), f[b][1]);
        e[b][0] = e[b][1] = _mm256_setzero_si256();
    }
}

/* The float pass, in the specification's order: groups outer, planes inner, one fused
 * multiply-add each; f holds the tile's running sums per token. */
EP_INLINE void float_pass(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0,
                          int64_t j1, const int32_t *D, int64_t dtok, int64_t bias_per_block,
                          __m256 f[][2]) {
    const int64_t nj = j1 - j0;
    __m256i e[4][2];
    for (int b = 0; b < TB; b++) e[b][0] = e[b][1] = _mm256_setzero_si256();
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        const int32_t bias = (int32_t)(bias_per_block * ((c1 - c0) / 4));
        for (int64_t i = 0; i < a->k; i++) {
            __m256i dd[4][2];
            for (int b = 0; b < TB; b++) {
                const int32_t *d = D + b * dtok + (i * nj + (j - j0)) * EP_TILE;
                const __m256i S = _mm256_set1_epi32(a->gsum[(tok0 + b) * a->ng + j] + bias);
                dd[b][0] = _mm256_sub_epi32(S, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)d), 1));
                dd[b][1] = _mm256_sub_epi32(S, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(d + 8)), 1));
            }
            plane_pass(a, i, t, j, TB, dd, e, f, 0);
        }
        group_pass(a, t, TB, e, f);
    }
}

/* Groups [0, jw) are GB blocks long (GB > 0): the last one too when the padded row ends with it. */
EP_INLINE int64_t whole_groups(const ep_gemm_args *a, const int GB) {
    return GB > 0 ? (a->ncol == a->ng * 4 * GB ? a->ng : a->ng - 1) : 0;
}

/* Groups [j0, j1) of tile t for tokens tok0 .. tok0+TB-1, in the specification's order (groups
 * outer, planes inner, one fused multiply-add each): each (group, plane)'s integers go straight
 * into the running sums f (no integer buffer).  D = S + 8192 nb - m (m: twice the raw sums), S
 * the token's group sum.  MEM (float scales, several tokens): the running sums stay in memory
 * instead of 8 of the 16 registers, read and written once a (group, plane); with them in
 * registers too gcc spilled lookups and sums inside each block (prefill 1.018x, held to AVX2,
 * k=2).  That memory is a local array, reached from the stack pointer, not the tile's slots of
 * a->acc, which took a general register per token (or a reload of its address); a->acc holds
 * the sums only between chunks.  WHOLE: every group in [j0, j1) is GB blocks long, and
 * i8_group's branch for other lengths is compiled out.  Both together: prefill 1.077x (k=2,
 * held to AVX2, one thread); in single products WHOLE alone 1.00x, the local array on top of it
 * 1.07x.  The same operations in the same order: the same bits. */
EP_INLINE void i8_tile_body(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0,
                            int64_t j1, const int GB, const int SHORT, const int MEM, const int WHOLE) {
    const uint8_t *w = a->planes + t * a->ncol * EP_TILE, *tab = a->tab + tok0 * a->tab_stride;
    const int64_t pstride = a->tiles * a->ncol * EP_TILE, ts = a->tab_stride;
    const int64_t jw = whole_groups(a, GB);
    float acc[4][EP_TILE] __attribute__((aligned(32)));  /* MEM: token b's sums */
    __m256 f[4][2];
    __m256i e[4][2];
    load_acc(a, t, tok0, TB, f, j0 == 0);
    if (MEM)
        for (int b = 0; b < TB; b++) {
            _mm256_store_ps(acc[b], f[b][0]);
            _mm256_store_ps(acc[b] + 8, f[b][1]);
        }
    for (int b = 0; b < TB; b++) e[b][0] = e[b][1] = _mm256_setzero_si256();
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        const int32_t bias = (int32_t)(8192 * ((c1 - c0) / 4));
        __m256i S[4];
        int32_t sb[4];
        for (int b = 0; b < TB; b++) sb[b] = a->gsum[(tok0 + b) * a->ng + j] + bias;
        if (!MEM) for (int b = 0; b < TB; b++) S[b] = _mm256_set1_epi32(sb[b]);
        const uint8_t *wp = w;
        for (int64_t i = 0; i < a->k; i++, wp += pstride) {
            __m256i m[4][2];
            const uint8_t *tb = tab;
            __asm__("" : "+r"(tb));  /* the group's tables are read per plane, not hoisted into stack copies */
            i8_group(a, wp, tb, ts, TB, j, GB, WHOLE || j < jw, m);
            if (MEM) {  /* float scales: f += alpha * d, f read and written in memory, S made as used */
                __m256 al0, al1;
                load_scales(a, i, t, j, &al0, &al1);
                for (int b = 0; b < TB; b++) {
                    const __m256i Sb = _mm256_set1_epi32(sb[b]);
                    float *p = acc[b];
                    _mm256_store_ps(p, ep_fmadd256(al0, _mm256_cvtepi32_ps(_mm256_sub_epi32(Sb, m[b][0])), _mm256_load_ps(p)));
                    _mm256_store_ps(p + 8, ep_fmadd256(al1, _mm256_cvtepi32_ps(_mm256_sub_epi32(Sb, m[b][1])), _mm256_load_ps(p + 8)));
                }
                continue;
            }
            for (int b = 0; b < TB; b++) {
                m[b][0] = _mm256_sub_epi32(S[b], m[b][0]);
                m[b][1] = _mm256_sub_epi32(S[b], m[b][1]);
            }
            plane_pass(a, i, t, j, TB, m, e, f, SHORT);
        }
        if (!MEM) group_pass(a, t, TB, e, f);
    }
    if (MEM)
        for (int b = 0; b < TB; b++) {
            f[b][0] = _mm256_load_ps(acc[b]);
            f[b][1] = _mm256_load_ps(acc[b] + 8);
        }
    store_acc(a, t, tok0, TB, f, j1 == a->ng);
}

/* The choice of plane pass made once per tile, not per plane (a decode step measured 4% slower
 * with it in the loop). */
EP_INLINE void i8_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, int64_t j1, const int GB,
                       const int WHOLE) {
    if (a->int_scales && a->short_groups)
        i8_tile_body(a, t, tok0, TB, j0, j1, GB, 1, 0, WHOLE);
    else if (TB > 1 && !a->int_scales)
        i8_tile_body(a, t, tok0, TB, j0, j1, GB, 0, 1, WHOLE);
    else
        i8_tile_body(a, t, tok0, TB, j0, j1, GB, 0, 0, WHOLE);
}

/* One function per (TB, GB), each with its own register allocation (inlined into one, the
 * decode loop spilled more: 3% more instructions at 1 token, g64), and a second one for a range
 * of whole groups (i8_tile_body's WHOLE). */
#define I8_TILE_FN(TB, GB)                                                                      \
    static __attribute__((noinline)) void i8_whole_##TB##_##GB(const ep_gemm_args *a, int64_t t, \
                                                               int64_t tok0, int64_t j0, int64_t j1) { \
        i8_tile(a, t, tok0, TB, j0, j1, GB, 1);                                                  \
    }                                                                                            \
    static __attribute__((noinline)) void i8_tile_##TB##_##GB(const ep_gemm_args *a, int64_t t, \
                                                              int64_t tok0, int64_t j0, int64_t j1) { \
        if (GB > 0 && j1 <= whole_groups(a, GB))                                                \
            i8_whole_##TB##_##GB(a, t, tok0, j0, j1);                                           \
        else                                                                                     \
            i8_tile(a, t, tok0, TB, j0, j1, GB, 0);                                              \
    }
#define I8_TILE_FNS(TB) I8_TILE_FN(TB, 0) I8_TILE_FN(TB, 1) I8_TILE_FN(TB, 2) I8_TILE_FN(TB, 4) I8_TILE_FN(TB, 8)
I8_TILE_FNS(1)
I8_TILE_FNS(2)
I8_TILE_FNS(3)
I8_TILE_FNS(4)
#undef I8_TILE_FNS
#undef I8_TILE_FN
#define I8_TILE(a, t, tok0, TB, j0, j1, GB) i8_tile_##TB##_##GB(a, t, tok0, j0, j1)

/* ---- one token over rows of whole groups (decode): i8_dec ---------------------------------
 * i8_tile_body's sums for TB = 1 in the same order, every tile of [t0, t1) in one call, with the
 * scales' kind a constant (SK) and the planes, tables and scales reached by stepped pointers.  The
 * general body spent about 95 instructions a 32-input block at k = 1, group 64 (callgrind), most
 * of them bookkeeping per (group, plane) around the block's 28. */
/* How far ahead in a plane a decode step asks L1 for weights.  With 2 MiB pages the hardware
 * prefetcher alone kept a one-token product at 19 GB/s where it computes at 23.5 from L2 (k=2,
 * Zen 4 held to AVX2); 3 KiB ahead: 1.06x from DRAM, 0.96x in cache. */
#define EP_DEC_PREFETCH 3072
EP_INLINE void i8_dec(const ep_gemm_args *a, int64_t t0, int64_t t1, const int GB, const int SK) {
    const int64_t ng = a->ng, k = a->k, pstride = ep_plane_stride(a), sstride = a->tiles * ng * EP_TILE;
    const int64_t gbytes = 4 * GB * EP_TILE;   /* a group's bytes in a plane row of a tile, and /16 * 64 of tables */
    const __m256 qs = _mm256_set1_ps(a->ascale[0]);
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *w = ep_tile_planes(a, t), *tab = a->tab;
        const int32_t *gs = a->gsum;
        int64_t si = ep_scale_index(a, 0, t, 0);
        __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps(), m0 = f0, m1 = f0;
        if (SK == EP_SK_U8) {
            m0 = _mm256_loadu_ps(a->scale_rows + t * EP_TILE);
            m1 = _mm256_loadu_ps(a->scale_rows + t * EP_TILE + 8);
        }
        for (int64_t j = 0; j < ng; j++, w += gbytes, tab += 4 * gbytes, si += EP_TILE) {
            const __m256i S = _mm256_set1_epi32(gs[j] + 8192 * GB);
            __m256i e0 = _mm256_setzero_si256(), e1 = e0;
            const uint8_t *wp = w;
            int64_t sp = si;
            for (int64_t i = 0; i < k; i++, wp += pstride, sp += sstride) {
                __m256i s[1][2] = {{_mm256_setzero_si256(), _mm256_setzero_si256()}}, m[2];
                const uint8_t *tb = tab;
                __asm__("" : "+r"(tb));  /* the group's tables are read per plane, as in i8_tile_body */
                for (int u = 0; u < GB; u++) _mm_prefetch((const char *)(wp + EP_DEC_PREFETCH + u * 64), _MM_HINT_T0);
                for (int u = 0; u < GB; u++) i8_block(wp + u * 4 * EP_TILE, tb + u * 256, 0, 1, GB <= 4, s);
                widen_run(s[0], m);
                if (GB > 4) {
                    m[0] = _mm256_slli_epi32(m[0], 1);
                    m[1] = _mm256_slli_epi32(m[1], 1);
                }
                const __m256i d0 = _mm256_sub_epi32(S, m[0]), d1 = _mm256_sub_epi32(S, m[1]);
                if (SK == EP_SK_U8) {
                    const __m128i c = _mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + sp));
                    e0 = _mm256_add_epi32(e0, _mm256_madd_epi16(d0, _mm256_cvtepu8_epi32(c)));
                    e1 = _mm256_add_epi32(e1, _mm256_madd_epi16(d1, _mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))));
                } else {
                    __m256 al0, al1;
                    if (SK == EP_SK_F16) {
                        const uint16_t *p = (const uint16_t *)a->scales + sp;
                        al0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
                        al1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
                    } else {
                        const float *p = (const float *)a->scales + sp;
                        al0 = _mm256_loadu_ps(p);
                        al1 = _mm256_loadu_ps(p + 8);
                    }
                    f0 = ep_fmadd256(al0, _mm256_cvtepi32_ps(d0), f0);
                    f1 = ep_fmadd256(al1, _mm256_cvtepi32_ps(d1), f1);
                }
            }
            if (SK == EP_SK_U8) {
                f0 = ep_fmadd256(m0, _mm256_cvtepi32_ps(e0), f0);
                f1 = ep_fmadd256(m1, _mm256_cvtepi32_ps(e1), f1);
            }
        }
        if ((t + 1) * EP_TILE <= a->out) {
            _mm256_storeu_ps(a->y + t * EP_TILE, _mm256_mul_ps(f0, qs));
            _mm256_storeu_ps(a->y + t * EP_TILE + 8, _mm256_mul_ps(f1, qs));
        } else {
            float tmp[EP_TILE];
            _mm256_storeu_ps(tmp, f0);
            _mm256_storeu_ps(tmp + 8, f1);
            ep_store_tile(a->y, a->out, t, tmp, a->ascale[0]);
        }
    }
}

EP_DEC_KERNELS(i8_dec)

static void avx2_i8_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    const ep_dec_fn dec = i8_dec_for(a);
    if (dec) {
        dec(a, t0, t1);
        return;
    }
    const int gb = ep_blocks_per_group(a);
#define CALL(TB) EP_SWITCH_GB(I8_TILE, a, t, tok0, TB, j0, j1)
    EP_TILE_LOOP(a, t0, t1, 8, CALL);
#undef CALL
}
#undef I8_TILE

/* ---- integer 8-bit scales over many tokens: i16_tiles ------------------------------------
 * As in x86_avx512.c: a tile's weight codes W = sum_i code_i * sign_i (|W| <= 4 * 255) widened to
 * int16 pairs once per call, a chunk of groups at a time (pair p of the chunk at buf + 16 p: rows
 * 0-7, then 8-15), then every token's activation pairs multiply them with vpmaddwd: the same E
 * per group as ref.c, so the same float pass and bits. */
#define EP_I16_TB 6  /* tokens sharing each widened weight vector: 12 int32 sums in registers */

EP_INLINE __m256i dup_words(__m256i v) { return _mm256_or_si256(v, _mm256_slli_epi32(v, 16)); }

/* Groups [j0, j1) of tile t widened into buf. */
EP_INLINE void widen_codes(const ep_gemm_args *a, int64_t t, int64_t j0, int64_t j1, int32_t *buf) {
    const int64_t cbase = ep_group_col0(a, j0), pstride = ep_plane_stride(a);
    const uint8_t *w0 = ep_tile_planes(a, t);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        __m256i c2[EP_MAX_PLANES][2], csum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t i = 0; i < a->k; i++) {  /* dword r = code r in both halves */
            const __m128i c = _mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + ep_scale_index(a, i, t, j)));
            const __m256i lo = dup_words(_mm256_cvtepu8_epi32(c)), hi = dup_words(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
            csum[0] = _mm256_add_epi16(csum[0], lo);
            csum[1] = _mm256_add_epi16(csum[1], hi);
            c2[i][0] = _mm256_add_epi16(lo, lo);
            c2[i][1] = _mm256_add_epi16(hi, hi);
        }
        for (int64_t c = c0; c < c1; c++) {
            __m256i v[4][2];
            for (int p = 0; p < 4; p++) v[p][0] = csum[0], v[p][1] = csum[1];
            for (int64_t i = 0; i < a->k; i++) {  /* W = sum of codes - 2 * (codes whose bit says -1) */
                const __m128i bytes = _mm_loadu_si128((const __m128i *)(w0 + i * pstride + c * EP_TILE));
                const __m256i b[2] = {dup_words(_mm256_cvtepu8_epi32(bytes)), dup_words(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)))};
                for (int p = 0; p < 4; p++) {
                    const __m256i sel = _mm256_set1_epi32((int)((2u << (2 * p)) << 16 | (1u << (2 * p))));
                    for (int h = 0; h < 2; h++) {
                        const __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(b[h], sel), sel);
                        v[p][h] = _mm256_sub_epi16(v[p][h], _mm256_and_si256(set, c2[i][h]));
                    }
                }
            }
            for (int p = 0; p < 4; p++) {
                int32_t *d = buf + ((c - cbase) * 4 + p) * EP_TILE;
                _mm256_store_si256((__m256i *)d, v[p][0]);
                _mm256_store_si256((__m256i *)(d + 8), v[p][1]);
            }
        }
    }
}

/* Tokens tok0 .. tok0+TB-1 over the widened groups [j0, j1) of tile t. */
EP_INLINE void i16_block(const ep_gemm_args *a, const int32_t *buf, int64_t t, int64_t tok0, const int TB, int64_t j0,
                         int64_t j1) {
    const int64_t cbase = ep_group_col0(a, j0);
    const float *mr = a->scale_rows + t * EP_TILE;
    const __m256 m0 = _mm256_loadu_ps(mr), m1 = _mm256_loadu_ps(mr + 8);
    const int32_t *x = (const int32_t *)(a->x16 + tok0 * a->in_pad);  /* pair p at x[p] */
    const int64_t xs = a->in_pad / 2;
    __m256 f[EP_I16_TB][2];
    load_acc(a, t, tok0, TB, f, j0 == 0);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        __m256i e[EP_I16_TB][2];
        for (int b = 0; b < TB; b++) e[b][0] = e[b][1] = _mm256_setzero_si256();
        for (int64_t p = c0 * 4; p < c1 * 4; p++) {
            const int32_t *wp = buf + (p - cbase * 4) * EP_TILE;
            const __m256i w0 = _mm256_load_si256((const __m256i *)wp), w1 = _mm256_load_si256((const __m256i *)(wp + 8));
            for (int b = 0; b < TB; b++) {
                const __m256i xv = _mm256_set1_epi32(x[b * xs + p]);
                e[b][0] = _mm256_add_epi32(e[b][0], _mm256_madd_epi16(w0, xv));
                e[b][1] = _mm256_add_epi32(e[b][1], _mm256_madd_epi16(w1, xv));
            }
        }
        for (int b = 0; b < TB; b++) {
            f[b][0] = ep_fmadd256(m0, _mm256_cvtepi32_ps(e[b][0]), f[b][0]);
            f[b][1] = ep_fmadd256(m1, _mm256_cvtepi32_ps(e[b][1]), f[b][1]);
        }
    }
    store_acc(a, t, tok0, TB, f, j1 == a->ng);
}

static void avx2_i16_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    _Alignas(64) int32_t buf[EP_I16_CHUNK / 2 * EP_TILE];
    EP_I16_LOOP(a, t0, t1, buf, EP_I16_TB, widen_codes, i16_block);
}

static const uint8_t popcount4[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};


static void avx2_xnor_tables(const uint8_t *bits, int64_t in, int64_t group, uint8_t *tab, int32_t *nvalid) {
    const int64_t ncol = ep_in_pad(in) / 8;
    const __m256i pop = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)popcount4));
    const __m256i idx = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                         0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    for (int64_t c = 0; c < ncol; c += 2) {
        __m256i A = _mm256_setr_m128i(_mm_set1_epi8((char)bits[c]), _mm_set1_epi8((char)bits[c + 1]));
        __m256i V = _mm256_setr_m128i(_mm_set1_epi8((char)ep_valid_bits(in, c)),
                                      _mm_set1_epi8((char)ep_valid_bits(in, c + 1)));
        __m256i alo = _mm256_and_si256(A, m0f), ahi = _mm256_and_si256(_mm256_srli_epi16(A, 4), m0f);
        __m256i vlo = _mm256_and_si256(V, m0f), vhi = _mm256_and_si256(_mm256_srli_epi16(V, 4), m0f);
        __m256i *dst = (__m256i *)(tab + c * 32);
        _mm256_store_si256(dst, _mm256_shuffle_epi8(pop, _mm256_and_si256(_mm256_xor_si256(idx, alo), vlo)));
        _mm256_store_si256(dst + 1, _mm256_shuffle_epi8(pop, _mm256_and_si256(_mm256_xor_si256(idx, ahi), vhi)));
    }
    ep_ref_group_valid(in, group, nvalid);
}

/* One 32-input block of one plane for TB tokens: byte counts of differing bits (<= 16 per lane). */
EP_INLINE void xnor_block(const uint8_t *w, const uint8_t *tab, int64_t ts, int64_t cc, const int TB,
                          __m256i *s) {
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + cc * EP_TILE));
    __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + (cc + 2) * EP_TILE));
    __m256i lo0 = _mm256_and_si256(v0, m0f), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m0f);
    __m256i lo1 = _mm256_and_si256(v1, m0f), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m0f);
    for (int b = 0; b < TB; b++) {
        const __m256i *T = (const __m256i *)(tab + b * ts + cc * 32);
        __m256i x = _mm256_add_epi8(_mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 0), lo0),
                                                    _mm256_shuffle_epi8(_mm256_load_si256(T + 1), hi0)),
                                    _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 2), lo1),
                                                    _mm256_shuffle_epi8(_mm256_load_si256(T + 3), hi1)));
        s[b] = _mm256_add_epi8(s[b], x);
    }
}

EP_INLINE void add_counts(__m256i s, __m256i m[2]) {
    const __m256i zero = _mm256_setzero_si256();
    m[0] = _mm256_add_epi32(m[0], sum_halves_epi16(_mm256_unpacklo_epi8(s, zero)));
    m[1] = _mm256_add_epi32(m[1], sum_halves_epi16(_mm256_unpackhi_epi8(s, zero)));
}

/* Integer pass of the xnor product: D[b][i][j - j0][16] = differing valid bits in the group. */
EP_INLINE void xnor_plane(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t i,
                          int64_t j0, int64_t j1, int32_t *D, int64_t dtok, const int GB) {
    const uint8_t *w = a->planes + (i * a->tiles + t) * a->ncol * EP_TILE;
    const uint8_t *tab = a->tab + tok0 * a->tab_stride;
    const int64_t ts = a->tab_stride, nj = j1 - j0;
    for (int64_t j = j0; j < j1; j++) {
        int32_t *d = D + (i * nj + (j - j0)) * EP_TILE;
        __m256i m[4][2], s[4];
        for (int b = 0; b < TB; b++) m[b][0] = m[b][1] = _mm256_setzero_si256();
        if (GB > 0 && j != a->ng - 1) {
            for (int b = 0; b < TB; b++) s[b] = _mm256_setzero_si256();
            for (int u = 0; u < GB; u++) xnor_block(w, tab, ts, j * 4 * GB + 4 * u, TB, s);
            for (int b = 0; b < TB; b++) add_counts(s[b], m[b]);
        } else {
            int64_t c0, c1;
            ep_group_cols(a, j, &c0, &c1);
            for (int64_t c = c0; c < c1; c += 32) {  /* <= 8 blocks: byte counts stay <= 128 */
                const int64_t ce = ep_min64(c + 32, c1);
                for (int b = 0; b < TB; b++) s[b] = _mm256_setzero_si256();
                for (int64_t cc = c; cc < ce; cc += 4) xnor_block(w, tab, ts, cc, TB, s);
                for (int b = 0; b < TB; b++) add_counts(s[b], m[b]);
            }
        }
        for (int b = 0; b < TB; b++) {
            _mm256_storeu_si256((__m256i *)(d + b * dtok), m[b][0]);
            _mm256_storeu_si256((__m256i *)(d + b * dtok + 8), m[b][1]);
        }
    }
}

EP_INLINE void xnor_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0,
                         int64_t j1, const int GB) {
    int32_t D[EP_TB * EP_MAX_PLANES * EP_CHUNK_GROUPS * EP_TILE] __attribute__((aligned(32)));
    __m256 f[4][2];
    load_acc(a, t, tok0, TB, f, j0 == 0);
    for (int64_t c0 = j0; c0 < j1; c0 += EP_CHUNK_GROUPS) {
        const int64_t c1 = ep_min64(c0 + EP_CHUNK_GROUPS, j1), dtok = a->k * (c1 - c0) * EP_TILE;
        for (int64_t i = 0; i < a->k; i++) xnor_plane(a, t, tok0, TB, i, c0, c1, D, dtok, GB);
        float_pass(a, t, tok0, TB, c0, c1, D, dtok, 0, f);  /* D = valid - 2 * differing */
    }
    store_acc(a, t, tok0, TB, f, j1 == a->ng);
}

static void avx2_xnor_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    const int gb = ep_blocks_per_group(a);
#define CALL(TB) EP_SWITCH_GB(xnor_tile, a, t, tok0, TB, j0, j1)
    EP_TILE_LOOP(a, t0, t1, 4, CALL);
#undef CALL
}

/* The canonical order of ref.c's ep_ref_dot: lane l of one 8-lane accumulator takes elements
 * l, l+8, ...; the tail continues the same lanes; then the fixed tree. */
EP_INLINE float finish_lanes(__m256 acc, const float *a, const float *b, int64_t i, int64_t n) {
    float lane[8];
    _mm256_storeu_ps(lane, acc);
    for (; i < n; i++) lane[i & 7] = fmaf(a[i], b[i], lane[i & 7]);
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

float ep_avx2_dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = ep_fmadd256(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return finish_lanes(acc, a, b, i, n);
}

/* One row of W (float32, or float16 widened with F16C) against up to 4 tokens, each dot in the
 * canonical order. */
void ep_avx2_dense_rows(const float *x, int64_t n, int64_t in, const void *w, int f16, float *y,
                        int64_t ldy, int64_t r0, int64_t r1) {
    float wtail[8];
    for (int64_t r = r0; r < r1; r++) {
        const float *wf = (const float *)w + r * in;
        const uint16_t *wh = (const uint16_t *)w + r * in;
        const int64_t n8 = in & ~(int64_t)7;
        for (int64_t v = n8; v < in; v++) wtail[v - n8] = f16 ? ep_half_to_float(wh[v]) : wf[v];
        for (int64_t t0 = 0; t0 < n; t0 += 4) {
            const int tb = (int)ep_min64(4, n - t0);
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t u = 0; u < n8; u += 8) {
                __m256 wv = f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wh + u))) : _mm256_loadu_ps(wf + u);
                for (int b = 0; b < tb; b++) acc[b] = ep_fmadd256(_mm256_loadu_ps(x + (t0 + b) * in + u), wv, acc[b]);
            }
            for (int b = 0; b < tb; b++)
                y[(t0 + b) * ldy + r] = finish_lanes(acc[b], x + (t0 + b) * in + n8, wtail, 0, in - n8);
        }
    }
}

/* Attention, the softmax and exp256: ep_attend_x86.h, shared with x86_avx512.c (compiled there
 * again with 32 vector registers). */
#define EP_ATTEND_FN ep_avx2_attend
#include "ep_attend_x86.h"
#undef EP_ATTEND_FN

/* ep_ref_silu_mul, 8 at a time, bit for bit (the same exp, an IEEE division, the tail scalar) */
void ep_avx2_silu_mul(const float *g, float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_xor_ps(x, sign))));
        _mm256_storeu_ps(u + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    ep_ref_silu_mul(g + i, u + i, n - i);
}

/* ep_ref_lookup16_u16, 32 codes at a time: the table's low and high bytes looked up by pshufb
 * (codes < 16 index a 16-byte table directly) and interleaved back into 16-bit values. */
void ep_avx2_lookup16_u16(const uint16_t *lev, int L, const uint8_t *codes, int64_t n, uint16_t *w) {
    uint16_t t16[16] = {0};
    const uint16_t *t = lev;
    if (L < 16) {
        memcpy(t16, lev, sizeof(uint16_t) * (size_t)L);
        t = t16;
    }
    /* the low bytes to qwords 0-1, the high bytes to qwords 2-3, each half then in both lanes */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i x = _mm256_permute4x64_epi64(
        _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)t), split), _MM_SHUFFLE(3, 1, 2, 0));
    const __m256i tlo = _mm256_permute2x128_si256(x, x, 0x00), thi = _mm256_permute2x128_si256(x, x, 0x11);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i idx = _mm256_loadu_si256((const __m256i *)(codes + i));
        const __m256i l = _mm256_shuffle_epi8(tlo, idx), h = _mm256_shuffle_epi8(thi, idx);
        const __m256i a = _mm256_unpacklo_epi8(l, h);   /* codes 0-7 | 16-23 */
        const __m256i b = _mm256_unpackhi_epi8(l, h);   /* codes 8-15 | 24-31 */
        _mm256_storeu_si256((__m256i *)(w + i), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256((__m256i *)(w + i + 16), _mm256_permute2x128_si256(a, b, 0x31));
    }
    ep_ref_lookup16_u16(lev, L, codes + i, n - i, w + i);
}

/* ep_ref_lookup16_f32, 8 codes at a time: the two halves of the table permuted by the code, the
 * half chosen by the code's bit 3. */
void ep_avx2_lookup16_f32(const float *lev, int L, const uint8_t *codes, int64_t n, float *w) {
    float t[16] = {0};
    memcpy(t, lev, sizeof(float) * (size_t)L);
    const __m256 t0 = _mm256_loadu_ps(t), t1 = _mm256_loadu_ps(t + 8);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i)));
        const __m256 a = _mm256_permutevar8x32_ps(t0, idx), b = _mm256_permutevar8x32_ps(t1, idx);
        _mm256_storeu_ps(w + i, _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
    }
    ep_ref_lookup16_f32(lev, L, codes + i, n - i, w + i);
}

/* ep_ref_plane_sums, a plane at a time: its 8 lanes are one vector; the sign is the code's bit
 * (inverted) moved to each float's sign bit, so a negation is exact as the reference's. */
void ep_avx2_plane_sums(const float *gw, const uint8_t *codes, int64_t n, int k, float *out) {
    const __m256i one = _mm256_set1_epi32(1);
    const int64_t n8 = n & ~(int64_t)7;
    for (int i = 0; i < k; i++) {
        const __m128i sh = _mm_cvtsi32_si128(k - 1 - i);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = 0; c < n8; c += 8) {
            const __m256i code = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + c)));
            const __m256i neg = _mm256_slli_epi32(_mm256_andnot_si256(_mm256_srl_epi32(code, sh), one), 31);
            acc = _mm256_add_ps(acc, _mm256_xor_ps(_mm256_loadu_ps(gw + c), _mm256_castsi256_ps(neg)));
        }
        float lane[8];
        _mm256_storeu_ps(lane, acc);
        for (int64_t c = n8; c < n; c++)
            lane[c & 7] += ((codes[c] >> (k - 1 - i)) & 1) ? gw[c] : -gw[c];
        out[i] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    }
}

/* ep_ref_rotate_row, 8 floats a vector (P >= 8): the signs, then distances 1, 2 and 4 within
 * each vector (a permuted copy added, and subtracted from, the blend keeping each element's
 * reference operation: a + c where it receives the sum, a - c the difference), the longer
 * distances a vector pair at a time, the scale, then the mix: every element sees the reference's
 * operations in its order. */
void ep_avx2_rotate_row(const float *signs, const float *mix, int64_t P, int64_t M, float *v, float *tmp) {
    if (P < 8) {
        ep_ref_rotate_row(signs, mix, P, M, v, tmp);
        return;
    }
    const int64_t D = P * M;
    const __m256 norm = _mm256_set1_ps(1.0f / sqrtf((float)P));
    for (int64_t b = 0; b < M; b++) {
        float *blk = v + b * P;
        const float *sg = signs + b * P;
        for (int64_t s = 0; s < P; s += 8) {
            __m256 x = _mm256_mul_ps(_mm256_loadu_ps(blk + s), _mm256_loadu_ps(sg + s));
            __m256 p = _mm256_permute_ps(x, 0xB1);                           /* pairs swapped */
            x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0xAA);
            p = _mm256_permute_ps(x, 0x4E);                                  /* pairs of pairs */
            x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0xCC);
            p = _mm256_permute2f128_ps(x, x, 0x01);                          /* halves */
            x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0xF0);
            _mm256_storeu_ps(blk + s, x);
        }
        for (int64_t h = 8; h < P; h *= 2)
            for (int64_t s = 0; s < P; s += 2 * h)
                for (int64_t i = s; i < s + h; i += 8) {
                    const __m256 a = _mm256_loadu_ps(blk + i), c = _mm256_loadu_ps(blk + i + h);
                    _mm256_storeu_ps(blk + i, _mm256_add_ps(a, c));
                    _mm256_storeu_ps(blk + i + h, _mm256_sub_ps(a, c));
                }
    }
    for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(v + i), norm));
    if (M > 1) {
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < P; j += 8) {
                __m256 o = _mm256_setzero_ps();
                for (int64_t k = 0; k < M; k++)
                    o = _mm256_add_ps(o, _mm256_mul_ps(_mm256_set1_ps(mix[i * M + k]), _mm256_loadu_ps(v + k * P + j)));
                _mm256_storeu_ps(tmp + i * P + j, o);
            }
        memcpy(v, tmp, sizeof(float) * (size_t)D);
    } else if (mix[0] != 1.0f) {
        const __m256 c = _mm256_set1_ps(mix[0]);
        for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(v + i), c));
    }
}

/* ep_ref_to_half, 8 at a time: F16C's conversion rounds to nearest even, as the reference */
void ep_avx2_to_half(const float *x, int64_t n, uint16_t *h) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    ep_ref_to_half(x + i, n - i, h + i);
}

/* One token (decode's output layer: a fifth of the step's bytes, read once): four rows at a time
 * share each load of x, |x| times w with x's sign (w in -127..127, as the format stores it: its
 * sign can be taken), summed pairwise in int16, then in int32; the four sums reduce together.
 * The rows two blocks ahead are prefetched: streamed from memory, the hardware prefetcher alone
 * left a core at 26 GB/s where it reads 35 (Xeon 207, 49152 x 576: 1.36x). */
static void i8_rows_one(const int8_t *q, float qs, int64_t in, const int8_t *w, const float *ws, float *y,
                        int64_t r0, int64_t r1) {
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const int8_t *w0 = w + r * in, *ahead = w0 + 8 * in;
        __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        int64_t u = 0;
        for (; u + 32 <= in; u += 32) {  /* the block's 4 * in bytes, two lines an iteration */
            _mm_prefetch((const char *)(ahead + 4 * u), _MM_HINT_T0);
            _mm_prefetch((const char *)(ahead + 4 * u + 64), _MM_HINT_T0);
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(q + u)), xa = _mm256_abs_epi8(xv);
            for (int i = 0; i < 4; i++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + i * in + u));
                a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv, xv)), ones));
            }
        }
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
        int32_t d[4];
        _mm_storeu_si128((__m128i *)d, _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
        for (int i = 0; i < 4; i++) {
            for (int64_t v = u; v < in; v++) d[i] += (int32_t)q[v] * w0[i * in + v];
            y[r + i] = ((float)d[i] * ws[r + i]) * qs;
        }
    }
    for (; r < r1; r++) {
        int32_t d = 0;
        for (int64_t v = 0; v < in; v++) d += (int32_t)q[v] * w[r * in + v];
        y[r] = ((float)d * ws[r]) * qs;
    }
}

/* Exact int8 dots: |w| times x with w's sign, summed pairwise in int16 (|w|, |x| <= 127: no
 * saturation), then in int32. */
void ep_avx2_i8_rows(const int8_t *q, const float *qs, int64_t n, int64_t in, const int8_t *w,
                     const float *ws, float *y, int64_t ldy, int64_t r0, int64_t r1) {
    if (n == 1) {
        i8_rows_one(q, qs[0], in, w, ws, y, r0, r1);
        return;
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *wr = w + r * in;
        for (int64_t t0 = 0; t0 < n; t0 += 4) {
            const int tb = (int)ep_min64(4, n - t0);
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            int64_t u = 0;
            for (; u + 32 <= in; u += 32) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + u));
                __m256i aw = _mm256_abs_epi8(wv);
                for (int b = 0; b < tb; b++) {
                    __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(q + (t0 + b) * in + u)), wv);
                    acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones));
                }
            }
            for (int b = 0; b < tb; b++) {
                __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[b]), _mm256_extracti128_si256(acc[b], 1));
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
                int32_t d = _mm_cvtsi128_si32(s);
                for (int64_t v = u; v < in; v++) d += (int32_t)q[(t0 + b) * in + v] * wr[v];
                y[(t0 + b) * ldy + r] = ((float)d * ws[r]) * qs[t0 + b];
            }
        }
    }
}

EP_TARGET_POP()

const ep_kernels ep_kernels_avx2 = {
    .name = "avx2",
    .supported = avx2_supported,
    .quantize_i8 = ep_avx2_quantize_i8,
    .binarize = ep_avx2_binarize,
    .i8_tables = avx2_i8_tables,
    .xnor_tables = avx2_xnor_tables,
    .i8_tiles = avx2_i8_tiles,
    .i16_tiles = avx2_i16_tiles,
    /* by k (Xeon 207, 1536 x 576, group 64): k <= 2 never (0.76x at 64 tokens); k = 3 1.04x at
     * 64, 0.96x at 32; k = 4 1.04x at 16, 0.91x at 12, 1.33x at 64.  An Intel core issues the
     * lookups' byte shuffles on two ports; the ratios on other cores (Zen) are not measured. */
    .i16_min_tokens = {0, 0, 0, 64, 16},
    .xnor_tiles = avx2_xnor_tiles,
    .dense_rows = ep_avx2_dense_rows,
    .i8_rows = ep_avx2_i8_rows,
    .dot = ep_avx2_dot,
    .attend = ep_avx2_attend,
    .to_half = ep_avx2_to_half,
    .rotate_row = ep_avx2_rotate_row,
    .silu_mul = ep_avx2_silu_mul,
    .lookup16_u16 = ep_avx2_lookup16_u16,
    .lookup16_f32 = ep_avx2_lookup16_f32,
    .plane_sums = ep_avx2_plane_sums,
};
