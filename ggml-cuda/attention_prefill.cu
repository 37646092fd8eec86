// Flash attention for a prompt chunk (many query tokens of one sequence) on tensor cores.
//
// FlashAttention-2 loop: a block holds 128 query rows, one m16 tile per warp, and streams K/V
// tiles of 64 cells, gathered through `cells`, with cp.async into a multi-stage shared-memory
// pipeline; S = Q K^T and O += P V are mma.sync m16n8k16 with f16 operands and f32 accumulators,
// and the online softmax runs in f32 on the accumulators (base-2 exponents: log2(e) is folded
// into the q scale). Rows are (token, q head) pairs of ONE kv head, flattened token-major, so a
// K/V tile in shared memory serves all q heads of its kv head (GQA) and a short chunk still fills
// the block (17 tokens x 12 heads = 204 rows, not 17 of 64 per head).
//
// Masking is per row: token t sees cells [0, n_visible[t]) of the shared list. A block stops at
// the largest n_visible of its rows, a warp skips tiles past the largest of its own rows, and only
// tiles that cross some row's n_visible pay for the element-wise mask.
//
// Quantized K or V (kv_tile.cuh) is staged as raw row slices through the same pipeline, then the
// block dequantizes the tile into f16 rows (one barrier more per tile) that the same mma code reads.
// Every block of a kv head does that again for every tile, so the model converts the visible rows
// to f16 once instead (kv_rows_to_f16, below) for a prompt chunk and runs the f16 kernel; a BF16
// cache is read only that way.
//
// Precision: q * scale and p are rounded to f16 (K and V are f16 already), so a score carries a
// relative error of ~2^-11 of |q||k| and each weight ~2^-11: outputs agree with f32 math to ~1e-3
// relative, as the decode kernel's do.
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

// ---- configuration -------------------------------------------------------------------------------
constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kBM = 16 * kWarps;  // query rows per block
constexpr int kBN = 64;           // cells per K/V tile

template <int D>
struct Cfg {
    static constexpr int kStages = D <= 128 ? 3 : 2;
    static constexpr int kStride = D + 8;    // halves per shared row: +16 bytes makes ldmatrix conflict-free
    static constexpr bool kQInRegs = D <= 128;  // D = 256 reloads q fragments: registers are short
    static constexpr size_t kQBytes = kBM * kStride * sizeof(half);
    static constexpr size_t kStageBytes = 2 * kBN * kStride * sizeof(half);  // K, V
    static constexpr size_t kSmem = kQBytes + kStages * kStageBytes + kBM * sizeof(int);
    static constexpr size_t kWorkBytes = kBN * kStride * sizeof(half);  // one side's dequantized tile
};

// Shared memory of the quantized path: q, the stages (raw or f16 rows of both sides), a
// dequantized tile per quantized side, then the rows' n_visible.
template <int D>
size_t quant_smem(uint32_t type_k, uint32_t type_v) {
    using C = Cfg<D>;
    return C::kQBytes + C::kStages * kv_stage_bytes(type_k, type_v, kBN, C::kStride, D) +
           C::kWorkBytes * kv_quantized_sides(type_k, type_v) + kBM * sizeof(int);
}

