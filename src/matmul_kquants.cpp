// Matmul kernels for the K-quants (Q4_K, Q5_K, Q6_K) against 8-bit activation super-blocks.
// Per 32 (AVX2) or 64 (AVX-512) weights: u8 x s8 products summed in int16 pairs (maddubs), then
// multiplied by the sub-block scales and summed into int32 lanes (madd / VNNI dpwssd); per
// super-block one f32 FMA, plus one for the sub-block mins (Q4_K, Q5_K) or the offset of 32
// (Q6_K) against the activation's per-16 sums.
#if defined(__AVX2__) && defined(__FMA__)
#include <cstring>
#include <type_traits>

#include "half.h"
#include "matmul_tiles.h"
#include "quant_blocks.h"
#include "simd_x86.h"

namespace glmoe {
namespace {

// The 12-byte Q4_K / Q5_K scale field as 8 scale bytes and 8 min bytes (low 8 bytes of each).
inline void decode_k_scales(const uint8_t* packed, __m128i& scales, __m128i& mins) {
    uint32_t w[3];
    std::memcpy(w, packed, sizeof w);
    const uint32_t sc_lo = w[0] & 0x3F3F3F3F;
    const uint32_t mn_lo = w[1] & 0x3F3F3F3F;
    const uint32_t sc_hi = (w[2] & 0x0F0F0F0F) | ((w[0] >> 2) & 0x30303030);
    const uint32_t mn_hi = ((w[2] >> 4) & 0x0F0F0F0F) | ((w[1] >> 2) & 0x30303030);
    scales = _mm_set_epi32(0, 0, static_cast<int>(sc_hi), static_cast<int>(sc_lo));
    mins = _mm_set_epi32(0, 0, static_cast<int>(mn_hi), static_cast<int>(mn_lo));
}

template <bool kHighBit>
using BlockQ45K = typename std::conditional<kHighBit, BlockQ5_K, BlockQ4_K>::type;

#if defined(__AVX512BW__) && defined(__AVX512VL__)

inline __m512i dot_s16_512(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }

// int16 lanes 0-15 = value a, 16-31 = value b of an int16 table (vpermw indices).
inline __m512i halves_index(int a, int b) {
    return _mm512_inserti64x4(_mm512_set1_epi16(static_cast<short>(a)), _mm256_set1_epi16(static_cast<short>(b)), 1);
}
// int16 lanes in groups of 8 taking table entries first, first+1, first+2, first+3.
inline __m512i quarters_index(int first) {
    return _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16(static_cast<short>(first + 1)),
                                                _mm_set1_epi16(static_cast<short>(first)))),
        _mm256_set_m128i(_mm_set1_epi16(static_cast<short>(first + 3)), _mm_set1_epi16(static_cast<short>(first + 2))),
        1);
}

// Q4_K and Q5_K share everything but the fifth bit. 64-byte loads of qs: low nibbles hold
// sub-blocks 4p and 4p+2, high nibbles 4p+1 and 4p+3 (the activations are interleaved to match).
template <bool kHighBit>
struct DotQ45K {
    using Act = ActQ8K;
    static constexpr int64_t kUnit = QK_K;
    static constexpr size_t kWeightBytes = sizeof(BlockQ45K<kHighBit>), kActBytes = sizeof(ActQ8K);

