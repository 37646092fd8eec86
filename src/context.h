// An inference context: a model placed on its devices, its KV cache and the backends that run the
// forward (glm4moe.cpp). decode() runs one batch whose tokens may belong to different sequences
// at different positions (prompt chunks and decode steps together), as continuous batching needs.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "cpu_backend.h"
#include "cuda_backend.h"
#include "kv_cache.h"
#include "kv_types.h"
#include "model.h"
#include "placed_kv_rows.h"
#include "placement.h"
#include "step_cost.h"
#include "thread_pool.h"

namespace glmoe {

struct ContextParams {
    int n_ctx = 4096;
    int n_threads = 0;  // 0 or -1: every hardware thread; else 1..kMaxThreads (more is refused)
    bool embeddings = false;  // decode() returns final hidden states (after output_norm), not logits
    bool f32_activations = false;  // no 8-bit rounding of activations (see matmul): for accuracy checks
    int n_gpu_layers = 0;   // as llama.cpp's -ngl (placement.h): the output head first, then blocks from the last; < 0: all
    int n_ubatch = 512;     // tokens per GPU forward (a bigger batch runs as several)
    // -ot/--override-tensor, --cpu-moe, --n-cpu-moe entries, in order (placement.h).
    std::vector<TensorOverride> tensor_overrides;
    // GpuParams::expert_borrow_min_tokens (0: the default).
    int expert_borrow_min_tokens = 0;
    // Of each smaller step's routed experts in RAM (router on the GPU), the fraction the GPU runs,
    // copying them over PCIe from pinned memory while the CPU runs the rest (expert_split.h). Also
    // the fraction of each layer's experts copied into pinned memory where the model's own pages
    // cannot be pinned. < 0: the default; 0: the CPU runs them all.
    double gpu_expert_share = -1;
    // Tests without a GPU: the GPU's share of the placement runs on a second CPU backend, so that
    // every crossing between devices is exercised (with the CPU's kernels on both sides).
    bool cpu_as_gpu = false;
    // KV cache element types (GGML ids, as llama.cpp's -ctk/-ctv; kv_types.h). kKVTypeDefault:
    // f32 on the CPU, f16 on the GPU. Layers with attention on the GPU take only f16 for now.
    int type_k = kKVTypeDefault;
    int type_v = kKVTypeDefault;
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
    ~Context();

    // Runs the batch and stores the logits of the flagged tokens, in batch order, n_vocab each
    // (or, for an embeddings context, their final hidden states, n_embd each).
    // Throws std::invalid_argument for a bad batch and KVCacheFull when it does not fit; in both
    // cases the cache is unchanged.
    void decode(const Batch& batch, std::vector<float>& logits);
    // Like decode, but samples a token for each flagged row on the GPU and returns only the ids
    // (u: one uniform draw per flagged row, ignored when greedy). Needs samples_on_gpu().
    void decode_sample(const Batch& batch, const DeviceSampling& sampling, const std::vector<float>& u,
                       std::vector<int32_t>& ids);
    bool samples_on_gpu() const { return gpu_ && placement_.output == Device::gpu && !embeddings_; }
    // The flagged rows with params in `rows` (one per flagged row) are sampled on the GPU, each with
    // its own parameters and draw (RowSampling), and only their ids, logprobs (the chosen token's
    // log-softmax under the raw logits) and top logprobs (n_top of kMaxSampledTop slots per row)
    // come back; the rows without params bring their logits into host_logits, in row order. The GPU
    // keeps each sequence's history for the penalties, uploading only what changed. Needs
    // samples_on_gpu(); every row with params must pass samples_row_on_gpu().
    struct SampledRows {
        std::vector<int32_t> ids;       // -1: every logit was -inf, nothing could be sampled
        std::vector<float> logprobs;
        std::vector<SampledTop> top;    // rows x kMaxSampledTop
        std::vector<float> host_logits; // rows without params x n_vocab
        // n_rows rows not sampled yet, with room for host_logit_floats of host logits (sized
        // only: the step writes them all).
        void reset(size_t n_rows, size_t host_logit_floats) {
            ids.assign(n_rows, -1);
            logprobs.assign(n_rows, 0.0f);
            top.assign(n_rows * kMaxSampledTop, SampledTop{-1, 0.0f});
            host_logits.resize(host_logit_floats);
        }
    };
    void decode_sample_rows(const Batch& batch, const std::vector<RowSampling>& rows, SampledRows& out);
    // Overlapped decoding, when the whole model is on the GPU (overlaps()): begin_sampled enqueues
    // a decode_sample_rows step and returns without waiting for it; end_sampled waits for the
    // oldest step begun so and hands over its rows (host_logits stays empty). Meanwhile the host
    // begins the next step, whose tokens may be sampled_token(r) (backend.h): the token that the
    // step begun just before samples in its row r, so that the GPU never waits for the host
    // between steps. Every row samples on the GPU without penalties (the history they read is the
    // host's, a step behind). At most CudaBackend::kMaxDeferredSteps steps are pending; the other
    // decode calls need none pending. A begin that throws leaves the cache unchanged.
    bool overlaps() const;
    void begin_sampled(const Batch& batch, const std::vector<RowSampling>& rows);
    void end_sampled(SampledRows& out);
    int n_pending() const { return static_cast<int>(pending_rows_.size()); }
    // Whether the GPU's chain takes these parameters: typical_p needs few enough candidates, and
    // the logit bias is bounded (the rest stays on the host's Sampler).
    bool samples_row_on_gpu(const SamplingParams& p) const;
    // Layers whose attention (and KV cache) is on the GPU.
    int n_gpu_layers() const { return placement_.n_layers_with_attn_on(Device::gpu); }
    // Largest step whose per-token outputs do not depend on what else is in it (the CPU engine's
    // never do): speculative drafts verified within it leave greedy output unchanged.
    int invariant_batch() const;
    const CudaBackend* gpu() const { return gpu_.get(); }
    const Placement& placement() const { return placement_; }
    // What went where, in llama.cpp's words: offloaded layers and the buffer sizes per device.
    std::string placement_summary() const;
    // The KV cache's element types by name ("q8_0"; "f32/f16" when the CPU's layers and the GPU's
    // store different ones) and its bytes on every device together.
    std::string kv_type_k_name() const;
    std::string kv_type_v_name() const;
    size_t kv_bytes() const;
    // Wall time of the steps run so far, by size: what a bigger (drafted) step costs.
    const StepCostModel& step_costs() const { return step_costs_; }

