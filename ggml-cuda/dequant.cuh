// Device-side dequantization of the GGUF weight types, 32 consecutive weights (a "group") of one
// row at a time. Two outputs:
//   * f32, computed like the CPU reference (src/quants.cpp: same f32 operations, no contraction),
//     so it is bit-exact with gguf-py: for embedding-row gathers;
//   * packed bf16 pairs for the tensor-core matmul, computed with cheap packed bf16 arithmetic
//     (the scale is rounded to bf16 first: a ~2^-9 relative error on top of bf16's own rounding).
// A GroupLoader splits the work into load() (global loads only, into registers) and the decode
// (to_f32 / to_bf16), so that a kernel can keep loads in flight while it does other work.
//
// Group g of a row covers elements 32g .. 32g+31. The 32-element types hold one block per group;
// the K-quants hold 8 groups per super-block (Q4_K/Q5_K sub-blocks; Q6_K pairs of sub-blocks of 16).
// Alignment: rows of Q4_K / Q5_K must be 16-byte aligned (their block sizes, 144 and 176, keep
// that from row to row); the other types need only their natural (2-byte) alignment.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ggml_types.h"

namespace glmoe::cuda::dq {

// ---- small helpers -------------------------------------------------------------------------

// kGlobal: read-only global memory (the non-coherent path); otherwise a plain load, for blocks
// a kernel has staged in shared memory.
template <bool kGlobal = true>
__device__ __forceinline__ uint32_t ld_u16(const uint8_t* p) {
    const auto* q = reinterpret_cast<const unsigned short*>(p);
    return kGlobal ? __ldg(q) : *q;
}
template <bool kGlobal = true>
__device__ __forceinline__ uint32_t ld_u32(const uint8_t* p) {
    const auto* q = reinterpret_cast<const unsigned int*>(p);
    return kGlobal ? __ldg(q) : *q;
}
template <bool kGlobal = true>
__device__ __forceinline__ uint4 ld_u128(const uint8_t* p) {
    const auto* q = reinterpret_cast<const uint4*>(p);
    return kGlobal ? __ldg(q) : *q;
}

__device__ __forceinline__ float f16_bits_to_f32(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

// NW little-endian words of the 2-byte-aligned span [p, p + 4 NW), read as aligned words. When p
// is 2 mod 4, one more word is read: it is the aligned word holding the span's last byte, so no
// byte outside the words that hold the span is touched (safe at the end of an allocation).
// The words are combined later (span_word), so that the loads stay in flight meanwhile.
template <int NW>
struct Span {
    uint32_t raw[NW + 1];
    uint32_t shift;  // 0 or 16
    template <bool kGlobal = true>
    __device__ __forceinline__ void load(const uint8_t* p) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(p);
        const uint8_t* base = reinterpret_cast<const uint8_t*>(a & ~uintptr_t(3));
        shift = (a & 2) ? 16u : 0u;
#pragma unroll
        for (int i = 0; i < NW; ++i) raw[i] = ld_u32<kGlobal>(base + 4 * i);
        raw[NW] = shift ? ld_u32<kGlobal>(base + 4 * NW) : 0u;
    }
    __device__ __forceinline__ uint32_t word(int i) const { return __funnelshift_r(raw[i], raw[i + 1], shift); }
};

// bf16 0x4300 is 128.0, and 0x4300 | q is 128 + q exactly for q < 128: two bytes of `bytes4`
// (selected by `sel`, 0x4140: bytes 0,1; 0x4342: bytes 2,3) become a bf16 pair 128 + q.
__device__ __forceinline__ __nv_bfloat162 magic_pair(uint32_t bytes4, uint32_t sel) {
    const uint32_t u = __byte_perm(bytes4, 0x43434343u, sel);
    return *reinterpret_cast<const __nv_bfloat162*>(&u);
}
__device__ __forceinline__ uint32_t bf2_bits(__nv_bfloat162 v) { return *reinterpret_cast<const uint32_t*>(&v); }
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) { return bf2_bits(__floats2bfloat162_rn(lo, hi)); }
__device__ __forceinline__ __nv_bfloat162 bf2(float v) { return __float2bfloat162_rn(v); }

