// The ops the GLM4-MoE forward (glm4moe.cpp) is written in, and what a backend implements to run
// them: the CPU (cpu_backend.cpp) and the CUDA GPU (ggml-cuda/cuda_backend.cu).
//
// A backend holds the weights the placement (placement.h) puts on it, the KV cache of the layers
// whose attention it runs, and a step's activations, each [n tokens][width] f32 in its memory:
//   x        [n][H]            the residual stream
//   h        [n][H]            rms_norm(x) * weight: the input of the next matrices
//   qkv      [n][nq + 2 nkv]   projections (q roped in place; k and v go to the cache)
//   attn     [n][nq]           attention output
//   route    [n][n_used]       chosen expert ids (int32) and their weights
//   moe_out  [n][H]            experts' sum, when it is to be added on another backend
// Ops run in the order the forward calls them. The CUDA backend only enqueues work (a decode
// step's ops are captured into CUDA graphs and replayed); the CPU backend runs each op at once.
// Accumulation is f32 everywhere. Activations may be rounded for the matrix products (8-bit
// blocks, or bf16 on the GPU's tensor cores) unless the backend is in f32-activation mode.
#pragma once
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <vector>

#include "kv_cache.h"
#include "model.h"
#include "placement.h"
#include "sampling.h"

namespace glmoe {

// One forward's tokens (a micro-batch); host arrays of n entries. Cells are already allocated in
// kv, whose per-sequence lists say which cells each token sees (its sequence's, pos <= its own).
// A token may be sampled_token(r): the one the previous step sampled in its row r, which only
// the device knows yet (overlapped decoding, Context::begin_sampled; the GPU backend only).
struct Step {
    int n = 0;
    const int32_t* token = nullptr;
    const int32_t* pos = nullptr;
    const int32_t* seq = nullptr;
    const int32_t* cells = nullptr;
    const KVCache* kv = nullptr;
};

// Sampling on the backend that runs the output head: greedy when temperature <= 0.
struct DeviceSampling {
    float temperature = 0.0f;
    int top_k = 0;
    float top_p = 1.0f;
    float min_p = 0.0f;
};

// Per-row sampling on the backend that runs the output head (StepOutput::Kind::sampled): the CPU
// Sampler's whole chain with the row's own parameters and draw. A row without params brings its
// logits back instead (rows the device cannot sample, e.g. under a grammar mask).
struct RowSampling {
    const SamplingParams* params = nullptr;         // null: this row's logits go to the host
    int seq = 0;                                    // whose device-held history the penalties read
    const std::vector<int32_t>* history = nullptr;  // that sequence's tokens so far, oldest first
    double u = 0;                                   // the draw (Sampler::uniform01); unused when greedy
    int n_top = 0;                                  // most likely tokens to report with logprobs
};
constexpr int32_t sampled_token(int row) { return -1 - row; }
// Limits of device sampling: rows beyond them sample on the host (Context::samples_row_on_gpu).
constexpr int kMaxSampledTop = 20;
constexpr int kMaxRowLogitBias = 1024;
constexpr int kMaxTypicalCandidates = 2048;  // typical_p < 1 needs top_k in [1, this] (or a vocabulary this small)
struct SampledTop {
    int32_t id;  // -1 past the end (a vocabulary smaller than asked)
    float logprob;
};

// What the step hands back, for the tokens `rows` (step indices).
struct StepOutput {
    enum class Kind {
        none,       // nothing: the step only fills the KV cache
        logits,     // n_vocab floats per row (an embeddings context: the normed hidden state, n_embd)
        token_ids,  // one sampled token per row
        sampled,    // per row: row_sampling's token, its logprob and top logprobs, or (no params) its logits
    } kind = Kind::logits;
    std::vector<int32_t> rows;
    float* logits = nullptr;      // host
    int32_t* ids = nullptr;       // host
    DeviceSampling sampling;
    const float* u = nullptr;     // token_ids: one uniform draw per row (host)
    // sampled: per row its sampling (input), then ids, logprobs and kMaxSampledTop top entries
    // (filled where n_top > 0) per row; logits holds the rows without params, in row order.
    const RowSampling* row_sampling = nullptr;
    float* logprobs = nullptr;
    SampledTop* top = nullptr;
    // sampled, every row with params: output() only enqueues the step, and the GPU backend's
    // finish_sampled() hands its rows over later (ids, logprobs and top above are then unused).
    bool deferred = false;
};

// Activations that cross between backends.
enum class Act { x, h, route_ids, route_weights, moe_out };

// Which matrices read h next (a backend may keep h in the form they read).
enum class Part { attention, ffn };

class Backend {
public:
    virtual ~Backend() = default;
    virtual Device device() const = 0;

    // Starts a step that will end with output(out): uploads its tokens, positions and cells, and
    // works out what each token sees.
    virtual void begin_step(const Step& step, const StepOutput& out) = 0;

    // x[t] = token_embd row token[t], dequantized.
    virtual void embed(const Weight& table) = 0;
    // h[t] = x[t] / rms(x[t]) * w, eps = rms_eps; h is read next by layer il's `part`.
    virtual void rms_norm(const std::vector<float>& w, int il, Part part) = 0;
    // qkv = [Wq; Wk; Wv] h + bias; qk-norm models: per-head rms_norm of q and k; neox rope on the
    // first n_rot dims of each head at the token's position; k and v stored into layer il's cache
    // at the token's cell.
    virtual void qkv_prepare(int il) = 0;
    // attn[t] = softmax(q[t] K^T / sqrt(D)) V over the cells token t sees; q head j reads kv head
    // j / (n_head / n_head_kv). A token's row does not depend on the others in the step.
    virtual void attention(int il) = 0;
    // x += Wo attn.
    virtual void attn_output(int il) = 0;
    // x += down(silu(gate h) * up h): a dense layer's FFN.
    virtual void ffn_dense(int il) = 0;
    // route = top n_used experts of sigmoid(router h) + selection bias (within the best groups),
    // weights = the unbiased scores (normalised, scaled).
    virtual void moe_route(int il) = 0;
    // The experts of layer il this backend holds, applied to h: each routed one (by route) times its
    // weight, plus the shared expert; added to x, or written to moe_out when !into_x.
    virtual void moe_experts(int il, bool into_x) = 0;
    // moe_experts, with `alongside` run on the calling thread meanwhile (the CPU backend starts its
    // threads on the experts first); by default alongside runs first. alongside must not use this
    // backend's thread pool.
    virtual void moe_experts_alongside(int il, bool into_x, const std::function<void()>& alongside) {
        alongside();
        moe_experts(il, into_x);
    }
    // x += moe_out.
    virtual void add_moe_out() = 0;
    // Whether this step, this backend runs layer il's routed experts though they are placed on the
    // other device (copying the ones the step uses: faster than sending a big step's tokens there).
    virtual bool borrows_experts(int il) const { return false; }

    // Starts the work enqueued so far (a backend that holds it back, as a CUDA graph being captured,
    // launches it), so that it runs while the host does other work.
    virtual void flush() {}

    // Crossing to another backend: download makes the listed activations readable on the host
    // (waiting for the work that writes them) and returns their addresses, valid until the next
    // op; upload takes an activation from the host. The routing is layer il's (n_used wide).
    virtual std::vector<const void*> download(std::initializer_list<Act> acts, int il) = 0;
    virtual void upload(Act act, const void* host, int il) = 0;

    // Ends the step: x through output_norm and the output head for the requested rows (or the
    // normed rows themselves in an embeddings context), into the host buffers of `out`.
    virtual void output(const StepOutput& out) = 0;
};

}  // namespace glmoe
