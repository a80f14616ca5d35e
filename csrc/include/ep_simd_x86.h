/* Included first by the x86 ISA files: the target attributes for the file, or SIMDe's portable
 * emulation of the same intrinsics when built with EP_SIMDE (the tests use that to check the
 * AVX-512 code on machines without AVX-512). */
#ifndef EP_SIMD_X86_H
#define EP_SIMD_X86_H

#if defined(EP_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/fma.h>
#include <simde/x86/f16c.h>
#include <math.h>
/* SIMDe's portable fmadd may round twice; the specification needs one rounding. */
static inline __m256 ep_fmadd256(__m256 a, __m256 b, __m256 c) {
    float fa[8], fb[8], fc[8];
    _mm256_storeu_ps(fa, a); _mm256_storeu_ps(fb, b); _mm256_storeu_ps(fc, c);
    for (int i = 0; i < 8; i++) fa[i] = fmaf(fa[i], fb[i], fc[i]);
    return _mm256_loadu_ps(fa);
}
static inline __m512 ep_fmadd512(__m512 a, __m512 b, __m512 c) {
    float fa[16], fb[16], fc[16];
    _mm512_storeu_ps(fa, a); _mm512_storeu_ps(fb, b); _mm512_storeu_ps(fc, c);
    for (int i = 0; i < 16; i++) fa[i] = fmaf(fa[i], fb[i], fc[i]);
    return _mm512_loadu_ps(fa);
}
/* conversions this SIMDe release lacks, lane by lane */
static inline __m512i ep_simde_cvtepi16_epi32(__m256i v) {
    int16_t a[16]; int32_t r[16];
    _mm256_storeu_si256((__m256i *)a, v);
    for (int i = 0; i < 16; i++) r[i] = a[i];
    return _mm512_loadu_si512((const void *)r);
}
static inline __m512 ep_simde_cvtepi32_ps(__m512i v) {
    int32_t a[16]; float r[16];
    _mm512_storeu_si512((void *)a, v);
    for (int i = 0; i < 16; i++) r[i] = (float)a[i];
    return _mm512_loadu_ps(r);
}
static inline __m512i ep_simde_cvtepu8_epi32(__m128i v) {
    uint8_t a[16]; int32_t r[16];
    _mm_storeu_si128((__m128i *)a, v);
    for (int i = 0; i < 16; i++) r[i] = a[i];
    return _mm512_loadu_si512((const void *)r);
}
static inline __m512 ep_simde_cvtph_ps(__m256i v) {
    float r[16];
    _mm256_storeu_ps(r, _mm256_cvtph_ps(_mm256_castsi256_si128(v)));
    _mm256_storeu_ps(r + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1)));
    return _mm512_loadu_ps(r);
}
#define _mm512_cvtph_ps ep_simde_cvtph_ps
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#endif
#define _mm512_cvtepi16_epi32 ep_simde_cvtepi16_epi32
#define _mm512_cvtepu8_epi32 ep_simde_cvtepu8_epi32
#define _mm512_cvtepi32_ps ep_simde_cvtepi32_ps
#define EP_TARGET_PUSH(t)
#define EP_TARGET_POP()
#define EP_CPU_SUPPORTS(f) 1
#define EP_CPU_F16C() 1
#else
#if !defined(__x86_64__) && !defined(_M_X64)
#error "this file is for x86-64 only"
#endif
#define EP_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define EP_TARGET_PUSH(t) EP_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define EP_TARGET_POP() EP_PRAGMA(clang attribute pop)
#else
#define EP_TARGET_PUSH(t) EP_PRAGMA(GCC push_options) EP_PRAGMA(GCC target(t))
#define EP_TARGET_POP() EP_PRAGMA(GCC pop_options)
#endif
#include <immintrin.h>
#define ep_fmadd256 _mm256_fmadd_ps
#define ep_fmadd512 _mm512_fmadd_ps
#define EP_CPU_SUPPORTS(f) __builtin_cpu_supports(f)
#if defined(__clang__)
/* clang's __builtin_cpu_supports does not know "f16c" (clang 14 refuses to compile it): CPUID
 * leaf 1, ECX bit 29.  Asked together with "avx2", which covers the OS's saving of the YMM state. */
#include <cpuid.h>
static inline int ep_cpu_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}
#define EP_CPU_F16C() ep_cpu_f16c()
#else
#define EP_CPU_F16C() __builtin_cpu_supports("f16c")
#endif
#endif

#define EP_INLINE static inline __attribute__((always_inline))

#endif
