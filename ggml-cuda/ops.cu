// Element-wise and small ops of the GLM4-MoE forward: embedding rows, rms norm, q/k/v
// preparation (bias, qk-norm, neox rope, KV-cache store), MoE routing and grouping, combine.
// Every function only enqueues kernels on its stream (no host sync, no allocation) so that a
// decode step can be captured as a CUDA graph.
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "ggml_types.h"
#include "kernels.h"
#include "kv_tile.cuh"
#include "quantize_block.cuh"

namespace glmoe::cuda {

void check_launch(const char* what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

namespace {

void require(bool ok, const char* fn, const std::string& msg) {
    if (!ok) throw std::invalid_argument(std::string(fn) + ": " + msg);
}

int grid_for(int64_t n, int threads, int cap = 65535 * 8) {
    const int64_t b = (n + threads - 1) / threads;
    return static_cast<int>(b < cap ? b : cap);
}

// ---- get_rows: per-element dequantization -------------------------------------------------------
// Each output element is decoded on its own: simple, and the embedding lookup is a tiny op.
// Products and differences use explicit _rn intrinsics so that no FMA is contracted: the CPU and
// gguf-py round each step separately, and we must match them bit for bit.

__device__ __forceinline__ uint16_t ld_u16(const uint8_t* p) {
    return static_cast<uint16_t>(p[0] | (p[1] << 8));
}

__device__ __forceinline__ float dequant_element(uint32_t type, const uint8_t* row, int64_t c) {
    switch (type) {
        case GGML_TYPE_F32:
            return reinterpret_cast<const float*>(row)[c];
        case GGML_TYPE_F16:
            return half_bits_to_float(reinterpret_cast<const uint16_t*>(row)[c]);
        case GGML_TYPE_BF16:
            return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(row)[c]);
        case GGML_TYPE_Q8_0: {
            const uint8_t* b = row + (c / 32) * 34;
            const int j = static_cast<int>(c % 32);
            return __fmul_rn(static_cast<float>(static_cast<int8_t>(b[2 + j])), half_bits_to_float(ld_u16(b)));
        }
        case GGML_TYPE_Q4_0: {
            const uint8_t* b = row + (c / 32) * 18;
            const int j = static_cast<int>(c % 32);
            const int q = j < 16 ? (b[2 + j] & 0x0F) : (b[2 + j - 16] >> 4);
            return __fmul_rn(half_bits_to_float(ld_u16(b)), static_cast<float>(q - 8));
        }
        case GGML_TYPE_Q5_0: {
            const uint8_t* b = row + (c / 32) * 22;
            const int j = static_cast<int>(c % 32);
            const int hbit = (b[2 + j / 8] >> (j % 8)) & 1;
            const int lo = j < 16 ? (b[6 + j] & 0x0F) : (b[6 + j - 16] >> 4);
            return __fmul_rn(half_bits_to_float(ld_u16(b)), static_cast<float>((lo | (hbit << 4)) - 16));
        }
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K: {
            const bool q5 = type == GGML_TYPE_Q5_K;
            const uint8_t* b = row + (c / 256) * (q5 ? 176 : 144);
            const int e = static_cast<int>(c % 256), s = e / 32, i = e % 32;
            const uint8_t* sc = b + 4;
            int scale, mn;
            if (s < 4) {
                scale = sc[s] & 63;
                mn = sc[s + 4] & 63;
            } else {
                scale = (sc[s + 4] & 0x0F) | ((sc[s - 4] >> 6) << 4);
                mn = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
            }
            const uint8_t* qs = b + (q5 ? 48 : 16);
            int q = (qs[32 * (s / 2) + i] >> (4 * (s % 2))) & 0x0F;
            if (q5) q |= ((b[16 + i] >> s) & 1) << 4;
            const float ds = __fmul_rn(half_bits_to_float(ld_u16(b)), static_cast<float>(scale));
            const float dm = __fmul_rn(half_bits_to_float(ld_u16(b + 2)), static_cast<float>(mn));
            return __fsub_rn(__fmul_rn(ds, static_cast<float>(q)), dm);
        }
        case GGML_TYPE_Q6_K: {
            const uint8_t* b = row + (c / 256) * 210;
            const int e = static_cast<int>(c % 256), h = e / 128, l = e % 128;
            const int lo = (b[64 * h + l % 64] >> (4 * (l / 64))) & 0x0F;
            const int hi = (b[128 + 32 * h + l % 32] >> (2 * (l / 32))) & 3;
            const float ds =
                __fmul_rn(half_bits_to_float(ld_u16(b + 208)), static_cast<float>(static_cast<int8_t>(b[192 + e / 16])));
            return __fmul_rn(ds, static_cast<float>((lo | (hi << 4)) - 32));
        }
    }
    return __int_as_float(0x7FC00000);
}

__global__ void get_rows_kernel(const uint8_t* table, uint32_t type, int64_t n_rows, int64_t cols, size_t row_bytes,
                                const int32_t* ids, float* out) {
    pdl_enter();
    const int64_t t = blockIdx.x;
    const int32_t id = ids[t];
    float* o = out + t * cols;
    // A bad id cannot throw on the device: the row comes out NaN, which the tests and the
    // forward's outputs make visible.
    const bool ok = id >= 0 && id < n_rows;
    const uint8_t* row = table + static_cast<int64_t>(ok ? id : 0) * row_bytes;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
        o[c] = ok ? dequant_element(type, row, c) : __int_as_float(0x7FC00000);
}

// ---- rms_norm ----------------------------------------------------------------------------------

// out_q8 (optional): the normed row also quantized for the matrix-vector kernels, saving a launch;
// then cols % 32 == 0 and blockDim % 32 == 0, so each warp's 32 consecutive columns are one block.
// A thread owns columns threadIdx.x + k * blockDim.x. PER > 0: at most PER of them, held in
// registers from one load (the weights are read before waiting on the previous kernel: a decode
// step's norm is a chain of latencies, not bandwidth); PER == 0: any row length, read twice.
// Both sum a thread's squares in column order, so both give the same bits.
template <int PER>
__global__ void rms_norm_kernel(const float* x, const float* w, int64_t cols, float eps, float* out, BlockQ8* out_q8) {
    __shared__ float scratch[32];
    const float* xr = x + blockIdx.x * cols;
    float* yr = out + blockIdx.x * cols;
    float ss = 0.0f;
    if constexpr (PER > 0) {
        float xv[PER], wv[PER];
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
            wv[k] = c < cols ? w[c] : 0.0f;
        }
        pdl_enter();
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
            xv[k] = c < cols ? xr[c] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < PER; ++k) ss += xv[k] * xv[k];
        ss = block_sum(ss, scratch);
        const float scale = 1.0f / sqrtf(ss / static_cast<float>(cols) + eps);
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int64_t c = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
            if (c >= cols) break;  // warp-uniform when out_q8 (cols % 32 == 0)
            const float y = xv[k] * scale * wv[k];
            yr[c] = y;
            if (out_q8) quantize_block_warp(y, threadIdx.x % 32, out_q8[(blockIdx.x * cols + c) / 32]);
        }
    } else {
        pdl_enter();
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
        ss = block_sum(ss, scratch);
        const float scale = 1.0f / sqrtf(ss / static_cast<float>(cols) + eps);
        // Every element is read and written by the same thread after the reduction: out may be x.
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
            const float y = xr[c] * scale * w[c];
            yr[c] = y;
            if (out_q8) quantize_block_warp(y, threadIdx.x % 32, out_q8[(blockIdx.x * cols + c) / 32]);
        }
    }
}

