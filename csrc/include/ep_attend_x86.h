/* Attention for the x86 kernel files (specification: ep_ref_attend), with the softmax and exp256
 * it uses.  Included by x86_avx2.c and again by x86_avx512.c inside its AVX-512 target, so that the
 * same 256-bit code is compiled for each; the including file defines:
 *   EP_ATTEND_FN    the attention function's name;
 *   EP_ATTEND_WIDE  1 where the target has 32 vector registers (AVX-512VL encodes ymm16-31): the
 *                   float16 keys are then widened in registers for up to three heads at a time,
 *                   and three heads' weighted sums stay in registers (with 16 of them, one of the
 *                   twelve sums went through the stack every position).
 * Every path computes each score as the canonical dot and each output as the in-order sum, so the
 * results are the same bits either way. */
#ifndef EP_ATTEND_WIDE
#define EP_ATTEND_WIDE 0
#endif

/* The canonical dots of 8 accumulators (one per key, 8 lanes each) in one vector: hadd pairs
 * (l0+l1), (l2+l3), ...; a second hadd the quarters; the halves added last, as the tree. */
EP_INLINE __m256 finish8(const __m256 *a) {
    __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 y = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
}

/* ep_expf, 8 at a time, bit for bit */
EP_INLINE __m256 exp256(__m256 x) {
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = ep_fmadd256(n, _mm256_set1_ps(-EP_LN2_HI), x);
    r = ep_fmadd256(n, _mm256_set1_ps(-EP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EP_EXP_C6);
    p = ep_fmadd256(p, r, _mm256_set1_ps(EP_EXP_C5));
    p = ep_fmadd256(p, r, _mm256_set1_ps(EP_EXP_C4));
    p = ep_fmadd256(p, r, _mm256_set1_ps(EP_EXP_C3));
    p = ep_fmadd256(p, r, _mm256_set1_ps(0.5f));
    p = ep_fmadd256(p, r, _mm256_set1_ps(1.0f));
    p = ep_fmadd256(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(EP_EXP_LO), _CMP_NGT_UQ));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(EP_EXP_HI), _CMP_GT_OQ));
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* ep_softmax_weights, vectorized in its own lane order */
static void softmax256(float *w, int64_t T) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t s = 0;
    for (; s + 8 <= T; s += 8) m = _mm256_max_ps(_mm256_loadu_ps(w + s), m);  /* NaN scores are skipped */
    float lane[8], mx;
    _mm256_storeu_ps(lane, m);
    mx = lane[0];
    for (int l = 1; l < 8; l++) mx = lane[l] > mx ? lane[l] : mx;
    for (; s < T; s++) mx = w[s] > mx ? w[s] : mx;
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    for (s = 0; s + 8 <= T; s += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(w + s), vm));
        _mm256_storeu_ps(w + s, e);
        acc = _mm256_add_ps(acc, e);
    }
    _mm256_storeu_ps(lane, acc);
    for (; s < T; s++) {
        w[s] = ep_expf(w[s] - mx);
        lane[s & 7] += w[s];
    }
    const float inv = 1.0f / (((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])));
    const __m256 vi = _mm256_set1_ps(inv);
    for (s = 0; s + 8 <= T; s += 8) _mm256_storeu_ps(w + s, _mm256_mul_ps(_mm256_loadu_ps(w + s), vi));
    for (; s < T; s++) w[s] *= inv;
}

/* 8 floats of a cache row: float32, or float16 widened (exact) */
EP_INLINE __m256 load_kv8(const void *p, int f16, int64_t i) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
               : _mm256_loadu_ps((const float *)p + i);
}

/* out (64 floats) = sum over s of w[s] * v_s[c0..c0+64), in order of s, accumulators in
 * registers; pf bytes of each value row from column c0 (from DRAM at decode: the weights have
 * streamed through the caches) prefetched a few positions ahead.  f16 is a constant where this is
 * inlined. */
EP_INLINE void weighted_values64(const float *w, const void *v, int f16, int64_t kstride, int64_t c0, int64_t T,
                                 int64_t width, int64_t pf, float *out) {
    __m256 o[8];
    const int nv = (int)(width / 8);
    const int64_t es = f16 ? 2 : 4;
    for (int j = 0; j < 8; j++) o[j] = _mm256_setzero_ps();
    for (int64_t s = 0; s < T; s++) {
        const int64_t at = s * kstride + c0;
        if (s + 6 < T)
            for (int64_t b = 0; b < pf; b += 64)
                _mm_prefetch((const char *)v + (at + 6 * kstride) * es + b, _MM_HINT_T0);
        const __m256 ws = _mm256_set1_ps(w[s]);
        if (nv == 8) {
            for (int j = 0; j < 8; j++) o[j] = ep_fmadd256(ws, load_kv8(v, f16, at + 8 * j), o[j]);
        } else {
            for (int j = 0; j < nv; j++) o[j] = ep_fmadd256(ws, load_kv8(v, f16, at + 8 * j), o[j]);
        }
    }
    for (int j = 0; j < nv; j++) _mm256_storeu_ps(out + 8 * j, o[j]);
}

