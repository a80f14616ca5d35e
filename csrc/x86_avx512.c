/* x86-64 AVX-512 kernels (F + BW; 512-bit vpshufb).  Same results as ref.c, bit for bit.
 *
 * The algorithm of x86_avx2.c at twice the width: one 64-byte load holds 4 byte columns (32
 * inputs) of a 16-row tile, one per 128-bit lane.  Tables per 32 inputs (byte columns c..c+3),
 * each a 64-byte vector with lane q serving column c+q:
 *   i8:   [L lo-nibble] [L hi-nibble] [H lo-nibble] [H hi-nibble]     (256 bytes)
 *   xnor: [P lo-nibble] [P hi-nibble]                                 (128 bytes)
 * Accumulation widths: two 32-input blocks (4 lookups per byte lane) per widening into int16,
 * at most 8 widenings (512 inputs) per int16 run.
 * Longer than 400 lines on purpose: one file per ISA (its table builders and tile kernels share
 * private helpers that no other file may see), as dispatch.c expects. */
#include <math.h>
#include <string.h>

#include "ep_simd_x86.h"
#include "ep_internal.h"

EP_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx2,fma")

static int avx512_supported(void) {
    return EP_CPU_SUPPORTS("avx512f") && EP_CPU_SUPPORTS("avx512bw") && EP_CPU_SUPPORTS("avx512vl") &&
           EP_CPU_SUPPORTS("avx2") && EP_CPU_SUPPORTS("fma") && EP_CPU_F16C();
}

EP_INLINE __m512i lanes_0011(__m256i v) {
    __m512i a = _mm512_castsi256_si512(v);
    return _mm512_shuffle_i32x4(a, a, 0x50);  /* 128-bit lanes [v.lo, v.lo, v.hi, v.hi] */
}

EP_INLINE __m512i nibble_bit_mask512(int b) {
    uint8_t m[64];
    for (int n = 0; n < 64; n++) m[n] = ((n & 15) >> b) & 1 ? 0xFF : 0;
    return _mm512_loadu_si512((const void *)m);
}

static void avx512_i8_tables(const int8_t *q, int64_t in, int64_t group, uint8_t *tab, int32_t *gsum) {
    const int64_t in_pad = ep_in_pad(in);
    const __m256i m0f = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
    __m512i mask[4], pick[4];
    for (int b = 0; b < 4; b++) {
        mask[b] = nibble_bit_mask512(b);
        pick[b] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_setr_m128i(_mm_set1_epi8((char)b), _mm_set1_epi8((char)(8 + b)))),
            _mm256_setr_m128i(_mm_set1_epi8((char)b), _mm_set1_epi8((char)(8 + b))), 1);
    }
    const __m512i four = _mm512_set1_epi8(4);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    ep_group_walk gw = ep_group_walk_start(in, group);
    for (int64_t j = 0; j < in_pad; j += 32) {
        __m256i x32;
        if (j + 32 <= in) {
            x32 = _mm256_loadu_si256((const __m256i *)(q + j));
        } else {
            int8_t tmp[32] = {0};
            if (j < in) memcpy(tmp, q + j, (size_t)(in - j));
            x32 = _mm256_loadu_si256((const __m256i *)tmp);
        }
        {   /* the 32 inputs' sum: (x + 128) summed unsigned by vpsadbw, less 32 * 128 (groups are whole 32s) */
            const __m256i sad = _mm256_sad_epu8(_mm256_xor_si256(x32, flip), _mm256_setzero_si256());
            const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sad), _mm256_extracti128_si256(sad, 1));
            ep_group_walk_add(&gw, j, gsum, _mm_cvtsi128_si32(s2) + _mm_extract_epi16(s2, 4) - 32 * 128);
        }
        __m256i l = _mm256_and_si256(x32, m0f);
        __m256i h = _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(x32, 4), m0f), eight), eight);
        __m512i L = lanes_0011(l), H = lanes_0011(h);
        __m512i t[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
        for (int b = 0; b < 4; b++) {
            __m512i plo = pick[b], phi = _mm512_add_epi8(pick[b], four);
            t[0] = _mm512_add_epi8(t[0], _mm512_and_si512(_mm512_shuffle_epi8(L, plo), mask[b]));
            t[1] = _mm512_add_epi8(t[1], _mm512_and_si512(_mm512_shuffle_epi8(L, phi), mask[b]));
            t[2] = _mm512_add_epi8(t[2], _mm512_and_si512(_mm512_shuffle_epi8(H, plo), mask[b]));
            t[3] = _mm512_add_epi8(t[3], _mm512_and_si512(_mm512_shuffle_epi8(H, phi), mask[b]));
        }
        uint8_t *dst = tab + j * 8;
        for (int u = 0; u < 4; u++) _mm512_store_si512((void *)(dst + 64 * u), t[u]);
    }
    ep_group_walk_end(&gw, gsum);
}

/* int16 lanes [Q0 r0-7 | Q1 r0-7 | Q2 r0-7 | Q3 r0-7] -> int32 rows 0-7, quarters summed */
EP_INLINE __m256i sum_quarters_epi16(__m512i s) {
    __m512i e = _mm512_add_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(s)),
                                 _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(s, 1)));
    return _mm256_add_epi32(_mm512_castsi512_si256(e), _mm512_extracti64x4_epi64(e, 1));
}

EP_INLINE __m512i join_rows(__m256i r0_7, __m256i r8_15) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(r0_7), r8_15, 1);
}

/* The 16 scales at element idx of tile t's rows, as ep_scale_value gives them. */
EP_INLINE __m512 scales_at512(const ep_gemm_args *a, int64_t idx, int64_t t) {
    if (a->scales_kind == EP_SCALES_U8)
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + idx)))),
                             _mm512_loadu_ps(a->scale_rows + t * EP_TILE));
    if (a->scales_kind == EP_SCALES_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a->scales + idx)));
    return _mm512_loadu_ps((const float *)a->scales + idx);
}

#if defined(EP_SIMDE)  /* SIMDe lacks the masked 16-bit subtract, and its _mm512_madd_epi16 alias takes 4 arguments */
#define EP_MASK_SUB16(v, m, c) _mm512_sub_epi16(v, _mm512_and_si512(c, _mm512_movm_epi16(m)))
#define EP_MADD16(a, b) simde_mm512_madd_epi16(a, b)
#else
#define EP_MASK_SUB16(v, m, c) _mm512_mask_sub_epi16(v, m, v, c)
#define EP_MADD16(a, b) _mm512_madd_epi16(a, b)
#endif

/* One (plane, group)'s exact integers d for TB tokens into the running sums, in the
 * specification's order: f += alpha * d, or with integer 8-bit scales (int_scales) e += code * d,
 * which group_pass512 adds once the group's planes are done. */
