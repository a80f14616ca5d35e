/* The public entry points: argument checks, the workspace, the choice of ISA variant, threads.
 * Adding an ISA means adding its table to `variants` below and nothing else here. */
#include <string.h>

#include "ep_internal.h"

#if defined(EP_SIMDE)
/* test builds that emulate an ISA through SIMDe claim every variant */
#define EP_HAVE_X86 1
#elif defined(__x86_64__) || defined(_M_X64)
#define EP_HAVE_X86 1
#endif

static const ep_kernels *const variants[] = {
    /* best first */
#if defined(EP_HAVE_X86)
    &ep_kernels_avx512vnni,
    &ep_kernels_avx512bw,
    &ep_kernels_avx2,
#endif
#if defined(__aarch64__)
    &ep_kernels_neon_dotprod,  /* Armv8.2 dot product (HWCAP_ASIMDDP): Cortex-A76, Pi 5 */
    &ep_kernels_neon,          /* every armv8-a core: Cortex-A72, Pi 4 */
#endif
    &ep_kernels_scalar,
};
#define N_VARIANTS (sizeof(variants) / sizeof(variants[0]))

const ep_kernels *ep_kernels_get(const char *name) {
    for (size_t v = 0; v < N_VARIANTS; v++) {
        const ep_kernels *kt = variants[v];
        if (name && name[0] && strcmp(name, kt->name) != 0) continue;
        if (kt->supported()) return kt;
        if (name && name[0]) return NULL;
    }
    return NULL;
}

const char *ep_kernels_name(const ep_kernels *kt) { return kt ? kt->name : ""; }

const char *ep_kernels_compiled(void) {
    static char buf[256];
    if (!buf[0]) {
        char tmp[256] = "";
        for (size_t v = 0; v < N_VARIANTS; v++) {
            if (v) strcat(tmp, ",");
            strcat(tmp, variants[v]->name);
        }
        memcpy(buf, tmp, sizeof(buf));
    }
    return buf;
}

/* the ABI's names for the shapes (ep_internal.h) */
int64_t ep_padded_in(int64_t in) { return ep_in_pad(in); }
int64_t ep_padded_out(int64_t out) { return ep_out_pad(out); }
int64_t ep_n_groups(int64_t in, int64_t group) { return ep_groups(in, group); }

static int64_t align_up(int64_t v) { return ep_ceil_div(v, EP_WORK_ALIGN) * EP_WORK_ALIGN; }

int64_t ep_workspace_bytes(int64_t n, int64_t out, int64_t in, int64_t group) {
    if (n < 0 || out <= 0 || in <= 0 || group <= 0) return 0;
    return align_up(n * ep_tab_stride(in)) + align_up(n * ep_groups(in, group) * 4) +
           align_up(n * ep_out_pad(out) * 4);
}

int ep_pack_planes(const float *w, int64_t k, int64_t out, int64_t in, uint8_t *planes) {
    if (!w || !planes || k < 1 || k > EP_MAX_PLANES || out <= 0 || in <= 0) return EP_EINVAL;
    int64_t tiles = ep_out_pad(out) / EP_TILE, ncol = ep_in_pad(in) / 8;
    memset(planes, 0, (size_t)(k * tiles * ncol * EP_TILE));
    for (int64_t i = 0; i < k; i++)
        for (int64_t r = 0; r < out; r++) {
            const float *row = w + (i * out + r) * in;
            uint8_t *dst = planes + (i * tiles + r / EP_TILE) * ncol * EP_TILE + r % EP_TILE;
            for (int64_t u = 0; u < in; u++)
                if (row[u] < 0.0f) dst[(u >> 3) * EP_TILE] |= (uint8_t)(1u << (u & 7));
        }
    return EP_OK;
}

static const ep_kernels *resolve(const ep_kernels *kt) { return kt ? kt : ep_kernels_get(NULL); }

int ep_quantize_i8(const ep_kernels *kt, const float *x, int64_t n, int64_t in, int8_t *q,
                   float *scale) {
    kt = resolve(kt);
    if (!x || !q || !scale || n < 0 || in <= 0) return EP_EINVAL;
    for (int64_t t = 0; t < n; t++) kt->quantize_i8(x + t * in, in, q + t * in, scale + t);
    return EP_OK;
}

