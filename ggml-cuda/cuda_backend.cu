// The CUDA backend (src/cuda_backend.h): the ops of src/backend.h from the kernels of kernels.h,
// on one stream. Steps of up to kMaxMmvTokens tokens use the matrix-vector kernels and are
// captured into CUDA graphs (one per stretch between host crossings) that later steps of the
// same shape replay; bigger steps use the tensor-core kernels and run eagerly.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <tuple>

#include "cuda_backend.h"
#include "ggml_types.h"
#include "kernels.h"

namespace glmoe {

using namespace cuda;

namespace {

void ck(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw GpuError(std::string(what) + ": " + cudaGetErrorString(e));
}

static_assert(CudaBackend::kInvariantBatch == kMaxMmvTokens, "the batch-invariant step is the matrix-vector one");
constexpr int kDecodeGroup = 64;  // most tokens one attention_decode launch takes
constexpr int kPrefillRun = 9;    // a sequence run this long uses the prefill attention kernel
constexpr int kLogitRows = 32;    // output-head rows per pass (bounds the logits buffer)

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

WeightView view_of(const Weight& w, const void* dev, int64_t rows) {
    WeightView v;
    v.data = dev;
    v.type = w.type;
    v.rows = rows;
    v.cols = w.ne[0];
    v.row_bytes = w.row_bytes;
    v.matrix_bytes = w.matrix_bytes;
    return v;
}

size_t stack_bytes(const Weight& w) { return w.matrix_bytes * static_cast<size_t>(w.ne[2]); }

WeightView upload_weight(Arena& a, const Weight& w) { return view_of(w, a.put({{w.data, stack_bytes(w)}}), w.ne[1]); }

bool wants_q8(const ExpertSet& s) {
    return (s.routed && mmv_wants_q8(s.routed.type)) || (s.shared && mmv_wants_q8(s.shared.type));
}

ExpertSet single(const WeightView& w) {
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
    half *k_cache = nullptr, *v_cache = nullptr;
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

}  // namespace

class CudaBackendImpl final : public CudaBackend {
public:
    CudaBackendImpl(const Model& model, const Placement& placement, const GpuParams& params);
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
    void swiglu_ffn(const ExpertSet& gate, const ExpertSet& up, const ExpertSet& down, float* out, bool acc);
    void routed_experts(const DevLayer& l, const ExpertSet& gate, const ExpertSet& up, const ExpertSet& down,
                        float* out, bool acc);
    // The f32-activation mode: a matrix (or stack) dequantized to f32 in scratch slot `slot`.
    WeightView dequantized(const WeightView& w, int64_t n_matrices, int slot);
    ExpertSet dequantized(const ExpertSet& s, int slot);
    void allocate_f32_scratch();
    // Copies the routed experts a big step uses from RAM to `borrow_` (the step's ids are read back).
    void borrow_experts(int il, ExpertSet& gate, ExpertSet& up, ExpertSet& down);
    // Whether this step runs layer il's shared expert fused into its routed experts.
    bool fused(int il) const;
    int32_t* in(int which) const { return d_in_ + static_cast<size_t>(which) * U_; }
    int32_t* host_in(int which) const { return h_in_ + static_cast<size_t>(which) * U_; }

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
          *ones_ = nullptr, *logits_ = nullptr, *attn_scratch_ = nullptr;
    BlockQ8 *q8_ = nullptr, *q8b_ = nullptr;
    int32_t *moe_ids_ = nullptr, *moe_counts_ = nullptr, *moe_offsets_ = nullptr, *moe_src_ = nullptr,
            *moe_dst_ = nullptr, *seq_cells_ = nullptr, *ids_ = nullptr;
    uint8_t* borrow_ = nullptr;  // room for one layer's routed experts copied from RAM
    int borrow_min_tokens_ = 0;
    // f32-activation mode only: weights dequantized for one op. Slots 0-2: a matrix, or the routed
    // gate/up/down stacks; 3-5: a fused shared expert's gate/up/down.
    float* f32_scratch_[6] = {};
    size_t f32_scratch_floats_[6] = {};

