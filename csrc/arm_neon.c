/* aarch64 NEON kernels (baseline armv8-a: Raspberry Pi 4 and 5).  Same results as ref.c, bit for bit.
 *
 * k planes x int8 activations: the table lookup of x86_avx2.c with 16-byte vectors, one byte column
 * (8 inputs of a 16-row tile) per load and `tbl` for the lookups.  Tables per byte column, 64 bytes:
 *   [L lo-nibble] [L hi-nibble] [H lo-nibble] [H hi-nibble]
 * Two columns (4 lookups per byte lane: l <= 240, h in [-128,112]) per widening into int16
 * (l + 16*h in [-2048, 2032]), at most 16 widenings (256 inputs) per int16 run.
 *
 * xnor: eor + cnt per byte column; the "tables" are the activation byte and its valid-input mask,
 * each repeated over 16 bytes (32 bytes per column).
 *
 * Two tables, chosen at run time (dispatch.c, best first): "neon_dotprod" on cores with the Armv8.2
 * dot product (Cortex-A76: Raspberry Pi 5), "neon" on every armv8-a core (Cortex-A72: Pi 4).  The
 * file is compiled for plain armv8-a; only functions marked EP_DOTPROD may use sdot/udot, and a Pi 4
 * never calls them (tests/test_c_variants.py disassembles the objects to hold both to that).
 * The dot product serves the int8 x int8 rows (head and embeddings stored as int8): one sdot per
 * 16 bytes against smull + smlal + sadalp.  The plane products gain nothing from it: their byte
 * sums come out of `tbl` one row per byte lane, and bringing four of a row's bytes into one 32-bit
 * lane for sdot (zip or tbl4 transposes) costs the instructions it saves (docs/arm64.md). */
#if !defined(__aarch64__)
#error "arm_neon.c is for aarch64 only"
#endif
#include <arm_neon.h>
#include <math.h>
#include <string.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif

#include "ep_internal.h"

#define EP_INLINE static inline __attribute__((always_inline))

static int neon_supported(void) { return 1; }  /* NEON is part of armv8-a */

/* The Armv8.2 dot product, for the functions marked with it only; the kernel says whether the core
 * has it (HWCAP_ASIMDDP: Cortex-A76 and later have it, the A72 does not). */
#define EP_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#if !defined(HWCAP_ASIMDDP)
#define HWCAP_ASIMDDP (1 << 20)
#endif

static int neon_dotprod_supported(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return 0;
#endif
}

static void neon_quantize_i8(const float *x, int64_t in, int8_t *q, float *scale) {
    float32x4_t vmax = vdupq_n_f32(0.0f);
    int64_t j = 0;
    for (; j + 4 <= in; j += 4) vmax = vmaxnmq_f32(vmax, vabsq_f32(vld1q_f32(x + j)));  /* NaN ignored */
    float amax = vmaxnmvq_f32(vmax);
    for (; j < in; j++) {
        float a = fabsf(x[j]);
        if (a > amax) amax = a;
    }
    if (amax == 0.0f) {
        memset(q, 0, (size_t)in);
        *scale = 0.0f;
        return;
    }
    const float inv_s = 127.0f / amax;
    const float32x4_t inv = vdupq_n_f32(inv_s), hi = vdupq_n_f32(127.0f), lo = vdupq_n_f32(-127.0f);
    j = 0;
    for (; j + 8 <= in; j += 8) {
        /* vmaxq/vminq keep a NaN, and the conversion turns NaN into 0, as the specification does */
        float32x4_t a = vminq_f32(vmaxq_f32(vmulq_f32(vld1q_f32(x + j), inv), lo), hi);
        float32x4_t b = vminq_f32(vmaxq_f32(vmulq_f32(vld1q_f32(x + j + 4), inv), lo), hi);
        int16x8_t h = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(a)), vqmovn_s32(vcvtnq_s32_f32(b)));
        vst1_s8(q + j, vqmovn_s16(h));
    }
    for (; j < in; j++) q[j] = ep_quantize_one(x[j], inv_s);
    *scale = amax / 127.0f;
}

static void neon_binarize(const float *x, int64_t in, uint8_t *bits, float *scale) {
    static const uint8_t weights[8] = {1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x8_t wv = vld1_u8(weights);
    int64_t nbytes = ep_in_pad(in) / 8;
    memset(bits, 0, (size_t)nbytes);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);  /* lanes 0-3 and 4-7 */
    int64_t j = 0;
    for (; j + 8 <= in; j += 8) {
        float32x4_t a = vld1q_f32(x + j), b = vld1q_f32(x + j + 4);
        uint32x4_t na = vcltq_f32(a, vdupq_n_f32(0.0f)), nb = vcltq_f32(b, vdupq_n_f32(0.0f));
        uint8x8_t m = vmovn_u16(vcombine_u16(vmovn_u32(na), vmovn_u32(nb)));
        bits[j >> 3] = vaddv_u8(vand_u8(m, wv));
        acc0 = vaddq_f32(acc0, vabsq_f32(a));
        acc1 = vaddq_f32(acc1, vabsq_f32(b));
    }
    float lane[8];
    vst1q_f32(lane, acc0);
    vst1q_f32(lane + 4, acc1);
    for (; j < in; j++) {
        if (x[j] < 0.0f) bits[j >> 3] |= (uint8_t)(1u << (j & 7));
        lane[j & 7] += fabsf(x[j]);
    }
    float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    *scale = in > 0 ? s / (float)in : 0.0f;
}

