#include "model.h"

#include <cmath>
#include <cstdio>

#include "ggml_types.h"
#include "quants.h"

namespace glmoe {

namespace {

std::string shape_str(const std::vector<int64_t>& ne) {
    std::string s = "[";
    for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

}  // namespace

// Reads hparams and binds tensors, collecting the first problem as a ModelError.
class ModelLoader {
public:
    ModelLoader(Model& model, const GGUFFile& file) : m_(model), f_(file) {}

    void load() {
        read_hparams();
        check_chat_templates();
        bind_tensors();
    }

private:
    Model& m_;
    const GGUFFile& f_;
    std::string arch_ = "glm4moe";

    const GGUFValue* key(const std::string& name) const { return f_.find(arch_ + "." + name); }

    int64_t integer(const GGUFValue& v, const std::string& name) const {
        if (!v.is_integer()) throw ModelError("metadata " + arch_ + "." + name + " is not an integer");
        if (v.type == GGUFValueType::UINT64 && v.u > static_cast<uint64_t>(INT32_MAX))
            throw ModelError("metadata " + arch_ + "." + name + " is out of range");
        if (v.i < 0 || v.i > INT32_MAX) throw ModelError("metadata " + arch_ + "." + name + " is out of range");
        return v.i;
    }

    int u32(const std::string& name, bool required, int fallback = 0) const {
        const GGUFValue* v = key(name);
        if (!v) {
            if (required) throw ModelError("missing metadata key " + arch_ + "." + name);
            return fallback;
        }
        return static_cast<int>(integer(*v, name));
    }

    float f32(const std::string& name, float fallback) const {
        const GGUFValue* v = key(name);
        if (!v) return fallback;
        if (v->type == GGUFValueType::FLOAT32 || v->type == GGUFValueType::FLOAT64) return static_cast<float>(v->f);
        if (v->is_integer()) return static_cast<float>(v->i);
        throw ModelError("metadata " + arch_ + "." + name + " is not a number");
    }

    bool boolean(const std::string& name, bool fallback) const {
        const GGUFValue* v = key(name);
        if (!v) return fallback;
        if (v->type == GGUFValueType::BOOL || v->is_integer()) return v->i != 0;
        throw ModelError("metadata " + arch_ + "." + name + " is not a bool");
    }

    // A required dimension: 0 would leave the tensors empty and the forward dividing by it.
    int positive(const std::string& name) const {
        const int v = u32(name, true);
        if (v < 1)
            throw ModelError("metadata " + arch_ + "." + name + " is " + std::to_string(v) + ", must be at least 1");
        return v;
    }

    // A key that may be one integer for all layers or an array with one entry per layer.
    std::vector<int> per_layer(const std::string& name, int n, bool required, int fallback = 0) const {
        const GGUFValue* v = key(name);
        if (v && v->type == GGUFValueType::ARRAY) {
            if (static_cast<int>(v->arr.size()) != n)
                throw ModelError("metadata " + arch_ + "." + name + " has " + std::to_string(v->arr.size()) +
                                 " entries, expected one per layer (" + std::to_string(n) + ")");
            std::vector<int> out;
            for (const auto& e : v->arr) out.push_back(static_cast<int>(integer(e, name)));
            return out;
        }
        return std::vector<int>(n, u32(name, required, fallback));
    }

