// The CUDA backend (ggml-cuda/cuda_backend.cu): the ops of backend.h on one Hopper GPU, over the
// weights the placement puts there (uploaded once, in their GGUF types) and an f16 KV cache for
// the layers whose attention runs there. Ops only enqueue work on one stream; a decode step of up
// to kInvariantBatch tokens is captured as CUDA graphs, one per stretch between two crossings to
// the host (one graph for a step that stays on the GPU), and replayed. Inside a step the only
// device-to-host traffic is the result and, in hybrid steps, the activations that cross. A sampled
// step may return before it has run (deferred), so that the host prepares the next one meanwhile.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "backend.h"
#include "ggml_types.h"

namespace glmoe {

class ThreadPool;

// Not enough GPU memory, or no usable GPU: raised before anything is allocated on the device.
struct GpuError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct GpuParams {
    int n_ctx = 0;
    int n_ubatch = 512;  // most tokens of one step (Context splits bigger batches)
    bool embeddings = false;
    bool f32_activations = false;  // matrix products in f32 (dequantized weights): for accuracy checks
    // Routed experts placed in RAM, router on the GPU: steps of at least this many tokens copy the
    // layer's routed experts to the GPU instead of running them on the CPU (0: the backend's
    // default; at least kInvariantBatch + 1).
    int expert_borrow_min_tokens = 0;
    // Smaller steps run up to n of each such layer's experts here (placement.h's
    // gpu_streamed_experts, expert_split.h), copied from pinned host memory: the model's own pages
    // pinned in place where the host allows it (any expert), else a pinned copy of experts [0, n).
    // 0: none.
    int streamed_experts = 0;
    // What the KV rows store (GGML ids): F16, BF16, Q8_0 or Q4_0 (kv_type_supported).
    uint32_t type_k = GGML_TYPE_F16, type_v = GGML_TYPE_F16;
};

struct GpuCounters {
    uint64_t steps = 0;
    uint64_t graph_replays = 0;
    uint64_t graph_captures = 0;
    uint64_t device_to_host_copies = 0;  // every copy toward the host, by the forward
    uint64_t host_syncs = 0;             // every wait of the host on the device, by the forward
};

// Device memory by use, as llama.cpp's load log lists buffer sizes.
struct GpuMemory {
    size_t weights = 0, kv = 0, compute = 0;
    size_t kv_k = 0;  // the K rows' share of kv
    size_t pinned_experts = 0;   // host memory: the pinned copy of streamed experts
    size_t pinned_in_place = 0;  // or: the model's own pages holding them, pinned where they are
};

// The backend's KV rows (KVRows) are in device memory: k()/v() are not available; read_rows and
// write_rows copy a layer's rows through the host (saving and loading a state).
class CudaBackend : public Backend, public KVRows {
public:
    // Steps of up to this many tokens run the matrix-vector and decode-attention kernels, which
    // give each token bitwise the same result whatever else is in the step; bigger steps use the
    // tensor-core kernels (bf16 inputs), whose results differ slightly from those.
    static constexpr int kInvariantBatch = 8;

    // Why the GPU backend cannot run this model ("" when it can), e.g. an unsupported head size.
    static std::string unsupported(const Model& model);
    // Whether the GPU's KV rows can be of this type (F16, Q8_0, Q4_0); true for every type in a
    // build without CUDA, which never makes a CudaBackend.
    static bool kv_type_supported(uint32_t type);
    // Throws GpuError when there is no GPU or the weights, cache and buffers do not fit.
    // The pool's threads copy RAM-placed experts into pinned memory for big steps (from the
    // forward's thread, while the CPU backend is idle).
    static std::unique_ptr<CudaBackend> create(const Model& model, const Placement& placement, const GpuParams& params,
                                               ThreadPool& pool);

    Device device() const override { return Device::gpu; }
    virtual const GpuCounters& counters() const = 0;
    virtual GpuMemory memory() const = 0;
    // Layer il's routed experts this backend can fetch in smaller steps: experts [0, n) (all of
    // them when the model's pages are pinned in place, GpuParams::streamed_experts with a pinned
    // copy; 0 when the layer's experts are not in RAM, or pinned memory could not be had).
    virtual int streamed_experts(int il) const = 0;
    // The rows of the oldest deferred sampled step (StepOutput::deferred), in row order, once it
    // has run: waits for it, then fills n_rows ids, logprobs and n_rows x kMaxSampledTop top
    // entries (where the row asked for them). Two deferred steps may be outstanding.
    virtual void finish_sampled(int32_t* ids, float* logprobs, SampledTop* top) = 0;
    static constexpr int kMaxDeferredSteps = 2;
};

}  // namespace glmoe