static void neon_i8_tables(const int8_t *q, int64_t in, int64_t group, uint8_t *tab, int32_t *gsum) {
    const int64_t ncol = ep_in_pad(in) / 8;
    uint8x16_t mask[4];
    for (int b = 0; b < 4; b++) {
        uint8_t m[16];
        for (int n = 0; n < 16; n++) m[n] = (n >> b) & 1 ? 0xFF : 0;
        mask[b] = vld1q_u8(m);
    }
    ep_group_walk gw = ep_group_walk_start(in, group);
    for (int64_t c = 0; c < ncol; c++) {
        int8_t x8[16] = {0};
        int64_t left = in - 8 * c;
        if (left >= 8) memcpy(x8, q + 8 * c, 8);
        else if (left > 0) memcpy(x8, q + 8 * c, (size_t)left);
        int8x16_t x = vld1q_s8(x8);
        ep_group_walk_add(&gw, 8 * c, gsum, vaddlvq_s8(x));   /* the 8 inputs' sum (the rest are zero) */
        uint8x16_t l = vreinterpretq_u8_s8(vandq_s8(x, vdupq_n_s8(0x0f)));
        uint8x16_t h = vreinterpretq_u8_s8(vshrq_n_s8(x, 4));  /* arithmetic: h in [-8, 7] */
        uint8x16_t t[4] = {vdupq_n_u8(0), vdupq_n_u8(0), vdupq_n_u8(0), vdupq_n_u8(0)};
        for (int b = 0; b < 4; b++) {
            uint8x16_t plo = vdupq_n_u8((uint8_t)b), phi = vdupq_n_u8((uint8_t)(4 + b));
            t[0] = vaddq_u8(t[0], vandq_u8(vqtbl1q_u8(l, plo), mask[b]));
            t[1] = vaddq_u8(t[1], vandq_u8(vqtbl1q_u8(l, phi), mask[b]));
            t[2] = vaddq_u8(t[2], vandq_u8(vqtbl1q_u8(h, plo), mask[b]));
            t[3] = vaddq_u8(t[3], vandq_u8(vqtbl1q_u8(h, phi), mask[b]));
        }
        for (int u = 0; u < 4; u++) vst1q_u8(tab + c * 64 + 16 * u, t[u]);
    }
    ep_group_walk_end(&gw, gsum);
}

EP_INLINE void load_acc(const ep_gemm_args *a, int64_t t, int64_t tok0, int TB, float32x4_t f[][4], int first) {
    for (int b = 0; b < TB; b++)
        for (int u = 0; u < 4; u++)
            f[b][u] = first ? vdupq_n_f32(0.0f) : vld1q_f32(a->acc + ((tok0 + b) * a->tiles + t) * EP_TILE + 4 * u);
}

EP_INLINE void store_acc(const ep_gemm_args *a, int64_t t, int64_t tok0, int TB, float32x4_t f[][4], int last) {
    for (int b = 0; b < TB; b++) {
        int64_t tok = tok0 + b;
        if (!last) {
            for (int u = 0; u < 4; u++) vst1q_f32(a->acc + (tok * a->tiles + t) * EP_TILE + 4 * u, f[b][u]);
        } else if ((t + 1) * EP_TILE <= a->out) {
            float *y = a->y + tok * a->out + t * EP_TILE;
            for (int u = 0; u < 4; u++) vst1q_f32(y + 4 * u, vmulq_n_f32(f[b][u], a->ascale[tok]));
        } else {
            float tmp[EP_TILE];
            for (int u = 0; u < 4; u++) vst1q_f32(tmp + 4 * u, f[b][u]);
            ep_store_tile(a->y + tok * a->out, a->out, t, tmp, a->ascale[tok]);
        }
    }
}

/* The 16 scales of (plane i, tile t, group j), as ep_scale_value gives them. */
EP_INLINE void load_scales(const ep_gemm_args *a, int64_t i, int64_t t, int64_t j, float32x4_t out[4]) {
    const int64_t idx = ep_scale_index(a, i, t, j);
    if (a->scales_kind == EP_SCALES_U8) {
        const uint8x16_t c = vld1q_u8((const uint8_t *)a->scales + idx);
        const uint16x8_t c0 = vmovl_u8(vget_low_u8(c)), c1 = vmovl_u8(vget_high_u8(c));
        const uint32x4_t w[4] = {vmovl_u16(vget_low_u16(c0)), vmovl_u16(vget_high_u16(c0)),
                                 vmovl_u16(vget_low_u16(c1)), vmovl_u16(vget_high_u16(c1))};
        for (int u = 0; u < 4; u++)
            out[u] = vmulq_f32(vcvtq_f32_u32(w[u]), vld1q_f32(a->scale_rows + t * EP_TILE + 4 * u));
        return;
    }
    for (int u = 0; u < 4; u++)
        out[u] = a->scales_kind == EP_SCALES_F16 ? vcvt_f32_f16(vld1_f16((const float16_t *)a->scales + idx + 4 * u))
                                                 : vld1q_f32((const float *)a->scales + idx + 4 * u);
}

/* One (plane, group) for TB tokens: d = count0 - 2*m per row, then in the specification's order
 * f += alpha * d (fused, as fmaf), or with integer 8-bit scales (int_scales) e += code * d, which
 * group_pass adds once the group's planes are done. */
EP_INLINE void plane_pass(const ep_gemm_args *a, int64_t i, int64_t t, int64_t j, int64_t tok0, const int TB,
                          int32x4_t m[][4], int32x4_t e[][4], float32x4_t f[][4]) {
    if (a->int_scales) {
        const uint8x16_t c = vld1q_u8((const uint8_t *)a->scales + ep_scale_index(a, i, t, j));
        const uint16x8_t c0 = vmovl_u8(vget_low_u8(c)), c1 = vmovl_u8(vget_high_u8(c));
        const int32x4_t w[4] = {vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(c0))), vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(c0))),
                                vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(c1))), vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(c1)))};
        for (int b = 0; b < TB; b++) {
            const int32x4_t s = vdupq_n_s32(a->gsum[(tok0 + b) * a->ng + j]);
            for (int u = 0; u < 4; u++) e[b][u] = vmlaq_s32(e[b][u], w[u], vsubq_s32(s, vshlq_n_s32(m[b][u], 1)));
        }
        return;
    }
    float32x4_t alpha[4];
    load_scales(a, i, t, j, alpha);
    for (int b = 0; b < TB; b++) {
        const int32x4_t s = vdupq_n_s32(a->gsum[(tok0 + b) * a->ng + j]);
        for (int u = 0; u < 4; u++)
            f[b][u] = vfmaq_f32(f[b][u], alpha[u], vcvtq_f32_s32(vsubq_s32(s, vshlq_n_s32(m[b][u], 1))));
    }
}

