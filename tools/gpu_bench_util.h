// Helpers of the GPU kernel micro benchmarks (tools/bench_*_gpu.cpp): device buffers, weights of a
// given type and shape, and event timing. Development only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ggml_types.h"
#include "kernels.h"
#include "quants.h"

namespace glmoe::gpu_bench {

inline void ck(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// n zero-filled (or `byte`-filled) elements in device memory; freed by the caller or at exit.
template <typename T>
T* device(size_t n, int byte = 0) {
    T* p = nullptr;
    ck(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    ck(cudaMemset(p, byte, std::max<size_t>(n, 1) * sizeof(T)), "cudaMemset");
    return p;
}

// Weight bytes of a small repeating pattern: the kernels' time does not depend on the values.
// n_matrices back to back, matrix_bytes apart.
inline cuda::WeightView weights(uint32_t type, int64_t rows, int64_t cols, int64_t n_matrices) {
    cuda::WeightView w;
    w.type = type;
    w.rows = rows;
    w.cols = cols;
    w.row_bytes = row_bytes(type, cols);
    w.matrix_bytes = w.row_bytes * rows;
    w.data = device<uint8_t>(w.matrix_bytes * n_matrices + 16, 0x11);
    return w;
}

// llama.cpp's fallback for a row that is not a whole number of the type's blocks (Air's expert
// down matrices: rows of 1408 hold no whole number of 256-element K-quant super-blocks).
inline uint32_t fitting(uint32_t type, int64_t cols) {
    if (cols % type_traits(type).block_size == 0) return type;
    return type == GGML_TYPE_Q6_K ? GGML_TYPE_Q8_0 : GGML_TYPE_Q5_0;
}

inline uint32_t type_by_name(const std::string& name) {
    for (uint32_t t = 0; t < 64; ++t)
        if (type_traits(t).supported && name == type_name(t)) return t;
    throw std::invalid_argument("unknown type " + name);
}

// Median microseconds of `reps` runs of fn (after one warm-up run), timed with events.
inline double time_us(const std::function<void()>& fn, int reps = 20) {
    cudaEvent_t a, b;
    ck(cudaEventCreate(&a), "event");
    ck(cudaEventCreate(&b), "event");
    fn();
    ck(cudaDeviceSynchronize(), "warm-up");
    std::vector<float> ms(reps);
    for (int i = 0; i < reps; ++i) {
        ck(cudaEventRecord(a), "record");
        fn();
        ck(cudaEventRecord(b), "record");
        ck(cudaEventSynchronize(b), "sync");
        ck(cudaEventElapsedTime(&ms[i], a, b), "elapsed");
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    std::nth_element(ms.begin(), ms.begin() + reps / 2, ms.end());
    return 1000.0 * ms[reps / 2];
}

}  // namespace glmoe::gpu_bench
