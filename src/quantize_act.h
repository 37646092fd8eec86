// Quantization of f32 activation rows to the 8-bit blocks the integer matmul kernels consume.
#pragma once
#include <cstdint>

#include "quant_blocks.h"

namespace glmoe {

// k a multiple of 32 / 256. x ~= d * q with |q| <= 127, rounded to nearest; ActQ8x2 stores q + 128.
void quantize_act_q8x2(const float* x, ActQ8x2* out, int64_t k);
// interleaved: store q's 32-element groups in kInterleavedGroup order (Q4_K, Q5_K).
void quantize_act_q8k(const float* x, ActQ8K* out, int64_t k, bool interleaved);

}  // namespace glmoe
