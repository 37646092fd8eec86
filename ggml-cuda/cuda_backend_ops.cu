// The CUDA backend's layer ops (src/backend.h): each only enqueues work on the backend's stream,
// unless a replayed graph already holds it (skip()).
#include "cuda_backend_impl.cuh"
#include "expert_split.h"

namespace glmoe {
namespace {

// Whether passes of the matrix-vector kernel beat `mm` for n tokens: for few, long rows (GLM's
// attention output, 12288 -> 4096, and dense down projection, 10944 -> 4096) `mm` has 32 blocks
// of 128 rows, a quarter of an H100's SMs, each walking the whole K range. Measured with
// bench_moe_gpu (H100, attention output): 16 tokens 98 vs 231 us, 32 191 vs 260, 64 373 vs 316.
// mm_split (below) is faster still from 9 tokens (53 us at 16, 60 at 32), but taking it below 33
// tokens (bf16 tiles where the passes read 8-bit activations, as a decode step does) moved greedy
// tokens of batched decoding against a teacher-forced re-run past test_cuda_model's near-tie bound
// in 2 runs of 3 on an H100 (2026-12-07): the passes stay there until that is understood.
// Shape and token count alone decide, as at kMaxMmvTokens.
bool mmv_passes_win(const WeightView& w, int n) {
    return w.rows <= 4096 && w.cols >= kSplitMinCols && n <= 4 * kMaxMmvTokens;
}

// Whether mm over column slices beats plain mm for n tokens (kMaxSplitTokens: cuda_backend_impl.cuh);
// both read the same bf16 tiles. Shape and token count alone decide; rows <= n_embd bounds the
// slices' scratch (split_).
bool split_wins(const WeightView& w, int n, int64_t n_embd) {
    return n > kMaxMmvTokens && n <= kMaxSplitTokens && w.rows <= n_embd && w.cols >= kSplitMinCols;
}

// Up to this many tokens the f32 router runs as matrix-vector passes rather than mm_float: for
// GLM's 128 x 4096 router (bench_moe_gpu, H100) passes take ~8 us per 8 tokens, mm_float ~64 us
// at any count up to 512 (4 row blocks, each a column walk split over 8 warps).
constexpr int kMaxRouterPassTokens = 64;

}  // namespace

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
    } else if (n <= kMaxMmvTokens || mmv_passes_win(w, n)) {
        mmv_passes(w, xin, xq, n, y, y_stride, acc);
    } else if (split_wins(w, n, hp_.n_embd)) {
        mm_split(w, xin, n, y, y_stride, acc, kSplitSlices, split_, stream_);
    } else {
        mm(w, xin, n, y, y_stride, acc, stream_);
    }
}

void CudaBackendImpl::mmv_passes(const WeightView& w, const float* xin, const BlockQ8* xq, int n, float* y,
                                 int64_t y_stride, bool acc) {
    if (!xq && mmv_wants_q8(w.type)) {
        quantize_q8(xin, n, w.cols, w.cols, q8b_, stream_);
        xq = q8b_;
    }
    for (int t0 = 0; t0 < n; t0 += kMaxMmvTokens)
        mmv(w, xin + static_cast<int64_t>(t0) * w.cols, xq ? xq + static_cast<int64_t>(t0) * (w.cols / 32) : nullptr,
            std::min(kMaxMmvTokens, n - t0), y + t0 * y_stride, y_stride, acc, stream_);
}

