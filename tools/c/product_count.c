/* One planes product (ep_gemm_planes_i8, one thread) of a given shape, `reps` times: the program
 * tools/kernel_counts.py runs under an instruction counter (qemu-aarch64 for the NEON variants,
 * callgrind for x86), twice with different reps, so that the difference is the instructions of
 * `reps` products and nothing else.  Inputs are fixed pseudo-random values.
 *
 *     product_count VARIANT N K OUT IN GROUP REPS [SCALES]
 *
 * SCALES: f32 (the default), f16, or u8 (8-bit codes times a float multiplier per row, the
 * default model's: its integer arithmetic). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgepanel.h"

static uint64_t state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static void *xalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc != 8 && argc != 9) {
        fprintf(stderr, "usage: %s VARIANT N K OUT IN GROUP REPS [f32|f16|u8]\n", argv[0]);
        return 2;
    }
    const char *kind_name = argc == 9 ? argv[8] : "f32";
    const int kind = !strcmp(kind_name, "f32") ? EP_SCALES_F32 : !strcmp(kind_name, "f16") ? EP_SCALES_F16
                   : !strcmp(kind_name, "u8") ? EP_SCALES_U8 : -1;
    if (kind < 0) {
        fprintf(stderr, "scales: f32, f16 or u8, not %s\n", kind_name);
        return 2;
    }
    const ep_kernels *kt = ep_kernels_get(argv[1]);
    if (!kt) {
        fprintf(stderr, "variant %s is not compiled in or not supported here (compiled: %s)\n", argv[1],
                ep_kernels_compiled());
        return 2;
    }
    const int64_t n = atoll(argv[2]), k = atoll(argv[3]), out = atoll(argv[4]), in = atoll(argv[5]),
                  group = atoll(argv[6]), reps = atoll(argv[7]);
    if (n < 1 || k < 1 || k > EP_MAX_PLANES || out < 1 || in < 1 || group < 0 || reps < 0) {
        fprintf(stderr, "bad shape\n");
        return 2;
    }
    const int64_t tiles = (out + EP_TILE - 1) / EP_TILE, ncol = (in + EP_IN_ALIGN - 1) / EP_IN_ALIGN * EP_IN_ALIGN / 8;
    const int64_t ng = group == 0 || group >= in ? 1 : (in + group - 1) / group;
    int8_t *q = xalloc((size_t)(n * in));
    float *qs = xalloc(sizeof(float) * (size_t)n), *y = xalloc(sizeof(float) * (size_t)(n * out));
    uint8_t *planes = xalloc((size_t)(k * tiles * ncol * EP_TILE));
    const int64_t nsc = k * tiles * ng * EP_TILE;
    float *scales = xalloc(sizeof(float) * (size_t)nsc), *rows = xalloc(sizeof(float) * (size_t)(tiles * EP_TILE));
    uint16_t *halves = xalloc(sizeof(uint16_t) * (size_t)nsc);
    uint8_t *codes = xalloc((size_t)nsc);
    for (int64_t i = 0; i < n * in; i++) q[i] = (int8_t)(rnd() % 255 - 127);
    for (int64_t i = 0; i < n; i++) qs[i] = 0.01f;
    for (int64_t i = 0; i < k * tiles * ncol * EP_TILE; i++) planes[i] = (uint8_t)rnd();
    for (int64_t i = 0; i < nsc; i++) {
        scales[i] = (float)(rnd() % 1000) * 1e-4f;
        halves[i] = (uint16_t)(0x2000 + rnd() % 0x1000);   /* positive normal halves */
        codes[i] = (uint8_t)(rnd() % 256);
    }
    for (int64_t i = 0; i < tiles * EP_TILE; i++) rows[i] = 1e-4f * (float)(1 + rnd() % 100);
    const void *sc = kind == EP_SCALES_F32 ? (const void *)scales : kind == EP_SCALES_F16 ? (const void *)halves : (const void *)codes;
    const int64_t wb = ep_workspace_bytes(n, out, in, group);
    void *work = xalloc((size_t)wb);
    for (int64_t r = 0; r < reps; r++) {
        int rc = ep_gemm_planes_i8(kt, q, qs, n, planes, sc, kind, kind == EP_SCALES_U8 ? rows : NULL, k, out, in, group,
                                   y, work, wb, 1);
        if (rc != 0) {
            fprintf(stderr, "ep_gemm_planes_i8: rc=%d\n", rc);
            return 1;
        }
    }
    double s = 0.0;
    for (int64_t i = 0; i < n * out; i++) s += y[i];
    printf("%s %g\n", ep_kernels_name(kt), s);
    return 0;
}
