// Exact IEEE half and bfloat16 to f32 conversion (the scale fields of every quantized block).
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace glmoe {

inline float bits_to_f32(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Software path for machines without F16C: handles subnormals, infinities and NaN payloads.
inline float half_bits_to_f32_soft(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t mant = h & 0x3FF;
    if (exp == 0x1F) return bits_to_f32(sign | 0x7F800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0) return bits_to_f32(sign);
        // Subnormal: shift the mantissa up until its leading one becomes the implicit bit.
        exp = 113;  // 127 - 15 + 1
        while (!(mant & 0x400)) {
            mant <<= 1;
            --exp;
        }
        return bits_to_f32(sign | (exp << 23) | ((mant & 0x3FF) << 13));
    }
    return bits_to_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

inline float half_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return half_bits_to_f32_soft(h);
#endif
}

// Reads an unaligned little-endian f16 field.
inline float load_half(const void* p) {
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    return half_to_f32(h);
}

inline float bf16_to_f32(uint16_t b) { return bits_to_f32(static_cast<uint32_t>(b) << 16); }

}  // namespace glmoe