    KVCache& kv_cache() { return kv_; }
    // The KV cache (cells and their K/V rows) as bytes, and back, every layer's rows from the
    // backend that runs its attention (PlacedKVRows: the same bytes whatever the placement).
    std::vector<uint8_t> kv_save();
    void kv_load(const std::vector<uint8_t>& bytes);
    // One sequence's part of them (KVCache::save_seq / load_seq).
    std::vector<uint8_t> kv_seq_save(int seq);
    int kv_seq_load(int seq, const std::vector<uint8_t>& bytes, int max_cells);
    // Why a state cannot be saved or loaded here ("" when it can): the CPU's and the GPU's layers
    // store different KV types (a state holds one K and one V type).
    std::string kv_state_unsupported() const;
    const Model& model() const { return model_; }
    int n_threads() const { return pool_.size(); }
    bool embeddings() const { return embeddings_; }
    // Tokens run through the model since creation (shows what prefix reuse saved).
    uint64_t n_evaluated() const { return n_evaluated_; }
    int64_t n_outputs_per_token() const;

private:
    // Tokens sampled_token(r) are allowed for r < rows_from_device (else every token is an id).
    void check_batch(const Batch& batch, int rows_from_device = 0) const;
    PlacedKVRows kv_rows() const;
    void check_none_pending(const char* what) const;
    // The checks of decode_sample_rows' rows; returns how many bring their logits to the host.
    size_t check_row_sampling(const Batch& batch, const std::vector<RowSampling>& rows) const;
    // Allocates the batch's KV cells, runs `forward` on them and counts the tokens; on an
    // exception the cells are released again, so a failed batch leaves the cache unchanged.
    // `timed`: the forward waits for its results, so its wall time is the step's cost.
    void run_allocated(const Batch& batch, const std::function<void(const std::vector<int32_t>&)>& forward,
                       bool timed = true);
    // The forward over the batch, in micro-batches of n_ubatch tokens when a GPU takes part;
    // `proto` says what to return (rows are filled in per micro-batch).
    void forward(const Batch& batch, const std::vector<int32_t>& cells, const StepOutput& proto);

    const Model& model_;
    bool embeddings_;
    Placement placement_;
    int n_ubatch_;
    ThreadPool pool_;
    KVCache kv_;
    std::unique_ptr<CpuBackend> cpu_;
    std::unique_ptr<CudaBackend> gpu_;         // null: nothing on the GPU
    std::unique_ptr<CpuBackend> cpu_as_gpu_;   // ContextParams::cpu_as_gpu
    uint64_t n_evaluated_ = 0;
    StepCostModel step_costs_;
    std::deque<size_t> pending_rows_;  // rows of each step begun and not yet ended, oldest first
    int last_sampled_rows_ = 0;        // rows the last step sampled on the GPU (0: it sampled none)
};

}  // namespace glmoe
