// Float-weight matrix x many tokens in exact f32 (SIMT FMA, no tensor cores): the MoE router at
// prefill, whose expert choice must match the CPU engine's f32 scores (bf16 tensor-core inputs
// could flip near-tied experts). Tiles of 32 tokens x 32 rows x 32 columns in shared memory;
// each thread owns 2 tokens x 4 rows. Small next to the rest of a prefill (the router has ~128
// rows), but it replaces ceil(n / 8) matrix-vector launches per layer.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "ggml_types.h"
#include "kernels.h"

namespace glmoe::cuda {
namespace {

constexpr int kTileTok = 32, kTileRows = 32, kTileK = 32, kThreads = 128;

__global__ void __launch_bounds__(kThreads) mm_float_kernel(const uint8_t* w, uint32_t type, size_t row_bytes,
                                                            int64_t rows, int64_t cols, const float* x, int64_t n,
                                                            float* y, int64_t y_stride, bool accumulate) {
    __shared__ float xs[kTileTok][kTileK + 1];
    __shared__ float ws[kTileRows][kTileK + 1];
    pdl_enter();
    const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTileTok, r0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
    const int tid = threadIdx.x, tr = tid % 8, tt = tid / 8;  // rows 4 tr.., tokens 2 tt..
    float acc[2][4] = {};
    for (int64_t k0 = 0; k0 < cols; k0 += kTileK) {
        // 32 x 32 values per tile, 8 per thread, consecutive threads along k (coalesced).
        for (int i = tid; i < kTileTok * kTileK; i += kThreads) {
            const int r = i / kTileK, k = i % kTileK;
            const int64_t c = k0 + k;
            const int64_t t = t0 + r, row = r0 + r;
            xs[r][k] = (t < n && c < cols) ? x[t * cols + c] : 0.0f;
            ws[r][k] = (row < rows && c < cols) ? float_weight(type, w + row * row_bytes, c) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < kTileK; ++k) {
            const float x0 = xs[2 * tt][k], x1 = xs[2 * tt + 1][k];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float wv = ws[4 * tr + j][k];
                acc[0][j] = fmaf(wv, x0, acc[0][j]);
                acc[1][j] = fmaf(wv, x1, acc[1][j]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int64_t t = t0 + 2 * tt + i, row = r0 + 4 * tr + j;
            if (t >= n || row >= rows) continue;
            float* dst = y + t * y_stride + row;
            *dst = accumulate ? *dst + acc[i][j] : acc[i][j];
        }
}

}  // namespace

void mm_float(const WeightView& w, const float* x, int64_t n, float* y, int64_t y_stride, bool accumulate,
              cudaStream_t s) {
    if (w.type != GGML_TYPE_F32 && w.type != GGML_TYPE_F16 && w.type != GGML_TYPE_BF16)
        throw std::invalid_argument(std::string("mm_float: weight type ") + type_name(w.type) + " is not a float type");
    if (!w.data || !x || !y || n < 1 || w.rows < 1 || w.cols < 1 || y_stride < w.rows)
        throw std::invalid_argument("mm_float: bad arguments");
    if (w.row_bytes != static_cast<size_t>(w.cols) * (w.type == GGML_TYPE_F32 ? 4 : 2))
        throw std::invalid_argument("mm_float: row_bytes does not match the type and cols");
    const dim3 grid(static_cast<unsigned>((n + kTileTok - 1) / kTileTok),
                    static_cast<unsigned>((w.rows + kTileRows - 1) / kTileRows));
    if (grid.y > 65535) throw std::invalid_argument("mm_float: too many rows");
    launch_kernel(mm_float_kernel, grid, dim3(kThreads), 0, s, static_cast<const uint8_t*>(w.data), w.type,
                  w.row_bytes, w.rows, w.cols, x, n, y, y_stride, accumulate);
    check_launch("mm_float");
}

}  // namespace glmoe::cuda