EP_INLINE void plane_pass512(const ep_gemm_args *a, int64_t sidx, int64_t t, const int TB, const __m512i *d,
                             __m512i *e, __m512 *f) {
    if (a->int_scales) {  /* dword lane r: (code, 0) as two int16, so pmaddwd gives code * D when D fits int16 */
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + sidx)));
        for (int b = 0; b < TB; b++)
            e[b] = _mm512_add_epi32(e[b], a->short_groups ? EP_MADD16(d[b], c) : _mm512_mullo_epi32(c, d[b]));
    } else {
        const __m512 alpha = scales_at512(a, sidx, t);
        for (int b = 0; b < TB; b++) f[b] = ep_fmadd512(alpha, _mm512_cvtepi32_ps(d[b]), f[b]);
    }
}

/* The end of a group under int_scales: f += scale_rows * E, E reset. */
EP_INLINE void group_pass512(const ep_gemm_args *a, int64_t t, const int TB, __m512i *e, __m512 *f) {
    if (!a->int_scales) return;
    const __m512 m = _mm512_loadu_ps(a->scale_rows + t * EP_TILE);
    for (int b = 0; b < TB; b++) {
        f[b] = ep_fmadd512(m, _mm512_cvtepi32_ps(e[b]), f[b]);
        e[b] = _mm512_setzero_si512();
    }
}

EP_INLINE void load_acc512(const ep_gemm_args *a, int64_t t, int64_t tok0, int TB, __m512 *f, int first) {
    for (int b = 0; b < TB; b++)
        f[b] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(a->acc + ((tok0 + b) * a->tiles + t) * EP_TILE);
}

/* A tile's running sums for TB tokens from groups j0 on: f as the previous chunk left them (zero
 * at the first), the integer group sums e zero. */
EP_INLINE void start_tile512(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, __m512 *f, __m512i *e) {
    load_acc512(a, t, tok0, TB, f, j0 == 0);
    for (int b = 0; b < TB; b++) e[b] = _mm512_setzero_si512();
}

EP_INLINE void store_acc512(const ep_gemm_args *a, int64_t t, int64_t tok0, int TB, const __m512 *f, int last) {
    for (int b = 0; b < TB; b++) {
        int64_t tok = tok0 + b;
        if (!last) {
            _mm512_storeu_ps(a->acc + (tok * a->tiles + t) * EP_TILE, f[b]);
        } else if ((t + 1) * EP_TILE <= a->out) {
            _mm512_storeu_ps(a->y + tok * a->out + t * EP_TILE, _mm512_mul_ps(f[b], _mm512_set1_ps(a->ascale[tok])));
        } else {
            float tmp[EP_TILE];
            _mm512_storeu_ps(tmp, f[b]);
            ep_store_tile(a->y + tok * a->out, a->out, t, tmp, a->ascale[tok]);
        }
    }
}

/* A weight vector's low and high nibbles, each in the low half of its byte. */
EP_INLINE void nibbles512(__m512i v, __m512i *lo, __m512i *hi) {
    const __m512i m0f = _mm512_set1_epi8(0x0f);
    *lo = _mm512_and_si512(v, m0f);
    *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
}

/* The i8 tables of one token at one pair of 32-input blocks into registers: t[0..3] the first
 * block's 256 bytes at T, t[4..7] the second's after them (loaded only when `two`). */
EP_INLINE void load_tables_pair(const uint8_t *T, int two, __m512i *t) {
    t[0] = _mm512_load_si512((const void *)T);
    t[1] = _mm512_load_si512((const void *)(T + 64));
    t[2] = _mm512_load_si512((const void *)(T + 128));
    t[3] = _mm512_load_si512((const void *)(T + 192));
    if (two) {
        t[4] = _mm512_load_si512((const void *)(T + 256));
        t[5] = _mm512_load_si512((const void *)(T + 320));
        t[6] = _mm512_load_si512((const void *)(T + 384));
        t[7] = _mm512_load_si512((const void *)(T + 448));
    }
}

/* Those tables looked up by the weights' nibbles: al = the sums of the low activation nibbles,
 * ah = of the signed high nibbles, per byte. */
EP_INLINE void lookup_pair_regs(const __m512i *t, __m512i lo0, __m512i hi0, __m512i lo1, __m512i hi1, int two,
                                __m512i *al, __m512i *ah) {
    __m512i l = _mm512_add_epi8(_mm512_shuffle_epi8(t[0], lo0), _mm512_shuffle_epi8(t[1], hi0));
    __m512i h = _mm512_add_epi8(_mm512_shuffle_epi8(t[2], lo0), _mm512_shuffle_epi8(t[3], hi0));
    if (two) {
        l = _mm512_add_epi8(l, _mm512_add_epi8(_mm512_shuffle_epi8(t[4], lo1), _mm512_shuffle_epi8(t[5], hi1)));
        h = _mm512_add_epi8(h, _mm512_add_epi8(_mm512_shuffle_epi8(t[6], lo1), _mm512_shuffle_epi8(t[7], hi1)));
    }
    *al = l;
    *ah = h;
}

EP_INLINE void lookup_pair(const uint8_t *T, __m512i lo0, __m512i hi0, __m512i lo1, __m512i hi1, int two,
                           __m512i *al, __m512i *ah) {
    __m512i t[8];
    load_tables_pair(T, two, t);
    lookup_pair_regs(t, lo0, hi0, lo1, hi1, two, al, ah);
}

EP_INLINE void i8_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, int64_t j1) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i mul = _mm512_set1_epi16(0x1001);
    __m512 f[4];
    __m512i e[4];
    start_tile512(a, t, tok0, TB, j0, f, e);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        for (int64_t i = 0; i < a->k; i++) {
            const uint8_t *w = a->planes + (i * a->tiles + t) * a->ncol * EP_TILE;
            __m512i m[4];
            for (int b = 0; b < TB; b++) m[b] = _mm512_setzero_si512();
            for (int64_t c = c0; c < c1; c += 64) {  /* 512 inputs: <= 8 widenings into int16 */
                const int64_t ce = ep_min64(c + 64, c1);
                __m512i s[4][2];
                for (int b = 0; b < TB; b++) s[b][0] = s[b][1] = _mm512_setzero_si512();
                int widen = 0;
                for (int64_t cc = c; cc < ce; cc += 8) {
                    const int two = cc + 4 < ce;  /* a pair of 32-input blocks, or the last single one */
                    __m512i v0 = _mm512_loadu_si512((const void *)(w + cc * EP_TILE));
                    __m512i v1 = two ? _mm512_loadu_si512((const void *)(w + (cc + 4) * EP_TILE)) : _mm512_setzero_si512();
                    __m512i lo0, hi0, lo1, hi1;
                    nibbles512(v0, &lo0, &hi0);
                    nibbles512(v1, &lo1, &hi1);
                    for (int b = 0; b < TB; b++) {
                        __m512i al, ah;
                        lookup_pair(a->tab + (tok0 + b) * a->tab_stride + cc * 64, lo0, hi0, lo1, hi1, two, &al, &ah);
                        ah = _mm512_xor_si512(ah, flip);
                        s[b][0] = _mm512_add_epi16(s[b][0], _mm512_maddubs_epi16(_mm512_unpacklo_epi8(al, ah), mul));
                        s[b][1] = _mm512_add_epi16(s[b][1], _mm512_maddubs_epi16(_mm512_unpackhi_epi8(al, ah), mul));
                    }
                    widen++;
                }
                /* each widening added 128*16 per byte lane; 4 quarters per row */
                const __m256i bias = _mm256_set1_epi32(8192 * widen);
                for (int b = 0; b < TB; b++) {
                    __m256i r0 = _mm256_sub_epi32(sum_quarters_epi16(s[b][0]), bias);
                    __m256i r1 = _mm256_sub_epi32(sum_quarters_epi16(s[b][1]), bias);
                    m[b] = _mm512_add_epi32(m[b], join_rows(r0, r1));
                }
            }
            for (int b = 0; b < TB; b++)
                m[b] = _mm512_sub_epi32(_mm512_set1_epi32(a->gsum[(tok0 + b) * a->ng + j]), _mm512_slli_epi32(m[b], 1));
            plane_pass512(a, ep_scale_index(a, i, t, j), t, TB, m, e, f);
        }
        group_pass512(a, t, TB, e, f);
    }
    store_acc512(a, t, tok0, TB, f, j1 == a->ng);
}

