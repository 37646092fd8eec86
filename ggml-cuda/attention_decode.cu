// Flash-decoding attention over the f16 KV cache: few query tokens, each with its own cell list.
//
// A block takes one query token, one kv head (and up to 16 of its q heads) and one split of that
// token's visible cells. Its q heads are the 16 rows of an m16n8k16 tensor-core tile, so every K/V
// element is read from memory once for all q heads of the kv head (GLM: 12; rows 12..15 are zeros,
// wasted only in the tensor cores, which have ample slack: the kernel is bound by the KV stream).
// Precision as in every flash-attention kernel (and attention_prefill): q * scale and p are rounded
// to f16, products with the exact f16 K/V accumulate in f32, so outputs agree with f32 math to
// ~1e-3 relative. (Splitting q and p into hi + lo f16 terms would reach ~1e-6 but doubles the
// tensor-core work, which then costs as much as the memory stream on an H100.)
//
// The cells of a split go through a cp.async pipeline in tiles of 64 (one 16-cell slice per warp);
// Quantized K or V (kv_tile.cuh) goes through the same pipeline as raw row slices; each warp then
// dequantizes its 16 cells into f16 rows of its own (no block barrier) before the same mma code.
// each thread fetches the cell indices of a tile one iteration before it issues the tile's copies,
// so the index load (a dependent global read) stays off the critical path. Each warp keeps its own
// online-softmax state (max, sum, output in base-2 exponent units); the four are merged in shared
// memory at the end. With one split the block writes the normalised output; otherwise it writes an
// unnormalised partial (output, max, sum) to the scratch, and a second kernel merges the splits of
// each (token, head) exactly through their maxima and sums.
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>

#include "cuda_common.cuh"
#include "kernels.h"
#include "kv_tile.cuh"
#include "mma_primitives.cuh"