    void read_hparams() {
        const GGUFValue* a = f_.find("general.architecture");
        if (!a || a->type != GGUFValueType::STRING) throw ModelError("missing general.architecture");
        if (a->s != "glm4moe")
            throw ModelError("architecture '" + a->s + "' is not supported (glmoe runs glm4moe)");

        HParams& hp = m_.hp_;
        const int n_block = u32("block_count", true);
        hp.n_nextn_layer = u32("nextn_predict_layers", false, 0);
        if (n_block < 1 || hp.n_nextn_layer >= n_block) throw ModelError("block_count must exceed nextn_predict_layers");
        hp.n_layer = n_block - hp.n_nextn_layer;
        hp.n_ctx_train = u32("context_length", false, 4096);
        if (hp.n_ctx_train < 1)
            throw ModelError("metadata " + arch_ + ".context_length is " + std::to_string(hp.n_ctx_train) + ", must be at least 1");
        hp.n_embd = positive("embedding_length");
        hp.rms_eps = f32("attention.layer_norm_rms_epsilon", 1e-5f);
        hp.rope_freq_base = f32("rope.freq_base", 10000.0f);
        if (!std::isfinite(hp.rope_freq_base) || hp.rope_freq_base <= 0.0f)
            throw ModelError("metadata " + arch_ + ".rope.freq_base must be a finite number > 0");
        if (!std::isfinite(hp.rms_eps) || hp.rms_eps < 0.0f)
            throw ModelError("metadata " + arch_ + ".attention.layer_norm_rms_epsilon must be a finite number >= 0");
        hp.n_expert = positive("expert_count");
        hp.n_expert_shared = u32("expert_shared_count", false, 0);
        hp.n_ff_expert = positive("expert_feed_forward_length");
        hp.n_leading_dense = u32("leading_dense_block_count", false, 0);
        hp.expert_weights_scale = f32("expert_weights_scale", 1.0f);
        // Scales every routed expert's output: NaN, inf or <= 0 would load and fail at sampling.
        if (!std::isfinite(hp.expert_weights_scale) || hp.expert_weights_scale <= 0.0f)
            throw ModelError("metadata " + arch_ + ".expert_weights_scale must be a finite number > 0");
        hp.expert_weights_norm = boolean("expert_weights_norm", false);
        hp.n_expert_groups = u32("expert_group_count", false, 0);
        hp.n_group_used = u32("expert_group_used_count", false, 0);
        const int gating = u32("expert_gating_func", false, 2);
        if (gating != 2) throw ModelError("expert_gating_func " + std::to_string(gating) + " is not supported (glm4moe uses 2 = sigmoid)");

        const auto n_head = per_layer("attention.head_count", n_block, true);
        const auto n_head_kv = per_layer("attention.head_count_kv", n_block, false, n_head[0]);
        const auto n_used = per_layer("expert_used_count", n_block, true);
        const auto n_ff = per_layer("feed_forward_length", n_block, false, 0);
        if (n_head[0] <= 0) throw ModelError("attention.head_count must be positive");
        hp.head_dim_k = u32("attention.key_length", false, hp.n_embd / n_head[0]);
        hp.head_dim_v = u32("attention.value_length", false, hp.head_dim_k);
        if (hp.head_dim_k != hp.head_dim_v) throw ModelError("attention.key_length != attention.value_length is not supported");
        hp.n_rot = u32("rope.dimension_count", false, hp.head_dim_k);
        if (hp.n_rot <= 0 || hp.n_rot > hp.head_dim_k || hp.n_rot % 2)
            throw ModelError("rope.dimension_count must be even and at most the head size");
        if (hp.n_expert_groups > 1 &&
            (hp.n_expert % hp.n_expert_groups || hp.n_group_used < 1 || hp.n_group_used > hp.n_expert_groups))
            throw ModelError("expert_group_count / expert_group_used_count are inconsistent with expert_count");

        hp.layers.resize(hp.n_layer);
        for (int il = 0; il < hp.n_layer; ++il) {
            LayerHParams& l = hp.layers[il];
            l.n_head = n_head[il];
            l.n_head_kv = n_head_kv[il];
            l.n_expert_used = n_used[il];
            l.n_ff = n_ff[il];
            l.is_moe = il >= hp.n_leading_dense;
            if (l.n_head <= 0 || l.n_head_kv <= 0 || l.n_head % l.n_head_kv)
                throw ModelError("layer " + std::to_string(il) + ": head_count must be a positive multiple of head_count_kv");
            if (l.is_moe && (l.n_expert_used <= 0 || l.n_expert_used > hp.n_expert))
                throw ModelError("layer " + std::to_string(il) + ": expert_used_count out of range");
            if (!l.is_moe && l.n_ff <= 0)
                throw ModelError("layer " + std::to_string(il) + ": dense layer needs feed_forward_length");
        }
    }

