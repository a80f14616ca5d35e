/* Standalone check of every compiled ISA variant against the scalar specification, bit for bit,
 * plus the known-answer file written from the NumPy reference (tests/data/kernels_kat.bin).
 * Built and run by tests/test_c_variants.py natively, under SIMDe emulation, and for aarch64
 * under qemu-user (see .ci/run).  Usage: kernel_check [KAT_FILE] */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ep_internal.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float rndf(void) { return (float)((rnd() >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f; }

static void *xalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}

static int failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; printf("FAIL: " __VA_ARGS__); printf("\n"); } } while (0)

typedef struct { int64_t n, k, out, in, group; } shape;
static uint16_t *g_scales16 = NULL;  /* float16 copy of the current scales, when they are halves */
/* 8-bit scales: codes, row multipliers, and the float32 scales they stand for (code * row) */
static uint8_t *g_codes = NULL;
static float *g_rows = NULL, *g_from_codes = NULL;

/* Run one variant on one shape; returns y (n, out) for i8 and xnor in y8 / yx, and with the 8-bit
 * codes in y8u / yxu. */
static void run(const ep_kernels *kt, const shape *s, const float *x, const uint8_t *planes,
                const float *scales, int threads, int8_t *q, float *qs, uint8_t *bits, float *bs,
                float *y8, float *yx, float *y8u, float *yxu) {
    int64_t wb = ep_workspace_bytes(s->n, s->out, s->in, s->group);
    void *work = xalloc((size_t)wb);
    int rc = ep_quantize_i8(kt, x, s->n, s->in, q, qs);
    rc |= ep_binarize(kt, x, s->n, s->in, bits, bs);
    rc |= ep_gemm_planes_i8(kt, q, qs, s->n, planes, scales, EP_SCALES_F32, NULL, s->k, s->out, s->in, s->group, y8, work, wb, threads);
    rc |= ep_gemm_xnor(kt, bits, bs, s->n, planes, scales, EP_SCALES_F32, NULL, s->k, s->out, s->in, s->group, yx, work, wb, threads);
    const size_t ybytes = (size_t)(s->n * s->out * 4);
    if (g_scales16) {  /* the same scales as float16: the same bits out */
        float *y2 = xalloc(ybytes);
        rc |= ep_gemm_planes_i8(kt, q, qs, s->n, planes, g_scales16, EP_SCALES_F16, NULL, s->k, s->out, s->in, s->group, y2, work, wb, threads);
        CHECK(memcmp(y2, y8, ybytes) == 0, "%s: float16 scales give other i8 results", ep_kernels_name(kt));
        rc |= ep_gemm_xnor(kt, bits, bs, s->n, planes, g_scales16, EP_SCALES_F16, NULL, s->k, s->out, s->in, s->group, y2, work, wb, threads);
        CHECK(memcmp(y2, yx, ybytes) == 0, "%s: float16 scales give other xnor results", ep_kernels_name(kt));
        free(y2);
    }
    if (g_codes) {
        /* 8-bit codes times row multipliers.  Summed per group as integers (ep_int_scales), they
         * round less than their float32 products, so they stay close to those; with groups too
         * long for that, the products are the same floats, so the results are the same bits. */
        float *y2 = xalloc(ybytes);
        const int exact = !ep_int_scales(EP_SCALES_U8, s->k,
                                         ep_longest_group(ep_padded_in(s->in), ep_n_groups(s->in, s->group) == 1 ? ep_padded_in(s->in) : s->group,
                                                          ep_n_groups(s->in, s->group)));
        for (int xn = 0; xn < 2; xn++) {
            float *y3 = xn ? yxu : y8u;
            if (xn) {
                rc |= ep_gemm_xnor(kt, bits, bs, s->n, planes, g_from_codes, EP_SCALES_F32, NULL, s->k, s->out, s->in, s->group, y2, work, wb, threads);
                rc |= ep_gemm_xnor(kt, bits, bs, s->n, planes, g_codes, EP_SCALES_U8, g_rows, s->k, s->out, s->in, s->group, y3, work, wb, threads);
            } else {
                rc |= ep_gemm_planes_i8(kt, q, qs, s->n, planes, g_from_codes, EP_SCALES_F32, NULL, s->k, s->out, s->in, s->group, y2, work, wb, threads);
                rc |= ep_gemm_planes_i8(kt, q, qs, s->n, planes, g_codes, EP_SCALES_U8, g_rows, s->k, s->out, s->in, s->group, y3, work, wb, threads);
            }
            if (exact) {
                CHECK(memcmp(y2, y3, ybytes) == 0, "%s: 8-bit scales in long groups give other %s results than their products",
                      ep_kernels_name(kt), xn ? "xnor" : "i8");
            } else {
                double top = 0, worst = 0;
                for (int64_t u = 0; u < s->n * s->out; u++) {
                    top = fmax(top, fabs((double)y2[u]));
                    worst = fmax(worst, fabs((double)y2[u] - (double)y3[u]));
                }
                CHECK(worst <= 1e-5 * top, "%s: 8-bit scales' %s results %g from their float32 products' (largest %g)",
                      ep_kernels_name(kt), xn ? "xnor" : "i8", worst, top);
            }
        }
        free(y2);
    }
    CHECK(rc == 0, "%s: rc=%d", ep_kernels_name(kt), rc);
    free(work);
}