namespace glmoe::cuda {

namespace {

constexpr float kLog2e = 1.44269504088896341f;
// p in [0, 1] is computed as p * 2^12 (folded into the exponent, so free): weights down to 2^-26
// stay normal f16 instead of 2^-14, and p * 2^12 <= 4096 fits. Sums carry the same factor, so it
// cancels in every ratio (block output, partial merge) and is never divided out.
constexpr float kPShift = 12.0f;

// ---- configuration -------------------------------------------------------------------------------
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kRows = 16;           // q heads per block: one m16 tile
constexpr int kTile = 16 * kWarps;  // cells per pipeline stage
// Shortest split: 2 tiles. The block target below sets the split length at long contexts (16k
// cells: 4 tiles, 64k: 16); short contexts still spread one token over ~32 blocks instead of
// leaving 124 of 132 SMs idle (one split per kv head).
constexpr int kMinSplitCells = 2 * kTile;
// Blocks to aim for: two waves of 2 blocks (D <= 128; the kernel's occupancy) on 132 SMs (H100
// SXM). Fewer, longer splits than that leave SMs idle; more only add fill/drain and merge work.
constexpr int kTargetBlocks = 2 * 132 * 2;
constexpr int kMaxSplits = 256;

template <int D>
struct Cfg {
    static constexpr int kStages = D <= 128 ? 3 : 2;
    static constexpr int kMinBlocks = D <= 128 ? 2 : 1;  // per SM (shared memory bound)
    static constexpr int kStride = D + 8;  // halves per shared row: +16 bytes makes ldmatrix conflict-free
    static constexpr bool kQInRegs = D <= 128;  // D = 256 reloads q fragments: registers are short
    static constexpr int kChunks = D / 8;       // 16-byte pieces per K/V row
    static constexpr int kRowStep = kThreads / kChunks;    // rows one pass of the block covers
    static constexpr int kLoads = kTile / kRowStep;         // K (and V) pieces per thread and tile
    static constexpr size_t kQBytes = kRows * kStride * sizeof(half);
    static constexpr size_t kStageBytes = 2 * kTile * kStride * sizeof(half);            // K, V
    static constexpr size_t kMergeBytes = kWarps * kRows * (D + 2) * sizeof(float);      // per-warp states
    static constexpr size_t kSmem = kQBytes + std::max(kStages * kStageBytes, kMergeBytes);
    static constexpr size_t kWorkBytes = kTile * kStride * sizeof(half);  // one side's dequantized tile
    static_assert(kThreads % kChunks == 0 && kTile % kRowStep == 0, "load mapping");
};

// Launches of at most this many tokens split each token's cells by its own length alone, never
// by the batch: a token's output is then bitwise the same in a one-token decode step and among
// the verified drafts of its sequence (greedy output identical with and without drafting).
constexpr int kInvariantTokens = 8;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Splits to aim for per token, for `units` (token, kv head, head group) blocks: enough blocks to
// fill the GPU. A pure function of its arguments (graph replays).
int split_target(int units) { return std::min(ceil_div(kTargetBlocks, std::max(units, 1)), kMaxSplits); }

// A token with n_visible cells: splits of whole tiles (only a split's last tile is partial),
// none shorter than kMinSplitCells, at most `target` of them. Cells per split, from which
// split i covers [i * chunk, min((i + 1) * chunk, n_visible)).
__host__ __device__ inline int split_chunk(int n_visible, int target) {
    const int nv = n_visible > 1 ? n_visible : 1;
    const int by_len = ceil_div(nv, kMinSplitCells);
    const int n = by_len < target ? by_len : target;
    return ceil_div(ceil_div(nv, n > 1 ? n : 1), kTile) * kTile;
}

struct DecodeParams {
    AttentionArgs a;
    int64_t q_stride;    // floats between query rows (a.q_stride resolved)
    int group;           // q heads per kv head
    int n_hgroups;       // ceil(group / 16)
    int n_split;         // grid splits: the most any token of the launch uses
    int target;          // split_target of the launch (split_chunk per token)
    float* part_o;       // [n_tok][n_head][n_split][D], unnormalised
    float* part_ml;      // [n_tok][n_head][n_split][2]: max (base 2), sum
};

// Shared memory of the quantized path: staged raw/f16 rows of both sides per stage, then a
// dequantized tile per quantized side (the merge reuses it all).
template <int D>
size_t quant_smem(uint32_t type_k, uint32_t type_v) {
    using C = Cfg<D>;
    const size_t work = C::kWorkBytes * kv_quantized_sides(type_k, type_v);
    return C::kQBytes + std::max(C::kStages * kv_stage_bytes(type_k, type_v, kTile, C::kStride, D) + work,
                                 C::kMergeBytes);
}

// grid: (n_split, n_head_kv * n_hgroups, n_tok). kF16: both sides f16 (read by the mma straight
// from the stage); otherwise the types come from p.a at run time.
template <int D, bool kF16>
__global__ void __launch_bounds__(kThreads, Cfg<D>::kMinBlocks) attention_decode_kernel(const DecodeParams p) {
    pdl_enter();
    using C = Cfg<D>;
    constexpr int S = C::kStride;
    extern __shared__ __align__(16) unsigned char smem[];
    half* qs = reinterpret_cast<half*>(smem);
    half* kv = qs + kRows * S;  // stage i: K at kv + i * 2 * kTile * S, V after it

    const AttentionArgs& a = p.a;
    const int split = blockIdx.x, t = blockIdx.z;
    const int kvh = blockIdx.y / p.n_hgroups, hg = blockIdx.y % p.n_hgroups;
    const int g0 = hg * kRows, n_rows = min(kRows, p.group - g0);  // this block's q heads: g0 + r, r < n_rows
    const int h0 = kvh * p.group + g0;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    const int n_visible = a.n_visible[t];
    const int chunk = split_chunk(n_visible, p.target);
    const int begin = split * chunk;
    const int end = min(n_visible, begin + chunk);
    const bool direct = p.n_split == 1;

    if (begin >= end) {  // past this token's cells: a neutral partial (weight 0 in the merge)
        for (int i = tid; i < n_rows * D; i += kThreads) {
            const int r = i / D, d = i % D;
            if (direct) {  // only with n_visible < 1, which the contract excludes: output 0 as on the CPU
                a.out[static_cast<int64_t>(t) * a.n_head * D + static_cast<int64_t>(h0 + r) * D + d] = 0.0f;
                continue;
            }
            const size_t row = (static_cast<size_t>(t) * a.n_head + h0 + r) * p.n_split + split;
            p.part_o[row * D + d] = 0.0f;
            if (d == 0) {
                p.part_ml[row * 2] = -INFINITY;
                p.part_ml[row * 2 + 1] = 0.0f;
            }
        }
        return;
    }

    const int64_t kv_width = static_cast<int64_t>(a.n_head_kv) * D;
    const int32_t* cells = a.cells + a.cell_start[t];
    const int n_tiles = (end - begin + kTile - 1) / kTile;

    // This thread's share of a tile: 16-byte column piece lc of rows lr + k * kRowStep (consecutive
    // threads cover a row's contiguous bytes: coalesced).
    const int lc = tid % C::kChunks, lr = tid / C::kChunks;
    const half* k_base = static_cast<const half*>(a.k_cache) + static_cast<int64_t>(kvh) * D + lc * 8;
    const half* v_base = static_cast<const half*>(a.v_cache) + static_cast<int64_t>(kvh) * D + lc * 8;
    const KVSide side_k = kv_side(a.k_cache, a.type_k, a.n_head_kv, kvh, D);
    const KVSide side_v = kv_side(a.v_cache, a.type_v, a.n_head_kv, kvh, D);
    const int k_row = kv_stage_row_bytes(side_k, S), v_row = kv_stage_row_bytes(side_v, S);
    const int stage_bytes = kTile * (k_row + v_row);
    uint8_t* const stage0 = reinterpret_cast<uint8_t*>(kv);
    half* const work_k = reinterpret_cast<half*>(stage0 + C::kStages * stage_bytes);
    half* const work_v = work_k + (side_k.quant ? kTile * S : 0);
    // Cell indices of tile i for this thread's rows; -1 past `end` (nothing read).
    auto fetch_cells = [&](int i, int (&idx)[C::kLoads]) {
#pragma unroll
        for (int k = 0; k < C::kLoads; ++k) {
            const int cell_idx = begin + i * kTile + lr + k * C::kRowStep;
            idx[k] = cell_idx < end ? __ldg(cells + cell_idx) : -1;
        }
    };
    // Copies tile i (cells past `end` are zero-filled: V rows must not hold NaN garbage, since a
    // masked p = 0 times NaN would still poison the output).
    auto load_tile = [&](int i, const int (&idx)[C::kLoads]) {
        if constexpr (kF16) {
            half* ks = kv + (i % C::kStages) * 2 * kTile * S + lr * S + lc * 8;
            half* vs = ks + kTile * S;
#pragma unroll
            for (int k = 0; k < C::kLoads; ++k) {
                const bool ok = idx[k] >= 0;
                const int64_t off = (ok ? idx[k] : 0) * kv_width;
                cp_async16(ks + k * C::kRowStep * S, k_base + off, ok);
                cp_async16(vs + k * C::kRowStep * S, v_base + off, ok);
            }
        } else {
            uint8_t* st = stage0 + (i % C::kStages) * stage_bytes;
#pragma unroll
            for (int k = 0; k < C::kLoads; ++k) {
                const int r = lr + k * C::kRowStep;
                kv_stage_piece(side_k, st + r * k_row, idx[k], lc, C::kChunks, idx[k] >= 0);
                kv_stage_piece(side_v, st + kTile * k_row + r * v_row, idx[k], lc, C::kChunks, idx[k] >= 0);
            }
        }
    };

    int idx[C::kLoads];
#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) {
        if (s < n_tiles) {
            fetch_cells(s, idx);
            load_tile(s, idx);
        }
        cp_async_commit();
    }
    fetch_cells(C::kStages - 1, idx);  // for the first loop iteration

