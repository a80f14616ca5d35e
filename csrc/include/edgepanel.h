/* edgepanel's C ABI.
 *
 * This header is the only text cffi's cdef reads (the build strips the preprocessor lines), so it
 * holds plain declarations only, and every constant is an enum (Python reads them from lib).
 * The bit layout the kernels read is specified in edgepanel/bits.py, whose constants are the
 * pure-Python copy of the ones below (tests/test_c_binding.py checks that they agree).
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

/* Return codes; named so that the binding can list them (ffi.typeof("ep_status").elements). */
typedef enum {
    EP_OK = 0,
    EP_EINVAL = -1,       /* an argument is out of range */
    EP_ENOMEM = -2,       /* the workspace is too small */
    EP_EUNSUPPORTED = -3  /* the ISA variant is not compiled in or not supported by this CPU */
} ep_status;

/* The layout (edgepanel/bits.py): rows in tiles of EP_TILE, inputs padded to EP_IN_ALIGN,
 * 1..EP_MAX_PLANES planes per matrix (the plane counts kernel_check tests); workspaces aligned
 * to EP_WORK_ALIGN bytes. */
enum {
    EP_TILE = 16,        /* rows per tile: the 16 bytes of one (tile, byte column) hold one byte per row */
    EP_IN_ALIGN = 64,    /* inputs per padded row: whole 64-bit words */
    EP_MAX_PLANES = 4,
    EP_WORK_ALIGN = 64
};

/* One table of kernels per ISA variant: "scalar" everywhere, "avx2", "avx512bw" and "avx512vnni"
 * on x86-64, "neon_dotprod" and "neon" on aarch64 (ep_kernels_compiled() lists what a build holds). */
typedef struct ep_kernels ep_kernels;

/* The variant called `name`, or the best one this CPU runs when name is NULL or "";
 * NULL when that variant is not compiled in or this CPU cannot run it. */
const ep_kernels *ep_kernels_get(const char *name);
const char *ep_kernels_name(const ep_kernels *kt);
/* Comma-separated names of the variants compiled into this build. */
const char *ep_kernels_compiled(void);
/* Processors this process may run on. */
int ep_cpu_count(void);

/* Shapes (see bits.py): inputs padded to EP_IN_ALIGN, rows to tiles of EP_TILE; groups of `group`
 * inputs (one group when group >= in). */
int64_t ep_padded_in(int64_t in);
int64_t ep_padded_out(int64_t out);
int64_t ep_n_groups(int64_t in, int64_t group);
/* Bytes of workspace the GEMM calls need for n tokens. */
int64_t ep_workspace_bytes(int64_t n, int64_t out, int64_t in, int64_t group);

/* Pack the signs of w (k, out, in) float32, k in 1..EP_MAX_PLANES, into planes
 * (k, out_pad/16, in_pad/8, 16) uint8. */
int ep_pack_planes(const float *w, int64_t k, int64_t out, int64_t in, uint8_t *planes);

/* Per-token activations.  x: (n, in) float32.
 * quantize_i8: q (n, in) int8 = rint(x * 127/absmax) clamped to +-127, scale (n,) = absmax/127.
 * binarize:    bits (n, in_pad/8) uint8 = (x < 0) packed like a plane row, scale (n,) = mean |x|. */
int ep_quantize_i8(const ep_kernels *kt, const float *x, int64_t n, int64_t in, int8_t *q,
                   float *scale);
int ep_binarize(const ep_kernels *kt, const float *x, int64_t n, int64_t in, uint8_t *bits,
                float *scale);

/* How plane scales are stored: (k, out_pad/16, n_groups, 16) float32, float16 (widened exactly:
 * the same results for the same values), or uint8 codes with a float32 multiplier per row,
 * scale_rows (out_pad/16, 16): alpha = code * scale_rows[row].  With codes, each group's planes
 * add as exact integers, sum of code * D, before one float32 multiply-add by the row's multiplier
 * (csrc/ref.c), so the results round less than those of the float32 products code * multiplier. */
