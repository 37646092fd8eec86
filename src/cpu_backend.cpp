#include "cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <stdexcept>

#include "devices.h"
#include "expert_split.h"
#include "quantize_row.h"
#include "quants.h"
#include "vec.h"

namespace glmoe {

namespace {

void add_bias(float* y, const std::vector<float>& b, int64_t n) {
    if (b.empty()) return;
    const int64_t w = static_cast<int64_t>(b.size());
    for (int64_t t = 0; t < n; ++t) vec_add(y + t * w, b.data(), w);
}

// Neox rope on the first n_rot dims of each head: pairs (i, i + n_rot/2).
void rope_heads(float* x, int n_heads, int head_dim, int n_rot, const float* cos, const float* sin) {
    const int half = n_rot / 2;
    for (int h = 0; h < n_heads; ++h) {
        float* v = x + static_cast<int64_t>(h) * head_dim;
        for (int i = 0; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = a * sin[i] + b * cos[i];
        }
    }
}

}  // namespace

CpuBackend::CpuBackend(const Model& model, const Placement& placement, ThreadPool& pool, int n_ctx, bool embeddings,
                       bool f32_activations, Device serves, KVTypes kv_types)
    : model_(model), hp_(model.hparams()), placement_(placement), pool_(pool), embeddings_(embeddings),
      f32_activations_(f32_activations), serves_(serves), kv_types_(kv_types) {
    uint64_t per_position = 0;
    for (int il = 0; il < hp_.n_layer; ++il) {
        const bool here = placement.layers[il].attn == serves;
        const int64_t width = here ? static_cast<int64_t>(hp_.layers[il].n_head_kv) * hp_.head_dim_k : 0;
        for (const auto& [type, flag] : {std::pair{kv_types.k, "-ctk"}, std::pair{kv_types.v, "-ctv"}}) {
            const int64_t block = type_traits(type).block_size;
            if (width % block != 0)
                throw std::invalid_argument(std::string(flag) + " " + kv_type_name(type) + ": its blocks of " +
                                            std::to_string(block) + " values do not divide the K/V rows of layer " +
                                            std::to_string(il) + " (" + std::to_string(width) +
                                            " values: n_head_kv x head_dim); choose f32, f16 or bf16");
        }
        kv_width_.push_back(width);
        k_row_bytes_.push_back(row_bytes(kv_types.k, width));
        v_row_bytes_.push_back(row_bytes(kv_types.v, width));
        per_position += k_row_bytes_.back() + v_row_bytes_.back();
    }
    // The cache is zero-filled as it is allocated: one that does not fit took minutes to end in
    // bad_alloc, so it is refused first, with what it needs.
    const uint64_t need = per_position * static_cast<uint64_t>(std::max(n_ctx, 0));
    const uint64_t avail = host_memory_available();
    if (need > avail)
        throw std::invalid_argument("n_ctx " + std::to_string(n_ctx) +
                                    (n_ctx == hp_.n_ctx_train ? " (the model's glm4moe.context_length)" : "") +
                                    " needs " + mib(need) + " of host memory for the KV cache of " +
                                    std::to_string(n_kv_layers()) + " layers, but " + mib(avail) +
                                    " is available; lower n_ctx, or store K and V in fewer bytes (now K " +
                                    kv_type_name(kv_types.k) + ", V " + kv_type_name(kv_types.v) + "; -ctk/-ctv q8_0)");
    for (int il = 0; il < hp_.n_layer; ++il) {
        k_.emplace_back(static_cast<size_t>(n_ctx) * k_row_bytes_[il]);
        v_.emplace_back(static_cast<size_t>(n_ctx) * v_row_bytes_[il]);
    }
}

size_t CpuBackend::kv_k_bytes() const {
    size_t b = 0;
    for (const auto& rows : k_) b += rows.size();
    return b;
}

size_t CpuBackend::kv_v_bytes() const {
    size_t b = 0;
    for (const auto& rows : v_) b += rows.size();
    return b;
}

int CpuBackend::n_kv_layers() const {
    return static_cast<int>(std::count_if(kv_width_.begin(), kv_width_.end(), [](int64_t w) { return w > 0; }));
}

void CpuBackend::linear(const Weight& w, const float* in, int64_t n, float* out, int64_t ld_out) {
    matmul(pool_, w.type, w.data, w.ne[1], w.ne[0], in, w.ne[0], n, out, ld_out, f32_activations_);
}

void CpuBackend::begin_step(const Step& step, const StepOutput&) {
    step_ = step;
    n_ = step.n;
    const int64_t H = hp_.n_embd;
    x_.resize(n_ * H);
    h_.resize(n_ * H);
    moe_out_.resize(n_ * H);
    if (placement_.n_layers_with_attn_on(serves_) == 0) return;

    // Rope angles depend only on position: computed once per step, in double for accuracy.
    const int half = hp_.n_rot / 2;
    rope_cos_.resize(n_ * half);
    rope_sin_.resize(n_ * half);
    std::vector<double> inv_freq(half);
    for (int i = 0; i < half; ++i) inv_freq[i] = std::pow(static_cast<double>(hp_.rope_freq_base), -2.0 * i / hp_.n_rot);
    for (int64_t t = 0; t < n_; ++t)
        for (int i = 0; i < half; ++i) {
            const double theta = step.pos[t] * inv_freq[i];
            rope_cos_[t * half + i] = static_cast<float>(std::cos(theta));
            rope_sin_[t * half + i] = static_cast<float>(std::sin(theta));
        }

    // Every sequence's cells (after this step's allocation), shared by all layers.
    const KVCache& kv = *step.kv;
    seq_cells_.assign(KVCache::kMaxSeq, {});
    std::vector<bool> listed(KVCache::kMaxSeq, false);
    for (int64_t t = 0; t < n_; ++t) {
        const int32_t s = step.seq[t];
        if (!listed[s]) {
            kv.cells_of(s, seq_cells_[s]);
            listed[s] = true;
        }
    }
    attn_plan_.build(n_, step.pos, step.seq, seq_cells_, [&kv](int32_t cell) { return kv.cell_pos(cell); });
}

void CpuBackend::embed(const Weight& table) {
    const int64_t H = hp_.n_embd;
    for (int64_t t = 0; t < n_; ++t)
        dequantize_row(table.type, table.data + step_.token[t] * table.row_bytes, x_.data() + t * H, H);
}

void CpuBackend::rms_norm(const std::vector<float>& w, int, Part) {
    const int64_t H = hp_.n_embd;
    for (int64_t t = 0; t < n_; ++t) rms_norm_mul(h_.data() + t * H, x_.data() + t * H, w.data(), H, hp_.rms_eps);
}

void CpuBackend::qkv_prepare(int il) {
    const LayerHParams& lh = hp_.layers[il];
    const LayerWeights& l = model_.layer(il);
    const int64_t D = hp_.head_dim_k, nq = lh.n_head * D, nkv = lh.n_head_kv * D;
    q_.resize(n_ * nq);
    k_new_.resize(n_ * nkv);
    v_new_.resize(n_ * nkv);
    const int64_t H = hp_.n_embd;
    matmul_many(pool_, {{l.wq.type, l.wq.data, nq, H, h_.data(), H, n_, q_.data(), nq},
                        {l.wk.type, l.wk.data, nkv, H, h_.data(), H, n_, k_new_.data(), nkv},
                        {l.wv.type, l.wv.data, nkv, H, h_.data(), H, n_, v_new_.data(), nkv}},
                f32_activations_);
    add_bias(q_.data(), l.q_bias, n_);
    add_bias(k_new_.data(), l.k_bias, n_);
    add_bias(v_new_.data(), l.v_bias, n_);

    const int half = hp_.n_rot / 2;
    for (int64_t t = 0; t < n_; ++t) {
        float* qt = q_.data() + t * nq;
        float* kt = k_new_.data() + t * nkv;
        if (!l.q_norm.empty()) {
            for (int h = 0; h < lh.n_head; ++h) rms_norm_mul(qt + h * D, qt + h * D, l.q_norm.data(), D, hp_.rms_eps);
            for (int h = 0; h < lh.n_head_kv; ++h) rms_norm_mul(kt + h * D, kt + h * D, l.k_norm.data(), D, hp_.rms_eps);
        }
        rope_heads(qt, lh.n_head, D, hp_.n_rot, rope_cos_.data() + t * half, rope_sin_.data() + t * half);
        rope_heads(kt, lh.n_head_kv, D, hp_.n_rot, rope_cos_.data() + t * half, rope_sin_.data() + t * half);
        quantize_row(kv_types_.k, kt, k(il, step_.cells[t]), nkv);
        quantize_row(kv_types_.v, v_new_.data() + t * nkv, v(il, step_.cells[t]), nkv);
    }
}

void CpuBackend::attention(int il) {
    const LayerHParams& lh = hp_.layers[il];
    const int64_t D = hp_.head_dim_k;
    attn_.resize(n_ * lh.n_head * D);
    AttentionLayer layer;
    layer.q = q_.data();
    layer.out = attn_.data();
    layer.n_head = lh.n_head;
    layer.n_head_kv = lh.n_head_kv;
    layer.head_dim = static_cast<int>(D);
    layer.scale = 1.0f / std::sqrt(static_cast<float>(D));
    layer.k_cache = {k(il, 0), kv_types_.k, k_row_bytes_[il]};
    layer.v_cache = {v(il, 0), kv_types_.v, v_row_bytes_[il]};
    glmoe::attention(pool_, attn_plan_, layer);
}

void CpuBackend::attn_output(int il) {
    const int64_t H = hp_.n_embd;
    proj_.resize(n_ * H);
    linear(model_.layer(il).wo, attn_.data(), n_, proj_.data(), H);
    vec_add(x_.data(), proj_.data(), n_ * H);
}

void CpuBackend::swiglu_ffn(const Weight& gate, const Weight& up, const Weight& down, int64_t index,
                            const float* in, int64_t n, float* out) {
    const int64_t H = gate.ne[0], F = gate.ne[1];
    gate_.resize(n * F);
    up_.resize(n * F);
    matmul_many(pool_, {{gate.type, gate.matrix(index), F, H, in, H, n, gate_.data(), F},
                        {up.type, up.matrix(index), F, H, in, H, n, up_.data(), F}},
                f32_activations_);
    for (int64_t i = 0; i < n * F; ++i) gate_[i] = silu(gate_[i]) * up_[i];
    matmul(pool_, down.type, down.matrix(index), H, F, gate_.data(), F, n, out, H, f32_activations_);
}

void CpuBackend::ffn_dense(int il) {
    const LayerWeights& l = model_.layer(il);
    swiglu_ffn(l.ffn_gate, l.ffn_up, l.ffn_down, 0, h_.data(), n_, moe_out_.data());
    vec_add(x_.data(), moe_out_.data(), n_ * hp_.n_embd);
}

void CpuBackend::moe_route(int il) {
    const LayerWeights& l = model_.layer(il);
    const int64_t E = hp_.n_expert;
    const int k = hp_.layers[il].n_expert_used;
    router_.resize(n_ * E);
    linear(l.ffn_gate_inp, h_.data(), n_, router_.data(), E);
    route_ids_.resize(n_ * k);
    route_weights_.resize(n_ * k);

    // Sigmoid scores choose experts through score + bias (optionally only within the best
    // groups); the weights are the unbiased scores.
    std::vector<float> prob(E), choice(E);
    std::vector<int> order(E);
    const int n_groups = hp_.n_expert_groups > 1 ? hp_.n_expert_groups : 1;
    const int per_group = static_cast<int>(E / n_groups);
    for (int64_t t = 0; t < n_; ++t) {
        for (int64_t e = 0; e < E; ++e) {
            prob[e] = 1.0f / (1.0f + std::exp(-router_[t * E + e]));
            choice[e] = prob[e] + l.exp_probs_b[e];
        }
        if (n_groups > 1) {
            std::vector<std::pair<float, int>> group_score(n_groups);
            for (int g = 0; g < n_groups; ++g) {
                std::vector<float> s(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
                std::partial_sort(s.begin(), s.begin() + std::min(2, per_group), s.end(), std::greater<float>());
                group_score[g] = {s[0] + (per_group > 1 ? s[1] : 0.0f), g};
            }
            std::sort(group_score.begin(), group_score.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
            for (int r = hp_.n_group_used; r < n_groups; ++r) {
                const int g = group_score[r].second;
                std::fill(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group, -INFINITY);
            }
        }
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(),
                          [&](int a, int b) { return choice[a] > choice[b] || (choice[a] == choice[b] && a < b); });
        float sum = 0.0f;
        for (int j = 0; j < k; ++j) sum += prob[order[j]];
        for (int j = 0; j < k; ++j) {
            float w = prob[order[j]];
            if (hp_.expert_weights_norm) w /= sum;
            route_ids_[t * k + j] = order[j];
            route_weights_[t * k + j] = w * hp_.expert_weights_scale;
        }
    }
}

void CpuBackend::moe_experts_alongside(int il, bool into_x, const std::function<void()>& alongside) {
    const LayerWeights& l = model_.layer(il);
    const LayerPlacement& lp = placement_.layers[il];
    const int64_t H = hp_.n_embd, E = hp_.n_expert, F = l.gate_exps.ne[1];
    const int k = hp_.layers[il].n_expert_used;
    // Tokens grouped by expert, in token order; each expert's rows of h gathered in ffn_in_.
    std::vector<std::vector<std::pair<int64_t, float>>> assigned(E);
    // Of experts in RAM, the GPU runs its share of the step's (expert_split.h) in the steps that
    // reach this backend (the bigger ones borrow them all); a stand-in for the GPU (serves_ == gpu)
    // runs them.
    std::vector<uint8_t> gpu_runs(E, 0);
    if (lp.experts == Device::cpu && lp.gpu_streamed_experts > 0)
        for (int e : gpu_step_experts(route_ids_.data(), n_, k, static_cast<int>(E), lp.gpu_streamed_experts,
                                      placement_.gpu_expert_share))
            gpu_runs[e] = 1;
    auto runs_here = [&](int32_t e) { return serves_ == Device::cpu ? lp.experts == serves_ && !gpu_runs[e]
                                                                    : lp.experts == serves_ || gpu_runs[e]; };
    for (int64_t t = 0; t < n_; ++t)
        for (int j = 0; j < k; ++j)
            if (runs_here(route_ids_[t * k + j])) assigned[route_ids_[t * k + j]].push_back({t, route_weights_[t * k + j]});
    std::vector<int64_t> first(E + 1, 0);  // expert e's rows: [first[e], first[e + 1])
    for (int64_t e = 0; e < E; ++e) first[e + 1] = first[e] + static_cast<int64_t>(assigned[e].size());
    const int64_t rows = first[E];
    ffn_in_.resize(rows * H);
    for (int64_t e = 0; e < E; ++e)
        for (size_t i = 0; i < assigned[e].size(); ++i) {
            const float* src = h_.data() + assigned[e][i].first * H;
            std::copy(src, src + H, ffn_in_.data() + (first[e] + i) * H);
        }
    const bool shared = l.gate_shexp && lp.shared == serves_;
    const int64_t Fs = shared ? l.gate_shexp.ne[1] : 0;

    // Every expert's gate and up in one parallel loop, then every down in another.
    gate_.resize(rows * F + n_ * Fs);
    up_.resize(rows * F + n_ * Fs);
    down_.resize((rows + n_) * H);
    float* sh_gate = gate_.data() + rows * F;
    float* sh_up = up_.data() + rows * F;
    float* sh_down = down_.data() + rows * H;
    std::vector<MatmulCall> calls;
    for (int64_t e = 0; e < E; ++e) {
        const int64_t m = first[e + 1] - first[e];
        if (m == 0) continue;
        const float* in = ffn_in_.data() + first[e] * H;
        calls.push_back({l.gate_exps.type, l.gate_exps.matrix(e), F, H, in, H, m, gate_.data() + first[e] * F, F});
        calls.push_back({l.up_exps.type, l.up_exps.matrix(e), F, H, in, H, m, up_.data() + first[e] * F, F});
    }
    if (shared) {
        calls.push_back({l.gate_shexp.type, l.gate_shexp.data, Fs, H, h_.data(), H, n_, sh_gate, Fs});
        calls.push_back({l.up_shexp.type, l.up_shexp.data, Fs, H, h_.data(), H, n_, sh_up, Fs});
    }
    matmul_many(pool_, calls, f32_activations_, alongside ? &alongside : nullptr);
    for (size_t i = 0; i < gate_.size(); ++i) gate_[i] = silu(gate_[i]) * up_[i];
    calls.clear();
    for (int64_t e = 0; e < E; ++e) {
        const int64_t m = first[e + 1] - first[e];
        if (m == 0) continue;
        calls.push_back({l.down_exps.type, l.down_exps.matrix(e), H, F, gate_.data() + first[e] * F, F, m,
                         down_.data() + first[e] * H, H});
    }
    if (shared) calls.push_back({l.down_shexp.type, l.down_shexp.data, H, Fs, sh_gate, Fs, n_, sh_down, H});
    matmul_many(pool_, calls, f32_activations_);

    std::fill(moe_out_.begin(), moe_out_.begin() + n_ * H, 0.0f);
    for (int64_t e = 0; e < E; ++e)
        for (size_t i = 0; i < assigned[e].size(); ++i)
            vec_axpy(moe_out_.data() + assigned[e][i].first * H, assigned[e][i].second,
                     down_.data() + (first[e] + i) * H, H);
    if (shared) vec_add(moe_out_.data(), sh_down, n_ * H);
    if (into_x) add_moe_out();
}

void CpuBackend::add_moe_out() { vec_add(x_.data(), moe_out_.data(), n_ * hp_.n_embd); }

float* CpuBackend::act(Act a) {
    switch (a) {
        case Act::x: return x_.data();
        case Act::h: return h_.data();
        case Act::route_weights: return route_weights_.data();
        case Act::moe_out: return moe_out_.data();
        case Act::route_ids: break;
    }
    throw std::logic_error("no float activation");
}

std::vector<const void*> CpuBackend::download(std::initializer_list<Act> acts, int) {
    std::vector<const void*> out;
    for (Act a : acts) out.push_back(a == Act::route_ids ? static_cast<const void*>(route_ids_.data()) : act(a));
    return out;
}

void CpuBackend::upload(Act a, const void* host, int il) {
    const int64_t H = hp_.n_embd;
    switch (a) {
        case Act::x: std::memcpy(x_.data(), host, sizeof(float) * n_ * H); return;
        case Act::h: std::memcpy(h_.data(), host, sizeof(float) * n_ * H); return;
        case Act::moe_out: std::memcpy(moe_out_.data(), host, sizeof(float) * n_ * H); return;
        case Act::route_ids:
            route_ids_.resize(n_ * hp_.layers[il].n_expert_used);
            std::memcpy(route_ids_.data(), host, sizeof(int32_t) * route_ids_.size());
            return;
        case Act::route_weights:
            route_weights_.resize(n_ * hp_.layers[il].n_expert_used);
            std::memcpy(route_weights_.data(), host, sizeof(float) * route_weights_.size());
            return;
    }
}

void CpuBackend::output(const StepOutput& out) {
    if (out.kind == StepOutput::Kind::none || out.rows.empty()) return;
    if (out.kind == StepOutput::Kind::token_ids || out.kind == StepOutput::Kind::sampled)
        throw std::logic_error("the CPU backend does not sample");
    const int64_t H = hp_.n_embd, n_out = static_cast<int64_t>(out.rows.size());
    h_.resize(std::max<size_t>(h_.size(), n_out * H));
    float* normed = embeddings_ ? out.logits : h_.data();
    for (int64_t i = 0; i < n_out; ++i)
        rms_norm_mul(normed + i * H, x_.data() + out.rows[i] * H, model_.output_norm().data(), H, hp_.rms_eps);
    if (!embeddings_) linear(model_.output(), h_.data(), n_out, out.logits, hp_.n_vocab);
}

}  // namespace glmoe
