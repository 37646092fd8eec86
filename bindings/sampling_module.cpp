// glmoe._core.Sampler: the engine's sampler, with llama-cpp-python's parameter names.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>

#include "context.h"
#include "sample_history.h"
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

RowSamplingArgs row_sampling_args(const nb::dict& row) {
    static const char* const known[] = {"temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
                                        "repeat_last_n", "presence_penalty", "frequency_penalty", "logit_bias",
                                        "u", "seq", "history", "n_top"};
    for (auto [key, value] : row) {
        const std::string name = nb::cast<std::string>(key);
        if (std::find(std::begin(known), std::end(known), name) == std::end(known))
            throw nb::value_error(("unknown row sampling key " + name).c_str());
    }
    const SamplingParams d;
    auto get = [&](const char* key, auto fallback) {
        return row.contains(key) ? nb::cast<decltype(fallback)>(row[key]) : fallback;
    };
    RowSamplingArgs a;
    std::optional<std::map<int32_t, float>> bias;
    if (row.contains("logit_bias")) bias = nb::cast<std::map<int32_t, float>>(row["logit_bias"]);
    a.params = make_sampling_params(get("temperature", d.temperature), get("top_k", d.top_k), get("top_p", d.top_p),
                                    get("min_p", d.min_p), get("typical_p", d.typical_p),
                                    get("repeat_penalty", d.repeat_penalty), get("repeat_last_n", d.repeat_last_n),
                                    get("presence_penalty", d.presence_penalty),
                                    get("frequency_penalty", d.frequency_penalty), bias, std::nullopt);
    a.u = get("u", 0.0);
    a.seq = get("seq", 0);
    a.history = get("history", std::vector<int32_t>());
    a.n_top = get("n_top", 0);
    return a;
}

namespace {

using TokenRows = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using FlagRows = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

std::vector<int32_t> row_vector(const TokenRows& a) { return std::vector<int32_t>(a.data(), a.data() + a.shape(0)); }

// Context.decode_sample_rows for tests: rows holds a dict (row_sampling_args) or None per flagged row.
nb::dict decode_sample_rows_py(Context& ctx, const TokenRows& tokens, const TokenRows& pos, const TokenRows& seq,
                               const FlagRows& want, const nb::list& rows) {
    Batch b;
    b.token = row_vector(tokens);
    b.pos = row_vector(pos);
    b.seq = row_vector(seq);
    b.want_logits.assign(want.data(), want.data() + want.shape(0));
    std::vector<RowSamplingArgs> args(rows.size());
    std::vector<RowSampling> sampling(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
        if (rows[i].is_none()) continue;
        args[i] = row_sampling_args(nb::cast<nb::dict>(rows[i]));
        sampling[i] = RowSampling{&args[i].params, args[i].seq, &args[i].history, args[i].u, args[i].n_top};
    }
    Context::SampledRows out;
    {
        nb::gil_scoped_release release;
        ctx.decode_sample_rows(b, sampling, out);
    }
    nb::list ids, logprobs, top;
    for (size_t i = 0; i < sampling.size(); ++i) {
        ids.append(out.ids[i]);
        logprobs.append(static_cast<double>(out.logprobs[i]));
        nb::list t;
        for (int k = 0; k < sampling[i].n_top && out.top[i * kMaxSampledTop + k].id >= 0; ++k)
            t.append(nb::make_tuple(out.top[i * kMaxSampledTop + k].id,
                                    static_cast<double>(out.top[i * kMaxSampledTop + k].logprob)));
        top.append(t);
    }
    nb::list host;
    const size_t V = ctx.model().hparams().n_vocab;
    for (size_t r = 0; r * V < out.host_logits.size(); ++r)
        host.append(std::vector<float>(out.host_logits.begin() + r * V, out.host_logits.begin() + (r + 1) * V));
    nb::dict d;
    d["ids"] = ids;
    d["logprobs"] = logprobs;
    d["top"] = top;
    d["host_logits"] = host;
    return d;
}

}  // namespace

void bind_sampling(nb::module_& m) {
    m.def("decode_sample_rows", &decode_sample_rows_py, nb::arg("ctx"), nb::arg("tokens"), nb::arg("pos"),
          nb::arg("seq"), nb::arg("want_logits"), nb::arg("rows"),
          "Context.decode_sample_rows: rows has, per flagged row, None (its logits come back in host_logits)"
          " or a dict of sampling keywords plus u, seq, history and n_top."
          " Returns {ids, logprobs, top, host_logits}.");
    nb::class_<HistoryMirror>(m, "HistoryMirror", "What a device's per-sequence sampling histories hold.")
        .def(nb::init<int, int>(), nb::arg("n_seq"), nb::arg("capacity"))
        .def("sync", &HistoryMirror::sync, nb::arg("seq"), nb::arg("history"),
             "Records history as held; returns the first position that must be uploaded.")
        .def("appended", &HistoryMirror::appended, nb::arg("seq"), nb::arg("token"))
        .def("forget", &HistoryMirror::forget, nb::arg("seq"))
        .def("held", &HistoryMirror::held, nb::arg("seq"));
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
        .def("reseed", &Sampler::reseed, nb::arg("seed"))
        .def("uniform01", &Sampler::uniform01, "The next draw of sample()'s stream (what GPU sampling is given).");
}