static void avx512_i8_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
#define CALL(TB) i8_tile(a, t, tok0, TB, j0, j1)
    EP_TILE_LOOP(a, t0, t1, 8, CALL);
#undef CALL
}

static const uint8_t popcount4[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};


EP_INLINE __m512i bytes_per_lane(uint8_t b0, uint8_t b1, uint8_t b2, uint8_t b3) {
    __m512i v = _mm512_castsi128_si512(_mm_set1_epi8((char)b0));
    v = _mm512_inserti32x4(v, _mm_set1_epi8((char)b1), 1);
    v = _mm512_inserti32x4(v, _mm_set1_epi8((char)b2), 2);
    return _mm512_inserti32x4(v, _mm_set1_epi8((char)b3), 3);
}

static void avx512_xnor_tables(const uint8_t *bits, int64_t in, int64_t group, uint8_t *tab, int32_t *nvalid) {
    const int64_t ncol = ep_in_pad(in) / 8;
    const __m512i pop = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)popcount4));
    const __m512i idx = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i m0f = _mm512_set1_epi8(0x0f);
    for (int64_t c = 0; c < ncol; c += 4) {
        __m512i A = bytes_per_lane(bits[c], bits[c + 1], bits[c + 2], bits[c + 3]);
        __m512i V = bytes_per_lane(ep_valid_bits(in, c), ep_valid_bits(in, c + 1), ep_valid_bits(in, c + 2), ep_valid_bits(in, c + 3));
        __m512i alo = _mm512_and_si512(A, m0f), ahi = _mm512_and_si512(_mm512_srli_epi16(A, 4), m0f);
        __m512i vlo = _mm512_and_si512(V, m0f), vhi = _mm512_and_si512(_mm512_srli_epi16(V, 4), m0f);
        uint8_t *dst = tab + c * 32;
        _mm512_store_si512((void *)dst, _mm512_shuffle_epi8(pop, _mm512_and_si512(_mm512_xor_si512(idx, alo), vlo)));
        _mm512_store_si512((void *)(dst + 64), _mm512_shuffle_epi8(pop, _mm512_and_si512(_mm512_xor_si512(idx, ahi), vhi)));
    }
    ep_ref_group_valid(in, group, nvalid);
}

EP_INLINE void xnor_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, int64_t j1) {
    const __m512i m0f = _mm512_set1_epi8(0x0f), zero = _mm512_setzero_si512();
    __m512 f[4];
    __m512i e[4];
    start_tile512(a, t, tok0, TB, j0, f, e);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        for (int64_t i = 0; i < a->k; i++) {
            const uint8_t *w = a->planes + (i * a->tiles + t) * a->ncol * EP_TILE;
            __m512i p[4];
            for (int b = 0; b < TB; b++) p[b] = _mm512_setzero_si512();
            for (int64_t c = c0; c < c1; c += 64) {  /* 16 blocks of <= 8 per byte lane: <= 128 */
                const int64_t ce = ep_min64(c + 64, c1);
                __m512i s[4];
                for (int b = 0; b < TB; b++) s[b] = _mm512_setzero_si512();
                for (int64_t cc = c; cc < ce; cc += 4) {
                    __m512i v = _mm512_loadu_si512((const void *)(w + cc * EP_TILE));
                    __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
                    for (int b = 0; b < TB; b++) {
                        const uint8_t *T = a->tab + (tok0 + b) * a->tab_stride + cc * 32;
                        s[b] = _mm512_add_epi8(s[b], _mm512_add_epi8(_mm512_shuffle_epi8(_mm512_load_si512((const void *)T), lo),
                                                                     _mm512_shuffle_epi8(_mm512_load_si512((const void *)(T + 64)), hi)));
                    }
                }
                for (int b = 0; b < TB; b++) {
                    __m256i r0 = sum_quarters_epi16(_mm512_unpacklo_epi8(s[b], zero));
                    __m256i r1 = sum_quarters_epi16(_mm512_unpackhi_epi8(s[b], zero));
                    p[b] = _mm512_add_epi32(p[b], join_rows(r0, r1));
                }
            }
            for (int b = 0; b < TB; b++)
                p[b] = _mm512_sub_epi32(_mm512_set1_epi32(a->gsum[(tok0 + b) * a->ng + j]), _mm512_slli_epi32(p[b], 1));
            plane_pass512(a, ep_scale_index(a, i, t, j), t, TB, p, e, f);
        }
        group_pass512(a, t, TB, e, f);
    }
    store_acc512(a, t, tok0, TB, f, j1 == a->ng);
}

static void avx512_xnor_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
#define CALL(TB) xnor_tile(a, t, tok0, TB, j0, j1)
    EP_TILE_LOOP(a, t0, t1, 4, CALL);
#undef CALL
}

#define EP_I16_TB 8  /* tokens sharing each widened weight vector */

/* ---- integer 8-bit scales over many tokens: i16_tiles ------------------------------------
 * With int_scales a group's planes combine exactly: E = sum_u W[u] x[u], W[u] = sum_i code_i *
 * sign_i[u], |W| <= 4 * 255.  A tile's W is widened once per call, a chunk of groups at a time,
 * into int16 pairs (dword lane r: row r, inputs 2p and 2p+1), then every token's activations
 * (a->x16, pairs broadcast) multiply it, 32 weights an instruction: at k = 4 fewer operations
 * than the four planes' lookups, and the same E, so the same float pass and bits as ref.c. */

