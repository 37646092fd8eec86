// The GPU forward (see src/gpu_forward.h): weights and KV cache on the device, one stream, the
// GLM4-MoE layer of DESIGN.md §3 built from the kernels of kernels.h. Decode steps of up to
// kMaxMmvTokens tokens use the matrix-vector kernels and are replayed from captured CUDA graphs;
// bigger batches use the tensor-core kernels and run eagerly.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <tuple>

#include "ggml_types.h"
#include "gpu_forward.h"
#include "kernels.h"

namespace glmoe {

using namespace cuda;

namespace {

void ck(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw GpuError(std::string(what) + ": " + cudaGetErrorString(e));
}

static_assert(GpuForward::kInvariantBatch == kMaxMmvTokens, "the batch-invariant step is the matrix-vector one");
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

private:
    uint8_t* base_;
    size_t used_ = 0;
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

WeightView upload(Arena& a, const Weight& w) {
    const size_t bytes = w.matrix_bytes * static_cast<size_t>(w.ne[2]);
    return view_of(w, a.put({{w.data, bytes}}), w.ne[1]);
}

bool wants_q8(const ExpertSet& s) {
    return mmv_wants_q8(s.routed.type) || (s.shared && mmv_wants_q8(s.shared.type));
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

struct DevLayer {
    const float *attn_norm = nullptr, *post_norm = nullptr, *qkv_bias = nullptr, *q_norm = nullptr,
                *k_norm = nullptr, *probs_bias = nullptr;
    std::vector<QKVPart> qkv;
    WeightView wo, router;
    bool moe = false;
    ExpertSet gate, up, down;              // dense FFN: one matrix each
    ExpertSet sh_gate, sh_up, sh_down;     // a shared expert that could not be fused
    int n_slots = 0;                       // experts per token incl. a fused shared expert
    int n_expert_total = 0;                // routed + fused shared
    half *k_cache = nullptr, *v_cache = nullptr;
    int n_head = 0, n_head_kv = 0, n_used = 0, ff = 0;
};

}  // namespace

struct GpuForward::Impl {
    const Model& model;
    const HParams& hp;
    GpuParams p;
    int n_gpu = 0;
    bool out_head = false;
    int U = 0;  // ubatch capacity
    cudaStream_t stream = nullptr;
    uint8_t* arena = nullptr;
    size_t arena_bytes = 0;

    std::vector<DevLayer> layers;
    WeightView embd, output;
    const float* output_norm = nullptr;

    // Scratch.
    int64_t qkv_width = 0, nq_max = 0, ff_max = 0, slots_max = 1, k_max = 0;
    float *x = nullptr, *h = nullptr, *qkv = nullptr, *attn = nullptr, *g = nullptr, *u = nullptr,
          *act = nullptr, *router = nullptr, *moe_w = nullptr, *moe_y = nullptr, *logits = nullptr,
          *attn_scratch = nullptr;
    BlockQ8 *q8 = nullptr, *q8b = nullptr;
    int32_t *moe_ids = nullptr, *moe_counts = nullptr, *moe_offsets = nullptr, *moe_src = nullptr,
            *moe_dst = nullptr, *seq_cells = nullptr, *ids = nullptr;

    // Step inputs: kInputs int32 arrays of U entries, pinned on the host and mirrored on the device.
    enum { IN_TOKEN, IN_POS, IN_CELL, IN_START, IN_NVIS, IN_ROWS, IN_U, kInputs };
    int32_t* h_in = nullptr;
    int32_t* d_in = nullptr;
    float* h_out = nullptr;    // pinned: kLogitRows x max(n_vocab, n_embd), or U x n_embd
    size_t h_out_floats = 0;
    int32_t* h_ids = nullptr;  // pinned: U

    struct Mirror {
        uint64_t epoch = ~uint64_t{0};
        size_t n = 0;
    };
    std::vector<Mirror> mirrors = std::vector<Mirror>(KVCache::kMaxSeq);

    using GraphKey = std::tuple<int, int, int, int, float, int, float, float>;
    std::map<GraphKey, cudaGraphExec_t> graphs;
    GpuCounters counters;

