// Decode matrix-vector products (1..kMaxMmvTokens tokens) for every weight type: plain, routed
// experts, and fused SwiGLU gate/up.
//
// Quantized weights (mmvq_kernel). A CTA of 4 warps owns 4 * RW output rows (per row group); each
// warp streams its own RW rows (2 * RW for SwiGLU: gate and up) through a private cp.async ring in
// shared memory, in chunks of 1024 columns: 16-byte copies of contiguous row bytes keep every load
// fully coalesced whatever the block size (34, 18, 22, 144, 176, 210 bytes). In a chunk lane i
// decodes item i (32 weights) of each of its rows from shared memory and dots it, with __dp4a,
// against the 8-bit activations, which the CTA stages once in shared memory (a "slab" of columns,
// reused by all rows of the CTA). Each lane therefore holds RW x NT partial sums in registers;
// a butterfly reduction at the end of each row group gives the outputs.
//
// Float weights (mmvf_kernel): the same CTA / row split, f32 activations read through L1 with
// 16-byte loads, 8 columns per lane per step.
//
// Routed experts: grid.y is the (token, slot) pair, the expert comes from ids (block-uniform), so
// every pair is a one-token product; the routed and the shared expert may differ in type because
// each CTA picks the main loop compiled for its matrix's type (a block-uniform switch). A float
// shared expert beside quantized routed ones (or the reverse) takes a second launch: each kernel
// skips the pairs of the other family.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_common.cuh"
#include "ggml_types.h"
#include "kernels.h"
#include "mmv_blocks.cuh"

namespace glmoe::cuda {
namespace {

using namespace mmv_detail;

constexpr int kWarps = 4;           // warps per CTA
constexpr int kThreads = 32 * kWarps;
constexpr int kChunkCols = 1024;    // columns per pipeline step: 32 items of 32
constexpr int kRowBuf = 1120;       // bytes per staged row chunk: 1088 (Q8_0) + alignment + 4 slack
constexpr int kActBudget = 24 * 1024;  // shared bytes for the activation slab

// One weight matrix set: the routed stack and the (optional) shared expert.
struct MatSet {
    const uint8_t* routed = nullptr;
    const uint8_t* shared = nullptr;
    uint32_t rtype = 0, stype = 0;
    uint32_t r_row_bytes = 0, s_row_bytes = 0;
    size_t matrix_bytes = 0;
};

struct Args {
    MatSet m[2];               // m[1]: the up projection (SwiGLU only)
    int n_routed = 1;
    const int32_t* ids = nullptr;  // null: dense (expert 0, NT tokens in one CTA)
    int n_slots = 1;
    const void* x = nullptr;   // BlockQ8 or float
    int64_t x_stride = 0;      // per input row, in blocks (BlockQ8) or floats
    bool x_per_slot = false;
    float* y = nullptr;
    int64_t y_stride = 0;      // per output row (token or pair)
    bool accumulate = false;
    int64_t rows = 0, cols = 0;
    int groups = 1;            // row groups per CTA
    int slab_chunks = 1;       // chunks per activation slab
    bool mixed = false;        // routed and shared experts of different families: two launches,
                               // each kernel skipping the pairs of the other family
};

__device__ __forceinline__ bool float_type(uint32_t t) {
    return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16;
}

// Whether a CTA of the quantized (float_kernel false) or float kernel leaves its pair to the
// other kernel. Invalid expert ids are reported (NaN) by the quantized kernel alone.
__device__ __forceinline__ bool skip_pair(const Args& a, bool ok, uint32_t type, bool float_kernel) {
    if (!a.mixed) return false;
    return ok ? float_type(type) != float_kernel : float_kernel;
}

// The matrix of set `ms` a CTA works on; false if the expert id is out of range.
__device__ __forceinline__ bool pick_matrix(const MatSet& ms, int e, int n_routed, const uint8_t*& base,
                                            uint32_t& type, uint32_t& row_bytes) {
    if (e >= 0 && e < n_routed) {
        base = ms.routed + static_cast<size_t>(e) * ms.matrix_bytes;
        type = ms.rtype;
        row_bytes = ms.r_row_bytes;
        return true;
    }
    base = ms.shared;
    type = ms.stype;
    row_bytes = ms.s_row_bytes;
    return e == n_routed && ms.shared != nullptr;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Butterfly sum: every lane ends with the warp total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }  // once per output: keep it exact

// Reduces acc over the warp and writes the RW x NT outputs of rows row0.. (SwiGLU: streams RW..
// hold the up rows). Output of token/pair u at y + out_row(u) * y_stride + row.
template <int NT, int RW, bool SW, int S>
__device__ __forceinline__ void write_outputs(const Args& a, float (&acc)[S][NT], int64_t row0, int64_t pair,
                                              bool bad, int lane) {
#pragma unroll
    for (int s = 0; s < S; ++s)
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[s][t] = warp_sum(acc[s][t]);
#pragma unroll
    for (int r = 0; r < RW; ++r) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (lane != (r * NT + t) % 32) continue;
            const int64_t row = row0 + r;
            if (row >= a.rows) continue;
            float v = SW ? silu(acc[r][t]) * acc[(RW + r) % S][t] : acc[r][t];
            if (bad) v = __int_as_float(0x7FC00000);  // invalid expert id: make it visible
            float* dst = a.y + (a.ids ? pair : t) * a.y_stride + row;
            *dst = a.accumulate ? *dst + v : v;
        }
    }
}

