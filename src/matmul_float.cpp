// Matmul kernels for the float weight types (F32, F16, BF16): weights widened to f32 eight at a
// time (F16C for F16, a shift for BF16; 16 at a time with AVX-512) and multiplied into f32 activations with FMA.
#if defined(__AVX2__) && defined(__FMA__)
#include <cmath>

#include "half.h"
#include "matmul_tiles.h"
#include "simd_x86.h"

namespace glmoe {
namespace {

#if defined(__AVX512F__)
// 16 lanes per vector.
using VecF = __m512;
constexpr int kLanes = 16;
inline VecF zero_f() { return _mm512_setzero_ps(); }
inline VecF load_f(const float* p) { return _mm512_loadu_ps(p); }
inline VecF fmadd_f(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF add_f(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline float sum_f(VecF v) { return _mm512_reduce_add_ps(v); }
inline VecF widen_f16(const uint16_t* p) { return _mm512_cvtph_ps(load256(p)); }
inline VecF widen_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p)), 16));
}
#else
using VecF = __m256;
constexpr int kLanes = 8;
inline VecF zero_f() { return _mm256_setzero_ps(); }
inline VecF load_f(const float* p) { return _mm256_loadu_ps(p); }
inline VecF fmadd_f(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF add_f(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline float sum_f(VecF v) { return hsum(v); }
inline VecF widen_f16(const uint16_t* p) { return _mm256_cvtph_ps(load128(p)); }
inline VecF widen_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16));
}
#endif

struct WeightF32 {
    using Elem = float;
    static VecF load(const float* p) { return load_f(p); }
    static float load1(const float* p) { return *p; }
};
struct WeightF16 {
    using Elem = uint16_t;
    static VecF load(const uint16_t* p) { return widen_f16(p); }
    static float load1(const uint16_t* p) { return half_to_f32(*p); }
};
struct WeightBF16 {
    using Elem = uint16_t;
    static VecF load(const uint16_t* p) { return widen_bf16(p); }
    static float load1(const uint16_t* p) { return bf16_to_f32(*p); }
};

#if defined(__AVX512F__)
// Horizontal sums in one fixed tree: lane i + lane i+8, then + 4, + 2, + 1. reduce_one does it for
// one vector; reduce_16 for sixteen at once, transposing as it adds, with the same pairs of adds
// per vector, so every path gets the same bits.
inline float reduce_one(__m512 v) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
inline __m512 reduce_16(const __m512* v) {
    __m512 c[8], e[4], g[2];
    for (int i = 0; i < 8; ++i)  // 128-bit blocks: [v_2i.lo, v_2i+1.lo] + [v_2i.hi, v_2i+1.hi]
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i) {
        const __m512d a = _mm512_castps_pd(e[2 * i]), b = _mm512_castps_pd(e[2 * i + 1]);
        g[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 h = _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xDD));
    // Lane 4b + j holds vector 4j + b.
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), h);
}
#endif

// out[i] = the horizontal sum of v[i], i < N.
template <int N>
inline void reduce_all(const VecF* v, float* out) {
#if defined(__AVX512F__)
    if constexpr (N >= 4) {
        for (int i0 = 0; i0 < N; i0 += 16) {
            __m512 pad[16];
            for (int i = 0; i < 16; ++i) pad[i] = i0 + i < N ? v[i0 + i] : _mm512_setzero_ps();
            alignas(64) float s[16];
            _mm512_store_ps(s, reduce_16(pad));
            for (int i = 0; i < 16 && i0 + i < N; ++i) out[i0 + i] = s[i];
        }
        return;
    }
    for (int i = 0; i < N; ++i) out[i] = reduce_one(v[i]);
#else
    for (int i = 0; i < N; ++i) out[i] = sum_f(v[i]);
#endif
}

// Keeps v in a register: without it the compiler folds a load shared by several FMAs into each of
// them as a memory operand, repeating the load that row blocking is meant to share.
inline void in_register(VecF& v) { asm("" : "+v"(v)); }

template <class W>
struct DotFloat {
    using Act = float;
    static constexpr int64_t kUnit = kLanes;
    static constexpr size_t kWeightBytes = kLanes * sizeof(typename W::Elem), kActBytes = kLanes * sizeof(float);

    // Summation order, the same for every R and T (batch invariance): the k range is cut into
    // vectors of kLanes; accumulator set u (of NA = 2) sums the vectors v with v % NA == u in order
    // of v; the sets are added (set 0 + set 1), reduced horizontally, and the last k % kLanes
    // elements are added one by one. Two sets hide the FMA latency when there are few tokens.
    static constexpr int NA = 2;

#if defined(__AVX512F__)
    // 32 registers: several rows share each activation load once there are 8 tokens; single-token
    // (and small) tiles stay on one row, which keeps decode on one weight stream for the prefetchers.
    static constexpr int rows_for(int T) { return T >= 8 ? kRows8 : 1; }
    static constexpr int kRows8 = 4;  // measured: 4 beats 2 and 3 at k 4096 (F32 ~70 -> ~110 GFLOP/s a core)
#else
    static constexpr int rows_for(int) { return 1; }
#endif
    static constexpr int64_t kShortK = 512;

