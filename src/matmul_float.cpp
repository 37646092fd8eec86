// Matmul kernels for the float weight types (F32, F16, BF16): weights widened to f32 eight at a
// time (F16C for F16, a shift for BF16; 16 at a time with AVX-512) and multiplied into f32 activations with FMA.
#if defined(__AVX2__) && defined(__FMA__)
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

template <class W>
struct DotFloat {
    using Act = float;
    static constexpr int64_t kUnit = kLanes;
    static constexpr size_t kWeightBytes = kLanes * sizeof(typename W::Elem), kActBytes = kLanes * sizeof(float);
    template <int T>
    static void tile(const char* row, const float* const* x, int64_t k, float* out) {
        const auto* w = reinterpret_cast<const typename W::Elem*>(row);
        // Two accumulator sets hide the FMA latency when there are few tokens; every T uses both so
        // that a token's summation order does not depend on T (batch invariance).
        constexpr int NA = 2;
        VecF acc[NA][T];
        for (int u = 0; u < NA; ++u)
            for (int t = 0; t < T; ++t) acc[u][t] = zero_f();
        int64_t i = 0;
        for (; i + kLanes * NA <= k; i += kLanes * NA) {
            for (int u = 0; u < NA; ++u) {
                const VecF wv = W::load(w + i + kLanes * u);
                for (int t = 0; t < T; ++t) acc[u][t] = fmadd_f(wv, load_f(x[t] + i + kLanes * u), acc[u][t]);
            }
        }
        for (; i + kLanes <= k; i += kLanes) {
            const VecF wv = W::load(w + i);
            for (int t = 0; t < T; ++t) acc[0][t] = fmadd_f(wv, load_f(x[t] + i), acc[0][t]);
        }
        for (int t = 0; t < T; ++t) {
            VecF s = acc[0][t];
            for (int u = 1; u < NA; ++u) s = add_f(s, acc[u][t]);
            float sum = sum_f(s);
            for (int64_t j = i; j < k; ++j) sum += W::load1(w + j) * x[t][j];
            out[t] = sum;
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
