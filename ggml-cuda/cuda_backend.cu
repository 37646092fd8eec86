// The CUDA backend (src/cuda_backend.h): the ops of src/backend.h from the kernels of kernels.h,
// on one stream. Steps of up to kMaxMmvTokens tokens use the matrix-vector kernels and are
// captured into CUDA graphs (one per stretch between host crossings) that later steps of the
// same shape replay; bigger steps use the tensor-core kernels and run eagerly.
#include "cuda_backend_impl.cuh"

#include <cstdio>

#include "devices.h"

namespace glmoe {

std::unique_ptr<CudaBackend> CudaBackend::create(const Model& model, const Placement& placement,
                                                 const GpuParams& params, ThreadPool& pool) {
    return std::make_unique<CudaBackendImpl>(model, placement, params, pool);
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
    size_t kv_bytes = 0, kv_k_bytes = 0, borrow_bytes = 0;
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
            l.k_row_bytes = kv_row_bytes(p_.type_k, nkv);
            l.v_row_bytes = kv_row_bytes(p_.type_v, nkv);
            l.k_cache = a.reserve(static_cast<size_t>(p_.n_ctx) * l.k_row_bytes);
            kv_k_bytes += static_cast<size_t>(p_.n_ctx) * l.k_row_bytes;
            l.v_cache = a.reserve(static_cast<size_t>(p_.n_ctx) * l.v_row_bytes);
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
        l.borrows = placement_.gpu_can_fetch_experts(model_, il);
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
    memory_.kv_k = kv_k_bytes;
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
    split_ = a.array<float>(kSplitSlices * std::min<size_t>(n, kMaxSplitTokens) * H);
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
    lay_out_sampling(a);
    size_t scratch_bytes = 0;
    for (int il = 0; il < hp_.n_layer; ++il)
        if (layers_[il].attn)
            scratch_bytes = std::max(scratch_bytes, attention_decode_scratch_bytes(kDecodeGroup, hp_.layers[il].n_head,
                                                                                   hp_.layers[il].n_head_kv, hp_.head_dim_k, p_.n_ctx));
    attn_scratch_ = static_cast<float*>(a.reserve(scratch_bytes));
    // A prompt chunk reads a BF16 or quantized cache as f16 rows converted once (kv_rows_to_f16):
    // K and V of the widest layer for n_ctx cells (llama.cpp's flash attention converts such a
    // cache to f16 likewise).
    if (p_.type_k != GGML_TYPE_F16 || p_.type_v != GGML_TYPE_F16) {
        int64_t widest = 0;
        for (int il = 0; il < hp_.n_layer; ++il)
            if (layers_[il].attn) widest = std::max<int64_t>(widest, layers_[il].n_head_kv * D);
        for (uint16_t*& rows : kv_f16_) rows = a.array<uint16_t>(static_cast<size_t>(p_.n_ctx) * widest);
    }
    d_in_ = a.array<int32_t>(static_cast<size_t>(kInputs) * n);
    for (uint8_t*& slot : borrow_slots_) slot = borrow_bytes ? static_cast<uint8_t*>(a.reserve(borrow_bytes)) : nullptr;
    const std::vector<ExpertStreamer::Layer> streamed = streamable_layers();
    stream_slot_ = streamed.empty() ? nullptr : static_cast<uint8_t*>(a.reserve(ExpertStreamer::slot_layout(streamed, n_streamed_)));
    memory_.compute = a.used() - compute_start;
}

std::vector<ExpertStreamer::Layer> CudaBackendImpl::streamable_layers() const {
    std::vector<ExpertStreamer::Layer> out;
    if (n_streamed_ <= 0) return out;
    for (int il = 0; il < hp_.n_layer; ++il) {
        if (!layers_[il].borrows) continue;
        const LayerWeights& w = model_.layer(il);
        ExpertStreamer::Layer l;
        l.il = il;
        const Weight* stacks[ExpertStreamer::kMatrices] = {&w.gate_exps, &w.up_exps, &w.down_exps};
        for (int m = 0; m < ExpertStreamer::kMatrices; ++m) {
            l.stack[m] = stacks[m]->data;
            l.matrix_bytes[m] = stacks[m]->matrix_bytes;
        }
        out.push_back(l);
    }
    return out;
}

CudaBackendImpl::CudaBackendImpl(const Model& model, const Placement& placement, const GpuParams& params,
                                 ThreadPool& pool)
    : model_(model), hp_(model.hparams()), placement_(placement), p_(params), pool_(pool) {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        throw GpuError("no CUDA device");
    }
    const std::string why_not = unsupported(model);
    if (!why_not.empty()) throw GpuError("the GPU backend does not support " + why_not);
    if (params.n_ctx <= 0 || params.n_ubatch <= 0) throw GpuError("n_ctx and n_ubatch must be positive");
    if (!kv_type_supported(params.type_k) || !kv_type_supported(params.type_v))
        throw std::invalid_argument("the GPU's KV cache stores f16, bf16, q8_0 or q4_0, not " + type_name(params.type_k) +
                                    "/" + type_name(params.type_v));
    U_ = std::max(params.n_ubatch, kMaxMmvTokens);
    // From this many tokens a step copies a layer's routed experts from RAM instead of sending its
    // tokens to the CPU. Default 4 x experts / experts used per token (64 for GLM-4.5-Air): on the
    // device (H100, 16 threads, docs/PERFORMANCE.md) a step's CPU experts cost about 10 ms + 3.5 ms
    // a token for the Air-shaped file and copying all of them about 200 ms, even near 56 tokens
    // (ik_llama.cpp's 32 x experts / used, 512, left 256-token steps 3x slower than copying).
    // Never a graph-captured step: the copies run on a stream of their own, ordered by events.
    const int n_used_max = hp_.layers.empty() ? 1 : std::max(1, std::max_element(hp_.layers.begin(), hp_.layers.end(),
        [](const LayerHParams& a, const LayerHParams& b) { return a.n_expert_used < b.n_expert_used; })->n_expert_used);
    n_streamed_ = std::clamp(params.streamed_experts, 0, hp_.n_expert);
    borrow_min_tokens_ = std::max(kMaxMmvTokens + 1, params.expert_borrow_min_tokens > 0
                                                         ? params.expert_borrow_min_tokens
                                                         : 4 * hp_.n_expert / n_used_max);

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
    for (Staging& set : staging_) {
        ck(cudaMallocHost(&set.in, sizeof(int32_t) * kInputs * U_), "allocating pinned memory");
        std::memset(set.in, 0, sizeof(int32_t) * kInputs * U_);
    }
    ck(cudaMallocHost(&h_out_, sizeof(float) * kLogitRows * std::max(hp_.n_vocab, hp_.n_embd)), "allocating pinned memory");
    ck(cudaMallocHost(&h_ids_, sizeof(int32_t) * U_), "allocating pinned memory");
    for (HostActs* b : {&down_, &up_}) {
        const size_t rows = static_cast<size_t>(U_), H = hp_.n_embd;
        ck(cudaMallocHost(&b->x, sizeof(float) * rows * H), "allocating pinned memory");
        ck(cudaMallocHost(&b->h, sizeof(float) * rows * H), "allocating pinned memory");
        ck(cudaMallocHost(&b->moe_out, sizeof(float) * rows * H), "allocating pinned memory");
        ck(cudaMallocHost(&b->route_w, sizeof(float) * rows * slots_max_), "allocating pinned memory");
        ck(cudaMallocHost(&b->route_ids, sizeof(int32_t) * rows * slots_max_), "allocating pinned memory");
    }
    if (borrow_slots_[0]) stager_ = std::make_unique<ExpertStager>(borrow_slots_, pool_);
    if (stream_slot_) start_streaming();
    if (params.f32_activations) allocate_f32_scratch();
    init_sampling();
    const std::vector<float> ones(U_, 1.0f);
    ck(cudaMemcpy(ones_, ones.data(), sizeof(float) * U_, cudaMemcpyHostToDevice), "uploading constants");
}

