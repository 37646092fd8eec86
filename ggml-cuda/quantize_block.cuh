// One 32-value activation block quantized by one warp (a value per lane): d = amax / 127,
// q = rint(x / d), as the CPU path rounds. Shared by quantize_q8 and the fused rms_norm.
#pragma once
#include "kernels.h"

namespace glmoe::cuda {

__device__ __forceinline__ void quantize_block_warp(float v, int lane, BlockQ8& out) {
    float amax = fabsf(v);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    const float d = amax / 127.0f;
    const int q = amax > 0.0f ? __float2int_rn(v * (127.0f / amax)) : 0;
    int sum = q;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
    out.q[lane] = static_cast<int8_t>(q);
    if (lane == 0) {
        out.d = d;
        out.s = d * static_cast<float>(sum);
    }
}

}  // namespace glmoe::cuda