// Four small unsigned values (bytes of q4, each < 128) -> two bf16 pairs (q - off) * scale.
__device__ __forceinline__ void bytes_to_bf16(uint32_t q4, __nv_bfloat162 off, __nv_bfloat162 scale, uint32_t* o) {
    o[0] = bf2_bits(__hmul2(__hsub2(magic_pair(q4, 0x4140), off), scale));
    o[1] = bf2_bits(__hmul2(__hsub2(magic_pair(q4, 0x4342), off), scale));
}
// Same with a subtracted minimum: scale * q - min (K-quants), one rounding.
__device__ __forceinline__ void bytes_to_bf16_min(uint32_t q4, __nv_bfloat162 scale, __nv_bfloat162 neg_min,
                                                  uint32_t* o) {
    const __nv_bfloat162 m128 = bf2(128.0f);
    o[0] = bf2_bits(__hfma2(__hsub2(magic_pair(q4, 0x4140), m128), scale, neg_min));
    o[1] = bf2_bits(__hfma2(__hsub2(magic_pair(q4, 0x4342), m128), scale, neg_min));
}

// Component j of v (j known at compile time after unrolling: stays in registers).
__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// Bit i (i < 4) of t -> bit 4 of byte i (the fifth bit of Q5_0 quants). The four shifted copies
// of t do not overlap, so the multiply is an OR.
__device__ __forceinline__ uint32_t spread4_bit4(uint32_t t) { return (((t & 15u) * 0x00204081u) & 0x01010101u) << 4; }

// Q4_K / Q5_K: 6-bit scale and min of sub-block s from the 12 packed bytes (words w1..w3 of the
// block header); see unpack_k_scales in quant_blocks.h.
__device__ __forceinline__ void k_scale_min(uint4 h, int s, float& sc, float& mn) {
    const int j = 8 * (s & 3);
    const uint32_t s0 = (h.y >> j) & 0xFF, s1 = (h.z >> j) & 0xFF, s2 = (h.w >> j) & 0xFF;
    if (s < 4) {
        sc = static_cast<float>(s0 & 63);
        mn = static_cast<float>(s1 & 63);
    } else {
        sc = static_cast<float>((s2 & 15) | ((s0 >> 6) << 4));
        mn = static_cast<float>((s2 >> 4) | ((s1 >> 6) << 4));
    }
}

// ---- per-type group loaders ----------------------------------------------------------------
// load(row, g, cols): row = start of the row's bytes; cols only matters for the float types,
// whose last group may be partial (elements >= cols read as 0). The quantized types need the
// whole group inside the row (cols is a multiple of their block size).

template <uint32_t T>
struct GroupLoader;

template <>
struct GroupLoader<GGML_TYPE_F32> {
    uint32_t w[32];
    __device__ __forceinline__ void load(const uint8_t* row, int64_t g, int64_t cols) {
        const uint8_t* p = row + g * 128;
        const int64_t valid = cols - 32 * g;
        if (valid >= 32 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const uint4 v = ld_u128(p + 16 * i);
                w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 32; ++i) w[i] = i < valid ? ld_u32(p + 4 * i) : 0u;
        }
    }
    __device__ __forceinline__ void to_f32(float* o) const {
#pragma unroll
        for (int i = 0; i < 32; ++i) o[i] = __uint_as_float(w[i]);
    }
    __device__ __forceinline__ void to_bf16(uint32_t* o) const {
#pragma unroll
        for (int i = 0; i < 16; ++i) o[i] = pack_bf16(__uint_as_float(w[2 * i]), __uint_as_float(w[2 * i + 1]));
    }
};

// F16 and BF16: 16 words of element pairs.
template <bool kBF16>
struct GroupLoader16 {
    uint32_t w[16];
    __device__ __forceinline__ void load(const uint8_t* row, int64_t g, int64_t cols) {
        const uint8_t* p = row + g * 64;
        const int64_t valid = cols - 32 * g;
        if (valid >= 32 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint4 v = ld_u128(p + 16 * i);
                w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const uint32_t lo = 2 * i < valid ? ld_u16(p + 4 * i) : 0u;
                const uint32_t hi = 2 * i + 1 < valid ? ld_u16(p + 4 * i + 2) : 0u;
                w[i] = lo | (hi << 16);
            }
        }
    }
    __device__ __forceinline__ float elem(int i) const {
        const uint32_t h = (w[i / 2] >> (16 * (i & 1))) & 0xFFFF;
        return kBF16 ? __uint_as_float(h << 16) : f16_bits_to_f32(h);
    }
    __device__ __forceinline__ void to_f32(float* o) const {
#pragma unroll
        for (int i = 0; i < 32; ++i) o[i] = elem(i);
    }
    __device__ __forceinline__ void to_bf16(uint32_t* o) const {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            if constexpr (kBF16) {
                o[i] = w[i];
            } else {
                const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
                o[i] = pack_bf16(f.x, f.y);
            }
        }
    }
};
template <>
struct GroupLoader<GGML_TYPE_F16> : GroupLoader16<false> {};
template <>
struct GroupLoader<GGML_TYPE_BF16> : GroupLoader16<true> {};