    // q * scale * log2(e) as f16 rows; rows past n_rows stay zero. Row t of q starts at t * q_stride
    // (a multiple of 4 floats, checked on the host: the float4 loads stay 16-byte aligned).
    const float qscale = a.scale * kLog2e;
    const float* q_row = a.q + static_cast<int64_t>(t) * p.q_stride + static_cast<int64_t>(h0) * D;
    for (int i = tid; i < kRows * D / 4; i += kThreads) {
        const int r = i / (D / 4), d = (i % (D / 4)) * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < n_rows) x = *reinterpret_cast<const float4*>(q_row + r * D + d);
        *reinterpret_cast<uint2*>(qs + r * S + d) =
            make_uint2(pack_f16(x.x * qscale, x.y * qscale), pack_f16(x.z * qscale, x.w * qscale));
    }

    uint32_t qf[C::kQInRegs ? D / 16 : 1][4];
    if constexpr (C::kQInRegs) {
        __syncthreads();  // q rows written
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], qs + (lane & 15) * S + kk * 16 + (lane >> 4) * 8);
    }

    // Per-thread share of the warp's state (mma accumulator layout): rows g and g + 8, for each
    // 8-wide column tile the columns 2 * tq and 2 * tq + 1.
    const int g = lane >> 2, tq = lane & 3;
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    for (int i = 0; i < n_tiles; ++i) {
        cp_async_wait<C::kStages - 2>();
        __syncthreads();  // tile i visible to all; everyone is done with the buffer refilled below
        if (i + C::kStages - 1 < n_tiles) {
            load_tile(i + C::kStages - 1, idx);
            fetch_cells(i + C::kStages, idx);  // in flight while tile i is computed
        }
        cp_async_commit();

        const int c0 = begin + i * kTile + warp * 16;  // this warp's 16 cells
        if (c0 >= end) continue;                        // warp-uniform: nothing visible here
        const half* ks = kv + (i % C::kStages) * 2 * kTile * S + warp * 16 * S;
        const half* vs = ks + kTile * S;
        if constexpr (!kF16) {
            const uint8_t* st = stage0 + (i % C::kStages) * stage_bytes;
            ks = reinterpret_cast<const half*>(st) + warp * 16 * S;
            vs = reinterpret_cast<const half*>(st + kTile * k_row) + warp * 16 * S;
            if (side_k.quant) {
                kv_dequant_rows<D>(side_k.type, st, side_k.pitch, work_k, S, warp * 16, 16, lane, 32);
                ks = work_k + warp * 16 * S;
            }
            if (side_v.quant) {
                kv_dequant_rows<D>(side_v.type, st + kTile * k_row, side_v.pitch, work_v, S, warp * 16, 16, lane, 32);
                vs = work_v + warp * 16 * S;
            }
            __syncwarp();
        }

        // s = q . k for 16 heads x 16 cells; even and odd k-steps in separate accumulators, two
        // independent mma chains per 8-cell half (shorter dependency chains, same work).
        float s[2][4] = {}, s2[2][4] = {};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t af[4], b[4];
            if constexpr (C::kQInRegs) {
#pragma unroll
                for (int j = 0; j < 4; ++j) af[j] = qf[kk][j];
            } else {
                ldmatrix_x4(af, qs + (lane & 15) * S + kk * 16 + (lane >> 4) * 8);
            }
            ldmatrix_x4(b, ks + ((lane & 7) + ((lane >> 4) << 3)) * S + kk * 16 + ((lane >> 3) & 1) * 8);
            if (kk % 2 == 0) {
                mma16816(s[0], af, b[0], b[1]);
                mma16816(s[1], af, b[2], b[3]);
            } else {
                mma16816(s2[0], af, b[0], b[1]);
                mma16816(s2[1], af, b[2], b[3]);
            }
        }
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] += s2[n][e];
        if (c0 + 16 > end) {
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (c0 + n * 8 + 2 * tq + e >= end) s[n][e] = s[n][2 + e] = -INFINITY;
        }

        // Online softmax; the four threads of a row group share a row, hence the two shuffles.
        float x0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
        float x1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
        x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
        x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
        x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
        x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
        const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
        // Zero-q padding rows still see finite scores, so -inf only arises for a slice with no
        // visible cell, which `continue` above excludes; the guard keeps -inf - -inf out anyway.
        const float u0 = n0 == -INFINITY ? 0.0f : n0, u1 = n1 == -INFINITY ? 0.0f : n1;
        const float alpha0 = exp2f(m0 - u0), alpha1 = exp2f(m1 - u1);
        m0 = n0;
        m1 = n1;
        const float v0 = u0 - kPShift, v1 = u1 - kPShift;  // p * 2^12
        float pr[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            pr[n][0] = exp2f(s[n][0] - v0);
            pr[n][1] = exp2f(s[n][1] - v0);
            pr[n][2] = exp2f(s[n][2] - v1);
            pr[n][3] = exp2f(s[n][3] - v1);
        }
        l0 = l0 * alpha0 + (pr[0][0] + pr[0][1] + pr[1][0] + pr[1][1]);
        l1 = l1 * alpha1 + (pr[0][2] + pr[0][3] + pr[1][2] + pr[1][3]);
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= alpha0;
            o[n][1] *= alpha0;
            o[n][2] *= alpha1;
            o[n][3] *= alpha1;
        }

        // o += p v, p as the A operand straight from the accumulator layout, V via ldmatrix.trans.
        const uint32_t pa[4] = {pack_f16(pr[0][0], pr[0][1]), pack_f16(pr[0][2], pr[0][3]),
                                pack_f16(pr[1][0], pr[1][1]), pack_f16(pr[1][2], pr[1][3])};
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, vs + (lane & 15) * S + dn * 16 + (lane >> 4) * 8);
            mma16816(o[2 * dn], pa, b[0], b[1]);
            mma16816(o[2 * dn + 1], pa, b[2], b[3]);
        }
    }

    // Merge the warps: each writes (max, sum, output) of its 16 rows, then every thread combines
    // a few (row, column) entries over the warps in a fixed order.
    cp_async_wait<0>();
    __syncthreads();  // the pipeline buffers are reused below
    float* ms = reinterpret_cast<float*>(kv);  // [warp][row] max, then sum, then output [warp][row][D]
    float* ls = ms + kWarps * kRows;
    float* os = ls + kWarps * kRows;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    if (tq == 0) {
        ms[warp * kRows + g] = m0;
        ms[warp * kRows + g + 8] = m1;
        ls[warp * kRows + g] = l0;
        ls[warp * kRows + g + 8] = l1;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        float* r0 = os + (warp * kRows + g) * D + n * 8 + 2 * tq;
        *reinterpret_cast<float2*>(r0) = make_float2(o[n][0], o[n][1]);
        *reinterpret_cast<float2*>(r0 + 8 * D) = make_float2(o[n][2], o[n][3]);
    }
    __syncthreads();

    for (int i = tid; i < n_rows * D; i += kThreads) {
        const int r = i / D, d = i % D;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, ms[w * kRows + r]);
        // Warps that saw nothing have max -inf and sum 0: weight exp2(-inf) = 0.
        float sum = 0.0f, acc = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float wt = exp2f(ms[w * kRows + r] - mx);
            sum += ls[w * kRows + r] * wt;
            acc += os[(w * kRows + r) * D + d] * wt;
        }
        if (direct) {
            a.out[static_cast<int64_t>(t) * a.n_head * D + static_cast<int64_t>(h0 + r) * D + d] = acc / sum;
        } else {
            const size_t row = (static_cast<size_t>(t) * a.n_head + h0 + r) * p.n_split + split;
            p.part_o[row * D + d] = acc;
            if (d == 0) {
                p.part_ml[row * 2] = mx;
                p.part_ml[row * 2 + 1] = sum;
            }
        }
    }
}

