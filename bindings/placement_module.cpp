// glmoe._core.decide_placement: where -ngl / -ot / --cpu-moe / --n-cpu-moe put each tensor of a
// model (placement.h), without creating a context: for tests and for showing a plan.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "expert_split.h"
#include "model.h"
#include "placement.h"

namespace nb = nanobind;
using namespace glmoe;

void bind_placement(nb::module_& m) {
    nb::exception<PlacementError>(m, "PlacementError", PyExc_ValueError);
    m.def(
        "parse_tensor_overrides",
        [](const std::string& value) {
            nb::list out;
            for (const TensorOverride& ov : parse_tensor_overrides(value)) out.append(nb::make_tuple(ov.pattern, ov.buffer));
            return out;
        },
        nb::arg("value"),
        "One -ot value (\"PATTERN=BUFFER[,PATTERN=BUFFER...]\") as [(pattern, buffer)]; raises PlacementError.");
    m.def(
        "gpu_step_experts",
        [](const std::vector<int32_t>& ids, int k, int n_expert, int fetchable, double share) {
            if (k <= 0 || ids.size() % k != 0) throw std::invalid_argument("ids must hold whole rows of k routes");
            return gpu_step_experts(ids.data(), static_cast<int64_t>(ids.size() / k), k, n_expert, fetchable, share);
        },
        nb::arg("ids"), nb::arg("k"), nb::arg("n_expert"), nb::arg("fetchable"), nb::arg("share"),
        "The experts the GPU runs in a small step of a layer whose routed experts are in RAM (expert_split.h): "
        "ids are the step's n_tokens x k routes, flattened.");
    m.def(
        "decide_placement",
        [](const Model& model, int n_gpu_layers, const std::vector<std::string>& tensor_overrides, int n_cpu_moe,
           bool cpu_moe, bool gpu_available) {
            PlacementParams params;
            params.n_gpu_layers = n_gpu_layers;
            params.overrides = overrides_from_flags(tensor_overrides, cpu_moe, n_cpu_moe);
            std::string note;
            const Placement p = Placement::decide(model, params, gpu_available, &note);
            nb::list tensors, layers;
            for (const auto& [name, device] : p.tensors) tensors.append(nb::make_tuple(name, buffer_name(device)));
            for (const LayerPlacement& l : p.layers) {
                nb::dict d;
                d["attn"] = buffer_name(l.attn);
                d["ffn"] = buffer_name(l.ffn);
                d["experts"] = buffer_name(l.experts);
                d["shared"] = buffer_name(l.shared);
                layers.append(d);
            }
            nb::dict out;
            out["tensors"] = tensors;
            out["layers"] = layers;
            out["embd"] = buffer_name(p.embd);
            out["output"] = buffer_name(p.output);
            out["note"] = note;
            return out;
        },
        nb::arg("model"), nb::arg("n_gpu_layers") = 0, nb::arg("tensor_overrides") = std::vector<std::string>(),
        nb::arg("n_cpu_moe") = 0, nb::arg("cpu_moe") = false, nb::arg("gpu_available") = true,
        "Where each tensor goes (\"CPU\" or \"CUDA0\"): {tensors: [(name, buffer)] in file order, layers:"
        " [{attn, ffn, experts, shared}], embd, output, note}. tensor_overrides: -ot values"
        " (\"PATTERN=BUFFER[,...]\"), then --cpu-moe's and --n-cpu-moe's entries. Raises PlacementError"
        " (a ValueError) for a bad value, a pattern that matches no tensor or a layer part split across"
        " devices.");
}
