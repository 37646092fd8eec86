// Device-side decoding of GGUF weight blocks for the integer matrix-vector kernels (mmv.cu).
//
// Every quantized type is consumed in "items" of 32 weights of one row: a lane unpacks an item
// into 32 int8 values (8 words for __dp4a) arranged as two segments of 16, each meeting 16
// activations (one half of a 32-value BlockQ8). An item contributes, per token,
//     f0 * dx0 * dot(seg0) + f1 * dx1 * dot(seg1) + g0 * s0 + g1 * s1
// where dx_j / s_j are the scale / scaled sum of the activation block segment j reads. The g terms
// carry constant offsets (Q4_0 / Q5_0) and sub-block minimums (Q4_K / Q5_K) through the block sums,
// so the int8 values never need re-centring. One layout-independent inner loop then serves all types.
//
// The bytes are read from shared memory, where the kernels stage rows with 16-byte copies: blocks
// are only 2-byte aligned there (as in the file), so multi-byte fields are read as aligned 32-bit
// words and funnel-shifted into place; Q4_K and Q5_K chunks that start 16-byte aligned (a GGUF's
// always do) take item_weights_kquant_aligned instead, whole 16-byte reads.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

#include "ggml_types.h"

namespace glmoe::cuda::mmv_detail {

// Weights of one item of one row, ready for the inner loop.
struct ItemW {
    int w[8];  // seg0 = w[0..3], seg1 = w[4..7]: int8 x 4 each
    float f0, f1, g0, g1;
};

// Where an item's two segments find their activations: 32-value blocks (relative to the chunk's
// first block) and which half of the block (0: values 0-15, 1: 16-31).
struct ItemA {
    int b0, b1, h0, h1;
};

__device__ __forceinline__ float f16_bits(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFF)));
}

__device__ __forceinline__ uint32_t lds_u16(const uint8_t* base, int off) {
    return *reinterpret_cast<const uint16_t*>(base + off);
}

// N consecutive little-endian words starting at any byte offset (reads one word past the end).
template <int N>
__device__ __forceinline__ void lds_words(const uint8_t* base, int off, uint32_t* out) {
    const uint32_t* p = reinterpret_cast<const uint32_t*>(base + (off & ~3));
    const uint32_t sh = 8u * (off & 3);
    uint32_t prev = p[0];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const uint32_t next = p[i + 1];
        out[i] = __funnelshift_r(prev, next, sh);
        prev = next;
    }
}

// 4 bits b0..b3 -> bit 0 of bytes 0..3 (the multiplier's shifted copies never overlap).
__device__ __forceinline__ uint32_t spread4(uint32_t b) { return ((b & 0xF) * 0x00204081u) & 0x01010101u; }

// Bytes per block / elements per block / items per block.
struct TypeGeom {
    int block_bytes, block_elems;
};

__host__ __device__ constexpr TypeGeom type_geom(uint32_t type) {
    switch (type) {
        case GGML_TYPE_Q8_0: return {34, 32};
        case GGML_TYPE_Q4_0: return {18, 32};
        case GGML_TYPE_Q5_0: return {22, 32};
        case GGML_TYPE_Q4_K: return {144, 256};
        case GGML_TYPE_Q5_K: return {176, 256};
        case GGML_TYPE_Q6_K: return {210, 256};
        default: return {0, 0};
    }
}

// Activation placement of item i (0..31) of a chunk; depends on the type only.
__device__ __forceinline__ ItemA item_act(uint32_t type, int i) {
    if (type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q5_K) {
        // Item k of a super-block: 16 bytes of qs = elements 16h.. of sub-blocks 2c (low nibbles)
        // and 2c+1 (high nibbles), c = k/2, h = k%2.
        const int sb = i >> 3, k = i & 7, c = k >> 1, h = k & 1;
        return {8 * sb + 2 * c, 8 * sb + 2 * c + 1, h, h};
    }
    if (type == GGML_TYPE_Q6_K) {
        // Item k: ql bytes 16k..16k+15 = elements 16m.. (low nibbles) and 64+16m.. (high) of half k/4.
        const int sb = i >> 3, k = i & 7, hh = k >> 2, m = k & 3;
        const int b0 = 8 * sb + 4 * hh + (m >> 1);
        return {b0, b0 + 2, m & 1, m & 1};
    }
    return {i, i, 0, 1};  // *_0: one block, both halves
}