    template <int R, int T>
    static void tile_rows(const char* row, size_t row_stride, const float* const* x, int64_t k, float* out) {
        const typename W::Elem* w[R];
        for (int r = 0; r < R; ++r) w[r] = reinterpret_cast<const typename W::Elem*>(row + r * row_stride);
        if constexpr (R == 4) {
            // Short rows (small models) do better two rows at a time: the fixed cost of 32
            // accumulators outweighs the shared loads there.
            if (k < kShortK) {
                tile_rows<2, T>(row, row_stride, x, k, out);
                tile_rows<2, T>(row + 2 * row_stride, row_stride, x, k, out + 2 * T);
                return;
            }
        }
        const int64_t nv = k / kLanes;
        VecF sum[R][T];
        if constexpr (R * T * NA <= 24) {
            // Both accumulator sets live at once: one pass, the vectors taken in pairs.
            VecF acc[NA][R][T];
            for (int u = 0; u < NA; ++u)
                for (int r = 0; r < R; ++r)
                    for (int t = 0; t < T; ++t) acc[u][r][t] = zero_f();
            int64_t v = 0;
            for (; v + NA <= nv; v += NA) {
                for (int u = 0; u < NA; ++u) {
                    const int64_t i = (v + u) * kLanes;
                    VecF wv[R];
                    for (int r = 0; r < R; ++r) wv[r] = W::load(w[r] + i);
                    for (int t = 0; t < T; ++t) {
                        VecF xv = load_f(x[t] + i);
                        if constexpr (R > 1) in_register(xv);
                        for (int r = 0; r < R; ++r) acc[u][r][t] = fmadd_f(wv[r], xv, acc[u][r][t]);
                    }
                }
            }
            for (; v < nv; ++v) {  // v % NA == 0 here
                const int64_t i = v * kLanes;
                VecF wv[R];
                for (int r = 0; r < R; ++r) wv[r] = W::load(w[r] + i);
                for (int t = 0; t < T; ++t) {
                    VecF xv = load_f(x[t] + i);
                    if constexpr (R > 1) in_register(xv);
                    for (int r = 0; r < R; ++r) acc[0][r][t] = fmadd_f(wv[r], xv, acc[0][r][t]);
                }
            }
            for (int r = 0; r < R; ++r)
                for (int t = 0; t < T; ++t) {
                    VecF s = acc[0][r][t];
                    for (int u = 1; u < NA; ++u) s = add_f(s, acc[u][r][t]);
                    sum[r][t] = s;
                }
        } else {
            // Too many accumulators for both sets at once: one pass over k per set (each pass takes
            // every NA-th vector), the first set parked in sum[] meanwhile.
            for (int u = 0; u < NA; ++u) {
                VecF acc[R][T];
                for (int r = 0; r < R; ++r)
                    for (int t = 0; t < T; ++t) acc[r][t] = zero_f();
                for (int64_t v = u; v < nv; v += NA) {
                    const int64_t i = v * kLanes;
                    VecF wv[R];
                    for (int r = 0; r < R; ++r) wv[r] = W::load(w[r] + i);
                    for (int t = 0; t < T; ++t) {
                        VecF xv = load_f(x[t] + i);
                        if constexpr (R > 1) in_register(xv);
                        for (int r = 0; r < R; ++r) acc[r][t] = fmadd_f(wv[r], xv, acc[r][t]);
                    }
                }
                for (int r = 0; r < R; ++r)
                    for (int t = 0; t < T; ++t) sum[r][t] = u == 0 ? acc[r][t] : add_f(sum[r][t], acc[r][t]);
            }
        }
        reduce_all<R * T>(&sum[0][0], out);
        const int64_t tail = nv * kLanes;
        if (tail == k) return;
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) {
                float s = out[r * T + t];
                for (int64_t j = tail; j < k; ++j) s = std::fma(W::load1(w[r] + j), x[t][j], s);  // fused in every path
                out[r * T + t] = s;
            }
    }
};

}  // namespace

void chunk_f32(const MatmulJob& j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    run_tiles<DotFloat<WeightF32>>(j, r0, r1, t0, t1);
}
void chunk_f16(const MatmulJob& j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    run_tiles<DotFloat<WeightF16>>(j, r0, r1, t0, t1);
}
void chunk_bf16(const MatmulJob& j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    run_tiles<DotFloat<WeightBF16>>(j, r0, r1, t0, t1);
}

}  // namespace glmoe
#endif