// ---- merge of the splits -------------------------------------------------------------------------
constexpr int kMergeThreads = 128;
constexpr int kMergeWarps = kMergeThreads / 32;

template <int kVec>
struct Vec;
template <>
struct Vec<1> {
    using T = float;
    static __device__ __forceinline__ T zero() { return 0.0f; }
    static __device__ __forceinline__ void fma(float (&acc)[1], float w, T x) { acc[0] += w * x; }
};
template <>
struct Vec<2> {
    using T = float2;
    static __device__ __forceinline__ T zero() { return make_float2(0.0f, 0.0f); }
    static __device__ __forceinline__ void fma(float (&acc)[2], float w, T x) {
        acc[0] += w * x.x;
        acc[1] += w * x.y;
    }
};

// out[t][h] = sum_s o_s w_s / sum_s l_s w_s, w_s = exp2(m_s - M), M = max_s m_s.
// grid: (n_head, n_tok), kMergeThreads threads; n_split <= kMaxSplits. The max and the total
// weight are block reductions over the splits; then each thread sums its column(s) over the splits
// in split order (deterministic), loads coalesced across threads, a batch of loads in flight while
// the previous batch is summed. D = 64 uses two groups of 64 threads (even / odd splits), added in
// order at the end; D = 256 gives each thread two adjacent columns.
template <int D>
__global__ void __launch_bounds__(kMergeThreads)
    attention_merge_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml, float* __restrict__ out,
                           int n_head, int n_split) {
    pdl_enter();
    constexpr int kVec = D > kMergeThreads ? D / kMergeThreads : 1;  // columns per thread
    constexpr int kColThreads = D / kVec;
    constexpr int kGroups = kMergeThreads / kColThreads;  // threads per column, on interleaved splits
    constexpr int kBatch = 8;                             // loads in flight per thread
    constexpr int kPer = kMaxSplits / kMergeThreads;      // splits per thread in the reductions
    static_assert(kColThreads * kGroups == kMergeThreads && kGroups <= 2, "merge layout");
    using V = Vec<kVec>;
    using T = typename V::T;

    __shared__ float w[kMaxSplits];
    __shared__ float red_m[kMergeWarps], red_l[kMergeWarps];
    __shared__ float acc_hi[kGroups > 1 ? D : 1];

    const int h = blockIdx.x, t = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t row0 = (static_cast<size_t>(t) * n_head + h) * n_split;
    const float2* ml = reinterpret_cast<const float2*>(part_ml + row0 * 2);
    const int col = (tid % kColThreads) * kVec, grp = tid / kColThreads;
    const T* po = reinterpret_cast<const T*>(part_o + row0 * D + col);  // split s at po[s * D / kVec]

    auto load_batch = [&](int s0, T (&x)[kBatch]) {
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            const int s = s0 + u * kGroups;
            x[u] = s < n_split ? po[static_cast<size_t>(s) * (D / kVec)] : V::zero();
        }
    };
    T x[kBatch];
    load_batch(grp, x);  // independent of the weights: in flight during the reductions

    float m[kPer], l[kPer], mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
        const int s = tid + j * kMergeThreads;
        const float2 v = s < n_split ? ml[s] : make_float2(-INFINITY, 0.0f);
        m[j] = v.x;
        l[j] = v.y;
        mx = fmaxf(mx, v.x);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) red_m[warp] = mx;
    __syncthreads();
    mx = red_m[0];