    Impl(const Model& m, const GpuParams& params) : model(m), hp(m.hparams()), p(params) {}
    ~Impl() {
        for (auto& kv : graphs) cudaGraphExecDestroy(kv.second);
        if (h_in) cudaFreeHost(h_in);
        if (h_out) cudaFreeHost(h_out);
        if (h_ids) cudaFreeHost(h_ids);
        if (arena) cudaFree(arena);
        if (stream) cudaStreamDestroy(stream);
    }

    int32_t* in(int which) const { return d_in + static_cast<size_t>(which) * U; }
    int32_t* host_in(int which) const { return h_in + static_cast<size_t>(which) * U; }

    void lay_out(Arena& a);
    void layer(int il, int n, const std::vector<std::pair<int, int>>& attn_groups, int bucket);
    void linear(const WeightView& w, const float* xin, const BlockQ8* xq, int n, float* y, int64_t y_stride, bool acc);
    void ffn_dense(const ExpertSet& gate, const ExpertSet& up, const ExpertSet& down, int n, bool quantize_input);
    void ffn_moe(const DevLayer& l, int n);
    void enqueue_layers(int n, const std::vector<std::pair<int, int>>& groups, int bucket);
    void enqueue_output(const GpuStepOutput& out, int n_rows, int rows_first);
    void copy_to_host(void* dst, const void* src, size_t bytes) {
        ck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream), "copy to host");
        ++counters.device_to_host_copies;
    }
    void wait() {
        ck(cudaStreamSynchronize(stream), "GPU step");
        ++counters.host_syncs;
    }
};

