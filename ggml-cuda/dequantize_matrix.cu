// Rows of a weight matrix dequantized to f32, for the accuracy mode (f32 activations on the GPU:
// dequantize into scratch, then mm_float). The values are the device dequantizers' to_f32
// (dequant.cuh), which are computed like the CPU and gguf-py, so the result is bit-exact with
// gguf.quants.dequantize.
//
// A thread decodes one 32-element group of one row into registers; the block then writes its 128
// groups through shared memory so that consecutive threads store consecutive floats (the groups
// of a block are consecutive in the output, except for the missing tail of a partial group of a
// float row whose length is not a multiple of 32).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "dequant.cuh"
#include "ggml_types.h"
#include "kernels.h"

namespace glmoe::cuda {
namespace {

constexpr int kThreads = 128;  // groups per block tile
constexpr int kMaxBlocks = 65535 * 8;

template <uint32_t T>
__global__ void __launch_bounds__(kThreads)
    dequantize_matrix_kernel(const uint8_t* w, size_t row_bytes, int64_t cols, int64_t groups_per_row,
                             int64_t total_groups, float* out) {
    __shared__ float tile[kThreads][33];  // +1: the per-thread row writes hit 32 different banks
    __shared__ int64_t dst[kThreads];     // output offset of each group's first element
    __shared__ int count[kThreads];       // its valid elements (< 32 only at a float row's end)
    const int tid = threadIdx.x;
    bool waited = false;
    for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < total_groups;
         base += static_cast<int64_t>(gridDim.x) * kThreads) {
        const int64_t gi = base + tid;
        int n = 0;
        if (gi < total_groups) {
            const int64_t r = gi / groups_per_row, g = gi - r * groups_per_row;
            dq::GroupLoader<T> gl;
            gl.load(w + r * static_cast<int64_t>(row_bytes), g, cols);  // weights: no wait needed
            float v[32];
            gl.to_f32(v);
#pragma unroll
            for (int i = 0; i < 32; ++i) tile[tid][i] = v[i];
            dst[tid] = r * cols + 32 * g;
            const int64_t left = cols - 32 * g;
            n = left < 32 ? static_cast<int>(left) : 32;
        }
        count[tid] = n;
        // The output may still be read by the previous kernel (scratch reuse): wait before writing.
        if (!waited) {
            pdl_enter();
            waited = true;
        }
        __syncthreads();
        for (int k = tid; k < kThreads * 32; k += kThreads) {
            const int j = k >> 5, i = k & 31;
            if (i < count[j]) out[dst[j] + i] = tile[j][i];
        }
        __syncthreads();
    }
    if (!waited) pdl_enter();
}

using Kernel = void (*)(const uint8_t*, size_t, int64_t, int64_t, int64_t, float*);

Kernel kernel_for(uint32_t type) {
    switch (type) {
        case GGML_TYPE_F32: return &dequantize_matrix_kernel<GGML_TYPE_F32>;
        case GGML_TYPE_F16: return &dequantize_matrix_kernel<GGML_TYPE_F16>;
        case GGML_TYPE_BF16: return &dequantize_matrix_kernel<GGML_TYPE_BF16>;
        case GGML_TYPE_Q8_0: return &dequantize_matrix_kernel<GGML_TYPE_Q8_0>;
        case GGML_TYPE_Q4_0: return &dequantize_matrix_kernel<GGML_TYPE_Q4_0>;
        case GGML_TYPE_Q5_0: return &dequantize_matrix_kernel<GGML_TYPE_Q5_0>;
        case GGML_TYPE_Q4_K: return &dequantize_matrix_kernel<GGML_TYPE_Q4_K>;
        case GGML_TYPE_Q5_K: return &dequantize_matrix_kernel<GGML_TYPE_Q5_K>;
        case GGML_TYPE_Q6_K: return &dequantize_matrix_kernel<GGML_TYPE_Q6_K>;
        default: return nullptr;
    }
}

// The loaders' alignment needs: Q4_K / Q5_K blocks are read with 16-byte loads, F32 with 4-byte
// ones; the others read aligned 32-bit words around 2-byte-aligned fields.
size_t alignment_of(uint32_t type) {
    return (type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q5_K) ? 16 : type == GGML_TYPE_F32 ? 4 : 2;
}

}  // namespace

void dequantize_matrix(const WeightView& w, int64_t first_row, int64_t n_rows, float* out, cudaStream_t s) {
    const TypeTraits& tr = type_traits(w.type);
    const Kernel kernel = kernel_for(w.type);
    if (!kernel || !tr.supported || !dq::supported(w.type))
        throw std::invalid_argument("dequantize_matrix: unsupported weight type " + type_name(w.type));
    if (!w.data || !out) throw std::invalid_argument("dequantize_matrix: null weight or output");
    if (w.rows < 1 || w.cols < 1) throw std::invalid_argument("dequantize_matrix: empty weight");
    if (w.cols % tr.block_size != 0)
        throw std::invalid_argument("dequantize_matrix: row length " + std::to_string(w.cols) +
                                    " is not a multiple of the " + tr.name + " block size");
    if (w.row_bytes != tr.type_size * static_cast<size_t>(w.cols / tr.block_size))
        throw std::invalid_argument("dequantize_matrix: row_bytes does not match type and cols");
    const size_t align = alignment_of(w.type);
    if (reinterpret_cast<uintptr_t>(w.data) % align != 0 || w.row_bytes % align != 0)
        throw std::invalid_argument("dequantize_matrix: weight rows must be " + std::to_string(align) +
                                    "-byte aligned");
    if (first_row < 0 || n_rows < 0 || first_row > w.rows - n_rows)
        throw std::invalid_argument("dequantize_matrix: rows [" + std::to_string(first_row) + ", " +
                                    std::to_string(first_row + n_rows) + ") outside the matrix's " +
                                    std::to_string(w.rows));
    if (n_rows == 0) return;
    const int64_t groups_per_row = (w.cols + 31) / 32;
    const int64_t total = n_rows * groups_per_row;
    const int64_t blocks = (total + kThreads - 1) / kThreads;
    const uint8_t* first = static_cast<const uint8_t*>(w.data) + first_row * static_cast<int64_t>(w.row_bytes);
    launch_kernel(kernel, dim3(static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks)), dim3(kThreads), 0,
                  s, first, w.row_bytes, w.cols, groups_per_row, total, out);
    check_launch("dequantize_matrix");
}

}  // namespace glmoe::cuda