/* The end of a group under int_scales: f += scale_rows * E, E reset. */
EP_INLINE void group_pass(const ep_gemm_args *a, int64_t t, const int TB, int32x4_t e[][4], float32x4_t f[][4]) {
    if (!a->int_scales) return;
    for (int u = 0; u < 4; u++) {
        const float32x4_t r = vld1q_f32(a->scale_rows + t * EP_TILE + 4 * u);
        for (int b = 0; b < TB; b++) {
            f[b][u] = vfmaq_f32(f[b][u], r, vcvtq_f32_s32(e[b][u]));
            e[b][u] = vdupq_n_s32(0);
        }
    }
}

EP_INLINE void i8_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, int64_t j1) {
    const uint8x16_t m0f = vdupq_n_u8(0x0f);
    const int8x8_t sixteen = vdup_n_s8(16);
    float32x4_t f[4][4];
    int32x4_t e[4][4];
    load_acc(a, t, tok0, TB, f, j0 == 0);
    for (int b = 0; b < TB; b++)
        for (int u = 0; u < 4; u++) e[b][u] = vdupq_n_s32(0);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        for (int64_t i = 0; i < a->k; i++) {
            const uint8_t *w = a->planes + (i * a->tiles + t) * a->ncol * EP_TILE;
            int32x4_t m[4][4];
            for (int b = 0; b < TB; b++)
                for (int u = 0; u < 4; u++) m[b][u] = vdupq_n_s32(0);
            for (int64_t c = c0; c < c1; c += 32) {
                const int64_t ce = ep_min64(c + 32, c1);
                int16x8_t s[4][2];
                for (int b = 0; b < TB; b++) s[b][0] = s[b][1] = vdupq_n_s16(0);
                for (int64_t cc = c; cc < ce; cc += 2) {
                    uint8x16_t v0 = vld1q_u8(w + cc * EP_TILE), v1 = vld1q_u8(w + (cc + 1) * EP_TILE);
                    uint8x16_t lo0 = vandq_u8(v0, m0f), hi0 = vshrq_n_u8(v0, 4);
                    uint8x16_t lo1 = vandq_u8(v1, m0f), hi1 = vshrq_n_u8(v1, 4);
                    for (int b = 0; b < TB; b++) {
                        const uint8_t *T = a->tab + (tok0 + b) * a->tab_stride + cc * 64;
                        uint8x16_t al = vaddq_u8(vaddq_u8(vqtbl1q_u8(vld1q_u8(T), lo0), vqtbl1q_u8(vld1q_u8(T + 16), hi0)),
                                                 vaddq_u8(vqtbl1q_u8(vld1q_u8(T + 64), lo1), vqtbl1q_u8(vld1q_u8(T + 80), hi1)));
                        int8x16_t ah = vreinterpretq_s8_u8(
                            vaddq_u8(vaddq_u8(vqtbl1q_u8(vld1q_u8(T + 32), lo0), vqtbl1q_u8(vld1q_u8(T + 48), hi0)),
                                     vaddq_u8(vqtbl1q_u8(vld1q_u8(T + 96), lo1), vqtbl1q_u8(vld1q_u8(T + 112), hi1))));
                        int16x8_t s0 = vreinterpretq_s16_u16(vaddw_u8(vreinterpretq_u16_s16(s[b][0]), vget_low_u8(al)));
                        int16x8_t s1 = vreinterpretq_s16_u16(vaddw_u8(vreinterpretq_u16_s16(s[b][1]), vget_high_u8(al)));
                        s[b][0] = vmlal_s8(s0, vget_low_s8(ah), sixteen);
                        s[b][1] = vmlal_s8(s1, vget_high_s8(ah), sixteen);
                    }
                }
                for (int b = 0; b < TB; b++) {
                    m[b][0] = vaddw_s16(m[b][0], vget_low_s16(s[b][0]));
                    m[b][1] = vaddw_s16(m[b][1], vget_high_s16(s[b][0]));
                    m[b][2] = vaddw_s16(m[b][2], vget_low_s16(s[b][1]));
                    m[b][3] = vaddw_s16(m[b][3], vget_high_s16(s[b][1]));
                }
            }
            plane_pass(a, i, t, j, tok0, TB, m, e, f);
        }
        group_pass(a, t, TB, e, f);
    }
    store_acc(a, t, tok0, TB, f, j1 == a->ng);
}

/* One token over rows of whole groups (decode): i8_tile's integers and float order for TB = 1,
 * every tile of [t0, t1) in one call, the scales' kind a constant (SK) and the planes, tables and
 * scales reached by stepped pointers, a group (at most 256 inputs) one int16 run; as x86_avx2.c's
 * i8_dec. */