    template <int T>
    static void tile(const char* row, const ActQ8K* const* act, int64_t k, float* out) {
        const BlockQ45K<kHighBit>* w = reinterpret_cast<const BlockQ45K<kHighBit>*>(row);
        const int64_t nb = k / QK_K;
        // Few tokens: split the integer chains in two (latency bound otherwise). Integer sums are
        // exact in any order, so this may depend on T; the float chain may not (batch invariance).
        constexpr int NI = T <= 4 ? 2 : 1;
        const __m512i nib = _mm512_set1_epi8(0x0F);
        __m512 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
            __m128i sc8, mn8;
            decode_k_scales(w[b].scales, sc8, mn8);
            const __m512i sc16 = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(sc8));
            // dmin * m per 16 elements, to pair with dsum.
            const __m512 mins = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(mn8, mn8))),
                                              _mm512_set1_ps(half_to_f32(w[b].dmin)));
            __m512i high;
            if constexpr (kHighBit) high = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qh)));
            __m512i iacc[NI][T];
            for (int u = 0; u < NI; ++u)
                for (int t = 0; t < T; ++t) iacc[u][t] = _mm512_setzero_si512();
            for (int p = 0; p < 2; ++p) {
                const __m512i q = load512(w[b].qs + 64 * p);
                __m512i lo = _mm512_and_si512(q, nib);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), nib);
                if constexpr (kHighBit) {
                    const __m512i bits_lo = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << (4 * p))),
                                                               _mm256_set1_epi8(static_cast<char>(1 << (4 * p + 2))), 1);
                    const __m512i bits_hi = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(2 << (4 * p))),
                                                               _mm256_set1_epi8(static_cast<char>(2 << (4 * p + 2))), 1);
                    const __m512i sixteen = _mm512_set1_epi8(0x10);
                    lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(high, bits_lo), lo, sixteen);
                    hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(high, bits_hi), hi, sixteen);
                }
                const __m512i sc_lo = _mm512_permutexvar_epi16(halves_index(4 * p, 4 * p + 2), sc16);
                const __m512i sc_hi = _mm512_permutexvar_epi16(halves_index(4 * p + 1, 4 * p + 3), sc16);
                for (int t = 0; t < T; ++t) {
                    const int8_t* a = act[t][b].q + 128 * p;
                    iacc[0][t] = dot_s16_512(iacc[0][t], _mm512_maddubs_epi16(lo, load512(a)), sc_lo);
                    iacc[NI - 1][t] = dot_s16_512(iacc[NI - 1][t], _mm512_maddubs_epi16(hi, load512(a + 64)), sc_hi);
                }
            }
            const __m512 d = _mm512_set1_ps(half_to_f32(w[b].d));
            for (int t = 0; t < T; ++t) {
                const ActQ8K& a = act[t][b];
                __m512i sum = iacc[0][t];
                if (NI > 1) sum = _mm512_add_epi32(sum, iacc[NI - 1][t]);
                // The block's share is formed off the accumulator chain: one add per block in it.
                const __m512 block = _mm512_fmsub_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_set1_ps(a.d)),
                                                     _mm512_mul_ps(mins, _mm512_loadu_ps(a.dsum)));
                acc[t] = _mm512_add_ps(acc[t], block);
            }
        }
        for (int t = 0; t < T; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
    }
};

// 64-byte loads of ql give elements 0-63 (low nibbles) and 64-127 (high nibbles) of a half; the
// matching 2-bit fields come from one 32-byte qh load shifted differently in each 256-bit half.
struct DotQ6K {
    using Act = ActQ8K;
    static constexpr int64_t kUnit = QK_K;
    static constexpr size_t kWeightBytes = sizeof(BlockQ6_K), kActBytes = sizeof(ActQ8K);

    template <int T>
    static void tile(const char* row, const ActQ8K* const* act, int64_t k, float* out) {
        const BlockQ6_K* w = reinterpret_cast<const BlockQ6_K*>(row);
        const int64_t nb = k / QK_K;
        constexpr int NI = T <= 4 ? 2 : 1;  // integer chains only: exact in any order
        const __m512i nib = _mm512_set1_epi8(0x0F);
        const __m512i two_bits = _mm512_set1_epi8(0x30);
        const __m512i shift_first = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
        const __m512i shift_second = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
        __m512 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
            const __m128i sc8 = load128(w[b].scales);
            const __m512i sc16 = _mm512_cvtepi8_epi16(_mm256_zextsi128_si256(sc8));
            const float d = half_to_f32(w[b].d);
            // Weights are stored as q + 32: -32 * d * scale per 16 elements, to pair with dsum.
            const __m512 offset = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc8)), _mm512_set1_ps(-32.0f * d));
            __m512i iacc[NI][T];
            for (int u = 0; u < NI; ++u)
                for (int t = 0; t < T; ++t) iacc[u][t] = _mm512_setzero_si512();
            for (int h = 0; h < 2; ++h) {
                const __m512i ql = load512(w[b].ql + 64 * h);
                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qh + 32 * h)));
                const __m512i q_first = _mm512_or_si512(_mm512_and_si512(ql, nib),
                                                        _mm512_and_si512(_mm512_sllv_epi16(qh, shift_first), two_bits));
                const __m512i q_second = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), nib),
                                                         _mm512_and_si512(_mm512_srlv_epi16(qh, shift_second), two_bits));
                const __m512i sc_first = _mm512_permutexvar_epi16(quarters_index(8 * h), sc16);
                const __m512i sc_second = _mm512_permutexvar_epi16(quarters_index(8 * h + 4), sc16);
                for (int t = 0; t < T; ++t) {
                    const int8_t* a = act[t][b].q + 128 * h;
                    iacc[0][t] = dot_s16_512(iacc[0][t], _mm512_maddubs_epi16(q_first, load512(a)), sc_first);
                    iacc[NI - 1][t] = dot_s16_512(iacc[NI - 1][t], _mm512_maddubs_epi16(q_second, load512(a + 64)), sc_second);
                }
            }
            const __m512 dv = _mm512_set1_ps(d);
            for (int t = 0; t < T; ++t) {
                const ActQ8K& a = act[t][b];
                __m512i sum = iacc[0][t];
                if (NI > 1) sum = _mm512_add_epi32(sum, iacc[NI - 1][t]);
                const __m512 block = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dv, _mm512_set1_ps(a.d)),
                                                     _mm512_mul_ps(offset, _mm512_loadu_ps(a.dsum)));
                acc[t] = _mm512_add_ps(acc[t], block);
            }
        }
        for (int t = 0; t < T; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
    }
};