void GpuForward::Impl::lay_out(Arena& a) {
    const int64_t H = hp.n_embd, D = hp.head_dim_k;
    embd = upload(a, model.token_embd());
    layers.assign(n_gpu, DevLayer{});
    qkv_width = nq_max = ff_max = 0;
    slots_max = 1;
    k_max = H;
    for (int il = 0; il < n_gpu; ++il) {
        const LayerWeights& w = model.layer(il);
        const LayerHParams& lh = hp.layers[il];
        DevLayer& l = layers[il];
        l.n_head = lh.n_head;
        l.n_head_kv = lh.n_head_kv;
        const int64_t nq = lh.n_head * D, nkv = lh.n_head_kv * D;
        l.attn_norm = a.put_floats(w.attn_norm);
        l.post_norm = a.put_floats(w.post_attention_norm);
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
            l.qkv = {{upload(a, w.wq), 0}, {upload(a, w.wk), nq}, {upload(a, w.wv), nq + nkv}};
        }
        l.wo = upload(a, w.wo);
        l.moe = lh.is_moe;
        if (l.moe) {
            l.router = upload(a, w.ffn_gate_inp);
            l.probs_bias = a.put_floats(w.exp_probs_b);
            l.n_used = lh.n_expert_used;
            l.ff = static_cast<int>(w.gate_exps.ne[1]);
            l.gate = ExpertSet{upload(a, w.gate_exps), {}, hp.n_expert};
            l.up = ExpertSet{upload(a, w.up_exps), {}, hp.n_expert};
            l.down = ExpertSet{upload(a, w.down_exps), {}, hp.n_expert};
            l.n_expert_total = hp.n_expert;
            l.n_slots = l.n_used;
            if (w.gate_shexp) {
                const WeightView g = upload(a, w.gate_shexp), u = upload(a, w.up_shexp), d = upload(a, w.down_shexp);
                if (w.gate_shexp.ne[1] == w.gate_exps.ne[1]) {
                    // Fused shared expert: expert n_expert, chosen for every token with weight 1.
                    l.gate.shared = g;
                    l.up.shared = u;
                    l.down.shared = d;
                    l.n_expert_total += 1;
                    l.n_slots += 1;
                } else {
                    l.sh_gate = single(g);
                    l.sh_up = single(u);
                    l.sh_down = single(d);
                    ff_max = std::max<int64_t>(ff_max, w.gate_shexp.ne[1]);
                }
            }
        } else {
            l.ff = lh.n_ff;
            l.gate = single(upload(a, w.ffn_gate));
            l.up = single(upload(a, w.ffn_up));
            l.down = single(upload(a, w.ffn_down));
        }
        l.k_cache = a.array<half>(static_cast<size_t>(p.n_ctx) * nkv);
        l.v_cache = a.array<half>(static_cast<size_t>(p.n_ctx) * nkv);
        qkv_width = std::max(qkv_width, nq + 2 * nkv);
        nq_max = std::max(nq_max, nq);
        ff_max = std::max<int64_t>(ff_max, l.ff);
        slots_max = std::max<int64_t>(slots_max, l.n_slots);
    }
    if (out_head) {
        output = upload(a, model.output());
        output_norm = a.put_floats(model.output_norm());
    }
    k_max = std::max({H, nq_max, ff_max});

    const size_t n = static_cast<size_t>(U);
    x = a.array<float>(n * H);
    h = a.array<float>(n * H);
    qkv = a.array<float>(n * std::max<int64_t>(qkv_width, 1));
    attn = a.array<float>(n * std::max<int64_t>(nq_max, 1));
    const size_t pairs = n * slots_max;
    g = a.array<float>(pairs * std::max<int64_t>(ff_max, 1));
    u = a.array<float>(pairs * std::max<int64_t>(ff_max, 1));
    act = a.array<float>(pairs * std::max<int64_t>(ff_max, 1));
    router = a.array<float>(n * std::max(hp.n_expert, 1));
    moe_w = a.array<float>(pairs);
    moe_y = a.array<float>(pairs * H);
    q8 = a.array<BlockQ8>(pairs * (k_max / 32 + 1));
    q8b = a.array<BlockQ8>(pairs * (k_max / 32 + 1));
    moe_ids = a.array<int32_t>(pairs);
    moe_counts = a.array<int32_t>(hp.n_expert + 2);
    moe_offsets = a.array<int32_t>(hp.n_expert + 3);
    moe_src = a.array<int32_t>(pairs);
    moe_dst = a.array<int32_t>(pairs);
    seq_cells = a.array<int32_t>(static_cast<size_t>(KVCache::kMaxSeq) * p.n_ctx);
    ids = a.array<int32_t>(n);
    if (out_head) logits = a.array<float>(static_cast<size_t>(kLogitRows) * hp.n_vocab);
    size_t scratch_bytes = 0;
    for (int il = 0; il < n_gpu; ++il)
        scratch_bytes = std::max(scratch_bytes, attention_decode_scratch_bytes(kDecodeGroup, hp.layers[il].n_head,
                                                                               hp.layers[il].n_head_kv, hp.head_dim_k, p.n_ctx));
    attn_scratch = static_cast<float*>(a.reserve(scratch_bytes));
    d_in = a.array<int32_t>(static_cast<size_t>(kInputs) * n);
}

GpuForward::GpuForward(const Model& model, const GpuParams& params) : impl_(std::make_unique<Impl>(model, params)) {
    Impl& m = *impl_;
    const HParams& hp = model.hparams();
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        throw GpuError("no CUDA device");
    }
    const std::string why_not = unsupported(model);
    if (!why_not.empty()) throw GpuError("the GPU backend does not support " + why_not);
    if (params.n_ctx <= 0 || params.n_ubatch <= 0) throw GpuError("n_ctx and n_ubatch must be positive");
    m.n_gpu = gpu_layer_count(params.n_gpu_layers, hp.n_layer);
    m.out_head = gpu_has_output(params.n_gpu_layers, hp.n_layer);
    m.U = std::max(params.n_ubatch, kMaxMmvTokens);

    Arena dry(nullptr);
    m.lay_out(dry);
    size_t free_b = 0, total_b = 0;
    ck(cudaMemGetInfo(&free_b, &total_b), "querying GPU memory");
    const size_t margin = size_t{256} << 20;  // CUDA context, graphs and library workspaces
    if (dry.used() + margin > free_b)
        throw GpuError("not enough GPU memory for " + std::to_string(m.n_gpu) + " layers" +
                       (m.out_head ? " and the output head" : "") + ": needs " + std::to_string(dry.used() >> 20) +
                       " MiB (weights, KV cache for n_ctx " + std::to_string(params.n_ctx) + ", buffers), " +
                       std::to_string(free_b >> 20) + " MiB free; lower n_gpu_layers or n_ctx");
    ck(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking), "creating a stream");
    ck(cudaMalloc(&m.arena, dry.used()), "allocating GPU memory");
    m.arena_bytes = dry.used();
    Arena real(m.arena);
    m.lay_out(real);
    ck(cudaMallocHost(&m.h_in, sizeof(int32_t) * Impl::kInputs * m.U), "allocating pinned memory");
    m.h_out_floats = std::max(static_cast<size_t>(kLogitRows) * std::max(hp.n_vocab, hp.n_embd),
                              static_cast<size_t>(m.U) * hp.n_embd);
    ck(cudaMallocHost(&m.h_out, sizeof(float) * m.h_out_floats), "allocating pinned memory");
    ck(cudaMallocHost(&m.h_ids, sizeof(int32_t) * m.U), "allocating pinned memory");
    std::memset(m.h_in, 0, sizeof(int32_t) * Impl::kInputs * m.U);
}