static void check_shape(const shape *s, int special) {
    int64_t tiles = ep_padded_out(s->out) / EP_TILE, ncol = ep_padded_in(s->in) / 8;
    int64_t ng = ep_n_groups(s->in, s->group);
    size_t np = (size_t)(s->k * tiles * ncol * EP_TILE), ns = (size_t)(s->k * tiles * ng * EP_TILE);
    size_t nx = (size_t)(s->n * s->in), nb = (size_t)(s->n * ncol), ny = (size_t)(s->n * s->out);
    float *x = xalloc(nx * 4), *scales = xalloc(ns * 4);
    uint8_t *planes = xalloc(np);
    for (size_t u = 0; u < nx; u++) x[u] = rndf() * 3.0f;
    if (special == 1) /* one token at extremes: all +-absmax, all bits set: overflow bait */
        for (size_t u = 0; u < nx; u++) x[u] = (u % 3 == 0) ? 2.0f : 2.0f;
    for (size_t u = 0; u < np; u++) planes[u] = special == 1 ? 0xFF : (uint8_t)rnd();  /* padding bits too */
    uint16_t *s16 = xalloc(ns * 2);
    for (size_t u = 0; u < ns; u++) {  /* random halves, so float32 and float16 hold the same values */
        s16[u] = special == 1 ? 0x3c00 : (uint16_t)((0x2000 + rnd() % 0x2800) | ((rnd() & 1) << 15));
        scales[u] = ep_half_to_float(s16[u]);
    }
    g_scales16 = s16;
    uint8_t *codes = xalloc(ns);
    float *rows = xalloc((size_t)(tiles * EP_TILE * 4)), *from_codes = xalloc(ns * 4);
    for (int64_t r = 0; r < tiles * EP_TILE; r++) rows[r] = 1e-3f * (1.0f + rndf() * rndf());
    for (size_t u = 0; u < ns; u++) {
        codes[u] = (uint8_t)rnd();
        from_codes[u] = (float)codes[u] * rows[((u / (size_t)(ng * EP_TILE)) % (size_t)tiles) * EP_TILE + u % EP_TILE];
    }
    g_codes = codes, g_rows = rows, g_from_codes = from_codes;
    const ep_kernels *ref = ep_kernels_get("scalar");
    int8_t *q0 = xalloc(nx), *q1 = xalloc(nx);
    uint8_t *b0 = xalloc(nb), *b1 = xalloc(nb);
    float *qs0 = xalloc(s->n * 4), *qs1 = xalloc(s->n * 4), *bs0 = xalloc(s->n * 4), *bs1 = xalloc(s->n * 4);
    float *y80 = xalloc(ny * 4), *y81 = xalloc(ny * 4), *yx0 = xalloc(ny * 4), *yx1 = xalloc(ny * 4);
    float *u80 = xalloc(ny * 4), *u81 = xalloc(ny * 4), *ux0 = xalloc(ny * 4), *ux1 = xalloc(ny * 4);
    run(ref, s, x, planes, scales, 1, q0, qs0, b0, bs0, y80, yx0, u80, ux0);
    if (special == 1) {
        /* every input is +absmax -> q = 127, every bit -1: each group sums to -127*len exactly */
        for (int64_t tok = 0; tok < s->n; tok++)
            for (int64_t r = 0; r < s->out; r++) {
                double want = 0;
                for (int64_t j = 0; j < ng; j++) {
                    int64_t len = (ng == 1 ? s->in : ep_min64((j + 1) * s->group, s->in) - j * s->group);
                    want += (double)s->k * (-127.0 * (double)len);
                }
                float got = y80[tok * s->out + r] / qs0[tok];
                CHECK(fabs(got - want) <= 1e-6 * fabs(want), "overflow case ref: got %g want %g", got, want);
            }
    }
    char names[256];
    snprintf(names, sizeof names, "%s", ep_kernels_compiled());
    for (char *name = strtok(names, ","); name; name = strtok(NULL, ",")) {
        const ep_kernels *kt = ep_kernels_get(name);
        if (!kt || kt == ref) continue;
        for (int threads = 1; threads <= 3; threads += 2) {
            memset(y81, 0xAB, ny * 4);
            memset(yx1, 0xAB, ny * 4);
            memset(u81, 0xAB, ny * 4);
            memset(ux1, 0xAB, ny * 4);
            run(kt, s, x, planes, scales, threads, q1, qs1, b1, bs1, y81, yx1, u81, ux1);
            const char *v = ep_kernels_name(kt);
            CHECK(memcmp(q0, q1, nx) == 0, "%s quantize_i8 differs (in=%lld)", v, (long long)s->in);
            CHECK(memcmp(qs0, qs1, s->n * 4) == 0, "%s quantize scale differs", v);
            CHECK(memcmp(b0, b1, nb) == 0, "%s binarize bits differ (in=%lld)", v, (long long)s->in);
            CHECK(memcmp(bs0, bs1, s->n * 4) == 0, "%s binarize scale differs", v);
            int64_t bad8 = -1, badx = -1, badu8 = -1, badux = -1;
            for (size_t u = 0; u < ny; u++) {
                if (memcmp(&y80[u], &y81[u], 4) && bad8 < 0) bad8 = (int64_t)u;
                if (memcmp(&yx0[u], &yx1[u], 4) && badx < 0) badx = (int64_t)u;
                if (memcmp(&u80[u], &u81[u], 4) && badu8 < 0) badu8 = (int64_t)u;
                if (memcmp(&ux0[u], &ux1[u], 4) && badux < 0) badux = (int64_t)u;
            }
            CHECK(badu8 < 0 && badux < 0, "%s with 8-bit scales n=%lld k=%lld out=%lld in=%lld g=%lld threads=%d: i8 y[%lld], xnor y[%lld] differ",
                  v, (long long)s->n, (long long)s->k, (long long)s->out, (long long)s->in, (long long)s->group,
                  threads, (long long)badu8, (long long)badux);
            CHECK(bad8 < 0, "%s gemm_planes_i8 n=%lld k=%lld out=%lld in=%lld g=%lld threads=%d: y[%lld] %.9g != %.9g",
                  v, (long long)s->n, (long long)s->k, (long long)s->out, (long long)s->in, (long long)s->group,
                  threads, (long long)bad8, bad8 < 0 ? 0.0 : y81[bad8], bad8 < 0 ? 0.0 : y80[bad8]);
            CHECK(badx < 0, "%s gemm_xnor n=%lld k=%lld out=%lld in=%lld g=%lld threads=%d: y[%lld] %.9g != %.9g",
                  v, (long long)s->n, (long long)s->k, (long long)s->out, (long long)s->in, (long long)s->group,
                  threads, (long long)badx, badx < 0 ? 0.0 : yx1[badx], badx < 0 ? 0.0 : yx0[badx]);
        }
    }
    g_scales16 = NULL;
    free(s16);
    g_codes = NULL, g_rows = g_from_codes = NULL;
    free(codes); free(rows); free(from_codes);
    free(x); free(scales); free(planes); free(q0); free(q1); free(b0); free(b1);
    free(qs0); free(qs1); free(bs0); free(bs1); free(y80); free(y81); free(yx0); free(yx1);
    free(u80); free(u81); free(ux0); free(ux1);
}