// ---- qkv_prepare -------------------------------------------------------------------------------

constexpr int kMaxRotPairs = 256;  // n_rot / 2 bound: inv_freq travels in the kernel parameters

struct RopeFreqs {
    double inv_freq[kMaxRotPairs];
};

// One 32-value block of a KV row, a value per lane, rounded as the CPU's quantize_row (src/
// quantize_row.cpp): each step in its own IEEE rounding (_rn intrinsics: nothing fused), so the
// bytes match the CPU's and a saved state is the same whichever device wrote it.
__device__ __forceinline__ void store_q8_0_block(float x, int lane, uint8_t* blk) {
    const float amax = warp_max(fabsf(x));
    const float d = __fdiv_rn(amax, 127.0f);
    const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
    if (lane == 0) *reinterpret_cast<__half*>(blk) = __float2half_rn(d);
    blk[2 + lane] = static_cast<uint8_t>(static_cast<int8_t>(roundf(__fmul_rn(x, id))));
}

__device__ __forceinline__ void store_q4_0_block(float x, int lane, uint8_t* blk) {
    // The value of largest magnitude, the first one on a tie, keeps its sign: it maps to -8.
    float best = fabsf(x);
    int at = lane;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float b = __shfl_xor_sync(kFullMask, best, o);
        const int i = __shfl_xor_sync(kFullMask, at, o);
        if (b > best || (b == best && i < at)) {
            best = b;
            at = i;
        }
    }
    const float signed_max = __shfl_sync(kFullMask, x, at);
    const float d = __fdiv_rn(signed_max, -8.0f);
    const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
    const int nib = min(15, max(0, __float2int_rz(__fadd_rn(__fmul_rn(x, id), 8.5f))));
    const int high = __shfl_down_sync(kFullMask, nib, 16);  // value lane + 16: the high nibble
    if (lane == 0) *reinterpret_cast<__half*>(blk) = __float2half_rn(d);
    if (lane < 16) blk[2 + lane] = static_cast<uint8_t>(nib | (high << 4));
}