EP_INLINE void i8_dec(const ep_gemm_args *a, int64_t t0, int64_t t1, const int GB, const int SK) {
    const uint8x16_t m0f = vdupq_n_u8(0x0f);
    const int8x8_t sixteen = vdup_n_s8(16);
    const int64_t ng = a->ng, k = a->k, pstride = ep_plane_stride(a), sstride = a->tiles * ng * EP_TILE;
    const int64_t gcols = 4 * GB;   /* byte columns of a group */
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *w = ep_tile_planes(a, t), *tab = a->tab;
        int64_t si = ep_scale_index(a, 0, t, 0);
        float32x4_t f[4], r[4];
        for (int u = 0; u < 4; u++) {
            f[u] = vdupq_n_f32(0.0f);
            r[u] = SK == EP_SK_U8 ? vld1q_f32(a->scale_rows + t * EP_TILE + 4 * u) : f[u];
        }
        for (int64_t j = 0; j < ng; j++, w += gcols * EP_TILE, tab += gcols * 64, si += EP_TILE) {
            const int32x4_t S = vdupq_n_s32(a->gsum[j]);
            int32x4_t e[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
            const uint8_t *wp = w;
            int64_t sp = si;
            for (int64_t i = 0; i < k; i++, wp += pstride, sp += sstride) {
                int16x8_t s0 = vdupq_n_s16(0), s1 = vdupq_n_s16(0);
                for (int c = 0; c < gcols; c += 2) {
                    const uint8_t *T = tab + c * 64;
                    uint8x16_t v0 = vld1q_u8(wp + c * EP_TILE), v1 = vld1q_u8(wp + (c + 1) * EP_TILE);
                    uint8x16_t lo0 = vandq_u8(v0, m0f), hi0 = vshrq_n_u8(v0, 4);
                    uint8x16_t lo1 = vandq_u8(v1, m0f), hi1 = vshrq_n_u8(v1, 4);
                    uint8x16_t al = vaddq_u8(vaddq_u8(vqtbl1q_u8(vld1q_u8(T), lo0), vqtbl1q_u8(vld1q_u8(T + 16), hi0)),
                                             vaddq_u8(vqtbl1q_u8(vld1q_u8(T + 64), lo1), vqtbl1q_u8(vld1q_u8(T + 80), hi1)));
                    int8x16_t ah = vreinterpretq_s8_u8(
                        vaddq_u8(vaddq_u8(vqtbl1q_u8(vld1q_u8(T + 32), lo0), vqtbl1q_u8(vld1q_u8(T + 48), hi0)),
                                 vaddq_u8(vqtbl1q_u8(vld1q_u8(T + 96), lo1), vqtbl1q_u8(vld1q_u8(T + 112), hi1))));
                    s0 = vmlal_s8(vreinterpretq_s16_u16(vaddw_u8(vreinterpretq_u16_s16(s0), vget_low_u8(al))), vget_low_s8(ah), sixteen);
                    s1 = vmlal_s8(vreinterpretq_s16_u16(vaddw_u8(vreinterpretq_u16_s16(s1), vget_high_u8(al))), vget_high_s8(ah), sixteen);
                }
                const int32x4_t m[4] = {vmovl_s16(vget_low_s16(s0)), vmovl_s16(vget_high_s16(s0)),
                                        vmovl_s16(vget_low_s16(s1)), vmovl_s16(vget_high_s16(s1))};
                if (SK == EP_SK_U8) {
                    const uint8x16_t c = vld1q_u8((const uint8_t *)a->scales + sp);
                    const uint16x8_t c0 = vmovl_u8(vget_low_u8(c)), c1 = vmovl_u8(vget_high_u8(c));
                    const int32x4_t cw[4] = {vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(c0))), vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(c0))),
                                             vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(c1))), vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(c1)))};
                    for (int u = 0; u < 4; u++) e[u] = vmlaq_s32(e[u], cw[u], vsubq_s32(S, vshlq_n_s32(m[u], 1)));
                } else {
                    for (int u = 0; u < 4; u++) {
                        const float32x4_t al = SK == EP_SK_F16 ? vcvt_f32_f16(vld1_f16((const float16_t *)a->scales + sp + 4 * u))
                                                            : vld1q_f32((const float *)a->scales + sp + 4 * u);
                        f[u] = vfmaq_f32(f[u], al, vcvtq_f32_s32(vsubq_s32(S, vshlq_n_s32(m[u], 1))));
                    }
                }
            }
            if (SK == EP_SK_U8)
                for (int u = 0; u < 4; u++) f[u] = vfmaq_f32(f[u], r[u], vcvtq_f32_s32(e[u]));
        }
        if ((t + 1) * EP_TILE <= a->out) {
            for (int u = 0; u < 4; u++) vst1q_f32(a->y + t * EP_TILE + 4 * u, vmulq_n_f32(f[u], a->ascale[0]));
        } else {
            float tmp[EP_TILE];
            for (int u = 0; u < 4; u++) vst1q_f32(tmp + 4 * u, f[u]);
            ep_store_tile(a->y, a->out, t, tmp, a->ascale[0]);
        }
    }
}

EP_DEC_KERNELS(i8_dec)

static void neon_i8_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    const ep_dec_fn dec = i8_dec_for(a);
    if (dec) {
        dec(a, t0, t1);
        return;
    }
#define CALL(TB) i8_tile(a, t, tok0, TB, j0, j1)
    EP_TILE_LOOP(a, t0, t1, 8, CALL);
#undef CALL
}

/* ---- integer 8-bit scales over many tokens: i16_tiles ------------------------------------
 * As on x86 (x86_avx512.c): a tile's weight codes W = sum_i code_i * sign_i (|W| <= 4 * 255)
 * widened to int16 once per call, a chunk of groups at a time, then every token's int16
 * activations multiply them: the same E per group as ref.c, so the same float pass and bits.
 * Here input u of the chunk holds its 16 rows at buf + 16 u, and SMLAL by lane multiplies four
 * rows by one activation (no pairwise multiply-add in NEON). */
#define EP_I16_TB 3  /* tokens per pass over the widened chunk: 12 int32 sums, 12 float sums */

