// Small AVX2 building blocks shared by the matmul kernels, using the VNNI forms where the CPU has
// them (one instruction instead of two or three).
#pragma once
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics trip these warnings on their own internals (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace glmoe {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

// acc + (per 32-bit lane) the sum of four u8 x s8 products. Without VNNI the u8 x s8 pairs go
// through int16 and saturate above 32767: callers keep |u*s| pairs below that.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// acc + (per 32-bit lane) the sum of two s16 x s16 products.
inline __m256i dot_s16(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// The 32 nibbles of 16 bytes as bytes: low nibbles in bytes 0-15, high nibbles in 16-31.
inline __m256i unpack_nibbles_16(const uint8_t* p) {
    const __m128i v = load128(p);
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

// The ActQ8x2 order of two 32-byte blocks: lo = first 16 bytes of each, hi = last 16 of each.
inline void interleave_pair(__m256i a, __m256i b, __m256i& lo, __m256i& hi) {
    lo = _mm256_permute2x128_si256(a, b, 0x20);
    hi = _mm256_permute2x128_si256(a, b, 0x31);
}

}  // namespace glmoe
#endif