/* out_g[0..32) = sum over s of w_g[s] * v_s[c0..c0+32) for GN heads at once (w_g = w + g * T,
 * out_g = out + g * hd), in order of s: each value row is read (and widened) once for all of
 * them; pf bytes of it from column c0 prefetched ahead.  GN and f16 are constants where this is
 * inlined. */
EP_INLINE void weighted_values32_heads(const float *w, int64_t T, int GN, const void *v, int f16, int64_t kstride,
                                       int64_t c0, int64_t pf, float *out, int64_t hd) {
    __m256 o[3][4];
    const int64_t es = f16 ? 2 : 4;
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < 4; j++) o[g][j] = _mm256_setzero_ps();
    for (int64_t s = 0; s < T; s++) {
        const int64_t at = s * kstride + c0;
        if (s + 6 < T)
            for (int64_t b = 0; b < pf; b += 64) _mm_prefetch((const char *)v + (at + 6 * kstride) * es + b, _MM_HINT_T0);
        if (!EP_ATTEND_WIDE && GN == 3) {  /* 16 registers: one value slice live, not four */
            for (int j = 0; j < 4; j++) {
                const __m256 x = load_kv8(v, f16, at + 8 * j);
                for (int g = 0; g < 3; g++) o[g][j] = ep_fmadd256(_mm256_broadcast_ss(w + g * T + s), x, o[g][j]);
            }
            continue;
        }
        __m256 x[4];
        for (int j = 0; j < 4; j++) x[j] = load_kv8(v, f16, at + 8 * j);
        for (int g = 0; g < GN; g++) {
            const __m256 ws = _mm256_broadcast_ss(w + g * T + s);
            for (int j = 0; j < 4; j++) o[g][j] = ep_fmadd256(ws, x[j], o[g][j]);
        }
    }
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + g * hd + 8 * j, o[g][j]);
}

/* The scores of G query heads over keys [0, T) (scratch[g * T + s]), 8 keys at a time, each block
 * of keys read from L1 by all G heads (pf bytes of each of the next block's rows prefetched).
 * mode 0: float32 keys; 1: float16 keys widened a block at a time into kw (8 x hd floats), then
 * read as float32 rows are (several heads); 2: float16 keys widened as they are read (one head).
 * A constant where this is inlined. */
EP_INLINE void attend_scores(const float *q, int64_t G, const void *k, int mode, int64_t kstride, int64_t T,
                             int64_t hd, int64_t pf, float scale, float *scratch) {
    const __m256 vscale = _mm256_set1_ps(scale);
    const int64_t es = mode ? 2 : 4;
    float kw[8 * 256];
    int64_t s = 0;
    for (; s + 8 <= T; s += 8) {
        const char *kb0 = (const char *)k + s * kstride * es;
        if (s + 16 <= T)
            for (int j = 0; j < 8; j++)
                for (int64_t b = 0; b < pf; b += 64) _mm_prefetch(kb0 + (8 + j) * kstride * es + b, _MM_HINT_T0);
        const void *kb = kb0;
        int64_t ks = kstride;
        if (mode == 1) {
            for (int j = 0; j < 8; j++)
                for (int64_t i = 0; i < hd; i += 8) _mm256_storeu_ps(kw + j * hd + i, load_kv8(kb0, 1, j * kstride + i));
            kb = kw;
            ks = hd;
        }
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * hd;
            __m256 a[8];
            for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
            for (int64_t i = 0; i < hd; i += 8) {
                const __m256 qv = _mm256_loadu_ps(qg + i);
                for (int j = 0; j < 8; j++) a[j] = ep_fmadd256(qv, load_kv8(kb, mode == 2, j * ks + i), a[j]);
            }
            _mm256_storeu_ps(scratch + g * T + s, _mm256_mul_ps(finish8(a), vscale));
        }
    }
    for (; s < T; s++) {
        const float *row = (const float *)k + s * kstride;
        if (mode) {
            for (int64_t i = 0; i < hd; i += 8) _mm256_storeu_ps(kw + i, load_kv8(k, 1, s * kstride + i));
            row = kw;
        }
        for (int64_t g = 0; g < G; g++) scratch[g * T + s] = ep_avx2_dot(q + g * hd, row, hd) * scale;
    }
}

#if EP_ATTEND_WIDE
/* The scores of GN (1..3) query heads over keys [0, T), float16 keys: each 8-float slice of a key
 * widened once, in a register, for all GN heads (8 * GN accumulators).  attend_scores' mode 1 with
 * no staging buffer; the same sums in the same order. */