/* The dense helpers of the forward pass: every variant bit for bit equal to the scalar one. */
static void check_dense_helpers(void) {
    const ep_kernels *ref = ep_kernels_get("scalar");
    /* widths: every tail of the 8-, 16- and 32-byte steps; the second 4097 with extreme bytes, whose
     * dots (4097 * 127 * 127 = 6.6e7) overflow any int16 partial sum but fit int32 lanes */
    static const int64_t ins[] = {1, 7, 8, 63, 64, 65, 576, 4097, 4097};
    for (size_t a = 0; a < sizeof ins / sizeof *ins; a++) {
        int64_t in = ins[a], out = 19, n = 5;
        const int extreme = a == 8;
        float *x = xalloc(n * in * 4), *wf = xalloc(out * in * 4), *ws = xalloc(out * 4), *qs = xalloc(n * 4);
        uint16_t *wh = xalloc(out * in * 2);
        int8_t *q = xalloc(n * in), *w8 = xalloc(out * in);
        for (int64_t i = 0; i < n * in; i++) { x[i] = rndf(); q[i] = (int8_t)(rnd() % 255 - 127); }
        for (int64_t i = 0; i < out * in; i++) {
            wf[i] = rndf();
            w8[i] = (int8_t)(rnd() % 255 - 127);
            wh[i] = (uint16_t)(0x3000 + rnd() % 0x1000) | (uint16_t)((rnd() & 1) << 15);  /* normal halves */
        }
        for (int64_t i = 0; i < out; i++) ws[i] = rndf();
        for (int64_t i = 0; i < n; i++) qs[i] = rndf();
        if (extreme) {  /* every product +-127 * 127, the same sign along a row */
            for (int64_t i = 0; i < n * in; i++) q[i] = (int8_t)(i / in % 2 ? -127 : 127);
            for (int64_t i = 0; i < out * in; i++) w8[i] = (int8_t)(i / in % 3 ? 127 : -127);
        }
        float *y0 = xalloc(n * out * 4), *y1 = xalloc(n * out * 4);
        char names[256];
        snprintf(names, sizeof names, "%s", ep_kernels_compiled());
        for (char *name = strtok(names, ","); name; name = strtok(NULL, ",")) {
            const ep_kernels *kt = ep_kernels_get(name);
            if (!kt || kt == ref) continue;
            for (int f16 = 0; f16 < 2; f16++) {
                ref->dense_rows(x, n, in, f16 ? (const void *)wh : wf, f16, y0, out, 0, out);
                kt->dense_rows(x, n, in, f16 ? (const void *)wh : wf, f16, y1, out, 2, out);
                kt->dense_rows(x, n, in, f16 ? (const void *)wh : wf, f16, y1, out, 0, 2);
                CHECK(memcmp(y0, y1, n * out * 4) == 0, "%s dense_rows f16=%d in=%lld differs", name, f16, (long long)in);
            }
            ref->i8_rows(q, qs, n, in, w8, ws, y0, out, 0, out);
            for (int64_t t = 0; extreme && t < n; t++)  /* the known answer */
                for (int64_t r = 0; r < out; r++) {
                    const int32_t d = (int32_t)in * 127 * 127 * (t % 2 ? -1 : 1) * (r % 3 ? 1 : -1);
                    const float want = ((float)d * ws[r]) * qs[t];
                    CHECK(memcmp(&want, &y0[t * out + r], 4) == 0, "scalar i8_rows extreme t=%lld r=%lld: %g != %g",
                          (long long)t, (long long)r, y0[t * out + r], want);
                }
            kt->i8_rows(q, qs, n, in, w8, ws, y1, out, 0, out);
            CHECK(memcmp(y0, y1, n * out * 4) == 0, "%s i8_rows in=%lld%s differs", name, (long long)in,
                  extreme ? " (extreme bytes)" : "");
            for (int64_t t = 0; t < n; t++) {  /* one token (decode's blocks of rows), in two ranges */
                kt->i8_rows(q + t * in, qs + t, 1, in, w8, ws, y1, out, 5, out);
                kt->i8_rows(q + t * in, qs + t, 1, in, w8, ws, y1, out, 0, 5);
                CHECK(memcmp(y0 + t * out, y1, out * 4) == 0, "%s i8_rows one token t=%lld in=%lld%s differs", name,
                      (long long)t, (long long)in, extreme ? " (extreme bytes)" : "");
            }
            float d0 = ref->dot(x, wf, in), d1 = kt->dot(x, wf, in);
            CHECK(memcmp(&d0, &d1, 4) == 0, "%s dot in=%lld: %g != %g", name, (long long)in, d1, d0);
        }
        free(x); free(wf); free(ws); free(qs); free(wh); free(q); free(w8); free(y0); free(y1);
    }
    /* attention: 1 to 5 heads per key head (values three heads at a time, then the rest), head
     * sizes 64 and 24 (the fallback), T from 1 to past several blocks of 8 keys; queries up to 40
     * wide, so scores span exp's whole range; keys and values float32 and float16 */
    for (int64_t hd = 24; hd <= 64; hd += 40)
        for (int64_t G = 1; G <= 5; G++)
            for (int64_t T = 1; T <= 140; T += (T < 20 ? 1 : 23)) {
                int64_t kstride = 2 * hd;  /* two key heads interleaved, as in the cache */
                float *q = xalloc(G * hd * 4), *k = xalloc(T * kstride * 4), *v = xalloc(T * kstride * 4);
                float *o0 = xalloc(G * hd * 4), *o1 = xalloc(G * hd * 4), *sc = xalloc(G * T * 4);
                const float qscale = T % 3 == 0 ? 40.0f : 1.0f;
                for (int64_t i = 0; i < G * hd; i++) q[i] = rndf() * qscale;
                for (int64_t i = 0; i < T * kstride; i++) { k[i] = rndf(); v[i] = rndf(); }
                /* the same keys and values as float16, and widened back: float16 attention is
                 * float32 attention over the widened values */
                uint16_t *kh = xalloc(T * kstride * 2), *vh = xalloc(T * kstride * 2);
                float *kw = xalloc(T * kstride * 4), *vw = xalloc(T * kstride * 4), *oh = xalloc(G * hd * 4);
                ref->to_half(k, T * kstride, kh);
                ref->to_half(v, T * kstride, vh);
                for (int64_t i = 0; i < T * kstride; i++) { kw[i] = ep_half_to_float(kh[i]); vw[i] = ep_half_to_float(vh[i]); }
                ref->attend(q, G, kw, vw, 0, kstride, T, hd, 0.125f, oh, sc);
                ref->attend(q, G, kh, vh, 1, kstride, T, hd, 0.125f, o1, sc);
                CHECK(memcmp(oh, o1, G * hd * 4) == 0, "scalar float16 attend hd=%lld G=%lld T=%lld is not float32's over the widened values",
                      (long long)hd, (long long)G, (long long)T);
                ref->attend(q, G, k, v, 0, kstride, T, hd, 0.125f, o0, sc);
                char names[256];
                snprintf(names, sizeof names, "%s", ep_kernels_compiled());
                for (char *name = strtok(names, ","); name; name = strtok(NULL, ",")) {
                    const ep_kernels *kt = ep_kernels_get(name);
                    if (!kt || kt == ref) continue;
                    kt->attend(q, G, k, v, 0, kstride, T, hd, 0.125f, o1, sc);
                    CHECK(memcmp(o0, o1, G * hd * 4) == 0, "%s attend hd=%lld G=%lld T=%lld differs", name,
                          (long long)hd, (long long)G, (long long)T);
                    kt->attend(q, G, kh, vh, 1, kstride, T, hd, 0.125f, o1, sc);
                    CHECK(memcmp(oh, o1, G * hd * 4) == 0, "%s float16 attend hd=%lld G=%lld T=%lld differs", name,
                          (long long)hd, (long long)G, (long long)T);
                }
                free(q); free(k); free(v); free(o0); free(o1); free(sc); free(kh); free(vh); free(kw); free(vw); free(oh);
            }
}