// f32 -> bf16 bits as the CPU's f32_to_bf16 (src/quantize_row.cpp): nearest, ties to even; a NaN
// stays a quiet NaN with its sign and top payload bits.
__device__ __forceinline__ uint16_t bf16_bits_rn(float x) {
    const uint32_t b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 64);
    return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1)) >> 16);
}

// vals[0..D) (shared memory, written before a __syncthreads) into one kv head's slice of a
// Q8_0 / Q4_0 / BF16 cache row; every thread of the block calls it.
__device__ void store_kv_head_quantized(uint32_t type, const float* vals, uint8_t* dst, int D) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int b = warp; b < D / 32; b += n_warps) {
        const float x = vals[b * 32 + lane];
        if (type == GGML_TYPE_Q8_0) store_q8_0_block(x, lane, dst + b * 34);
        else if (type == GGML_TYPE_Q4_0) store_q4_0_block(x, lane, dst + b * 18);
        else reinterpret_cast<uint16_t*>(dst + b * 64)[lane] = bf16_bits_rn(x);
    }
}

__device__ __forceinline__ uint8_t* kv_head_row(void* cache, uint32_t type, int cell, int n_head_kv, int kvh, int D) {
    const int64_t head_bytes = kv_head_bytes(type, D);
    return static_cast<uint8_t*>(cache) + (static_cast<int64_t>(cell) * n_head_kv + kvh) * head_bytes;
}