#pragma unroll
    for (int i = 1; i < kMergeWarps; ++i) mx = fmaxf(mx, red_m[i]);

    // Neutral partials (empty splits: max -inf, sum 0) get weight 0; so would all with M = -inf.
    float lsum = 0.0f;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
        const int s = tid + j * kMergeThreads;
        const float wt = l[j] > 0.0f ? exp2f(m[j] - mx) : 0.0f;
        if (s < n_split) w[s] = wt;
        lsum += l[j] * wt;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) lsum += __shfl_xor_sync(0xffffffffu, lsum, off);
    if (lane == 0) red_l[warp] = lsum;
    __syncthreads();  // also publishes w
    lsum = red_l[0];
#pragma unroll
    for (int i = 1; i < kMergeWarps; ++i) lsum += red_l[i];

    float acc[kVec] = {};
    for (int s0 = grp; s0 < n_split; s0 += kBatch * kGroups) {
        T nx[kBatch];
        load_batch(s0 + kBatch * kGroups, nx);  // the next batch (guarded), in flight while this one sums
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            const int s = s0 + u * kGroups;
            if (s < n_split) V::fma(acc, w[s], x[u]);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) x[u] = nx[u];
    }
    if constexpr (kGroups > 1) {
        if (grp == 1) acc_hi[col] = acc[0];
        __syncthreads();
        if (grp == 1) return;
        acc[0] += acc_hi[col];
    }
    // Divided as the one-split (direct) path divides, so that a token whose cells fit one split
    // gets bitwise the same output whether or not its launch merges (batch invariance).
    float* dst = out + (static_cast<size_t>(t) * n_head + h) * D + col;
