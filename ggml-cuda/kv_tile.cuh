// KV rows in a quantized type (Q8_0, Q4_0: llama.cpp's 32-value blocks, 2-byte scale first) or BF16
// (read as 32-value blocks of 64 bytes, no scale) as the attention kernels stage them: one kv
// head's slice of a row is copied raw into shared memory
// with 4-byte cp.async (blocks of 34 or 18 bytes are only 2-byte aligned one by one, but a head's
// slice of D >= 64 values is a whole number of block pairs: 4-byte aligned), then dequantized to
// f16 rows laid out as the f16 kernels' tiles, which the tensor cores read unchanged. BF16 values
// become f16 exactly (8 mantissa bits fit in 10) within f16's range, the range of the default f16
// cache; llama.cpp's CUDA flash attention converts a BF16 cache to f16 the same way.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "ggml_types.h"
#include "mma_primitives.cuh"

namespace glmoe::cuda {

// The types the GPU's KV cache stores (kv_type_supported).
constexpr uint32_t kKVTypes[] = {GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0};

__host__ __device__ constexpr int kv_block_bytes(uint32_t type) {
    return type == GGML_TYPE_Q8_0 ? 34 : type == GGML_TYPE_Q4_0 ? 18 : 64;  // F16, BF16: 32 halves
}

// Bytes of one kv head's slice (D values) of a row.
__host__ __device__ constexpr int kv_head_bytes(uint32_t type, int D) { return D / 32 * kv_block_bytes(type); }

// The raw slice's pitch in shared memory (16-byte multiple: stage rows stay aligned).
__host__ __device__ constexpr int kv_raw_pitch(uint32_t type, int D) { return (kv_head_bytes(type, D) + 15) & ~15; }

// Shared-memory sizing of the attention kernels' quantized path (host side):
// one staged row of a side: the raw slice, or an f16 row of `stride` halves;
__host__ __device__ constexpr int kv_staged_row_bytes(uint32_t type, int stride, int D) {
    return type == GGML_TYPE_F16 ? stride * 2 : kv_raw_pitch(type, D);
}
// one pipeline stage of `rows` K rows and `rows` V rows;
__host__ __device__ constexpr int kv_stage_bytes(uint32_t type_k, uint32_t type_v, int rows, int stride, int D) {
    return rows * (kv_staged_row_bytes(type_k, stride, D) + kv_staged_row_bytes(type_v, stride, D));
}
// the sides that need a dequantized tile of their own;
__host__ __device__ constexpr int kv_quantized_sides(uint32_t type_k, uint32_t type_v) {
    return (type_k != GGML_TYPE_F16) + (type_v != GGML_TYPE_F16);
}
// the most smem(type_k, type_v) over every pair of the KV types that `reads` accepts (a kernel
// opts in once for it).
template <class Smem, class Reads>
size_t kv_smem_max(Smem smem, Reads reads) {
    size_t most = 0;
    for (uint32_t k : kKVTypes)
        for (uint32_t v : kKVTypes)
            if (reads(k) && reads(v)) most = most > smem(k, v) ? most : smem(k, v);
    return most;
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0));
}

// One side (K or V) of a tile: how its rows are stored in global memory and staged.
struct KVSide {
    const uint8_t* head0;  // the kv head's slice of cell 0's row
    int64_t row_bytes;     // global row pitch
    uint32_t type;
    int words;             // 4-byte words per head slice (quantized types)
    int pitch;             // raw bytes per staged row (quantized types)
    bool quant;
};

__device__ __forceinline__ KVSide kv_side(const void* cache, uint32_t type, int n_head_kv, int kvh, int D) {
    KVSide s;
    s.type = type;
    s.quant = type != GGML_TYPE_F16;
    s.row_bytes = static_cast<int64_t>(n_head_kv) * kv_head_bytes(type, D);
    s.head0 = static_cast<const uint8_t*>(cache) + static_cast<int64_t>(kvh) * kv_head_bytes(type, D);
    s.words = kv_head_bytes(type, D) / 4;
    s.pitch = kv_raw_pitch(type, D);
    return s;
}

// Bytes one staged row of this side takes: the raw slice, or an f16 row of `stride` halves.
__device__ __forceinline__ int kv_stage_row_bytes(const KVSide& s, int stride) {
    return s.quant ? s.pitch : stride * static_cast<int>(sizeof(half));
}