#else  // AVX2

// int16 vector of table entry j (0-7) in every lane, from a table of 8 int16 in both halves.
inline __m256i broadcast_entry(__m256i table, int j) {
    return _mm256_shuffle_epi8(table, _mm256_set1_epi16(static_cast<short>(((2 * j + 1) << 8) | (2 * j))));
}

// Per 32 weights of chunk c: low nibbles are sub-block 2c, high nibbles 2c+1.
template <bool kHighBit>
struct DotQ45K {
    using Act = ActQ8K;
    static constexpr int64_t kUnit = QK_K;
    static constexpr size_t kWeightBytes = sizeof(BlockQ45K<kHighBit>), kActBytes = sizeof(ActQ8K);

    template <int T>
    static void tile(const char* row, const ActQ8K* const* act, int64_t k, float* out) {
        const BlockQ45K<kHighBit>* w = reinterpret_cast<const BlockQ45K<kHighBit>*>(row);
        const int64_t nb = k / QK_K;
        constexpr int NI = T <= 2 ? 2 : 1;  // integer chains only: exact in any order
        const __m256i nib = _mm256_set1_epi8(0x0F);
        __m256 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
            __m128i sc8, mn8;
            decode_k_scales(w[b].scales, sc8, mn8);
            const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc8));
            const __m128i mn_pairs = _mm_unpacklo_epi8(mn8, mn8);
            const __m256 dmin = _mm256_set1_ps(half_to_f32(w[b].dmin));
            const __m256 mins0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn_pairs)), dmin);
            const __m256 mins1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(mn_pairs, 8))), dmin);
            __m256i iacc[NI][T];
            for (int u = 0; u < NI; ++u)
                for (int t = 0; t < T; ++t) iacc[u][t] = _mm256_setzero_si256();
            __m256i high;
            if constexpr (kHighBit) high = load256(w[b].qh);
            for (int c = 0; c < 4; ++c) {
                const __m256i q = load256(w[b].qs + 32 * c);
                __m256i lo = _mm256_and_si256(q, nib);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nib);
                if constexpr (kHighBit) {
                    // Bits 2c and 2c+1 of each qh byte sit at bits 0 and 1 after shifting by 2c.
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(1)), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(2)), 3));
                    high = _mm256_srli_epi16(high, 2);
                }
                const __m256i sc_lo = broadcast_entry(scales, 2 * c);
                const __m256i sc_hi = broadcast_entry(scales, 2 * c + 1);
                for (int t = 0; t < T; ++t) {
                    const int8_t* a = act[t][b].q;
                    iacc[0][t] = dot_s16(iacc[0][t], _mm256_maddubs_epi16(lo, load256(a + 32 * kInterleavedGroup[2 * c])), sc_lo);
                    iacc[NI - 1][t] = dot_s16(iacc[NI - 1][t],
                                              _mm256_maddubs_epi16(hi, load256(a + 32 * kInterleavedGroup[2 * c + 1])), sc_hi);
                }
            }
            const float d = half_to_f32(w[b].d);
            for (int t = 0; t < T; ++t) {
                const ActQ8K& a = act[t][b];
                __m256i sum = iacc[0][t];
                if (NI > 1) sum = _mm256_add_epi32(sum, iacc[NI - 1][t]);
                // The block's share is formed off the accumulator chain: one add per block in it.
                const __m256 m = _mm256_fmadd_ps(mins1, _mm256_loadu_ps(a.dsum + 8), _mm256_mul_ps(mins0, _mm256_loadu_ps(a.dsum)));
                acc[t] = _mm256_add_ps(acc[t], _mm256_fmsub_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d * a.d), m));
            }
        }
        for (int t = 0; t < T; ++t) out[t] = hsum(acc[t]);
    }
};