/* Groups [j0, j1) of tile t widened into buf: pair p of the chunk at buf + 16 p. */
EP_INLINE void widen_codes512(const ep_gemm_args *a, int64_t t, int64_t j0, int64_t j1, int32_t *buf) {
    const int64_t cbase = ep_group_col0(a, j0), pstride = ep_plane_stride(a);
    const uint8_t *w0 = ep_tile_planes(a, t);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        __m512i c2[EP_MAX_PLANES], csum = _mm512_setzero_si512();
        for (int64_t i = 0; i < a->k; i++) {  /* dword r = code r in both halves */
            __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + ep_scale_index(a, i, t, j))));
            c = _mm512_or_si512(c, _mm512_slli_epi32(c, 16));
            csum = _mm512_add_epi16(csum, c);
            c2[i] = _mm512_add_epi16(c, c);
        }
        for (int64_t c = c0; c < c1; c++) {
            __m512i v[4] = {csum, csum, csum, csum};
            for (int64_t i = 0; i < a->k; i++) {  /* W = sum of codes - 2 * (codes whose bit says -1) */
                __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w0 + i * pstride + c * EP_TILE)));
                b = _mm512_or_si512(b, _mm512_slli_epi32(b, 16));
                for (int p = 0; p < 4; p++) {
                    const __m512i sel = _mm512_set1_epi32((int)((2u << (2 * p)) << 16 | (1u << (2 * p))));
                    v[p] = EP_MASK_SUB16(v[p], _mm512_test_epi16_mask(b, sel), c2[i]);
                }
            }
            for (int p = 0; p < 4; p++) _mm512_store_si512((void *)(buf + ((c - cbase) * 4 + p) * EP_TILE), v[p]);
        }
    }
}

/* Tokens tok0 .. tok0+TB-1 over the widened groups [j0, j1) of tile t (buf from the chunk's
 * first column); DP(e, w, x) adds w . x per 32-bit lane (two int16 products). */
#define EP_I16_BLOCK512(NAME, DP)                                                                             \
    EP_INLINE void NAME(const ep_gemm_args *a, const int32_t *buf, int64_t t, int64_t tok0, const int TB,      \
                        int64_t j0, int64_t j1) {                                                             \
        const int64_t cbase = ep_group_col0(a, j0);                                                           \
        const __m512 m = _mm512_loadu_ps(a->scale_rows + t * EP_TILE);                                        \
        const int32_t *x = (const int32_t *)(a->x16 + tok0 * a->in_pad); /* pair p at x[p] */                 \
        const int64_t xs = a->in_pad / 2;                                                                     \
        __m512 f[EP_I16_TB];                                                                                  \
        load_acc512(a, t, tok0, TB, f, j0 == 0);                                                              \
        for (int64_t j = j0; j < j1; j++) {                                                                   \
            int64_t c0, c1;                                                                                   \
            ep_group_cols(a, j, &c0, &c1);                                                                    \
            __m512i e[EP_I16_TB];                                                                             \
            for (int b = 0; b < TB; b++) e[b] = _mm512_setzero_si512();                                       \
            for (int64_t p = c0 * 4; p < c1 * 4; p++) {                                                       \
                const __m512i w = _mm512_load_si512((const void *)(buf + (p - cbase * 4) * EP_TILE));         \
                for (int b = 0; b < TB; b++) e[b] = DP(e[b], w, _mm512_set1_epi32(x[b * xs + p]));            \
            }                                                                                                 \
            for (int b = 0; b < TB; b++) f[b] = ep_fmadd512(m, _mm512_cvtepi32_ps(e[b]), f[b]);               \
        }                                                                                                     \
        store_acc512(a, t, tok0, TB, f, j1 == a->ng);                                                         \
    }

#define EP_DP_MADD(e, w, x) _mm512_add_epi32(e, EP_MADD16(w, x))
EP_I16_BLOCK512(i16_block512, EP_DP_MADD)

static void avx512_i16_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    _Alignas(64) int32_t buf[EP_I16_CHUNK / 2 * EP_TILE];
    EP_I16_LOOP(a, t0, t1, buf, EP_I16_TB, widen_codes512, i16_block512);
}

/* Attention: x86_avx2.c's 256-bit code compiled again here, where AVX-512VL gives it 32 vector
 * registers (ep_attend_x86.h). */
static void ep_avx512_attend(const float *q, int64_t G, const void *k, const void *v, int flags, int64_t kstride,
                             int64_t T, int64_t hd, float scale, float *out, float *scratch);
EP_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#define EP_ATTEND_WIDE 1
#define EP_ATTEND_FN ep_avx512_attend
#include "ep_attend_x86.h"
#undef EP_ATTEND_FN
EP_TARGET_POP()

EP_TARGET_POP()

/* ---- AVX-512 with VNNI, VBMI and BITALG (Ice Lake, Zen 4 and later): "avx512vnni" ----------
 *
 * The byte sums of a tile come out of the lookups (i8) or of vpopcntb (xnor) with lane q of a
 * vector holding byte column q's 16 rows.  vpermb regroups them so that dword r holds row r's
 * four bytes, and vpdpbusd adds those into row r's int32 sum: one permute and one dot product
 * per run of blocks instead of widening through int16 and summing quarters.  With several
 * tokens (prefill) the i8 kernel reorders the weights instead, once for all of them, and looks
 * up with vpermb, so the sums come out in row order (row_nibbles512).
 *   i8:   2m_r += L-bytes . 2 + 32 . H-bytes (H signed), exactly twice the sum over set bits of
 *         q = 16h + l (the float pass wants S - 2m);
 *   xnor: m_r += popcount bytes of (weights ^ activations) . 1.
 * Same integers, same float pass, same results as ref.c, bit for bit. */
EP_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512bitalg,avx2,fma")

static int avx512vnni_supported(void) {
    return avx512_supported() && EP_CPU_SUPPORTS("avx512vnni") && EP_CPU_SUPPORTS("avx512vbmi") &&
           EP_CPU_SUPPORTS("avx512bitalg");
}

/* vpermb indices: byte 4r + q <- byte 16q + r (row r of column q) */
static const uint8_t rows_by_dword[64] = {
    0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21, 37, 53,
    6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
    12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};

/* The float pass of one (plane, group) for TB tokens: f += alpha * (S - 2m), as the spec; `twice`:
 * m holds 2m already. */
EP_INLINE void fma_group(const ep_gemm_args *a, int64_t i, int64_t t, int64_t j, int64_t tok0, const int TB,
                         const __m512i *m, __m512i *e, __m512 *f, int twice) {
    __m512i d[4];
    for (int b = 0; b < TB; b++)
        d[b] = _mm512_sub_epi32(_mm512_set1_epi32(a->gsum[(tok0 + b) * a->ng + j]), twice ? m[b] : _mm512_slli_epi32(m[b], 1));
    plane_pass512(a, ep_scale_index(a, i, t, j), t, TB, d, e, f);
}

#define EP_PREFETCH_BYTES 16384  /* how far ahead in a plane a decode step asks for weights */
#define EP_DECODE_L1_TABLES 16384  /* up to here a token's tables stay in L1 beside the weights */
#define EP_DECODE_TILES 2        /* tiles a one-token product walks side by side, sharing table loads */
#define EP_DECODE_AHEAD 8192     /* how far ahead in each of those tiles it asks for weights */