GpuForward::~GpuForward() = default;
int GpuForward::n_layers() const { return impl_->n_gpu; }
bool GpuForward::has_output() const { return impl_->out_head; }
size_t GpuForward::device_bytes() const { return impl_->arena_bytes; }
const GpuCounters& GpuForward::counters() const { return impl_->counters; }

void GpuForward::Impl::linear(const WeightView& w, const float* xin, const BlockQ8* xq, int n, float* y,
                              int64_t y_stride, bool acc) {
    if (n <= kMaxMmvTokens) {
        if (!xq && mmv_wants_q8(w.type)) {
            quantize_q8(xin, n, w.cols, w.cols, q8b, stream);
            xq = q8b;
        }
        mmv(w, xin, xq, n, y, y_stride, acc, stream);
    } else {
        mm(w, xin, n, y, y_stride, acc, stream);
    }
}

// quantize_input: q8 does not hold h yet (the norm quantized it for another matrix's type).
void GpuForward::Impl::ffn_dense(const ExpertSet& gate, const ExpertSet& up, const ExpertSet& down, int n,
                                 bool quantize_input) {
    const int64_t F = gate.routed.rows, H = hp.n_embd;
    if (n <= kMaxMmvTokens) {
        if (quantize_input && wants_q8(gate)) quantize_q8(h, n, H, H, q8, stream);
        mmv_swiglu(gate, up, h, q8, nullptr, n, 1, act, stream);
        linear(down.routed, act, nullptr, n, x, H, true);
    } else {
        mm(gate.routed, h, n, g, F, false, stream);
        mm(up.routed, h, n, u, F, false, stream);
        swiglu(g, u, static_cast<int64_t>(n) * F, act, stream);
        mm(down.routed, act, n, x, H, true, stream);
    }
}

void GpuForward::Impl::ffn_moe(const DevLayer& l, int n) {
    const int64_t H = hp.n_embd, F = l.ff;
    // The router stays in f32 at every batch size: a bf16 router could flip near-tied experts.
    if (n <= kMaxMmvTokens) mmv(l.router, h, nullptr, n, router, hp.n_expert, false, stream);
    else mm_float(l.router, h, n, router, hp.n_expert, false, stream);
    RouteArgs r;
    r.logits = router;
    r.bias = l.probs_bias;
    r.ids = moe_ids;
    r.weights = moe_w;
    r.n = n;
    r.n_expert = hp.n_expert;
    r.n_used = l.n_used;
    r.n_groups = hp.n_expert_groups > 1 ? hp.n_expert_groups : 1;
    r.n_group_used = hp.n_expert_groups > 1 ? hp.n_group_used : 1;
    r.norm = hp.expert_weights_norm;
    r.fuse_shared = static_cast<bool>(l.gate.shared);
    r.scale = hp.expert_weights_scale;
    moe_route(r, stream);
    const int S = l.n_slots;
    if (n <= kMaxMmvTokens) {
        mmv_swiglu(l.gate, l.up, h, q8, moe_ids, n, S, act, stream);  // h quantized by the norm
        if (wants_q8(l.down)) quantize_q8(act, static_cast<int64_t>(n) * S, F, F, q8b, stream);
        mmv_experts(l.down, act, q8b, true, moe_ids, n, S, moe_y, stream);
    } else {
        moe_group(moe_ids, n, S, l.n_expert_total, moe_counts, moe_offsets, moe_src, moe_dst, stream);
        mm_experts(l.gate, h, moe_offsets, moe_src, moe_dst, n, g, stream);
        mm_experts(l.up, h, moe_offsets, moe_src, moe_dst, n, u, stream);
        swiglu(g, u, static_cast<int64_t>(n) * S * F, act, stream);
        mm_experts(l.down, act, moe_offsets, moe_dst, moe_dst, n, moe_y, stream);
    }
    moe_combine(moe_y, moe_w, n, S, H, x, true, stream);
    if (l.sh_gate.routed) ffn_dense(l.sh_gate, l.sh_up, l.sh_down, n, true);
}