    // Step inputs: kInputs int32 arrays of U entries, pinned on the host and mirrored on the device.
    enum { IN_TOKEN, IN_POS, IN_CELL, IN_START, IN_NVIS, IN_ROWS, IN_U, kInputs };
    int32_t* h_in_ = nullptr;
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
    using GraphKey = std::tuple<int, int, int, int, int, float, int, float, float>;
    GraphKey key_;
    std::map<GraphKey, cudaGraphExec_t> graphs_;
    GpuCounters counters_;
};

std::unique_ptr<CudaBackend> CudaBackend::create(const Model& model, const Placement& placement,
                                                 const GpuParams& params) {
    return std::make_unique<CudaBackendImpl>(model, placement, params);
}

void CudaBackendImpl::lay_out(Arena& a) {
    const int64_t H = hp_.n_embd, D = hp_.head_dim_k;
    const size_t weights_before = a.weights();
    if (placement_.embd == Device::gpu) embd_ = upload_weight(a, model_.token_embd());
    layers_.assign(hp_.n_layer, DevLayer{});
    attn_norm_.assign(hp_.n_layer, nullptr);
    post_norm_.assign(hp_.n_layer, nullptr);
    qkv_width_ = nq_max_ = ff_max_ = 0;
    slots_max_ = 1;
    size_t kv_bytes = 0, borrow_bytes = 0;
    for (int il = 0; il < hp_.n_layer; ++il) {
        const LayerWeights& w = model_.layer(il);
        const LayerHParams& lh = hp_.layers[il];
        const LayerPlacement& lp = placement_.layers[il];
        DevLayer& l = layers_[il];
        l.attn = lp.attn == Device::gpu;
        l.ffn = lp.ffn == Device::gpu;
        l.moe = lh.is_moe;
        l.experts = l.moe && lp.experts == Device::gpu;
        l.shared = l.moe && w.gate_shexp && lp.shared == Device::gpu;
        l.n_head = lh.n_head;
        l.n_head_kv = lh.n_head_kv;
        l.n_used = lh.n_expert_used;
        const int64_t nq = lh.n_head * D, nkv = lh.n_head_kv * D;
        if (l.attn) {
            attn_norm_[il] = a.put_floats(w.attn_norm);
            l.q_norm = a.put_floats(w.q_norm);
            l.k_norm = a.put_floats(w.k_norm);
            if (!w.q_bias.empty() || !w.k_bias.empty() || !w.v_bias.empty()) {
                std::vector<float> bias(nq + 2 * nkv, 0.0f);
                std::copy(w.q_bias.begin(), w.q_bias.end(), bias.begin());
                std::copy(w.k_bias.begin(), w.k_bias.end(), bias.begin() + nq);
                std::copy(w.v_bias.begin(), w.v_bias.end(), bias.begin() + nq + nkv);
                l.qkv_bias = a.put_floats(bias);
            }
            if (w.wq.type == w.wk.type && w.wq.type == w.wv.type) {
                // One matrix for q, k and v: one launch, one pass over the activations.
                const void* dev = a.put({{w.wq.data, w.wq.matrix_bytes}, {w.wk.data, w.wk.matrix_bytes},
                                         {w.wv.data, w.wv.matrix_bytes}});
                l.qkv = {{view_of(w.wq, dev, nq + 2 * nkv), 0}};
            } else {
                l.qkv = {{upload_weight(a, w.wq), 0}, {upload_weight(a, w.wk), nq}, {upload_weight(a, w.wv), nq + nkv}};
            }
            l.wo = upload_weight(a, w.wo);
            const size_t before = a.used();
            l.k_cache = a.array<half>(static_cast<size_t>(p_.n_ctx) * nkv);
            l.v_cache = a.array<half>(static_cast<size_t>(p_.n_ctx) * nkv);
            kv_bytes += a.used() - before;
            qkv_width_ = std::max(qkv_width_, nq + 2 * nkv);
            nq_max_ = std::max(nq_max_, nq);
        }
        if (l.ffn) {
            post_norm_[il] = a.put_floats(w.post_attention_norm);
            if (l.moe) {
                l.router = upload_weight(a, w.ffn_gate_inp);
                l.probs_bias = a.put_floats(w.exp_probs_b);
            } else {
                l.dense_gate = single(upload_weight(a, w.ffn_gate));
                l.dense_up = single(upload_weight(a, w.ffn_up));
                l.dense_down = single(upload_weight(a, w.ffn_down));
                ff_max_ = std::max<int64_t>(ff_max_, lh.n_ff);
            }
        }
        if (!l.moe) continue;
        l.ff = static_cast<int>(w.gate_exps.ne[1]);
        l.gate.n_routed = l.up.n_routed = l.down.n_routed = hp_.n_expert;
        if (l.experts) {
            l.gate.routed = upload_weight(a, w.gate_exps);
            l.up.routed = upload_weight(a, w.up_exps);
            l.down.routed = upload_weight(a, w.down_exps);
        }
        l.borrows = !l.experts && l.ffn && lp.experts == Device::cpu && (!w.gate_shexp || l.shared);
        if (l.borrows)
            borrow_bytes = std::max(borrow_bytes, stack_bytes(w.gate_exps) + stack_bytes(w.up_exps) + stack_bytes(w.down_exps));
        if (l.shared) {
            const WeightView g = upload_weight(a, w.gate_shexp), u = upload_weight(a, w.up_shexp), d = upload_weight(a, w.down_shexp);
            // Fused shared expert: expert n_expert, chosen for every token with weight 1.
            l.fusible = (l.experts || l.borrows) && w.gate_shexp.ne[1] == w.gate_exps.ne[1];
            if (l.fusible) {
                l.gate.shared = g;
                l.up.shared = u;
                l.down.shared = d;
            }
            l.sh_gate = single(g);
            l.sh_up = single(u);
            l.sh_down = single(d);
            ff_max_ = std::max<int64_t>(ff_max_, w.gate_shexp.ne[1]);
        }
        if (l.experts || l.borrows) ff_max_ = std::max<int64_t>(ff_max_, l.ff);
        slots_max_ = std::max<int64_t>(slots_max_, l.n_used + 1);
    }
    if (placement_.output == Device::gpu) {
        output_ = upload_weight(a, model_.output());
        output_norm_ = a.put_floats(model_.output_norm());
    }
    memory_.weights = a.weights() - weights_before;
    memory_.kv = kv_bytes;
    const size_t compute_start = a.used();
    k_max_ = std::max({H, nq_max_, ff_max_});

    const size_t n = static_cast<size_t>(U_);
    x_ = a.array<float>(n * H);
    h_ = a.array<float>(n * H);
    qkv_ = a.array<float>(n * std::max<int64_t>(qkv_width_, 1));
    attn_ = a.array<float>(n * std::max<int64_t>(nq_max_, 1));
    const size_t pairs = n * slots_max_;
    g_ = a.array<float>(pairs * std::max<int64_t>(ff_max_, 1));
    u_ = a.array<float>(pairs * std::max<int64_t>(ff_max_, 1));
    act_ = a.array<float>(pairs * std::max<int64_t>(ff_max_, 1));
    router_ = a.array<float>(n * std::max(hp_.n_expert, 1));
    moe_w_ = a.array<float>(pairs);
    moe_y_ = a.array<float>(pairs * H);
    moe_out_ = a.array<float>(n * H);
    ones_ = a.array<float>(n);
    q8_ = a.array<BlockQ8>(pairs * (k_max_ / 32 + 1));
    q8b_ = a.array<BlockQ8>(pairs * (k_max_ / 32 + 1));
    moe_ids_ = a.array<int32_t>(pairs);
    moe_counts_ = a.array<int32_t>(hp_.n_expert + 2);
    moe_offsets_ = a.array<int32_t>(hp_.n_expert + 3);
    moe_src_ = a.array<int32_t>(pairs);
    moe_dst_ = a.array<int32_t>(pairs);
    seq_cells_ = a.array<int32_t>(static_cast<size_t>(KVCache::kMaxSeq) * p_.n_ctx);
    ids_ = a.array<int32_t>(n);
    if (placement_.output == Device::gpu) logits_ = a.array<float>(static_cast<size_t>(kLogitRows) * hp_.n_vocab);
    size_t scratch_bytes = 0;
    for (int il = 0; il < hp_.n_layer; ++il)
        if (layers_[il].attn)
            scratch_bytes = std::max(scratch_bytes, attention_decode_scratch_bytes(kDecodeGroup, hp_.layers[il].n_head,
                                                                                   hp_.layers[il].n_head_kv, hp_.head_dim_k, p_.n_ctx));
    attn_scratch_ = static_cast<float*>(a.reserve(scratch_bytes));
    d_in_ = a.array<int32_t>(static_cast<size_t>(kInputs) * n);
    borrow_ = borrow_bytes ? static_cast<uint8_t*>(a.reserve(borrow_bytes)) : nullptr;
    memory_.compute = a.used() - compute_start;
}

CudaBackendImpl::CudaBackendImpl(const Model& model, const Placement& placement, const GpuParams& params)
    : model_(model), hp_(model.hparams()), placement_(placement), p_(params) {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        throw GpuError("no CUDA device");
    }
    const std::string why_not = unsupported(model);
    if (!why_not.empty()) throw GpuError("the GPU backend does not support " + why_not);
    if (params.n_ctx <= 0 || params.n_ubatch <= 0) throw GpuError("n_ctx and n_ubatch must be positive");
    U_ = std::max(params.n_ubatch, kMaxMmvTokens);
    // From this many tokens a step copies the routed experts it uses from RAM instead of sending
    // its tokens to the CPU. Default: ik_llama.cpp's rule, 32 x experts / experts used per token
    // (512 for GLM-4.5-Air), where a batch uses nearly every expert; not yet tuned by measurement here.
    const int n_used_max = hp_.layers.empty() ? 1 : std::max(1, std::max_element(hp_.layers.begin(), hp_.layers.end(),
        [](const LayerHParams& a, const LayerHParams& b) { return a.n_expert_used < b.n_expert_used; })->n_expert_used);
    borrow_min_tokens_ = params.expert_borrow_min_tokens > 0 ? params.expert_borrow_min_tokens
                                                               : std::max(kMaxMmvTokens + 1, 32 * hp_.n_expert / n_used_max);