// grid: (ceil(n_tok * group / kBM), n_head_kv). kF16: both sides f16, read by the mma straight from
// the stage; otherwise the types come from `a` at run time.
template <int D, bool kF16>
__global__ void __launch_bounds__(kThreads, 1) attention_prefill_kernel(const AttentionArgs a) {
    pdl_enter();
    using C = Cfg<D>;
    constexpr int S = C::kStride;
    extern __shared__ __align__(16) unsigned char smem[];
    half* qs = reinterpret_cast<half*>(smem);
    half* kv = qs + kBM * S;  // stage i: K at kv + i * 2 * kBN * S, V after it
    const int group = a.n_head / a.n_head_kv;
    const int kvh = blockIdx.y;
    const KVSide side_k = kv_side(a.k_cache, a.type_k, a.n_head_kv, kvh, D);
    const KVSide side_v = kv_side(a.v_cache, a.type_v, a.n_head_kv, kvh, D);
    const int k_row = kv_stage_row_bytes(side_k, S), v_row = kv_stage_row_bytes(side_v, S);
    const int stage_bytes = kBN * (k_row + v_row);
    uint8_t* const stage0 = reinterpret_cast<uint8_t*>(kv);
    half* const work_k = reinterpret_cast<half*>(stage0 + C::kStages * stage_bytes);
    half* const work_v = work_k + (side_k.quant ? kBN * S : 0);
    int* const row_nv = kF16 ? reinterpret_cast<int*>(kv + C::kStages * 2 * kBN * S)
                             : reinterpret_cast<int*>(reinterpret_cast<uint8_t*>(work_k) +
                                                      C::kWorkBytes * kv_quantized_sides(a.type_k, a.type_v));
    __shared__ int block_nv;

    const int rb = gridDim.x - 1 - blockIdx.x;  // later tokens see more cells: start those first
    const int64_t n_rows = static_cast<int64_t>(a.n_tok) * group;
    const int64_t row0 = static_cast<int64_t>(rb) * kBM;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    if (tid == 0) block_nv = 0;
    __syncthreads();
    if (tid < kBM) {
        const int64_t r = row0 + tid;
        const int nv = r < n_rows ? a.n_visible[r / group] : 0;  // padding rows see nothing
        row_nv[tid] = nv;
        atomicMax(&block_nv, nv);
    }
    __syncthreads();
    const int n_cells = block_nv;
    const int n_tiles = (n_cells + kBN - 1) / kBN;

    const int64_t kv_width = static_cast<int64_t>(a.n_head_kv) * D;
    const int32_t* cells = a.cells ? a.cells + a.cell_start[0] : nullptr;  // null: cell i is row i
    const half* k_base = static_cast<const half*>(a.k_cache) + static_cast<int64_t>(kvh) * D;
    const half* v_base = static_cast<const half*>(a.v_cache) + static_cast<int64_t>(kvh) * D;

    // Cells past n_cells are zero-filled: V rows must not hold NaN garbage (p = 0 times NaN).
    auto load_tile = [&](int i) {
        half* ks = kv + (i % C::kStages) * 2 * kBN * S;
        half* vs = ks + kBN * S;
        constexpr int kChunks = D / 8;  // 16-byte pieces per row
#pragma unroll
        for (int j = tid; j < kBN * kChunks; j += kThreads) {
            const int r = j / kChunks, c = j % kChunks;
            const int cell_idx = i * kBN + r;
            const bool ok = cell_idx < n_cells;
            const int64_t cell = ok ? (cells ? cells[cell_idx] : cell_idx) : 0;
            if constexpr (kF16) {
                cp_async16(ks + r * S + c * 8, k_base + cell * kv_width + c * 8, ok);
                cp_async16(vs + r * S + c * 8, v_base + cell * kv_width + c * 8, ok);
            } else {
                uint8_t* st = stage0 + (i % C::kStages) * stage_bytes;
                kv_stage_piece(side_k, st + r * k_row, cell, c, kChunks, ok);
                kv_stage_piece(side_v, st + kBN * k_row + r * v_row, cell, c, kChunks, ok);
            }
        }
    };
    for (int s = 0; s < C::kStages - 1; ++s) {
        if (s < n_tiles) load_tile(s);
        cp_async_commit();
    }

    // q * scale * log2(e) as f16; padding rows are zero. Row t of q starts at t * q_stride (a
    // multiple of 4 floats, checked on the host: the float4 loads stay 16-byte aligned).
    const float qscale = a.scale * kLog2e;
    const int64_t q_stride = a.q_stride ? a.q_stride : static_cast<int64_t>(a.n_head) * D;
    for (int i = tid; i < kBM * D / 4; i += kThreads) {
        const int r = i / (D / 4), d = (i % (D / 4)) * 4;
        const int64_t row = row0 + r;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row < n_rows) {
            const int64_t t = row / group, h = kvh * group + row % group;
            x = *reinterpret_cast<const float4*>(a.q + t * q_stride + h * D + d);
        }
        *reinterpret_cast<uint2*>(qs + r * S + d) =
            make_uint2(pack_f16(x.x * qscale, x.y * qscale), pack_f16(x.z * qscale, x.w * qscale));
    }
    __syncthreads();

    const half* qw = qs + warp * 16 * S;  // this warp's 16 rows
    const int g = lane >> 2, tq = lane & 3;
    const int nv0 = row_nv[warp * 16 + g], nv1 = row_nv[warp * 16 + g + 8];
    const int warp_nv = __reduce_max_sync(0xffffffffu, max(nv0, nv1));

    uint32_t qf[C::kQInRegs ? D / 16 : 1][4];
    if constexpr (C::kQInRegs) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], qw + (lane & 15) * S + kk * 16 + (lane >> 4) * 8);
    }

    // Per-thread share of the warp's state (mma accumulator layout): rows g and g + 8, for each
    // 8-wide column tile the columns 2 * tq and 2 * tq + 1.
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    for (int i = 0; i < n_tiles; ++i) {
        cp_async_wait<C::kStages - 2>();
        __syncthreads();  // tile i visible to all; everyone is done with the buffer refilled below
        if (i + C::kStages - 1 < n_tiles) load_tile(i + C::kStages - 1);
        cp_async_commit();

        const half* ks = kv + (i % C::kStages) * 2 * kBN * S;
        const half* vs = ks + kBN * S;
        if constexpr (!kF16) {
            const uint8_t* st = stage0 + (i % C::kStages) * stage_bytes;
            ks = reinterpret_cast<const half*>(st);
            vs = reinterpret_cast<const half*>(st + kBN * k_row);
            if (side_k.quant) {
                kv_dequant_rows<D>(side_k.type, st, side_k.pitch, work_k, S, 0, kBN, tid, kThreads);
                ks = work_k;
            }
            if (side_v.quant) {
                kv_dequant_rows<D>(side_v.type, st + kBN * k_row, side_v.pitch, work_v, S, 0, kBN, tid, kThreads);
                vs = work_v;
            }
            __syncthreads();  // the dequantized tile is complete (the next loop top guards its reuse)
        }

        const int c0 = i * kBN;
        if (c0 >= warp_nv) continue;  // warp-uniform: no row of this warp sees the tile

        float s[kBN / 8][4];
#pragma unroll
        for (int n = 0; n < kBN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t af[4];
            if constexpr (C::kQInRegs) {
#pragma unroll
                for (int j = 0; j < 4; ++j) af[j] = qf[kk][j];
            } else {
                ldmatrix_x4(af, qw + (lane & 15) * S + kk * 16 + (lane >> 4) * 8);
            }
#pragma unroll
            for (int np = 0; np < kBN / 16; ++np) {
                uint32_t b[4];
                ldmatrix_x4(b, ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * S + kk * 16 + ((lane >> 3) & 1) * 8);
                mma16816(s[2 * np], af, b[0], b[1]);
                mma16816(s[2 * np + 1], af, b[2], b[3]);
            }
        }
        if (c0 + kBN > min(nv0, nv1)) {
#pragma unroll
            for (int n = 0; n < kBN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = c0 + n * 8 + 2 * tq + e;
                    if (c >= nv0) s[n][e] = -INFINITY;
                    if (c >= nv1) s[n][2 + e] = -INFINITY;
                }
        }

        // Online softmax; the four threads of a row group share a row, hence the two shuffles.
        float x0 = -INFINITY, x1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < kBN / 8; ++n) {
            x0 = fmaxf(x0, fmaxf(s[n][0], s[n][1]));
            x1 = fmaxf(x1, fmaxf(s[n][2], s[n][3]));
        }
        x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
        x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
        x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
        x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
        const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
        // A row that has seen no visible cell yet (or a padding row) keeps max -inf: subtract 0
        // instead, so that exp2(-inf) = 0 rather than exp2(-inf - -inf) = NaN.
        const float u0 = n0 == -INFINITY ? 0.0f : n0, u1 = n1 == -INFINITY ? 0.0f : n1;
        const float alpha0 = exp2f(m0 - u0), alpha1 = exp2f(m1 - u1);
        m0 = n0;
        m1 = n1;
        float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
        for (int n = 0; n < kBN / 8; ++n) {
            s[n][0] = exp2f(s[n][0] - u0);
            s[n][1] = exp2f(s[n][1] - u0);
            s[n][2] = exp2f(s[n][2] - u1);
            s[n][3] = exp2f(s[n][3] - u1);
            sum0 += s[n][0] + s[n][1];
            sum1 += s[n][2] + s[n][3];
        }
        l0 = l0 * alpha0 + sum0;
        l1 = l1 * alpha1 + sum1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= alpha0;
            o[n][1] *= alpha0;
            o[n][2] *= alpha1;
            o[n][3] *= alpha1;
        }

        // o += p v: p as the A operand straight from the accumulator layout, V via ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
            const uint32_t pa[4] = {pack_f16(s[2 * kk][0], s[2 * kk][1]), pack_f16(s[2 * kk][2], s[2 * kk][3]),
                                    pack_f16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack_f16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vs + (kk * 16 + (lane & 15)) * S + dn * 16 + (lane >> 4) * 8);
                mma16816(o[2 * dn], pa, b[0], b[1]);
                mma16816(o[2 * dn + 1], pa, b[2], b[3]);
            }
        }
    }
    cp_async_wait<0>();  // leave no copy in flight at exit

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
#pragma unroll
    for (int half_row = 0; half_row < 2; ++half_row) {
        const int64_t row = row0 + warp * 16 + g + 8 * half_row;
        const float l = half_row ? l1 : l0;
        if (row >= n_rows || !(l > 0.0f)) continue;  // padding rows
        const float inv = 1.0f / l;
        const int64_t t = row / group, h = kvh * group + row % group;
        float* out = a.out + (t * a.n_head + h) * D + 2 * tq;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<float2*>(out + n * 8) =
                make_float2(o[n][2 * half_row] * inv, o[n][2 * half_row + 1] * inv);
    }
}