// One block per (token, head); heads 0..n_head-1 are q, then n_head_kv k heads, then v heads.
__global__ void qkv_prepare_kernel(QKVArgs a, RopeFreqs freqs) {
    pdl_enter();
    extern __shared__ float head[];
    __shared__ float scratch[32];
    const int t = blockIdx.x, h = blockIdx.y, D = a.head_dim;
    const int64_t width = static_cast<int64_t>(a.n_head + 2 * a.n_head_kv) * D;
    float* row = a.qkv + t * width + static_cast<int64_t>(h) * D;
    const float* bias = a.bias ? a.bias + static_cast<int64_t>(h) * D : nullptr;
    const int cell = a.cells[t];
    const int64_t kv_width = static_cast<int64_t>(a.n_head_kv) * D;

    if (h >= a.n_head + a.n_head_kv) {  // v: bias, then straight into the cache
        if (cell < 0) return;
        if (a.type_v != GGML_TYPE_F16) {
            for (int i = threadIdx.x; i < D; i += blockDim.x) head[i] = row[i] + (bias ? bias[i] : 0.0f);
            __syncthreads();
            const int kvh = h - a.n_head - a.n_head_kv;
            store_kv_head_quantized(a.type_v, head, kv_head_row(a.v_cache, a.type_v, cell, a.n_head_kv, kvh, D), D);
            return;
        }
        half* dst =
            static_cast<half*>(a.v_cache) + cell * kv_width + static_cast<int64_t>(h - a.n_head - a.n_head_kv) * D;
        for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = __float2half_rn(row[i] + (bias ? bias[i] : 0.0f));
        return;
    }
    const bool is_q = h < a.n_head;
    for (int i = threadIdx.x; i < D; i += blockDim.x) head[i] = row[i] + (bias ? bias[i] : 0.0f);

    const float* norm_w = is_q ? a.q_norm : a.k_norm;
    if (norm_w) {  // uniform across the block, so the block reduction is safe
        float ss = 0.0f;
        for (int i = threadIdx.x; i < D; i += blockDim.x) ss += head[i] * head[i];
        ss = block_sum(ss, scratch);
        const float scale = 1.0f / sqrtf(ss / static_cast<float>(D) + a.eps);
        for (int i = threadIdx.x; i < D; i += blockDim.x) head[i] = head[i] * scale * norm_w[i];
    }
    __syncthreads();

    // Neox rope. The angle pos * inv_freq is formed and reduced modulo 2*pi in double (the CPU
    // forms it in double too), so that float sincosf only sees |angle| <= pi: the cos/sin agree
    // with the CPU's double-computed values to ~1 float ulp even at positions ~1e6, where a float
    // angle would already be off by ~0.03 rad.
    const int half_rot = a.n_rot / 2;
    const double pos = static_cast<double>(a.pos[t]);
    for (int i = threadIdx.x; i < half_rot; i += blockDim.x) {
        const double theta = pos * freqs.inv_freq[i];
        const double two_pi = 6.283185307179586476925286766559;
        const double reduced = theta - rint(theta / two_pi) * two_pi;
        float s, c;
        sincosf(static_cast<float>(reduced), &s, &c);
        const float x0 = head[i], x1 = head[i + half_rot];
        head[i] = x0 * c - x1 * s;
        head[i + half_rot] = x0 * s + x1 * c;
    }
    __syncthreads();

    if (is_q) {
        for (int i = threadIdx.x; i < D; i += blockDim.x) row[i] = head[i];
    } else if (cell >= 0 && a.type_k != GGML_TYPE_F16) {
        uint8_t* dst = kv_head_row(a.k_cache, a.type_k, cell, a.n_head_kv, h - a.n_head, D);
        store_kv_head_quantized(a.type_k, head, dst, D);
    } else if (cell >= 0) {
        half* dst = static_cast<half*>(a.k_cache) + cell * kv_width + static_cast<int64_t>(h - a.n_head) * D;
        for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = __float2half_rn(head[i]);
    }
}

// ---- element-wise ------------------------------------------------------------------------------

__global__ void swiglu_kernel(const float* g, const float* u, int64_t n, float* out) {
    pdl_enter();
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const float x = g[i];
        out[i] = x / (1.0f + expf(-x)) * u[i];  // silu as the CPU writes it
    }
}

// ---- moe_route ---------------------------------------------------------------------------------

constexpr int kRouteWarps = 4;
constexpr int kMaxExperts = 512;