// Byte j (0..11) of the packed K-quant scales, given as three words.
__device__ __forceinline__ uint32_t kbyte(const uint32_t* s, int j) {
    const uint32_t w = j < 4 ? s[0] : (j < 8 ? s[1] : s[2]);
    return (w >> (8 * (j & 3))) & 0xFF;
}

// 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block.
__device__ __forceinline__ void kscale(const uint32_t* s, int j, int& sc, int& mn) {
    if (j < 4) {
        sc = kbyte(s, j) & 63;
        mn = kbyte(s, j + 4) & 63;
    } else {
        sc = (kbyte(s, j + 4) & 0x0F) | ((kbyte(s, j - 4) >> 6) << 4);
        mn = (kbyte(s, j + 4) >> 4) | ((kbyte(s, j) >> 6) << 4);
    }
}

// Unpacks item i of a chunk whose first block starts at byte `off` of `row` (shared memory).
__device__ __forceinline__ ItemW item_weights(uint32_t type, const uint8_t* row, int off, int i) {
    ItemW r;
    r.g0 = r.g1 = 0.0f;
    switch (type) {
        case GGML_TYPE_Q8_0: {
            const int o = off + 34 * i;
            r.f0 = r.f1 = f16_bits(lds_u16(row, o));
            lds_words<8>(row, o + 2, reinterpret_cast<uint32_t*>(r.w));
            break;
        }
        case GGML_TYPE_Q4_0: {
            const int o = off + 18 * i;
            const float d = f16_bits(lds_u16(row, o));
            uint32_t q[4];
            lds_words<4>(row, o + 2, q);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                r.w[k] = q[k] & 0x0F0F0F0F;
                r.w[4 + k] = (q[k] >> 4) & 0x0F0F0F0F;
            }
            r.f0 = r.f1 = d;
            r.g0 = -8.0f * d;  // (q - 8): the offset meets the block sum once
            break;
        }
        case GGML_TYPE_Q5_0: {
            const int o = off + 22 * i;
            const float d = f16_bits(lds_u16(row, o));
            uint32_t q[5];  // qh, then the 16 bytes of qs
            lds_words<5>(row, o + 2, q);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                r.w[k] = (q[1 + k] & 0x0F0F0F0F) | (spread4(q[0] >> (4 * k)) << 4);
                r.w[4 + k] = ((q[1 + k] >> 4) & 0x0F0F0F0F) | (spread4(q[0] >> (16 + 4 * k)) << 4);
            }
            r.f0 = r.f1 = d;
            r.g0 = -16.0f * d;
            break;
        }
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K: {
            const bool five = type == GGML_TYPE_Q5_K;
            const int sb = i >> 3, k = i & 7, c = k >> 1, h = k & 1;
            const int o = off + (five ? 176 : 144) * sb;
            const float d = f16_bits(lds_u16(row, o));
            const float dmin = f16_bits(lds_u16(row, o + 2));
            uint32_t s[3];
            lds_words<3>(row, o + 4, s);
            int sc0, mn0, sc1, mn1;
            kscale(s, 2 * c, sc0, mn0);
            kscale(s, 2 * c + 1, sc1, mn1);
            uint32_t q[4];
            lds_words<4>(row, o + (five ? 48 : 16) + 16 * k, q);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                r.w[j] = q[j] & 0x0F0F0F0F;
                r.w[4 + j] = (q[j] >> 4) & 0x0F0F0F0F;
            }
            if (five) {
                uint32_t qh[4];  // bit s of byte e: bit 4 of element e of sub-block s
                lds_words<4>(row, o + 16 + 16 * h, qh);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    r.w[j] |= ((qh[j] >> (2 * c)) & 0x01010101) << 4;
                    r.w[4 + j] |= ((qh[j] >> (2 * c + 1)) & 0x01010101) << 4;
                }
            }
            r.f0 = d * static_cast<float>(sc0);
            r.f1 = d * static_cast<float>(sc1);
            // The minimum applies to all 32 values of a sub-block: the h == 0 item takes it whole.
            if (h == 0) {
                r.g0 = -dmin * static_cast<float>(mn0);
                r.g1 = -dmin * static_cast<float>(mn1);
            }
            break;
        }
        case GGML_TYPE_Q6_K: {
            const int sb = i >> 3, k = i & 7, hh = k >> 2, m = k & 3;
            const int o = off + 210 * sb;
            uint32_t ql[4], qh[4];
            lds_words<4>(row, o + 16 * k, ql);
            lds_words<4>(row, o + 128 + 32 * hh + 16 * (m & 1), qh);
            const int sh = 2 * (m >> 1);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t lo = (ql[j] & 0x0F0F0F0F) | (((qh[j] >> sh) & 0x03030303) << 4);
                const uint32_t hi = ((ql[j] >> 4) & 0x0F0F0F0F) | (((qh[j] >> (sh + 4)) & 0x03030303) << 4);
                // 0..63 -> -32..31 bytewise (no byte can borrow from its neighbour).
                r.w[j] = static_cast<int>(__vsub4(lo, 0x20202020u));
                r.w[4 + j] = static_cast<int>(__vsub4(hi, 0x20202020u));
            }
            const float d = f16_bits(lds_u16(row, o + 208));
            const int8_t* scales = reinterpret_cast<const int8_t*>(row + o + 192);
            r.f0 = d * static_cast<float>(scales[8 * hh + m]);
            r.f1 = d * static_cast<float>(scales[8 * hh + 4 + m]);
            break;
        }
        default:
#pragma unroll
            for (int j = 0; j < 8; ++j) r.w[j] = 0;
            r.f0 = r.f1 = 0.0f;
            break;
    }
    return r;
}

// item_weights for Q4_K / Q5_K where the chunk starts 16-byte aligned in shared memory (their
// 144- and 176-byte blocks then all are): a super-block's d, dmin and 12 scale bytes are one
// 16-byte read, the item's 32 nibbles another (and Q5_K's high bits a third), and the two
// sub-blocks' 6-bit scales and mins are taken as byte pairs (sub-blocks 2c, 2c+1 side by side in
// 16-bit halves of the scale words), with no funnel shifts and no per-lane branch.
template <bool kFive>
__device__ __forceinline__ ItemW item_weights_kquant_aligned(const uint8_t* row, int i) {
    const int sb = i >> 3, k = i & 7, c = k >> 1, h = k & 1;
    const uint8_t* blk = row + (kFive ? 176 : 144) * sb;
    const uint4 head = *reinterpret_cast<const uint4*>(blk);  // d, dmin | scales 0-3 | 4-7 | 8-11
    const uint4 qv = *reinterpret_cast<const uint4*>(blk + (kFive ? 48 : 16) + 16 * k);
    // Scale bytes 2n, 2n+1 are the 16-bit half n; pair c needs halves c, c+2 (c < 2) or
    // c-2, c, c+2 (c >= 2), i.e. the same half (c & 1) of the three words.
    const uint32_t sh = 16u * (c & 1);
    const uint32_t A = head.y >> sh, B = head.z >> sh, C = head.w >> sh;
    const bool high = c >= 2;
    const uint32_t sc = high ? (C & 0x0F0Fu) | ((A & 0xC0C0u) >> 2) : A & 0x3F3Fu;
    const uint32_t mn = high ? ((C >> 4) & 0x0F0Fu) | ((B & 0xC0C0u) >> 2) : B & 0x3F3Fu;
    const float d = f16_bits(head.x), dmin = f16_bits(head.x >> 16);
    ItemW r;
    const uint32_t q[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        r.w[j] = static_cast<int>(q[j] & 0x0F0F0F0Fu);
        r.w[4 + j] = static_cast<int>((q[j] >> 4) & 0x0F0F0F0Fu);
    }
    if (kFive) {  // bit s of byte e: bit 4 of element e of sub-block s
        const uint4 hv = *reinterpret_cast<const uint4*>(blk + 16 + 16 * h);
        const uint32_t qh[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            r.w[j] |= static_cast<int>(((qh[j] >> (2 * c)) & 0x01010101u) << 4);
            r.w[4 + j] |= static_cast<int>(((qh[j] >> (2 * c + 1)) & 0x01010101u) << 4);
        }
    }
    r.f0 = d * static_cast<float>(sc & 0xFF);
    r.f1 = d * static_cast<float>(sc >> 8 & 0xFF);
    // The minimum applies to all 32 values of a sub-block: the h == 0 item takes it whole.
    r.g0 = h == 0 ? -dmin * static_cast<float>(mn & 0xFF) : 0.0f;
    r.g1 = h == 0 ? -dmin * static_cast<float>(mn >> 8 & 0xFF) : 0.0f;
    return r;
}
}  // namespace glmoe::cuda::mmv_detail
