// Prefill matrix multiplication on tensor cores: y[token][row] = sum_c W[row][c] x[token][c] for
// many tokens, W in its GGUF type. Each block computes 128 weight rows x BN tokens; per K step of 64
// it dequantizes the weight tile from the GGUF blocks (staged in shared memory as the file holds
// them, below) into bf16 shared memory (so quantized weights are read once per token tile and never
// expanded in global memory), converts the f32 activations to bf16 (bf16, not f16: GLM activations
// can exceed the f16 range), and runs mma.sync m16n8k16 bf16 -> f32. The activations of step s+1
// are loaded before the MMAs of step s and stored after them (double-buffered shared tiles, one
// barrier per step).
// The same kernel serves mm_experts: blockIdx.z picks the expert, whose token list is a slice of
// the grouped (src_row, dst_row) pairs read on the device, so there is no host sync.
#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

#include "dequant.cuh"
#include "ggml_types.h"
#include "cuda_common.cuh"
#include "kernels.h"
#include "mma_primitives.cuh"

namespace glmoe::cuda {
namespace {

constexpr int kBM = 128;       // weight rows per block
constexpr int kBK = 64;        // K per step: two 32-element groups per weight row
constexpr int kThreads = 256;  // 8 warps: 4 along rows (32 each) x 2 along tokens
constexpr int kChunks = kBK / 8;  // 16-byte chunks (8 bf16) per tile row

struct MmParams {
    const uint8_t* w;         // dense matrix, or routed expert 0
    const uint8_t* w_shared;  // shared expert (index n_routed) or null
    size_t row_bytes, row_bytes_shared, matrix_bytes;
    int64_t rows, cols;
    const float* x;
    float* y;
    int64_t y_stride;
    int64_t n;                // dense: number of tokens
    const int32_t* offsets;   // experts: pair ranges; null for dense
    const int32_t* src_row;
    const int32_t* dst_row;
    int n_routed;
    int e0;                   // expert of blockIdx.z == 0
    int split_steps;          // dense, > 0: blockIdx.z takes K steps [z, z + 1) * split_steps and
    int64_t split_stride;     // writes its partial sums at y + z * split_stride (no accumulate)
    bool accumulate;
    bool x_vec;               // x rows can be read as float4
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Shared tiles are K-contiguous rows of 8 16-byte chunks; chunk c of row r lives at c ^ (r % 8),
// so the 8 rows an ldmatrix phase reads (same logical chunk) hit 8 different bank groups.
__device__ __forceinline__ int swz(int r, int c) { return r * kChunks + (c ^ (r & 7)); }

// Decode-sized calls (up to kMaxStagedTokens tokens, or pairs an expert) stage quantized
// weights: a span of columns of each of the tile's rows (a K-quant super-block of 256, or four
// 32-element blocks) is copied into shared memory with 16-byte cp.async copies, a row's bytes by
// consecutive threads, a few steps ahead of its use; each 64-column step then decodes its groups
// from shared memory. Loaded from global memory group by group (up to ten narrow loads a thread per
// step, each touching 16 rows' cache lines), a tile with few tokens was bound by its L1 traffic at
// a third of DRAM bandwidth (H100, bench_moe_gpu: the output head at 32 tokens 758 -> 540 us,
// the attention output 316 -> 260). Prompt batches keep loading weights group by group into
// registers, one step ahead (unmeasured with staging: left as it was); so do float weights. The
// decoded values, hence the results, are the same bits either way.
constexpr int kMaxStagedTokens = 64;
constexpr bool staged(uint32_t t) { return t != GGML_TYPE_F32 && t != GGML_TYPE_F16 && t != GGML_TYPE_BF16; }
constexpr bool k_quant(uint32_t t) { return t == GGML_TYPE_Q4_K || t == GGML_TYPE_Q5_K || t == GGML_TYPE_Q6_K; }
constexpr int block_elems(uint32_t t) { return k_quant(t) ? 256 : 32; }
constexpr int block_bytes(uint32_t t) {
    return t == GGML_TYPE_Q4_K ? 144 : t == GGML_TYPE_Q5_K ? 176 : t == GGML_TYPE_Q6_K ? 210
         : t == GGML_TYPE_Q8_0 ? 34 : t == GGML_TYPE_Q4_0 ? 18 : t == GGML_TYPE_Q5_0 ? 22 : 0;
}
constexpr int span_cols(uint32_t t) { return k_quant(t) ? 256 : 128; }  // columns per staged span
constexpr int span_bytes(uint32_t t) { return block_bytes(t) * (span_cols(t) / block_elems(t)); }
// 16-byte granules of one row's span: its bytes, plus up to 14 where rows are only 2-byte aligned
// (Q4_K / Q5_K rows stay 16-byte aligned).
constexpr int span_granules(uint32_t t) {
    return (span_bytes(t) + (t == GGML_TYPE_Q4_K || t == GGML_TYPE_Q5_K ? 0 : 14) + 15) / 16;
}
// Spans in flight: three of the short 32-element-block spans (two steps each), two K-quant ones.
constexpr int span_stages(uint32_t t) { return k_quant(t) ? 2 : 3; }
constexpr size_t stage_bytes(uint32_t t) {
    return staged(t) ? static_cast<size_t>(span_stages(t)) * kBM * span_granules(t) * 16 : 0;
}
// The dynamic shared memory of a kernel for these types (the larger of the two).
constexpr size_t dynamic_smem(uint32_t tr, uint32_t ts) {
    return stage_bytes(tr) > stage_bytes(ts) ? stage_bytes(tr) : stage_bytes(ts);
}

// One block's tile: rows blockIdx.y * 128 .., tokens p0 .. p0 + count - 1 of the pair list.
// kStage: stage quantized weights (decode-sized batches; prompts keep the register path).
template <uint32_t T, int BN, bool kStage>
__device__ __forceinline__ void mm_tile(const MmParams& p, const uint8_t* w, size_t row_bytes, int64_t p0, int count,
                                        uint4 (*ws)[kBM * kChunks], uint4 (*xs)[BN * kChunks], uint8_t* stage) {
    constexpr int WN = BN / 2;                  // tokens per warp
    constexpr int NI = WN / 8;                  // n8 MMA tiles per warp
    constexpr int XP = BN * 16 / kThreads;      // float4 activation loads per thread per step
    constexpr bool kStaged = kStage && staged(T);
    // F32 groups are 32 registers raw: convert at load time so the prefetch holds 16.
    constexpr bool kEager = T == GGML_TYPE_F32;
    static_assert(NI % 2 == 0 && XP >= 1, "tile shape");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // Warps 0-3 take the first half of the tokens: with few tokens the MMA-busy warps then sit on
    // all four SM sub-partitions.
    const int wm = warp & 3, wn = warp >> 2;
    const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kBM;
    const int cols = static_cast<int>(p.cols);  // < 2^31: checked on the host
    const int n_groups = (cols + 31) / 32;
    const int n_steps = (n_groups + 1) / 2;
    // This block's K steps: all, or its slice of a column split (starting on a span boundary).
    const int s_lo = p.split_steps > 0 ? static_cast<int>(blockIdx.z) * p.split_steps : 0;
    const int s_hi = p.split_steps > 0 ? min(n_steps, s_lo + p.split_steps) : n_steps;

    // Weight role: tile row lr, group lh of each step. Rows past the end re-read the last row
    // (valid memory); their results are never stored.
    const int lr = tid >> 1, lh = tid & 1;
    const uint8_t* wrow = w + min(row0 + lr, p.rows - 1) * static_cast<int64_t>(row_bytes);
    // Activation role: tokens (tid / 16) + 16 i, float4 column xc of each step.
    const int xc = tid & 15;
    int xsrc[XP];  // source row of each token, -1 past the tile's tokens (32-bit: saves registers)
#pragma unroll
    for (int i = 0; i < XP; ++i) {
        const int t = (tid >> 4) + 16 * i;
        xsrc[i] = t < count ? (p.src_row ? p.src_row[p0 + t] : static_cast<int>(p0 + t)) : -1;
    }

    // ---- staged weights: span j of every tile row into stage j % NS ----
    constexpr int NG = staged(T) ? span_granules(T) : 1, NS = span_stages(T);
    constexpr int kSpanSteps = span_cols(T) / kBK, kSpanGroups = span_cols(T) / 32;
    const int n_spans = min((cols + span_cols(T) - 1) / span_cols(T), (s_hi + kSpanSteps - 1) / kSpanSteps);
    auto span_row = [&](int j, int r) {  // start of row r's bytes of span j in its stage
        return stage + (j % NS) * (kBM * NG * 16) + r * (NG * 16);
    };
    auto issue = [&](int j) {
        if (kStaged && j < n_spans) {
            const int64_t begin = static_cast<int64_t>(j) * span_bytes(T);
            const int64_t len = min(static_cast<int64_t>(span_bytes(T)), static_cast<int64_t>(row_bytes) - begin);
#pragma unroll 1
            for (int idx = tid; idx < kBM * NG; idx += kThreads) {
                const int r = idx / NG, gi = idx % NG;
                const uint8_t* row = w + min(row0 + r, p.rows - 1) * static_cast<int64_t>(row_bytes);
                const uintptr_t first = reinterpret_cast<uintptr_t>(row + begin);
                const uintptr_t src = (first & ~uintptr_t(15)) + 16 * static_cast<uintptr_t>(gi);
                // Granules past the span are zero-filled, not read (one that holds any of the
                // span's bytes lies inside the row's allocation).
                const bool inside = src < first + len;
                cp_async16(span_row(j, r) + 16 * gi, reinterpret_cast<const void*>(inside ? src : first & ~uintptr_t(15)),
                           inside);
            }
        }
        cp_async_commit();  // always, so that the count of groups in flight stays fixed
    };

    // One step's global loads, held in registers until they are stored to shared memory.
    struct Fetched {
        dq::GroupLoader<T> gl;
        uint32_t pre[kEager ? 16 : 1];
        bool g_ok;
        float4 xv[XP];
    };
    auto load = [&](Fetched& f, int s) {
        const int g = 2 * s + lh;
        f.g_ok = g < n_groups;  // the last step of an odd group count has one group
        if constexpr (!kStaged) {
            if (f.g_ok) {
                f.gl.load(wrow, g, cols);
                if constexpr (kEager) f.gl.to_bf16(f.pre);
            }
        }
        const int k = kBK * s + 4 * xc;
#pragma unroll
        for (int i = 0; i < XP; ++i) {
            f.xv[i] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (xsrc[i] >= 0 && k < cols) {
                const float* xp = p.x + static_cast<int64_t>(xsrc[i]) * cols + k;
                if (p.x_vec) {
                    f.xv[i] = __ldg(reinterpret_cast<const float4*>(xp));
                } else {  // rows not 16-byte aligned (float weights with cols % 4 != 0)
                    f.xv[i].x = __ldg(xp);
                    if (k + 1 < cols) f.xv[i].y = __ldg(xp + 1);
                    if (k + 2 < cols) f.xv[i].z = __ldg(xp + 2);
                    if (k + 3 < cols) f.xv[i].w = __ldg(xp + 3);
                }
            }
        }
    };
    auto store = [&](Fetched& f, int s, int buf) {
        uint32_t o[16];
        if (f.g_ok) {
            if constexpr (kStaged) {
                // Group 2 s + lh from this row's staged span (copied from its 16-byte-aligned start).
                const int j = s / kSpanSteps;
                const uint8_t* span = span_row(j, lr) +
                                      ((reinterpret_cast<uintptr_t>(wrow) + static_cast<int64_t>(j) * span_bytes(T)) & 15);
                f.gl.template load<false>(span, (2 * s + lh) % kSpanGroups, cols);
                f.gl.to_bf16(o);
            } else if constexpr (kEager) {
#pragma unroll
                for (int i = 0; i < 16; ++i) o[i] = f.pre[i];
            } else {
                f.gl.to_bf16(o);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) o[i] = 0;  // zero weights: padding K up to the step
        }
#pragma unroll
        for (int j = 0; j < 4; ++j)
            ws[buf][swz(lr, 4 * lh + j)] = make_uint4(o[4 * j], o[4 * j + 1], o[4 * j + 2], o[4 * j + 3]);
#pragma unroll
        for (int i = 0; i < XP; ++i) {
            const int t = (tid >> 4) + 16 * i;
            uint2* dst = reinterpret_cast<uint2*>(&xs[buf][swz(t, xc >> 1)]) + (xc & 1);
            *dst = make_uint2(dq::pack_bf16(f.xv[i].x, f.xv[i].y), dq::pack_bf16(f.xv[i].z, f.xv[i].w));
        }
    };

    float acc[2][NI][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;
    const int warp_tokens = count - WN * wn;  // valid tokens in this warp's slice (may be <= 0)

    auto compute = [&](int buf) {
        if (warp_tokens <= 0) return;  // warp-uniform: nothing to multiply
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk) {
            uint32_t a[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int r = 32 * wm + 16 * mi + (lane & 15);
                ldmatrix_x4(smem_addr(&ws[buf][swz(r, 2 * kk + (lane >> 4))]), a[mi][0], a[mi][1], a[mi][2],
                            a[mi][3]);
            }
            uint32_t b[NI][2];
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                const int t = WN * wn + 16 * nj + (lane & 7) + ((lane >> 4) << 3);
                ldmatrix_x4(smem_addr(&xs[buf][swz(t, 2 * kk + ((lane >> 3) & 1))]), b[2 * nj][0], b[2 * nj][1],
                            b[2 * nj + 1][0], b[2 * nj + 1][1]);
            }
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                if (8 * ni >= warp_tokens) break;  // warp-uniform: n8 tile past the last token
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) mma_bf16(acc[mi][ni], a[mi], b[ni]);
            }
        }
    };