int ep_binarize(const ep_kernels *kt, const float *x, int64_t n, int64_t in, uint8_t *bits,
                float *scale) {
    kt = resolve(kt);
    if (!x || !bits || !scale || n < 0 || in <= 0) return EP_EINVAL;
    int64_t nb = ep_in_pad(in) / 8;
    for (int64_t t = 0; t < n; t++) kt->binarize(x + t * in, in, bits + t * nb, scale + t);
    return EP_OK;
}

typedef struct {
    const ep_kernels *kt;
    ep_gemm_args a;
    const void *act;      /* int8 q (n, in) or packed bits (n, in_pad/8) */
    int xnor;
} gemm_job;

static void tables_range(void *ctx, int64_t b, int64_t e) {
    gemm_job *job = (gemm_job *)ctx;
    ep_gemm_args *a = &job->a;
    if (a->x16) {  /* i16_tiles: the activations widened, in the table area */
        for (int64_t t = b; t < e; t++)
            ep_widen_i8((const int8_t *)job->act + t * a->in, a->in, a->in_pad, (int16_t *)a->x16 + t * a->in_pad);
        return;
    }
    for (int64_t t = b; t < e; t++) {
        uint8_t *tab = (uint8_t *)a->tab + t * a->tab_stride;
        int32_t *gs = (int32_t *)a->gsum + t * a->ng;
        if (job->xnor)
            job->kt->xnor_tables((const uint8_t *)job->act + t * (a->in_pad / 8), a->in, a->group,
                                 tab, gs);
        else
            job->kt->i8_tables((const int8_t *)job->act + t * a->in, a->in, a->group, tab, gs);
    }
}

static void tiles_range(void *ctx, int64_t b, int64_t e) {
    gemm_job *job = (gemm_job *)ctx;
    if (job->xnor)
        job->kt->xnor_tiles(&job->a, b, e);
    else if (job->a.x16)
        job->kt->i16_tiles(&job->a, b, e);
    else
        job->kt->i8_tiles(&job->a, b, e);
}

static int gemm(const ep_kernels *kt, int xnor, const void *act, const float *ascale, int64_t n,
                const uint8_t *planes, const void *scales, int scales_kind, const float *scale_rows, int64_t k,
                int64_t out, int64_t in,
                int64_t group, float *y, void *work, int64_t work_bytes, int threads) {
    kt = resolve(kt);
    gemm_job job;
    memset(&job, 0, sizeof(job));
    ep_gemm_args *a = &job.a;
    if (!act || !ascale || !y ||
        ep_gemm_args_init(a, planes, scales, scales_kind, scale_rows, k, out, in, group, n) != EP_OK)
        return EP_EINVAL;
    if (n == 0) return EP_OK;
    if (!work || ((uintptr_t)work % EP_WORK_ALIGN) != 0 ||
        work_bytes < ep_workspace_bytes(n, out, in, group))
        return EP_ENOMEM;
    job.kt = kt;
    job.act = act;
    job.xnor = xnor;
    a->tab_stride = ep_tab_stride(in);
    uint8_t *w = (uint8_t *)work;
    a->tab = w;
    w += align_up(n * a->tab_stride);
    a->gsum = (const int32_t *)w;
    w += align_up(n * a->ng * 4);
    a->acc = (float *)w;
    a->ascale = ascale;
    a->y = y;
    if (!xnor && ep_use_i16(kt, a)) a->x16 = (const int16_t *)a->tab;  /* n * in_pad * 2 bytes: within */
    ep_parallel_for(threads, n, tables_range, &job);
    ep_parallel_for(threads, a->tiles, tiles_range, &job);
    return EP_OK;
}

int ep_gemm_planes_i8(const ep_kernels *kt, const int8_t *q, const float *qscale, int64_t n,
                      const uint8_t *planes, const void *scales, int32_t scales_kind,
                      const float *scale_rows, int64_t k, int64_t out, int64_t in, int64_t group, float *y,
                      void *work, int64_t work_bytes, int threads) {
    return gemm(kt, 0, q, qscale, n, planes, scales, scales_kind, scale_rows, k, out, in, group, y, work,
                work_bytes, threads);
}

int ep_gemm_xnor(const ep_kernels *kt, const uint8_t *bits, const float *ascale, int64_t n,
                 const uint8_t *planes, const void *scales, int32_t scales_kind,
                 const float *scale_rows, int64_t k, int64_t out, int64_t in, int64_t group, float *y,
                 void *work, int64_t work_bytes, int threads) {
    return gemm(kt, 1, bits, ascale, n, planes, scales, scales_kind, scale_rows, k, out, in, group, y, work,
                work_bytes, threads);
}
