// An inference context: a model, its KV cache and the scratch space of the CPU forward.
// decode() runs one batch whose tokens may belong to different sequences at different
// positions (prompt chunks and decode steps together), as continuous batching needs.
#pragma once
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#include "attention.h"
#include "gpu_forward.h"
#include "kv_cache.h"
#include "model.h"
#include "placement.h"
#include "step_cost.h"
#include "thread_pool.h"

namespace glmoe {

struct ContextParams {
    int n_ctx = 4096;
    int n_threads = 0;  // 0: every hardware thread
    bool embeddings = false;  // decode() returns final hidden states (after output_norm), not logits
    bool f32_activations = false;  // no 8-bit rounding of activations (see matmul): for accuracy checks
    int n_gpu_layers = 0;   // as llama.cpp's -ngl: the last N layers on the GPU; < 0 or > n_layer: all + output
    int n_ubatch = 512;     // tokens per GPU forward (a bigger batch runs as several)
    // -ot/--override-tensor, --cpu-moe, --n-cpu-moe entries, in order (placement.h).
    std::vector<TensorOverride> tensor_overrides;
};

// Sampling done on the GPU at the end of a step (see GpuStepOutput): greedy when temperature <= 0.
struct DeviceSampling {
    float temperature = 0.0f;
    int top_k = 0;
    float top_p = 1.0f;
    float min_p = 0.0f;
};

struct Batch {
    std::vector<int32_t> token;
    std::vector<int32_t> pos;
    std::vector<int32_t> seq;
    std::vector<uint8_t> want_logits;  // 1: return this token's logits
    size_t size() const { return token.size(); }
};

class Context {
public:
    Context(const Model& model, const ContextParams& params);

    // Runs the batch and stores the logits of the flagged tokens, in batch order, n_vocab each
    // (or, for an embeddings context, their final hidden states, n_embd each).
    // Throws std::invalid_argument for a bad batch and KVCacheFull when it does not fit; in both
    // cases the cache is unchanged.
    void decode(const Batch& batch, std::vector<float>& logits);
    // Like decode, but samples a token for each flagged row on the GPU and returns only the ids
    // (u: one uniform draw per flagged row, ignored when greedy). Needs samples_on_gpu().
    void decode_sample(const Batch& batch, const DeviceSampling& sampling, const std::vector<float>& u,
                       std::vector<int32_t>& ids);
    bool samples_on_gpu() const { return gpu_ && gpu_->has_output() && !embeddings_; }
    int n_gpu_layers() const { return gpu_ ? gpu_->n_layers() : 0; }
    // Largest step whose per-token outputs do not depend on what else is in it (the CPU engine's
    // never do): speculative drafts verified within it leave greedy output unchanged.
    int invariant_batch() const { return gpu_ ? GpuForward::kInvariantBatch : std::numeric_limits<int>::max(); }
    const GpuForward* gpu() const { return gpu_.get(); }
    // Wall time of the steps run so far, by size: what a bigger (drafted) step costs.
    const StepCostModel& step_costs() const { return step_costs_; }

    KVCache& kv_cache() { return kv_; }
    const Model& model() const { return model_; }
    int n_threads() const { return pool_.size(); }
    bool embeddings() const { return embeddings_; }
    // Tokens run through the model since creation (shows what prefix reuse saved).
    uint64_t n_evaluated() const { return n_evaluated_; }
    int64_t n_outputs_per_token() const;

private:
    void check_batch(const Batch& batch) const;
    // Allocates the batch's KV cells, runs `forward` on them and counts the tokens; on an
    // exception the cells are released again, so a failed batch leaves the cache unchanged.
    void run_allocated(const Batch& batch, const std::function<void(const std::vector<int32_t>&)>& forward);
    // Runs the batch's tokens through layers [first_layer, n_layer) on the CPU; with first_layer 0
    // it starts from the token embeddings, otherwise from the hidden states already in x_.
    void cpu_layers(const Batch& batch, const std::vector<int32_t>& cells, int first_layer);
    // Final norm (and output head) of x_ rows `rows` into out.
    void cpu_output(const std::vector<int64_t>& rows, float* out);
    // The GPU path of decode/decode_sample, a micro-batch at a time.
    void gpu_decode(const Batch& batch, const std::vector<int32_t>& cells, GpuStepOutput& proto, float* logits,
                    int32_t* ids, const std::vector<float>* u);
    void attention(int il, const Batch& batch, const std::vector<int32_t>& cells);
    void ffn_dense(int il, int64_t n);
    void ffn_moe(int il, int64_t n);
    // out[n][H] = down(silu(gate in) * up in), with matrix `index` of stacked (expert) weights.
    void swiglu_ffn(const Weight& gate, const Weight& up, const Weight& down, int64_t index,
                    const float* in, int64_t n, float* out);

    const Model& model_;
    std::unique_ptr<GpuForward> gpu_;  // null: everything on the CPU
    int n_ubatch_;
    ThreadPool pool_;
    KVCache kv_;
    bool embeddings_;
    bool f32_activations_;
    uint64_t n_evaluated_ = 0;
    StepCostModel step_costs_;

    // Scratch, sized for the largest batch seen.
    std::vector<float> x_, h_, q_, k_, v_, attn_, ffn_out_;
    std::vector<float> rope_cos_, rope_sin_;          // [n][n_rot/2]
    std::vector<std::vector<int32_t>> seq_cells_;     // cells of each sequence in the batch
    AttentionPlan attn_plan_;                         // which cells each token sees
    std::vector<float> router_, ffn_in_, gate_, up_, down_;
};

}  // namespace glmoe