// ---- quantized weights ------------------------------------------------------------------------

// Ring depth. Deeper rings measured slower at every depth tried (H100, tg128 on the Air-shaped
// file, experts at 3, 4 and 6 stages: 574-617 vs 626 t/s): the shared memory they take costs
// more resident CTAs than the extra bytes in flight gain.
constexpr int kStages = 2;

template <int NT, int RW, bool SW>
struct QCfg {
    static constexpr int S = RW * (SW ? 2 : 1);   // row streams per warp
    static constexpr int STAGES = kStages;
    static constexpr int kWeightBytes = kWarps * STAGES * S * kRowBuf;
};

// CTAs per SM the register budget must allow: 4 for the decode kernels (NT <= 2: with the aligned
// K-quant decoding they would take 137 registers and 3 CTAs; bounded, 118 without spilling), 3 for
// the wider ones (4 would spill their NT x S accumulators).
template <int NT>
constexpr int kMinCtas = NT <= 2 ? 4 : 3;
template <int NT, int RW, bool SW>
__global__ void __launch_bounds__(kThreads, kMinCtas<NT>) mmvq_kernel(const Args a) {
    using C = QCfg<NT, RW, SW>;
    constexpr int S = C::S, STAGES = C::STAGES;
    extern __shared__ uint4 smem_u4[];
    uint8_t* const smem = reinterpret_cast<uint8_t*>(smem_u4);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    uint8_t* const wbuf = smem + warp * (STAGES * S * kRowBuf);
    const int slab_blocks = a.slab_chunks * 32;
    float2* const act_ds = reinterpret_cast<float2*>(smem + C::kWeightBytes);  // [NT][slab_blocks]
    int8_t* const act_q = reinterpret_cast<int8_t*>(act_ds + NT * slab_blocks);  // [NT][slab_blocks*32]

    // The expert of this CTA (block-uniform) and its matrices. Expert ids come from the previous
    // kernel: wait for it first. A dense matrix is known now: its first weight chunks are requested
    // before the wait, overlapping the previous kernel's tail.
    const bool dense = a.ids == nullptr;
    if (!dense) pdl_wait();
    const int64_t pair = blockIdx.y;
    const int e = dense ? 0 : a.ids[pair];
    const uint8_t* base[2];
    uint32_t type[2], rbytes[2];
    bool ok = pick_matrix(a.m[0], e, a.n_routed, base[0], type[0], rbytes[0]);
    if (SW) ok = pick_matrix(a.m[1], e, a.n_routed, base[1], type[1], rbytes[1]) && ok;
    else base[1] = base[0], type[1] = type[0], rbytes[1] = rbytes[0];
    if (skip_pair(a, ok, type[0], false)) return;  // block-uniform, before any barrier
    const bool bad = !ok;
    if (bad) base[0] = base[1] = nullptr;
    // The main loop is compiled once per weight type (the block-uniform switch below): with the
    // type a constant, each item's decoding is straight-line code, which the compiler interleaves
    // over the row streams; a run-time switch per stream and item serialised them.
    // aligned_c: every staged row chunk starts 16-byte aligned (rows16 below), which the Q4_K and
    // Q5_K decoding can use for whole 16-byte reads (item_weights_kquant_aligned).
    auto run = [&](auto type_c, auto aligned_c) {
        const uint32_t ty = static_cast<uint32_t>(type_c);
        constexpr bool kAligned = decltype(aligned_c)::value;
        const TypeGeom geom = type_geom(ty);
        const int chunk_bytes = geom.block_bytes * (kChunkCols / geom.block_elems);
        const BlockQ8* x = static_cast<const BlockQ8*>(a.x) +
                           (a.ids ? (a.x_per_slot ? pair : pair / a.n_slots) * a.x_stride : 0);

        const int rows_per_group = kWarps * RW;
        const int64_t n_groups_total = (a.rows + rows_per_group - 1) / rows_per_group;
        const int64_t g_first = static_cast<int64_t>(blockIdx.x) * a.groups;
        const int n_groups = static_cast<int>(std::min<int64_t>(a.groups, n_groups_total - g_first));
        const int nchunks = static_cast<int>((a.cols + kChunkCols - 1) / kChunkCols);
        const int nslabs = (nchunks + a.slab_chunks - 1) / a.slab_chunks;
        const int nsteps = n_groups * nchunks;
        const int64_t nb_total = a.cols / 32;
        const int row_bytes = static_cast<int>(rbytes[0]);  // gate and up rows have the same bytes

        // Steps go in order (group g, chunk c), so the copies and the compute each keep counters
        // and the rows' addresses of their group: no divisions or 64-bit products per step.
        // Rows are clamped: the last group may be partial.
        auto group_rows = [&](int g, const uint8_t* (&rp)[S]) {
#pragma unroll
            for (int s = 0; s < S; ++s) {
                const int m = (SW && s >= RW) ? 1 : 0;
                const int64_t row = std::min<int64_t>((g_first + g) * rows_per_group + warp * RW + s % RW, a.rows - 1);
                rp[s] = base[m] + row * rbytes[m];
            }
        };
        const uint8_t* issue_rows[S];
        group_rows(0, issue_rows);
        int issue_q = 0, issue_g = 0, issue_c = 0;
        // Stages the next step into ring slot issue_q % STAGES: the 16-byte granules covering
        // each row's chunk.
        auto issue_next = [&]() {
            if (issue_q < nsteps && !bad) {
                uint8_t* slot = wbuf + (issue_q % STAGES) * (S * kRowBuf);
                const int first = issue_c * chunk_bytes, len = min(chunk_bytes, row_bytes - first);
#pragma unroll
                for (int s = 0; s < S; ++s) {
                    const uint8_t* p = issue_rows[s] + first;
                    const uintptr_t a0 = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(15);
                    const int n16 = static_cast<int>(((reinterpret_cast<uintptr_t>(p) + len + 15) & ~uintptr_t(15)) - a0) / 16;
                    for (int j = lane; j < n16; j += 32)
                        cp_async16(slot + s * kRowBuf + 16 * j, reinterpret_cast<const void*>(a0 + 16 * j));
                }
            }
            cp_async_commit();  // always, so that the group count per step stays fixed
            ++issue_q;
            if (++issue_c == nchunks) {
                issue_c = 0;
                if (++issue_g < n_groups) group_rows(issue_g, issue_rows);
            }
        };
        // Activations of slab `slab` into shared memory, repacked: q as [NT][cols] bytes (16-byte
        // aligned per item half), (d, s) pairs as [NT][blocks].
        auto load_act = [&](int slab) {
            const int64_t b0 = static_cast<int64_t>(slab) * slab_blocks;
            const int nb = static_cast<int>(std::min<int64_t>(slab_blocks, nb_total - b0));
            for (int j = threadIdx.x; j < NT * nb; j += kThreads) {
                const int t = j / nb, b = j % nb;
                const uint2* src = reinterpret_cast<const uint2*>(x + t * a.x_stride + b0 + b);
                const uint2 v0 = src[0], v1 = src[1], v2 = src[2], v3 = src[3], v4 = src[4];
                act_ds[t * slab_blocks + b] = make_float2(__uint_as_float(v0.x), __uint_as_float(v0.y));
                uint4* q = reinterpret_cast<uint4*>(act_q + (static_cast<int64_t>(t) * slab_blocks + b) * 32);
                q[0] = make_uint4(v1.x, v1.y, v2.x, v2.y);
                q[1] = make_uint4(v3.x, v3.y, v4.x, v4.y);
            }
        };

        float acc[S][NT];
#pragma unroll
        for (int s = 0; s < S; ++s)
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[s][t] = 0.0f;

#pragma unroll
        for (int q = 0; q < STAGES - 1; ++q) issue_next();
        if (dense) pdl_wait();
        pdl_trigger();

        // The compute side's group g, chunk c, and the chunk's place in its activation slab.
        int g = 0, c = 0, slab = 0, slab_pos = 0;
        int row_off[S];  // each row's address mod 16 (its first granule's skipped bytes)
        {
            const uint8_t* rp[S];
            group_rows(0, rp);
#pragma unroll
            for (int s = 0; s < S; ++s) row_off[s] = static_cast<int>(reinterpret_cast<uintptr_t>(rp[s]) & 15);
        }
        for (int q = 0; q < nsteps; ++q) {
            issue_next();
            if (slab_pos == 0 && (q == 0 || nslabs > 1)) {
                if (q > 0) __syncthreads();  // every warp is done with the previous slab
                load_act(slab);
                __syncthreads();
            }
            cp_async_wait<STAGES - 1>();
            __syncwarp();

            if (c * kChunkCols + 32 * lane < a.cols && !bad) {
                const uint8_t* slot = wbuf + (q % STAGES) * (S * kRowBuf);
                ItemW w[S];
#pragma unroll
                for (int s = 0; s < S; ++s)
                    w[s] = kAligned ? item_weights_kquant_aligned<decltype(type_c)::value == GGML_TYPE_Q5_K>(slot + s * kRowBuf, lane)
                                    : item_weights(ty, slot + s * kRowBuf, (row_off[s] + c * chunk_bytes) & 15, lane);
                const ItemA ia = item_act(ty, lane);
                const int sb0 = slab_pos * 32;  // chunk's first block within the slab
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const int8_t* qt = act_q + t * slab_blocks * 32;
                    const int4 x0 = *reinterpret_cast<const int4*>(qt + (sb0 + ia.b0) * 32 + 16 * ia.h0);
                    const int4 x1 = *reinterpret_cast<const int4*>(qt + (sb0 + ia.b1) * 32 + 16 * ia.h1);
                    const float2 ds0 = act_ds[t * slab_blocks + sb0 + ia.b0];
                    const float2 ds1 = act_ds[t * slab_blocks + sb0 + ia.b1];
#pragma unroll
                    for (int s = 0; s < S; ++s) {
                        int i0 = __dp4a(w[s].w[0], x0.x, 0);
                        i0 = __dp4a(w[s].w[1], x0.y, i0);
                        i0 = __dp4a(w[s].w[2], x0.z, i0);
                        i0 = __dp4a(w[s].w[3], x0.w, i0);
                        int i1 = __dp4a(w[s].w[4], x1.x, 0);
                        i1 = __dp4a(w[s].w[5], x1.y, i1);
                        i1 = __dp4a(w[s].w[6], x1.z, i1);
                        i1 = __dp4a(w[s].w[7], x1.w, i1);
                        float v = acc[s][t];
                        v = fmaf(w[s].f0 * ds0.x, static_cast<float>(i0), v);
                        v = fmaf(w[s].f1 * ds1.x, static_cast<float>(i1), v);
                        v = fmaf(w[s].g0, ds0.y, v);
                        v = fmaf(w[s].g1, ds1.y, v);
                        acc[s][t] = v;
                    }
                }
            }
            __syncwarp();  // the slot is refilled by the next iteration's issue

            if (++slab_pos == a.slab_chunks) {
                slab_pos = 0;
                ++slab;
            }
            if (++c == nchunks) {
                write_outputs<NT, RW, SW, S>(a, acc, (g_first + g) * rows_per_group + warp * RW, pair, bad, lane);
#pragma unroll
                for (int s = 0; s < S; ++s)
#pragma unroll
                    for (int t = 0; t < NT; ++t) acc[s][t] = 0.0f;
                c = slab = slab_pos = 0;
                if (++g < n_groups) {
                    const uint8_t* rp[S];
                    group_rows(g, rp);
#pragma unroll
                    for (int s = 0; s < S; ++s) row_off[s] = static_cast<int>(reinterpret_cast<uintptr_t>(rp[s]) & 15);
                }
            }
        }
        cp_async_wait<0>();
    };
    // gate and up share the type (checked on the host). Q4_K / Q5_K rows (144- / 176-byte blocks)
    // are 16-byte aligned wherever the matrix base is, as in a GGUF: then every staged chunk is too.
    const bool rows16 =
        ((reinterpret_cast<uintptr_t>(base[0]) | reinterpret_cast<uintptr_t>(base[1]) | rbytes[0] | rbytes[1]) & 15) == 0;
    using Unaligned = std::false_type;
    switch (type[0]) {
        case GGML_TYPE_Q8_0: run(std::integral_constant<uint32_t, GGML_TYPE_Q8_0>{}, Unaligned{}); break;
        case GGML_TYPE_Q4_0: run(std::integral_constant<uint32_t, GGML_TYPE_Q4_0>{}, Unaligned{}); break;
        case GGML_TYPE_Q5_0: run(std::integral_constant<uint32_t, GGML_TYPE_Q5_0>{}, Unaligned{}); break;
        case GGML_TYPE_Q4_K:
            if (rows16) run(std::integral_constant<uint32_t, GGML_TYPE_Q4_K>{}, std::true_type{});
            else run(std::integral_constant<uint32_t, GGML_TYPE_Q4_K>{}, Unaligned{});
            break;
        case GGML_TYPE_Q5_K:
            if (rows16) run(std::integral_constant<uint32_t, GGML_TYPE_Q5_K>{}, std::true_type{});
            else run(std::integral_constant<uint32_t, GGML_TYPE_Q5_K>{}, Unaligned{});
            break;
        case GGML_TYPE_Q6_K: run(std::integral_constant<uint32_t, GGML_TYPE_Q6_K>{}, Unaligned{}); break;
        // Only a pair with an invalid expert id gets here (nothing is read; its outputs are NaN).
        default: run(std::integral_constant<uint32_t, GGML_TYPE_Q8_0>{}, Unaligned{}); break;
    }
}