void GpuForward::Impl::layer(int il, int n, const std::vector<std::pair<int, int>>& attn_groups, int bucket) {
    const DevLayer& l = layers[il];
    const int64_t H = hp.n_embd, D = hp.head_dim_k, nq = l.n_head * D;
    const int64_t width = nq + 2 * l.n_head_kv * D;
    const bool small = n <= kMaxMmvTokens;
    const bool qkv_q8 =
        small && std::any_of(l.qkv.begin(), l.qkv.end(), [](const QKVPart& q) { return mmv_wants_q8(q.w.type); });
    rms_norm_q8(x, l.attn_norm, n, H, hp.rms_eps, h, qkv_q8 ? q8 : nullptr, stream);
    for (const QKVPart& part : l.qkv)
        linear(part.w, h, small ? q8 : nullptr, n, qkv + part.col, width, false);
    QKVArgs qa;
    qa.qkv = qkv;
    qa.bias = l.qkv_bias;
    qa.q_norm = l.q_norm;
    qa.k_norm = l.k_norm;
    qa.pos = in(IN_POS);
    qa.cells = in(IN_CELL);
    qa.k_cache = l.k_cache;
    qa.v_cache = l.v_cache;
    qa.n = n;
    qa.n_head = l.n_head;
    qa.n_head_kv = l.n_head_kv;
    qa.head_dim = static_cast<int>(D);
    qa.n_rot = hp.n_rot;
    qa.eps = hp.rms_eps;
    qa.freq_base = hp.rope_freq_base;
    qkv_prepare(qa, stream);

    for (const auto& [t0, len] : attn_groups) {
        AttentionArgs a;
        a.q = qkv + t0 * width;  // the q part of the fused qkv rows, roped in place
        a.q_stride = width;
        a.k_cache = l.k_cache;
        a.v_cache = l.v_cache;
        a.cells = seq_cells;
        a.cell_start = in(IN_START) + t0;
        a.n_visible = in(IN_NVIS) + t0;
        a.out = attn + t0 * nq;
        a.n_tok = std::abs(len);
        a.n_head = l.n_head;
        a.n_head_kv = l.n_head_kv;
        a.head_dim = static_cast<int>(D);
        a.max_visible = bucket;
        a.scale = 1.0f / std::sqrt(static_cast<float>(D));
        if (len < 0)
            attention_prefill(a, stream);  // negative length marks one sequence's long run
        else
            attention_decode(a, attn_scratch, stream);
    }
    linear(l.wo, attn, nullptr, n, x, H, true);
    // The FFN input, quantized here for the matrix-vector kernels (ffn_* then skip quantizing it).
    rms_norm_q8(x, l.post_norm, n, H, hp.rms_eps, h, small && wants_q8(l.gate) ? q8 : nullptr, stream);
    if (l.moe)
        ffn_moe(l, n);
    else
        ffn_dense(l.gate, l.up, l.down, n, false);
}

