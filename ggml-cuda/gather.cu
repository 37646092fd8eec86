// Row gather: picks the rows whose logits a batch asked for, before the output head.
#include "cuda_common.cuh"
#include "kernels.h"

namespace glmoe::cuda {

namespace {

__global__ void gather_rows_kernel(const float* src, const int32_t* rows, int64_t cols, float* dst) {
    pdl_enter();
    const float* from = src + static_cast<int64_t>(rows[blockIdx.x]) * cols;
    float* to = dst + static_cast<int64_t>(blockIdx.x) * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) to[c] = from[c];
}

}  // namespace

void gather_rows(const float* src, const int32_t* rows, int n, int64_t cols, float* dst, cudaStream_t s) {
    if (n <= 0) return;
    launch_kernel(gather_rows_kernel, dim3(n), dim3(256), 0, s, src, rows, cols, dst);
    check_launch("gather_rows");
}

}  // namespace glmoe::cuda
