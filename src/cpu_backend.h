// The CPU backend: the ops of backend.h on CPU threads, straight from the mmap'd weights, with
// the K/V rows (f32 unless kv_types say otherwise) of the layers whose attention the placement
// puts on the CPU. Every op is
// batch-invariant (a token's results do not depend on the other tokens) and thread-count
// invariant; with f32_activations the matrix products skip the 8-bit rounding of activations.
#pragma once
#include <memory>
#include <vector>

#include "attention.h"
#include "backend.h"
#include "kv_types.h"
#include "thread_pool.h"

namespace glmoe {

class CpuBackend final : public Backend, public KVRows {
public:
    // serves: the device whose share of the placement this backend runs: the CPU's, or (a stand-in
    // that checks the forward's crossings on a machine without a GPU) the GPU's. kv_types: what
    // the K and V rows store; a type whose block does not divide a row is refused (invalid_argument).
    CpuBackend(const Model& model, const Placement& placement, ThreadPool& pool, int n_ctx, bool embeddings,
               bool f32_activations, Device serves = Device::cpu, KVTypes kv_types = {});

    Device device() const override { return serves_; }
    void begin_step(const Step& step, const StepOutput& out) override;
    void embed(const Weight& table) override;
    void rms_norm(const std::vector<float>& w, int il, Part part) override;
    void qkv_prepare(int il) override;
    void attention(int il) override;
    void attn_output(int il) override;
    void ffn_dense(int il) override;
    void moe_route(int il) override;
    void moe_experts(int il, bool into_x) override { moe_experts_alongside(il, into_x, nullptr); }
    void moe_experts_alongside(int il, bool into_x, const std::function<void()>& alongside) override;
    void add_moe_out() override;
    std::vector<const void*> download(std::initializer_list<Act> acts, int il) override;
    void upload(Act act, const void* host, int il) override;
    void output(const StepOutput& out) override;

    // KVRows: the layers whose attention runs here.
    int n_layers() const override { return static_cast<int>(kv_width_.size()); }
    int64_t width(int il) const override { return kv_width_[il]; }
    uint32_t type_k() const override { return kv_types_.k; }
    uint32_t type_v() const override { return kv_types_.v; }
    uint8_t* k(int il, int32_t cell) override { return k_[il].data() + cell * k_row_bytes_[il]; }
    uint8_t* v(int il, int32_t cell) override { return v_[il].data() + cell * v_row_bytes_[il]; }
    size_t kv_bytes() const { return kv_k_bytes() + kv_v_bytes(); }
    size_t kv_k_bytes() const;
    size_t kv_v_bytes() const;
    int n_kv_layers() const;  // layers whose K/V rows are here

private:
    void linear(const Weight& w, const float* in, int64_t n, float* out, int64_t ld_out);
    // out[n][H] = down(silu(gate in) * up in), with matrix `index` of stacked (expert) weights.
    void swiglu_ffn(const Weight& gate, const Weight& up, const Weight& down, int64_t index, const float* in,
                    int64_t n, float* out);
    float* act(Act a);

    const Model& model_;
    const HParams& hp_;
    const Placement& placement_;
    ThreadPool& pool_;
    bool embeddings_, f32_activations_;
    Device serves_;
    KVTypes kv_types_;
    std::vector<int64_t> kv_width_;                // values per K or V row, per layer (0: not here)
    std::vector<size_t> k_row_bytes_, v_row_bytes_;
    std::vector<std::vector<uint8_t>> k_, v_;

    Step step_;
    int64_t n_ = 0;
    // Activations and scratch, sized for the largest step seen.
    std::vector<float> x_, h_, q_, k_new_, v_new_, attn_, moe_out_, proj_;
    std::vector<int32_t> route_ids_;
    std::vector<float> route_weights_;
    std::vector<float> rope_cos_, rope_sin_;       // [n][n_rot/2]
    std::vector<std::vector<int32_t>> seq_cells_;  // cells of each sequence in the step
    AttentionPlan attn_plan_;                      // which cells each token sees
    std::vector<float> router_, ffn_in_, gate_, up_, down_;
};

}  // namespace glmoe
