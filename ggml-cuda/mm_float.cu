// Float-weight matrix x many tokens in exact f32 (SIMT FMA, no tensor cores): the MoE router at
// prefill, whose expert choice must match the CPU engine's f32 scores (bf16 tensor-core inputs
// could flip near-tied experts), and every product of the f32-activation mode. A block owns 32
// tokens x 32 rows; its 8 warps each take one contiguous eighth of the columns (the router has
// only 4 row tiles, so a block's time is the length of its column walk, a chain of load
// latencies), then the 8 partial tiles are summed in warp order. The split depends on cols
// alone, so a token's result does not depend on the batch it came in.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "ggml_types.h"
#include "kernels.h"

namespace glmoe::cuda {
namespace {

constexpr int kTileTok = 32, kTileRows = 32, kTileK = 8, kWarps = 8, kThreads = 32 * kWarps;
constexpr int kPerLane = kTileTok * kTileK / 32;  // values of each tile a lane loads per step
static_assert(kTileTok == kTileRows, "a lane loads the same positions of the x and w tiles");

template <uint32_t kType>
__global__ void __launch_bounds__(kThreads, 2) mm_float_kernel(const uint8_t* w, size_t row_bytes,
                                                            int64_t rows, int64_t cols, const float* x, int64_t n,
                                                            float* y, int64_t y_stride, bool accumulate) {
    // Per warp an x and a w tile; after the column walk the same bytes hold the partial sums.
    constexpr int kTileFloats = kTileTok * (kTileK + 1), kPartFloats = kTileTok * (kTileRows + 1);
    __shared__ float smem[kWarps * std::max(2 * kTileFloats, kPartFloats)];
    pdl_enter();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tt = lane / 4, tr = lane % 4;  // outputs: tokens 4 tt .. 4 tt + 3, rows 8 tr .. 8 tr + 7
    const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTileTok, r0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
    const int64_t slice = ((cols + kWarps - 1) / kWarps + kTileK - 1) / kTileK * kTileK;
    const int64_t k_begin = warp * slice, k_end = std::min<int64_t>(cols, k_begin + slice);
    float(*xs)[kTileK + 1] = reinterpret_cast<float(*)[kTileK + 1]>(smem + warp * 2 * kTileFloats);
    float(*ws)[kTileK + 1] = reinterpret_cast<float(*)[kTileK + 1]>(smem + warp * 2 * kTileFloats + kTileFloats);

    // The next step's values are loaded into registers while the current step computes.
    float px[kPerLane], pw[kPerLane];
    // Lane l loads column k0 + l % kTileK of tile rows l / kTileK + kRowStep j.
    static_assert(32 % kTileK == 0, "a lane keeps its column");
    constexpr int kRowStep = 32 / kTileK;
    const int r_first = lane / kTileK;
    const float* x_first = x + (t0 + r_first) * cols + lane % kTileK;
    const uint8_t* w_first = w + (r0 + r_first) * row_bytes;
    auto fetch = [&](int64_t k0) {
        const int64_t c = k0 + lane % kTileK;
        const bool in_cols = c < k_end;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
            const int r = r_first + kRowStep * j;
            px[j] = (in_cols && t0 + r < n) ? x_first[static_cast<int64_t>(kRowStep * j) * cols + k0] : 0.0f;
            pw[j] = (in_cols && r0 + r < rows)
                        ? float_weight(kType, w_first + static_cast<int64_t>(kRowStep * j) * row_bytes, c) : 0.0f;
        }
    };
    float acc[4][8] = {};
    if (k_begin < k_end) fetch(k_begin);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
            const int i = lane + 32 * j;
            xs[i / kTileK][i % kTileK] = px[j];
            ws[i / kTileK][i % kTileK] = pw[j];
        }
        __syncwarp();
        if (k0 + kTileK < k_end) fetch(k0 + kTileK);
#pragma unroll
        for (int k = 0; k < kTileK; ++k) {
            float xv[4], wv[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) xv[i] = xs[4 * tt + i][k];
#pragma unroll
            for (int j = 0; j < 8; ++j) wv[j] = ws[8 * tr + j][k];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(wv[j], xv[i], acc[i][j]);
        }
        __syncwarp();
    }

    __syncthreads();  // every warp is done with its tiles
    float* part = smem + warp * kPartFloats;  // [token][row], rows padded to 33
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) part[(4 * tt + i) * (kTileRows + 1) + 8 * tr + j] = acc[i][j];
    __syncthreads();
    for (int o = threadIdx.x; o < kTileTok * kTileRows; o += kThreads) {
        const int tok = o / kTileRows, r = o % kTileRows;
        const int64_t t = t0 + tok, row = r0 + r;
        if (t >= n || row >= rows) continue;
        float v = 0.0f;
#pragma unroll
        for (int q = 0; q < kWarps; ++q) v += smem[q * kPartFloats + tok * (kTileRows + 1) + r];
        float* dst = y + t * y_stride + row;
        *dst = accumulate ? *dst + v : v;
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
    auto kernel = w.type == GGML_TYPE_F32 ? mm_float_kernel<GGML_TYPE_F32>
                : w.type == GGML_TYPE_F16 ? mm_float_kernel<GGML_TYPE_F16> : mm_float_kernel<GGML_TYPE_BF16>;
    launch_kernel(kernel, grid, dim3(kThreads), 0, s, static_cast<const uint8_t*>(w.data), w.row_bytes, w.rows, w.cols,
                  x, n, y, y_stride, accumulate);
    check_launch("mm_float");
}

}  // namespace glmoe::cuda