/* A 64-byte weight vector (byte 16q + r: column q, row r) in row order (byte 4r + q), split
 * into vpermb indices: 16q + the low nibble, 16q + the high nibble.  Table vector lane q serves
 * column q (load_tables_pair), so index 16q + n picks column q's entry n from the whole vector. */
EP_INLINE void row_nibbles512(__m512i v, __m512i perm, __m512i *lo, __m512i *hi) {
    const __m512i m0f = _mm512_set1_epi8(0x0f), col = _mm512_set1_epi32(0x30201000);
    v = _mm512_permutexvar_epi8(perm, v);
    *lo = _mm512_ternarylogic_epi32(v, m0f, col, 0xEA);                       /* (v & 0f) | col */
    *hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), m0f, col, 0xEA);
}

/* One tile's row-ordered indices (row_nibbles512) of a pair of blocks looked up in one token's
 * tables t (load_tables_pair): m2 += L . 2 + 32 . H per row, twice the spec's m (the float pass
 * then needs no doubling).  Each dword already holds one row's 4 columns, so the sums go straight
 * into vpdpbusd.  L bytes <= 4 * 60, H bytes in [-128, 112]. */
EP_INLINE void vnni_i8_lookup_add(const __m512i *t, __m512i lo0, __m512i hi0, __m512i lo1, __m512i hi1, int two,
                                  __m512i *m) {
    __m512i l = _mm512_add_epi8(_mm512_permutexvar_epi8(lo0, t[0]), _mm512_permutexvar_epi8(hi0, t[1]));
    __m512i h = _mm512_add_epi8(_mm512_permutexvar_epi8(lo0, t[2]), _mm512_permutexvar_epi8(hi0, t[3]));
    if (two) {
        l = _mm512_add_epi8(l, _mm512_add_epi8(_mm512_permutexvar_epi8(lo1, t[4]), _mm512_permutexvar_epi8(hi1, t[5])));
        h = _mm512_add_epi8(h, _mm512_add_epi8(_mm512_permutexvar_epi8(lo1, t[6]), _mm512_permutexvar_epi8(hi1, t[7])));
    }
    *m = _mm512_dpbusd_epi32(*m, l, _mm512_set1_epi8(2));
    *m = _mm512_dpbusd_epi32(*m, _mm512_set1_epi8(32), h);
}

/* The same sums for one token from weights in their stored order (nibbles512): vpshufb lookups,
 * then the sums put in row order.  Decode loads each weight once, so reordering the weights
 * (one vpermb each) saves nothing there; the A/B measured it slower. */
EP_INLINE void vnni_i8_lookup_add_stored(const __m512i *t, __m512i lo0, __m512i hi0, __m512i lo1, __m512i hi1,
                                         int two, __m512i perm, __m512i *m) {
    __m512i al, ah;
    lookup_pair_regs(t, lo0, hi0, lo1, hi1, two, &al, &ah);
    *m = _mm512_dpbusd_epi32(*m, _mm512_permutexvar_epi8(perm, al), _mm512_set1_epi8(2));
    *m = _mm512_dpbusd_epi32(*m, _mm512_set1_epi8(32), _mm512_permutexvar_epi8(perm, ah));
}

/* One pair of 32-input blocks (byte columns cc..cc+7; the second only when `two`) of one plane
 * for TB tokens: the weights loaded and reordered once, each token's tables looked up. */
EP_INLINE void vnni_i8_pair(const uint8_t *w, const uint8_t *tab, int64_t ts, int64_t cc, const int TB, int two,
                            __m512i perm, __m512i *m) {
    if (TB == 1) {  /* decode: the weights stream from DRAM, the hardware prefetcher alone lags */
        _mm_prefetch((const char *)(w + cc * EP_TILE + EP_PREFETCH_BYTES), _MM_HINT_T1);
        _mm_prefetch((const char *)(w + cc * EP_TILE + EP_PREFETCH_BYTES + 64), _MM_HINT_T1);
    }
    __m512i lo0, hi0, lo1, hi1, t[8];
    if (TB == 1) {
        nibbles512(_mm512_loadu_si512((const void *)(w + cc * EP_TILE)), &lo0, &hi0);
        lo1 = lo0, hi1 = hi0;
        if (two) nibbles512(_mm512_loadu_si512((const void *)(w + (cc + 4) * EP_TILE)), &lo1, &hi1);
        load_tables_pair(tab + cc * 64, two, t);
        vnni_i8_lookup_add_stored(t, lo0, hi0, lo1, hi1, two, perm, &m[0]);
        return;
    }
    row_nibbles512(_mm512_loadu_si512((const void *)(w + cc * EP_TILE)), perm, &lo0, &hi0);
    lo1 = lo0, hi1 = hi0;
    if (two) row_nibbles512(_mm512_loadu_si512((const void *)(w + (cc + 4) * EP_TILE)), perm, &lo1, &hi1);
    for (int b = 0; b < TB; b++) {
        load_tables_pair(tab + b * ts + cc * 64, two, t);
        vnni_i8_lookup_add(t, lo0, hi0, lo1, hi1, two, &m[b]);
    }
}

/* Groups [j, jfast) of GB blocks each (GB > 0), planes k: IS, integer 8-bit scales whose D fit
 * int16 (short_groups), e += code * D in one vpdpwssd (lane (code, 0)); else f += alpha * D.
 * Specialized on IS so that neither branch sits in the loop (a decode step measured 16% slower
 * with the choice made per plane).  Returns jfast. */
EP_INLINE int64_t vnni_i8_groups(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j, int64_t jfast,
                                 const int GB, int64_t k, __m512i perm, __m512i *e, __m512 *f, const int IS) {
    const uint8_t *tab = a->tab + tok0 * a->tab_stride;
    const int64_t ts = a->tab_stride;
    const int64_t pstride = ep_plane_stride(a);
    const int64_t sstride = a->tiles * a->ng * EP_TILE;     /* scales between planes */
    const uint8_t *w0 = ep_tile_planes(a, t);
    const __m512 rows = IS ? _mm512_loadu_ps(a->scale_rows + t * EP_TILE) : _mm512_setzero_ps();
    for (; j < jfast; j++) {
        const int64_t cc = j * 4 * GB, sidx = ep_scale_index(a, 0, t, j);
        for (int64_t i = 0; i < k; i++) {
            __m512i m[4];
            for (int b = 0; b < TB; b++) m[b] = _mm512_setzero_si512();
            for (int u = 0; u < GB; u += 2) vnni_i8_pair(w0 + i * pstride, tab, ts, cc + 4 * u, TB, GB > 1, perm, m);
            if (IS) {
                const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + sidx + i * sstride)));
                for (int b = 0; b < TB; b++)
                    e[b] = _mm512_dpwssd_epi32(e[b], _mm512_sub_epi32(_mm512_set1_epi32(a->gsum[(tok0 + b) * a->ng + j]), m[b]), c);
            } else {
                const __m512 alpha = scales_at512(a, sidx + i * sstride, t);
                for (int b = 0; b < TB; b++) {
                    __m512i d = _mm512_sub_epi32(_mm512_set1_epi32(a->gsum[(tok0 + b) * a->ng + j]), m[b]);
                    f[b] = ep_fmadd512(alpha, _mm512_cvtepi32_ps(d), f[b]);
                }
            }
        }
        if (IS)
            for (int b = 0; b < TB; b++) {
                f[b] = ep_fmadd512(rows, _mm512_cvtepi32_ps(e[b]), f[b]);
                e[b] = _mm512_setzero_si512();
            }
    }
    return j;
}