void CudaBackendImpl::start_streaming() {
    const std::vector<ExpertStreamer::Layer> layers = streamable_layers();
    size_t copied = 0, all = 0;
    for (const ExpertStreamer::Layer& l : layers)
        for (size_t mb : l.matrix_bytes) {
            copied += mb * n_streamed_;
            all += mb * hp_.n_expert;
        }
    // The copy engine reads pinned memory. Memory the file was read into (-lm none) is pinned
    // where it is: any expert can cross, and RAM holds no second copy (on the device, 1 GiB of it
    // in 0.06 s). A mapped file's pages are not: mapping the file and pinning 1 GiB of it had not
    // finished after ~120 s there (docs/PERFORMANCE.md, "Hybrid expert offload"). Experts
    // [0, n_streamed) are copied into pinned memory instead, which cannot be swapped or reclaimed,
    // so the copy must fit beside the mapped experts the CPU reads (or every step would wait on
    // the disk), with room for the rest of the host.
    const bool mapped = model_.file().mapped();
    const uint64_t reserve = uint64_t{4} << 30;
    const uint64_t available = host_memory_available();
    std::string why_not;
    auto start = [&](bool in_place) {
        try {
            streamer_ = std::make_unique<ExpertStreamer>(layers, n_streamed_, hp_.n_expert, in_place, stream_slot_, pool_);
            memory_.pinned_experts = streamer_->pinned_copy_bytes();
            memory_.pinned_in_place = streamer_->pinned_in_place_bytes();
            return true;
        } catch (const GpuError& e) {
            cudaGetLastError();
            why_not = e.what();
            return false;
        }
    };
    if (!mapped && start(/*in_place=*/true)) return;
    if (available != UINT64_MAX && copied + (mapped ? all : 0) + reserve > available)
        why_not = "pinning " + mib(copied) + (mapped ? " beside the mapped experts" : "") + " would leave less than " +
                  mib(reserve) + " of " + mib(available) + " free";
    else if (start(/*in_place=*/false))
        return;
    std::fprintf(stderr, "glmoe: the CPU runs all the routed experts in RAM in small steps (%s)\n", why_not.c_str());
}