/* Groups [j0, j1) of tile t widened into buf: W = sum of codes - 2 * (codes whose bit says -1). */
static void neon_widen_codes(const ep_gemm_args *a, int64_t t, int64_t j0, int64_t j1, int16_t *buf) {
    const int64_t cbase = ep_group_col0(a, j0), pstride = ep_plane_stride(a);
    const uint8_t *w0 = ep_tile_planes(a, t);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        int16x8_t c2[EP_MAX_PLANES][2], csum[2] = {vdupq_n_s16(0), vdupq_n_s16(0)};
        for (int64_t i = 0; i < a->k; i++) {
            const uint8x16_t c = vld1q_u8((const uint8_t *)a->scales + ep_scale_index(a, i, t, j));
            const int16x8_t lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(c))), hi = vreinterpretq_s16_u16(vmovl_high_u8(c));
            csum[0] = vaddq_s16(csum[0], lo);
            csum[1] = vaddq_s16(csum[1], hi);
            c2[i][0] = vaddq_s16(lo, lo);
            c2[i][1] = vaddq_s16(hi, hi);
        }
        for (int64_t c = c0; c < c1; c++) {
            int16x8_t v[8][2];
            for (int b = 0; b < 8; b++) v[b][0] = csum[0], v[b][1] = csum[1];
            for (int64_t i = 0; i < a->k; i++) {
                const uint8x16_t bytes = vld1q_u8(w0 + i * pstride + c * EP_TILE);
                for (int b = 0; b < 8; b++) {
                    const int8x16_t set = vreinterpretq_s8_u8(vtstq_u8(bytes, vdupq_n_u8((uint8_t)(1u << b))));
                    v[b][0] = vsubq_s16(v[b][0], vandq_s16(vmovl_s8(vget_low_s8(set)), c2[i][0]));
                    v[b][1] = vsubq_s16(v[b][1], vandq_s16(vmovl_high_s8(set), c2[i][1]));
                }
            }
            int16_t *d = buf + (c - cbase) * 8 * EP_TILE;
            for (int b = 0; b < 8; b++) {
                vst1q_s16(d + b * EP_TILE, v[b][0]);
                vst1q_s16(d + b * EP_TILE + 8, v[b][1]);
            }
        }
    }
}

/* Input L of the 8 at w (16 rows each) times lane L of each token's activations x[b]. */
#define EP_I16_LANE(L)                                                                    \
    do {                                                                                  \
        const int16x8_t wl = vld1q_s16(w + (L) * EP_TILE), wh = vld1q_s16(w + (L) * EP_TILE + 8); \
        for (int b = 0; b < TB; b++) {                                                    \
            e[b][0] = vmlal_laneq_s16(e[b][0], vget_low_s16(wl), x[b], (L));              \
            e[b][1] = vmlal_high_laneq_s16(e[b][1], wl, x[b], (L));                       \
            e[b][2] = vmlal_laneq_s16(e[b][2], vget_low_s16(wh), x[b], (L));              \
            e[b][3] = vmlal_high_laneq_s16(e[b][3], wh, x[b], (L));                       \
        }                                                                                 \
    } while (0)

/* Tokens tok0 .. tok0+TB-1 over the widened groups [j0, j1) of tile t. */
EP_INLINE void neon_i16_block(const ep_gemm_args *a, const int16_t *buf, int64_t t, int64_t tok0, const int TB,
                              int64_t j0, int64_t j1) {
    const int64_t cbase = ep_group_col0(a, j0);
    float32x4_t f[EP_I16_TB][4];
    load_acc(a, t, tok0, TB, f, j0 == 0);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        int32x4_t e[EP_I16_TB][4];
        for (int b = 0; b < TB; b++)
            for (int u = 0; u < 4; u++) e[b][u] = vdupq_n_s32(0);
        for (int64_t c = c0; c < c1; c++) {  /* 8 inputs: one byte column */
            const int16_t *w = buf + (c - cbase) * 8 * EP_TILE;
            int16x8_t x[EP_I16_TB];
            for (int b = 0; b < TB; b++) x[b] = vld1q_s16(a->x16 + (tok0 + b) * a->in_pad + c * 8);
            EP_I16_LANE(0); EP_I16_LANE(1); EP_I16_LANE(2); EP_I16_LANE(3);
            EP_I16_LANE(4); EP_I16_LANE(5); EP_I16_LANE(6); EP_I16_LANE(7);
        }
        for (int u = 0; u < 4; u++) {
            const float32x4_t r = vld1q_f32(a->scale_rows + t * EP_TILE + 4 * u);
            for (int b = 0; b < TB; b++) f[b][u] = vfmaq_f32(f[b][u], r, vcvtq_f32_s32(e[b][u]));
        }
    }
    store_acc(a, t, tok0, TB, f, j1 == a->ng);
}
#undef EP_I16_LANE

static void neon_i16_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
    _Alignas(64) int16_t buf[EP_I16_CHUNK * EP_TILE];
    EP_I16_LOOP(a, t0, t1, buf, EP_I16_TB, neon_widen_codes, neon_i16_block);
}

static void neon_xnor_tables(const uint8_t *bits, int64_t in, int64_t group, uint8_t *tab, int32_t *nvalid) {
    const int64_t ncol = ep_in_pad(in) / 8;
    for (int64_t c = 0; c < ncol; c++) {
        vst1q_u8(tab + c * 32, vdupq_n_u8(bits[c]));
        vst1q_u8(tab + c * 32 + 16, vdupq_n_u8(ep_valid_bits(in, c)));
    }
    ep_ref_group_valid(in, group, nvalid);
}

