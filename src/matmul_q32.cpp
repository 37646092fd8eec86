// Matmul kernels for the 32-element block types (Q8_0, Q4_0, Q5_0) against 8-bit activations.
// Blocks are taken in pairs, in the order of the ActQ8x2 activations: per pair, the weights
// become signed bytes (q - 8, q - 16). With AVX-512 VNNI the activations (stored as x + 128, u8)
// meet them directly in a u8 x s8 dot product started at -128 * (sum of the lane's weights), computed
// once per weight pair; otherwise the weight's sign moves onto the (re-signed) activation. The int32
// lanes (0-3 of each 256 bits: block 0, 4-7: block 1) are scaled by d_weight * d_act and
// accumulated in f32.
#if defined(__AVX2__) && defined(__FMA__)
#include <cstring>
#include <type_traits>
#include <utility>

#include "half.h"
#include "matmul_tiles.h"
#include "quant_blocks.h"
#include "simd_x86.h"

namespace glmoe {
namespace {

// Each type turns a pair of blocks into signed bytes in the ActQ8x2 order: lo = elements 0-15 of
// both blocks, hi = elements 16-31 of both.
struct WeightQ8_0 {
    using Block = BlockQ8_0;
    static void pair(const Block& b0, const Block& b1, __m256i& lo, __m256i& hi) {
        interleave_pair(load256(b0.qs), load256(b1.qs), lo, hi);
    }
};

inline __m256i both_qs(const uint8_t* qs0, const uint8_t* qs1) { return _mm256_set_m128i(load128(qs1), load128(qs0)); }

#if defined(__AVX512BW__) && defined(__AVX512VL__)
// Low nibbles of both blocks' qs in the lower 256 bits, high nibbles in the upper: pair()'s [lo, hi].
inline __m512i nibbles512(const uint8_t* qs0, const uint8_t* qs1) {
    const __m512i q = _mm512_broadcast_i64x4(both_qs(qs0, qs1));
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    return _mm512_and_si512(_mm512_srlv_epi16(q, shift), _mm512_set1_epi8(0x0F));
}
#endif

struct WeightQ4_0 {
    using Block = BlockQ4_0;
    static void pair(const Block& b0, const Block& b1, __m256i& lo, __m256i& hi) {
        const __m256i q = both_qs(b0.qs, b1.qs), nib = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
        lo = _mm256_sub_epi8(_mm256_and_si256(q, nib), eight);
        hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(q, 4), nib), eight);
    }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    // [lo, hi] of pair() in one register, with half the instructions.
    static __m512i pair512(const Block& b0, const Block& b1) {
        return _mm512_sub_epi8(nibbles512(b0.qs, b1.qs), _mm512_set1_epi8(8));
    }
#endif
};

// 0x10 in byte j where bit j of m is set.
inline __m256i expand_bits(uint32_t m) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_maskz_mov_epi8(m, _mm256_set1_epi8(0x10));
#else
    // Byte j takes byte j/8 of m, then tests its bit j%8.
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(m)),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
#endif
}

struct WeightQ5_0 {
    using Block = BlockQ5_0;
    static void pair(const Block& b0, const Block& b1, __m256i& lo, __m256i& hi) {
        uint32_t h0, h1;
        std::memcpy(&h0, b0.qh, sizeof h0);
        std::memcpy(&h1, b1.qh, sizeof h1);
        const __m256i q = both_qs(b0.qs, b1.qs), nib = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(16);
        const __m256i high_lo = expand_bits((h0 & 0xFFFF) | (h1 << 16));
        const __m256i high_hi = expand_bits((h0 >> 16) | (h1 & 0xFFFF0000u));
        lo = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(q, nib), high_lo), sixteen);
        hi = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), nib), high_hi), sixteen);
    }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    static __m512i pair512(const Block& b0, const Block& b1) {
        uint32_t h0, h1;
        std::memcpy(&h0, b0.qh, sizeof h0);
        std::memcpy(&h1, b1.qh, sizeof h1);
        const uint64_t high = ((h0 & 0xFFFF) | (h1 << 16)) | static_cast<uint64_t>((h0 >> 16) | (h1 & 0xFFFF0000u)) << 32;
        const __m512i q = nibbles512(b0.qs, b1.qs);
        // +16 where the fifth bit is set, then -16: the signed value.
        return _mm512_sub_epi8(_mm512_mask_add_epi8(q, high, q, _mm512_set1_epi8(16)), _mm512_set1_epi8(16));
    }
