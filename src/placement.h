// Where each weight lives (CPU or GPU), decided once at load from llama.cpp's flags: -ngl,
// -ot/--override-tensor, --cpu-moe and --n-cpu-moe. The forward runs each op on the device that
// holds its weights, so this is also where each part of each layer runs; a layer's KV cache lives
// with its attention.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "model.h"

namespace glmoe {

enum class Device : uint8_t { cpu = 0, gpu = 1 };
const char* buffer_name(Device d);  // llama.cpp's buffer names: "CPU", "CUDA0"

// A bad -ot value, a pattern that matches no tensor, a unit split across devices.
struct PlacementError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// One -ot entry: tensors whose GGUF name contains a match of `pattern` (ECMAScript regex, searched
// as llama.cpp does) go to `buffer`. The first matching entry wins.
struct TensorOverride {
    std::string pattern;
    std::string buffer;       // "CPU" or "CUDA0"
    bool must_match = true;   // false for the entries --cpu-moe / --n-cpu-moe generate
};

// Splits llama.cpp's -ot value "PATTERN=BUFFER[,PATTERN=BUFFER...]" (common/arg.cpp: split at ',',
// then at the first '='); throws PlacementError naming the bad part: no '=', an empty pattern, a
// regex std::regex rejects, a buffer other than "CPU" or "CUDA0".
std::vector<TensorOverride> parse_tensor_overrides(const std::string& spec);
// The entries llama.cpp's --cpu-moe (n_layers < 0: every layer's experts) and --n-cpu-moe N
// (the experts of layers [0, N)) stand for, with must_match false.
std::vector<TensorOverride> cpu_moe_overrides(int n_layers);
// What every front end (Llama, the server, llama-bench, the engine) turns its flags into: each -ot
// value in order, then --cpu-moe's entry, then --n-cpu-moe's (n_cpu_moe > 0). Throws PlacementError
// for a bad -ot value or n_cpu_moe < 0.
std::vector<TensorOverride> overrides_from_flags(const std::vector<std::string>& ot_values, bool cpu_moe,
                                                 int n_cpu_moe);

struct PlacementParams {
    // As llama.cpp's -ngl (src/llama-model.cpp load_tensors, since llama.cpp PR 18148): N of the
    // n_block + 1 slots on the GPU, counted from the end, where the slots are the blocks (MTP ones
    // included, as llama.cpp's n_layer_all) and then the output head: N = 1 puts only the output
    // head there, N = 2 also the last block, N >= n_block + 1 (or < 0) everything.
    int n_gpu_layers = 0;
    std::vector<TensorOverride> overrides;  // applied before -ngl, as llama.cpp does
};

// The devices of one layer's parts. Each part's tensors must share a device. A part with no
// tensors (a dense layer's experts, a model without shared experts) has the ffn part's device.
struct LayerPlacement {
    Device attn = Device::cpu;     // attn_norm, attn_q/k/v (+ biases, qk-norms), attn_output; its KV cache
    Device ffn = Device::cpu;      // post_attention_norm, router (ffn_gate_inp, exp_probs_b), dense FFN
    Device experts = Device::cpu;  // ffn_{gate,up,down}_exps
    Device shared = Device::cpu;   // ffn_{gate,up,down}_shexp
    // Routed experts in RAM with the router on the GPU: in steps too small to copy the layer's
    // experts (expert_borrow_min_tokens), the GPU runs Placement::gpu_expert_share of the step's
    // experts among [0, gpu_streamed_experts), the ones it can fetch from pinned host memory, and
    // the CPU the rest (expert_split.h; 0: the CPU runs them all; set by Context).
    int gpu_streamed_experts = 0;
};

struct Placement {
    // token_embd (for the input): layer 0's attention device unless an override names it (llama.cpp
    // keeps it on the CPU always).
    Device embd = Device::cpu;
    // output_norm, output. With a tied head (no `output` tensor) output_norm's device decides, and
    // the head reads token_embd there: a backend other than embd's holds its own copy of it (as
    // llama.cpp duplicates the tied tensor into the output layer's buffer).
    Device output = Device::cpu;
    std::vector<LayerPlacement> layers;  // the trunk layers [0, n_layer); MTP blocks are in `tensors` only
    double gpu_expert_share = 0;  // ContextParams::gpu_expert_share, resolved (set by Context)
    // Every tensor the model uses (token_embd, output_norm, output, blk.N.* of the trunk and of the
    // MTP blocks) with its device, in file order (for logs and tests).
    std::vector<std::pair<std::string, Device>> tensors;

    bool uses(Device d) const;
    int n_layers_with_attn_on(Device d) const;
    // Layer il is MoE with its routed experts in RAM and its router, and shared expert if any, on
    // the GPU: the GPU can run those experts itself by copying them (borrowing, streaming).
    bool gpu_can_fetch_experts(const Model& model, int il) const;

    // Decides from the flags; throws PlacementError. Errors are the same with and without a GPU.
    // Without a usable GPU (gpu_available false) everything is on the CPU, and when the flags put
    // something on the GPU `note` (if given) says what asked for it; otherwise it is left empty.
    static Placement decide(const Model& model, const PlacementParams& params, bool gpu_available,
                            std::string* note = nullptr);
};

}  // namespace glmoe