// Q8_0: {f16 d, int8 qs[32]}, 34 bytes.
template <>
struct GroupLoader<GGML_TYPE_Q8_0> {
    uint32_t d;
    Span<8> qs;
    template <bool kGlobal = true>
    __device__ __forceinline__ void load(const uint8_t* row, int64_t g, int64_t) {
        const uint8_t* b = row + g * 34;
        d = ld_u16<kGlobal>(b);
        qs.template load<kGlobal>(b + 2);
    }
    __device__ __forceinline__ void to_f32(float* o) const {
        const float df = f16_bits_to_f32(d);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const uint32_t w = qs.word(i);
#pragma unroll
            for (int j = 0; j < 4; ++j)
                o[4 * i + j] = __fmul_rn(static_cast<float>(static_cast<int8_t>((w >> (8 * j)) & 0xFF)), df);
        }
    }
    __device__ __forceinline__ void to_bf16(uint32_t* o) const {
        // Signed bytes do not fit the 7-bit bf16 magic; go through f32 (0x4B0000uu is 2^23 + uu)
        // and keep the exact f32 scale.
        const float df = f16_bits_to_f32(d);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const uint32_t u = qs.word(i) ^ 0x80808080u;  // q + 128, unsigned
            float f[4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
                f[j] = (__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440u | j)) - 8388736.0f) * df;
            o[2 * i] = pack_bf16(f[0], f[1]);
            o[2 * i + 1] = pack_bf16(f[2], f[3]);
        }
    }
};

// Q4_0: {f16 d, qs[16]}: element j in the low nibble of qs[j], j + 16 in its high nibble.
template <>
struct GroupLoader<GGML_TYPE_Q4_0> {
    uint32_t d;
    Span<4> qs;
    template <bool kGlobal = true>
    __device__ __forceinline__ void load(const uint8_t* row, int64_t g, int64_t) {
        const uint8_t* b = row + g * 18;
        d = ld_u16<kGlobal>(b);
        qs.template load<kGlobal>(b + 2);
    }
    __device__ __forceinline__ void to_f32(float* o) const {
        const float df = f16_bits_to_f32(d);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t w = qs.word(i);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int b = (w >> (8 * j)) & 0xFF;
                o[4 * i + j] = __fmul_rn(df, static_cast<float>((b & 15) - 8));
                o[16 + 4 * i + j] = __fmul_rn(df, static_cast<float>((b >> 4) - 8));
            }
        }
    }
    __device__ __forceinline__ void to_bf16(uint32_t* o) const {
        const __nv_bfloat162 s = bf2(f16_bits_to_f32(d)), off = bf2(136.0f);  // 128 + 8
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t w = qs.word(i);
            bytes_to_bf16(w & 0x0F0F0F0Fu, off, s, o + 2 * i);
            bytes_to_bf16((w >> 4) & 0x0F0F0F0Fu, off, s, o + 8 + 2 * i);
        }
    }
};

// Q5_0: {f16 d, u32 qh, qs[16]}: as Q4_0 plus bit j of qh as bit 4 of element j.
template <>
struct GroupLoader<GGML_TYPE_Q5_0> {
    uint32_t d;
    Span<5> hq;  // word 0: qh, words 1-4: qs
    template <bool kGlobal = true>
    __device__ __forceinline__ void load(const uint8_t* row, int64_t g, int64_t) {
        const uint8_t* b = row + g * 22;
        d = ld_u16<kGlobal>(b);
        hq.template load<kGlobal>(b + 2);
    }
    // Quants of elements 4i..4i+3 (lo) and 16+4i..16+4i+3 (hi), one per byte.
    __device__ __forceinline__ void quants(int i, uint32_t qh, uint32_t& lo, uint32_t& hi) const {
        const uint32_t w = hq.word(1 + i);
        lo = (w & 0x0F0F0F0Fu) | spread4_bit4(qh >> (4 * i));
        hi = ((w >> 4) & 0x0F0F0F0Fu) | spread4_bit4(qh >> (16 + 4 * i));
    }
    __device__ __forceinline__ void to_f32(float* o) const {
        const float df = f16_bits_to_f32(d);
        const uint32_t qh = hq.word(0);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint32_t lo, hi;
            quants(i, qh, lo, hi);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                o[4 * i + j] = __fmul_rn(df, static_cast<float>(static_cast<int>((lo >> (8 * j)) & 0xFF) - 16));
                o[16 + 4 * i + j] = __fmul_rn(df, static_cast<float>(static_cast<int>((hi >> (8 * j)) & 0xFF) - 16));
            }
        }
    }
    __device__ __forceinline__ void to_bf16(uint32_t* o) const {
        const __nv_bfloat162 s = bf2(f16_bits_to_f32(d)), off = bf2(144.0f);  // 128 + 16
        const uint32_t qh = hq.word(0);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint32_t lo, hi;
            quants(i, qh, lo, hi);
            bytes_to_bf16(lo, off, s, o + 2 * i);
            bytes_to_bf16(hi, off, s, o + 8 + 2 * i);
        }
    }
};