#pragma unroll
    for (int v = 0; v < kVec; ++v) dst[v] = acc[v] / lsum;
}

template <int D>
void launch_decode(const DecodeParams& p, cudaStream_t s) {
    const dim3 grid(p.n_split, p.a.n_head_kv * p.n_hgroups, p.a.n_tok);
    if (p.a.type_k == GGML_TYPE_F16 && p.a.type_v == GGML_TYPE_F16) {
        static std::atomic<uint64_t> done{0};
        allow_smem(attention_decode_kernel<D, true>, Cfg<D>::kSmem, done, "attention_decode");
        launch_kernel(attention_decode_kernel<D, true>, grid, dim3(kThreads), Cfg<D>::kSmem, s, p);
    } else {
        static std::atomic<uint64_t> done{0};
        const size_t most = kv_smem_max(quant_smem<D>, kv_type_supported);
        allow_smem(attention_decode_kernel<D, false>, most, done, "attention_decode");
        launch_kernel(attention_decode_kernel<D, false>, grid, dim3(kThreads), quant_smem<D>(p.a.type_k, p.a.type_v),
                      s, p);
    }
    check_launch("attention_decode");
    if (p.n_split > 1) {
        launch_kernel(attention_merge_kernel<D>, dim3(p.a.n_head, p.a.n_tok), dim3(kMergeThreads), 0, s, p.part_o, p.part_ml, p.a.out,
                                                                                     p.a.n_head, p.n_split);
        check_launch("attention_decode merge");
    }
}