    Fetched f;
    if constexpr (kStaged) {
#pragma unroll
        for (int j = 0; j < NS; ++j) issue(s_lo / kSpanSteps + j);
        cp_async_wait<NS - 1>();
        __syncthreads();  // the first span staged, by all threads
    }
    load(f, s_lo);
    store(f, s_lo, s_lo & 1);
    __syncthreads();
#pragma unroll 1
    for (int s = s_lo; s < s_hi; ++s) {
        const bool more = s + 1 < s_hi;
        if (more) load(f, s + 1);
        compute(s & 1);
        if (more) {
            if (kStaged && (s + 1) % kSpanSteps == 0) {
                // Step s + 1 opens span j: wait until it is staged (by every thread), then refill
                // the stage of span j - 1, last decoded in the previous step, with span j + NS - 1.
                const int j = (s + 1) / kSpanSteps;
                cp_async_wait<NS - 2>();
                __syncthreads();
                issue(j + NS - 1);
            }
            store(f, s + 1, (s + 1) & 1);  // the buffer step s-1 read: released by the last barrier
        }
        __syncthreads();
    }

    if (warp_tokens <= 0) return;
    // Accumulator element q of tile (mi, ni): row lane/4 (+8 for q >= 2), token 2 (lane % 4) + q % 2.
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int t = WN * wn + 8 * ni + 2 * (lane & 3) + q;
            if (t >= count) continue;
            const int64_t dst = p.dst_row ? p.dst_row[p0 + t] : p0 + t;
            float* yrow = p.y + (p.split_steps > 0 ? blockIdx.z * p.split_stride : 0) + dst * p.y_stride;
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int64_t r = row0 + 32 * wm + 16 * mi + (lane >> 2) + 8 * hf;
                    if (r >= p.rows) continue;
                    const float v = acc[mi][ni][2 * hf + q];
                    yrow[r] = p.accumulate ? yrow[r] + v : v;
                }
            }
        }
    }
}

