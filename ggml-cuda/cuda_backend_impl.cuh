// Internal to the CUDA backend (cuda_backend.cu: construction, step, graphs, crossings, output;
// cuda_backend_ops.cu: the layer's ops): the implementation class and its helpers.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_backend.h"
#include "expert_stager.cuh"
#include "expert_streamer.cuh"
#include "ggml_types.h"
#include "kernels.h"
#include "sample_history.h"

namespace glmoe {

using namespace cuda;

namespace cuda_impl {

inline void ck(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw GpuError(std::string(what) + ": " + cudaGetErrorString(e));
}

static_assert(CudaBackend::kInvariantBatch == kMaxMmvTokens, "the batch-invariant step is the matrix-vector one");
constexpr int kDecodeGroup = 64;  // most tokens one attention_decode launch takes
constexpr int kPrefillRun = 9;    // a sequence run this long uses the prefill attention kernel
constexpr int kLogitRows = 32;    // output-head rows per pass (bounds the logits buffer)
// Few, long rows (GLM's attention output 12288 -> 4096 and dense down 10944 -> 4096) past the
// matrix-vector passes (cuda_backend_ops.cu: up to 32 tokens) and up to kMaxSplitTokens tokens run
// as mm over kSplitSlices column slices (mm_split): plain mm gives them 32 blocks, a quarter of an
// H100. bench_moe_gpu (H100, attention output, us): 64 tokens mm 337, split-8 74; 4 and 16 slices
// slower than 8.
constexpr int kMaxSplitTokens = 64;
constexpr int kSplitSlices = 8;
constexpr int64_t kSplitMinCols = 8192;

// Device memory is laid out twice: a dry pass that only counts bytes (to refuse a model that
// does not fit before touching the device), then the real pass that places and uploads.
class Arena {
public:
    explicit Arena(uint8_t* base) : base_(base) {}
    void* reserve(size_t bytes) {
        const size_t off = (used_ + 255) & ~size_t{255};
        used_ = off + bytes;
        return base_ ? base_ + off : nullptr;
    }
    template <typename T>
    T* array(size_t n) {
        return static_cast<T*>(reserve(n * sizeof(T)));
    }
    // Uploads the pieces back to back (e.g. q, k and v weights as one matrix).
    void* put(std::initializer_list<std::pair<const void*, size_t>> pieces) {
        size_t total = 0;
        for (const auto& p : pieces) total += p.second;
        weights_ += total;
        uint8_t* dst = static_cast<uint8_t*>(reserve(total));
        if (!dst) return nullptr;
        for (const auto& p : pieces) {
            ck(cudaMemcpy(dst, p.first, p.second, cudaMemcpyHostToDevice), "uploading weights");
            dst += p.second;
        }
        return dst - total;
    }
    const float* put_floats(const std::vector<float>& v) {
        if (v.empty()) return nullptr;
        return static_cast<const float*>(put({{v.data(), v.size() * sizeof(float)}}));
    }
    size_t used() const { return used_; }
    size_t weights() const { return weights_; }

private:
    uint8_t* base_;
    size_t used_ = 0, weights_ = 0;
};

inline WeightView view_of(const Weight& w, const void* dev, int64_t rows) {
    WeightView v;
    v.data = dev;
    v.type = w.type;
    v.rows = rows;
    v.cols = w.ne[0];
    v.row_bytes = w.row_bytes;
    v.matrix_bytes = w.matrix_bytes;
    return v;
}

inline size_t stack_bytes(const Weight& w) { return w.matrix_bytes * static_cast<size_t>(w.ne[2]); }

inline WeightView upload_weight(Arena& a, const Weight& w) { return view_of(w, a.put({{w.data, stack_bytes(w)}}), w.ne[1]); }

inline bool wants_q8(const ExpertSet& s) {
    return (s.routed && mmv_wants_q8(s.routed.type)) || (s.shared && mmv_wants_q8(s.shared.type));
}

inline ExpertSet single(const WeightView& w) {
    ExpertSet s;
    s.routed = w;
    s.n_routed = 1;
    return s;
}

struct QKVPart {
    WeightView w;
    int64_t col;  // first output column in the qkv row
};

// One layer's weights and cache on the GPU: only the parts the placement puts here.
struct DevLayer {
    bool attn = false, ffn = false, experts = false, shared = false;
    // Attention.
    const float *qkv_bias = nullptr, *q_norm = nullptr, *k_norm = nullptr;
    std::vector<QKVPart> qkv;
    WeightView wo;
    void *k_cache = nullptr, *v_cache = nullptr;  // rows of GpuParams::type_k / type_v
    int64_t k_row_bytes = 0, v_row_bytes = 0;
    int n_head = 0, n_head_kv = 0;
    // FFN side: router and dense FFN.
    const float* probs_bias = nullptr;
    WeightView router;
    bool moe = false;
    ExpertSet dense_gate, dense_up, dense_down;
    // Experts: routed ones here (experts) or borrowed from RAM for a big step (borrows: router and
    // shared expert here, routed experts in RAM). The shared expert runs fused into them as expert
    // n_expert when they run here and it is as wide (fusible), else on its own (sh_*).
    ExpertSet gate, up, down;
    ExpertSet sh_gate, sh_up, sh_down;
    bool fusible = false, borrows = false;
    int n_used = 0, ff = 0;
};

// Pinned host buffers for the activations that cross to and from the host.
struct HostActs {
    float *x = nullptr, *h = nullptr, *route_w = nullptr, *moe_out = nullptr;
    int32_t* route_ids = nullptr;
};

}  // namespace cuda_impl

using namespace cuda_impl;

class CudaBackendImpl final : public CudaBackend {
public:
    CudaBackendImpl(const Model& model, const Placement& placement, const GpuParams& params, ThreadPool& pool);
    ~CudaBackendImpl() override;