EP_INLINE void xnor_tile(const ep_gemm_args *a, int64_t t, int64_t tok0, const int TB, int64_t j0, int64_t j1) {
    float32x4_t f[4][4];
    int32x4_t e[4][4];
    load_acc(a, t, tok0, TB, f, j0 == 0);
    for (int b = 0; b < TB; b++)
        for (int u = 0; u < 4; u++) e[b][u] = vdupq_n_s32(0);
    for (int64_t j = j0; j < j1; j++) {
        int64_t c0, c1;
        ep_group_cols(a, j, &c0, &c1);
        for (int64_t i = 0; i < a->k; i++) {
            const uint8_t *w = a->planes + (i * a->tiles + t) * a->ncol * EP_TILE;
            int32x4_t p[4][4];
            for (int b = 0; b < TB; b++)
                for (int u = 0; u < 4; u++) p[b][u] = vdupq_n_s32(0);
            for (int64_t c = c0; c < c1; c += 16) {  /* <= 8 per column: byte counts stay <= 128 */
                const int64_t ce = ep_min64(c + 16, c1);
                uint8x16_t s[4];
                for (int b = 0; b < TB; b++) s[b] = vdupq_n_u8(0);
                for (int64_t cc = c; cc < ce; cc++) {
                    uint8x16_t v = vld1q_u8(w + cc * EP_TILE);
                    for (int b = 0; b < TB; b++) {
                        const uint8_t *T = a->tab + (tok0 + b) * a->tab_stride + cc * 32;
                        s[b] = vaddq_u8(s[b], vcntq_u8(vandq_u8(veorq_u8(v, vld1q_u8(T)), vld1q_u8(T + 16))));
                    }
                }
                for (int b = 0; b < TB; b++) {
                    uint16x8_t lo = vmovl_u8(vget_low_u8(s[b])), hi = vmovl_u8(vget_high_u8(s[b]));
                    p[b][0] = vreinterpretq_s32_u32(vaddw_u16(vreinterpretq_u32_s32(p[b][0]), vget_low_u16(lo)));
                    p[b][1] = vreinterpretq_s32_u32(vaddw_u16(vreinterpretq_u32_s32(p[b][1]), vget_high_u16(lo)));
                    p[b][2] = vreinterpretq_s32_u32(vaddw_u16(vreinterpretq_u32_s32(p[b][2]), vget_low_u16(hi)));
                    p[b][3] = vreinterpretq_s32_u32(vaddw_u16(vreinterpretq_u32_s32(p[b][3]), vget_high_u16(hi)));
                }
            }
            plane_pass(a, i, t, j, tok0, TB, p, e, f);
        }
        group_pass(a, t, TB, e, f);
    }
    store_acc(a, t, tok0, TB, f, j1 == a->ng);
}

static void neon_xnor_tiles(const ep_gemm_args *a, int64_t t0, int64_t t1) {
#define CALL(TB) xnor_tile(a, t, tok0, TB, j0, j1)
    EP_TILE_LOOP(a, t0, t1, 4, CALL);
#undef CALL
}

/* The canonical order of ref.c's ep_ref_dot: two 4-lane accumulators are lanes 0-3 and 4-7. */
static float finish_lanes(float32x4_t lo, float32x4_t hi, const float *a, const float *b, int64_t i, int64_t n) {
    float lane[8];
    vst1q_f32(lane, lo);
    vst1q_f32(lane + 4, hi);
    for (; i < n; i++) lane[i & 7] = fmaf(a[i], b[i], lane[i & 7]);
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

static float neon_dot(const float *a, const float *b, int64_t n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    }
    return finish_lanes(s0, s1, a, b, i, n);
}

static void neon_dense_rows(const float *x, int64_t n, int64_t in, const void *w, int f16, float *y,
                            int64_t ldy, int64_t r0, int64_t r1) {
    float wtail[8];
    for (int64_t r = r0; r < r1; r++) {
        const float *wf = (const float *)w + r * in;
        const float16_t *wh = (const float16_t *)w + r * in;
        const int64_t n8 = in & ~(int64_t)7;
        for (int64_t v = n8; v < in; v++) wtail[v - n8] = f16 ? ep_half_to_float(((const uint16_t *)w)[r * in + v]) : wf[v];
        for (int64_t t = 0; t < n; t++) {
            const float *xt = x + t * in;
            float32x4_t s0 = vdupq_n_f32(0.0f), s1 = vdupq_n_f32(0.0f);
            for (int64_t u = 0; u < n8; u += 8) {
                float32x4_t w0, w1;
                if (f16) {
                    float16x8_t h = vld1q_f16(wh + u);
                    w0 = vcvt_f32_f16(vget_low_f16(h));
                    w1 = vcvt_f32_f16(vget_high_f16(h));
                } else {
                    w0 = vld1q_f32(wf + u);
                    w1 = vld1q_f32(wf + u + 4);
                }
                s0 = vfmaq_f32(s0, vld1q_f32(xt + u), w0);
                s1 = vfmaq_f32(s1, vld1q_f32(xt + u + 4), w1);
            }
            y[t * ldy + r] = finish_lanes(s0, s1, xt + n8, wtail, 0, in - n8);
        }
    }
}

static void neon_i8_rows(const int8_t *q, const float *qs, int64_t n, int64_t in, const int8_t *w,
                         const float *ws, float *y, int64_t ldy, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *wr = w + r * in;
        for (int64_t t = 0; t < n; t++) {
            const int8_t *qt = q + t * in;
            int32x4_t acc = vdupq_n_s32(0);
            int64_t u = 0;
            for (; u + 16 <= in; u += 16) {
                int8x16_t a = vld1q_s8(qt + u), b = vld1q_s8(wr + u);
                int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
                p = vmlal_s8(p, vget_high_s8(a), vget_high_s8(b));  /* 2 * 127 * 127 fits int16 */
                acc = vpadalq_s16(acc, p);
            }
            int32_t d = vaddvq_s32(acc);
            for (; u < in; u++) d += (int32_t)qt[u] * wr[u];
            y[t * ldy + r] = ((float)d * ws[r]) * qs[t];
        }
    }
}

