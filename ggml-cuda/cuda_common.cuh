// Small device helpers shared by the CUDA kernels: warp/block reductions and scans, exact
// half/bf16 bit conversions. Block helpers require blockDim.x to be a multiple of 32 (<= 1024)
// and every thread of the block to call them; their fixed reduction trees make results
// deterministic (no atomics on floats).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <utility>

#include "ggml_types.h"

namespace glmoe::cuda {

// ---- programmatic dependent launch -----------------------------------------------------------
// Kernels captured into a CUDA graph (decode steps) are launched with programmatic stream
// serialization: the next kernel starts while this one drains, runs what needs no input of this
// one (prefetching weights), and calls pdl_wait() before it reads or writes any activation. Each
// kernel calls pdl_wait() in every block before it exits, so a kernel's completion implies its
// predecessors' (reads of outputs two kernels back stay ordered). Measured on an H100 (Air-shaped
// file): decode +1.8-5.0% with it; eager prefill launches -1.6-5.8%, so those launch plainly.
// GLMOE_PDL=0 turns it off (for bisecting).
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
// Lets the next kernel launch once every block of this one has passed this point.
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
// The start of a kernel with nothing to do before its inputs are ready.
__device__ __forceinline__ void pdl_enter() {
    pdl_wait();
    pdl_trigger();
}

inline bool pdl_enabled() {
    static const bool on = [] {
        const char* e = std::getenv("GLMOE_PDL");
        return !(e && e[0] == '0');
    }();
    return on;
}

inline bool pdl_for(cudaStream_t stream) {
    if (!pdl_enabled()) return false;
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return status == cudaStreamCaptureStatusActive;
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = pdl_for(stream) ? 1 : 0;
    // Errors surface through cudaGetLastError in the caller's check_launch.
    (void)cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

constexpr unsigned kFullMask = 0xFFFFFFFFu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
}

// Inclusive prefix sum over the lanes of a full warp.
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T n = __shfl_up_sync(kFullMask, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 T in shared memory and
// may be reused right after the call returns.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = lane < n_warps ? scratch[lane] : T(0);
    return warp_sum(r);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < n_warps ? scratch[lane] : -INFINITY;
    return warp_max(r);
}

// Exclusive prefix sum over threads in threadIdx order; `total` gets the block's sum.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* scratch, T& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const T incl = warp_inclusive_scan(v);
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    T w = lane < n_warps ? scratch[lane] : T(0);
    const T w_incl = warp_inclusive_scan(w);
    // Exclusive values are shifted inclusive ones (not incl - v), so that for floating point
    // types a thread's start is exactly its predecessor's running sum within a warp.
    const T w_before = __shfl_sync(kFullMask, w_incl, warp > 0 ? warp - 1 : 0);
    const T lane_before = __shfl_up_sync(kFullMask, incl, 1);
    total = __shfl_sync(kFullMask, w_incl, 31);
    return (warp > 0 ? w_before : T(0)) + (lane > 0 ? lane_before : T(0));
}

// Exact IEEE half -> float from the raw bits (keeps NaN payloads, handles subnormals), so that
// dequantized values match the CPU / numpy bit for bit.
__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {
            // Subnormal: normalise so that the leading one becomes the implicit bit.
            const int lz = __clz(mant) - 21;  // shifts to bring bit 10 up
            bits = sign | (static_cast<uint32_t>(113 - lz) << 23) | (((mant << lz) & 0x3FFu) << 13);
        }
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    return __uint_as_float(bits);
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) {
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// Element idx of a row of F32, F16 or BF16 weights, exactly.
__device__ __forceinline__ float float_weight(uint32_t type, const uint8_t* row, int64_t idx) {
    if (type == GGML_TYPE_F32) return reinterpret_cast<const float*>(row)[idx];
    const uint16_t h = reinterpret_cast<const uint16_t*>(row)[idx];
    return type == GGML_TYPE_F16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
}

}  // namespace glmoe::cuda
