// Per-tensor placement with llama.cpp's rules (read from its source):
//
// -ngl N (src/llama-model.cpp, load_tensors): the "layers" are the n_layer_all blocks (GLM4-MoE's
//   block_count: the trunk and the MTP blocks after it) plus one more slot, n_layer_all, for the
//   output head (output_norm, output). i_gpu_start = max(n_layer_all + 1 - N, 0) and slot il is
//   on the GPU iff il >= i_gpu_start; N < 0 means n_layer_all + 1 (llama_model::n_gpu_layers()).
//   So -ngl 1 offloads only the output head, -ngl 2 also the last block, and so on ("offload
//   output layer to GPU first", llama.cpp PR 18148, 2025-12). Before that PR, and in ik_llama.cpp
//   today, i_gpu_start was max(n_layer - N, 0): the last N blocks, and the output head only for
//   N > n_layer. The input embedding is always on the CPU in llama.cpp; here token_embd goes
//   where layer 0's attention is, unless an override names it.
// -ot PATTERN=BUFFER[,...] (common/arg.cpp parse_tensor_buffer_overrides): the value is split at
//   every ',', each part at its first '='; an unknown buffer name is an error. At load
//   (src/llama-model-loader.cpp) the overrides are tried in order before the layer rule, each
//   with std::regex_search(tensor name, std::regex(pattern)) on the full GGUF name (with its
//   ".weight"), and the first match wins. A pattern that matches nothing is silently ignored
//   there; here it is an error (a typo would otherwise leave the experts on the GPU unnoticed),
//   except for the entries --cpu-moe / --n-cpu-moe generate.
// --cpu-moe (common/arg.cpp, common/common.h): one entry LLM_FFN_EXPS_REGEX =
//   "\.ffn_(up|down|gate|gate_up)_(ch|)exps" -> CPU. --n-cpu-moe N (N >= 0, else "invalid
//   value"): for i in [0, N) "blk\.<i>" + LLM_FFN_EXPS_REGEX -> CPU (llm_add_n_cpu_ffn_overrides),
//   i.e. the experts of the FIRST N blocks, dense lead blocks counted though they have none. The
//   entries follow the command line's order; llama-bench appends its -ncmoe entries after its -ot
//   ones. ik_llama.cpp differs: its --n-cpu-moe N (src/llama-load-tensors.cpp, one GPU) keeps the
//   experts of the LAST N trunk blocks that have experts (MTP and dense blocks skipped), appended
//   after the user's -ot entries, and its --cpu-moe is --n-cpu-moe 999.
#include "placement.h"

#include <algorithm>
#include <array>
#include <regex>