struct DotQ6K {
    using Act = ActQ8K;
    static constexpr int64_t kUnit = QK_K;
    static constexpr size_t kWeightBytes = sizeof(BlockQ6_K), kActBytes = sizeof(ActQ8K);

    template <int T>
    static void tile(const char* row, const ActQ8K* const* act, int64_t k, float* out) {
        const BlockQ6_K* w = reinterpret_cast<const BlockQ6_K*>(row);
        const int64_t nb = k / QK_K;
        constexpr int NI = T <= 2 ? 2 : 1;  // integer chains only: exact in any order
        const __m256i nib = _mm256_set1_epi8(0x0F);
        const __m256i two_bits = _mm256_set1_epi8(0x30);
        __m256 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
            // Scales of sub-blocks 0-7 / 8-15 as int16 in both halves; a 32-byte vector v of
            // weights covers sub-blocks 2v (first half) and 2v+1 (second half).
            const __m128i sc8 = load128(w[b].scales);
            const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
            const __m256i sc_first = _mm256_permute2x128_si256(sc16, sc16, 0x00);
            const __m256i sc_second = _mm256_permute2x128_si256(sc16, sc16, 0x11);
            const float d = half_to_f32(w[b].d);
            // Weights are stored as q + 32: -32 * d * scale per 16 elements, to pair with dsum.
            const __m256 minus32d = _mm256_set1_ps(-32.0f * d);
            const __m256 offset0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)), minus32d);
            const __m256 offset1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8))), minus32d);
            __m256i iacc[NI][T];
            for (int u = 0; u < NI; ++u)
                for (int t = 0; t < T; ++t) iacc[u][t] = _mm256_setzero_si256();
            for (int h = 0; h < 2; ++h) {
                const __m256i ql0 = load256(w[b].ql + 64 * h);
                const __m256i ql1 = load256(w[b].ql + 64 * h + 32);
                const __m256i qh = load256(w[b].qh + 32 * h);
                const __m256i q[4] = {
                    _mm256_or_si256(_mm256_and_si256(ql0, nib), _mm256_and_si256(_mm256_slli_epi16(qh, 4), two_bits)),
                    _mm256_or_si256(_mm256_and_si256(ql1, nib), _mm256_and_si256(_mm256_slli_epi16(qh, 2), two_bits)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), nib), _mm256_and_si256(qh, two_bits)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), nib),
                                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), two_bits)),
                };
                const __m256i& sc_src = h == 0 ? sc_first : sc_second;
                for (int i = 0; i < 4; ++i) {
                    const __m256i sc = _mm256_shuffle_epi8(
                        sc_src, _mm256_set_m128i(_mm_set1_epi16(static_cast<short>(((4 * i + 3) << 8) | (4 * i + 2))),
                                                 _mm_set1_epi16(static_cast<short>(((4 * i + 1) << 8) | (4 * i)))));
                    for (int t = 0; t < T; ++t) {
                        const int8_t* a = act[t][b].q + 128 * h + 32 * i;
                        iacc[i % NI][t] = dot_s16(iacc[i % NI][t], _mm256_maddubs_epi16(q[i], load256(a)), sc);
                    }
                }
            }
            for (int t = 0; t < T; ++t) {
                const ActQ8K& a = act[t][b];
                __m256i sum = iacc[0][t];
                if (NI > 1) sum = _mm256_add_epi32(sum, iacc[NI - 1][t]);
                const __m256 o = _mm256_fmadd_ps(offset1, _mm256_loadu_ps(a.dsum + 8), _mm256_mul_ps(offset0, _mm256_loadu_ps(a.dsum)));
                acc[t] = _mm256_add_ps(acc[t], _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d * a.d), o));
            }
        }
        for (int t = 0; t < T; ++t) out[t] = hsum(acc[t]);
    }
};

#endif

}  // namespace

void chunk_q4_k(const MatmulJob& j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    run_tiles<DotQ45K<false>>(j, r0, r1, t0, t1);
}
void chunk_q5_k(const MatmulJob& j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    run_tiles<DotQ45K<true>>(j, r0, r1, t0, t1);
}
void chunk_q6_k(const MatmulJob& j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    run_tiles<DotQ6K>(j, r0, r1, t0, t1);
}

}  // namespace glmoe
#endif
