// 8-bit activation quantization for the integer matrix-vector kernels: one warp per 32-value
// block, one value per lane (see quantize_block.cuh).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "kernels.h"
#include "quantize_block.cuh"

namespace glmoe::cuda {
namespace {

constexpr int kWarpsPerCta = 8;

__global__ void __launch_bounds__(32 * kWarpsPerCta) quantize_q8_kernel(const float* __restrict__ x, int64_t n_blocks,
                                                                        int64_t row_blocks, int64_t x_stride,
                                                                        BlockQ8* __restrict__ out) {
    pdl_enter();
    const int64_t blk = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
    if (blk >= n_blocks) return;  // warp-uniform
    const int lane = threadIdx.x % 32;
    const int64_t r = blk / row_blocks, b = blk % row_blocks;
    quantize_block_warp(x[r * x_stride + 32 * b + lane], lane, out[blk]);
}

}  // namespace

void quantize_q8(const float* x, int64_t n_rows, int64_t cols, int64_t x_stride, BlockQ8* out, cudaStream_t s) {
    if (cols <= 0 || cols % 32 != 0)
        throw std::invalid_argument("quantize_q8: cols " + std::to_string(cols) + " is not a positive multiple of 32");
    if (n_rows < 0 || x_stride < cols) throw std::invalid_argument("quantize_q8: bad n_rows or x_stride");
    if (n_rows == 0) return;
    const int64_t n_blocks = n_rows * (cols / 32);
    const int64_t grid = (n_blocks + kWarpsPerCta - 1) / kWarpsPerCta;
    launch_kernel(quantize_q8_kernel, dim3(static_cast<unsigned>(grid)), dim3(32 * kWarpsPerCta), 0, s, x, n_blocks, cols / 32, x_stride, out);
    check_launch("quantize_q8");
}

}  // namespace glmoe::cuda