    Arena dry(nullptr);
    lay_out(dry);
    size_t free_b = 0, total_b = 0;
    ck(cudaMemGetInfo(&free_b, &total_b), "querying GPU memory");
    const size_t margin = size_t{256} << 20;  // CUDA context, graphs and library workspaces
    if (dry.used() + margin > free_b)
        throw GpuError("not enough GPU memory for " + std::to_string(placement.n_layers_with_attn_on(Device::gpu)) +
                       " layers" + (placement.output == Device::gpu ? " and the output head" : "") + ": needs " +
                       std::to_string(dry.used() >> 20) + " MiB (weights " + std::to_string(memory_.weights >> 20) +
                       ", KV cache for n_ctx " + std::to_string(params.n_ctx) + " " + std::to_string(memory_.kv >> 20) +
                       ", buffers " + std::to_string(memory_.compute >> 20) + "), " + std::to_string(free_b >> 20) +
                       " MiB free; lower n_gpu_layers or n_ctx, or keep experts on the CPU (-ot exps=CPU, --n-cpu-moe)");
    ck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "creating a stream");
    ck(cudaMalloc(&arena_, dry.used()), "allocating GPU memory");
    Arena real(arena_);
    lay_out(real);
    ck(cudaMallocHost(&h_in_, sizeof(int32_t) * kInputs * U_), "allocating pinned memory");
    ck(cudaMallocHost(&h_out_, sizeof(float) * kLogitRows * std::max(hp_.n_vocab, hp_.n_embd)), "allocating pinned memory");
    ck(cudaMallocHost(&h_ids_, sizeof(int32_t) * U_), "allocating pinned memory");
    std::memset(h_in_, 0, sizeof(int32_t) * kInputs * U_);
    for (HostActs* b : {&down_, &up_}) {
        const size_t rows = static_cast<size_t>(U_), H = hp_.n_embd;
        ck(cudaMallocHost(&b->x, sizeof(float) * rows * H), "allocating pinned memory");
        ck(cudaMallocHost(&b->h, sizeof(float) * rows * H), "allocating pinned memory");
        ck(cudaMallocHost(&b->moe_out, sizeof(float) * rows * H), "allocating pinned memory");
        ck(cudaMallocHost(&b->route_w, sizeof(float) * rows * slots_max_), "allocating pinned memory");
        ck(cudaMallocHost(&b->route_ids, sizeof(int32_t) * rows * slots_max_), "allocating pinned memory");
    }
    if (params.f32_activations) allocate_f32_scratch();
    const std::vector<float> ones(U_, 1.0f);
    ck(cudaMemcpy(ones_, ones.data(), sizeof(float) * U_, cudaMemcpyHostToDevice), "uploading constants");
}

