// Row sizes and dequantization of every supported weight type. The arithmetic follows gguf-py's
// numpy reference step by step (all in f32, same operation order) so results are bit-identical.
#include "quants.h"

#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <stdexcept>
#include <string>

#include "half.h"
#include "quant_blocks.h"

// x = (d*sc)*q - dmin*m must round twice like numpy does; a fused multiply-add would not.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace glmoe {
namespace {

const TypeTraits& checked_traits(uint32_t type, int64_t n) {
    const TypeTraits& tr = type_traits(type);
    if (!tr.supported) throw std::invalid_argument("unsupported weight type " + type_name(type));
    if (n < 0 || n % tr.block_size != 0)
        throw std::invalid_argument("row length " + std::to_string(n) + " is not a multiple of the " +
                                    tr.name + " block size");
    return tr;
}

#if defined(__AVX2__)
// y[0..31] = d * q for 32 signed bytes q: the scalar loops' exact conversion and one product each.
inline void scale_bytes_avx2(__m256i q, float d, float* y) {
    const __m256 dv = _mm256_set1_ps(d);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), dv));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), dv));
    _mm256_storeu_ps(y + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), dv));
    _mm256_storeu_ps(y + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), dv));
}
#endif

// (These also read q8_0 / q4_0 KV cache rows, so the vector paths matter for attention.)
void dequant_q8_0(const BlockQ8_0* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += 32) {
        const float d = half_to_f32(b[i].d);
#if defined(__AVX2__)
        scale_bytes_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qs)), d, y);
#else
        for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(b[i].qs[j]) * d;
#endif
    }
}

void dequant_q4_0(const BlockQ4_0* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += 32) {
        const float d = half_to_f32(b[i].d);
#if defined(__AVX2__)
        // Low nibbles are elements 0-15, high nibbles 16-31.
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[i].qs));
        const __m256i both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
        scale_bytes_avx2(_mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8)), d, y);
#else
        for (int j = 0; j < 16; ++j) {
            y[j] = d * static_cast<float>((b[i].qs[j] & 0x0F) - 8);
            y[j + 16] = d * static_cast<float>((b[i].qs[j] >> 4) - 8);
        }
#endif
    }
}

void dequant_q5_0(const BlockQ5_0* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, y += 32) {
        const float d = half_to_f32(b[i].d);
        uint32_t qh;
        std::memcpy(&qh, b[i].qh, sizeof qh);
        for (int j = 0; j < 16; ++j) {
            const int lo = (b[i].qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
            const int hi = (b[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            y[j] = d * static_cast<float>(lo - 16);
            y[j + 16] = d * static_cast<float>(hi - 16);
        }
    }
}

// Shared by Q4_K and Q5_K: high_bits is null for Q4_K.
void dequant_q45_k(uint16_t d_bits, uint16_t dmin_bits, const uint8_t* packed_scales,
                   const uint8_t* high_bits, const uint8_t* qs, float* y) {
    const float d = half_to_f32(d_bits);
    const float dmin = half_to_f32(dmin_bits);
    uint8_t sc[8], mn[8];
    unpack_k_scales(packed_scales, sc, mn);
    for (int s = 0; s < 8; ++s, y += 32) {
        const float ds = d * static_cast<float>(sc[s]);
        const float dm = dmin * static_cast<float>(mn[s]);
        const uint8_t* chunk = qs + 32 * (s / 2);
        const int shift = 4 * (s % 2);
        for (int e = 0; e < 32; ++e) {
            int q = (chunk[e] >> shift) & 0x0F;
            if (high_bits) q |= ((high_bits[e] >> s) & 1) << 4;
            y[e] = ds * static_cast<float>(q) - dm;
        }
    }
}

void dequant_q6_k(const BlockQ6_K* b, float* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i) {
        const float d = half_to_f32(b[i].d);
        for (int h = 0; h < 2; ++h) {
            const uint8_t* ql = b[i].ql + 64 * h;
            const uint8_t* qh = b[i].qh + 32 * h;
            for (int l = 0; l < 128; ++l, ++y) {
                const int lo = (ql[l % 64] >> (4 * (l / 64))) & 0x0F;
                const int hi = (qh[l % 32] >> (2 * (l / 32))) & 3;
                const float ds = d * static_cast<float>(b[i].scales[(128 * h + l) / 16]);
                *y = ds * static_cast<float>((lo | (hi << 4)) - 32);
            }
        }
    }
}

}  // namespace

size_t row_bytes(uint32_t type, int64_t n) {
    const TypeTraits& tr = checked_traits(type, n);
    return tr.type_size * static_cast<size_t>(n / tr.block_size);
}

void dequantize_row(uint32_t type, const void* src, float* dst, int64_t n) {
    const int64_t nb = n / checked_traits(type, n).block_size;
    switch (type) {
        case GGML_TYPE_F32:
            std::memcpy(dst, src, n * sizeof(float));
            break;
        case GGML_TYPE_F16: {
            const uint16_t* h = static_cast<const uint16_t*>(src);
            int64_t i = 0;
#if defined(__F16C__)
            // 8 at a time (exact, like the scalar conversion): f16 KV cache rows are read this way.
            for (; i + 8 <= n; i += 8)
                _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
            for (; i < n; ++i) dst[i] = half_to_f32(h[i]);
            break;
        }
        case GGML_TYPE_BF16: {
            const uint16_t* h = static_cast<const uint16_t*>(src);
            for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(h[i]);
            break;
        }
        case GGML_TYPE_Q8_0:
            dequant_q8_0(static_cast<const BlockQ8_0*>(src), dst, nb);
            break;
        case GGML_TYPE_Q4_0:
            dequant_q4_0(static_cast<const BlockQ4_0*>(src), dst, nb);
            break;
        case GGML_TYPE_Q5_0:
            dequant_q5_0(static_cast<const BlockQ5_0*>(src), dst, nb);
            break;
        case GGML_TYPE_Q4_K: {
            const BlockQ4_K* b = static_cast<const BlockQ4_K*>(src);
            for (int64_t i = 0; i < nb; ++i)
                dequant_q45_k(b[i].d, b[i].dmin, b[i].scales, nullptr, b[i].qs, dst + i * QK_K);
            break;
        }
        case GGML_TYPE_Q5_K: {
            const BlockQ5_K* b = static_cast<const BlockQ5_K*>(src);
            for (int64_t i = 0; i < nb; ++i)
                dequant_q45_k(b[i].d, b[i].dmin, b[i].scales, b[i].qh, b[i].qs, dst + i * QK_K);
            break;
        }
        case GGML_TYPE_Q6_K:
            dequant_q6_k(static_cast<const BlockQ6_K*>(src), dst, nb);
            break;
    }
}

}  // namespace glmoe