// The KV types the kernel's tiles read: BF16 rows staged raw need more shared memory than D = 256
// leaves, so they are converted first (kv_rows_to_f16).
bool tiles_read(uint32_t type) { return type == GGML_TYPE_F16 || type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0; }

template <int D>
void launch_prefill(const AttentionArgs& a, cudaStream_t s) {
    const int64_t rows = static_cast<int64_t>(a.n_tok) * (a.n_head / a.n_head_kv);
    const dim3 grid(static_cast<unsigned>((rows + kBM - 1) / kBM), a.n_head_kv);
    if (a.type_k == GGML_TYPE_F16 && a.type_v == GGML_TYPE_F16) {
        static std::atomic<uint64_t> done{0};
        allow_smem(attention_prefill_kernel<D, true>, Cfg<D>::kSmem, done, "attention_prefill");
        launch_kernel(attention_prefill_kernel<D, true>, grid, dim3(kThreads), Cfg<D>::kSmem, s, a);
    } else {
        static std::atomic<uint64_t> done{0};
        const size_t most = kv_smem_max(quant_smem<D>, tiles_read);
        allow_smem(attention_prefill_kernel<D, false>, most, done, "attention_prefill");
        launch_kernel(attention_prefill_kernel<D, false>, grid, dim3(kThreads), quant_smem<D>(a.type_k, a.type_v), s,
                      a);
    }
    check_launch("attention_prefill");
}