void GpuForward::Impl::enqueue_layers(int n, const std::vector<std::pair<int, int>>& groups, int bucket) {
    ck(cudaMemcpyAsync(d_in, h_in, sizeof(int32_t) * kInputs * U, cudaMemcpyHostToDevice, stream), "step inputs");
    get_rows(embd, in(IN_TOKEN), n, x, stream);
    for (int il = 0; il < n_gpu; ++il) layer(il, n, groups, bucket);
}

void GpuForward::Impl::enqueue_output(const GpuStepOutput& out, int n_rows, int rows_first) {
    const int64_t H = hp.n_embd;
    gather_rows(x, in(IN_ROWS) + rows_first, n_rows, H, h, stream);
    rms_norm(h, output_norm, n_rows, H, hp.rms_eps, h, stream);
    if (p.embeddings) {
        copy_to_host(h_out, h, sizeof(float) * n_rows * H);
        return;
    }
    for (int r0 = 0; r0 < n_rows; r0 += kMaxMmvTokens)
        linear(output, h + r0 * H, nullptr, std::min(kMaxMmvTokens, n_rows - r0),
               logits + static_cast<int64_t>(r0) * hp.n_vocab, hp.n_vocab, false);
    if (out.kind == GpuStepOutput::Kind::token_ids) {
        SampleParams sp;
        sp.temperature = out.temperature;
        sp.top_k = out.top_k;
        sp.top_p = out.top_p;
        sp.min_p = out.min_p;
        sample_tokens(logits, n_rows, hp.n_vocab, sp, reinterpret_cast<const float*>(in(IN_U)) + rows_first, ids,
                      stream);
        copy_to_host(h_ids, ids, sizeof(int32_t) * n_rows);
    } else {
        copy_to_host(h_out, logits, sizeof(float) * n_rows * hp.n_vocab);
    }
}