CudaBackendImpl::~CudaBackendImpl() {
    for (auto& kv : graphs_)
        if (kv.second) cudaGraphExecDestroy(kv.second);
    for (float* f : f32_scratch_)
        if (f) cudaFree(f);
    for (HostActs* b : {&down_, &up_})
        for (void* ptr : {static_cast<void*>(b->x), static_cast<void*>(b->h), static_cast<void*>(b->moe_out),
                          static_cast<void*>(b->route_w), static_cast<void*>(b->route_ids)})
            if (ptr) cudaFreeHost(ptr);
    if (h_in_) cudaFreeHost(h_in_);
    if (h_out_) cudaFreeHost(h_out_);
    if (h_ids_) cudaFreeHost(h_ids_);
    if (arena_) cudaFree(arena_);
    if (stream_) cudaStreamDestroy(stream_);
}

// ---- graphs ------------------------------------------------------------------------------------

bool CudaBackendImpl::skip() {
    if (!graphs_on_) return false;
    if (stretch_state_ == Stretch::fresh) {
        GraphKey key = key_;
        std::get<2>(key) = stretch_;
        if (graphs_.count(key)) {
            stretch_state_ = Stretch::replaying;
        } else {
            ck(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "graph capture");
            stretch_state_ = Stretch::capturing;
        }
    }
    return stretch_state_ == Stretch::replaying;
}

void CudaBackendImpl::end_stretch() {
    if (!graphs_on_) return;
    GraphKey key = key_;
    std::get<2>(key) = stretch_++;
    const Stretch state = stretch_state_;
    stretch_state_ = Stretch::fresh;
    if (state == Stretch::capturing) {
        cudaGraph_t graph;
        ck(cudaStreamEndCapture(stream_, &graph), "graph capture");
        cudaGraphExec_t exec = nullptr;
        const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
        cudaGraphDestroy(graph);
        ck(e, "graph instantiate");
        graphs_[key] = exec;
        ++counters_.graph_captures;
    }
    if (state != Stretch::fresh) {
        ck(cudaGraphLaunch(graphs_.at(key), stream_), "graph launch");
        ++counters_.graph_replays;
    }
}

void CudaBackendImpl::flush() { end_stretch(); }

// ---- the step ----------------------------------------------------------------------------------

void CudaBackendImpl::begin_step(const Step& step, const StepOutput& out) {
    const int n = step.n;
    if (n <= 0 || n > U_)
        throw std::invalid_argument("GPU step of " + std::to_string(n) + " tokens (at most " + std::to_string(U_) + ")");
    const KVCache& kv = *step.kv;
    if (stretch_state_ == Stretch::capturing) {
        // A step that failed while its ops were being captured: drop the partial graph.
        cudaGraph_t partial = nullptr;
        if (cudaStreamEndCapture(stream_, &partial) == cudaSuccess && partial) cudaGraphDestroy(partial);
        cudaGetLastError();
        stretch_state_ = Stretch::fresh;
    }
    n_ = n;
    h_q8_valid_ = false;
    ++counters_.steps;

    // Mirror each sequence's position-ordered cell list on the device: usually only the newest
    // cells are appended, so only those are uploaded. (Outside any graph: this changes each step.)
    const bool has_attn = placement_.n_layers_with_attn_on(Device::gpu) > 0;
    int max_vis = 1;
    for (int t = 0; t < n; ++t) {
        const int s = step.seq[t];
        int nvis = 1;
        if (has_attn) {
            const std::vector<int32_t>& list = kv.seq_cells(s);
            Mirror& mir = mirrors_[s];
            const uint64_t epoch = kv.seq_epoch(s);
            if (mir.epoch != epoch || mir.n > list.size()) mir.n = 0;
            if (list.size() > mir.n)
                ck(cudaMemcpyAsync(seq_cells_ + static_cast<size_t>(s) * p_.n_ctx + mir.n, list.data() + mir.n,
                                   sizeof(int32_t) * (list.size() - mir.n), cudaMemcpyHostToDevice, stream_),
                   "cell list");
            mir.epoch = epoch;
            mir.n = list.size();
            // Visible: the cells at positions <= pos[t], a prefix of the position-ordered list.
            const auto end = std::upper_bound(list.begin(), list.end(), step.pos[t],
                                              [&](int32_t p, int32_t cell) { return p < kv.cell_pos(cell); });
            nvis = std::max(static_cast<int>(end - list.begin()), 1);
        }
        host_in(IN_TOKEN)[t] = step.token[t];
        host_in(IN_POS)[t] = step.pos[t];
        host_in(IN_CELL)[t] = step.cells[t];
        host_in(IN_START)[t] = s * p_.n_ctx;
        host_in(IN_NVIS)[t] = nvis;
        max_vis = std::max(max_vis, nvis);
    }
    // Graph replays need fixed launch shapes: the KV split is sized for a power-of-two bucket.
    bucket_ = 256;
    while (bucket_ < max_vis) bucket_ *= 2;
    bucket_ = std::min(bucket_, p_.n_ctx);

    // Attention launches: runs of one sequence long enough for the prefill kernel (marked by a
    // negative length), the rest in decode groups.
    attn_groups_.clear();
    if (n <= kMaxMmvTokens) {
        attn_groups_.push_back({0, n});
    } else {
        int t = 0, pending = -1;
        auto flush_pending = [&](int end) {
            for (int s = pending; pending >= 0 && s < end; s += kDecodeGroup)
                attn_groups_.push_back({s, std::min(kDecodeGroup, end - s)});
            pending = -1;
        };
        while (t < n) {
            int e = t + 1;
            while (e < n && step.seq[e] == step.seq[t]) ++e;
            if (e - t >= kPrefillRun) {
                flush_pending(t);
                attn_groups_.push_back({t, -(e - t)});
            } else if (pending < 0) {
                pending = t;
            }
            t = e;
        }
        flush_pending(n);
    }

    graphs_on_ = n <= kMaxMmvTokens;
    stretch_state_ = Stretch::fresh;
    stretch_ = 0;
    const int n_rows = out.kind == StepOutput::Kind::none ? 0 : static_cast<int>(out.rows.size());
    key_ = GraphKey{n, bucket_, 0, n_rows, static_cast<int>(out.kind), out.sampling.temperature, out.sampling.top_k,
                    out.sampling.top_p, out.sampling.min_p};
    copy_to_device(d_in_, h_in_, sizeof(int32_t) * IN_ROWS * U_);
}