// Better in the CPU's partial_sort order: larger score, ties to the lower index.
__device__ __forceinline__ bool route_better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

// One warp per token. Lane l holds experts l, l + 32, ...; selection is k rounds of a warp argmax.
// EPL experts per lane (E <= 32 * EPL): the k argmax rounds scan only what the model has.
template <int kExpertsPerLane>
__global__ void moe_route_kernel(RouteArgs a) {
    pdl_enter();
    __shared__ float sel_smem[kRouteWarps][kMaxExperts];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * kRouteWarps + warp;
    if (t >= a.n) return;  // whole warps leave together
    const int E = a.n_expert;
    const float* logits = a.logits + static_cast<int64_t>(t) * E;
    float* sel = sel_smem[warp];

    float prob[kExpertsPerLane], choice[kExpertsPerLane];
#pragma unroll
    for (int j = 0; j < kExpertsPerLane; ++j) {
        const int e = lane + 32 * j;
        prob[j] = 0.0f;
        choice[j] = -INFINITY;
        if (e < E) {
            prob[j] = 1.0f / (1.0f + expf(-logits[e]));
            choice[j] = prob[j] + (a.bias ? a.bias[e] : 0.0f);
            sel[e] = choice[j];
        }
    }

    if (a.n_groups > 1) {
        __syncwarp();
        const int per_group = E / a.n_groups;
        // Lane g scores group g: the sum of its two largest selection scores.
        float score = -INFINITY;
        if (lane < a.n_groups) {
            float s0 = -INFINITY, s1 = -INFINITY;
            for (int i = 0; i < per_group; ++i) {
                const float v = sel[lane * per_group + i];
                if (v > s0) {
                    s1 = s0;
                    s0 = v;
                } else if (v > s1) {
                    s1 = v;
                }
            }
            score = s0 + (per_group > 1 ? s1 : 0.0f);
        }
        // Rank of each group among all (ties to the lower group index, as the CPU's sort).
        int rank = 0;
        for (int g = 0; g < a.n_groups; ++g) {
            const float other = __shfl_sync(kFullMask, score, g);
            if (lane < a.n_groups && route_better(other, g, score, lane)) ++rank;
        }
        const unsigned kept = __ballot_sync(kFullMask, lane < a.n_groups && rank < a.n_group_used);
#pragma unroll
        for (int j = 0; j < kExpertsPerLane; ++j) {
            const int e = lane + 32 * j;
            if (e < E && !((kept >> (e / per_group)) & 1u)) choice[j] = -INFINITY;
        }
    }

    // k rounds of argmax; `taken` marks chosen experts so that -inf scores stay selectable in
    // index order, as the CPU's comparator allows.
    unsigned taken = 0;
    float sum = 0.0f;
    int32_t* ids = a.ids + static_cast<int64_t>(t) * (a.n_used + (a.fuse_shared ? 1 : 0));
    float* weights = a.weights + static_cast<int64_t>(t) * (a.n_used + (a.fuse_shared ? 1 : 0));
    for (int k = 0; k < a.n_used; ++k) {
        float bv = -INFINITY;
        int bi = 0x7FFFFFFF;
        float bp = 0.0f;
#pragma unroll
        for (int j = 0; j < kExpertsPerLane; ++j) {
            const int e = lane + 32 * j;
            if (e < E && !((taken >> j) & 1u) && route_better(choice[j], e, bv, bi)) {
                bv = choice[j];
                bi = e;
                bp = prob[j];
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(kFullMask, bv, o);
            const int oi = __shfl_xor_sync(kFullMask, bi, o);
            const float op = __shfl_xor_sync(kFullMask, bp, o);
            if (route_better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
                bp = op;
            }
        }
        if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        sum += bp;  // same order as the CPU: selection order (every lane holds the same sum)
        if (lane == 0) {
            ids[k] = bi;
            weights[k] = bp;
        }
    }
    // Normalised by the lanes together: one round trip to memory, not one per route in turn.
    __syncwarp();  // lane 0's writes above are visible to the warp
    for (int k = lane; k < a.n_used; k += 32) {
        float w = weights[k];
        if (a.norm) w /= sum;
        weights[k] = w * a.scale;
    }
    if (lane == 0 && a.fuse_shared) {
        ids[a.n_used] = E;
        weights[a.n_used] = 1.0f;
    }
}

// ---- moe_group ---------------------------------------------------------------------------------

constexpr int kGroupThreads = 1024;

// One block: count pairs per expert in shared memory, scan into offsets, then scatter. Pairs
// with an expert id outside [0, n_expert_total) are dropped (they cannot throw on the device).
__global__ void moe_group_kernel(const int32_t* ids, int n, int n_slots, int n_expert_total, int32_t* counts,
                                 int32_t* offsets, int32_t* src_row, int32_t* dst_row) {
    pdl_enter();
    extern __shared__ int32_t cnt[];  // [n_expert_total] counts, then [n_expert_total] cursors
    int32_t* cursor = cnt + n_expert_total;
    for (int e = threadIdx.x; e < n_expert_total; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    const int64_t n_pairs = static_cast<int64_t>(n) * n_slots;
    for (int64_t p = threadIdx.x; p < n_pairs; p += blockDim.x) {
        const int32_t e = ids[p];
        if (e >= 0 && e < n_expert_total) atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    // Exclusive scan by warp 0, 32 experts a step.
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        int run = 0;
        for (int base = 0; base < n_expert_total; base += 32) {
            const int e = base + lane;
            const int c = e < n_expert_total ? cnt[e] : 0;
            const int incl = warp_inclusive_scan(c);
            if (e < n_expert_total) {
                offsets[e] = run + incl - c;
                cursor[e] = run + incl - c;
                counts[e] = c;
            }
            run += __shfl_sync(kFullMask, incl, 31);
        }
        if (lane == 0) offsets[n_expert_total] = run;
    }
    __syncthreads();
    for (int64_t p = threadIdx.x; p < n_pairs; p += blockDim.x) {
        const int32_t e = ids[p];
        if (e < 0 || e >= n_expert_total) continue;
        const int32_t slot = atomicAdd(&cursor[e], 1);
        src_row[slot] = static_cast<int32_t>(p / n_slots);
        dst_row[slot] = static_cast<int32_t>(p);
    }
}

// ---- moe_combine -------------------------------------------------------------------------------

__global__ void moe_combine_kernel(const float* y, const float* weights, int n, int n_slots, int64_t cols,
                                   float* out, bool accumulate) {
    pdl_enter();
    const int64_t total = static_cast<int64_t>(n) * cols;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t t = i / cols, c = i - t * cols;
        const float* w = weights + t * n_slots;
        const float* yt = y + t * n_slots * cols + c;
        float acc = 0.0f;
        for (int j = 0; j < n_slots; ++j) acc += w[j] * yt[j * cols];
        out[i] = accumulate ? out[i] + acc : acc;
    }
}

}  // namespace