// Rows per block of kv_rows_to_f16: each block first reduces n_visible over the tokens.
constexpr int kConvertRows = 32;

__global__ void kv_rows_to_f16_kernel(const uint8_t* cache, uint32_t type, int64_t width, int64_t row_bytes,
                                      const int32_t* cells, const int32_t* cell_start, const int32_t* n_visible,
                                      int n_tok, half* out) {
    pdl_enter();
    __shared__ int most;
    if (threadIdx.x == 0) most = 0;
    __syncthreads();
    int m = 0;
    for (int t = threadIdx.x; t < n_tok; t += blockDim.x) m = max(m, n_visible[t]);
    m = __reduce_max_sync(0xffffffffu, m);
    if ((threadIdx.x & 31) == 0) atomicMax(&most, m);
    __syncthreads();
    const int r0 = blockIdx.x * kConvertRows;
    const int rows = min(kConvertRows, most - r0);
    if (rows <= 0) return;
    const int units = static_cast<int>(width / 8);
    const int32_t* list = cells + cell_start[0] + r0;
    for (int i = threadIdx.x; i < rows * units; i += blockDim.x) {
        const int r = i / units, u = i % units;
        const uint8_t* row = cache + static_cast<int64_t>(list[r]) * row_bytes;
        *reinterpret_cast<uint4*>(out + (r0 + r) * width + u * 8) = kv_dequant8(type, row, u);
    }
}

}  // namespace

void kv_rows_to_f16(const void* cache, uint32_t type, int64_t width, const int32_t* cells, const int32_t* cell_start,
                    const int32_t* n_visible, int n_tok, int max_visible, void* out, cudaStream_t s) {
    if (n_tok <= 0 || max_visible <= 0) return;
    if (!kv_type_supported(type) || width <= 0 || width % 32 != 0)
        throw std::invalid_argument("kv_rows_to_f16: need a KV type and a width that is a multiple of 32");
    launch_kernel(kv_rows_to_f16_kernel, dim3(static_cast<unsigned>((max_visible + kConvertRows - 1) / kConvertRows)),
                  dim3(256), 0, s, static_cast<const uint8_t*>(cache), type, width, kv_row_bytes(type, width), cells,
                  cell_start, n_visible, n_tok, static_cast<half*>(out));
    check_launch("kv_rows_to_f16");
}

void attention_prefill(const AttentionArgs& a, cudaStream_t s) {
    if (a.n_tok <= 0) return;
    if (a.n_head <= 0 || a.n_head_kv <= 0 || a.n_head % a.n_head_kv != 0)
        throw std::invalid_argument("attention_prefill: n_head must be a multiple of n_head_kv");
    if (a.q_stride != 0 && (a.q_stride < static_cast<int64_t>(a.n_head) * a.head_dim || a.q_stride % 4 != 0))
        throw std::invalid_argument("attention_prefill: q_stride must be >= n_head * head_dim and a multiple of 4");
    if (!tiles_read(a.type_k) || !tiles_read(a.type_v))
        throw std::invalid_argument("attention_prefill: KV types must be F16, Q8_0 or Q4_0 (BF16 rows: convert them "
                                    "with kv_rows_to_f16 first)");
    switch (a.head_dim) {
        case 64: launch_prefill<64>(a, s); break;
        case 128: launch_prefill<128>(a, s); break;
        case 256: launch_prefill<256>(a, s); break;
        default: throw std::invalid_argument("attention_prefill: head_dim must be 64, 128 or 256");
    }
}

}  // namespace glmoe::cuda