/* The 8 table vectors of a pair held in registers: without this the compiler folds each load into
 * every vpermb that reads it, loading the tables once per plane. */
#if defined(__GNUC__) && !defined(EP_SIMDE)
#define EP_KEEP_IN_REGISTERS(v) \
    __asm__("" : "+v"(v[0]), "+v"(v[1]), "+v"(v[2]), "+v"(v[3]), "+v"(v[4]), "+v"(v[5]), "+v"(v[6]), "+v"(v[7]))
#else
#define EP_KEEP_IN_REGISTERS(v) ((void)0)
#endif

/* Groups [j, jfast) of two blocks (group 64), float scales, K planes (1 or 2), TB > 1 tokens:
 * vnni_i8_groups with the loops turned round, so that each token's tables are loaded once a group
 * and looked up by every plane from registers.  The planes-inner order kept the K planes' tables
 * for all TB tokens live, more than the 32 registers hold, and the compiler copied them through
 * the stack: a store and a reload of every table vector, which bounded the kernel (Zen 4).  Here
 * the live set is the K planes' indices (4K), one token's tables (8), f (TB) and the scales (K).
 * The float pass adds each (group, plane) into f in the same order, so the results are the same
 * bits.  Returns jfast. */
EP_INLINE int64_t vnni_i8_groups_tok(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j,
                                     int64_t jfast, const int K, __m512i perm, __m512 *f) {
    const uint8_t *tab = a->tab + tok0 * a->tab_stride;
    const int64_t ts = a->tab_stride, pstride = ep_plane_stride(a);
    const int64_t sstride = a->tiles * a->ng * EP_TILE;
    const int32_t *gsum = a->gsum + tok0 * a->ng;
    const uint8_t *w0 = ep_tile_planes(a, t);
    for (; j < jfast; j++) {
        const int64_t cc = j * 8, sidx = ep_scale_index(a, 0, t, j);
        __m512i lo0[2], hi0[2], lo1[2], hi1[2];
        __m512 alpha[2];
        for (int i = 0; i < K; i++) {
            const uint8_t *w = w0 + i * pstride + cc * EP_TILE;
            row_nibbles512(_mm512_loadu_si512((const void *)w), perm, &lo0[i], &hi0[i]);
            row_nibbles512(_mm512_loadu_si512((const void *)(w + 4 * EP_TILE)), perm, &lo1[i], &hi1[i]);
            /* -alpha times (2m - S) is alpha times (S - 2m), exactly: the sums start at -S */
            alpha[i] = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(scales_at512(a, sidx + i * sstride, t)),
                                                            _mm512_set1_epi32((int)0x80000000u)));
        }
        for (int b = 0; b < TB; b++) {
            __m512i tb[8];
            load_tables_pair(tab + b * ts + cc * 64, 1, tb);
            EP_KEEP_IN_REGISTERS(tb);
            const __m512i neg_s = _mm512_set1_epi32(-gsum[b * a->ng + j]);
            for (int i = 0; i < K; i++) {
                __m512i m = neg_s;
                vnni_i8_lookup_add(tb, lo0[i], hi0[i], lo1[i], hi1[i], 1, &m);
                f[b] = ep_fmadd512(alpha[i], _mm512_cvtepi32_ps(m), f[b]);
            }
        }
    }
    return j;
}

/* GB > 0: every group but the last is GB blocks (unrolled, pointers stepped); the last group
 * and GB == 0 take the general path.  K > 0: the plane count, known at compile time. */
EP_INLINE void vnni_i8_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, int64_t j1,
                            const int GB, const int K) {
    const __m512i perm = _mm512_loadu_si512((const void *)rows_by_dword);
    const uint8_t *tab = a->tab + tok0 * a->tab_stride;
    const int64_t ts = a->tab_stride, k = K ? K : a->k;
    const int64_t pstride = ep_plane_stride(a);
    const uint8_t *w0 = ep_tile_planes(a, t);
    __m512 f[4];
    __m512i e[4];
    start_tile512(a, t, tok0, TB, j0, f, e);
    const int64_t jfast = GB > 0 ? ep_min64(j1, a->ng - 1) : j0;
    int64_t j = j0;
    if (GB > 0 && a->int_scales && a->short_groups)
        j = vnni_i8_groups(a, t, tok0, TB, j, jfast, GB, k, perm, e, f, 1);
    else if (GB == 2 && TB > 1 && (K == 1 || K == 2) && !a->int_scales)  /* the last group too when whole */
        j = vnni_i8_groups_tok(a, t, tok0, TB, j, a->ncol == a->ng * 8 ? j1 : jfast, K, perm, f);
    else if (GB > 0)
        j = vnni_i8_groups(a, t, tok0, TB, j, jfast, GB, k, perm, e, f, 0);
    for (; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        for (int64_t i = 0; i < k; i++) {
            __m512i m[4];
            for (int b = 0; b < TB; b++) m[b] = _mm512_setzero_si512();
            for (int64_t cc = c0; cc < c1; cc += 8) vnni_i8_pair(w0 + i * pstride, tab, ts, cc, TB, cc + 4 < c1, perm, m);
            fma_group(a, i, t, j, tok0, TB, m, e, f, 1);
        }
        group_pass512(a, t, TB, e, f);
    }
    store_acc512(a, t, tok0, TB, f, j1 == a->ng);
}

/* Decode (one token): R adjacent tiles share each table load.  One tile reads 4 bytes of tables
 * per byte of weights; with wide rows the tables (8 bytes an input) live in L2, and that traffic,
 * not the lookups, bounded the kernel.  Same integers and float order per row as vnni_i8_tile. */
EP_INLINE void vnni_i8_pair_rows(const uint8_t *w, int64_t tstride, const uint8_t *T, int64_t cc, const int R,
                                 int two, __m512i perm, __m512i *m) {
    __m512i t[8];
    load_tables_pair(T, two, t);
    /* ask L2 for each tile's weights EP_DECODE_AHEAD bytes ahead; past its end, the same place in
     * the tile R on (the next pass) */
    const int64_t ahead = cc * EP_TILE + EP_DECODE_AHEAD < tstride ? EP_DECODE_AHEAD : EP_DECODE_AHEAD + (R - 1) * tstride;
    for (int r = 0; r < R; r++) {
        const uint8_t *wr = w + r * tstride + cc * EP_TILE;
        _mm_prefetch((const char *)(wr + ahead), _MM_HINT_T1);
        _mm_prefetch((const char *)(wr + ahead + 64), _MM_HINT_T1);
        __m512i lo0, hi0, lo1, hi1;
        nibbles512(_mm512_loadu_si512((const void *)wr), &lo0, &hi0);
        lo1 = lo0, hi1 = hi0;
        if (two) nibbles512(_mm512_loadu_si512((const void *)(wr + 64)), &lo1, &hi1);
        vnni_i8_lookup_add_stored(t, lo0, hi0, lo1, hi1, two, perm, &m[r]);
    }
}