void GpuForward::run(const int32_t* token, const int32_t* pos, const int32_t* seq, const int32_t* cells, int n,
                     const KVCache& kv, GpuStepOutput& out) {
    Impl& m = *impl_;
    if (n <= 0 || n > m.U) throw std::invalid_argument("GPU step of " + std::to_string(n) + " tokens (at most " +
                                                       std::to_string(m.U) + ")");
    if (out.kind != GpuStepOutput::Kind::hidden && !m.out_head)
        throw std::logic_error("the output head is not on the GPU");
    const int n_ctx = m.p.n_ctx;

    // Mirror each sequence's position-ordered cell list on the device: usually only the newest
    // cells are appended, so only those are uploaded.
    int max_vis = 1;
    for (int t = 0; t < n; ++t) {
        const int s = seq[t];
        const std::vector<int32_t>& list = kv.seq_cells(s);
        Impl::Mirror& mir = m.mirrors[s];
        const uint64_t epoch = kv.seq_epoch(s);
        if (mir.epoch != epoch || mir.n > list.size()) mir.n = 0;
        if (list.size() > mir.n)
            ck(cudaMemcpyAsync(m.seq_cells + static_cast<size_t>(s) * n_ctx + mir.n, list.data() + mir.n,
                               sizeof(int32_t) * (list.size() - mir.n), cudaMemcpyHostToDevice, m.stream),
               "cell list");
        mir.epoch = epoch;
        mir.n = list.size();
        // Visible: the cells at positions <= pos[t], a prefix of the position-ordered list.
        const auto end = std::upper_bound(list.begin(), list.end(), pos[t],
                                          [&](int32_t p, int32_t cell) { return p < kv.cell_pos(cell); });
        const int nvis = static_cast<int>(end - list.begin());
        m.host_in(Impl::IN_TOKEN)[t] = token[t];
        m.host_in(Impl::IN_POS)[t] = pos[t];
        m.host_in(Impl::IN_CELL)[t] = cells[t];
        m.host_in(Impl::IN_START)[t] = s * n_ctx;
        m.host_in(Impl::IN_NVIS)[t] = std::max(nvis, 1);
        max_vis = std::max(max_vis, nvis);
    }
    // Graph replays need fixed launch shapes: the KV split is sized for a power-of-two bucket.
    int bucket = 256;
    while (bucket < max_vis) bucket *= 2;
    bucket = std::min(bucket, n_ctx);

    // Attention launches: runs of one sequence long enough for the prefill kernel (marked by a
    // negative length), the rest in decode groups.
    std::vector<std::pair<int, int>> groups;
    if (n <= kMaxMmvTokens) {
        groups.push_back({0, n});
    } else {
        int t = 0, pending = -1;
        auto flush = [&](int end) {
            for (int s = pending; pending >= 0 && s < end; s += kDecodeGroup)
                groups.push_back({s, std::min(kDecodeGroup, end - s)});
            pending = -1;
        };
        while (t < n) {
            int e = t + 1;
            while (e < n && seq[e] == seq[t]) ++e;
            if (e - t >= kPrefillRun) {
                flush(t);
                groups.push_back({t, -(e - t)});
            } else if (pending < 0) {
                pending = t;
            }
            t = e;
        }
        flush(n);
    }

    const bool ids_out = out.kind == GpuStepOutput::Kind::token_ids;
    const int n_rows_total = out.kind == GpuStepOutput::Kind::hidden ? 0 : static_cast<int>(out.rows.size());
    for (int i = 0; i < n_rows_total; ++i) {
        m.host_in(Impl::IN_ROWS)[i] = out.rows[i];
        float ui = ids_out && out.u ? out.u[i] : 0.0f;
        std::memcpy(&m.host_in(Impl::IN_U)[i], &ui, sizeof ui);
    }
    ++m.counters.steps;

    if (out.kind == GpuStepOutput::Kind::hidden) {
        m.enqueue_layers(n, groups, bucket);
        m.copy_to_host(m.h_out, m.x, sizeof(float) * n * m.hp.n_embd);
        m.wait();
        std::memcpy(out.out_f32, m.h_out, sizeof(float) * n * m.hp.n_embd);
        return;
    }
    if (n_rows_total == 0) {  // no row wanted: the layers still run, to fill the KV cache
        m.enqueue_layers(n, groups, bucket);
        m.wait();
        return;
    }
    const int64_t width = m.p.embeddings ? m.hp.n_embd : m.hp.n_vocab;
    auto deliver = [&](int r0, int n_rows) {
        m.wait();
        if (ids_out)
            std::memcpy(out.out_ids + r0, m.h_ids, sizeof(int32_t) * n_rows);
        else
            std::memcpy(out.out_f32 + static_cast<int64_t>(r0) * width, m.h_out, sizeof(float) * n_rows * width);
    };
    if (n <= kMaxMmvTokens) {
        // A decode step: replay its graph (captured on first use of this shape).
        const Impl::GraphKey key{n, n_rows_total, static_cast<int>(out.kind), bucket, out.temperature, out.top_k,
                                 out.top_p, out.min_p};
        auto it = m.graphs.find(key);
        if (it == m.graphs.end()) {
            cudaGraph_t graph;
            const GpuCounters before = m.counters;
            ck(cudaStreamBeginCapture(m.stream, cudaStreamCaptureModeThreadLocal), "graph capture");
            try {
                m.enqueue_layers(n, groups, bucket);
                m.enqueue_output(out, n_rows_total, 0);
            } catch (...) {
                cudaStreamEndCapture(m.stream, &graph);
                throw;
            }
            ck(cudaStreamEndCapture(m.stream, &graph), "graph capture");
            m.counters = before;  // the capture recorded copies without running them
            cudaGraphExec_t exec;
            ck(cudaGraphInstantiate(&exec, graph, 0), "graph instantiate");
            cudaGraphDestroy(graph);
            it = m.graphs.emplace(key, exec).first;
            ++m.counters.graph_captures;
        }
        ck(cudaGraphLaunch(it->second, m.stream), "graph launch");
        ++m.counters.graph_replays;
        ++m.counters.device_to_host_copies;  // the one result copy inside the graph
        deliver(0, n_rows_total);
        return;
    }
    m.enqueue_layers(n, groups, bucket);
    for (int r0 = 0; r0 < n_rows_total; r0 += kLogitRows) {
        const int n_rows = std::min(kLogitRows, n_rows_total - r0);
        m.enqueue_output(out, n_rows, r0);
        deliver(r0, n_rows);
    }
}

}  // namespace glmoe
