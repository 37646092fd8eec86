// Token sampling on the GPU: one 1024-thread block per row of logits, no sort of the vocabulary.
//
// The chain is the CPU Sampler's (src/sampling.cpp) without bias/penalties/typical_p:
//   greedy (temperature <= 0): argmax, ties to the lowest id;
//   else top_k -> top_p -> min_p -> temperature -> draw with u[row].
// top_k, top_p and min_p each keep a prefix of the "better" order (descending logit, ties by
// ascending id), so the survivors are always {key > T} plus the r lowest-id tokens with key == T,
// where key is the float's order-preserving integer image. T and r are found by MSB-first radix
// selection over the keys (8 bits per pass, 256-bin shared-memory histograms): by count for
// top_k, exactly as the CPU's heap (ties resolved by id, so exactly k survive); by probability
// mass for top_p. Masses for top_p are exp(x - max) in 2^-40 fixed point summed with integer
// atomics, so the cut is deterministic (float atomics would not be); tokens whose fixed-point mass
// is 0 (more than ~27.7 below the max) are left out of top_p's accounting (at most 2e-7 of the
// mass over a 151552 vocabulary, so they can only matter for top_p within that of 1).
// The draw: per-thread sums of the tempered survivors over contiguous id chunks, a block scan,
// then one warp walks the chunk holding u * total in id order. All sums have fixed shapes, so a
// given u always gives the same token.
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "kernels.h"
#include "sample_select.cuh"

namespace glmoe::cuda {

namespace {

__global__ void __launch_bounds__(kThreads) sample_kernel(const float* __restrict__ logits, int n_vocab,
                                                          KernelParams p, const float* __restrict__ u,
                                                          int32_t* __restrict__ out_ids) {
    pdl_enter();
    __shared__ Shared sh;
    const int tid = threadIdx.x;
    const float* row = logits + static_cast<int64_t>(blockIdx.x) * n_vocab;
    const bool vec4 = (n_vocab % 4 == 0) && (reinterpret_cast<uintptr_t>(row) % 16 == 0);
    int chunk = (n_vocab + kThreads - 1) / kThreads;
    chunk = (chunk + 3) & ~3;

    if (p.greedy) {
        const int id = row_argmax(row, n_vocab, chunk, vec4, sh);
        if (tid == 0) out_ids[blockIdx.x] = id;
        return;
    }

    // Max and number of drawable tokens.
    float mx = -INFINITY;
    uint32_t n_valid = 0;
    visit_chunk(row, n_vocab, chunk, vec4, tid, [&](int, float x) {
        if (valid_logit(x)) {
            mx = fmaxf(mx, x);
            ++n_valid;
        }
    });
    mx = block_max(mx, sh.fscratch);
    n_valid = block_sum(n_valid, sh.uscratch);
    if (n_valid == 0) {
        if (tid == 0) out_ids[blockIdx.x] = -1;
        return;
    }
    __syncthreads();
    const int id = draw_radix(row, n_vocab, chunk, vec4, sh, p, mx, n_valid, static_cast<double>(u[blockIdx.x]));
    if (tid == 0) out_ids[blockIdx.x] = id;
}

}  // namespace

void sample_tokens(const float* logits, int n_rows, int n_vocab, const SampleParams& p, const float* u,
                   int32_t* out_ids, cudaStream_t s) {
    auto require = [](bool ok, const std::string& msg) {
        if (!ok) throw std::invalid_argument("sample_tokens: " + msg);
    };
    require(n_rows >= 0, "n_rows must be >= 0");
    require(n_vocab > 0, "n_vocab must be positive");
    require(std::isfinite(p.temperature), "temperature must be finite");
    require(p.top_p >= 0.0f && p.top_p <= 1.0f, "top_p must lie in [0, 1], got " + std::to_string(p.top_p));
    require(p.min_p >= 0.0f && p.min_p <= 1.0f, "min_p must lie in [0, 1], got " + std::to_string(p.min_p));
    if (n_rows == 0) return;
    require(logits && out_ids, "null pointer");
    KernelParams kp{};
    kp.greedy = p.temperature <= 0.0f;
    require(kp.greedy || u, "u is required when sampling (temperature > 0)");
    kp.top_k = p.top_k;
    kp.top_p = p.top_p;
    kp.use_top_p = p.top_p < 1.0f;
    kp.use_min_p = p.min_p > 0.0f;
    // Host-side so that the threshold is the CPU's std::log exactly.
    kp.log_min_p = kp.use_min_p ? std::log(static_cast<double>(p.min_p)) : 0.0;
    kp.inv_temp = kp.greedy ? 1.0 : 1.0 / static_cast<double>(p.temperature);
    launch_kernel(sample_kernel, dim3(n_rows), dim3(kThreads), 0, s, logits, n_vocab, kp, u, out_ids);
    check_launch("sample_tokens");
}

}  // namespace glmoe::cuda
