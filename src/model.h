// A loaded GLM4-MoE model: hyper-parameters from the GGUF metadata and typed views of the
// mmap'd weights, every shape checked at load so the forward can trust them.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "gguf.h"

namespace glmoe {

// A model file that is not a loadable glm4moe (wrong architecture, missing or mis-shaped tensor).
struct ModelError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A weight matrix (or stack of matrices) in its file type; rows of ne[0] elements.
struct Weight {
    const uint8_t* data = nullptr;
    uint32_t type = 0;
    int64_t ne[3] = {1, 1, 1};
    size_t row_bytes = 0;     // bytes of one row of ne[0] elements
    size_t matrix_bytes = 0;  // bytes of one ne[0] x ne[1] matrix (experts are stacked on ne[2])

    explicit operator bool() const { return data != nullptr; }
    const uint8_t* matrix(int64_t i) const { return data + i * matrix_bytes; }
};

struct LayerHParams {
    int n_head = 0;
    int n_head_kv = 0;
    int n_expert_used = 0;
    int n_ff = 0;  // dense FFN width (dense layers only)
    bool is_moe = false;
};

struct HParams {
    int n_vocab = 0;
    int n_embd = 0;
    int n_layer = 0;        // trunk layers (block_count - nextn_predict_layers)
    int n_nextn_layer = 0;  // MTP layers stored after the trunk
    int n_ctx_train = 0;
    int head_dim_k = 0;
    int head_dim_v = 0;
    int n_rot = 0;
    float rope_freq_base = 10000.0f;
    float rms_eps = 1e-5f;
    int n_expert = 0;
    int n_expert_shared = 0;
    int n_ff_expert = 0;
    int n_leading_dense = 0;
    float expert_weights_scale = 1.0f;
    bool expert_weights_norm = false;
    int n_expert_groups = 0;  // 0 or 1: no group-limited routing
    int n_group_used = 0;
    std::vector<LayerHParams> layers;
};

struct LayerWeights {
    std::vector<float> attn_norm, post_attention_norm;
    std::vector<float> q_bias, k_bias, v_bias;  // empty when the file has none
    std::vector<float> q_norm, k_norm;          // empty without qk-norm
    Weight wq, wk, wv, wo;
    // Dense FFN.
    Weight ffn_gate, ffn_up, ffn_down;
    // MoE FFN.
    Weight ffn_gate_inp;                  // router {H, E}
    std::vector<float> exp_probs_b;       // selection bias {E}
    Weight gate_exps, up_exps, down_exps; // {H, Fe, E}, {H, Fe, E}, {Fe, H, E}
    Weight gate_shexp, up_shexp, down_shexp;
};

class Model {
public:
    // Throws GGUFError for a malformed file and ModelError for a valid GGUF that is not a
    // loadable glm4moe model.
    // mapped: as GGUFFile::open. locked: GGUFFile::lock once the model's checks pass, so that a
    // refused file is not read whole first (file().locked() says whether the lock was taken).
    static std::unique_ptr<Model> load(const std::string& path, bool mapped = true, bool locked = false);

    const HParams& hparams() const { return hp_; }
    const GGUFFile& file() const { return *file_; }
    const Weight& token_embd() const { return token_embd_; }
    const Weight& output() const { return output_; }  // token_embd when the file ties them
    const std::vector<float>& output_norm() const { return output_norm_; }
    const LayerWeights& layer(int i) const { return layers_[i]; }
    uint64_t n_params() const { return n_params_; }
    uint64_t n_bytes() const { return n_bytes_; }
    std::string description() const;

private:
    Model() = default;
    std::unique_ptr<GGUFFile> file_;
    HParams hp_;
    Weight token_embd_, output_;
    std::vector<float> output_norm_;
    std::vector<LayerWeights> layers_;
    uint64_t n_params_ = 0, n_bytes_ = 0;

    friend class ModelLoader;
};

}  // namespace glmoe