// ---- float weights ------------------------------------------------------------------------------

// 8 consecutive weights of a row as floats; idx is the element index (multiple of 8), the row
// 16-byte aligned.
__device__ __forceinline__ void load8(uint32_t type, const uint8_t* row, int64_t idx, float (&w)[8]) {
    if (type == GGML_TYPE_F32) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(row) + idx / 4);
        const float4 b = __ldg(reinterpret_cast<const float4*>(row) + idx / 4 + 1);
        w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
        return;
    }
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + idx / 8);
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if (type == GGML_TYPE_F16) {
            w[2 * k] = f16_bits(u[k]);
            w[2 * k + 1] = f16_bits(u[k] >> 16);
        } else {  // BF16: the top half of an f32
            w[2 * k] = __uint_as_float(u[k] << 16);
            w[2 * k + 1] = __uint_as_float(u[k] & 0xFFFF0000u);
        }
    }
}

// SPLIT: the CTA's warps share the same RW rows and split their columns (matrices with too few
// rows to give every SM a CTA otherwise, such as the MoE router's 128).
template <int NT, int RW, bool SW, bool SPLIT>
__global__ void __launch_bounds__(kThreads) mmvf_kernel(const Args a) {
    pdl_enter();
    constexpr int S = RW * (SW ? 2 : 1);
    constexpr int kColWarps = SPLIT ? kWarps : 1;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t pair = blockIdx.y;
    const int e = a.ids ? a.ids[pair] : 0;
    const uint8_t* base[2];
    uint32_t type[2], rbytes[2];
    bool ok = pick_matrix(a.m[0], e, a.n_routed, base[0], type[0], rbytes[0]);
    if (SW) ok = pick_matrix(a.m[1], e, a.n_routed, base[1], type[1], rbytes[1]) && ok;
    else base[1] = base[0], type[1] = type[0], rbytes[1] = rbytes[0];
    if (skip_pair(a, ok, type[0], true)) return;
    const bool bad = !ok;
    const float* x = static_cast<const float*>(a.x) +
                     (a.ids ? (a.x_per_slot ? pair : pair / a.n_slots) * a.x_stride : 0);

    const int rows_per_group = (kWarps / kColWarps) * RW;
    const int64_t n_groups_total = (a.rows + rows_per_group - 1) / rows_per_group;
    const int64_t g_first = static_cast<int64_t>(blockIdx.x) * a.groups;
    const int n_groups = static_cast<int>(std::min<int64_t>(a.groups, n_groups_total - g_first));
    const int col_part = SPLIT ? warp : 0;  // this warp's share of the columns

#pragma unroll 1
    for (int g = 0; g < n_groups; ++g) {
        const int64_t row0 = (g_first + g) * rows_per_group + (SPLIT ? 0 : warp * RW);
        const uint8_t* rp[S];
        uint32_t ts[S];
        bool vec = a.cols % 8 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 && (a.x_stride % 4) == 0;
#pragma unroll
        for (int s = 0; s < S; ++s) {
            const int m = (SW && s >= RW) ? 1 : 0;
            const int64_t row = std::min<int64_t>(row0 + s % RW, a.rows - 1);
            rp[s] = bad ? nullptr : base[m] + row * rbytes[m];
            ts[s] = type[m];
            vec = vec && (reinterpret_cast<uintptr_t>(rp[s]) & 15) == 0;
        }
        float acc[S][NT];
#pragma unroll
        for (int s = 0; s < S; ++s)
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[s][t] = 0.0f;
        if (!bad && vec) {
            // Unrolled so that several rows' loads are in flight: a CTA's few rows (the MoE router
            // has 128) would otherwise wait out DRAM latency once per 256 columns.
#pragma unroll 4
            for (int64_t c = 8 * lane + 256 * col_part; c < a.cols; c += 256 * kColWarps) {
                float w[S][8];
#pragma unroll
                for (int s = 0; s < S; ++s) load8(ts[s], rp[s], c, w[s]);
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const float4 x0 = __ldg(reinterpret_cast<const float4*>(x + t * a.x_stride + c));
                    const float4 x1 = __ldg(reinterpret_cast<const float4*>(x + t * a.x_stride + c) + 1);
#pragma unroll
                    for (int s = 0; s < S; ++s) {
                        float v = acc[s][t];
                        v = fmaf(w[s][0], x0.x, v);
                        v = fmaf(w[s][1], x0.y, v);
                        v = fmaf(w[s][2], x0.z, v);
                        v = fmaf(w[s][3], x0.w, v);
                        v = fmaf(w[s][4], x1.x, v);
                        v = fmaf(w[s][5], x1.y, v);
                        v = fmaf(w[s][6], x1.z, v);
                        v = fmaf(w[s][7], x1.w, v);
                        acc[s][t] = v;
                    }
                }
            }
        } else if (!bad) {  // unaligned rows or odd widths: one element per lane and step
            for (int64_t c = lane + 32 * col_part; c < a.cols; c += 32 * kColWarps) {
                float w[S];
#pragma unroll
                for (int s = 0; s < S; ++s) w[s] = float_weight(ts[s], rp[s], c);
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const float xv = x[t * a.x_stride + c];
#pragma unroll
                    for (int s = 0; s < S; ++s) acc[s][t] = fmaf(w[s], xv, acc[s][t]);
                }
            }
        }
        if constexpr (SPLIT) {
            // Warp totals through shared memory; warp 0 writes (its lane 0 holds the CTA total).
            __shared__ float part[kWarps][S][NT];
#pragma unroll
            for (int s = 0; s < S; ++s)
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const float v = warp_sum(acc[s][t]);
                    if (lane == 0) part[warp][s][t] = v;
                }
            __syncthreads();
            if (warp == 0) {
#pragma unroll
                for (int s = 0; s < S; ++s)
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        float v = 0.0f;
                        for (int w = 0; w < kWarps; ++w) v += part[w][s][t];
                        acc[s][t] = lane == 0 ? v : 0.0f;
                    }
                write_outputs<NT, RW, SW, S>(a, acc, row0, pair, bad, lane);
            }
            __syncthreads();  // part is reused by the next row group
        } else {
            write_outputs<NT, RW, SW, S>(a, acc, row0, pair, bad, lane);
        }
    }
}

