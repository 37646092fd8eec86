// Internal to the matmul: the work description shared by the per-type kernels, and the loop that
// walks a block of rows x tokens in register tiles of up to kMaxTile tokens, so that each weight
// row is loaded (and unpacked) once per tile instead of once per token.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace glmoe {

#if defined(__AVX512VL__)
constexpr int kMaxTile = 8;  // 32 vector registers hold 8 tokens' accumulators
#else
constexpr int kMaxTile = 4;
#endif

struct MatmulJob {
    uint32_t type;        // for the portable dequantize-then-dot path
    const char* W;
    size_t w_row_bytes;
    int64_t k;
    const char* act;      // the activations in the kernel's format, one row per token
    size_t act_row_bytes;
    float* y;
    int64_t ldy;
};

// Kernel entry point: y for rows [r0, r1) and tokens [t0, t1).
using ChunkFn = void (*)(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1);

// Chunk kernels, one per weight type, defined in matmul_float.cpp / matmul_q32.cpp /
// matmul_kquants.cpp (x86 SIMD builds only).
void chunk_f32(const MatmulJob&, int64_t, int64_t, int64_t, int64_t);
void chunk_f16(const MatmulJob&, int64_t, int64_t, int64_t, int64_t);
void chunk_bf16(const MatmulJob&, int64_t, int64_t, int64_t, int64_t);
void chunk_q8_0(const MatmulJob&, int64_t, int64_t, int64_t, int64_t);
void chunk_q4_0(const MatmulJob&, int64_t, int64_t, int64_t, int64_t);
void chunk_q5_0(const MatmulJob&, int64_t, int64_t, int64_t, int64_t);
void chunk_q4_k(const MatmulJob&, int64_t, int64_t, int64_t, int64_t);
void chunk_q5_k(const MatmulJob&, int64_t, int64_t, int64_t, int64_t);
void chunk_q6_k(const MatmulJob&, int64_t, int64_t, int64_t, int64_t);

// Dot::tile<T>(weight_row, act[T], k, out[T]) computes T dot products against one row. Dot::kUnit
// elements take Dot::kWeightBytes of a weight row and Dot::kActBytes of an activation row.
//
// Batch invariance: a token's result must not depend on which tile size T it lands in (nor on the
// other tokens of the call), so every Dot::tile<T> accumulates each token in exactly the order of
// tile<1> (same accumulators, same block order, same reduction), and the k slicing below does not
// depend on T.
//
// k is cut into slices of one token's activations fitting in L1; a tile's T rows of them stay in
// L2 while every row of the chunk passes. Sizing the slices for the largest tile instead would
// cut decode rows into short pieces, which costs 20-40% in measured single-token speed.
// Each output accumulates its slices in order.
constexpr size_t kActSliceBudget = 24 * 1024;

// A Dot with rows_for(T) also blocks rows: Dot::tile_rows<R, T>(row, row_stride, act[T], k,
// out[R * T]) computes R consecutive rows x T tokens at once, so each activation load is reused
// across R rows. Every (row, token) result must come out bitwise the same for every R and T.
template <class Dot, class = void>
struct BlocksRows : std::false_type {};
template <class Dot>
struct BlocksRows<Dot, std::void_t<decltype(Dot::rows_for(1))>> : std::true_type {};

template <class Dot, int T>
void rows_times_tile(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0) {
    using Act = typename Dot::Act;
    constexpr int64_t units_per_slice = std::max<int64_t>(1, kActSliceBudget / Dot::kActBytes);
    for (int64_t u0 = 0; u0 * Dot::kUnit < job.k; u0 += units_per_slice) {
        const int64_t i0 = u0 * Dot::kUnit;
        const int64_t len = std::min<int64_t>(units_per_slice * Dot::kUnit, job.k - i0);
        const Act* act[T];
        for (int t = 0; t < T; ++t)
            act[t] = reinterpret_cast<const Act*>(job.act + (t0 + t) * job.act_row_bytes + u0 * Dot::kActBytes);
        auto store = [&](int64_t r, const float* out) {
            for (int t = 0; t < T; ++t) {
                float& y = job.y[(t0 + t) * job.ldy + r];
                y = i0 == 0 ? out[t] : y + out[t];
            }
        };
        const char* w = job.W + u0 * Dot::kWeightBytes;
        int64_t r = r0;
        if constexpr (BlocksRows<Dot>::value) {
            constexpr int R = Dot::rows_for(T);
            for (; r + R <= r1; r += R) {
                float out[R * T];
                Dot::template tile_rows<R, T>(w + r * job.w_row_bytes, job.w_row_bytes, act, len, out);
                for (int i = 0; i < R; ++i) store(r + i, out + i * T);
            }
            for (; r < r1; ++r) {
                float out[T];
                Dot::template tile_rows<1, T>(w + r * job.w_row_bytes, job.w_row_bytes, act, len, out);
                store(r, out);
            }
        } else {
            for (; r < r1; ++r) {
                float out[T];
                Dot::template tile<T>(w + r * job.w_row_bytes, act, len, out);
                store(r, out);
            }
        }
    }
}

template <class Dot>
void run_tiles(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    while (t0 < t1) {
        const int64_t left = t1 - t0;
        if (left >= kMaxTile) {
            rows_times_tile<Dot, kMaxTile>(job, r0, r1, t0);
            t0 += kMaxTile;
        } else if (kMaxTile > 4 && left >= 4) {
            rows_times_tile<Dot, 4>(job, r0, r1, t0);
            t0 += 4;
        } else if (left >= 2) {
            rows_times_tile<Dot, 2>(job, r0, r1, t0);
            t0 += 2;
        } else {
            rows_times_tile<Dot, 1>(job, r0, r1, t0);
            t0 += 1;
        }
    }
}

}  // namespace glmoe
