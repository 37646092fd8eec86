// f32 rows into a stored element type (what the KV cache keeps: f32, f16, bf16, q8_0, q4_0),
// rounded as llama.cpp's reference quantizers and gguf-py's round, so that a row is bit-for-bit
// theirs; quants.h's dequantize_row reads it back.
#pragma once
#include <cstdint>

namespace glmoe {

// dst = the n values of x in `type`; n a multiple of the type's block size. Throws
// std::invalid_argument for a type without a quantizer here or a bad n.
void quantize_row(uint32_t type, const float* x, void* dst, int64_t n);

// IEEE half, rounded to nearest even (overflow to infinity, NaN kept NaN).
uint16_t f32_to_half(float f);
// bfloat16, rounded to nearest even; NaN made quiet (as ggml and gguf-py do).
uint16_t f32_to_bf16(float f);

}  // namespace glmoe