// ---- host side ----------------------------------------------------------------------------------

bool is_float_type(uint32_t t) { return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16; }
bool is_quant_type(uint32_t t) { return type_geom(t).block_bytes != 0; }

int sm_count() {
    static const int n = [] {
        int dev = 0, v = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            cudaGetLastError();
            return 132;
        }
        return v;
    }();
    return n;
}

void check_weight(const WeightView& w, int64_t rows, int64_t cols, const char* what) {
    const std::string name(what);
    if (!w.data) throw std::invalid_argument(name + ": no weight data");
    if (!is_float_type(w.type) && !is_quant_type(w.type))
        throw std::invalid_argument(name + ": unsupported weight type " + type_name(w.type));
    if (w.rows != rows || w.cols != cols)
        throw std::invalid_argument(name + ": weight shape [" + std::to_string(w.rows) + " x " + std::to_string(w.cols) +
                                    "] does not match [" + std::to_string(rows) + " x " + std::to_string(cols) + "]");
    if (cols <= 0 || rows <= 0) throw std::invalid_argument(name + ": empty weight");
    const int64_t bs = is_float_type(w.type) ? 1 : type_geom(w.type).block_elems;
    if (cols % bs != 0)
        throw std::invalid_argument(name + ": cols " + std::to_string(cols) + " is not a multiple of the " +
                                    type_name(w.type) + " block size " + std::to_string(bs));
    const size_t expect = is_float_type(w.type) ? static_cast<size_t>(cols) * (w.type == GGML_TYPE_F32 ? 4 : 2)
                                                : static_cast<size_t>(cols / bs) * type_geom(w.type).block_bytes;
    if (w.row_bytes != expect)
        throw std::invalid_argument(name + ": row_bytes " + std::to_string(w.row_bytes) + " should be " +
                                    std::to_string(expect));
    if (!is_float_type(w.type) && (reinterpret_cast<uintptr_t>(w.data) & 1))
        throw std::invalid_argument(name + ": quantized weights must be 2-byte aligned");
    if (is_float_type(w.type) && (reinterpret_cast<uintptr_t>(w.data) % (w.type == GGML_TYPE_F32 ? 4 : 2)))
        throw std::invalid_argument(name + ": float weights must be aligned to their element size");
}