// blockIdx: x = token tile, y = row tile, z = expert - e0 (mm_experts) or 0. Token tiles vary
// fastest, so the blocks sharing a weight tile run together and it is read from DRAM about once.
// One kernel per type (pair): a single kernel switching over all types spilled registers.
// TS != TR: the shared expert has its own type, in the same launch.
template <int BN, uint32_t TR, uint32_t TS, bool kStage>
__global__ void __launch_bounds__(kThreads, 2) mm_kernel(const MmParams p) {
    pdl_enter();
    __shared__ uint4 ws[2][kBM * kChunks];  // 2 x 16 KiB
    __shared__ uint4 xs[2][BN * kChunks];   // 2 x 8 KiB at BN = 64
    extern __shared__ uint4 stage_smem[];   // with kStage, dynamic_smem(TR, TS): staged weight bytes
    uint8_t* const stage = reinterpret_cast<uint8_t*>(stage_smem);
    const uint8_t* w = p.w;
    size_t row_bytes = p.row_bytes;
    int64_t p0;
    int count;
    bool shared = false;
    if (p.offsets) {
        const int e = blockIdx.z + p.e0;
        const int64_t begin = p.offsets[e], end = p.offsets[e + 1];
        p0 = begin + static_cast<int64_t>(blockIdx.x) * BN;
        if (p0 >= end) return;  // this expert has fewer tokens than the grid allows for
        count = static_cast<int>(end - p0 < BN ? end - p0 : BN);
        if (e == p.n_routed) {
            shared = true;
            w = p.w_shared;
            row_bytes = p.row_bytes_shared;
        } else {
            w += static_cast<int64_t>(e) * static_cast<int64_t>(p.matrix_bytes);
        }
    } else {
        p0 = static_cast<int64_t>(blockIdx.x) * BN;
        count = static_cast<int>(p.n - p0 < BN ? p.n - p0 : BN);
    }
    if constexpr (TR != TS) {
        if (shared) {
            mm_tile<TS, BN, kStage>(p, w, row_bytes, p0, count, ws, xs, stage);
            return;
        }
    }
    mm_tile<TR, BN, kStage>(p, w, row_bytes, p0, count, ws, xs, stage);
}