/* float32 -> float16 (the cache's store): every float16 value comes back as itself; a value
 * halfway between two neighbours rounds to the even one, a hair either side to the nearer; past
 * 65520 to infinity; and every variant gives the scalar bits on a run with a tail. */
static void check_to_half(void) {
    const ep_kernels *ref = ep_kernels_get("scalar");
    for (uint32_t h = 0; h < 0x10000u; h++) {
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) continue;   /* NaN */
        const float f = ep_half_to_float((uint16_t)h);
        CHECK(ep_float_to_half(f) == h, "to_half(%g) != 0x%04x", f, h);
        if ((h & 0x7fffu) >= 0x7bffu) continue;                   /* the largest finite, infinity */
        const float g = ep_half_to_float((uint16_t)(h + 1));      /* the next away from zero */
        const double mid = ((double)f + (double)g) / 2;
        const float fm = (float)mid, lo = nextafterf(fm, f), hi = nextafterf(fm, g);
        CHECK((double)fm == mid, "midpoint of 0x%04x not a float", h);
        CHECK(ep_float_to_half(fm) == ((h & 1u) ? h + 1 : h), "to_half(midpoint after 0x%04x) not even", h);
        CHECK(ep_float_to_half(lo) == h && ep_float_to_half(hi) == h + 1, "to_half near 0x%04x", h);
    }
    CHECK(ep_float_to_half(65519.99f) == 0x7bffu && ep_float_to_half(65520.0f) == 0x7c00u &&
          ep_float_to_half(-1e30f) == 0xfc00u && ep_float_to_half(1e-30f) == 0, "to_half's ends");
    enum { N = 1029 };
    float x[N];
    uint16_t h0[N], h1[N];
    for (int i = 0; i < N; i++) x[i] = rndf() * (i % 7 == 0 ? 1e5f : i % 5 == 0 ? 1e-6f : 3.0f);
    ref->to_half(x, N, h0);
    char names[256];
    snprintf(names, sizeof names, "%s", ep_kernels_compiled());
    for (char *name = strtok(names, ","); name; name = strtok(NULL, ",")) {
        const ep_kernels *kt = ep_kernels_get(name);
        if (!kt || kt == ref) continue;
        kt->to_half(x, N, h1);
        CHECK(memcmp(h0, h1, sizeof h0) == 0, "%s to_half differs", name);
    }
}