const BlockQ8* CudaBackendImpl::h_q8(bool needed) {
    if (!needed) return nullptr;
    if (!h_q8_valid_) {
        h_q8_valid_ = true;
        if (!skip()) quantize_q8(h_, n_, hp_.n_embd, hp_.n_embd, q8_, stream_);
    }
    return q8_;
}

void CudaBackendImpl::linear(const WeightView& w, const float* xin, const BlockQ8* xq, int n, float* y,
                             int64_t y_stride, bool acc) {
    if (skip()) return;
    if (p_.f32_activations) {
        mm_float(dequantized(w, 1, 0), xin, n, y, y_stride, acc, stream_);
    } else if (n <= kMaxMmvTokens) {
        if (!xq && mmv_wants_q8(w.type)) {
            quantize_q8(xin, n, w.cols, w.cols, q8b_, stream_);
            xq = q8b_;
        }
        mmv(w, xin, xq, n, y, y_stride, acc, stream_);
    } else {
        mm(w, xin, n, y, y_stride, acc, stream_);
    }
}

WeightView CudaBackendImpl::dequantized(const WeightView& w, int64_t n_matrices, int slot) {
    if (!w) return w;
    const size_t floats = static_cast<size_t>(w.rows) * n_matrices * w.cols;
    if (f32_scratch_floats_[slot] < floats) throw std::logic_error("f32 scratch sized too small");
    WeightView all = w;
    all.rows = w.rows * n_matrices;
    dequantize_matrix(all, 0, all.rows, f32_scratch_[slot], stream_);
    WeightView out = w;
    out.data = f32_scratch_[slot];
    out.type = GGML_TYPE_F32;
    out.row_bytes = sizeof(float) * w.cols;
    out.matrix_bytes = out.row_bytes * w.rows;
    return out;
}

ExpertSet CudaBackendImpl::dequantized(const ExpertSet& s, int slot) {
    ExpertSet out = s;
    out.routed = dequantized(s.routed, s.n_routed, slot);
    out.shared = dequantized(s.shared, 1, slot + 3);
    return out;
}

void CudaBackendImpl::allocate_f32_scratch() {
    // Room for the largest matrix or stack of each slot among the weights held here.
    auto need = [&](int slot, const Weight& w, bool here) {
        if (here && w) f32_scratch_floats_[slot] = std::max(f32_scratch_floats_[slot], static_cast<size_t>(w.ne[0]) * w.ne[1] * w.ne[2]);
    };
    for (int il = 0; il < hp_.n_layer; ++il) {
        const LayerWeights& w = model_.layer(il);
        const DevLayer& l = layers_[il];
        for (const Weight* m : {&w.wq, &w.wk, &w.wv, &w.wo}) need(0, *m, l.attn);
        if (l.attn) f32_scratch_floats_[0] = std::max(f32_scratch_floats_[0], static_cast<size_t>(l.qkv[0].w.rows * l.qkv[0].w.cols));
        for (const Weight* m : {&w.ffn_gate, &w.ffn_up, &w.ffn_down}) need(0, *m, l.ffn && !l.moe);
        need(0, w.gate_exps, l.experts || l.borrows);
        need(1, w.up_exps, l.experts || l.borrows);
        need(2, w.down_exps, l.experts || l.borrows);
        for (const Weight* m : {&w.gate_shexp, &w.up_shexp, &w.down_shexp}) need(0, *m, l.shared);
        need(3, w.gate_shexp, l.fusible);
        need(4, w.up_shexp, l.fusible);
        need(5, w.down_shexp, l.fusible);
    }
    need(0, model_.output(), placement_.output == Device::gpu);
    for (int slot = 0; slot < 6; ++slot)
        if (f32_scratch_floats_[slot])
            ck(cudaMalloc(&f32_scratch_[slot], f32_scratch_floats_[slot] * sizeof(float)), "allocating f32 scratch");
}

void CudaBackendImpl::embed(const Weight&) {
    if (skip()) return;
    get_rows(embd_, in(IN_TOKEN), n_, x_, stream_);
}

