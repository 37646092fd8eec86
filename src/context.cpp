#include "context.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>

#include "devices.h"
#include "glm4moe.h"
#include "placed_kv_rows.h"

namespace glmoe {

namespace {

// Why this process cannot put anything on a GPU ("" when it can).
std::string gpu_unavailable(const Model& model) {
    if (!built_with_cuda()) return "this build has no CUDA backend";
    if (cuda_device_count() == 0) return "no CUDA device was found";
    const std::string why = CudaBackend::unsupported(model);
    return why.empty() ? "" : "the GPU backend does not support " + why;
}

Placement place(const Model& model, const ContextParams& p) {
    const std::string why_not = p.cpu_as_gpu ? "" : gpu_unavailable(model);
    std::string note;
    Placement pl = Placement::decide(model, PlacementParams{p.n_gpu_layers, p.tensor_overrides}, why_not.empty(), &note);
    if (!note.empty()) std::fprintf(stderr, "glmoe: %s (%s)\n", note.c_str(), why_not.c_str());
    return pl;
}

// n_threads: 0 or -1 (llama.cpp's "default") mean every hardware thread; other values must be
// in [1, kMaxThreads].
int default_threads(int n) {
    if (n < -1 || n > kMaxThreads)
        throw std::invalid_argument("n_threads " + std::to_string(n) + " is out of range (0 or -1 for the default, or 1 to " +
                                    std::to_string(kMaxThreads) + ")");
    if (n > 0) return n;
    return std::max(1u, std::thread::hardware_concurrency());
}

// What the K and V rows of the layers whose attention runs on `d` store. The GPU's kernels read
// f16, q8_0 and q4_0 rows, so another explicit type is refused while a layer's attention is there;
// cpu_as_gpu stands in for the GPU and is refused alike.
KVTypes kv_types_on(Device d, const Placement& placement, const ContextParams& p) {
    check_kv_type(p.type_k, "type_k");
    check_kv_type(p.type_v, "type_v");
    const int n_gpu = placement.n_layers_with_attn_on(Device::gpu);
    for (const auto& [type, flag, name] :
         {std::tuple{p.type_k, "-ctk", "type_k"}, std::tuple{p.type_v, "-ctv", "type_v"}})
        if (n_gpu > 0 && type != kKVTypeDefault && !CudaBackend::kv_type_supported(static_cast<uint32_t>(type)))
            throw std::invalid_argument(std::string(flag) + " " + kv_type_name(type) + " (" + name + "=" +
                                        std::to_string(type) + ") is not implemented for layers on the GPU yet (" +
                                        std::to_string(n_gpu) + (n_gpu == 1 ? " layer's" : " layers'") +
                                        " attention is there, and the GPU's KV cache stores f16, bf16, q8_0 or q4_0): "
                                        "give " + flag + " one of those, or keep attention on the CPU");
    const uint32_t fallback = d == Device::gpu && !p.cpu_as_gpu ? GGML_TYPE_F16 : GGML_TYPE_F32;
    KVTypes t;
    t.k = p.type_k == kKVTypeDefault ? fallback : static_cast<uint32_t>(p.type_k);
    t.v = p.type_v == kKVTypeDefault ? fallback : static_cast<uint32_t>(p.type_v);
    return t;
}


// ContextParams::gpu_expert_share resolved. The default was measured on the device
// (docs/PERFORMANCE.md, "Hybrid expert offload"): it balances the copy engine's bandwidth from RAM
// with the CPU threads' (H100 over PCIe 5, 16 Xeon threads).
double expert_share(double share) {
    constexpr double kDefaultShare = 0.4;
    if (share < 0) share = kDefaultShare;
    if (!(share <= 1)) throw std::invalid_argument("gpu_expert_share " + std::to_string(share) + " is not in [0, 1]");
    return share;
}

}  // namespace

Context::Context(const Model& model, const ContextParams& params)
    : model_(model),
      embeddings_(params.embeddings),
      placement_(place(model, params)),
      n_ubatch_(std::max(1, params.n_ubatch)),
      pool_(default_threads(params.n_threads)),
      kv_(params.n_ctx),
      cpu_(std::make_unique<CpuBackend>(model, placement_, pool_, params.n_ctx, params.embeddings,
                                        params.f32_activations, Device::cpu,
                                        kv_types_on(Device::cpu, placement_, params))) {
    placement_.gpu_expert_share = expert_share(params.gpu_expert_share);
    const int n_streamed = static_cast<int>(std::lround(placement_.gpu_expert_share * model.hparams().n_expert));
    if (params.cpu_as_gpu) {
        cpu_as_gpu_ = std::make_unique<CpuBackend>(model, placement_, pool_, params.n_ctx, params.embeddings,
                                                   params.f32_activations, Device::gpu,
                                                   kv_types_on(Device::gpu, placement_, params));
        for (int il = 0; il < model.hparams().n_layer; ++il)
            if (placement_.gpu_can_fetch_experts(model, il)) placement_.layers[il].gpu_streamed_experts = n_streamed;
    } else if (placement_.uses(Device::gpu)) {
        GpuParams gp;
        gp.n_ctx = params.n_ctx;
        gp.n_ubatch = n_ubatch_;
        gp.embeddings = params.embeddings;
        gp.f32_activations = params.f32_activations;
        gp.expert_borrow_min_tokens = params.expert_borrow_min_tokens;
        gp.streamed_experts = n_streamed;
        const KVTypes gpu_kv = kv_types_on(Device::gpu, placement_, params);
        gp.type_k = gpu_kv.k;
        gp.type_v = gpu_kv.v;
        gpu_ = CudaBackend::create(model, placement_, gp, pool_);
        for (int il = 0; il < model.hparams().n_layer; ++il)
            placement_.layers[il].gpu_streamed_experts = gpu_->streamed_experts(il);
    }
}

Context::~Context() = default;

int64_t Context::n_outputs_per_token() const {
    return embeddings_ ? model_.hparams().n_embd : model_.hparams().n_vocab;
}

int Context::invariant_batch() const {
    return gpu_ ? CudaBackend::kInvariantBatch : std::numeric_limits<int>::max();
}

std::string Context::placement_summary() const {
    const int n_layer = model_.hparams().n_layer;
    // llama.cpp counts the output head as one more layer.
    const int offloaded = n_gpu_layers() + (placement_.output == Device::gpu ? 1 : 0);
    std::string s = "offloaded " + std::to_string(offloaded) + "/" + std::to_string(n_layer + 1) +
                    " layers to GPU (attention and KV cache of " + std::to_string(n_gpu_layers()) + " layers" +
                    (placement_.output == Device::gpu ? ", the output head" : "") + ")\n";
    int cpu_experts = 0, moe_layers = 0;
    for (int il = 0; il < n_layer; ++il)
        if (model_.hparams().layers[il].is_moe) {
            ++moe_layers;
            cpu_experts += placement_.layers[il].experts == Device::cpu;
        }
    if (gpu_) s += "routed experts of " + std::to_string(cpu_experts) + "/" + std::to_string(moe_layers) +
                   " MoE layers on the CPU\n";
    int streamed_layers = 0, streamed = 0;
    for (const LayerPlacement& lp : placement_.layers)
        if (lp.gpu_streamed_experts > 0) {
            ++streamed_layers;
            streamed = lp.gpu_streamed_experts;
        }
    if (streamed_layers > 0)
        s += "in small steps the GPU runs " + std::to_string(std::lround(100 * placement_.gpu_expert_share)) +
             "% of the routed experts of those " + std::to_string(streamed_layers) + " layers, among experts 0-" +
             std::to_string(streamed - 1) +
             (gpu_ && gpu_->memory().pinned_in_place ? ", read from the model's own pages, pinned in place"
                                                      : ", copied from pinned memory") + " (gpu_expert_share)\n";
    size_t cpu_weights = 0;
    for (const auto& [name, dev] : placement_.tensors)
        if (dev == Device::cpu)
            if (const GGUFTensorInfo* t = model_.file().find_tensor(name)) cpu_weights += t->n_bytes;
    // llama.cpp's buffer names: weights in the mapped file, or read into memory (--no-mmap).
    s += std::string(model_.file().mapped() ? "CPU_Mapped" : "CPU") + " model buffer size = " + mib(cpu_weights) + "\n";
    s += "CPU KV buffer size = " + mib(cpu_->kv_bytes()) + "\n";
    // As llama.cpp's llama_kv_cache line: the whole cache, K and V apart.
    size_t k_bytes = cpu_->kv_k_bytes(), v_bytes = cpu_->kv_v_bytes();
    if (cpu_as_gpu_) k_bytes += cpu_as_gpu_->kv_k_bytes(), v_bytes += cpu_as_gpu_->kv_v_bytes();
    if (gpu_) k_bytes += gpu_->memory().kv_k, v_bytes += gpu_->memory().kv - gpu_->memory().kv_k;
    s += "KV cache size = " + mib(k_bytes + v_bytes) + " (" + std::to_string(kv_.n_ctx()) + " cells, " +
         std::to_string(n_layer) + " layers), K (" + kv_type_k_name() + "): " + mib(k_bytes) + ", V (" +
         kv_type_v_name() + "): " + mib(v_bytes) + "\n";
    if (gpu_) {
        const GpuMemory m = gpu_->memory();
        s += "CUDA0 model buffer size = " + mib(m.weights) + "\n";
        s += "CUDA0 KV buffer size = " + mib(m.kv) + "\n";
        s += "CUDA0 compute buffer size = " + mib(m.compute) + "\n";
        if (m.pinned_experts) s += "CUDA_Host model buffer size = " + mib(m.pinned_experts) + "\n";
        if (m.pinned_in_place) s += "model pages pinned in place for the GPU's expert copies = " + mib(m.pinned_in_place) + "\n";
    }
    return s;
}

namespace {

// "f32", or "f32/f16" when the CPU's layers and the GPU's differ.
std::string joined_names(const std::vector<uint32_t>& types) {
    std::string out;
    for (size_t i = 0; i < types.size(); ++i)
        if (std::find(types.begin(), types.begin() + i, types[i]) == types.begin() + i)
            out += (out.empty() ? "" : "/") + kv_type_name(types[i]);
    return out;
}

}  // namespace

std::string Context::kv_type_k_name() const {
    std::vector<uint32_t> types;
    if (placement_.n_layers_with_attn_on(Device::cpu) > 0 || n_gpu_layers() == 0) types.push_back(cpu_->type_k());
    if (n_gpu_layers() > 0) types.push_back(cpu_as_gpu_ ? cpu_as_gpu_->type_k() : gpu_->type_k());
    return joined_names(types);
}

std::string Context::kv_type_v_name() const {
    std::vector<uint32_t> types;
    if (placement_.n_layers_with_attn_on(Device::cpu) > 0 || n_gpu_layers() == 0) types.push_back(cpu_->type_v());
    if (n_gpu_layers() > 0) types.push_back(cpu_as_gpu_ ? cpu_as_gpu_->type_v() : gpu_->type_v());
    return joined_names(types);
}

size_t Context::kv_bytes() const {
    return cpu_->kv_bytes() + (cpu_as_gpu_ ? cpu_as_gpu_->kv_bytes() : 0) + (gpu_ ? gpu_->memory().kv : 0);
}

PlacedKVRows Context::kv_rows() const {
    return PlacedKVRows(placement_, *cpu_, cpu_as_gpu_ ? static_cast<KVRows*>(cpu_as_gpu_.get()) : gpu_.get());
}

std::vector<uint8_t> Context::kv_save() {
    PlacedKVRows rows = kv_rows();
    return kv_.save(rows);
}

std::string Context::kv_state_unsupported() const {
    try {
        const PlacedKVRows rows = kv_rows();
        rows.type_k();
        rows.type_v();
    } catch (const std::invalid_argument& e) {
        return e.what();
    }
    return "";
}

std::vector<uint8_t> Context::kv_seq_save(int seq) {
    PlacedKVRows rows = kv_rows();
    return kv_.save_seq(seq, rows);
}

int Context::kv_seq_load(int seq, const std::vector<uint8_t>& bytes, int max_cells) {
    PlacedKVRows rows = kv_rows();
    return kv_.load_seq(seq, bytes, rows, max_cells);
}

void Context::kv_load(const std::vector<uint8_t>& bytes) {
    PlacedKVRows rows = kv_rows();
    kv_.load(bytes, rows);
}

void Context::check_batch(const Batch& b, int rows_from_device) const {
    const size_t n = b.token.size();
    if (n == 0) throw std::invalid_argument("empty batch");
    if (b.pos.size() != n || b.seq.size() != n || b.want_logits.size() != n)
        throw std::invalid_argument("batch arrays differ in length");
    const int n_vocab = model_.hparams().n_vocab;
    for (size_t i = 0; i < n; ++i) {
        KVCache::check_seq(b.seq[i]);
        const int32_t t = b.token[i];
        if ((t < 0 && -1 - t >= rows_from_device) || t >= n_vocab)
            throw std::invalid_argument("token id " + std::to_string(t) + " out of range [0, " +
                                        std::to_string(n_vocab) + ")" +
                                        (t < 0 && rows_from_device > 0
                                             ? " (nor a row of the previous step's " +
                                                   std::to_string(rows_from_device) + ")"
                                             : ""));
    }
}

void Context::check_none_pending(const char* what) const {
    if (!pending_rows_.empty())
        throw std::logic_error(std::string(what) + " while overlapped steps are pending (end_sampled them first)");
}

void Context::decode(const Batch& batch, std::vector<float>& logits) {
    check_none_pending("decode");
    check_batch(batch);
    last_sampled_rows_ = 0;
    size_t n_rows = 0;
    for (uint8_t w : batch.want_logits) n_rows += w != 0;
    run_allocated(batch, [&](const std::vector<int32_t>& cells) {
        logits.resize(n_rows * n_outputs_per_token());
        StepOutput proto;
        proto.kind = StepOutput::Kind::logits;
        proto.logits = logits.data();
        forward(batch, cells, proto);
    });
}

void Context::decode_sample(const Batch& batch, const DeviceSampling& sampling, const std::vector<float>& u,
                            std::vector<int32_t>& ids) {
    if (!samples_on_gpu()) throw std::logic_error("decode_sample needs the output head on the GPU");
    check_none_pending("decode_sample");
    check_batch(batch);
    last_sampled_rows_ = 0;
    size_t n_rows = 0;
    for (uint8_t w : batch.want_logits) n_rows += w != 0;
    if (sampling.temperature > 0 && u.size() != n_rows)
        throw std::invalid_argument("decode_sample needs one uniform draw per flagged row");
    run_allocated(batch, [&](const std::vector<int32_t>& cells) {
        ids.resize(n_rows);
        StepOutput proto;
        proto.kind = StepOutput::Kind::token_ids;
        proto.ids = ids.data();
        proto.sampling = sampling;
        proto.u = sampling.temperature > 0 ? u.data() : nullptr;
        forward(batch, cells, proto);
    });
}

bool Context::samples_row_on_gpu(const SamplingParams& p) const {
    if (!samples_on_gpu() || p.logit_bias.size() > static_cast<size_t>(kMaxRowLogitBias)) return false;
    const int n_vocab = model_.hparams().n_vocab;
    return p.typical_p >= 1.0f || n_vocab <= kMaxTypicalCandidates || (p.top_k > 0 && p.top_k <= kMaxTypicalCandidates);
}

size_t Context::check_row_sampling(const Batch& batch, const std::vector<RowSampling>& rows) const {
    size_t n_rows = 0;
    for (uint8_t w : batch.want_logits) n_rows += w != 0;
    if (rows.size() != n_rows) throw std::invalid_argument("decode_sample_rows needs one RowSampling per flagged row");
    size_t n_host = 0;
    for (const RowSampling& r : rows) {
        if (!r.params) {
            ++n_host;
            continue;
        }
        if (!samples_row_on_gpu(*r.params))
            throw std::invalid_argument("these sampling parameters are sampled on the host (typical_p with top_k "
                                        "off or above " + std::to_string(kMaxTypicalCandidates) +
                                        ", or more than " + std::to_string(kMaxRowLogitBias) + " logit_bias entries)");
        Sampler::check(*r.params, model_.hparams().n_vocab);
        if (r.params->temperature > 0 && !(r.u >= 0.0 && r.u < 1.0))
            throw std::invalid_argument("u must lie in [0, 1)");
    }
    return n_host;
}

void Context::decode_sample_rows(const Batch& batch, const std::vector<RowSampling>& rows, SampledRows& out) {
    if (!samples_on_gpu()) throw std::logic_error("decode_sample_rows needs the output head on the GPU");
    check_none_pending("decode_sample_rows");
    check_batch(batch);
    const size_t n_host = check_row_sampling(batch, rows), n_rows = rows.size();
    last_sampled_rows_ = 0;
    run_allocated(batch, [&](const std::vector<int32_t>& cells) {
        out.reset(n_rows, n_host * model_.hparams().n_vocab);
        StepOutput proto;
        proto.kind = StepOutput::Kind::sampled;
        proto.ids = out.ids.data();
        proto.logprobs = out.logprobs.data();
        proto.top = out.top.data();
        proto.logits = out.host_logits.data();
        proto.row_sampling = rows.data();
        forward(batch, cells, proto);
    });
    last_sampled_rows_ = static_cast<int>(n_rows);
}

bool Context::overlaps() const {
    if (!samples_on_gpu() || cpu_as_gpu_ || placement_.embd != Device::gpu) return false;
    for (const LayerPlacement& l : placement_.layers)
        if (l.attn != Device::gpu || l.ffn != Device::gpu || l.experts != Device::gpu || l.shared != Device::gpu)
            return false;
    return true;
}

void Context::begin_sampled(const Batch& batch, const std::vector<RowSampling>& rows) {
    if (!overlaps()) throw std::logic_error("overlapped decoding needs the whole model on the GPU");
    if (pending_rows_.size() >= static_cast<size_t>(CudaBackend::kMaxDeferredSteps))
        throw std::logic_error("too many overlapped steps pending (end_sampled the oldest first)");
    check_batch(batch, last_sampled_rows_);
    if (batch.size() > static_cast<size_t>(n_ubatch_))
        throw std::invalid_argument("an overlapped step takes at most n_ubatch (" + std::to_string(n_ubatch_) +
                                    ") tokens");
    if (check_row_sampling(batch, rows) > 0)
        throw std::invalid_argument("an overlapped step samples every flagged row on the GPU");
    for (const RowSampling& r : rows)
        if (r.params->penalizes())
            throw std::invalid_argument("an overlapped step takes no penalties (their history is a step behind)");
    last_sampled_rows_ = 0;
    run_allocated(
        batch,
        [&](const std::vector<int32_t>& cells) {
            StepOutput proto;
            proto.kind = StepOutput::Kind::sampled;
            proto.row_sampling = rows.data();
            proto.deferred = true;
            forward(batch, cells, proto);
        },
        /*timed=*/false);
    pending_rows_.push_back(rows.size());
    last_sampled_rows_ = static_cast<int>(rows.size());
}

void Context::end_sampled(SampledRows& out) {
    if (pending_rows_.empty()) throw std::logic_error("end_sampled without a step begun");
    const size_t n_rows = pending_rows_.front();
    pending_rows_.pop_front();
    out.reset(n_rows, 0);
    gpu_->finish_sampled(out.ids.data(), out.logprobs.data(), out.top.data());
}

void Context::run_allocated(const Batch& batch, const std::function<void(const std::vector<int32_t>&)>& forward,
                            bool timed) {
    const std::vector<int32_t> cells = kv_.allocate(batch.seq, batch.pos);
    try {
        const auto t0 = std::chrono::steady_clock::now();
        forward(cells);
        if (timed)
            step_costs_.record(static_cast<int>(batch.size()),
                               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    } catch (...) {
        for (size_t i = 0; i < cells.size(); ++i) kv_.seq_rm(batch.seq[i], batch.pos[i], batch.pos[i] + 1);
        throw;
    }
    n_evaluated_ += batch.size();
}

void Context::forward(const Batch& batch, const std::vector<int32_t>& cells, const StepOutput& proto) {
    const Backends backends{cpu_.get(), cpu_as_gpu_ ? static_cast<Backend*>(cpu_as_gpu_.get()) : gpu_.get()};
    const int64_t n = static_cast<int64_t>(batch.size());
    const int64_t width = n_outputs_per_token();
    // The CPU backend takes any batch at once; the GPU's buffers hold n_ubatch tokens.
    const int64_t chunk = gpu_ ? n_ubatch_ : n;
    int64_t rows_done = 0, host_rows_done = 0;
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t c1 = std::min(n, c0 + chunk);
        Step step;
        step.n = static_cast<int>(c1 - c0);
        step.token = batch.token.data() + c0;
        step.pos = batch.pos.data() + c0;
        step.seq = batch.seq.data() + c0;
        step.cells = cells.data() + c0;
        step.kv = &kv_;
        StepOutput out = proto;
        for (int64_t t = c0; t < c1; ++t)
            if (batch.want_logits[t]) out.rows.push_back(static_cast<int32_t>(t - c0));
        if (out.rows.empty()) out.kind = StepOutput::Kind::none;
        // Per-row sampling returns logits only for the rows without params, packed.
        const bool sampled = proto.kind == StepOutput::Kind::sampled;
        if (proto.logits) out.logits = proto.logits + (sampled ? host_rows_done : rows_done) * width;
        if (proto.ids) out.ids = proto.ids + rows_done;
        if (proto.u) out.u = proto.u + rows_done;
        if (proto.row_sampling) out.row_sampling = proto.row_sampling + rows_done;
        if (proto.logprobs) out.logprobs = proto.logprobs + rows_done;
        if (proto.top) out.top = proto.top + rows_done * kMaxSampledTop;
        glm4moe_forward(model_, placement_, backends, step, out);
        for (size_t i = 0; sampled && i < out.rows.size(); ++i) host_rows_done += !out.row_sampling[i].params;
        rows_done += static_cast<int64_t>(out.rows.size());
    }
}

}  // namespace glmoe
