/* x86-64 AVX2 kernels (with FMA).  Same results as ref.c, bit for bit.
 *
 * k planes x int8 activations, T-MAC style: per token and per 4 inputs, 16-entry tables of the
 * masked sums of the activations (one table serves every plane and every row); a plane byte of a
 * tile holds two 4-input nibbles of one row, and one vpshufb looks up 32 of them.  The int8
 * activation x = 16*h + l is split into l in [0,15] and h in [-8,7] so each table fits in bytes
 * exactly.  Tables per 16 inputs (byte columns c, c+1), four 32-byte vectors, halves c | c+1:
 *   [L lo-nibble] [L hi-nibble] [H lo-nibble] [H hi-nibble]
 * Accumulation widths: a 32-input block sums 4 lookups per byte lane (l <= 240, h in [-128,112]),
 * then l + 16*(h+128) <= 4080 goes into int16 for at most 8 blocks, then int32.
 *
 * xnor: per 16 inputs two 32-byte tables of popcount((nibble ^ activation nibble) & valid). */
#include <math.h>
#include <string.h>

#include "ep_simd_x86.h"
#include "ep_internal.h"

EP_TARGET_PUSH("avx2,fma")

static int avx2_supported(void) { return EP_CPU_SUPPORTS("avx2") && EP_CPU_SUPPORTS("fma"); }

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
    for (; j < in; j++) {  /* the same rule as the vector loop, one element at a time */
        float f = nearbyintf(x[j] * inv_s);
        if (f != f) f = 0.0f;
        if (f > 127.0f) f = 127.0f;
        if (f < -127.0f) f = -127.0f;
        q[j] = (int8_t)f;
    }
    *scale = amax / 127.0f;
}

void ep_avx2_binarize(const float *x, int64_t in, uint8_t *bits, float *scale) {
    const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
    int64_t nbytes = ep_padded_in(in) / 8;
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
    const int64_t in_pad = ep_padded_in(in);
    const __m128i m0f = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m256i mask[4], pick[4];
    for (int b = 0; b < 4; b++) {
        mask[b] = nibble_bit_mask(b);
        pick[b] = _mm256_setr_m128i(_mm_set1_epi8((char)b), _mm_set1_epi8((char)(8 + b)));
    }
    const __m256i four = _mm256_set1_epi8(4);
    for (int64_t j = 0; j < in_pad; j += 16) {
        __m128i x16;
        if (j + 16 <= in) {
            x16 = _mm_loadu_si128((const __m128i *)(q + j));
        } else {
            int8_t tmp[16] = {0};
            if (j < in) memcpy(tmp, q + j, (size_t)(in - j));
            x16 = _mm_loadu_si128((const __m128i *)tmp);
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
        __m256i *dst = (__m256i *)(tab + j * 8);
        for (int u = 0; u < 4; u++) _mm256_store_si256(dst + u, t[u]);
    }
    ep_ref_group_sums(q, in, group, gsum);
}

EP_INLINE __m256i sum_halves_epi16(__m256i s) {
    return _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s, 1)));
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

