// Row gather: picks the rows whose logits a batch asked for, before the output head. Value
// scatter: the step's new entries of the cell-list mirrors. Token feedback: a step's input tokens
// taken from the previous step's samples.
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

__global__ void scatter_values_kernel(const int32_t* at, const int32_t* values, int n, int32_t* dst) {
    pdl_enter();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (at[i] >= 0) dst[at[i]] = values[i];
}

__global__ void resolve_tokens_kernel(int32_t* tokens, int n, const SampledToken* sampled) {
    pdl_enter();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (tokens[i] < 0) tokens[i] = max(sampled[-1 - tokens[i]].id, 0);
}

}  // namespace

void resolve_tokens(int32_t* tokens, int n, const SampledToken* sampled, cudaStream_t s) {
    if (n <= 0) return;
    launch_kernel(resolve_tokens_kernel, dim3(1), dim3(256), 0, s, tokens, n, sampled);
    check_launch("resolve_tokens");
}

void scatter_values(const int32_t* at, const int32_t* values, int n, int32_t* dst, cudaStream_t s) {
    if (n <= 0) return;
    launch_kernel(scatter_values_kernel, dim3(1), dim3(256), 0, s, at, values, n, dst);
    check_launch("scatter_values");
}

void gather_rows(const float* src, const int32_t* rows, int n, int64_t cols, float* dst, cudaStream_t s) {
    if (n <= 0) return;
    launch_kernel(gather_rows_kernel, dim3(n), dim3(256), 0, s, src, rows, cols, dst);
    check_launch("gather_rows");
}

}  // namespace glmoe::cuda