// Q4_K and Q5_K: 256-element super-blocks {f16 d, f16 dmin, scales[12], (Q5_K: qh[32]), qs[128]};
// group g is sub-block s = g % 8: x = d*sc[s]*q - dmin*mn[s].
template <bool kQ5>
struct GroupLoaderK45 {
    static constexpr int kBytes = kQ5 ? 176 : 144;
    static constexpr int kQs = kQ5 ? 48 : 16;
    uint4 head;   // d, dmin, scales
    uint4 q[2];   // the 32-byte qs chunk holding sub-blocks 2c (low nibbles) and 2c+1 (high)
    uint4 h[2];   // Q5_K: qh (bit s of byte e: bit 4 of element e of sub-block s)
    int sub;
    template <bool kGlobal = true>
    __device__ __forceinline__ void load(const uint8_t* row, int64_t g, int64_t) {
        const uint8_t* b = row + (g >> 3) * kBytes;
        sub = static_cast<int>(g & 7);
        head = ld_u128<kGlobal>(b);
        const uint8_t* c = b + kQs + 32 * (sub >> 1);
        q[0] = ld_u128<kGlobal>(c);
        q[1] = ld_u128<kGlobal>(c + 16);
        if constexpr (kQ5) {
            h[0] = ld_u128<kGlobal>(b + 16);
            h[1] = ld_u128<kGlobal>(b + 32);
        }
    }
    // Quants of elements 4i..4i+3 of the sub-block, one per byte.
    __device__ __forceinline__ uint32_t quants(int i) const {
        uint32_t v = (word_of(q[i >> 2], i & 3) >> (4 * (sub & 1))) & 0x0F0F0F0Fu;
        if constexpr (kQ5) v |= ((word_of(h[i >> 2], i & 3) >> sub) & 0x01010101u) << 4;
        return v;
    }
    __device__ __forceinline__ void scales(float& ds, float& dm) const {
        float sc, mn;
        k_scale_min(head, sub, sc, mn);
        ds = __fmul_rn(f16_bits_to_f32(head.x & 0xFFFF), sc);
        dm = __fmul_rn(f16_bits_to_f32(head.x >> 16), mn);
    }
    __device__ __forceinline__ void to_f32(float* o) const {
        float ds, dm;
        scales(ds, dm);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const uint32_t v = quants(i);
#pragma unroll
            for (int j = 0; j < 4; ++j)
                o[4 * i + j] = __fsub_rn(__fmul_rn(ds, static_cast<float>((v >> (8 * j)) & 0xFF)), dm);
        }
    }
    __device__ __forceinline__ void to_bf16(uint32_t* o) const {
        float ds, dm;
        scales(ds, dm);
        const __nv_bfloat162 s = bf2(ds), nm = bf2(-dm);
#pragma unroll
        for (int i = 0; i < 8; ++i) bytes_to_bf16_min(quants(i), s, nm, o + 2 * i);
    }
};
template <>
struct GroupLoader<GGML_TYPE_Q4_K> : GroupLoaderK45<false> {};
template <>
struct GroupLoader<GGML_TYPE_Q5_K> : GroupLoaderK45<true> {};