void check_tokens(int n_tok, const char* what) {
    if (n_tok < 1 || n_tok > kMaxMmvTokens)
        throw std::invalid_argument(std::string(what) + ": n_tok " + std::to_string(n_tok) + " is not in 1.." +
                                    std::to_string(kMaxMmvTokens));
}

MatSet mat_set(const ExpertSet& es) {
    MatSet m;
    m.routed = static_cast<const uint8_t*>(es.routed.data);
    m.rtype = es.routed.type;
    m.r_row_bytes = static_cast<uint32_t>(es.routed.row_bytes);
    m.matrix_bytes = es.routed.matrix_bytes;
    if (es.shared) {
        m.shared = static_cast<const uint8_t*>(es.shared.data);
        m.stype = es.shared.type;
        m.s_row_bytes = static_cast<uint32_t>(es.shared.row_bytes);
    }
    return m;
}

// Rows per warp: more rows share each activation load when there are more tokens.
// (Float weights: f32 activations are 4x the bytes, so fewer rows keep the registers in bounds.)
constexpr int rows_per_warp(int nt, bool sw, bool quant) {
    return quant ? (sw ? (nt <= 3 ? 1 : 2) : (nt <= 3 ? 2 : 4)) : (sw ? 1 : 2);
}

// The grid for CTAs of rows_per_group rows; sets a.groups. Enough CTAs to fill the GPU several
// times over; beyond that, loop over row groups in a CTA (amortises the activation staging and
// the CTA start-up).
dim3 plan_grid(Args& a, int64_t rows_per_group, int grid_y, const char* what) {
    const int64_t n_groups = (a.rows + rows_per_group - 1) / rows_per_group;
    const int64_t target = static_cast<int64_t>(sm_count()) * 16;
    const int64_t total = n_groups * grid_y;
    a.groups = static_cast<int>(std::clamp<int64_t>(total / target, 1, 16));
    const int64_t grid_x = (n_groups + a.groups - 1) / a.groups;
    if (grid_y > 65535) throw std::invalid_argument(std::string(what) + ": too many (token, slot) pairs");
    return dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
}