EP_INLINE void attend_scores_f16_regs(const float *q, const int GN, const void *k, int64_t kstride, int64_t T,
                                      int64_t hd, int64_t pf, float scale, float *scratch) {
    const __m256 vscale = _mm256_set1_ps(scale);
    int64_t s = 0;
    for (; s + 8 <= T; s += 8) {
        const uint16_t *kb = (const uint16_t *)k + s * kstride;
        if (s + 16 <= T)
            for (int j = 0; j < 8; j++)
                for (int64_t b = 0; b < pf; b += 64) _mm_prefetch((const char *)(kb + (8 + j) * kstride) + b, _MM_HINT_T0);
        __m256 a[3][8];
        for (int g = 0; g < GN; g++)
            for (int j = 0; j < 8; j++) a[g][j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8)
            for (int j = 0; j < 8; j++) {
                const __m256 x = load_kv8(kb, 1, j * kstride + i);
                for (int g = 0; g < GN; g++) a[g][j] = ep_fmadd256(_mm256_loadu_ps(q + g * hd + i), x, a[g][j]);
            }
        for (int g = 0; g < GN; g++) _mm256_storeu_ps(scratch + g * T + s, _mm256_mul_ps(finish8(a[g]), vscale));
    }
    float kw[256];
    for (; s < T; s++) {
        for (int64_t i = 0; i < hd; i += 8) _mm256_storeu_ps(kw + i, load_kv8(k, 1, s * kstride + i));
        for (int g = 0; g < GN; g++) scratch[g * T + s] = ep_avx2_dot(q + g * hd, kw, hd) * scale;
    }
}
#endif

/* Attention of G query heads over one key/value head (specification: ep_ref_attend): the scores
 * (attend_scores), each head's softmax, then the values: one head in 64-wide column strips, its
 * sums in registers; several heads up to three at a time in 32-wide strips, each value row read
 * once for the three (float16 rows widened once).  Keys and values are prefetched a few positions
 * ahead: this head's slice of each row, or with EP_ATTEND_WHOLE_ROWS the whole row (every key
 * head's), so that at decode, where the rows come from DRAM, one head's pass fetches them for the
 * next heads' as one stream. */
void EP_ATTEND_FN(const float *q, int64_t G, const void *k, const void *v, int flags, int64_t kstride,
                    int64_t T, int64_t hd, float scale, float *out, float *scratch) {
    if (hd % 8 || hd > 256) {
        ep_ref_attend(q, G, k, v, flags, kstride, T, hd, scale, out, scratch);
        return;
    }
    const int f16 = flags & EP_ATTEND_F16, whole = (flags & EP_ATTEND_WHOLE_ROWS) != 0;
    const int64_t es = f16 ? 2 : 4, kpf = (whole ? kstride : hd) * es;
    if (!f16)
        attend_scores(q, G, k, 0, kstride, T, hd, kpf, scale, scratch);
#if EP_ATTEND_WIDE
    else if (G > 1)
        for (int64_t g = 0; g < G; g += 3) {
            const int64_t gn = ep_min64(3, G - g);
            const float *qg = q + g * hd;
            float *sg = scratch + g * T;
            gn == 3 ? attend_scores_f16_regs(qg, 3, k, kstride, T, hd, kpf, scale, sg)
            : gn == 2 ? attend_scores_f16_regs(qg, 2, k, kstride, T, hd, kpf, scale, sg)
                      : attend_scores_f16_regs(qg, 1, k, kstride, T, hd, kpf, scale, sg);
        }
#else
    else if (G > 1)
        attend_scores(q, G, k, 1, kstride, T, hd, kpf, scale, scratch);
#endif
    else
        attend_scores(q, G, k, 2, kstride, T, hd, kpf, scale, scratch);
    for (int64_t g = 0; g < G; g++) softmax256(scratch + g * T, T);
    int64_t g = 0;
    if (G > 1 && hd % 32 == 0)
        for (; g < G; g += 3) {
            const int gn = (int)ep_min64(3, G - g);
            for (int64_t c = 0; c < hd; c += 32) {
                const float *w = scratch + g * T;
                float *o = out + g * hd + c;
                const int64_t pf = whole ? (c == 0 ? kpf : 0) : 32 * es;  /* whole rows: with the first strip */
                if (f16)
                    gn == 3 ? weighted_values32_heads(w, T, 3, v, 1, kstride, c, pf, o, hd)
                    : gn == 2 ? weighted_values32_heads(w, T, 2, v, 1, kstride, c, pf, o, hd)
                              : weighted_values32_heads(w, T, 1, v, 1, kstride, c, pf, o, hd);
                else
                    gn == 3 ? weighted_values32_heads(w, T, 3, v, 0, kstride, c, pf, o, hd)
                    : gn == 2 ? weighted_values32_heads(w, T, 2, v, 0, kstride, c, pf, o, hd)
                              : weighted_values32_heads(w, T, 1, v, 0, kstride, c, pf, o, hd);
            }
        }
    for (; g < G; g++)
        for (int64_t c = 0; c < hd; c += 64) {
            const int64_t width = ep_min64(64, hd - c), pf = whole ? (c == 0 ? kpf : 0) : width * es;
            if (f16)
                weighted_values64(scratch + g * T, v, 1, kstride, c, T, width, pf, out + g * hd + c);
            else
                weighted_values64(scratch + g * T, v, 0, kstride, c, T, width, pf, out + g * hd + c);
        }
}