enum { EP_SCALES_F32 = 0, EP_SCALES_F16 = 1, EP_SCALES_U8 = 2 };

/* y (n, out) float32 = activations (n, in) times the k-plane matrix transposed, k in
 * 1..EP_MAX_PLANES; group in bits.GROUP_SIZES or >= in.
 * planes: (k, out_pad/16, in_pad/8, 16) uint8; scales as scales_kind says (scale_rows: for
 * EP_SCALES_U8, else ignored).
 * gemm_planes_i8 reads int8 activations q with per-token scales qscale;
 * gemm_xnor reads packed sign activations bits with per-token scales ascale.
 * work: at least ep_workspace_bytes(n, out, in, group) bytes, EP_WORK_ALIGN-byte aligned.
 * threads <= 0 means all processors; the result does not depend on it. */
int ep_gemm_planes_i8(const ep_kernels *kt, const int8_t *q, const float *qscale, int64_t n,
                      const uint8_t *planes, const void *scales, int32_t scales_kind,
                      const float *scale_rows, int64_t k,
                      int64_t out, int64_t in, int64_t group, float *y, void *work,
                      int64_t work_bytes, int threads);
int ep_gemm_xnor(const ep_kernels *kt, const uint8_t *bits, const float *ascale, int64_t n,
                 const uint8_t *planes, const void *scales, int32_t scales_kind,
                 const float *scale_rows, int64_t k,
                 int64_t out, int64_t in, int64_t group, float *y, void *work, int64_t work_bytes,
                 int threads);

/* ---- the forward pass (csrc/forward.c) ----------------------------------------------------
 * A model is a set of plain structs pointing into the mapped weights (and into the float32
 * arrays of scales, norms and biases, which the caller may change between calls). */

enum {
    EP_MAT_PLANES = 1,   /* planes (k, out_pad/16, in_pad/8, 16) + scales as scales_kind says */
    EP_MAT_F32 = 2,      /* dense float32 (out, in) */
    EP_MAT_F16 = 3,      /* dense float16 (out, in) */
    EP_MAT_I8ROWS = 4    /* int8 (out, in), entries in -127..127 (the kernels take w's sign) + row_scale float32 (out) */
};
/* Norms and activations: EP_NORM_<NAME> and EP_ACT_<NAME> for the names of edgepanel/model/config.py's
 * NORMS and ACTS (upper-cased), numbered in their order; the binding looks them up by name. */
enum { EP_NORM_RMS = 0, EP_NORM_LAYER = 1 };
enum { EP_ACT_SILU = 0, EP_ACT_GELU_TANH = 1, EP_ACT_GELU = 2, EP_ACT_RELU2 = 3, EP_ACT_RELU = 4 };

typedef struct {
    int32_t kind;
    int32_t k;
    int64_t rows, cols, group; /* rows = outputs, cols = inputs */
    const uint8_t *planes;
    const void *scales;         /* as scales_kind says (EP_SCALES_*) */
    int32_t scales_kind;
    const float *scale_rows;    /* EP_SCALES_U8: (rows_pad/16, 16) */
    const void *weight;
    const float *row_scale;
    const float *bias;          /* (out,) or NULL */
} ep_matrix;

typedef struct {
    const float *weight;        /* NULL: absent */
    const float *bias;
} ep_norm;

typedef struct {
    ep_norm attn_norm, attn_sub_norm, mlp_norm, mlp_sub_norm;
    ep_matrix wq, wk, wv, wo, w_gate, w_up, w_down;   /* w_gate.kind == 0 when not gated */
} ep_layer;