    const GGUFTensorInfo& info(const std::string& name, std::vector<int64_t> shape, bool required, bool* found) {
        const GGUFTensorInfo* t = f_.find_tensor(name);
        if (found) *found = t != nullptr;
        if (!t) {
            if (required) throw ModelError("missing tensor '" + name + "'");
            static const GGUFTensorInfo none;
            return none;
        }
        std::vector<int64_t> ne = t->ne;
        while (ne.size() > shape.size() && ne.back() == 1) ne.pop_back();
        while (shape.size() > ne.size() && shape.back() == 1) shape.pop_back();
        if (ne != shape)
            throw ModelError("tensor '" + name + "' has shape " + shape_str(t->ne) + ", expected " + shape_str(shape));
        if (!type_traits(t->type).supported)
            throw ModelError("tensor '" + name + "' has type " + type_name(t->type) + ", which glmoe does not support");
        m_.n_params_ += t->n_elements;
        m_.n_bytes_ += t->n_bytes;
        return *t;
    }

    Weight weight(const std::string& name, std::vector<int64_t> shape, bool required = true) {
        bool found = false;
        const GGUFTensorInfo& t = info(name, shape, required, &found);
        Weight w;
        if (!found) return w;
        w.data = f_.tensor_data(t);
        w.type = t.type;
        for (size_t i = 0; i < 3; ++i) w.ne[i] = i < shape.size() ? shape[i] : 1;
        w.row_bytes = row_bytes(t.type, w.ne[0]);
        w.matrix_bytes = w.row_bytes * w.ne[1];
        return w;
    }

    // Small tensors (norms, biases) are converted to f32 once, whatever their file type.
    std::vector<float> vector(const std::string& name, int64_t n, bool required = true) {
        bool found = false;
        const GGUFTensorInfo& t = info(name, {n}, required, &found);
        if (!found) return {};
        std::vector<float> out(n);
        dequantize_row(t.type, f_.tensor_data(t), out.data(), n);
        return out;
    }