/* One plane (the only case that takes this path), R tiles from tile t, one token. */
EP_INLINE void vnni_i8_rows(const ep_gemm_args *a, int64_t t, const int R, const int GB) {
    const __m512i perm = _mm512_loadu_si512((const void *)rows_by_dword);
    const int64_t tstride = a->ncol * EP_TILE;
    const uint8_t *w0 = a->planes + t * tstride;
    __m512 f[4];
    for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
    const int64_t jfast = GB > 0 ? a->ng - 1 : 0;
    for (int64_t j = 0; j < a->ng; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        __m512i m[4];
        for (int r = 0; r < R; r++) m[r] = _mm512_setzero_si512();
        if (j < jfast)
            for (int u = 0; u < GB; u += 2)
                vnni_i8_pair_rows(w0, tstride, a->tab + (c0 + 4 * u) * 64, c0 + 4 * u, R, GB > 1, perm, m);
        else
            for (int64_t cc = c0; cc < c1; cc += 8)
                vnni_i8_pair_rows(w0, tstride, a->tab + cc * 64, cc, R, cc + 4 < c1, perm, m);
        for (int r = 0; r < R; r++) {  /* one plane: int_scales is the same pass with alpha's product exact */
            __m512i d = _mm512_sub_epi32(_mm512_set1_epi32(a->gsum[j]), m[r]), e = _mm512_setzero_si512();
            plane_pass512(a, ep_scale_index(a, 0, t + r, j), t + r, 1, &d, &e, &f[r]);
            group_pass512(a, t + r, 1, &e, &f[r]);
        }
    }
    for (int r = 0; r < R; r++) store_acc512(a, t + r, 0, 1, &f[r], 1);
}

#define VNNI_I8_K(a, t, tok0, TB, j0, j1, GB)                          \
    switch (kk) {                                                     \
    case 1: vnni_i8_tile(a, t, tok0, TB, j0, j1, GB, 1); break;       \
    case 2: vnni_i8_tile(a, t, tok0, TB, j0, j1, GB, 2); break;       \
    case 3: vnni_i8_tile(a, t, tok0, TB, j0, j1, GB, 3); break;       \
    case 4: vnni_i8_tile(a, t, tok0, TB, j0, j1, GB, 4); break;       \
    default: vnni_i8_tile(a, t, tok0, TB, j0, j1, GB, 0); break;      \
    }

static void avx512vnni_i8_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
#if defined(EP_SIMDE)  /* emulated builds check the logic, not the speed: one plane-count path compiles 5x faster */
    const int gb = ep_blocks_per_group(a), kk = 0;
#else
    const int gb = ep_blocks_per_group(a), kk = a->k <= 4 ? (int)a->k : 0;
#endif
    /* decode, one plane, wide rows: the tables live in L2 and are read 4x the weights' bytes (with
     * more planes each group's tables are reread from L1), so tiles side by side share each load */
    if (a->n == 1 && a->k == 1 && a->tab_stride > EP_DECODE_L1_TABLES) {
        int64_t t = t0;
        for (; t + EP_DECODE_TILES <= t1; t += EP_DECODE_TILES) EP_SWITCH_GB(vnni_i8_rows, a, t, EP_DECODE_TILES);
        for (; t < t1; t++) EP_SWITCH_GB(vnni_i8_rows, a, t, 1);
        return;
    }
#define CALL(TB) EP_SWITCH_GB(VNNI_I8_K, a, t, tok0, TB, j0, j1)
    EP_TILE_LOOP(a, t0, t1, 8, CALL);
#undef CALL
}
#undef VNNI_I8_K

/* xnor tables: per 32 inputs (byte columns c..c+3) one vector, lane q = byte c+q of the
 * activation signs (padding cleared), 16 times. */
static void avx512vnni_xnor_tables(const uint8_t *bits, int64_t in, int64_t group, uint8_t *tab, int32_t *nvalid) {
    const int64_t ncol = ep_in_pad(in) / 8;
    for (int64_t c = 0; c < ncol; c += 4) {
        __m512i A = bytes_per_lane(bits[c] & ep_valid_bits(in, c), bits[c + 1] & ep_valid_bits(in, c + 1),
                                   bits[c + 2] & ep_valid_bits(in, c + 2), bits[c + 3] & ep_valid_bits(in, c + 3));
        _mm512_store_si512((void *)(tab + c * 16), A);
    }
    ep_ref_group_valid(in, group, nvalid);
}

/* Byte counts of differing bits over blocks [cc, ce) (<= 31 blocks: <= 248 per byte) into m. */
EP_INLINE void vnni_xnor_run(const ep_gemm_args *a, const uint8_t *w, const uint8_t *tab, int64_t ts, int64_t cc,
                             int64_t ce, const int TB, int masked, __m512i perm, __m512i *m) {
    const __m512i ones = _mm512_set1_epi8(1);
    const int64_t cfull = (a->in / 32) * 4;  /* blocks from here on hold padding inputs */
    __m512i s[4];
    for (int b = 0; b < TB; b++) s[b] = _mm512_setzero_si512();
    for (; cc < ce; cc += 4) {  /* (prefetching here measured slower, in cache and from DRAM) */
        __m512i v = _mm512_loadu_si512((const void *)(w + cc * EP_TILE));
        if (masked && cc >= cfull)  /* the weights' padding bits must not count */
            v = _mm512_and_si512(v, bytes_per_lane(ep_valid_bits(a->in, cc), ep_valid_bits(a->in, cc + 1),
                                                   ep_valid_bits(a->in, cc + 2), ep_valid_bits(a->in, cc + 3)));
        for (int b = 0; b < TB; b++)
            s[b] = _mm512_add_epi8(s[b], _mm512_popcnt_epi8(_mm512_xor_si512(v, _mm512_load_si512((const void *)(tab + b * ts + cc * 16)))));
    }
    for (int b = 0; b < TB; b++) m[b] = _mm512_dpbusd_epi32(m[b], _mm512_permutexvar_epi8(perm, s[b]), ones);
}

/* GB > 0: every group but the last is GB blocks, unrolled with pointers stepped, and its row
 * sums come out of one vpdpbusd as S - 2m directly (the popcount bytes times -2 added onto the
 * valid count: exact integers); the last group and GB == 0 take the general path. */