/* neon_i8_rows with the dot product: each 32-bit lane sums four byte products; two accumulators
 * so consecutive sdots do not wait on each other.  Integer sums: the same d in any order. */
EP_DOTPROD static void neon_dotprod_i8_rows(const int8_t *q, const float *qs, int64_t n, int64_t in,
                                            const int8_t *w, const float *ws, float *y, int64_t ldy,
                                            int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *wr = w + r * in;
        for (int64_t t = 0; t < n; t++) {
            const int8_t *qt = q + t * in;
            int32x4_t acc0 = vdupq_n_s32(0), acc1 = vdupq_n_s32(0);
            int64_t u = 0;
            for (; u + 32 <= in; u += 32) {
                acc0 = vdotq_s32(acc0, vld1q_s8(qt + u), vld1q_s8(wr + u));
                acc1 = vdotq_s32(acc1, vld1q_s8(qt + u + 16), vld1q_s8(wr + u + 16));
            }
            if (u + 16 <= in) {
                acc0 = vdotq_s32(acc0, vld1q_s8(qt + u), vld1q_s8(wr + u));
                u += 16;
            }
            int32_t d = vaddvq_s32(vaddq_s32(acc0, acc1));
            for (; u < in; u++) d += (int32_t)qt[u] * wr[u];
            y[t * ldy + r] = ((float)d * ws[r]) * qs[t];
        }
    }
}

/* hd (a multiple of 8) float16 values widened to float32 */
static inline void neon_widen_row(const float16_t *p, int64_t hd, float *row) {
    for (int64_t i = 0; i < hd; i += 8) {
        const float16x8_t h = vld1q_f16(p + i);
        vst1q_f32(row + i, vcvt_f32_f16(vget_low_f16(h)));
        vst1q_f32(row + i + 4, vcvt_f32_f16(vget_high_f16(h)));
    }
}

/* 16 floats of a cache row at element `at`: float32, or float16 widened (exact) */
static inline void neon_load16(const void *v, int f16, int64_t at, float32x4_t x[4]) {
    if (f16) {
        const float16_t *h = (const float16_t *)v + at;
        const float16x8_t a = vld1q_f16(h), b = vld1q_f16(h + 8);
        x[0] = vcvt_f32_f16(vget_low_f16(a));
        x[1] = vcvt_f32_f16(vget_high_f16(a));
        x[2] = vcvt_f32_f16(vget_low_f16(b));
        x[3] = vcvt_f32_f16(vget_high_f16(b));
    } else {
        for (int j = 0; j < 4; j++) x[j] = vld1q_f32((const float *)v + at + 4 * j);
    }
}

/* out_g[c0..c0+16) = sum over s of w_g[s] * v_s[c0..c0+16) for gn <= 3 heads at once (w_g = w +
 * g * T, out_g = out + g * hd), in order of s: each value row read (and widened) once for them. */
static void neon_values16_heads(const float *w, int64_t T, int gn, const void *v, int f16, int64_t kstride,
                                int64_t c0, float *out, int64_t hd) {
    float32x4_t o[3][4];
    for (int g = 0; g < 3; g++)
        for (int j = 0; j < 4; j++) o[g][j] = vdupq_n_f32(0.0f);
    for (int64_t s = 0; s < T; s++) {
        float32x4_t x[4];
        neon_load16(v, f16, s * kstride + c0, x);
        for (int g = 0; g < gn; g++) {
            const float ws = w[g * T + s];
            for (int j = 0; j < 4; j++) o[g][j] = vfmaq_n_f32(o[g][j], x[j], ws);
        }
    }
    for (int g = 0; g < gn; g++)
        for (int j = 0; j < 4; j++) vst1q_f32(out + g * hd + c0 + 4 * j, o[g][j]);
}

/* Attention (specification: ep_ref_attend).  Scores key by key for all G heads (a float16 key
 * widened once for them); then each head's softmax; then the values: float16 rows in 16-wide
 * column strips, up to three heads at a time (each row read and widened once for them), float32
 * rows (or head sizes not a multiple of 16) a head at a time, its sums in registers.  Instructions
 * for one key head of SmolLM2 (3 query heads, head size 64) over 160 positions, counted under
 * qemu-aarch64 -singlestep: float32 157k; float16 218k widening per head, 171k shared. */
static void neon_attend(const float *q, int64_t G, const void *k, const void *v, int flags, int64_t kstride,
                        int64_t T, int64_t hd, float scale, float *out, float *scratch) {
    if (hd % 8 || hd > 256) {
        ep_ref_attend(q, G, k, v, flags, kstride, T, hd, scale, out, scratch);
        return;
    }
    const int f16 = flags & EP_ATTEND_F16;
    float row[256];
    for (int64_t s = 0; s < T; s++) {
        const float *ks = (const float *)k + s * kstride;
        if (f16) {
            neon_widen_row((const float16_t *)k + s * kstride, hd, row);
            ks = row;
        }
        for (int64_t g = 0; g < G; g++) scratch[g * T + s] = neon_dot(q + g * hd, ks, hd) * scale;
    }
    for (int64_t g = 0; g < G; g++) ep_softmax_weights(scratch + g * T, T);
    if (f16 && hd % 16 == 0) {   /* float32 rows: a head at a time takes fewer instructions */
        for (int64_t g = 0; g < G; g += 3)
            for (int64_t c = 0; c < hd; c += 16)
                neon_values16_heads(scratch + g * T, T, (int)ep_min64(3, G - g), v, f16, kstride, c, out + g * hd, hd);
        return;
    }
    for (int64_t g = 0; g < G; g++) {
        const float *w = scratch + g * T;
        float32x4_t o[64];
        const int64_t nv = hd / 4;
        for (int64_t j = 0; j < nv; j++) o[j] = vdupq_n_f32(0.0f);
        for (int64_t s = 0; s < T; s++) {
            const float *vs = (const float *)v + s * kstride;
            if (f16) {
                neon_widen_row((const float16_t *)v + s * kstride, hd, row);
                vs = row;
            }
            for (int64_t j = 0; j < nv; j++) o[j] = vfmaq_n_f32(o[j], vld1q_f32(vs + 4 * j), w[s]);
        }
        for (int64_t j = 0; j < nv; j++) vst1q_f32(out + g * hd + 4 * j, o[j]);
    }
}