void CudaBackendImpl::rms_norm(const std::vector<float>&, int il, Part part) {
    const DevLayer& l = layers_[il];
    const bool small = n_ <= kMaxMmvTokens && !p_.f32_activations;
    bool quantize = false;
    if (part == Part::attention) {
        quantize = small && std::any_of(l.qkv.begin(), l.qkv.end(), [](const QKVPart& q) { return mmv_wants_q8(q.w.type); });
    } else if (!l.moe) {
        quantize = small && wants_q8(l.dense_gate);
    } else {
        quantize = small && ((l.experts && wants_q8(l.gate)) || (l.shared && (wants_q8(l.gate) || wants_q8(l.sh_gate))));
    }
    h_q8_valid_ = quantize;
    if (skip()) return;
    const float* w = part == Part::attention ? attn_norm_[il] : post_norm_[il];
    cuda::rms_norm_q8(x_, w, n_, hp_.n_embd, hp_.rms_eps, h_, quantize ? q8_ : nullptr, stream_);
}

void CudaBackendImpl::qkv_prepare(int il) {
    const DevLayer& l = layers_[il];
    const int64_t D = hp_.head_dim_k, width = l.n_head * D + 2 * l.n_head_kv * D;
    const BlockQ8* xq = n_ <= kMaxMmvTokens && h_q8_valid_ ? q8_ : nullptr;
    for (const QKVPart& part : l.qkv) linear(part.w, h_, xq, n_, qkv_ + part.col, width, false);
    if (skip()) return;
    QKVArgs qa;
    qa.qkv = qkv_;
    qa.bias = l.qkv_bias;
    qa.q_norm = l.q_norm;
    qa.k_norm = l.k_norm;
    qa.pos = in(IN_POS);
    qa.cells = in(IN_CELL);
    qa.k_cache = l.k_cache;
    qa.v_cache = l.v_cache;
    qa.n = n_;
    qa.n_head = l.n_head;
    qa.n_head_kv = l.n_head_kv;
    qa.head_dim = static_cast<int>(D);
    qa.n_rot = hp_.n_rot;
    qa.eps = hp_.rms_eps;
    qa.freq_base = hp_.rope_freq_base;
    cuda::qkv_prepare(qa, stream_);
}

void CudaBackendImpl::attention(int il) {
    if (skip()) return;
    const DevLayer& l = layers_[il];
    const int64_t D = hp_.head_dim_k, nq = l.n_head * D, width = nq + 2 * l.n_head_kv * D;
    for (const auto& [t0, len] : attn_groups_) {
        AttentionArgs a;
        a.q = qkv_ + t0 * width;  // the q part of the fused qkv rows, roped in place
        a.q_stride = width;
        a.k_cache = l.k_cache;
        a.v_cache = l.v_cache;
        a.cells = seq_cells_;
        a.cell_start = in(IN_START) + t0;
        a.n_visible = in(IN_NVIS) + t0;
        a.out = attn_ + t0 * nq;
        a.n_tok = std::abs(len);
        a.n_head = l.n_head;
        a.n_head_kv = l.n_head_kv;
        a.head_dim = static_cast<int>(D);
        a.max_visible = bucket_;
        a.scale = 1.0f / std::sqrt(static_cast<float>(D));
        if (len < 0)
            attention_prefill(a, stream_);  // negative length marks one sequence's long run
        else
            attention_decode(a, attn_scratch_, stream_);
    }
}

void CudaBackendImpl::attn_output(int il) { linear(layers_[il].wo, attn_, nullptr, n_, x_, hp_.n_embd, true); }

void CudaBackendImpl::swiglu_ffn(const ExpertSet& gate, const ExpertSet& up, const ExpertSet& down, float* out,
                                 bool acc) {
    const int64_t F = gate.routed.rows, H = hp_.n_embd;
    if (n_ <= kMaxMmvTokens && !p_.f32_activations) {
        const BlockQ8* xq = h_q8(wants_q8(gate));
        if (skip()) return;
        mmv_swiglu(gate, up, h_, xq, nullptr, n_, 1, act_, stream_);
        linear(down.routed, act_, nullptr, n_, out, H, acc);
    } else {
        linear(gate.routed, h_, nullptr, n_, g_, F, false);
        linear(up.routed, h_, nullptr, n_, u_, F, false);
        if (skip()) return;
        swiglu(g_, u_, static_cast<int64_t>(n_) * F, act_, stream_);
        linear(down.routed, act_, nullptr, n_, out, H, acc);
    }
}

void CudaBackendImpl::ffn_dense(int il) {
    const DevLayer& l = layers_[il];
    swiglu_ffn(l.dense_gate, l.dense_up, l.dense_down, x_, true);
}

void CudaBackendImpl::moe_route(int il) {
    if (skip()) return;
    const DevLayer& l = layers_[il];
    // The router stays in f32 at every batch size: a bf16 router could flip near-tied experts.
    if (n_ <= kMaxMmvTokens) mmv(l.router, h_, nullptr, n_, router_, hp_.n_expert, false, stream_);
    else mm_float(l.router, h_, n_, router_, hp_.n_expert, false, stream_);
    RouteArgs r;
    r.logits = router_;
    r.bias = l.probs_bias;
    r.ids = moe_ids_;
    r.weights = moe_w_;
    r.n = n_;
    r.n_expert = hp_.n_expert;
    r.n_used = l.n_used;
    r.n_groups = hp_.n_expert_groups > 1 ? hp_.n_expert_groups : 1;
    r.n_group_used = hp_.n_expert_groups > 1 ? hp_.n_group_used : 1;
    r.norm = hp_.expert_weights_norm;
    r.fuse_shared = fused(il);
    r.scale = hp_.expert_weights_scale;
    cuda::moe_route(r, stream_);
}