typedef struct {
    int32_t vocab, dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, max_seq;
    int32_t norm, act, gated;
    float norm_eps;
    const float *inv_freq;      /* (head_dim/2,): RoPE; NULL: learned positions */
    const float *pos_embed;     /* (max_seq, dim) or NULL */
    ep_matrix embed;            /* read by rows: EP_MAT_I8ROWS, EP_MAT_PLANES, EP_MAT_F32 or EP_MAT_F16 */
    ep_matrix head;             /* the output layer (a copy of embed when tied) */
    ep_norm final_norm;
    const ep_layer *layers;
    /* the MLP's inner activations are rotated before down_proj when rot_signs is set:
     * hidden_dim = rot_p * rot_m, rot_p a power of two (edgepanel/rotation.py) */
    const float *rot_signs;     /* (hidden_dim,) */
    const float *rot_mix;       /* (rot_m, rot_m) */
    int32_t rot_p, rot_m;
} ep_model;

/* Bytes of workspace a forward pass over n tokens needs (EP_WORK_ALIGN-byte aligned buffer). */
int64_t ep_forward_workspace(const ep_model *m, int64_t n, int threads);

/* What a key/value cache holds: float32, or float16 (half the bytes; each key and value rounded
 * to nearest even once, when it is stored, and widened exactly when attention reads it). */
enum { EP_KV_F32 = 0, EP_KV_F16 = 1 };

/* Run tokens[0..n) at positions pos..pos+n-1.  k_cache, v_cache: (n_layers, cap, n_kv_heads,
 * head_dim) of kv_type's elements, positions < pos already filled.  logits: (n, vocab) when
 * all_logits, else (vocab,) for the last token. */
int ep_forward(const ep_kernels *kt, const ep_model *m, void *k_cache, void *v_cache, int32_t kv_type, int64_t cap,
               const int32_t *tokens, int64_t n, int64_t pos, int32_t all_logits, float *logits,
               void *work, int64_t work_bytes, int threads);

/* What ep_forward_batch writes to out. */
enum {
    EP_OUT_LAST = 0,    /* (n_seqs, vocab): logits of each sequence's last token */
    EP_OUT_ALL = 1,     /* (n, vocab): logits of every token */
    EP_OUT_LOGPROB = 2  /* (n, n_targets): log-softmax of token t's logits at targets[t, j]; 0 where
                         * targets[t, j] < 0 (knowledge distillation reads a teacher's top-k ids) */
};

/* Several sequences in one pass: sequence s is seq_len[s] consecutive tokens of tokens[0..n),
 * at positions seq_pos[s].., with its own cache, k_cache/v_cache + s * n_layers*cap*kv_dim
 * (n_seqs, n_layers, cap, n_kv_heads, head_dim).  Every product runs over all n tokens at once;
 * attention stays within a sequence.  The same results as one ep_forward per sequence. */
int ep_forward_batch(const ep_kernels *kt, const ep_model *m, void *k_cache, void *v_cache, int32_t kv_type, int64_t cap,
                     const int32_t *tokens, int64_t n, const int64_t *seq_len, const int64_t *seq_pos,
                     int64_t n_seqs, int32_t out_kind, const int32_t *targets, int64_t n_targets,
                     float *out, void *work, int64_t work_bytes, int threads);

/* The rotation of edgepanel/rotation.py on rows (the best kernel variant's rotate_row, the
 * arithmetic of ep_forward's rotation of the MLP's inner activations, every variant's bits the
 * same): x (rows, n) float32 <- T(x) row by row, in place;
 * n = p * m with p the largest power of two dividing n, signs (n,) float32, mix (m, m) float32
 * row-major.  threads <= 0: all processors; the results do not depend on it.  EP_ENOMEM: a thread
 * could not allocate n floats. */
int ep_rotate_rows(const float *signs, const float *mix, int64_t n, float *x, int64_t rows, int threads);