/* Groups [j0, j1) of tile t for tokens tok0 .. tok0+TB-1. */
EP_INLINE void i8_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, int64_t j1) {
    const __m256i m0f = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8((char)0x80);
    const __m256i mul = _mm256_set1_epi16(0x1001);  /* bytes (1, 16): l + 16*h' */
    __m256 f[4][2];
    load_acc(a, t, tok0, TB, f, j0 == 0);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        for (int64_t i = 0; i < a->k; i++) {
            const uint8_t *w = a->planes + (i * a->tiles + t) * a->ncol * EP_TILE;
            __m256i m[4][2];
            for (int b = 0; b < TB; b++) m[b][0] = m[b][1] = _mm256_setzero_si256();
            for (int64_t c = c0; c < c1; c += 32) {
                const int64_t ce = ep_min64(c + 32, c1);
                __m256i s[4][2];
                for (int b = 0; b < TB; b++) s[b][0] = s[b][1] = _mm256_setzero_si256();
                for (int64_t cc = c; cc < ce; cc += 4) {
                    __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + cc * EP_TILE));
                    __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + (cc + 2) * EP_TILE));
                    __m256i lo0 = _mm256_and_si256(v0, m0f), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m0f);
                    __m256i lo1 = _mm256_and_si256(v1, m0f), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m0f);
                    for (int b = 0; b < TB; b++) {
                        const __m256i *T = (const __m256i *)(a->tab + (tok0 + b) * a->tab_stride + cc * 64);
                        __m256i al = _mm256_add_epi8(
                            _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 0), lo0),
                                            _mm256_shuffle_epi8(_mm256_load_si256(T + 1), hi0)),
                            _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 4), lo1),
                                            _mm256_shuffle_epi8(_mm256_load_si256(T + 5), hi1)));
                        __m256i ah = _mm256_add_epi8(
                            _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 2), lo0),
                                            _mm256_shuffle_epi8(_mm256_load_si256(T + 3), hi0)),
                            _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 6), lo1),
                                            _mm256_shuffle_epi8(_mm256_load_si256(T + 7), hi1)));
                        ah = _mm256_xor_si256(ah, flip);  /* h + 128: unsigned for vpmaddubsw */
                        s[b][0] = _mm256_add_epi16(s[b][0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(al, ah), mul));
                        s[b][1] = _mm256_add_epi16(s[b][1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(al, ah), mul));
                    }
                }
                const __m256i bias = _mm256_set1_epi32((int)(4096 * ((ce - c) / 4)));
                for (int b = 0; b < TB; b++) {
                    m[b][0] = _mm256_add_epi32(m[b][0], _mm256_sub_epi32(sum_halves_epi16(s[b][0]), bias));
                    m[b][1] = _mm256_add_epi32(m[b][1], _mm256_sub_epi32(sum_halves_epi16(s[b][1]), bias));
                }
            }
            const float *alpha = a->scales + ((i * a->tiles + t) * a->ng + j) * EP_TILE;
            const __m256 al0 = _mm256_loadu_ps(alpha), al1 = _mm256_loadu_ps(alpha + 8);
            for (int b = 0; b < TB; b++) {
                const __m256i S = _mm256_set1_epi32(a->gsum[(tok0 + b) * a->ng + j]);
                __m256i d0 = _mm256_sub_epi32(S, _mm256_slli_epi32(m[b][0], 1));
                __m256i d1 = _mm256_sub_epi32(S, _mm256_slli_epi32(m[b][1], 1));
                f[b][0] = ep_fmadd256(al0, _mm256_cvtepi32_ps(d0), f[b][0]);
                f[b][1] = ep_fmadd256(al1, _mm256_cvtepi32_ps(d1), f[b][1]);
            }
        }
    }
    store_acc(a, t, tok0, TB, f, j1 == a->ng);
}

/* Groups per chunk, so that the tables of a token block stay in a 32 KiB L1 (half of it). */
static int64_t groups_per_chunk(const ep_gemm_args *a, int64_t tb, int64_t bytes_per_input) {
    int64_t g = a->group, cap = 16384 / (tb * bytes_per_input);
    int64_t gpc = cap / g;
    return gpc < 1 ? 1 : gpc;
}

#define EP_TB 4
#define EP_TILE_LOOP(tile_fn, bpi)                                                       \
    const int64_t tbmax = a->n < EP_TB ? a->n : EP_TB;                                   \
    const int64_t gpc = groups_per_chunk(a, tbmax, bpi);                                 \
    for (int64_t j0 = 0; j0 < a->ng; j0 += gpc) {                                        \
        const int64_t j1 = ep_min64(j0 + gpc, a->ng);                                    \
        for (int64_t tok0 = 0; tok0 < a->n; tok0 += EP_TB) {                             \
            const int64_t tb = ep_min64(EP_TB, a->n - tok0);                             \
            for (int64_t t = t0; t < t1; t++) {                                          \
                switch (tb) {                                                            \
                case 4: tile_fn(a, t, tok0, 4, j0, j1); break;                           \
                case 3: tile_fn(a, t, tok0, 3, j0, j1); break;                           \
                case 2: tile_fn(a, t, tok0, 2, j0, j1); break;                           \
                default: tile_fn(a, t, tok0, 1, j0, j1); break;                          \
                }                                                                        \
            }                                                                            \
        }                                                                                \
    }

static void avx2_i8_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) { EP_TILE_LOOP(i8_tile, 8) }

static const uint8_t popcount4[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};

/* Bits of byte column c that are real inputs. */
static inline uint8_t valid_bits(int64_t in, int64_t c) {
    int64_t left = in - 8 * c;
    return left >= 8 ? 0xFF : left <= 0 ? 0 : (uint8_t)((1u << left) - 1);
}