// ---- host entry points -------------------------------------------------------------------------

void get_rows(const WeightView& table, const int32_t* ids, int n, float* out, cudaStream_t s) {
    require(n >= 0, "get_rows", "n must be >= 0");
    if (n == 0) return;
    require(table.data && ids && out, "get_rows", "null pointer");
    const TypeTraits& tr = type_traits(table.type);
    require(tr.supported, "get_rows", "unsupported weight type " + type_name(table.type));
    require(table.cols > 0 && table.cols % tr.block_size == 0, "get_rows",
            "row length " + std::to_string(table.cols) + " is not a multiple of the block size");
    require(table.row_bytes == static_cast<size_t>(table.cols / tr.block_size) * tr.type_size, "get_rows",
            "row_bytes does not match the type and row length");
    launch_kernel(get_rows_kernel, dim3(n), dim3(256), 0, s, static_cast<const uint8_t*>(table.data), table.type, table.rows, table.cols,
                                      table.row_bytes, ids, out);
    check_launch("get_rows");
}

void rms_norm_q8(const float* x, const float* w, int64_t n, int64_t cols, float eps, float* out, BlockQ8* out_q8,
                 cudaStream_t s) {
    require(n >= 0 && cols > 0, "rms_norm", "bad shape");
    if (n == 0) return;
    require(x && w && out, "rms_norm", "null pointer");
    require(n <= 0x7FFFFFFF, "rms_norm", "too many rows");
    require(!out_q8 || cols % 32 == 0, "rms_norm", "quantized output needs cols % 32 == 0");
    const int threads = cols >= 4096 ? 1024 : cols >= 1024 ? 512 : cols >= 256 ? 256 : 64;
    const int64_t per = (cols + threads - 1) / threads;
    auto kernel = per <= 1 ? rms_norm_kernel<1> : per <= 2 ? rms_norm_kernel<2> : per <= 4 ? rms_norm_kernel<4>
                : per <= 8 ? rms_norm_kernel<8> : rms_norm_kernel<0>;
    launch_kernel(kernel, dim3(static_cast<unsigned>(n)), dim3(threads), 0, s, x, w, cols, eps, out, out_q8);
    check_launch("rms_norm");
}

