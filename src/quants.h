// Weight-type kernels: dequantization of rows and the threaded matrix multiplication
// y = x W^T that every linear layer uses, for each supported GGMLType.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "ggml_types.h"
#include "thread_pool.h"

namespace glmoe {

// dst[0..n) = the n values of one row; n must be a multiple of the type's block size.
void dequantize_row(uint32_t type, const void* src, float* dst, int64_t n);

// Bytes of one row of n elements (n a multiple of the block size).
size_t row_bytes(uint32_t type, int64_t n);

// For t in [0, n_tokens), r in [0, n_rows):
//   y[t * ldy + r] = sum_i x[t * ldx + i] * W_r[i]
// W: n_rows rows of k elements of `type`, row r at (const char*)W + r * row_bytes(type, k).
// Accumulates in f32. For quantized weights the activations are rounded to 8 bits per block for
// integer dot products, as llama.cpp does, unless f32_activations (slower; exact to f32
// rounding, for accuracy checks). Uses every thread of the pool. k must be a multiple of the
// block size. Batch-invariant: token t's result does not depend on the other tokens.
void matmul(ThreadPool& pool, uint32_t type, const void* W, int64_t n_rows, int64_t k,
            const float* x, int64_t ldx, int64_t n_tokens, float* y, int64_t ldy,
            bool f32_activations = false);

// One matmul's arguments, as above.
struct MatmulCall {
    uint32_t type;
    const void* W;
    int64_t n_rows, k;
    const float* x;
    int64_t ldx, n_tokens;
    float* y;
    int64_t ldy;
};
// Several independent matmuls as one parallel loop, each giving exactly what matmul gives: one
// hand-off of the thread pool for all the experts of a step instead of one per matrix.
// caller_first: see ThreadPool::run (run once, on the calling thread, while the workers start).
void matmul_many(ThreadPool& pool, const std::vector<MatmulCall>& calls, bool f32_activations = false,
                 const std::function<void()>* caller_first = nullptr);

}  // namespace glmoe
