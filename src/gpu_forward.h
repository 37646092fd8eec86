// The GPU part of the forward pass (ggml-cuda/gpu_forward.cu): token embeddings and the first
// n_gpu_layers layers run on the GPU, with the output head too when every layer is there
// (llama.cpp counts the output as one more layer: -ngl 99 puts everything on the GPU). Weights are
// uploaded once, at construction; the KV cache of the GPU layers lives on the GPU (f16) while
// the cell bookkeeping stays in the host KVCache. A decode step of a few tokens is captured as a
// CUDA graph and replayed; inside a step the only device-to-host traffic is its result.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv_cache.h"
#include "model.h"

namespace glmoe {

// Not enough GPU memory, or no usable GPU: raised before anything is allocated on the device.
struct GpuError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct GpuParams {
    int n_gpu_layers = 0;  // < 0 or > n_layer: every layer and the output head
    int n_ctx = 0;
    int n_ubatch = 512;    // tokens per forward on the GPU (bigger batches are split)
    bool embeddings = false;
};

// What a step hands back. Exactly one of the three kinds.
struct GpuStepOutput {
    enum class Kind { hidden, logits, token_ids } kind = Kind::logits;
    // hidden: every token's hidden state after the GPU layers, [n][n_embd] (CPU layers follow).
    // logits: rows `rows` (batch indices) of the logits, [rows][n_vocab] (embeddings context:
    //         the final normed hidden states, [rows][n_embd]).
    // token_ids: a sampled token per row of `rows`.
    std::vector<int32_t> rows;
    float* out_f32 = nullptr;      // host, sized by the caller
    int32_t* out_ids = nullptr;    // host
    // Sampling (token_ids): greedy when temperature <= 0; u[i] is row i's uniform draw.
    float temperature = 0.0f, top_p = 1.0f, min_p = 0.0f;
    int top_k = 0;
    const float* u = nullptr;
};

struct GpuCounters {
    uint64_t steps = 0;
    uint64_t graph_replays = 0;
    uint64_t graph_captures = 0;
    uint64_t device_to_host_copies = 0;  // every cudaMemcpy toward the host, by the forward
    uint64_t host_syncs = 0;             // every wait of the host on the device, by the forward
};

class GpuForward {
public:
    // Throws GpuError when there is no GPU or the weights, cache and buffers do not fit.
    GpuForward(const Model& model, const GpuParams& params);
    ~GpuForward();
    GpuForward(const GpuForward&) = delete;
    GpuForward& operator=(const GpuForward&) = delete;

    // Why the GPU backend cannot run this model ("" when it can), e.g. an unsupported head size.
    static std::string unsupported(const Model& model);

    // Steps of up to this many tokens run the matrix-vector and decode-attention kernels, which
    // give each token bitwise the same result whatever else is in the step; bigger steps use the
    // tensor-core kernels (bf16 inputs), whose results differ slightly from those.
    static constexpr int kInvariantBatch = 8;

    int n_layers() const;       // layers on the GPU
    bool has_output() const;    // the output head too
    size_t device_bytes() const;

    // Runs tokens [0, n) of a batch whose cells the host KVCache has already allocated
    // (`cells`), through the GPU layers. `kv` is read for each sequence's cells.
    void run(const int32_t* token, const int32_t* pos, const int32_t* seq, const int32_t* cells, int n,
             const KVCache& kv, GpuStepOutput& out);

    const GpuCounters& counters() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Layers that n_gpu_layers puts on the GPU, and whether the output head goes too.
int gpu_layer_count(int n_gpu_layers, int n_layer);
bool gpu_has_output(int n_gpu_layers, int n_layer);

}  // namespace glmoe