using Launcher = void (*)(const MmParams&, dim3, cudaStream_t);

template <int BN, uint32_t TR, uint32_t TS, bool kStage>
void launch(const MmParams& p, dim3 grid, cudaStream_t s) {
    constexpr size_t smem = kStage ? dynamic_smem(TR, TS) : 0;
    // Two blocks of up to 108 KiB per SM: the shared memory opt-in, and the carveout that fits them.
    static const bool attr_ok =
        smem == 0 || (cudaFuncSetAttribute(mm_kernel<BN, TR, TS, kStage>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)) == cudaSuccess &&
                      cudaFuncSetAttribute(mm_kernel<BN, TR, TS, kStage>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           cudaSharedmemCarveoutMaxShared) == cudaSuccess);
    if (!attr_ok) throw std::runtime_error("mm: cannot set the kernel's shared memory size");
    launch_kernel(mm_kernel<BN, TR, TS, kStage>, grid, dim3(kThreads), smem, s, p);
}

// Float weights are never staged: one kernel for them whatever kStage asks.
template <int BN, bool kStage>
Launcher launcher(uint32_t t) {
    switch (t) {
        case GGML_TYPE_F32: return &launch<BN, GGML_TYPE_F32, GGML_TYPE_F32, false>;
        case GGML_TYPE_F16: return &launch<BN, GGML_TYPE_F16, GGML_TYPE_F16, false>;
        case GGML_TYPE_BF16: return &launch<BN, GGML_TYPE_BF16, GGML_TYPE_BF16, false>;
        case GGML_TYPE_Q8_0: return &launch<BN, GGML_TYPE_Q8_0, GGML_TYPE_Q8_0, kStage>;
        case GGML_TYPE_Q4_0: return &launch<BN, GGML_TYPE_Q4_0, GGML_TYPE_Q4_0, kStage>;
        case GGML_TYPE_Q5_0: return &launch<BN, GGML_TYPE_Q5_0, GGML_TYPE_Q5_0, kStage>;
        case GGML_TYPE_Q4_K: return &launch<BN, GGML_TYPE_Q4_K, GGML_TYPE_Q4_K, kStage>;
        case GGML_TYPE_Q5_K: return &launch<BN, GGML_TYPE_Q5_K, GGML_TYPE_Q5_K, kStage>;
        case GGML_TYPE_Q6_K: return &launch<BN, GGML_TYPE_Q6_K, GGML_TYPE_Q6_K, kStage>;
        default: return nullptr;
    }
}