// Token-independent split targets for launches of up to kInvariantTokens tokens, shared targets
// above (the GPU is full anyway, and the scratch stays bounded).
int launch_split_target(int n_tok, int units_per_token) {
    return split_target(n_tok <= kInvariantTokens ? units_per_token : n_tok * units_per_token);
}

}  // namespace

size_t attention_decode_scratch_bytes(int n_tok, int n_head, int n_head_kv, int head_dim, int max_visible) {
    const int64_t by_len = ceil_div(std::max(max_visible, 1), kMinSplitCells);
    if (by_len <= 1 || n_head_kv <= 0) return 0;  // one split at most: the kernel writes the output directly
    // A launch of n <= n_tok tokens and m <= max_visible uses n * n_split partial rows per head,
    // n_split = min(ceil(m / kMinSplitCells), launch_split_target(n)). For n <= kInvariantTokens
    // that is at most n * split_target(u) (u: units per token); above, n * ceil(T / (n u)) < T + n.
    // Both bounds, and by_len, never decrease with n_tok or max_visible, so a buffer sized for the
    // largest token group and context serves every smaller launch.
    const int64_t n = std::max(n_tok, 1);
    const int units = n_head_kv * ceil_div(n_head / n_head_kv, kRows);
    const int64_t small = std::min<int64_t>(n, kInvariantTokens) * split_target(units);
    const int64_t pairs = std::min(n * std::min<int64_t>(by_len, kMaxSplits), std::max(small, kTargetBlocks + n));
    return static_cast<size_t>(pairs) * n_head * (head_dim + 2) * sizeof(float);
}

void attention_decode(const AttentionArgs& a, float* scratch, cudaStream_t s) {
    if (a.n_tok <= 0) return;
    if (a.n_head <= 0 || a.n_head_kv <= 0 || a.n_head % a.n_head_kv != 0)
        throw std::invalid_argument("attention_decode: n_head must be a multiple of n_head_kv");
    const int64_t q_width = static_cast<int64_t>(a.n_head) * a.head_dim;
    // float4 loads of q: rows must stay 16-byte aligned (a.q itself is, as every allocation).
    if (a.q_stride != 0 && (a.q_stride < q_width || a.q_stride % 4 != 0))
        throw std::invalid_argument("attention_decode: q_stride must be >= n_head * head_dim and a multiple of 4");
    DecodeParams p;
    p.a = a;
    p.q_stride = a.q_stride ? a.q_stride : q_width;
    p.group = a.n_head / a.n_head_kv;
    p.n_hgroups = ceil_div(p.group, kRows);
    p.target = launch_split_target(a.n_tok, a.n_head_kv * p.n_hgroups);
    // A token uses at most min(ceil(n_visible / kMinSplitCells), target) splits, n_visible <= max_visible.
    p.n_split = std::max(1, std::min(ceil_div(std::max(a.max_visible, 1), kMinSplitCells), p.target));
    p.part_o = scratch;
    p.part_ml = scratch ? scratch + static_cast<size_t>(a.n_tok) * a.n_head * p.n_split * a.head_dim : nullptr;
    if (p.n_split > 1 && scratch == nullptr) throw std::invalid_argument("attention_decode: scratch missing");
    if (!kv_type_supported(a.type_k) || !kv_type_supported(a.type_v))
        throw std::invalid_argument("attention_decode: KV types must be F16, BF16, Q8_0 or Q4_0");
    switch (a.head_dim) {
        case 64: launch_decode<64>(p, s); break;
        case 128: launch_decode<128>(p, s); break;
        case 256: launch_decode<256>(p, s); break;
        default: throw std::invalid_argument("attention_decode: head_dim must be 64, 128 or 256");
    }
}

}  // namespace glmoe::cuda