namespace glmoe {

namespace {

// llama.cpp's LLM_FFN_EXPS_REGEX (common/common.h).
const char* const kFfnExpsRegex = "\\.ffn_(up|down|gate|gate_up)_(ch|)exps";

const char* const kBufferNames[] = {"CPU", "CUDA0"};

enum class Part { none, attn, ffn, experts, shared };

const char* part_name(Part p) {
    switch (p) {
        case Part::attn: return "attention";
        case Part::ffn: return "FFN (norm, router, dense FFN)";
        case Part::experts: return "routed experts";
        case Part::shared: return "shared expert";
        case Part::none: break;
    }
    return "tensors";
}

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The part of a layer a tensor belongs to, from its name after "blk.N." (e.g. "attn_q.bias").
Part part_of(std::string base) {
    for (const char* suffix : {".weight", ".bias"})
        if (ends_with(base, suffix)) {
            base.resize(base.size() - std::string(suffix).size());
            break;
        }
    if (base.rfind("attn_", 0) == 0 && base != "attn_post_norm") return Part::attn;
    if (ends_with(base, "_exps") || ends_with(base, "_chexps")) return Part::experts;
    if (ends_with(base, "_shexp")) return Part::shared;
    if (base == "post_attention_norm" || base == "attn_post_norm" || base == "ffn_norm" || base == "ffn_gate_inp" ||
        base == "exp_probs_b" || base == "ffn_gate" || base == "ffn_up" || base == "ffn_down")
        return Part::ffn;
    return Part::none;
}

// "blk.N.rest" -> N and rest; -1 for any other name.
int block_of(const std::string& name, std::string* rest) {
    if (name.rfind("blk.", 0) != 0) return -1;
    size_t i = 4;
    long long n = 0;
    while (i < name.size() && i < 14 && name[i] >= '0' && name[i] <= '9') n = n * 10 + (name[i++] - '0');
    if (i == 4 || i >= name.size() || name[i] != '.') return -1;
    *rest = name.substr(i + 1);
    return n > 1'000'000 ? -1 : static_cast<int>(n);
}

Device buffer_device(const std::string& buffer) { return buffer == "CPU" ? Device::cpu : Device::gpu; }

struct CompiledOverride {
    const TensorOverride* ov;
    std::regex re;
    bool matched = false;
};

// A tensor the model uses: where -ngl puts it and where it ends up.
struct Entry {
    std::string name;
    int layer;   // -1: not in a block
    Part part;
    Device device = Device::cpu;
    bool overridden = false;
};

}  // namespace

const char* buffer_name(Device d) { return d == Device::gpu ? "CUDA0" : "CPU"; }

std::vector<TensorOverride> parse_tensor_overrides(const std::string& spec) {
    std::vector<TensorOverride> out;
    size_t start = 0;
    for (;;) {
        const size_t end = spec.find(',', start);
        const std::string item = spec.substr(start, end == std::string::npos ? std::string::npos : end - start);
        const std::string where = "-ot '" + spec + "': ";
        const size_t eq = item.find('=');
        if (eq == std::string::npos)
            throw PlacementError(where + "expected PATTERN=BUFFER, got '" + item + "'");
        TensorOverride ov{item.substr(0, eq), item.substr(eq + 1), true};
        if (ov.pattern.empty()) throw PlacementError(where + "empty tensor name pattern in '" + item + "'");
        try {
            std::regex check(ov.pattern);
        } catch (const std::regex_error& e) {
            throw PlacementError(where + "invalid regular expression '" + ov.pattern + "': " + e.what());
        }
        if (std::find(std::begin(kBufferNames), std::end(kBufferNames), ov.buffer) == std::end(kBufferNames))
            throw PlacementError(where + "unknown buffer type '" + ov.buffer + "' in '" + item +
                                 "' (available: CPU, CUDA0)");
        out.push_back(std::move(ov));
        if (end == std::string::npos) return out;
        start = end + 1;
    }
}

std::vector<TensorOverride> cpu_moe_overrides(int n_layers) {
    if (n_layers < 0) return {TensorOverride{kFfnExpsRegex, "CPU", false}};
    std::vector<TensorOverride> out;
    for (int i = 0; i < n_layers; ++i)
        out.push_back(TensorOverride{"blk\\." + std::to_string(i) + kFfnExpsRegex, "CPU", false});
    return out;
}

std::vector<TensorOverride> overrides_from_flags(const std::vector<std::string>& ot_values, bool cpu_moe,
                                                 int n_cpu_moe) {
    if (n_cpu_moe < 0)
        throw PlacementError("--n-cpu-moe must be at least 0, got " + std::to_string(n_cpu_moe));
    std::vector<TensorOverride> out;
    for (const std::string& v : ot_values) {
        std::vector<TensorOverride> part = parse_tensor_overrides(v);
        out.insert(out.end(), part.begin(), part.end());
    }
    if (cpu_moe) {
        const std::vector<TensorOverride> all = cpu_moe_overrides(-1);
        out.insert(out.end(), all.begin(), all.end());
    }
    if (n_cpu_moe > 0) {
        const std::vector<TensorOverride> first = cpu_moe_overrides(n_cpu_moe);
        out.insert(out.end(), first.begin(), first.end());
    }
    return out;
}

bool Placement::uses(Device d) const {
    if (embd == d || output == d) return true;
    for (const LayerPlacement& l : layers)
        if (l.attn == d || l.ffn == d || l.experts == d || l.shared == d) return true;
    for (const auto& t : tensors)
        if (t.second == d) return true;
    return false;
}

bool Placement::gpu_can_fetch_experts(const Model& model, int il) const {
    const LayerPlacement& l = layers[il];
    return model.hparams().layers[il].is_moe && l.experts == Device::cpu && l.ffn == Device::gpu &&
           (!model.layer(il).gate_shexp || l.shared == Device::gpu);
}

int Placement::n_layers_with_attn_on(Device d) const {
    return static_cast<int>(std::count_if(layers.begin(), layers.end(), [d](const LayerPlacement& l) { return l.attn == d; }));
}

Placement Placement::decide(const Model& model, const PlacementParams& params, bool gpu_available, std::string* note) {
    const HParams& hp = model.hparams();
    const int n_trunk = hp.n_layer;
    const int n_block = hp.n_layer + hp.n_nextn_layer;  // llama.cpp's n_layer_all
    // Slots 0..n_block-1 are the blocks, slot n_block the output head.
    const int n_gpu = params.n_gpu_layers < 0 ? n_block + 1 : params.n_gpu_layers;
    const int i_gpu_start = std::max(n_block + 1 - n_gpu, 0);
    auto slot_device = [&](int slot) { return slot >= i_gpu_start ? Device::gpu : Device::cpu; };

    std::vector<CompiledOverride> overrides;
    overrides.reserve(params.overrides.size());
    for (const TensorOverride& ov : params.overrides) {
        if (ov.buffer != "CPU" && ov.buffer != "CUDA0")
            throw PlacementError("-ot '" + ov.pattern + "=" + ov.buffer + "': unknown buffer type '" + ov.buffer +
                                 "' (available: CPU, CUDA0)");
        try {
            overrides.push_back(CompiledOverride{&ov, std::regex(ov.pattern), false});
        } catch (const std::regex_error& e) {
            throw PlacementError("-ot '" + ov.pattern + "=" + ov.buffer + "': invalid regular expression: " + e.what());
        }
    }

    // The tensors the model uses, in file order, with their -ngl device, then the first matching
    // override's. token_embd's default depends on layer 0 and is settled below.
    std::vector<Entry> entries;
    for (const GGUFTensorInfo& t : model.file().tensors()) {
        Entry e{t.name, -1, Part::none};
        if (t.name == "token_embd.weight") {
            e.device = Device::cpu;
        } else if (t.name == "output_norm.weight" || t.name == "output.weight") {
            e.device = slot_device(n_block);
        } else {
            std::string rest;
            e.layer = block_of(t.name, &rest);
            if (e.layer < 0 || e.layer >= n_block) continue;
            e.part = part_of(rest);
            if (e.layer < n_trunk && e.part == Part::none) continue;  // in the file, not read by the model
            e.device = slot_device(e.layer);
        }
        for (CompiledOverride& ov : overrides) {
            if (!std::regex_search(e.name, ov.re)) continue;
            if (!e.overridden) {
                e.device = buffer_device(ov.ov->buffer);
                e.overridden = true;
            }
            ov.matched = true;  // later matches count too: the pattern is not a typo
        }
        entries.push_back(std::move(e));
    }
    for (const CompiledOverride& ov : overrides)
        if (ov.ov->must_match && !ov.matched)
            throw PlacementError("-ot pattern '" + ov.ov->pattern + "' matches no tensor of this model");

    // Each part of a trunk layer on one device.
    Placement p;
    p.layers.resize(n_trunk);
    struct Seen {
        const Entry* first = nullptr;
    };
    std::vector<std::array<Seen, 5>> seen(n_trunk);
    for (const Entry& e : entries) {
        if (e.layer < 0 || e.layer >= n_trunk) continue;
        Seen& s = seen[e.layer][static_cast<int>(e.part)];
        if (!s.first) {
            s.first = &e;
        } else if (s.first->device != e.device) {
            throw PlacementError("blk." + std::to_string(e.layer) + " " + part_name(e.part) +
                                 " would be split across devices: " + s.first->name + " on " +
                                 buffer_name(s.first->device) + ", " + e.name + " on " + buffer_name(e.device) +
                                 " (each part of a layer must be on one device: change -ngl/-ot so that they agree)");
        }
    }
    for (int il = 0; il < n_trunk; ++il) {
        const auto& s = seen[il];
        auto device_of = [&](Part part, Device fallback) {
            const Entry* e = s[static_cast<int>(part)].first;
            return e ? e->device : fallback;
        };
        LayerPlacement& l = p.layers[il];
        l.attn = device_of(Part::attn, slot_device(il));
        l.ffn = device_of(Part::ffn, l.attn);
        l.experts = device_of(Part::experts, l.ffn);
        l.shared = device_of(Part::shared, l.ffn);
    }

    // The output head: output_norm and (untied) output together.
    const Entry* norm = nullptr;
    const Entry* head = nullptr;
    for (const Entry& e : entries) {
        if (e.name == "output_norm.weight") norm = &e;
        if (e.name == "output.weight") head = &e;
    }
    if (norm && head && norm->device != head->device)
        throw PlacementError(std::string("the output head would be split across devices: output_norm.weight on ") +
                             buffer_name(norm->device) + ", output.weight on " + buffer_name(head->device) +
                             " (they must be on one device)");
    p.output = norm ? norm->device : head ? head->device : slot_device(n_block);

    // token_embd: where an override puts it, else beside layer 0's attention.
    p.embd = n_trunk > 0 ? p.layers[0].attn : p.output;
    for (Entry& e : entries)
        if (e.name == "token_embd.weight") {
            if (!e.overridden) e.device = p.embd;
            p.embd = e.device;
        }

    p.tensors.reserve(entries.size());
    for (const Entry& e : entries) p.tensors.emplace_back(e.name, e.device);

    if (note) note->clear();
    if (!gpu_available && p.uses(Device::gpu)) {
        if (note) {
            std::string why;
            bool ngl_asked = false, ot_asked = false;
            for (const Entry& e : entries)  // token_embd follows layer 0, which is counted
                if (e.device == Device::gpu && (e.overridden || e.name != "token_embd.weight"))
                    (e.overridden ? ot_asked : ngl_asked) = true;
            if (ngl_asked) why = "n_gpu_layers = " + std::to_string(params.n_gpu_layers);
            if (ot_asked) why += std::string(why.empty() ? "" : " and ") + "-ot";
            if (why.empty()) why = "the placement";
            *note = why + " asked for CUDA0, but no usable GPU is available: running on the CPU";
        }
        for (LayerPlacement& l : p.layers) l = LayerPlacement{};
        p.embd = p.output = Device::cpu;
        for (auto& t : p.tensors) t.second = Device::cpu;
    }
    return p;
}

}  // namespace glmoe