template <int NT, int RW, bool SW>
void launch_q(Args& a, int grid_y, cudaStream_t st, const char* what) {
    const dim3 grid = plan_grid(a, kWarps * RW, grid_y, what);
    using C = QCfg<NT, RW, SW>;
    const int64_t nchunks = (a.cols + kChunkCols - 1) / kChunkCols;
    a.slab_chunks = static_cast<int>(std::clamp<int64_t>(kActBudget / (NT * kChunkCols * 5 / 4), 1, nchunks));
    const size_t smem = C::kWeightBytes + static_cast<size_t>(NT) * a.slab_chunks * kChunkCols * 5 / 4;
    static const bool attr_ok = [] {
        const int max_smem = C::kWeightBytes + kActBudget + NT * kChunkCols * 5 / 4;
        return cudaFuncSetAttribute(mmvq_kernel<NT, RW, SW>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    max_smem) == cudaSuccess;
    }();
    if (!attr_ok) throw std::runtime_error(std::string(what) + ": cannot set the shared memory size");
    launch_kernel(mmvq_kernel<NT, RW, SW>, grid, dim3(kThreads), smem, st, a);
    check_launch(what);
}

template <int NT, bool SW, bool Q>
void launch_nt(Args& a, int grid_y, cudaStream_t st, const char* what) {
    constexpr int RW = rows_per_warp(NT, SW, Q);
    if constexpr (Q) {
        // Experts (one token per CTA) measured faster with the many-token row counts (H100, tg128
        // on the Air-shaped file: 628 vs 626 t/s); a dense single token keeps its own.
        if (NT == 1 && a.ids) return launch_q<1, rows_per_warp(4, SW, true), SW>(a, grid_y, st, what);
        launch_q<NT, RW, SW>(a, grid_y, st, what);
    } else {
        // Too few row groups per matrix to give every SM a CTA: split each row's columns over the
        // warps. Decided by the matrix alone, not the token count, so that a token's outputs do not
        // depend on the batch (the sums run in another order when split).
        const bool split = (a.rows + kWarps * RW - 1) / (kWarps * RW) < sm_count();
        const dim3 grid = plan_grid(a, split ? RW : kWarps * RW, grid_y, what);
        if (split) launch_kernel(mmvf_kernel<NT, RW, SW, true>, grid, dim3(kThreads), 0, st, a);
        else launch_kernel(mmvf_kernel<NT, RW, SW, false>, grid, dim3(kThreads), 0, st, a);
        check_launch(what);
    }
}