    void begin_step(const Step& step, const StepOutput& out) override;
    void embed(const Weight& table) override;
    void rms_norm(const std::vector<float>& w, int il, Part part) override;
    void qkv_prepare(int il) override;
    void attention(int il) override;
    void attn_output(int il) override;
    void ffn_dense(int il) override;
    void moe_route(int il) override;
    void moe_experts(int il, bool into_x) override;
    bool borrows_experts(int il) const override;
    void add_moe_out() override;
    void flush() override;
    std::vector<const void*> download(std::initializer_list<Act> acts, int il) override;
    void upload(Act act, const void* host, int il) override;
    void output(const StepOutput& out) override;
    const GpuCounters& counters() const override { return counters_; }
    GpuMemory memory() const override { return memory_; }
    int streamed_experts(int il) const override { return streamer_ && layers_[il].borrows ? streamer_->fetchable() : 0; }
    void finish_sampled(int32_t* ids, float* logprobs, SampledTop* top) override;
    // KVRows: the layers whose attention runs here, copied through the host a layer at a time.
    int n_layers() const override { return static_cast<int>(layers_.size()); }
    int64_t width(int il) const override;
    uint32_t type_k() const override { return p_.type_k; }
    uint32_t type_v() const override { return p_.type_v; }
    uint8_t* k(int il, int32_t cell) override;
    uint8_t* v(int il, int32_t cell) override;
    void read_rows(int il, const std::vector<int32_t>& cells, uint8_t* k_out, uint8_t* v_out) override;
    void write_rows(int il, const std::vector<int32_t>& cells, const uint8_t* k_in, const uint8_t* v_in) override;

private:
    void lay_out(Arena& a);
    // Graph capture and replay (see the file comment). Every op calls skip() before enqueueing:
    // true while replaying, when the enqueued work is already in a graph.
    bool skip();
    // Ends the current stretch: launches its graph (captured now, or earlier).
    void end_stretch();
    void wait() {
        ck(cudaStreamSynchronize(stream_), "GPU step");
        ++counters_.host_syncs;
    }
    void copy_to_host(void* dst, const void* src, size_t bytes) {
        ++counters_.device_to_host_copies;
        if (skip()) return;
        ck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "copy to host");
    }
    void copy_to_device(void* dst, const void* src, size_t bytes) {
        if (skip()) return;
        ck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "copy to GPU");
    }
    // h quantized for the matrix-vector kernels, unless the norm already did it.
    const BlockQ8* h_q8(bool needed);
    void linear(const WeightView& w, const float* xin, const BlockQ8* xq, int n, float* y, int64_t y_stride, bool acc);
    // y = W x for n tokens by matrix-vector passes of up to kMaxMmvTokens tokens (xq: x quantized,
    // or null where W is a float type or x is quantized here into q8b_).
    void mmv_passes(const WeightView& w, const float* xin, const BlockQ8* xq, int n, float* y, int64_t y_stride,
                    bool acc);
    // logits [n_rows][n_vocab] of the normed rows h (n_rows <= kLogitRows): up to kMaxMmvTokens
    // rows by the matrix-vector kernel (each row's bits as alone), more by mm's tensor-core tiles,
    // which read the output matrix (the model's largest) once where 8-row passes read it once per
    // 8 rows (PERFORMANCE.md: half the time at 32 rows).
    void output_head(const float* h, int n_rows, float* logits);
    void swiglu_ffn(const ExpertSet& gate, const ExpertSet& up, const ExpertSet& down, float* out, bool acc);
    // Each token's `routes` (expert, weight) pairs are in moe_ids_ / moe_w_.
    void routed_experts(const DevLayer& l, const ExpertSet& gate, const ExpertSet& up, const ExpertSet& down,
                        int routes, float* out, bool acc);
    // A smaller step's share of layer il's RAM experts (streamer_), from the routing on the host;
    // false when the step routes to none of them (out untouched).
    bool streamed_experts_of(int il, float* out, bool acc);
    std::vector<ExpertStreamer::Layer> streamable_layers() const;
    void start_streaming();
    // The f32-activation mode: a matrix (or stack) dequantized to f32 in scratch slot `slot`.
    WeightView dequantized(const WeightView& w, int64_t n_matrices, int slot);
    ExpertSet dequantized(const ExpertSet& s, int slot);
    void allocate_f32_scratch();
    // Layer il's routed experts, staged from RAM into a device slot (stager_), as views there.
    void borrow_experts(int il, ExpertSet& gate, ExpertSet& up, ExpertSet& down, int* slot);
    std::vector<ExpertStager::Piece> expert_pieces(int il) const;
    // Whether this step runs layer il's shared expert fused into its routed experts.
    bool fused(int il) const;
    int32_t* in(int which) const { return d_in_ + static_cast<size_t>(which) * U_; }
    int32_t* host_in(int which) const { return staged().in + static_cast<size_t>(which) * U_; }
    // Per-row sampling (cuda_backend_sampling.cu): its device buffers (with the output head), pinned
    // host buffers, the step's parameters and history uploads (in begin_step, outside any graph, so
    // that replays read them from fixed addresses), and the output of a Kind::sampled step.
    void lay_out_sampling(Arena& a);
    void init_sampling();
    void free_sampling();
    void stage_row_sampling(const StepOutput& out);
    void output_sampled(const StepOutput& out);

    const Model& model_;
    const HParams& hp_;
    const Placement& placement_;
    GpuParams p_;
    int U_ = 0;  // most tokens of a step
    cudaStream_t stream_ = nullptr;
    uint8_t* arena_ = nullptr;
    GpuMemory memory_;

    std::vector<DevLayer> layers_;
    WeightView embd_, output_;
    const float* output_norm_ = nullptr;
    std::vector<const float*> attn_norm_, post_norm_;

    // Activations and scratch.
    int64_t qkv_width_ = 0, nq_max_ = 0, ff_max_ = 0, slots_max_ = 1, k_max_ = 0;
    float *x_ = nullptr, *h_ = nullptr, *qkv_ = nullptr, *attn_ = nullptr, *g_ = nullptr, *u_ = nullptr,
          *act_ = nullptr, *router_ = nullptr, *moe_w_ = nullptr, *moe_y_ = nullptr, *moe_out_ = nullptr,
          *ones_ = nullptr, *logits_ = nullptr, *attn_scratch_ = nullptr,
          *split_ = nullptr;  // mm_split's slice partials: kSplitSlices x kMaxSplitTokens x n_embd
    uint16_t* kv_f16_[2] = {};  // K, V rows as f16 for prompt chunks over a non-f16 cache (else null)
    BlockQ8 *q8_ = nullptr, *q8b_ = nullptr;
    int32_t *moe_ids_ = nullptr, *moe_counts_ = nullptr, *moe_offsets_ = nullptr, *moe_src_ = nullptr,
            *moe_dst_ = nullptr, *seq_cells_ = nullptr, *ids_ = nullptr;
    uint8_t* borrow_slots_[ExpertStager::kSlots] = {};  // each holds one layer's routed experts
    std::unique_ptr<ExpertStager> stager_;
    uint8_t* stream_slot_ = nullptr;  // the streamed experts of one layer (streamer_)
    std::unique_ptr<ExpertStreamer> streamer_;
    ThreadPool& pool_;  // the context's: its threads fill the pinned staging chunks
    int borrow_min_tokens_ = 0;
    int n_streamed_ = 0;  // GpuParams::streamed_experts, clamped
    // f32-activation mode only: weights dequantized for one op. Slots 0-2: a matrix, or the routed
    // gate/up/down stacks; 3-5: a fused shared expert's gate/up/down.
    float* f32_scratch_[6] = {};
    size_t f32_scratch_floats_[6] = {};

    // Step inputs: kInputs int32 arrays of U entries, pinned on the host and mirrored on the device
    // in one copy before the step's graphs. The pinned staging (inputs, sampling parameters, logit
    // biases) is two sets used in turn: a step may begin while the previous one runs (overlapped
    // decoding), never while the one before that does, so a set is free when its turn comes.
    // IN_MIRROR_AT / IN_MIRROR_CELL: the step's new entries of the cell-list mirrors (index into
    // seq_cells_, -1 past the last; the cell), uploaded with the inputs and scattered on the device.
    enum { IN_TOKEN, IN_POS, IN_CELL, IN_START, IN_NVIS, IN_MIRROR_AT, IN_MIRROR_CELL, IN_ROWS, IN_U, kInputs };
    struct Staging {
        int32_t* in = nullptr;                  // kInputs x U
        RowSampleParams* row_params = nullptr;  // U (with the output head here)
        LogitBiasEntry* bias = nullptr;         // U x kMaxRowLogitBias
    };
    Staging staging_[2];
    int stage_ = 0;  // the set this step fills
    const Staging& staged() const { return staging_[stage_]; }
    int32_t* d_in_ = nullptr;
    float* h_out_ = nullptr;    // pinned: kLogitRows x max(n_vocab, n_embd)
    int32_t* h_ids_ = nullptr;  // pinned: U
    HostActs down_, up_;        // pinned landing and staging buffers of crossing activations

    struct Mirror {
        uint64_t epoch = ~uint64_t{0};
        size_t n = 0;
    };
    std::vector<Mirror> mirrors_ = std::vector<Mirror>(KVCache::kMaxSeq);

    // This step.
    int n_ = 0, bucket_ = 0;
    std::vector<std::pair<int, int>> attn_groups_;
    bool h_q8_valid_ = false;
    bool graphs_on_ = false;  // this step is captured / replayed (a decode step)
    enum class Stretch { fresh, capturing, replaying } stretch_state_ = Stretch::fresh;
    int stretch_ = 0;
    // Graphs by (tokens, KV bucket, stretch, output rows, output kind, sampling): what decides
    // the course of a step's ops.
    // Per-row sampling adds which rows go to the host and whether any row wants top logprobs;
    // overlapped decoding, whether tokens come from the previous step's samples.
    using GraphKey = std::tuple<int, int, int, int, int, float, int, float, float, uint64_t, bool, bool>;
    GraphKey key_;
    std::map<GraphKey, cudaGraphExec_t> graphs_;
    GpuCounters counters_;

    // Per-row sampling: device buffers (null without the output head here) and their pinned mirrors.
    float* work_ = nullptr;       // kLogitRows rows: logits after bias and penalties
    int32_t* counts_ = nullptr;   // kLogitRows rows: penalty counts, zero between steps
    double* log_norm_ = nullptr;  // kLogitRows
    RowSampleParams* row_params_ = nullptr;
    LogitBiasEntry* bias_ = nullptr;  // U x kMaxRowLogitBias
    int32_t* history_ = nullptr;      // KVCache::kMaxSeq x n_ctx
    SampledToken *sampled_ = nullptr, *top_ = nullptr;
    // A sampled step's rows land in one of these pinned slots, in turn, outside its graphs; a
    // deferred step's slot stays taken until finish_sampled() reads it.
    struct SampledOut {
        SampledToken *ids = nullptr, *top = nullptr;  // pinned: U, U x kMaxSampledTop
        cudaEvent_t landed = nullptr;
        bool pending = false;
        int n_rows = 0;
        std::vector<uint8_t> on_device;  // per row: sampled here (else its logits went to the host)
        std::vector<int> n_top, append_seq;
    };
    SampledOut outs_[kMaxDeferredSteps];
    int out_next_ = 0;     // the slot the next sampled step takes
    int out_pending_ = 0;  // deferred steps not yet finished (the oldest: out_next_ - out_pending_)
    void read_sampled(SampledOut& o, int32_t* ids, float* logprobs, SampledTop* top);
    int32_t* h_hist_ = nullptr;  // staging of history uploads, grown on demand
    size_t h_hist_cap_ = 0;
    std::unique_ptr<HistoryMirror> history_mirror_;
    std::vector<int> append_seq_;  // per row of the step: the sequence its kernel appends to, or -1
    uint64_t host_rows_ = 0;       // rows (of the first 64) whose logits go to the host
    bool any_top_ = false;
    bool tokens_from_device_ = false;  // this step's tokens include sampled_token(r) entries
};

}  // namespace glmoe