// Fused routed + shared launches for the usual mixes (quantized experts, Q8_0 shared expert) that
// fit the register budget (Q5_K / Q6_K + Q8_0 spilled); other mixes run the shared expert as a
// second launch.
template <int BN, bool kStage>
Launcher mixed_launcher(uint32_t routed, uint32_t shared) {
    if (shared != GGML_TYPE_Q8_0) return nullptr;
    switch (routed) {
        case GGML_TYPE_Q4_0: return &launch<BN, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, kStage>;
        case GGML_TYPE_Q5_0: return &launch<BN, GGML_TYPE_Q5_0, GGML_TYPE_Q8_0, kStage>;
        case GGML_TYPE_Q4_K: return &launch<BN, GGML_TYPE_Q4_K, GGML_TYPE_Q8_0, kStage>;
        default: return nullptr;
    }
}

// Q4_K / Q5_K groups are read with 16-byte loads; the other types need natural alignment.
size_t weight_alignment(uint32_t type) {
    return (type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q5_K) ? 16 : type == GGML_TYPE_F32 ? 4 : 2;
}

void check_weight(const WeightView& w, const char* what) {
    const TypeTraits& tr = type_traits(w.type);
    const std::string name = what;
    if (!tr.supported || !dq::supported(w.type))
        throw std::invalid_argument(name + ": unsupported weight type " + type_name(w.type));
    if (!w.data) throw std::invalid_argument(name + ": weight has no data");
    if (w.rows < 1 || w.cols < 1) throw std::invalid_argument(name + ": empty weight");
    if (w.cols % tr.block_size != 0)
        throw std::invalid_argument(name + ": row length " + std::to_string(w.cols) + " is not a multiple of the " +
                                    tr.name + " block size");
    if (w.row_bytes != tr.type_size * static_cast<size_t>(w.cols / tr.block_size))
        throw std::invalid_argument(name + ": row_bytes does not match type and cols");
    if (reinterpret_cast<uintptr_t>(w.data) % weight_alignment(w.type) != 0)
        throw std::invalid_argument(name + ": weight data must be " + std::to_string(weight_alignment(w.type)) +
                                    "-byte aligned");
    if ((w.rows + kBM - 1) / kBM > 65535) throw std::invalid_argument(name + ": too many rows");
    if (w.cols > (int64_t(1) << 30)) throw std::invalid_argument(name + ": rows too long");
}

