/* edgepanel's C ABI.
 *
 * This header is the only text cffi's cdef reads (the build strips the preprocessor lines), so it
 * holds plain declarations only.  The bit layout the kernels read is defined in edgepanel/bits.py;
 * ep_internal.h restates the constants for C.
 *
 * Every function returns EP_OK (0) or a negative EP_E* code; the Python binding checks arguments
 * before calling, the C checks are a second line of defence.
 */
#ifndef EDGEPANEL_H
#define EDGEPANEL_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

enum {
    EP_OK = 0,
    EP_EINVAL = -1,       /* an argument is out of range */
    EP_ENOMEM = -2,       /* the workspace is too small */
    EP_EUNSUPPORTED = -3  /* the ISA variant is not compiled in or not supported by this CPU */
};

/* One table of kernels per ISA variant ("scalar", "avx2", "avx512bw", "neon"). */
typedef struct ep_kernels ep_kernels;

/* The variant called `name`, or the best one this CPU runs when name is NULL or "";
 * NULL when that variant is not compiled in or this CPU cannot run it. */
const ep_kernels *ep_kernels_get(const char *name);
const char *ep_kernels_name(const ep_kernels *kt);
/* Comma-separated names of the variants compiled into this build. */
const char *ep_kernels_compiled(void);
/* Processors this process may run on. */
int ep_cpu_count(void);

/* Shapes (see bits.py): inputs padded to 64, rows to tiles of 16; groups of `group` inputs. */
int64_t ep_padded_in(int64_t in);
int64_t ep_padded_out(int64_t out);
int64_t ep_n_groups(int64_t in, int64_t group);
/* Bytes of workspace the GEMM calls need for n tokens. */
int64_t ep_workspace_bytes(int64_t n, int64_t out, int64_t in, int64_t group);

/* Pack the signs of w (k, out, in) float32 into planes (k, out_pad/16, in_pad/8, 16) uint8. */
int ep_pack_planes(const float *w, int64_t k, int64_t out, int64_t in, uint8_t *planes);

/* Per-token activations.  x: (n, in) float32.
 * quantize_i8: q (n, in) int8 = rint(x * 127/absmax) clamped to +-127, scale (n,) = absmax/127.
 * binarize:    bits (n, in_pad/8) uint8 = (x < 0) packed like a plane row, scale (n,) = mean |x|. */
int ep_quantize_i8(const ep_kernels *kt, const float *x, int64_t n, int64_t in, int8_t *q,
                   float *scale);
int ep_binarize(const ep_kernels *kt, const float *x, int64_t n, int64_t in, uint8_t *bits,
                float *scale);

/* y (n, out) float32 = activations (n, in) times the k-plane matrix transposed.
 * planes: (k, out_pad/16, in_pad/8, 16) uint8; scales: (k, out_pad/16, n_groups, 16) float32.
 * gemm_planes_i8 reads int8 activations q with per-token scales qscale;
 * gemm_xnor reads packed sign activations bits with per-token scales ascale.
 * work: at least ep_workspace_bytes(n, out, in, group) bytes, 64-byte aligned.
 * threads <= 0 means all processors; the result does not depend on it. */
int ep_gemm_planes_i8(const ep_kernels *kt, const int8_t *q, const float *qscale, int64_t n,
                      const uint8_t *planes, const float *scales, int64_t k, int64_t out,
                      int64_t in, int64_t group, float *y, void *work, int64_t work_bytes,
                      int threads);
int ep_gemm_xnor(const ep_kernels *kt, const uint8_t *bits, const float *ascale, int64_t n,
                 const uint8_t *planes, const float *scales, int64_t k, int64_t out, int64_t in,
                 int64_t group, float *y, void *work, int64_t work_bytes, int threads);

#ifdef __cplusplus
}
#endif
#endif
