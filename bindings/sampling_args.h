// The sampling keyword arguments, shared by Sampler() and BatchEngine.submit() so that both take
// the same names, defaults and checks.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <map>
#include <optional>
#include <vector>

#include "sampling.h"

// sampling_module.cpp. Range checks are the Sampler constructor's; this checks the seed, whose
// Python form (None or -1: random) differs from the C++ one.
glmoe::SamplingParams make_sampling_params(float temperature, int top_k, float top_p, float min_p,
                                           float typical_p, float repeat_penalty, int repeat_last_n,
                                           float presence_penalty, float frequency_penalty,
                                           const std::optional<std::map<int32_t, float>>& logit_bias,
                                           std::optional<int64_t> seed);

// The keyword-only arguments matching make_sampling_params' parameters, for .def().
#define GLMOE_SAMPLING_KWARGS                                                                      \
    nanobind::kw_only(), nanobind::arg("temperature") = 0.8f, nanobind::arg("top_k") = 40,       \
        nanobind::arg("top_p") = 0.95f, nanobind::arg("min_p") = 0.05f,                           \
        nanobind::arg("typical_p") = 1.0f, nanobind::arg("repeat_penalty") = 1.0f,                \
        nanobind::arg("repeat_last_n") = 64, nanobind::arg("presence_penalty") = 0.0f,            \
        nanobind::arg("frequency_penalty") = 0.0f, nanobind::arg("logit_bias") = nanobind::none(), \
        nanobind::arg("seed") = nanobind::none()

// A row of per-row sampling (Context.decode_sample_rows, cuda_ops.sample_rows) from a dict of the
// keyword arguments above (missing ones take SamplingParams' defaults) plus "u" (the draw),
// "seq", "history" (the sequence's tokens so far) and "n_top" (top logprobs); unknown keys are refused.
struct RowSamplingArgs {
    glmoe::SamplingParams params;
    double u = 0;
    int seq = 0;
    std::vector<int32_t> history;
    int n_top = 0;
};
RowSamplingArgs row_sampling_args(const nanobind::dict& row);