void rms_norm(const float* x, const float* w, int64_t n, int64_t cols, float eps, float* out, cudaStream_t s) {
    rms_norm_q8(x, w, n, cols, eps, out, nullptr, s);
}

bool kv_type_supported(uint32_t type) {
    for (uint32_t t : kKVTypes)
        if (t == type) return true;
    return false;
}

int64_t kv_row_bytes(uint32_t type, int64_t width) {
    return type == GGML_TYPE_F16 ? width * 2 : width / 32 * kv_block_bytes(type);
}

void qkv_prepare(const QKVArgs& a, cudaStream_t s) {
    require(a.n >= 0, "qkv_prepare", "n must be >= 0");
    if (a.n == 0) return;
    require(a.qkv && a.pos && a.cells && a.k_cache && a.v_cache, "qkv_prepare", "null pointer");
    require(a.n_head > 0 && a.n_head_kv > 0 && a.head_dim > 0, "qkv_prepare", "head counts and head_dim must be > 0");
    require(a.n_rot >= 0 && a.n_rot % 2 == 0 && a.n_rot <= a.head_dim && a.n_rot / 2 <= kMaxRotPairs, "qkv_prepare",
            "n_rot must be even, <= head_dim and <= " + std::to_string(2 * kMaxRotPairs));
    require(a.n_head + 2 * a.n_head_kv <= 65535, "qkv_prepare", "too many heads");
    require(std::isfinite(a.freq_base) && a.freq_base > 0.0f, "qkv_prepare", "freq_base must be positive");
    require(kv_type_supported(a.type_k) && kv_type_supported(a.type_v), "qkv_prepare",
            "KV types must be F16, BF16, Q8_0 or Q4_0");
    require(a.head_dim % 32 == 0 || (a.type_k == GGML_TYPE_F16 && a.type_v == GGML_TYPE_F16), "qkv_prepare",
            "BF16 and quantized KV rows need head_dim % 32 == 0");
    // inv_freq exactly as the CPU forms it (double pow), passed by value: no device buffer needed.
    RopeFreqs freqs{};
    for (int i = 0; i < a.n_rot / 2; ++i)
        freqs.inv_freq[i] = std::pow(static_cast<double>(a.freq_base), -2.0 * i / a.n_rot);
    const dim3 grid(static_cast<unsigned>(a.n), static_cast<unsigned>(a.n_head + 2 * a.n_head_kv));
    const int threads = a.head_dim >= 256 ? 256 : a.head_dim >= 128 ? 128 : 64;
    launch_kernel(qkv_prepare_kernel, grid, dim3(threads), a.head_dim * sizeof(float), s, a, freqs);
    check_launch("qkv_prepare");
}