bool x_vectorizable(const float* x, int64_t cols) {
    return cols % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

}  // namespace

namespace {

// Parameters of a dense mm call, checked; launch_dense runs it over grid.z column slices.
MmParams dense_params(const WeightView& w, const float* x, int64_t n, float* y, int64_t y_stride, bool accumulate,
                      const char* what) {
    check_weight(w, what);
    if (n < 1) throw std::invalid_argument(std::string(what) + ": need at least one token");
    if (!x || !y) throw std::invalid_argument(std::string(what) + ": null activations or output");
    if (y_stride < w.rows) throw std::invalid_argument(std::string(what) + ": y_stride is smaller than the row count");
    MmParams p{};
    p.w = static_cast<const uint8_t*>(w.data);
    p.row_bytes = w.row_bytes;
    p.rows = w.rows;
    p.cols = w.cols;
    p.x = x;
    p.y = y;
    p.y_stride = y_stride;
    p.n = n;
    p.accumulate = accumulate;
    p.x_vec = x_vectorizable(x, w.cols);
    return p;
}

void launch_dense(const MmParams& p, uint32_t type, unsigned slices, cudaStream_t s) {
    const unsigned row_tiles = static_cast<unsigned>((p.rows + kBM - 1) / kBM);
    const int64_t n = p.n;
    // Few tokens: a 32-token tile halves the wasted MMA and activation work.
    if (n <= 32)
        launcher<32, true>(type)(p, dim3(static_cast<unsigned>((n + 31) / 32), row_tiles, slices), s);
    else if (n <= kMaxStagedTokens)
        launcher<64, true>(type)(p, dim3(static_cast<unsigned>((n + 63) / 64), row_tiles, slices), s);
    else
        launcher<64, false>(type)(p, dim3(static_cast<unsigned>((n + 63) / 64), row_tiles, slices), s);
}

// y[t][r] (+)= sum over slices z, in order, of part[z][t][r].
__global__ void split_sum_kernel(const float* part, int slices, int64_t n, int64_t rows, float* y, int64_t y_stride,
                                 bool accumulate) {
    pdl_enter();
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n * rows) return;
    float v = 0.0f;
    for (int z = 0; z < slices; ++z) v += part[z * n * rows + i];
    float* dst = y + (i / rows) * y_stride + i % rows;
    *dst = accumulate ? *dst + v : v;
}

}  // namespace

void mm(const WeightView& w, const float* x, int64_t n, float* y, int64_t y_stride, bool accumulate,
        cudaStream_t s) {
    const MmParams p = dense_params(w, x, n, y, y_stride, accumulate, "mm");
    launch_dense(p, w.type, 1, s);
    check_launch("mm");
}

void mm_split(const WeightView& w, const float* x, int64_t n, float* y, int64_t y_stride, bool accumulate,
              int slices, float* scratch, cudaStream_t s) {
    MmParams p = dense_params(w, x, n, y, y_stride, accumulate, "mm_split");
    if (slices < 1 || slices > 64 || !scratch) throw std::invalid_argument("mm_split: need 1..64 slices and scratch");
    // Slices start on a staged span of any type (the K-quants' are the longest).
    const int n_steps = static_cast<int>((w.cols + kBK - 1) / kBK);
    constexpr int kStepAlign = span_cols(GGML_TYPE_Q4_K) / kBK;
    p.split_steps = ((n_steps + slices - 1) / slices + kStepAlign - 1) / kStepAlign * kStepAlign;
    const unsigned used = static_cast<unsigned>((n_steps + p.split_steps - 1) / p.split_steps);
    p.split_stride = n * w.rows;
    p.y = scratch;
    p.y_stride = w.rows;
    p.accumulate = false;
    launch_dense(p, w.type, used, s);
    check_launch("mm_split");
    const int64_t total = n * w.rows;
    launch_kernel(split_sum_kernel, dim3(static_cast<unsigned>((total + 255) / 256)), dim3(256), 0, s,
                  static_cast<const float*>(scratch), static_cast<int>(used), n, w.rows, y, y_stride, accumulate);
    check_launch("mm_split (sum)");
}