EP_INLINE void vnni_xnor_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, int64_t j1,
                              const int GB) {
    const __m512i perm = _mm512_loadu_si512((const void *)rows_by_dword), minus2 = _mm512_set1_epi8(-2);
    const uint8_t *tab = a->tab + tok0 * a->tab_stride;
    const int64_t ts = a->tab_stride;
    const int64_t pstride = ep_plane_stride(a);
    const int64_t sstride = a->tiles * a->ng * EP_TILE;     /* scales between planes */
    const uint8_t *w0 = ep_tile_planes(a, t);
    __m512 f[4];
    __m512i e[4];
    start_tile512(a, t, tok0, TB, j0, f, e);
    const int64_t jfast = GB > 0 ? ep_min64(j1, a->ng - 1) : j0;
    int64_t j = j0;
    for (; j < jfast; j++) {
        const int64_t cc = j * 4 * GB, sidx = ep_scale_index(a, 0, t, j);
        const int32_t *gs = a->gsum + tok0 * a->ng + j;
        for (int64_t i = 0; i < a->k; i++) {
            const uint8_t *w = w0 + i * pstride + cc * EP_TILE;
            __m512i s[4];
            if (TB == 1)  /* decode: ask L2 for the weights ahead, the hardware prefetcher alone lags */
                for (int u = 0; u < GB; u++) _mm_prefetch((const char *)(w + EP_PREFETCH_BYTES + u * 64), _MM_HINT_T1);
            const __m512i v0 = _mm512_loadu_si512((const void *)w);
            for (int b = 0; b < TB; b++)
                s[b] = _mm512_popcnt_epi8(_mm512_xor_si512(v0, _mm512_load_si512((const void *)(tab + b * ts + cc * 16))));
            for (int u = 1; u < GB; u++) {
                const __m512i v = _mm512_loadu_si512((const void *)(w + u * 64));
                for (int b = 0; b < TB; b++)
                    s[b] = _mm512_add_epi8(s[b], _mm512_popcnt_epi8(_mm512_xor_si512(
                                                     v, _mm512_load_si512((const void *)(tab + b * ts + (cc + 4 * u) * 16)))));
            }
            for (int b = 0; b < TB; b++)
                s[b] = _mm512_dpbusd_epi32(_mm512_set1_epi32(gs[b * a->ng]), _mm512_permutexvar_epi8(perm, s[b]), minus2);
            plane_pass512(a, sidx + i * sstride, t, TB, s, e, f);
        }
        group_pass512(a, t, TB, e, f);
    }
    for (; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        for (int64_t i = 0; i < a->k; i++) {
            const uint8_t *w = w0 + i * pstride;
            __m512i m[4];
            if (TB == 1)  /* decode: this group's weights ahead too (with narrow rows the last group is 1/16 of them) */
                for (int64_t c = c0; c < c1; c += 4) _mm_prefetch((const char *)(w + c * EP_TILE + EP_PREFETCH_BYTES), _MM_HINT_T1);
            for (int b = 0; b < TB; b++) m[b] = _mm512_setzero_si512();
            for (int64_t c = c0; c < c1; c += 120)  /* runs of 30 blocks */
                vnni_xnor_run(a, w, tab, ts, c, ep_min64(c + 120, c1), TB, 1, perm, m);
            fma_group(a, i, t, j, tok0, TB, m, e, f, 0);
        }
        group_pass512(a, t, TB, e, f);
    }
    store_acc512(a, t, tok0, TB, f, j1 == a->ng);
}

static void avx512vnni_xnor_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    const int gb = ep_blocks_per_group(a);
#define CALL(TB) EP_SWITCH_GB(vnni_xnor_tile, a, t, tok0, TB, j0, j1)
    EP_TILE_LOOP(a, t0, t1, 2, CALL);
#undef CALL
}

EP_I16_BLOCK512(vnni_i16_block, _mm512_dpwssd_epi32)

static void avx512vnni_i16_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    _Alignas(64) int32_t buf[EP_I16_CHUNK / 2 * EP_TILE];
    EP_I16_LOOP(a, t0, t1, buf, EP_I16_TB, widen_codes512, vnni_i16_block);
}

EP_TARGET_POP()

/* activations and the dense helpers are the AVX2 versions: memory-bound, or too small to gain */
const ep_kernels ep_kernels_avx512bw = {
    .name = "avx512bw",
    .supported = avx512_supported,
    .quantize_i8 = ep_avx2_quantize_i8,
    .binarize = ep_avx2_binarize,
    .i8_tables = avx512_i8_tables,
    .xnor_tables = avx512_xnor_tables,
    .i8_tiles = avx512_i8_tiles,
    .i16_tiles = avx512_i16_tiles,
    /* by k: where it measured >= 1.05x the lookups (Xeon 207, 1536 x 576, group 64): k = 1 never
     * (0.8x at 64 tokens); k = 2 1.17x at 8; k = 3 1.09x at 4; k = 4 1.21x at 4, 0.99x at 3 */
    .i16_min_tokens = {0, 0, 8, 4, 4},
    .xnor_tiles = avx512_xnor_tiles,
    .dense_rows = ep_avx2_dense_rows,
    .i8_rows = ep_avx2_i8_rows,
    .dot = ep_avx2_dot,
    .attend = ep_avx512_attend,
    .to_half = ep_avx2_to_half,
    .rotate_row = ep_avx2_rotate_row,
    .silu_mul = ep_avx2_silu_mul,
    .lookup16_u16 = ep_avx2_lookup16_u16,
    .lookup16_f32 = ep_avx2_lookup16_f32,
    .plane_sums = ep_avx2_plane_sums,
};

const ep_kernels ep_kernels_avx512vnni = {
    .name = "avx512vnni",
    .supported = avx512vnni_supported,
    .quantize_i8 = ep_avx2_quantize_i8,
    .binarize = ep_avx2_binarize,
    .i8_tables = avx512_i8_tables,
    .xnor_tables = avx512vnni_xnor_tables,
    .i8_tiles = avx512vnni_i8_tiles,
    .i16_tiles = avx512vnni_i16_tiles,
    /* by k, as avx512bw's: k = 1 never (0.58x at 64 tokens); k = 2 1.06x at 32, 0.93x at 16;
     * k = 3 1.10x at 12, 0.96x at 10; k = 4 1.17x at 8, 0.98x at 6 */
    .i16_min_tokens = {0, 0, 32, 12, 8},
    .xnor_tiles = avx512vnni_xnor_tiles,
    .dense_rows = ep_avx2_dense_rows,
    .i8_rows = ep_avx2_i8_rows,
    .dot = ep_avx2_dot,
    .attend = ep_avx512_attend,
    .to_half = ep_avx2_to_half,
    .rotate_row = ep_avx2_rotate_row,
    .silu_mul = ep_avx2_silu_mul,
    .lookup16_u16 = ep_avx2_lookup16_u16,
    .lookup16_f32 = ep_avx2_lookup16_f32,
    .plane_sums = ep_avx2_plane_sums,
};