void swiglu(const float* g, const float* u, int64_t n, float* out, cudaStream_t s) {
    require(n >= 0, "swiglu", "n must be >= 0");
    if (n == 0) return;
    require(g && u && out, "swiglu", "null pointer");
    launch_kernel(swiglu_kernel, dim3(grid_for(n, 256)), dim3(256), 0, s, g, u, n, out);
    check_launch("swiglu");
}

void moe_route(const RouteArgs& a, cudaStream_t s) {
    require(a.n >= 0, "moe_route", "n must be >= 0");
    if (a.n == 0) return;
    require(a.logits && a.ids && a.weights, "moe_route", "null pointer");
    require(a.n_expert > 0 && a.n_expert <= kMaxExperts, "moe_route",
            "n_expert must be in [1, " + std::to_string(kMaxExperts) + "]");
    require(a.n_used > 0 && a.n_used <= a.n_expert, "moe_route", "n_used must be in [1, n_expert]");
    const int groups = a.n_groups > 1 ? a.n_groups : 1;
    if (groups > 1) {
        require(groups <= 32 && a.n_expert % groups == 0, "moe_route",
                "n_groups must be <= 32 and divide n_expert");
        require(a.n_group_used >= 1 && a.n_group_used <= groups, "moe_route", "n_group_used must be in [1, n_groups]");
    }
    RouteArgs args = a;
    args.n_groups = groups;
    const unsigned blocks = (a.n + kRouteWarps - 1) / kRouteWarps;
    if (a.n_expert <= 128)
        launch_kernel(moe_route_kernel<4>, dim3(blocks), dim3(32 * kRouteWarps), 0, s, args);
    else if (a.n_expert <= 256)
        launch_kernel(moe_route_kernel<8>, dim3(blocks), dim3(32 * kRouteWarps), 0, s, args);
    else
        launch_kernel(moe_route_kernel<kMaxExperts / 32>, dim3(blocks), dim3(32 * kRouteWarps), 0, s, args);
    check_launch("moe_route");
}

void moe_group(const int32_t* ids, int n, int n_slots, int n_expert_total, int32_t* counts, int32_t* offsets,
               int32_t* src_row, int32_t* dst_row, cudaStream_t s) {
    require(n >= 0 && n_slots > 0, "moe_group", "n must be >= 0 and n_slots > 0");
    require(n_expert_total > 0 && n_expert_total <= 8192, "moe_group", "n_expert_total must be in [1, 8192]");
    require(static_cast<int64_t>(n) * n_slots <= 0x7FFFFFFF, "moe_group", "too many pairs");
    require(counts && offsets && (n == 0 || (ids && src_row && dst_row)), "moe_group", "null pointer");
    // Launched even for n == 0 so that offsets are written (all zero).
    launch_kernel(moe_group_kernel, dim3(1), dim3(kGroupThreads), 2 * n_expert_total * sizeof(int32_t), s, ids, n, n_slots, n_expert_total,
                                                                                     counts, offsets, src_row, dst_row);
    check_launch("moe_group");
}

void moe_combine(const float* y, const float* weights, int n, int n_slots, int64_t cols, float* out, bool accumulate,
                 cudaStream_t s) {
    require(n >= 0 && n_slots > 0 && cols >= 0, "moe_combine", "bad shape");
    if (n == 0 || cols == 0) return;
    require(y && weights && out, "moe_combine", "null pointer");
    launch_kernel(moe_combine_kernel, dim3(grid_for(static_cast<int64_t>(n) * cols, 256)), dim3(256), 0, s, y, weights, n, n_slots, cols,
                                                                                      out, accumulate);
    check_launch("moe_combine");
}

}  // namespace glmoe::cuda