static void avx2_xnor_tables(const uint8_t *bits, int64_t in, int64_t group, uint8_t *tab, int32_t *nvalid) {
    const int64_t ncol = ep_padded_in(in) / 8;
    const __m256i pop = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)popcount4));
    const __m256i idx = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                         0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    for (int64_t c = 0; c < ncol; c += 2) {
        __m256i A = _mm256_setr_m128i(_mm_set1_epi8((char)bits[c]), _mm_set1_epi8((char)bits[c + 1]));
        __m256i V = _mm256_setr_m128i(_mm_set1_epi8((char)valid_bits(in, c)),
                                      _mm_set1_epi8((char)valid_bits(in, c + 1)));
        __m256i alo = _mm256_and_si256(A, m0f), ahi = _mm256_and_si256(_mm256_srli_epi16(A, 4), m0f);
        __m256i vlo = _mm256_and_si256(V, m0f), vhi = _mm256_and_si256(_mm256_srli_epi16(V, 4), m0f);
        __m256i *dst = (__m256i *)(tab + c * 32);
        _mm256_store_si256(dst, _mm256_shuffle_epi8(pop, _mm256_and_si256(_mm256_xor_si256(idx, alo), vlo)));
        _mm256_store_si256(dst + 1, _mm256_shuffle_epi8(pop, _mm256_and_si256(_mm256_xor_si256(idx, ahi), vhi)));
    }
    ep_ref_group_valid(in, group, nvalid);
}

EP_INLINE void xnor_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, int64_t j1) {
    const __m256i m0f = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256 f[4][2];
    load_acc(a, t, tok0, TB, f, j0 == 0);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        for (int64_t i = 0; i < a->k; i++) {
            const uint8_t *w = a->planes + (i * a->tiles + t) * a->ncol * EP_TILE;
            __m256i p[4][2];
            for (int b = 0; b < TB; b++) p[b][0] = p[b][1] = _mm256_setzero_si256();
            for (int64_t c = c0; c < c1; c += 32) {  /* <= 8 blocks: byte counts stay <= 128 */
                const int64_t ce = ep_min64(c + 32, c1);
                __m256i s[4];
                for (int b = 0; b < TB; b++) s[b] = _mm256_setzero_si256();
                for (int64_t cc = c; cc < ce; cc += 4) {
                    __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + cc * EP_TILE));
                    __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + (cc + 2) * EP_TILE));
                    __m256i lo0 = _mm256_and_si256(v0, m0f), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m0f);
                    __m256i lo1 = _mm256_and_si256(v1, m0f), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m0f);
                    for (int b = 0; b < TB; b++) {
                        const __m256i *T = (const __m256i *)(a->tab + (tok0 + b) * a->tab_stride + cc * 32);
                        __m256i x = _mm256_add_epi8(
                            _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 0), lo0),
                                            _mm256_shuffle_epi8(_mm256_load_si256(T + 1), hi0)),
                            _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_load_si256(T + 2), lo1),
                                            _mm256_shuffle_epi8(_mm256_load_si256(T + 3), hi1)));
                        s[b] = _mm256_add_epi8(s[b], x);
                    }
                }
                for (int b = 0; b < TB; b++) {
                    __m256i u0 = _mm256_unpacklo_epi8(s[b], zero), u1 = _mm256_unpackhi_epi8(s[b], zero);
                    p[b][0] = _mm256_add_epi32(p[b][0], sum_halves_epi16(u0));
                    p[b][1] = _mm256_add_epi32(p[b][1], sum_halves_epi16(u1));
                }
            }
            const float *alpha = a->scales + ((i * a->tiles + t) * a->ng + j) * EP_TILE;
            const __m256 al0 = _mm256_loadu_ps(alpha), al1 = _mm256_loadu_ps(alpha + 8);
            for (int b = 0; b < TB; b++) {
                const __m256i nv = _mm256_set1_epi32(a->gsum[(tok0 + b) * a->ng + j]);
                __m256i d0 = _mm256_sub_epi32(nv, _mm256_slli_epi32(p[b][0], 1));
                __m256i d1 = _mm256_sub_epi32(nv, _mm256_slli_epi32(p[b][1], 1));
                f[b][0] = ep_fmadd256(al0, _mm256_cvtepi32_ps(d0), f[b][0]);
                f[b][1] = ep_fmadd256(al1, _mm256_cvtepi32_ps(d1), f[b][1]);
            }
        }
    }
    store_acc(a, t, tok0, TB, f, j1 == a->ng);
}

static void avx2_xnor_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) { EP_TILE_LOOP(xnor_tile, 4) }

EP_TARGET_POP()

const ep_kernels ep_kernels_avx2 = {
    "avx2",          avx2_supported,    ep_avx2_quantize_i8, ep_avx2_binarize,
    avx2_i8_tables,  avx2_xnor_tables,  avx2_i8_tiles,    avx2_xnor_tiles,
};