CudaBackendImpl::~CudaBackendImpl() {
    streamer_.reset();
    stager_.reset();  // its copies land in the arena
    for (auto& kv : graphs_)
        if (kv.second) cudaGraphExecDestroy(kv.second);
    for (float* f : f32_scratch_)
        if (f) cudaFree(f);
    for (HostActs* b : {&down_, &up_})
        for (void* ptr : {static_cast<void*>(b->x), static_cast<void*>(b->h), static_cast<void*>(b->moe_out),
                          static_cast<void*>(b->route_w), static_cast<void*>(b->route_ids)})
            if (ptr) cudaFreeHost(ptr);
    for (Staging& set : staging_)
        if (set.in) cudaFreeHost(set.in);
    if (h_out_) cudaFreeHost(h_out_);
    if (h_ids_) cudaFreeHost(h_ids_);
    free_sampling();
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
        mirrors_.assign(mirrors_.size(), Mirror{});  // its cell-list scatter never ran
    }
    n_ = n;
    h_q8_valid_ = false;
    ++counters_.steps;
    // The previous step may still run (overlapped decoding): this one stages in the other set.
    stage_ ^= 1;

    // Mirror each sequence's position-ordered cell list on the device: usually only the newest
    // cells are appended (one per token of the step), and those go up with the step's inputs, n
    // entries at most, scattered by the step's first kernel. A longer catch-up (a list rebuilt
    // after a removal) is copied on its own, before the step.
    const bool has_attn = placement_.n_layers_with_attn_on(Device::gpu) > 0;
    int max_vis = 1, n_mirror = 0;
    bool tokens_from_device = false;
    for (int t = 0; t < n; ++t) {
        const int s = step.seq[t];
        int nvis = 1;
        if (has_attn) {
            const std::vector<int32_t>& list = kv.seq_cells(s);
            Mirror& mir = mirrors_[s];
            const uint64_t epoch = kv.seq_epoch(s);
            if (mir.epoch != epoch || mir.n > list.size()) mir.n = 0;
            const size_t base = static_cast<size_t>(s) * p_.n_ctx;
            if (list.size() - mir.n <= static_cast<size_t>(n - n_mirror)) {
                for (size_t j = mir.n; j < list.size(); ++j, ++n_mirror) {
                    host_in(IN_MIRROR_AT)[n_mirror] = static_cast<int32_t>(base + j);
                    host_in(IN_MIRROR_CELL)[n_mirror] = list[j];
                }
            } else {
                ck(cudaMemcpyAsync(seq_cells_ + base + mir.n, list.data() + mir.n,
                                   sizeof(int32_t) * (list.size() - mir.n), cudaMemcpyHostToDevice, stream_),
                   "cell list");
            }
            mir.epoch = epoch;
            mir.n = list.size();
            // Visible: the cells at positions <= pos[t], a prefix of the position-ordered list.
            const auto end = std::upper_bound(list.begin(), list.end(), step.pos[t],
                                              [&](int32_t p, int32_t cell) { return p < kv.cell_pos(cell); });
            nvis = std::max(static_cast<int>(end - list.begin()), 1);
        }
        host_in(IN_TOKEN)[t] = step.token[t];
        tokens_from_device = tokens_from_device || step.token[t] < 0;
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

    // A step's launches depend on n, the KV bucket and the attention groups; without prompt runs
    // (a decode batch, however many sequences) the groups follow from n, so the step is replayable,
    // unless it borrows experts (their copies are ordered by events on a stream of their own).
    const bool prompt_runs = std::any_of(attn_groups_.begin(), attn_groups_.end(),
                                         [](const std::pair<int, int>& g) { return g.second < 0; });
    graphs_on_ = !prompt_runs && !(stager_ && n >= borrow_min_tokens_);
    stretch_state_ = Stretch::fresh;
    stretch_ = 0;
    const int n_rows = out.kind == StepOutput::Kind::none ? 0 : static_cast<int>(out.rows.size());
    if (tokens_from_device && !sampled_) throw std::logic_error("tokens from the device need sampling here");
    tokens_from_device_ = tokens_from_device;
    host_rows_ = 0;
    any_top_ = false;
    if (out.kind == StepOutput::Kind::sampled && n_rows > 0) stage_row_sampling(out);
    key_ = GraphKey{n, bucket_, 0, n_rows, static_cast<int>(out.kind), out.sampling.temperature, out.sampling.top_k,
                    out.sampling.top_p, out.sampling.min_p, host_rows_, any_top_, tokens_from_device_};
    std::fill(host_in(IN_MIRROR_AT) + n_mirror, host_in(IN_MIRROR_AT) + n, -1);
    const bool ids_out = out.kind == StepOutput::Kind::token_ids;
    for (int i = 0; i < n_rows; ++i) {
        host_in(IN_ROWS)[i] = out.rows[i];
        const float ui = ids_out && out.u ? out.u[i] : 0.0f;
        std::memcpy(&host_in(IN_U)[i], &ui, sizeof ui);
    }
    // Outside the graphs (no capture has begun yet): the source alternates between the sets.
    ck(cudaMemcpyAsync(d_in_, staged().in, sizeof(int32_t) * kInputs * U_, cudaMemcpyHostToDevice, stream_),
       "copy to GPU");
    if (has_attn && !skip()) scatter_values(in(IN_MIRROR_AT), in(IN_MIRROR_CELL), n, seq_cells_, stream_);
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
    if (out.kind == StepOutput::Kind::sampled) return output_sampled(out);
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
            output_head(h_, n_rows, logits_);
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
