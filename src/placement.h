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

// Splits llama.cpp's -ot value "PATTERN=BUFFER[,PATTERN=BUFFER...]"; throws PlacementError.
std::vector<TensorOverride> parse_tensor_overrides(const std::string& spec);
// The entries llama.cpp's --cpu-moe (n_layers < 0: every layer's experts) and --n-cpu-moe N
// (the experts of layers [0, N)) stand for.
std::vector<TensorOverride> cpu_moe_overrides(int n_layers);

struct PlacementParams {
    // As llama.cpp's -ngl: the last N layers on the GPU; N > n_layer (or < 0) also the output head.
    int n_gpu_layers = 0;
    std::vector<TensorOverride> overrides;  // applied before -ngl, as llama.cpp does
};

// The devices of one layer's parts. Each part's tensors must share a device.
struct LayerPlacement {
    Device attn = Device::cpu;     // attn_norm, attn_q/k/v (+ biases, qk-norms), attn_output; its KV cache
    Device ffn = Device::cpu;      // post_attention_norm, router (ffn_gate_inp, exp_probs_b), dense FFN
    Device experts = Device::cpu;  // ffn_{gate,up,down}_exps
    Device shared = Device::cpu;   // ffn_{gate,up,down}_shexp
};

struct Placement {
    Device embd = Device::cpu;     // token_embd (for the input)
    Device output = Device::cpu;   // output_norm, output
    std::vector<LayerPlacement> layers;
    // Every tensor's GGUF name and device, in file order (for logs and tests).
    std::vector<std::pair<std::string, Device>> tensors;

    bool uses(Device d) const;
    int n_layers_with_attn_on(Device d) const;

    // Decides from the flags; throws PlacementError. Without a usable GPU (gpu_available false),
    // everything is on the CPU and `note` says why the flags asked for more.
    static Placement decide(const Model& model, const PlacementParams& params, bool gpu_available,
                            std::string* note = nullptr);
};

}  // namespace glmoe
