#include "context.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>

#include "devices.h"
#include "quants.h"
#include "vec.h"

namespace glmoe {

namespace {

// Host KV storage per layer; layers on the GPU keep theirs there (width 0 here).
std::vector<int64_t> kv_widths(const HParams& hp, int n_gpu_layers) {
    std::vector<int64_t> w;
    for (size_t il = 0; il < hp.layers.size(); ++il)
        w.push_back(static_cast<int>(il) < n_gpu_layers ? 0 : static_cast<int64_t>(hp.layers[il].n_head_kv) * hp.head_dim_k);
    return w;
}

std::unique_ptr<GpuForward> make_gpu(const Model& model, const ContextParams& p) {
    if (p.n_gpu_layers == 0) return nullptr;
    if (!built_with_cuda() || cuda_device_count() == 0) {
        std::fprintf(stderr, "glmoe: n_gpu_layers = %d, but %s: running on the CPU\n", p.n_gpu_layers,
                     built_with_cuda() ? "no CUDA device was found" : "this build has no CUDA backend");
        return nullptr;
    }
    const std::string why_not = GpuForward::unsupported(model);
    if (!why_not.empty()) {
        std::fprintf(stderr, "glmoe: n_gpu_layers = %d, but the GPU backend does not support %s: running on the CPU\n",
                     p.n_gpu_layers, why_not.c_str());
        return nullptr;
    }
    GpuParams gp;
    gp.n_gpu_layers = p.n_gpu_layers;
    gp.n_ctx = p.n_ctx;
    gp.n_ubatch = p.n_ubatch;
    gp.embeddings = p.embeddings;
    return std::make_unique<GpuForward>(model, gp);
}

int default_threads(int n) {
    if (n > 0) return n;
    return std::max(1u, std::thread::hardware_concurrency());
}

void linear(ThreadPool& pool, const Weight& w, const float* in, int64_t n, float* out, bool f32_activations) {
    matmul(pool, w.type, w.data, w.ne[1], w.ne[0], in, w.ne[0], n, out, w.ne[1], f32_activations);
}

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

Context::Context(const Model& model, const ContextParams& params)
    : model_(model),
      gpu_(make_gpu(model, params)),
      n_ubatch_(std::max(1, params.n_ubatch)),
      pool_(default_threads(params.n_threads)),
      kv_(params.n_ctx, kv_widths(model.hparams(), gpu_ ? gpu_->n_layers() : 0)),
      embeddings_(params.embeddings),
      f32_activations_(params.f32_activations) {}

int64_t Context::n_outputs_per_token() const {
    return embeddings_ ? model_.hparams().n_embd : model_.hparams().n_vocab;
}

void Context::check_batch(const Batch& b) const {
    const size_t n = b.token.size();
    if (n == 0) throw std::invalid_argument("empty batch");
    if (b.pos.size() != n || b.seq.size() != n || b.want_logits.size() != n)
        throw std::invalid_argument("batch arrays differ in length");
    const int n_vocab = model_.hparams().n_vocab;
    for (size_t i = 0; i < n; ++i) {
        if (b.token[i] < 0 || b.token[i] >= n_vocab)
            throw std::invalid_argument("token id " + std::to_string(b.token[i]) + " out of range [0, " +
                                        std::to_string(n_vocab) + ")");
        KVCache::check_seq(b.seq[i]);
    }
}

void Context::decode(const Batch& batch, std::vector<float>& logits) {
    check_batch(batch);
    std::vector<int64_t> rows;
    for (int64_t t = 0; t < static_cast<int64_t>(batch.size()); ++t)
        if (batch.want_logits[t]) rows.push_back(t);
    run_allocated(batch, [&](const std::vector<int32_t>& cells) {
        logits.resize(rows.size() * n_outputs_per_token());
        if (gpu_) {
            GpuStepOutput proto;
            proto.kind = GpuStepOutput::Kind::logits;
            gpu_decode(batch, cells, proto, logits.data(), nullptr, nullptr);
        } else {
            cpu_layers(batch, cells, 0);
            cpu_output(rows, logits.data());
        }
    });
}

void Context::decode_sample(const Batch& batch, const DeviceSampling& sampling, const std::vector<float>& u,
                            std::vector<int32_t>& ids) {
    if (!samples_on_gpu()) throw std::logic_error("decode_sample needs every layer and the output head on the GPU");
    check_batch(batch);
    size_t n_rows = 0;
    for (uint8_t w : batch.want_logits) n_rows += w != 0;
    if (sampling.temperature > 0 && u.size() != n_rows)
        throw std::invalid_argument("decode_sample needs one uniform draw per flagged row");
    run_allocated(batch, [&](const std::vector<int32_t>& cells) {
        ids.resize(n_rows);
        GpuStepOutput proto;
        proto.kind = GpuStepOutput::Kind::token_ids;
        proto.temperature = sampling.temperature;
        proto.top_k = sampling.top_k;
        proto.top_p = sampling.top_p;
        proto.min_p = sampling.min_p;
        gpu_decode(batch, cells, proto, nullptr, ids.data(), sampling.temperature > 0 ? &u : nullptr);
    });
}

void Context::run_allocated(const Batch& batch, const std::function<void(const std::vector<int32_t>&)>& forward) {
    const std::vector<int32_t> cells = kv_.allocate(batch.seq, batch.pos);
    try {
        const auto t0 = std::chrono::steady_clock::now();
        forward(cells);
        step_costs_.record(static_cast<int>(batch.size()),
                           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    } catch (...) {
        for (size_t i = 0; i < cells.size(); ++i) kv_.seq_rm(batch.seq[i], batch.pos[i], batch.pos[i] + 1);
        throw;
    }
    n_evaluated_ += batch.size();
}

void Context::gpu_decode(const Batch& batch, const std::vector<int32_t>& cells, GpuStepOutput& proto, float* logits,
                         int32_t* ids, const std::vector<float>* u) {
    const int64_t n = static_cast<int64_t>(batch.size()), H = model_.hparams().n_embd;
    const int64_t width = n_outputs_per_token();
    const bool all_on_gpu = gpu_->has_output();
    int64_t rows_done = 0;
    for (int64_t c0 = 0; c0 < n; c0 += n_ubatch_) {
        const int64_t c1 = std::min(n, c0 + n_ubatch_), m = c1 - c0;
        std::vector<int64_t> rows;  // flagged rows of this micro-batch, relative to c0
        for (int64_t t = c0; t < c1; ++t)
            if (batch.want_logits[t]) rows.push_back(t - c0);
        if (all_on_gpu) {
            GpuStepOutput out = proto;
            out.rows.assign(rows.begin(), rows.end());
            out.out_f32 = logits ? logits + rows_done * width : nullptr;
            out.out_ids = ids ? ids + rows_done : nullptr;
            out.u = u ? u->data() + rows_done : nullptr;
            gpu_->run(batch.token.data() + c0, batch.pos.data() + c0, batch.seq.data() + c0, cells.data() + c0,
                      static_cast<int>(m), kv_, out);
        } else {
            // Hybrid: the GPU layers, then the rest of the layers and the output on the CPU.
            x_.resize(m * H);
            GpuStepOutput out;
            out.kind = GpuStepOutput::Kind::hidden;
            out.out_f32 = x_.data();
            gpu_->run(batch.token.data() + c0, batch.pos.data() + c0, batch.seq.data() + c0, cells.data() + c0,
                      static_cast<int>(m), kv_, out);
            Batch sub;
            sub.token.assign(batch.token.begin() + c0, batch.token.begin() + c1);
            sub.pos.assign(batch.pos.begin() + c0, batch.pos.begin() + c1);
            sub.seq.assign(batch.seq.begin() + c0, batch.seq.begin() + c1);
            sub.want_logits.assign(batch.want_logits.begin() + c0, batch.want_logits.begin() + c1);
            cpu_layers(sub, std::vector<int32_t>(cells.begin() + c0, cells.begin() + c1), gpu_->n_layers());
            cpu_output(rows, logits + rows_done * width);
        }
        rows_done += static_cast<int64_t>(rows.size());
    }
}

void Context::cpu_layers(const Batch& batch, const std::vector<int32_t>& cells, int first_layer) {
    const HParams& hp = model_.hparams();
    const int64_t n = static_cast<int64_t>(batch.size()), H = hp.n_embd;
    x_.resize(n * H);
    h_.resize(n * H);
    ffn_out_.resize(n * H);
    if (first_layer == 0) {
        const Weight& embd = model_.token_embd();
        for (int64_t t = 0; t < n; ++t)
            dequantize_row(embd.type, embd.data + batch.token[t] * embd.row_bytes, x_.data() + t * H, H);
    }
    if (first_layer >= hp.n_layer) return;

    // Rope angles depend only on position: computed once per batch, in double for accuracy.
    const int half = hp.n_rot / 2;
    rope_cos_.resize(n * half);
    rope_sin_.resize(n * half);
    std::vector<double> inv_freq(half);
    for (int i = 0; i < half; ++i) inv_freq[i] = std::pow(static_cast<double>(hp.rope_freq_base), -2.0 * i / hp.n_rot);
    for (int64_t t = 0; t < n; ++t)
        for (int i = 0; i < half; ++i) {
            const double theta = batch.pos[t] * inv_freq[i];
            rope_cos_[t * half + i] = static_cast<float>(std::cos(theta));
            rope_sin_[t * half + i] = static_cast<float>(std::sin(theta));
        }

    // Every sequence's cells (after this batch's allocation), shared by all layers.
    seq_cells_.assign(KVCache::kMaxSeq, {});
    std::vector<bool> listed(KVCache::kMaxSeq, false);
    for (int32_t s : batch.seq)
        if (!listed[s]) {
            kv_.cells_of(s, seq_cells_[s]);
            listed[s] = true;
        }
    attn_plan_.build(n, batch.pos.data(), batch.seq.data(), seq_cells_,
                     [this](int32_t cell) { return kv_.cell_pos(cell); });

    for (int il = first_layer; il < hp.n_layer; ++il) {
        const LayerWeights& l = model_.layer(il);
        for (int64_t t = 0; t < n; ++t)
            rms_norm_mul(h_.data() + t * H, x_.data() + t * H, l.attn_norm.data(), H, hp.rms_eps);
        attention(il, batch, cells);
        for (int64_t t = 0; t < n; ++t)
            rms_norm_mul(h_.data() + t * H, x_.data() + t * H, l.post_attention_norm.data(), H, hp.rms_eps);
        if (hp.layers[il].is_moe)
            ffn_moe(il, n);
        else
            ffn_dense(il, n);
        vec_add(x_.data(), ffn_out_.data(), n * H);
    }
}

void Context::cpu_output(const std::vector<int64_t>& rows, float* out) {
    const HParams& hp = model_.hparams();
    const int64_t H = hp.n_embd, n_out = static_cast<int64_t>(rows.size());
    if (n_out == 0) return;
    h_.resize(std::max<size_t>(h_.size(), n_out * H));
    float* normed = embeddings_ ? out : h_.data();
    for (int64_t i = 0; i < n_out; ++i)
        rms_norm_mul(normed + i * H, x_.data() + rows[i] * H, model_.output_norm().data(), H, hp.rms_eps);
    if (!embeddings_) linear(pool_, model_.output(), h_.data(), n_out, out, f32_activations_);
}

void Context::attention(int il, const Batch& batch, const std::vector<int32_t>& cells) {
    const HParams& hp = model_.hparams();
    const LayerHParams& lh = hp.layers[il];
    const LayerWeights& l = model_.layer(il);
    const int64_t n = static_cast<int64_t>(batch.size()), H = hp.n_embd, D = hp.head_dim_k;
    const int64_t nq = lh.n_head * D, nkv = lh.n_head_kv * D;
    q_.resize(n * nq);
    k_.resize(n * nkv);
    v_.resize(n * nkv);
    attn_.resize(n * nq);

    linear(pool_, l.wq, h_.data(), n, q_.data(), f32_activations_);
    linear(pool_, l.wk, h_.data(), n, k_.data(), f32_activations_);
    linear(pool_, l.wv, h_.data(), n, v_.data(), f32_activations_);
    add_bias(q_.data(), l.q_bias, n);
    add_bias(k_.data(), l.k_bias, n);
    add_bias(v_.data(), l.v_bias, n);

    const int half = hp.n_rot / 2;
    for (int64_t t = 0; t < n; ++t) {
        float* qt = q_.data() + t * nq;
        float* kt = k_.data() + t * nkv;
        if (!l.q_norm.empty()) {
            for (int h = 0; h < lh.n_head; ++h) rms_norm_mul(qt + h * D, qt + h * D, l.q_norm.data(), D, hp.rms_eps);
            for (int h = 0; h < lh.n_head_kv; ++h) rms_norm_mul(kt + h * D, kt + h * D, l.k_norm.data(), D, hp.rms_eps);
        }
        rope_heads(qt, lh.n_head, D, hp.n_rot, rope_cos_.data() + t * half, rope_sin_.data() + t * half);
        rope_heads(kt, lh.n_head_kv, D, hp.n_rot, rope_cos_.data() + t * half, rope_sin_.data() + t * half);
        std::copy(kt, kt + nkv, kv_.k(il, cells[t]));
        std::copy(v_.data() + t * nkv, v_.data() + (t + 1) * nkv, kv_.v(il, cells[t]));
    }

    AttentionLayer layer;
    layer.q = q_.data();
    layer.out = attn_.data();
    layer.n_head = lh.n_head;
    layer.n_head_kv = lh.n_head_kv;
    layer.head_dim = static_cast<int>(D);
    layer.scale = 1.0f / std::sqrt(static_cast<float>(D));
    layer.k_cache = kv_.k(il, 0);
    layer.v_cache = kv_.v(il, 0);
    glmoe::attention(pool_, attn_plan_, layer);

    linear(pool_, l.wo, attn_.data(), n, h_.data(), f32_activations_);
    vec_add(x_.data(), h_.data(), n * H);
}

void Context::swiglu_ffn(const Weight& gate, const Weight& up, const Weight& down, int64_t index,
                         const float* in, int64_t n, float* out) {
    const int64_t H = gate.ne[0], F = gate.ne[1];
    gate_.resize(n * F);
    up_.resize(n * F);
    matmul(pool_, gate.type, gate.matrix(index), F, H, in, H, n, gate_.data(), F, f32_activations_);
    matmul(pool_, up.type, up.matrix(index), F, H, in, H, n, up_.data(), F, f32_activations_);
    for (int64_t i = 0; i < n * F; ++i) gate_[i] = silu(gate_[i]) * up_[i];
    matmul(pool_, down.type, down.matrix(index), H, F, gate_.data(), F, n, out, H, f32_activations_);
}

void Context::ffn_dense(int il, int64_t n) {
    const LayerWeights& l = model_.layer(il);
    swiglu_ffn(l.ffn_gate, l.ffn_up, l.ffn_down, 0, h_.data(), n, ffn_out_.data());
}

void Context::ffn_moe(int il, int64_t n) {
    const HParams& hp = model_.hparams();
    const LayerWeights& l = model_.layer(il);
    const int64_t H = hp.n_embd, E = hp.n_expert;
    const int k = hp.layers[il].n_expert_used;

    router_.resize(n * E);
    linear(pool_, l.ffn_gate_inp, h_.data(), n, router_.data(), f32_activations_);

    // Routing: sigmoid scores choose experts through score + bias (optionally only within the
    // best groups); the weights are the unbiased scores.
    std::vector<std::vector<std::pair<int64_t, float>>> assigned(E);
    std::vector<float> prob(E), choice(E);
    std::vector<int> order(E);
    const int n_groups = hp.n_expert_groups > 1 ? hp.n_expert_groups : 1;
    const int per_group = static_cast<int>(E / n_groups);
    for (int64_t t = 0; t < n; ++t) {
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
            for (int r = hp.n_group_used; r < n_groups; ++r) {
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
            if (hp.expert_weights_norm) w /= sum;
            assigned[order[j]].push_back({t, w * hp.expert_weights_scale});
        }
    }

    std::fill(ffn_out_.begin(), ffn_out_.begin() + n * H, 0.0f);
    for (int64_t e = 0; e < E; ++e) {
        const auto& tokens = assigned[e];
        if (tokens.empty()) continue;
        const int64_t m = static_cast<int64_t>(tokens.size());
        ffn_in_.resize(m * H);
        down_.resize(m * H);
        for (int64_t i = 0; i < m; ++i)
            std::copy(h_.data() + tokens[i].first * H, h_.data() + (tokens[i].first + 1) * H, ffn_in_.data() + i * H);
        swiglu_ffn(l.gate_exps, l.up_exps, l.down_exps, e, ffn_in_.data(), m, down_.data());
        for (int64_t i = 0; i < m; ++i)
            vec_axpy(ffn_out_.data() + tokens[i].first * H, tokens[i].second, down_.data() + i * H, H);
    }
    if (l.gate_shexp) {
        down_.resize(n * H);
        swiglu_ffn(l.gate_shexp, l.up_shexp, l.down_shexp, 0, h_.data(), n, down_.data());
        vec_add(ffn_out_.data(), down_.data(), n * H);
    }
}

}  // namespace glmoe