// Thread piece `lc` of `n_pieces` of the cell's row into staged row `dst`: an f16 row takes
// 16-byte piece lc (n_pieces == D / 8); a raw slice takes words lc, lc + n_pieces, ...
// `valid` false zero-fills (a quantized zero row dequantizes to zeros: no NaN in masked V).
__device__ __forceinline__ void kv_stage_piece(const KVSide& s, uint8_t* dst, int64_t cell, int lc, int n_pieces,
                                               bool valid) {
    const uint8_t* src = s.head0 + (valid ? cell : 0) * s.row_bytes;
    if (!s.quant) {
        cp_async16(dst + lc * 16, src + lc * 16, valid);
        return;
    }
    for (int w = lc; w < s.words; w += n_pieces) cp_async4(dst + w * 4, src + w * 4, valid);
}

__device__ __forceinline__ uint32_t pack_half2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// Values 8u .. 8u + 7 of a raw row or slice, as 8 halves (each q * d rounded to f16 once; F16
// copied, BF16 converted).
__device__ __forceinline__ uint4 kv_dequant8(uint32_t type, const uint8_t* raw, int u) {
    const int b = u >> 2, sub = u & 3;
    const uint8_t* blk = raw + b * kv_block_bytes(type);
    if (type == GGML_TYPE_F16 || type == GGML_TYPE_BF16) {
        // 4-byte loads: staged slices are 16-byte aligned, F16/BF16 cache rows 64-byte multiples.
        const uint32_t* w = reinterpret_cast<const uint32_t*>(blk + sub * 16);
        const uint32_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
        if (type == GGML_TYPE_F16) return make_uint4(w0, w1, w2, w3);
        auto lo = [](uint32_t x) { return __uint_as_float(x << 16); };
        auto hi = [](uint32_t x) { return __uint_as_float(x & 0xFFFF0000u); };
        return make_uint4(pack_half2(lo(w0), hi(w0)), pack_half2(lo(w1), hi(w1)), pack_half2(lo(w2), hi(w2)),
                          pack_half2(lo(w3), hi(w3)));
    }
    // Integers become f16 exactly through the exponent of 1024 (bits 0x64XX = 1024 + XX), and the
    // f16 product with d is rounded once: the bits of f32 d * q rounded to f16 (that product is
    // exact in f32). Per 8 values: 4 byte permutes, 4 subtractions and 4 multiplications of half
    // pairs, where the f32 route took 8 conversions, 8 multiplications and 4 packs.
    const __half2 d2 = __half2half2(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk)));
    uint32_t w[2];
    __half2 bias;
    if (type == GGML_TYPE_Q8_0) {
        const uint16_t* q = reinterpret_cast<const uint16_t*>(blk + 2 + sub * 8);  // 2-byte aligned
        w[0] = (static_cast<uint32_t>(q[0]) | (static_cast<uint32_t>(q[1]) << 16)) ^ 0x80808080u;  // q + 128
        w[1] = (static_cast<uint32_t>(q[2]) | (static_cast<uint32_t>(q[3]) << 16)) ^ 0x80808080u;
        bias = __half2half2(__ushort_as_half(0x6480));  // 1024 + 128
    } else {  // Q4_0: values 0-15 in the low nibbles of qs[0..15], 16-31 in the high ones
        const uint16_t* q = reinterpret_cast<const uint16_t*>(blk + 2 + (sub & 1) * 8);
        const int shift = sub >= 2 ? 4 : 0;
        w[0] = ((static_cast<uint32_t>(q[0]) | (static_cast<uint32_t>(q[1]) << 16)) >> shift) & 0x0F0F0F0Fu;
        w[1] = ((static_cast<uint32_t>(q[2]) | (static_cast<uint32_t>(q[3]) << 16)) >> shift) & 0x0F0F0F0Fu;
        bias = __half2half2(__ushort_as_half(0x6408));  // 1024 + 8
    }
    uint32_t out[4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // bytes 2h and 2h + 1 of w[j] under an exponent byte 0x64 each
            const uint32_t bits = __byte_perm(w[j], 0x64646464u, h == 0 ? 0x4140u : 0x4342u);
            const __half2 v = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&bits), bias), d2);
            out[2 * j + h] = *reinterpret_cast<const uint32_t*>(&v);
        }
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// Rows [r0, r0 + n_rows) of a staged raw tile (pitch bytes apart) as f16 rows of `stride` halves,
// spread over `n_threads` threads (thread index `tid` among them).
template <int D>
__device__ __forceinline__ void kv_dequant_rows(uint32_t type, const uint8_t* raw, int pitch, half* out, int stride,
                                                int r0, int n_rows, int tid, int n_threads) {
    constexpr int kUnits = D / 8;
    for (int i = tid; i < n_rows * kUnits; i += n_threads) {
        const int r = r0 + i / kUnits, u = i % kUnits;
        *reinterpret_cast<uint4*>(out + r * stride + u * 8) = kv_dequant8(type, raw + r * pitch, u);
    }
}

}  // namespace glmoe::cuda