/* The MLP's rotation: every variant bit for bit with scalar, blocks of 4 (the scalar fallback)
 * to 512, one block and three mixed, a lone block scaled or not. */
static void check_rotate(void) {
    static const int64_t ps[] = {4, 8, 16, 64, 512};
    static const struct { int64_t M; int unit; } cases[] = {{1, 0}, {1, 1}, {3, 0}};   /* unit: mix[0] = 1 */
    const ep_kernels *ref = ep_kernels_get("scalar");
    for (size_t pi = 0; pi < sizeof ps / sizeof *ps; pi++)
        for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
            const int64_t P = ps[pi], M = cases[ci].M, D = P * M;
            float *signs = xalloc(D * 4), *mix = xalloc(M * M * 4), *x = xalloc(D * 4), *y0 = xalloc(D * 4),
                  *y1 = xalloc(D * 4), *tmp = xalloc(D * 4);
            for (int64_t i = 0; i < D; i++) { signs[i] = rndf() < 0 ? -1.0f : 1.0f; x[i] = rndf() * 3.0f; }
            for (int64_t i = 0; i < M * M; i++) mix[i] = rndf();
            if (cases[ci].unit) mix[0] = 1.0f;
            memcpy(y0, x, D * 4);
            ref->rotate_row(signs, mix, P, M, y0, tmp);
            char names[256];
            snprintf(names, sizeof names, "%s", ep_kernels_compiled());
            for (char *name = strtok(names, ","); name; name = strtok(NULL, ",")) {
                const ep_kernels *kt = ep_kernels_get(name);
                if (!kt || kt == ref) continue;
                memcpy(y1, x, D * 4);
                kt->rotate_row(signs, mix, P, M, y1, tmp);
                CHECK(memcmp(y0, y1, D * 4) == 0, "%s rotate_row P=%lld M=%lld differs", name, (long long)P, (long long)M);
            }
            free(signs); free(mix); free(x); free(y0); free(y1); free(tmp);
        }
}

/* The gated MLP's SiLU: every variant bit for bit with scalar, over lengths with and without a
 * tail, values past exp's range on both sides, infinities and NaN; scalar within a few ulp of
 * the float64 formula. */