/* ep_ref_to_half, 4 at a time (FCVTN rounds to nearest even, as the reference) */
static void neon_to_half(const float *x, int64_t n, uint16_t *h) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_f16((float16_t *)(h + i), vcvt_f16_f32(vld1q_f32(x + i)));
    ep_ref_to_half(x + i, n - i, h + i);
}

/* ep_ref_lookup16_u16, 16 codes at a time: the table's low and high bytes, deinterleaved once,
 * looked up by TBL (codes < 16 index a 16-byte table directly) and stored interleaved again. */
static void neon_lookup16_u16(const uint16_t *lev, int L, const uint8_t *codes, int64_t n, uint16_t *w) {
    uint16_t t[16] = {0};
    memcpy(t, lev, sizeof(uint16_t) * (size_t)L);
    const uint8x16x2_t tb = vld2q_u8((const uint8_t *)t);   /* val[0]: low bytes, val[1]: high */
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const uint8x16_t idx = vld1q_u8(codes + i);
        uint8x16x2_t v;
        v.val[0] = vqtbl1q_u8(tb.val[0], idx);
        v.val[1] = vqtbl1q_u8(tb.val[1], idx);
        vst2q_u8((uint8_t *)(w + i), v);
    }
    ep_ref_lookup16_u16(lev, L, codes + i, n - i, w + i);
}

/* ep_ref_lookup16_f32, 16 codes at a time: the 64-byte table in four registers, each output
 * float's four bytes picked by TBL at byte indices 4 * code + 0..3. */
static void neon_lookup16_f32(const float *lev, int L, const uint8_t *codes, int64_t n, float *w) {
    float t[16] = {0};
    memcpy(t, lev, sizeof(float) * (size_t)L);
    const uint8x16x4_t tb = {{vld1q_u8((const uint8_t *)t), vld1q_u8((const uint8_t *)(t + 4)),
                              vld1q_u8((const uint8_t *)(t + 8)), vld1q_u8((const uint8_t *)(t + 12))}};
    static const uint8_t spread[4][16] = {   /* code j of 16 to bytes 4j..4j+3 of its quarter */
        {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
        {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
        {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
        {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};
    static const uint8_t byte_of[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
    const uint8x16_t off = vld1q_u8(byte_of);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const uint8x16_t c = vld1q_u8(codes + i);
        for (int j = 0; j < 4; j++) {
            const uint8x16_t idx = vaddq_u8(vshlq_n_u8(vqtbl1q_u8(c, vld1q_u8(spread[j])), 2), off);
            vst1q_u8((uint8_t *)(w + i + 4 * j), vqtbl4q_u8(tb, idx));
        }
    }
    ep_ref_lookup16_f32(lev, L, codes + i, n - i, w + i);
}

const ep_kernels ep_kernels_neon = {
    .name = "neon",
    .supported = neon_supported,
    .quantize_i8 = neon_quantize_i8,
    .binarize = neon_binarize,
    .i8_tables = neon_i8_tables,
    .xnor_tables = neon_xnor_tables,
    .i8_tiles = neon_i8_tiles,
    .i16_tiles = neon_i16_tiles,
    /* by k, from instruction counts (qemu, cortex-a72, 8-bit scales, 576 x 576, group 64;
     * lookups / widened): k = 2 0.88 at 32 tokens, 0.92 at 64 (an SMLAL per 4 weight-tokens costs
     * what two planes of lookups do: never); k = 3 1.06 at 16, 1.20 at 32, about 1.29 at 64; k = 4
     * 1.02 at 8, 1.28 at 16, 1.50 at 32.  Taken from a quarter fewer instructions: SMLAL issues no
     * faster than TBL on the Pi's cores, and no board has timed either. */
    .i16_min_tokens = {0, 0, 0, 64, 16},
    .xnor_tiles = neon_xnor_tiles,
    .dense_rows = neon_dense_rows,
    .i8_rows = neon_i8_rows,
    .dot = neon_dot,
    .attend = neon_attend,
    .to_half = neon_to_half,
    .rotate_row = ep_ref_rotate_row,
    .silu_mul = ep_ref_silu_mul,
    .lookup16_u16 = neon_lookup16_u16,
    .lookup16_f32 = neon_lookup16_f32,
    .plane_sums = ep_ref_plane_sums,
};

/* The same kernels with the dot product where it pays (i8_rows). */
const ep_kernels ep_kernels_neon_dotprod = {
    .name = "neon_dotprod",
    .supported = neon_dotprod_supported,
    .quantize_i8 = neon_quantize_i8,
    .binarize = neon_binarize,
    .i8_tables = neon_i8_tables,
    .xnor_tables = neon_xnor_tables,
    .i8_tiles = neon_i8_tiles,
    .i16_tiles = neon_i16_tiles,
    .i16_min_tokens = {0, 0, 0, 64, 16},  /* as neon's */
    .xnor_tiles = neon_xnor_tiles,
    .dense_rows = neon_dense_rows,
    .i8_rows = neon_dotprod_i8_rows,
    .dot = neon_dot,
    .attend = neon_attend,
    .to_half = neon_to_half,
    .rotate_row = ep_ref_rotate_row,
    .silu_mul = ep_ref_silu_mul,
    .lookup16_u16 = neon_lookup16_u16,
    .lookup16_f32 = neon_lookup16_f32,
    .plane_sums = ep_ref_plane_sums,
};