void CudaBackendImpl::routed_experts(const DevLayer& l, const ExpertSet& gate, const ExpertSet& up,
                                     const ExpertSet& down, float* out, bool acc) {
    const int64_t H = hp_.n_embd, F = l.ff;
    const bool with_shared = static_cast<bool>(gate.shared);
    const int S = l.n_used + (with_shared ? 1 : 0);
    if (p_.f32_activations) {
        // Exact f32: the experts dequantized, then the matrix-vector kernels (which read f32
        // weights without rounding the activations) over groups of at most kMaxMmvTokens tokens.
        if (skip()) return;
        const ExpertSet g = dequantized(gate, 0), u = dequantized(up, 1), d = dequantized(down, 2);
        for (int t0 = 0; t0 < n_; t0 += kMaxMmvTokens) {
            const int nt = std::min(kMaxMmvTokens, n_ - t0);
            mmv_swiglu(g, u, h_ + t0 * H, nullptr, moe_ids_ + t0 * S, nt, S, act_ + static_cast<int64_t>(t0) * S * F,
                       stream_);
            mmv_experts(d, act_ + static_cast<int64_t>(t0) * S * F, nullptr, true, moe_ids_ + t0 * S, nt, S,
                        moe_y_ + static_cast<int64_t>(t0) * S * H, stream_);
        }
    } else if (n_ <= kMaxMmvTokens) {
        const BlockQ8* xq = h_q8(wants_q8(gate));
        if (skip()) return;
        mmv_swiglu(gate, up, h_, xq, moe_ids_, n_, S, act_, stream_);
        if (wants_q8(down)) quantize_q8(act_, static_cast<int64_t>(n_) * S, F, F, q8b_, stream_);
        mmv_experts(down, act_, q8b_, true, moe_ids_, n_, S, moe_y_, stream_);
    } else {
        if (skip()) return;
        moe_group(moe_ids_, n_, S, hp_.n_expert + (with_shared ? 1 : 0), moe_counts_, moe_offsets_, moe_src_, moe_dst_,
                  stream_);
        mm_experts(gate, h_, moe_offsets_, moe_src_, moe_dst_, n_, g_, stream_);
        mm_experts(up, h_, moe_offsets_, moe_src_, moe_dst_, n_, u_, stream_);
        swiglu(g_, u_, static_cast<int64_t>(n_) * S * F, act_, stream_);
        mm_experts(down, act_, moe_offsets_, moe_dst_, moe_dst_, n_, moe_y_, stream_);
    }
    if (skip()) return;
    moe_combine(moe_y_, moe_w_, n_, S, H, out, acc, stream_);
}

void CudaBackendImpl::borrow_experts(int il, ExpertSet& gate, ExpertSet& up, ExpertSet& down) {
    // Which experts the step uses: its routing, read back (big steps run eagerly).
    const DevLayer& l = layers_[il];
    const LayerWeights& w = model_.layer(il);
    const int S = l.n_used + (fused(il) ? 1 : 0);
    std::vector<int32_t> ids(static_cast<size_t>(n_) * S);
    ck(cudaMemcpyAsync(ids.data(), moe_ids_, sizeof(int32_t) * ids.size(), cudaMemcpyDeviceToHost, stream_), "routing");
    ++counters_.device_to_host_copies;
    wait();
    std::vector<bool> used(hp_.n_expert, false);
    for (int32_t e : ids)
        if (e >= 0 && e < hp_.n_expert) used[e] = true;
    uint8_t* dst = borrow_;
    for (const auto& [src, set] : {std::pair<const Weight*, ExpertSet*>{&w.gate_exps, &gate}, {&w.up_exps, &up},
                                   {&w.down_exps, &down}}) {
        // Each used expert goes to its own slot of the stack, so expert ids need no remapping.
        for (int e = 0; e < hp_.n_expert;) {
            if (!used[e]) {
                ++e;
                continue;
            }
            int end = e + 1;
            while (end < hp_.n_expert && used[end]) ++end;
            ck(cudaMemcpyAsync(dst + e * src->matrix_bytes, src->matrix(e), (end - e) * src->matrix_bytes,
                               cudaMemcpyHostToDevice, stream_),
               "copying experts");
            e = end;
        }
        set->routed = view_of(*src, dst, src->ne[1]);
        dst += stack_bytes(*src);
    }
}

bool CudaBackendImpl::borrows_experts(int il) const {
    return layers_[il].borrows && n_ >= borrow_min_tokens_;
}

bool CudaBackendImpl::fused(int il) const {
    const DevLayer& l = layers_[il];
    return l.fusible && (l.experts || borrows_experts(il));
}

void CudaBackendImpl::moe_experts(int il, bool into_x) {
    const DevLayer& l = layers_[il];
    float* out = into_x ? x_ : moe_out_;
    bool acc = into_x;
    ExpertSet gate = l.gate, up = l.up, down = l.down;
    if (!fused(il)) gate.shared = up.shared = down.shared = WeightView{};
    const bool borrow = borrows_experts(il);
    if (borrow) borrow_experts(il, gate, up, down);
    if (l.experts || borrow) {
        routed_experts(l, gate, up, down, out, acc);
        acc = true;
    }
    if (l.shared && !fused(il)) swiglu_ffn(l.sh_gate, l.sh_up, l.sh_down, out, acc);
}

void CudaBackendImpl::add_moe_out() {
    if (skip()) return;
    moe_combine(moe_out_, ones_, n_, 1, hp_.n_embd, x_, true, stream_);
}