/* ---- calibration-aware fitting (csrc/fit.c) ------------------------------------------------
 * GPTQ's column loop over one block of nb columns holding whole groups of `group` columns (the last
 * may be shorter), each row on its own: for each group, fit its k scales on the row's current values
 * (greedy residual planes + als_iters ALS rounds, as edgepanel/quantize.py does); for each column j,
 * take the nearest of the 2^k levels, err = (w - level) / u[j][j], w[t] -= err * u[j][t] for the
 * later block columns t.  w: row r's block at w + r*ld_w (float64, updated in place); u: the
 * block's upper Cholesky factor of H^-1, row j at u + j*ld_u; err: (out, nb) float64 out;
 * signs: plane i, row r, column j at signs[(i*out + r)*ld_s + j] (+-1 out); alpha: plane i, row r,
 * group t at alpha[(i*out + r)*ld_a + t] (float32 out).  threads <= 0: all processors; the results
 * do not depend on it.  EP_ENOMEM: a thread could not allocate its few kilobytes. */
int ep_gptq_block(double *w, int64_t out, int64_t nb, int64_t ld_w, const double *u, int64_t ld_u,
                  int64_t k, int64_t group, int64_t als_iters, double *err, int8_t *signs,
                  int64_t ld_s, float *alpha, int64_t ld_a, int threads);

/* The scale tuner's plane layers (edgepanel/convert/recover.py): a matrix whose weight (o, c) is
 * level codes[o][c] of its group's 2^k levels.  codes: (out, ng, gs) uint8 (inputs padded to whole
 * groups; columns from n_in on are not read); levels: (out, ng, 2^k) float32.
 * ep_plane_weights: w[o * ld_w + c] = levels[o][c / gs][codes[o][c]] for c < n_in;
 * ep_plane_weights16 the same for 16-bit values (bfloat16 or float16 bits, copied).
 * ep_plane_grads: the scales' gradient, galpha (k, out, ng) float32 (overwritten): galpha[i][o][g]
 * = the sum of s_i(codes[o][c]) * gw[o * ld_gw + c] over group g's columns c, s_i(code) = +1 where
 * bit k-1-i of the code is set, else -1; the group's column j summed in lane j % 8, the eight lanes
 * added pairwise (fit.c); kt: a kernel table (NULL: the best this CPU runs), the same bits on
 * every one.  Rows are split among threads; the results do not depend on the thread count.
 * EP_EINVAL: a bad size, or a code >= 2^k (k <= 8). */
int ep_plane_weights(const float *levels, const uint8_t *codes, int64_t out, int64_t ng, int64_t gs,
                     int64_t n_in, int64_t k, float *w, int64_t ld_w, int threads);
int ep_plane_weights16(const uint16_t *levels, const uint8_t *codes, int64_t out, int64_t ng, int64_t gs,
                       int64_t n_in, int64_t k, uint16_t *w, int64_t ld_w, int threads);
int ep_plane_grads(const float *gw, int64_t ld_gw, const uint8_t *codes, int64_t out, int64_t ng, int64_t gs,
                   int64_t n_in, int64_t k, float *galpha, int threads, const ep_kernels *kt);

/* ---- sampling (csrc/sample.c) ----------------------------------------------------------------
 * ep_sample: the next token from logits (n,) float32, as edgepanel/sample.py's Sampler chooses it
 * (its order of operations, in float64): the repetition penalty on each distinct token of
 * history[0..n_history) within [0, n); temperature 0, or one so small that the largest logit over
 * it is +-inf: the first largest logit; else division by the temperature, top-k (0: off), exp,
 * min-p (0: off), top-p (1: off; over min-p's kept set, or the nucleus), and the draw with u in
 * [0, 1) (one uniform number: the first kept token in index order whose normalized running sum
 * exceeds u).  Returns the token (>= 0), or EP_EINVAL for an
 * argument out of range or a non-finite logit (*nonfinite: how many), EP_ENOMEM when work_bytes
 * is under ep_sample_work_bytes(n).  One thread; the same bits on every machine. */
int64_t ep_sample_work_bytes(int64_t n);
int64_t ep_sample(const float *logits, int64_t n, const int64_t *history, int64_t n_history,
                  double temperature, int64_t top_k, double top_p, double min_p, double penalty,
                  double u, void *work, int64_t work_bytes, int64_t *nonfinite);

#ifdef __cplusplus
}
#endif
#endif