static void check_silu(void) {
    static const int64_t lens[] = {1, 7, 8, 9, 64, 1539};
    const ep_kernels *ref = ep_kernels_get("scalar");
    for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
        const int64_t n = lens[li];
        float *g = xalloc(n * 4), *u = xalloc(n * 4), *y0 = xalloc(n * 4), *y1 = xalloc(n * 4);
        for (int64_t i = 0; i < n; i++) {
            g[i] = rndf() * (i % 5 == 0 ? 120.0f : 8.0f);
            u[i] = rndf();
        }
        if (n > 9) { g[1] = INFINITY; g[2] = -INFINITY; g[3] = NAN; g[4] = -0.0f; }
        memcpy(y0, u, n * 4);
        ref->silu_mul(g, y0, n);
        for (int64_t i = 5; i < n; i++) {
            const double x = g[i], want = x / (1.0 + exp(-x)) * (double)u[i];
            CHECK(fabs(y0[i] - want) <= 8.0 * FLT_EPSILON * fabs(want) + 1e-30, "scalar silu_mul(%g) = %g, float64 %g",
                  g[i], y0[i], want);
        }
        char names[256];
        snprintf(names, sizeof names, "%s", ep_kernels_compiled());
        for (char *name = strtok(names, ","); name; name = strtok(NULL, ",")) {
            const ep_kernels *kt = ep_kernels_get(name);
            if (!kt || kt == ref) continue;
            memcpy(y1, u, n * 4);
            kt->silu_mul(g, y1, n);
            CHECK(memcmp(y0, y1, n * 4) == 0, "%s silu_mul n=%lld differs", name, (long long)n);
        }
        free(g); free(u); free(y0); free(y1);
    }
}

/* The scale tuner's gather: every variant's lookup16 (16-bit and float32 tables of 2..16 levels)
 * bit for bit with scalar, and scalar against the definition, over lengths with and without a
 * tail (a 16-bit value's every bit copied: NaN patterns included). */
static void check_lookup16(void) {
    static const int64_t lens[] = {0, 1, 7, 8, 31, 32, 33, 64, 70, 200};
    const ep_kernels *ref = ep_kernels_get("scalar");
    for (int L = 2; L <= 16; L *= 2)
        for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
            const int64_t n = lens[li];
            uint16_t lev16[16], *w16a = xalloc(n * 2 + 2), *w16b = xalloc(n * 2 + 2);
            float lev[16], *wa = xalloc(n * 4 + 4), *wb = xalloc(n * 4 + 4);
            uint8_t *codes = xalloc(n + 1);
            for (int l = 0; l < L; l++) {
                lev[l] = rndf() * 10.0f;
                lev16[l] = (uint16_t)(rnd() >> 48);
            }
            for (int64_t i = 0; i < n; i++) codes[i] = (uint8_t)(rnd() % (uint64_t)L);
            ref->lookup16_u16(lev16, L, codes, n, w16a);
            ref->lookup16_f32(lev, L, codes, n, wa);
            for (int64_t i = 0; i < n; i++)
                CHECK(w16a[i] == lev16[codes[i]] && wa[i] == lev[codes[i]], "scalar lookup16 L=%d n=%lld at %lld",
                      L, (long long)n, (long long)i);
            char names[256];
            snprintf(names, sizeof names, "%s", ep_kernels_compiled());
            for (char *name = strtok(names, ","); name; name = strtok(NULL, ",")) {
                const ep_kernels *kt = ep_kernels_get(name);
                if (!kt || kt == ref) continue;
                kt->lookup16_u16(lev16, L, codes, n, w16b);
                kt->lookup16_f32(lev, L, codes, n, wb);
                CHECK(memcmp(w16a, w16b, n * 2) == 0 && memcmp(wa, wb, n * 4) == 0, "%s lookup16 L=%d n=%lld differs",
                      name, L, (long long)n);
            }
            free(w16a); free(w16b); free(wa); free(wb); free(codes);
        }
}

/* The softmax's exp: within EP_EXP_MAX_ULP of exp over its range, exact at the edges. */
static void check_expf(void) {
    float worst = 0.0f;
    for (float x = -86.9f; x < 87.9f; x += 0.0137f) {
        double want = exp((double)x), got = (double)ep_expf(x);
        float ulp = nextafterf((float)want, INFINITY) - (float)want;
        float err = (float)(fabs(got - want) / ulp);
        if (err > worst) worst = err;
    }
    CHECK(worst <= EP_EXP_MAX_ULP, "ep_expf is %g ulp from exp", worst);
    CHECK(ep_expf(0.0f) == 1.0f && ep_expf(-0.0f) == 1.0f, "ep_expf(0) != 1");
    CHECK(ep_expf(-INFINITY) == 0.0f && ep_expf(-100.0f) == 0.0f, "ep_expf underflow");
    CHECK(isinf(ep_expf(INFINITY)) && isinf(ep_expf(100.0f)) && isnan(ep_expf(NAN)), "ep_expf edges");
}