void CudaBackendImpl::output_head(const float* h, int n_rows, float* logits) {
    linear(output_, h, nullptr, n_rows, logits, hp_.n_vocab, false);
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

void CudaBackendImpl::embed(const Weight&) {
    if (skip()) return;
    if (tokens_from_device_) resolve_tokens(in(IN_TOKEN), n_, sampled_, stream_);
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
    qa.type_k = p_.type_k;
    qa.type_v = p_.type_v;
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
        a.type_k = p_.type_k;
        a.type_v = p_.type_v;
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
        if (len < 0 && kv_f16_[0]) {
            // One conversion of the visible rows, not one per block and tile (attention_prefill.cu).
            const int64_t kv_width = l.n_head_kv * D;
            kv_rows_to_f16(l.k_cache, p_.type_k, kv_width, seq_cells_, a.cell_start, a.n_visible, a.n_tok, bucket_,
                           kv_f16_[0], stream_);
            kv_rows_to_f16(l.v_cache, p_.type_v, kv_width, seq_cells_, a.cell_start, a.n_visible, a.n_tok, bucket_,
                           kv_f16_[1], stream_);
            a.k_cache = kv_f16_[0];
            a.v_cache = kv_f16_[1];
            a.type_k = a.type_v = GGML_TYPE_F16;
            a.cells = nullptr;
        }
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
    if (n_ <= kMaxRouterPassTokens) mmv_passes(l.router, h_, nullptr, n_, router_, hp_.n_expert, false);
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
                                     const ExpertSet& down, int routes, float* out, bool acc) {
    const int64_t H = hp_.n_embd, F = l.ff;
    const bool with_shared = static_cast<bool>(gate.shared);
    const int S = routes + (with_shared ? 1 : 0);
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

std::vector<ExpertStager::Piece> CudaBackendImpl::expert_pieces(int il) const {
    const LayerWeights& w = model_.layer(il);
    return {{w.gate_exps.data, stack_bytes(w.gate_exps)}, {w.up_exps.data, stack_bytes(w.up_exps)},
            {w.down_exps.data, stack_bytes(w.down_exps)}};
}

void CudaBackendImpl::borrow_experts(int il, ExpertSet& gate, ExpertSet& up, ExpertSet& down, int* slot) {
    // The whole layer, whichever experts this step routes to: a step this big uses nearly all of
    // them, and a copy that needs no routing can start a layer ahead (moe_experts).
    const LayerWeights& w = model_.layer(il);
    *slot = stager_->stage(il, expert_pieces(il));
    const uint8_t* dst = stager_->use(*slot, stream_);
    for (const auto& [src, set] : {std::pair<const Weight*, ExpertSet*>{&w.gate_exps, &gate}, {&w.up_exps, &up},
                                   {&w.down_exps, &down}}) {
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
    int slot = -1;
    if (borrow) borrow_experts(il, gate, up, down, &slot);
    if (l.experts || borrow) {
        routed_experts(l, gate, up, down, l.n_used, out, acc);
        acc = true;
    } else if (streamer_ && l.borrows) {
        acc = streamed_experts_of(il, out, acc) || acc;
    }
    if (borrow) {
        stager_->release(slot, stream_);
        // The next borrowing layer's copy runs while this layer's experts and the next attention do.
        for (int next = il + 1; next < hp_.n_layer; ++next)
            if (layers_[next].borrows) {
                stager_->stage(next, expert_pieces(next));
                break;
            }
    }
    if (l.shared && !fused(il)) swiglu_ffn(l.sh_gate, l.sh_up, l.sh_down, out, acc);
}

bool CudaBackendImpl::streamed_experts_of(int il, float* out, bool acc) {
    const DevLayer& l = layers_[il];
    const int k = l.n_used;
    // The routing the forward just downloaded for the CPU's share gives this side's experts
    // (expert_split.h); each token's routes to them, as places in the slot, padded to the longest
    // with weight-0 routes to place 0.
    const int32_t* ids = down_.route_ids;
    const float* weights = down_.route_w;
    const std::vector<int> copied =
        gpu_step_experts(ids, n_, k, hp_.n_expert, streamer_->fetchable(), placement_.gpu_expert_share);
    std::vector<int> place(hp_.n_expert, -1);
    for (size_t j = 0; j < copied.size(); ++j) place[copied[j]] = static_cast<int>(j);
    auto here = [&](int e) { return e >= 0 && e < hp_.n_expert && place[e] >= 0; };
    int routes = 0;
    for (int t = 0; t < n_; ++t) {
        int n_here = 0;
        for (int j = 0; j < k; ++j) n_here += here(ids[t * k + j]);
        routes = std::max(routes, n_here);
    }
    // Eager from here, whatever the graphs: the copies and the shapes change every step.
    end_stretch();
    if (routes == 0) return false;
    for (int t = 0; t < n_; ++t) {
        int r = 0;
        for (int j = 0; j < k; ++j)
            if (const int e = ids[t * k + j]; here(e)) {
                up_.route_ids[t * routes + r] = place[e];
                up_.route_w[t * routes + r] = weights[t * k + j];
                ++r;
            }
        for (; r < routes; ++r) {
            up_.route_ids[t * routes + r] = 0;
            up_.route_w[t * routes + r] = 0.0f;
        }
    }
    const bool graphs = graphs_on_;
    graphs_on_ = false;
    const uint8_t* stacks[ExpertStreamer::kMatrices];
    streamer_->stage(il, copied, stream_, stacks);
    copy_to_device(moe_ids_, up_.route_ids, sizeof(int32_t) * n_ * routes);
    copy_to_device(moe_w_, up_.route_w, sizeof(float) * n_ * routes);
    const LayerWeights& w = model_.layer(il);
    ExpertSet gate = l.gate, up = l.up, down = l.down;
    gate.shared = up.shared = down.shared = WeightView{};
    gate.routed = view_of(w.gate_exps, stacks[0], w.gate_exps.ne[1]);
    up.routed = view_of(w.up_exps, stacks[1], w.up_exps.ne[1]);
    down.routed = view_of(w.down_exps, stacks[2], w.down_exps.ne[1]);
    gate.n_routed = up.n_routed = down.n_routed = static_cast<int>(copied.size());
    routed_experts(l, gate, up, down, routes, out, acc);
    streamer_->release(stream_);
    graphs_on_ = graphs;
    return true;
}

void CudaBackendImpl::add_moe_out() {
    if (skip()) return;
    moe_combine(moe_out_, ones_, n_, 1, hp_.n_embd, x_, true, stream_);
}

}  // namespace glmoe
