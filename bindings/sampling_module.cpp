// glmoe._core.Sampler: the engine's sampler, with llama-cpp-python's parameter names.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <map>
#include <optional>

#include "sampling.h"
#include "sampling_args.h"

namespace nb = nanobind;
using namespace glmoe;

namespace {

using Logits = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Tokens = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

const float* checked_logits(const Sampler& s, const Logits& logits) {
    if (static_cast<int64_t>(logits.shape(0)) != s.n_vocab())
        throw nb::value_error("logits must have n_vocab entries");
    return logits.data();
}

std::vector<int32_t> to_vector(const Tokens& tokens) {
    return std::vector<int32_t>(tokens.data(), tokens.data() + tokens.shape(0));
}

}  // namespace

SamplingParams make_sampling_params(float temperature, int top_k, float top_p, float min_p,
                                    float typical_p, float repeat_penalty, int repeat_last_n,
                                    float presence_penalty, float frequency_penalty,
                                    const std::optional<std::map<int32_t, float>>& logit_bias,
                                    std::optional<int64_t> seed) {
    SamplingParams p;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.typical_p = typical_p;
    p.repeat_penalty = repeat_penalty;
    p.repeat_last_n = repeat_last_n;
    p.presence_penalty = presence_penalty;
    p.frequency_penalty = frequency_penalty;
    if (logit_bias) p.logit_bias.assign(logit_bias->begin(), logit_bias->end());
    // None, or -1 as llama.cpp's command line takes it, asks for a random seed.
    if (seed && (*seed < -1 || *seed > UINT32_MAX))
        throw nb::value_error("seed must be -1 (random) or in [0, 2**32 - 1]");
    p.seed = !seed || *seed == -1 ? kRandomSeed : static_cast<uint32_t>(*seed);
    return p;
}

void bind_sampling(nb::module_& m) {
    nb::class_<Sampler>(m, "Sampler",
                        "Greedy (temperature <= 0) or logit_bias -> penalties -> top_k -> typical_p"
                        " -> top_p -> min_p -> temperature -> seeded draw.")
        .def("__init__",
             [](Sampler* self, int n_vocab, float temperature, int top_k, float top_p, float min_p,
                float typical_p, float repeat_penalty, int repeat_last_n, float presence_penalty,
                float frequency_penalty, std::optional<std::map<int32_t, float>> logit_bias,
                std::optional<int64_t> seed) {
                 new (self) Sampler(make_sampling_params(temperature, top_k, top_p, min_p, typical_p,
                                                         repeat_penalty, repeat_last_n, presence_penalty,
                                                         frequency_penalty, logit_bias, seed),
                                    n_vocab);
             },
             nb::arg("n_vocab"), GLMOE_SAMPLING_KWARGS)
        .def_prop_ro("n_vocab", &Sampler::n_vocab)
        .def("sample",
             [](Sampler& s, const Logits& logits, const Tokens& history) {
                 return s.sample(checked_logits(s, logits), to_vector(history));
             },
             nb::arg("logits"), nb::arg("history"))
        .def("probabilities",
             [](Sampler& s, const Logits& logits, const Tokens& history) {
                 const auto dist = s.probabilities(checked_logits(s, logits), to_vector(history));
                 int32_t* ids = new int32_t[dist.size()];
                 float* probs = new float[dist.size()];
                 for (size_t i = 0; i < dist.size(); ++i) {
                     ids[i] = dist[i].first;
                     probs[i] = static_cast<float>(dist[i].second);
                 }
                 nb::capsule ids_owner(ids, [](void* p) noexcept { delete[] static_cast<int32_t*>(p); });
                 nb::capsule probs_owner(probs, [](void* p) noexcept { delete[] static_cast<float*>(p); });
                 return nb::make_tuple(
                     nb::ndarray<nb::numpy, int32_t>(ids, {dist.size()}, ids_owner),
                     nb::ndarray<nb::numpy, float>(probs, {dist.size()}, probs_owner));
             },
             nb::arg("logits"), nb::arg("history"),
             "The distribution sample() would draw from: (token ids, probabilities).")
        .def("reseed", &Sampler::reseed, nb::arg("seed"));
}