/* The plane counts the ABI accepts are the ones checked above: 1..EP_MAX_PLANES. */
static void check_limits(void) {
    const ep_kernels *ref = ep_kernels_get("scalar");
    const int64_t out = 16, in = 64, n = 1, wb = ep_workspace_bytes(n, out, in, in);
    uint8_t *planes = xalloc((EP_MAX_PLANES + 1) * out * in / 8);
    float *scales = xalloc((EP_MAX_PLANES + 1) * out * 4), *w = xalloc((EP_MAX_PLANES + 1) * out * in * 4);
    float *y = xalloc(n * out * 4), qs = 1.0f;
    int8_t *q = xalloc(n * in);
    void *work = xalloc((size_t)wb);
    memset(planes, 0, (EP_MAX_PLANES + 1) * out * in / 8);
    memset(scales, 0, (EP_MAX_PLANES + 1) * out * 4);
    memset(w, 0, (EP_MAX_PLANES + 1) * out * in * 4);
    memset(q, 0, n * in);
    for (int64_t k = 0; k <= EP_MAX_PLANES + 1; k++) {
        const int want = k >= 1 && k <= EP_MAX_PLANES ? EP_OK : EP_EINVAL;
        int rc = ep_gemm_planes_i8(ref, q, &qs, n, planes, scales, EP_SCALES_F32, NULL, k, out, in, in, y, work, wb, 1);
        CHECK(rc == want, "gemm with k=%lld planes: rc %d, expected %d", (long long)k, rc, want);
        rc = ep_pack_planes(w, k, out, in, planes);
        CHECK(rc == want, "pack_planes with k=%lld planes: rc %d, expected %d", (long long)k, rc, want);
    }
    free(planes); free(scales); free(w); free(y); free(q); free(work);
}