void mm_experts(const ExpertSet& w, const float* x, const int32_t* offsets, const int32_t* src_row,
                const int32_t* dst_row, int64_t max_pairs_per_expert, float* y, cudaStream_t s) {
    check_weight(w.routed, "mm_experts (routed)");
    if (w.n_routed < 1) throw std::invalid_argument("mm_experts: need at least one routed expert");
    if (w.routed.matrix_bytes < w.routed.row_bytes * static_cast<size_t>(w.routed.rows) ||
        w.routed.matrix_bytes % weight_alignment(w.routed.type) != 0)
        throw std::invalid_argument("mm_experts: matrix_bytes must cover a matrix and keep experts aligned");
    if (w.shared) {
        check_weight(w.shared, "mm_experts (shared)");
        if (w.shared.rows != w.routed.rows || w.shared.cols != w.routed.cols)
            throw std::invalid_argument("mm_experts: shared expert shape differs from the routed experts'");
    }
    if (max_pairs_per_expert < 1) throw std::invalid_argument("mm_experts: max_pairs_per_expert must be >= 1");
    if (!x || !y || !offsets || !src_row || !dst_row)
        throw std::invalid_argument("mm_experts: null activations, output or pair arrays");
    const int n_experts = w.n_routed + (w.shared ? 1 : 0);
    if (n_experts > 65535) throw std::invalid_argument("mm_experts: too many experts");
    MmParams p{};
    p.w = static_cast<const uint8_t*>(w.routed.data);
    p.w_shared = static_cast<const uint8_t*>(w.shared.data);
    p.row_bytes = w.routed.row_bytes;
    p.row_bytes_shared = w.shared.row_bytes;
    p.matrix_bytes = w.routed.matrix_bytes;
    p.rows = w.routed.rows;
    p.cols = w.routed.cols;
    p.x = x;
    p.y = y;
    p.y_stride = w.routed.rows;
    p.offsets = offsets;
    p.src_row = src_row;
    p.dst_row = dst_row;
    p.n_routed = w.n_routed;
    p.accumulate = false;
    p.x_vec = x_vectorizable(x, w.routed.cols);
    // Decode-sized steps (at most 64 pairs an expert, a handful each but the shared expert's) take
    // the 32-token tile: half the activation work and shared memory of the 64-token one, and two
    // tiles only for the shared expert above 32 sequences. Prompts take one 64-token tile per
    // expert in the common case (~32 tokens each at pp512): each expert's weights are read once.
    const bool narrow = max_pairs_per_expert <= kMaxStagedTokens;
    const int bn = narrow ? 32 : 64;
    const unsigned token_tiles = static_cast<unsigned>((max_pairs_per_expert + bn - 1) / bn);
    const unsigned row_tiles = static_cast<unsigned>((w.routed.rows + kBM - 1) / kBM);
    auto plain = [&](uint32_t t) { return narrow ? launcher<32, true>(t) : launcher<64, false>(t); };
    const bool same = !w.shared || w.shared.type == w.routed.type;
    const Launcher fused = same ? plain(w.routed.type)
                                : narrow ? mixed_launcher<32, true>(w.routed.type, w.shared.type)
                                         : mixed_launcher<64, false>(w.routed.type, w.shared.type);
    if (fused) {
        fused(p, dim3(token_tiles, row_tiles, static_cast<unsigned>(n_experts)), s);
    } else {
        plain(w.routed.type)(p, dim3(token_tiles, row_tiles, static_cast<unsigned>(w.n_routed)), s);
        check_launch("mm_experts (routed)");
        p.e0 = w.n_routed;
        plain(w.shared.type)(p, dim3(token_tiles, row_tiles, 1), s);
    }
    check_launch("mm_experts");
}

}  // namespace glmoe::cuda