template <int NT, bool SW>
void launch_nt(Args& a, bool quant, int grid_y, cudaStream_t st, const char* what) {
    if (quant) launch_nt<NT, SW, true>(a, grid_y, st, what);
    else launch_nt<NT, SW, false>(a, grid_y, st, what);
}

template <bool SW>
void launch(Args& a, int nt, bool quant, int grid_y, cudaStream_t st, const char* what) {
    switch (nt) {
        case 1: return launch_nt<1, SW>(a, quant, grid_y, st, what);
        case 2: return launch_nt<2, SW>(a, quant, grid_y, st, what);
        case 3: return launch_nt<3, SW>(a, quant, grid_y, st, what);
        case 4: return launch_nt<4, SW>(a, quant, grid_y, st, what);
        case 5: return launch_nt<5, SW>(a, quant, grid_y, st, what);
        case 6: return launch_nt<6, SW>(a, quant, grid_y, st, what);
        case 7: return launch_nt<7, SW>(a, quant, grid_y, st, what);
        case 8: return launch_nt<8, SW>(a, quant, grid_y, st, what);
    }
}

// Launches the kernel of each weight family present in `es` (quantized: x_q8, float: x_f32).
template <bool SW>
void launch_families(Args& a, const ExpertSet& es, bool use_shared, const float* x_f32, const BlockQ8* x_q8, int nt,
                     int grid_y, cudaStream_t st, const char* what) {
    const bool has_q = !is_float_type(es.routed.type) || (use_shared && es.shared && !is_float_type(es.shared.type));
    const bool has_f = is_float_type(es.routed.type) || (use_shared && es.shared && is_float_type(es.shared.type));
    if ((has_q && !x_q8) || (has_f && !x_f32))
        throw std::invalid_argument(std::string(what) + ": missing " + (has_q && !x_q8 ? "x_q8" : "x_f32") +
                                    " for the " + (has_q && !x_q8 ? "quantized" : "float") + " weights");
    a.mixed = has_q && has_f;
    const int64_t cols = a.cols;
    if (has_q) {
        a.x = x_q8;
        a.x_stride = cols / 32;
        launch<SW>(a, nt, true, grid_y, st, what);
    }
    if (has_f) {
        a.x = x_f32;
        a.x_stride = cols;
        launch<SW>(a, nt, false, grid_y, st, what);
    }
}