// Q6_K: {ql[128], qh[64], int8 scales[16], f16 d}, 210 bytes. Group g (of 8) is half hh = g / 4,
// quarter qq = g % 4: element e has its low 4 bits in ql[64 hh + 32 (qq % 2) + e] (nibble qq / 2),
// its high 2 bits in qh[32 hh + e] (bits 2 qq), and scale scales[8 hh + 2 qq + e / 16].
template <>
struct GroupLoader<GGML_TYPE_Q6_K> {
    Span<8> ql, qh;
    uint32_t sc2;  // the group's two int8 scales
    uint32_t d;
    int sub;
    template <bool kGlobal = true>
    __device__ __forceinline__ void load(const uint8_t* row, int64_t g, int64_t) {
        const uint8_t* b = row + (g >> 3) * 210;
        sub = static_cast<int>(g & 7);
        const int hh = sub >> 2, qq = sub & 3;
        ql.template load<kGlobal>(b + 64 * hh + 32 * (qq & 1));
        qh.template load<kGlobal>(b + 128 + 32 * hh);
        sc2 = ld_u16<kGlobal>(b + 192 + 8 * hh + 2 * qq);
        d = ld_u16<kGlobal>(b + 208);
    }
    __device__ __forceinline__ uint32_t quants(int i) const {  // elements 4i..4i+3, one per byte
        const int qq = sub & 3;
        return ((ql.word(i) >> (4 * (qq >> 1))) & 0x0F0F0F0Fu) | (((qh.word(i) >> (2 * qq)) & 0x03030303u) << 4);
    }
    __device__ __forceinline__ float scale(int half) const {
        return __fmul_rn(f16_bits_to_f32(d), static_cast<float>(static_cast<int8_t>((sc2 >> (8 * half)) & 0xFF)));
    }
    __device__ __forceinline__ void to_f32(float* o) const {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float ds = scale(i >> 2);
            const uint32_t v = quants(i);
#pragma unroll
            for (int j = 0; j < 4; ++j)
                o[4 * i + j] = __fmul_rn(ds, static_cast<float>(static_cast<int>((v >> (8 * j)) & 0xFF) - 32));
        }
    }
    __device__ __forceinline__ void to_bf16(uint32_t* o) const {
        const __nv_bfloat162 s0 = bf2(scale(0)), s1 = bf2(scale(1)), off = bf2(160.0f);  // 128 + 32
#pragma unroll
        for (int i = 0; i < 8; ++i) bytes_to_bf16(quants(i), off, i < 4 ? s0 : s1, o + 2 * i);
    }
};

// ---- simple API ----------------------------------------------------------------------------

// Whether a runtime type id has a loader.
__host__ __device__ constexpr bool supported(uint32_t t) {
    return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16 || t == GGML_TYPE_Q8_0 ||
           t == GGML_TYPE_Q4_0 || t == GGML_TYPE_Q5_0 || t == GGML_TYPE_Q4_K || t == GGML_TYPE_Q5_K ||
           t == GGML_TYPE_Q6_K;
}

// out[i] = element 32 group + i of the row, bit-exact with the CPU dequantization (elements at or
// beyond cols, possible only for the float types, are 0).
template <uint32_t T>
__device__ __forceinline__ void dequant_group32(const uint8_t* row, int64_t group, int64_t cols, float out[32]) {
    GroupLoader<T> g;
    g.load(row, group, cols);
    g.to_f32(out);
}

// Runtime-dispatched variant; an unsupported type gives NaN (hosts validate types first).
__device__ inline void dequant_group32(uint32_t type, const uint8_t* row, int64_t group, int64_t cols,
                                       float out[32]) {
    switch (type) {
        case GGML_TYPE_F32: dequant_group32<GGML_TYPE_F32>(row, group, cols, out); break;
        case GGML_TYPE_F16: dequant_group32<GGML_TYPE_F16>(row, group, cols, out); break;
        case GGML_TYPE_BF16: dequant_group32<GGML_TYPE_BF16>(row, group, cols, out); break;
        case GGML_TYPE_Q8_0: dequant_group32<GGML_TYPE_Q8_0>(row, group, cols, out); break;
        case GGML_TYPE_Q4_0: dequant_group32<GGML_TYPE_Q4_0>(row, group, cols, out); break;
        case GGML_TYPE_Q5_0: dequant_group32<GGML_TYPE_Q5_0>(row, group, cols, out); break;
        case GGML_TYPE_Q4_K: dequant_group32<GGML_TYPE_Q4_K>(row, group, cols, out); break;
        case GGML_TYPE_Q5_K: dequant_group32<GGML_TYPE_Q5_K>(row, group, cols, out); break;
        case GGML_TYPE_Q6_K: dequant_group32<GGML_TYPE_Q6_K>(row, group, cols, out); break;
        default:
            for (int i = 0; i < 32; ++i) out[i] = __uint_as_float(0x7FC00000u);
    }
}

}  // namespace glmoe::cuda::dq