    // The tokenizer's vocabulary must match the embedding rows, and the special token ids
    // (tokenizer.ggml.*_token_id) must name tokens of it.
    void check_vocabulary(int n_vocab) const {
        if (const GGUFValue* t = f_.find("tokenizer.ggml.tokens")) {
            if (t->type != GGUFValueType::ARRAY || t->elem_type != GGUFValueType::STRING)
                throw ModelError("metadata tokenizer.ggml.tokens is not an array of strings");
            if (t->arr.size() != static_cast<size_t>(n_vocab))
                throw ModelError("metadata tokenizer.ggml.tokens has " + std::to_string(t->arr.size()) +
                                 " tokens but token_embd.weight has " + std::to_string(n_vocab) + " rows");
        }
        static const std::string prefix = "tokenizer.ggml.", suffix = "_token_id";
        for (const auto& [name, v] : f_.metadata()) {
            if (name.size() <= prefix.size() + suffix.size() || name.compare(0, prefix.size(), prefix) != 0 ||
                name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
                continue;
            if (!v.is_integer()) throw ModelError("metadata " + name + " is not an integer");
            const bool neg = v.type != GGUFValueType::UINT64 && v.i < 0;  // else v.u holds the value
            if (neg || v.u >= static_cast<uint64_t>(n_vocab))
                throw ModelError("metadata " + name + " = " + (neg ? std::to_string(v.i) : std::to_string(v.u)) +
                                 " is not a token id of the vocabulary (" + std::to_string(n_vocab) + " tokens)");
        }
    }

    // tokenizer.chat_template and tokenizer.chat_template.NAME are template text: any other type
    // would reach the chat path as its decimal or list spelling (llama.cpp refuses to read them).
    void check_chat_templates() const {
        static const std::string key = "tokenizer.chat_template";
        for (const auto& [name, v] : f_.metadata()) {
            if (name.compare(0, key.size(), key) != 0 || (name.size() > key.size() && name[key.size()] != '.'))
                continue;
            if (v.type != GGUFValueType::STRING) throw ModelError("metadata " + name + " is not a string");
        }
    }

    void bind_tensors() {
        HParams& hp = m_.hp_;
        const int64_t H = hp.n_embd, D = hp.head_dim_k, E = hp.n_expert, Fe = hp.n_ff_expert;
        const GGUFTensorInfo* embd = f_.find_tensor("token_embd.weight");
        if (!embd) throw ModelError("missing tensor 'token_embd.weight'");
        if (embd->ne.size() < 2) throw ModelError("tensor 'token_embd.weight' must be 2-D");
        hp.n_vocab = static_cast<int>(embd->ne[1]);
        m_.token_embd_ = weight("token_embd.weight", {H, hp.n_vocab});
        m_.output_norm_ = vector("output_norm.weight", H);
        m_.output_ = weight("output.weight", {H, hp.n_vocab}, false);
        if (!m_.output_) m_.output_ = m_.token_embd_;
        check_vocabulary(hp.n_vocab);

        m_.layers_.resize(hp.n_layer);
        for (int il = 0; il < hp.n_layer; ++il) {
            const LayerHParams& lh = hp.layers[il];
            LayerWeights& l = m_.layers_[il];
            const std::string p = "blk." + std::to_string(il) + ".";
            const int64_t nq = lh.n_head * D, nkv = lh.n_head_kv * D;
            l.attn_norm = vector(p + "attn_norm.weight", H);
            l.wq = weight(p + "attn_q.weight", {H, nq});
            l.wk = weight(p + "attn_k.weight", {H, nkv});
            l.wv = weight(p + "attn_v.weight", {H, nkv});
            l.q_bias = vector(p + "attn_q.bias", nq, false);
            l.k_bias = vector(p + "attn_k.bias", nkv, false);
            l.v_bias = vector(p + "attn_v.bias", nkv, false);
            l.q_norm = vector(p + "attn_q_norm.weight", D, false);
            l.k_norm = vector(p + "attn_k_norm.weight", D, false);
            if (l.q_norm.empty() != l.k_norm.empty())
                throw ModelError(p + ": attn_q_norm and attn_k_norm must both be present or both absent");
            l.wo = weight(p + "attn_output.weight", {nq, H});
            l.post_attention_norm = vector(p + "post_attention_norm.weight", H);
            if (!lh.is_moe) {
                l.ffn_gate = weight(p + "ffn_gate.weight", {H, lh.n_ff});
                l.ffn_up = weight(p + "ffn_up.weight", {H, lh.n_ff});
                l.ffn_down = weight(p + "ffn_down.weight", {lh.n_ff, H});
                continue;
            }
            l.ffn_gate_inp = weight(p + "ffn_gate_inp.weight", {H, E});
            l.exp_probs_b = vector(p + "exp_probs_b.bias", E, false);
            if (l.exp_probs_b.empty()) l.exp_probs_b.assign(E, 0.0f);
            l.gate_exps = weight(p + "ffn_gate_exps.weight", {H, Fe, E});
            l.up_exps = weight(p + "ffn_up_exps.weight", {H, Fe, E});
            l.down_exps = weight(p + "ffn_down_exps.weight", {Fe, H, E});
            if (hp.n_expert_shared > 0) {
                const int64_t Fs = Fe * hp.n_expert_shared;
                l.gate_shexp = weight(p + "ffn_gate_shexp.weight", {H, Fs});
                l.up_shexp = weight(p + "ffn_up_shexp.weight", {H, Fs});
                l.down_shexp = weight(p + "ffn_down_shexp.weight", {Fs, H});
            }
        }
    }
};

std::unique_ptr<Model> Model::load(const std::string& path, bool mapped, bool locked) {
    std::unique_ptr<Model> m(new Model());
    m->file_ = GGUFFile::open(path, mapped);
    ModelLoader(*m, *m->file_).load();
    if (locked) m->file_->lock();  // once the model is known good: mlock reads a mapped file whole
    return m;
}

std::string Model::description() const {
    // snprintf, not iostreams: some Python environments load a second C++ runtime whose locale
    // state breaks std::ostringstream inside the extension (seen on the device machine).
    char buf[256];
    std::snprintf(buf, sizeof buf, "glm4moe %d layers, n_embd %d, %d experts (top %d, %d shared), vocab %d, %.2f M params",
                  hp_.n_layer, hp_.n_embd, hp_.n_expert, hp_.layers.empty() ? 0 : hp_.layers.back().n_expert_used,
                  hp_.n_expert_shared, hp_.n_vocab, n_params_ / 1e6);
    return buf;
}

}  // namespace glmoe