std::vector<const void*> CudaBackendImpl::download(std::initializer_list<Act> acts, int il) {
    const size_t H = hp_.n_embd, k = il >= 0 ? hp_.layers[il].n_expert_used : 0;
    std::vector<const void*> out;
    for (Act a : acts) {
        switch (a) {
            case Act::x: copy_to_host(down_.x, x_, sizeof(float) * n_ * H); out.push_back(down_.x); break;
            case Act::h: copy_to_host(down_.h, h_, sizeof(float) * n_ * H); out.push_back(down_.h); break;
            case Act::moe_out:
                copy_to_host(down_.moe_out, moe_out_, sizeof(float) * n_ * H);
                out.push_back(down_.moe_out);
                break;
            // Routing computed here for experts elsewhere has no fused slot: n_used wide.
            case Act::route_ids:
                copy_to_host(down_.route_ids, moe_ids_, sizeof(int32_t) * n_ * k);
                out.push_back(down_.route_ids);
                break;
            case Act::route_weights:
                copy_to_host(down_.route_w, moe_w_, sizeof(float) * n_ * k);
                out.push_back(down_.route_w);
                break;
        }
    }
    end_stretch();
    wait();
    return out;
}

void CudaBackendImpl::upload(Act a, const void* host, int il) {
    const size_t H = hp_.n_embd;
    const size_t rows = static_cast<size_t>(n_) * H * sizeof(float);
    switch (a) {
        case Act::x:
            std::memcpy(up_.x, host, rows);
            copy_to_device(x_, up_.x, rows);
            return;
        case Act::h:
            std::memcpy(up_.h, host, rows);
            copy_to_device(h_, up_.h, rows);
            h_q8_valid_ = false;
            return;
        case Act::moe_out:
            std::memcpy(up_.moe_out, host, rows);
            copy_to_device(moe_out_, up_.moe_out, rows);
            return;
        case Act::route_ids:
        case Act::route_weights: break;
    }
    // Routing, n_used wide from the sender; the fused shared expert's slot (expert n_expert,
    // weight 1) is added here when this backend runs it with the routed ones.
    const int k = layers_[il].n_used;
    const bool with_shared = fused(il);
    const int S = k + (with_shared ? 1 : 0);
    for (int t = 0; t < n_; ++t) {
        if (a == Act::route_ids) {
            std::memcpy(up_.route_ids + t * S, static_cast<const int32_t*>(host) + t * k, sizeof(int32_t) * k);
            if (with_shared) up_.route_ids[t * S + k] = hp_.n_expert;
        } else {
            std::memcpy(up_.route_w + t * S, static_cast<const float*>(host) + t * k, sizeof(float) * k);
            if (with_shared) up_.route_w[t * S + k] = 1.0f;
        }
    }
    if (a == Act::route_ids) copy_to_device(moe_ids_, up_.route_ids, sizeof(int32_t) * n_ * S);
    else copy_to_device(moe_w_, up_.route_w, sizeof(float) * n_ * S);
}

void CudaBackendImpl::output(const StepOutput& out) {
    const int64_t H = hp_.n_embd;
    const int n_rows_total = out.kind == StepOutput::Kind::none ? 0 : static_cast<int>(out.rows.size());
    const bool ids_out = out.kind == StepOutput::Kind::token_ids;
    if (n_rows_total == 0) {  // no row wanted: the layers still ran, to fill the KV cache
        end_stretch();
        wait();
        return;
    }
    for (int i = 0; i < n_rows_total; ++i) {
        host_in(IN_ROWS)[i] = out.rows[i];
        const float ui = ids_out && out.u ? out.u[i] : 0.0f;
        std::memcpy(&host_in(IN_U)[i], &ui, sizeof ui);
    }
    copy_to_device(in(IN_ROWS), host_in(IN_ROWS), sizeof(int32_t) * 2 * U_);
    const int64_t width = p_.embeddings ? H : hp_.n_vocab;
    for (int r0 = 0; r0 < n_rows_total; r0 += kLogitRows) {
        const int n_rows = std::min(kLogitRows, n_rows_total - r0);
        if (!skip()) {
            gather_rows(x_, in(IN_ROWS) + r0, n_rows, H, h_, stream_);
            cuda::rms_norm(h_, output_norm_, n_rows, H, hp_.rms_eps, h_, stream_);
        }
        if (p_.embeddings) {
            copy_to_host(h_out_, h_, sizeof(float) * n_rows * H);
        } else {
            for (int c0 = 0; c0 < n_rows; c0 += kMaxMmvTokens)
                linear(output_, h_ + c0 * H, nullptr, std::min(kMaxMmvTokens, n_rows - c0),
                       logits_ + static_cast<int64_t>(c0) * hp_.n_vocab, hp_.n_vocab, false);
            if (ids_out) {
                if (!skip()) {
                    SampleParams sp;
                    sp.temperature = out.sampling.temperature;
                    sp.top_k = out.sampling.top_k;
                    sp.top_p = out.sampling.top_p;
                    sp.min_p = out.sampling.min_p;
                    sample_tokens(logits_, n_rows, hp_.n_vocab, sp, reinterpret_cast<const float*>(in(IN_U)) + r0, ids_,
                                  stream_);
                }
                copy_to_host(h_ids_, ids_, sizeof(int32_t) * n_rows);
            } else {
                copy_to_host(h_out_, logits_, sizeof(float) * n_rows * hp_.n_vocab);
            }
        }
        end_stretch();
        wait();
        if (ids_out) std::memcpy(out.ids + r0, h_ids_, sizeof(int32_t) * n_rows);
        else std::memcpy(out.logits + static_cast<int64_t>(r0) * width, h_out_, sizeof(float) * n_rows * width);
    }
}

}  // namespace glmoe