/* Known answers from the NumPy reference: see tools/make_kat.py for the layout. */
static int check_kat(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { printf("FAIL: cannot open %s\n", path); return 1; }
    char magic[8];
    uint32_t count;
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "EPKAT01\n", 8) || fread(&count, 4, 1, f) != 1) {
        printf("FAIL: %s is not a known-answer file\n", path);
        fclose(f);
        return 1;
    }
    int cases = 0;
    for (uint32_t c = 0; c < count; c++) {
        int64_t hdr[5];
        if (fread(hdr, 8, 5, f) != 5) { printf("FAIL: truncated KAT\n"); failures++; break; }
        shape s = {hdr[0], hdr[1], hdr[2], hdr[3], hdr[4]};
        int64_t tiles = ep_padded_out(s.out) / EP_TILE, ncol = ep_padded_in(s.in) / 8;
        int64_t ng = ep_n_groups(s.in, s.group);
        size_t np = (size_t)(s.k * tiles * ncol * EP_TILE), ns = (size_t)(s.k * tiles * ng * EP_TILE);
        size_t nx = (size_t)(s.n * s.in), nb = (size_t)(s.n * ncol), ny = (size_t)(s.n * s.out);
        float *x = xalloc(nx * 4), *scales = xalloc(ns * 4), *qs = xalloc(s.n * 4), *bs = xalloc(s.n * 4);
        uint8_t *planes = xalloc(np), *bits = xalloc(nb), *bits_got = xalloc(nb);
        int8_t *q = xalloc(nx), *q_got = xalloc(nx);
        float *y8 = xalloc(ny * 4), *yx = xalloc(ny * 4), *y8g = xalloc(ny * 4), *yxg = xalloc(ny * 4);
        float *qsg = xalloc(s.n * 4), *bsg = xalloc(s.n * 4);
        int ok = fread(x, 4, nx, f) == nx && fread(planes, 1, np, f) == np && fread(scales, 4, ns, f) == ns &&
                 fread(q, 1, nx, f) == nx && fread(qs, 4, s.n, f) == (size_t)s.n &&
                 fread(bits, 1, nb, f) == nb && fread(bs, 4, s.n, f) == (size_t)s.n &&
                 fread(y8, 4, ny, f) == ny && fread(yx, 4, ny, f) == ny;
        if (!ok) { printf("FAIL: truncated KAT case %u\n", c); failures++; break; }
        char names[256];
        snprintf(names, sizeof names, "%s", ep_kernels_compiled());
        for (char *name = strtok(names, ","); name; name = strtok(NULL, ",")) {
            const ep_kernels *kt = ep_kernels_get(name);
            if (!kt) continue;
            run(kt, &s, x, planes, scales, 2, q_got, qsg, bits_got, bsg, y8g, yxg, NULL, NULL);  /* no 8-bit codes here */
            CHECK(memcmp(q, q_got, nx) == 0, "KAT %u %s: q differs from NumPy", c, name);
            CHECK(memcmp(bits, bits_got, nb) == 0, "KAT %u %s: bits differ from NumPy", c, name);
            for (int64_t t = 0; t < s.n; t++) {
                CHECK(qs[t] == qsg[t], "KAT %u %s: quantize scale %g != %g", c, name, qsg[t], qs[t]);
                CHECK(fabsf(bs[t] - bsg[t]) <= 1e-6f * bs[t], "KAT %u %s: binarize scale %g != %g", c, name, bsg[t], bs[t]);
            }
            /* y from float64 sums in NumPy: agree to float32 summation error */
            for (size_t u = 0; u < ny; u++) {
                float tol8 = 1e-4f * (1.0f + fabsf(y8[u])), tolx = 1e-4f * (1.0f + fabsf(yx[u]));
                CHECK(fabsf(y8[u] - y8g[u]) <= tol8, "KAT %u %s: i8 y[%zu] %g != %g", c, name, u, y8g[u], y8[u]);
                CHECK(fabsf(yx[u] - yxg[u]) <= tolx * 10, "KAT %u %s: xnor y[%zu] %g != %g", c, name, u, yxg[u], yx[u]);
                if (failures > 20) break;
            }
        }
        cases++;
        free(x); free(scales); free(qs); free(bs); free(planes); free(bits); free(bits_got); free(q); free(q_got);
        free(y8); free(yx); free(y8g); free(yxg); free(qsg); free(bsg);
    }
    fclose(f);
    printf("known answers: %d cases\n", cases);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("compiled variants: %s; best here: %s\n", ep_kernels_compiled(), ep_kernels_name(ep_kernels_get(NULL)));
    {  /* what this CPU runs, so what the checks below compare with scalar */
        char names[256], runs[256] = "";
        snprintf(names, sizeof names, "%s", ep_kernels_compiled());
        for (char *name = strtok(names, ","); name; name = strtok(NULL, ","))
            if (strcmp(name, "scalar") != 0 && ep_kernels_get(name))
                snprintf(runs + strlen(runs), sizeof runs - strlen(runs), "%s%s", runs[0] ? "," : "", name);
        printf("checked against scalar here: %s\n", runs[0] ? runs : "none");
    }
    static const int64_t ins[] = {1, 7, 63, 64, 65, 127, 576, 1536, 4097};
    static const int64_t outs[] = {1, 3, 17, 576};
    static const int64_t toks[] = {1, 2, 9, 64};
    static const int64_t groups[] = {32, 64, 128, 256, 0};  /* 0: one group per row */
    int cases = 0;
    for (size_t a = 0; a < sizeof ins / sizeof *ins; a++)
        for (size_t b = 0; b < sizeof outs / sizeof *outs; b++) {
            int64_t g = groups[(a + b) % 5];
            shape s = {toks[(a + 2 * b) % 4], (int64_t)((a + b) % EP_MAX_PLANES) + 1, outs[b], ins[a], g ? g : ins[a]};
            if (s.n * s.out * s.in > 4000000) s.n = 2;  /* keep the scalar reference quick */
            check_shape(&s, 0);
            cases++;
        }
    for (size_t gi = 0; gi < 5; gi++)  /* every plane count the ABI accepts */
        for (int64_t k = 1; k <= EP_MAX_PLANES; k++) {
            shape s = {3, k, 40, 333, groups[gi] ? groups[gi] : 333};
            check_shape(&s, 0);
            cases++;
        }
    /* one token over the model's widths, every unrolled group (the decode kernels when the groups
     * fill the padded row: all but 576 in groups of 128 or 256), 1, 2 and 4 planes, a partial tile */
    for (size_t gi = 0; gi < 4; gi++)
        for (int64_t in = 576; in <= 1536; in += 960)
            for (int64_t k = 1; k <= 4; k *= 2) {
                shape s = {1, k, 40, in, groups[gi]};
                check_shape(&s, 0);
                cases++;
            }
    /* one token, one plane, rows wider than L1's tables: tiles walked side by side (1 and 6 tiles) */
    for (size_t gi = 0; gi < 5; gi++)
        for (int64_t out = 16; out <= 83; out += 67) {
            shape s = {1, 1, out, 4097, groups[gi] ? groups[gi] : 4097};
            check_shape(&s, 0);
            cases++;
        }
    shape big = {2, 4, 17, 4097, 4097};
    check_shape(&big, 1);
    shape big2 = {1, 3, 5, 1536, 256};
    check_shape(&big2, 1);
    /* many tokens over rows longer than an i16_tiles chunk (EP_I16_CHUNK): widened in pieces */
    for (int64_t g = 64; g <= 1024; g *= 4) {
        shape s = {17, 4, 33, 4097, g};
        check_shape(&s, 0);
        cases++;
    }
    /* 4 planes over one group of 16640 inputs: too long for integer 8-bit scales (ep_int_scales) */
    shape big3 = {2, 4, 17, 16640, 16640};
    check_shape(&big3, 1);
    cases += 3;
    check_dense_helpers();
    check_expf();
    check_silu();
    check_to_half();
    check_rotate();
    check_lookup16();
    check_limits();
    printf("random cases: %d\n", cases);
    if (argc > 1) check_kat(argv[1]);
    printf(failures ? "FAILED: %d\n" : "ok\n", failures);
    return failures ? 1 : 0;
}
