#include "quantize_row.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ggml_types.h"
#include "quant_blocks.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

// x * id + 8.5 must round twice, as numpy and llama.cpp's C reference do; a fused multiply-add would not.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace glmoe {

namespace {

uint32_t f32_bits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, sizeof b);
    return b;
}

void quantize_q8_0(const float* x, BlockQ8_0* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK32) {
        float amax = 0.0f;
        for (int j = 0; j < QK32; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = f32_to_half(d);
        for (int j = 0; j < QK32; ++j) y[i].qs[j] = static_cast<int8_t>(std::round(x[j] * id));
    }
}

void quantize_q4_0(const float* x, BlockQ4_0* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK32) {
        // The value of largest magnitude, the first one on a tie, keeps its sign: it maps to -8.
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK32; ++j)
            if (amax < std::fabs(x[j])) {
                amax = std::fabs(x[j]);
                max = x[j];
            }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = f32_to_half(d);
        auto nibble = [id](float v) {
            const float shifted = v * id + 8.5f;
            return static_cast<uint8_t>(std::min(15, std::max(0, static_cast<int>(shifted))));
        };
        for (int j = 0; j < QK32 / 2; ++j)
            y[i].qs[j] = static_cast<uint8_t>(nibble(x[j]) | (nibble(x[j + QK32 / 2]) << 4));
    }
}

}  // namespace

uint16_t f32_to_half(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    const uint32_t all = f32_bits(f);
    const uint16_t sign = static_cast<uint16_t>((all >> 16) & 0x8000);
    const uint32_t x = all & 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00 | ((x >> 13) & 0x3ff);  // NaN stays a (quiet) NaN
    if (x >= 0x477ff000u) return sign | 0x7c00;                        // 65520 and up round to infinity
    if (x < 0x38800000u)  // below 2^-14: a half subnormal, in units of 2^-24 (the scaling is exact)
        return sign | static_cast<uint16_t>(std::nearbyint(std::fabs(f) * 16777216.0f));
    const uint32_t rebased = x - 0x38000000u;  // exponent bias 127 -> 15
    return sign | static_cast<uint16_t>((rebased + 0xfffu + ((rebased >> 13) & 1)) >> 13);
#endif
}

uint16_t f32_to_bf16(float f) {
    const uint32_t b = f32_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 64);
    return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1)) >> 16);
}

void quantize_row(uint32_t type, const float* x, void* dst, int64_t n) {
    const TypeTraits& tr = type_traits(type);
    if (tr.name && (n < 0 || n % tr.block_size != 0))
        throw std::invalid_argument("row length " + std::to_string(n) + " is not a multiple of the " + tr.name +
                                    " block size " + std::to_string(tr.block_size));
    switch (type) {
        case GGML_TYPE_F32:
            std::memcpy(dst, x, n * sizeof(float));
            return;
        case GGML_TYPE_F16: {
            uint16_t* h = static_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < n; ++i) h[i] = f32_to_half(x[i]);
            return;
        }
        case GGML_TYPE_BF16: {
            uint16_t* h = static_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < n; ++i) h[i] = f32_to_bf16(x[i]);
            return;
        }
        case GGML_TYPE_Q8_0:
            quantize_q8_0(x, static_cast<BlockQ8_0*>(dst), n / QK32);
            return;
        case GGML_TYPE_Q4_0:
            quantize_q4_0(x, static_cast<BlockQ4_0*>(dst), n / QK32);
            return;
    }
    throw std::invalid_argument("no quantizer for " + type_name(type));
}

}  // namespace glmoe