#endif
};

// Both f16 scales of a block pair at once: [d0 x4, d1 x4].
template <class Block>
inline __m256 pair_scales(const Block& b0, const Block& b1) {
    const __m128 d01 = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(b0.d | static_cast<uint32_t>(b1.d) << 16)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d01), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
template <class W, class = void>
struct HasPair512 : std::false_type {};
template <class W>
struct HasPair512<W, std::void_t<decltype(W::pair512(std::declval<const typename W::Block&>(),
                                                     std::declval<const typename W::Block&>()))>> : std::true_type {};

// A block pair's signed bytes [lo, hi] in one register.
template <class W>
inline __m512i pair512(const typename W::Block& b0, const typename W::Block& b1) {
    if constexpr (HasPair512<W>::value) {
        return W::pair512(b0, b1);
    } else {
        __m256i lo, hi;
        W::pair(b0, b1, lo, hi);
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
}
#endif

// [a.d[0] x4, a.d[1] x4].
inline __m256 act_scales(const ActQ8x2& a) {
    return _mm256_permutevar8x32_ps(_mm256_loadu_ps(a.d), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// R rows x T tokens per call: per pair, each row's weights are unpacked once for the T tokens and
// each token's activations are loaded once for the R rows. Every (row, token) takes the same steps
// whatever R and T: one f32 accumulator, pairs in order, one reduction (batch invariance); the
// integer dot products are exact.
template <class W>
struct DotQ32 {
    using Act = ActQ8x2;
    using Block = typename W::Block;
    static constexpr int64_t kUnit = 2 * QK32;
    static constexpr size_t kWeightBytes = 2 * sizeof(Block), kActBytes = sizeof(ActQ8x2);
    // R * T accumulators plus R rows' weights, corrections and scales in registers. 2 x 8 measured
    // best for prefill (228 GFLOP/s on one core, against 198 for 4 x 4 and 152 before row
    // blocking). Fewer tokens stream their rows from memory (decode), where R interleaved row
    // streams measured much slower than one (tg32 34 -> 18-22 t/s with R = 2 or 4), so they take
    // one row at a time.
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    static constexpr int rows_for(int T) { return T >= 8 ? 2 : 1; }
    using Acc = __m512;
#else
    static constexpr int rows_for(int) { return 1; }  // 16 registers: no room for more rows
    using Acc = __m256;
#endif

    // Not inlined into the caller's loops over rows and k slices: with their values live, GCC kept
    // this loop's pointers in xmm registers or on the stack (one token 1.3-1.6x slower, Zen 5).
    template <int R, int T>
    static __attribute__((noinline)) void tile_rows(const char* row, size_t row_stride, const ActQ8x2* const* act, int64_t k, float* out) {
        static const Block zero_block{};
        const Block* w[R];
        for (int r = 0; r < R; ++r) w[r] = reinterpret_cast<const Block*>(row + r * row_stride);
        const int64_t nb = k / QK32, n_full_pairs = nb / 2;
        Acc acc[R][T];
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) acc[r][t] = Acc{};
        // The full pairs, then an odd last block with a zero block: the same steps in the same
        // order as one loop over all pairs, without a test per pair.
        const Block* first[R];
        const Block* second[R];
        for (int64_t p = 0; p < n_full_pairs; ++p) {
            for (int r = 0; r < R; ++r) {
                first[r] = w[r] + 2 * p;
                second[r] = first[r] + 1;
            }
            add_pair<R, T>(first, second, act, p, acc);
        }
        if (nb % 2) {
            for (int r = 0; r < R; ++r) {
                first[r] = w[r] + nb - 1;
                second[r] = &zero_block;
            }
            add_pair<R, T>(first, second, act, n_full_pairs, acc);
        }
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) out[r * T + t] = hsum(acc[r][t]);
    }

    // acc[r][t] += (blocks first[r], second[r]) . (activation pair p of token t).
    template <int R, int T>
    static inline __attribute__((always_inline)) void add_pair(const Block* const* first, const Block* const* second,
                                                               const ActQ8x2* const* act, int64_t p, Acc (&acc)[R][T]) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        const __m512i pair_scale_index = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
        const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
        __m512i v[R], base[R];
        __m512 dw[R];
#if !defined(__AVX512VNNI__)
        __mmask64 negative[R];
#endif
        for (int r = 0; r < R; ++r) {
            v[r] = pair512<W>(*first[r], *second[r]);
            const __m256 d = pair_scales(*first[r], *second[r]);
            dw[r] = _mm512_insertf32x8(_mm512_castps256_ps512(d), d, 1);
#if defined(__AVX512VNNI__)
            // The activations are stored as x + 128: start each lane at -128 * (its 4 weights).
            base[r] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, v[r]));
#else
            negative[r] = _mm512_movepi8_mask(v[r]);
            base[r] = _mm512_abs_epi8(v[r]);
#endif
        }
        for (int t = 0; t < T; ++t) {
            const ActQ8x2& a = act[t][p];
            const __m512i av = _mm512_loadu_si512(a.q);
            // [d0 x4, d1 x4] twice; the 64-byte load stays inside the ActQ8x2.
            const __m512 da = _mm512_permutexvar_ps(pair_scale_index, _mm512_loadu_ps(a.d));
#if !defined(__AVX512VNNI__)
            const __m512i as = _mm512_xor_si512(av, bias);
#endif
            for (int r = 0; r < R; ++r) {
#if defined(__AVX512VNNI__)
                const __m512i dot = _mm512_dpbusd_epi32(base[r], av, v[r]);
#else
                const __m512i signed_a = _mm512_mask_sub_epi8(as, negative[r], _mm512_setzero_si512(), as);
                const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(base[r], signed_a), _mm512_set1_epi16(1));
#endif
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[r], da), acc[r][t]);
            }
        }
