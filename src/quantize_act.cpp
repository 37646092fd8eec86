// Activation quantization for the integer matmul kernels (AVX2 builds only; the portable
// fallback multiplies by dequantized weights instead).
#if defined(__AVX2__) && defined(__FMA__)
#include "quantize_act.h"

#include "simd_x86.h"


namespace glmoe {
namespace {

float max_abs(const float* x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

// round(x[0..32) * inv_d) as int8 in element order; sum_lo / sum_hi: sums of the two halves.
__m256i quantize32(const float* x, __m256 inv_d, int& sum_lo, int& sum_hi) {
    __m256i v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), inv_d));
    sum_lo = hsum_i32(_mm256_add_epi32(v[0], v[1]));
    sum_hi = hsum_i32(_mm256_add_epi32(v[2], v[3]));
    // The packs interleave 128-bit halves; the permute restores element order.
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One 32-element block: its scale and quantized values.
__m256i quantize_block32(const float* x, float& d) {
    const float amax = max_abs(x, QK32);
    d = amax / 127.0f;
    int lo, hi;
    return quantize32(x, _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f), lo, hi);
}

}  // namespace

void quantize_act_q8x2(const float* x, ActQ8x2* out, int64_t k) {
    const int64_t nb = k / QK32;
    for (int64_t p = 0; p < (nb + 1) / 2; ++p) {
        const __m256i q0 = quantize_block32(x + 64 * p, out[p].d[0]);
        __m256i q1 = _mm256_setzero_si256();
        out[p].d[1] = 0.0f;
        if (2 * p + 1 < nb) q1 = quantize_block32(x + 64 * p + 32, out[p].d[1]);
        __m256i lo, hi;
        interleave_pair(q0, q1, lo, hi);
        // Stored as x + 128 (unsigned bytes, 1-255).
        const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
        lo = _mm256_xor_si256(lo, bias);
        hi = _mm256_xor_si256(hi, bias);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[p].q), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[p].q + 32), hi);
    }
}

void quantize_act_q8k(const float* x, ActQ8K* out, int64_t k, bool interleaved) {
    for (int64_t b = 0; b < k / QK_K; ++b, x += QK_K) {
        const float amax = max_abs(x, QK_K);
        const float d = amax / 127.0f;
        const __m256 inv_d = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int j = 0; j < QK_K / 32; ++j) {
            int lo, hi;
            const __m256i q = quantize32(x + 32 * j, inv_d, lo, hi);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].q + 32 * (interleaved ? kInterleavedGroup[j] : j)), q);
            out[b].dsum[2 * j] = d * static_cast<float>(lo);
            out[b].dsum[2 * j + 1] = d * static_cast<float>(hi);
        }
        out[b].d = d;
    }
}

}  // namespace glmoe
#endif