void check_experts(const ExpertSet& es, int64_t rows, int64_t cols, const char* what) {
    if (es.n_routed < 1) throw std::invalid_argument(std::string(what) + ": n_routed must be >= 1");
    check_weight(es.routed, rows, cols, what);
    if (es.n_routed > 1 && es.routed.matrix_bytes < es.routed.row_bytes * static_cast<size_t>(rows))
        throw std::invalid_argument(std::string(what) + ": matrix_bytes smaller than one matrix");
    if (es.shared) check_weight(es.shared, rows, cols, what);
}

}  // namespace

bool mmv_wants_q8(uint32_t type) { return !is_float_type(type); }

void mmv(const WeightView& w, const float* x_f32, const BlockQ8* x_q8, int n_tok, float* y, int64_t y_stride,
         bool accumulate, cudaStream_t s) {
    check_tokens(n_tok, "mmv");
    check_weight(w, w.rows, w.cols, "mmv");
    const bool quant = mmv_wants_q8(w.type);
    if (quant ? !x_q8 : !x_f32) throw std::invalid_argument(std::string("mmv: missing ") + (quant ? "x_q8" : "x_f32"));
    if (!y || (n_tok > 1 && y_stride < w.rows)) throw std::invalid_argument("mmv: bad output (y_stride < rows)");
    Args a;
    a.m[0].routed = static_cast<const uint8_t*>(w.data);
    a.m[0].rtype = w.type;
    a.m[0].r_row_bytes = static_cast<uint32_t>(w.row_bytes);
    a.n_routed = 1;
    a.x = quant ? static_cast<const void*>(x_q8) : static_cast<const void*>(x_f32);
    a.x_stride = quant ? w.cols / 32 : w.cols;
    a.y = y;
    a.y_stride = y_stride;
    a.accumulate = accumulate;
    a.rows = w.rows;
    a.cols = w.cols;
    launch<false>(a, n_tok, quant, 1, s, "mmv");
}

void mmv_experts(const ExpertSet& w, const float* x_f32, const BlockQ8* x_q8, bool x_per_slot, const int32_t* ids,
                 int n_tok, int n_slots, float* y, cudaStream_t s) {
    check_tokens(n_tok, "mmv_experts");
    if (n_slots < 1 || !ids || !y) throw std::invalid_argument("mmv_experts: need ids, y and n_slots >= 1");
    const int64_t rows = w.routed.rows, cols = w.routed.cols;
    check_experts(w, rows, cols, "mmv_experts");
    Args a;
    a.m[0] = mat_set(w);
    a.n_routed = w.n_routed;
    a.ids = ids;
    a.n_slots = n_slots;
    a.x_per_slot = x_per_slot;
    a.y = y;
    a.y_stride = rows;
    a.rows = rows;
    a.cols = cols;
    // One (token, slot) pair per grid row: each is a one-token product with its own expert.
    launch_families<false>(a, w, true, x_f32, x_q8, 1, n_tok * n_slots, s, "mmv_experts");
}

void mmv_swiglu(const ExpertSet& gate, const ExpertSet& up, const float* x_f32, const BlockQ8* x_q8,
                const int32_t* ids, int n_tok, int n_slots, float* out, cudaStream_t s) {
    check_tokens(n_tok, "mmv_swiglu");
    if (!out || n_slots < 1) throw std::invalid_argument("mmv_swiglu: need out and n_slots >= 1");
    if (!ids && n_slots != 1) throw std::invalid_argument("mmv_swiglu: dense use (ids == nullptr) needs n_slots == 1");
    const int64_t rows = gate.routed.rows, cols = gate.routed.cols;
    check_experts(gate, rows, cols, "mmv_swiglu (gate)");
    check_experts(up, rows, cols, "mmv_swiglu (up)");
    if (ids && (gate.n_routed != up.n_routed || static_cast<bool>(gate.shared) != static_cast<bool>(up.shared)))
        throw std::invalid_argument("mmv_swiglu: gate and up expert sets differ in count or shared expert");
    if (gate.routed.type != up.routed.type || (ids && gate.shared && gate.shared.type != up.shared.type))
        throw std::invalid_argument("mmv_swiglu: gate and up must have the same type");
    Args a;
    a.m[0] = mat_set(gate);
    a.m[1] = mat_set(up);
    a.n_routed = ids ? gate.n_routed : 1;
    a.ids = ids;
    a.n_slots = n_slots;
    a.y = out;
    a.y_stride = rows;
    a.rows = rows;
    a.cols = cols;
    if (ids) launch_families<true>(a, gate, true, x_f32, x_q8, 1, n_tok * n_slots, s, "mmv_swiglu");
    else launch_families<true>(a, gate, false, x_f32, x_q8, n_tok, 1, s, "mmv_swiglu");
}

}  // namespace glmoe::cuda