#else
        const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
        __m256i lo[R], hi[R], lo_abs[R], hi_abs[R];
        __m256 dw[R];
        for (int r = 0; r < R; ++r) {
            W::pair(*first[r], *second[r], lo[r], hi[r]);
            dw[r] = pair_scales(*first[r], *second[r]);
            lo_abs[r] = _mm256_abs_epi8(lo[r]);
            hi_abs[r] = _mm256_abs_epi8(hi[r]);
        }
        for (int t = 0; t < T; ++t) {
            const ActQ8x2& a = act[t][p];
            // Back to signed bytes; the weight's sign moves onto the activation.
            const __m256i a_lo = _mm256_xor_si256(load256(a.q), bias), a_hi = _mm256_xor_si256(load256(a.q + 32), bias);
            const __m256 da = act_scales(a);
            for (int r = 0; r < R; ++r) {
                __m256i dot = dot_u8s8(_mm256_setzero_si256(), lo_abs[r], _mm256_sign_epi8(a_lo, lo[r]));
                dot = dot_u8s8(dot, hi_abs[r], _mm256_sign_epi8(a_hi, hi[r]));
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[r], da), acc[r][t]);
            }
        }
#endif
    }
};

}  // namespace

void chunk_q8_0(const MatmulJob& j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    run_tiles<DotQ32<WeightQ8_0>>(j, r0, r1, t0, t1);
}
void chunk_q4_0(const MatmulJob& j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    run_tiles<DotQ32<WeightQ4_0>>(j, r0, r1, t0, t1);
}
void chunk_q5_0(const MatmulJob& j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    run_tiles<DotQ32<WeightQ5_0>>(j, r0, r1, t0, t1);
}

}  // namespace glmoe
#endif
