// glmoe._core.SuffixStore / SuffixDrafter: suffix decoding's index and per-sequence drafter.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <vector>

#include "speculative.h"
#include "step_cost.h"
#include "suffix_draft.h"

namespace nb = nanobind;
using namespace glmoe;

namespace {

using Tokens = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using LogitRows = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

nb::ndarray<nb::numpy, int32_t> to_numpy(const std::vector<int32_t>& v) {
    auto* data = new int32_t[v.size()];
    std::memcpy(data, v.data(), v.size() * sizeof(int32_t));
    nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<int32_t*>(p); });
    return nb::ndarray<nb::numpy, int32_t>(data, {v.size()}, owner);
}

SuffixDraftParams make_params(int max_depth, float max_spec_factor, float min_token_prob, int max_spec_tokens,
                              bool adaptive) {
    SuffixDraftParams p;
    p.max_depth = max_depth;
    p.max_spec_factor = max_spec_factor;
    p.min_token_prob = min_token_prob;
    p.max_spec_tokens = max_spec_tokens;
    p.adaptive = adaptive;
    return p;
}

#define GLMOE_DRAFT_KWARGS                                                                          \
    nb::arg("max_depth") = 64, nb::arg("max_spec_factor") = 1.0f, nb::arg("min_token_prob") = 0.1f, \
        nb::arg("max_spec_tokens") = 32

}  // namespace

void bind_draft(nb::module_& m) {
    m.def("verify_draft",
          [](Sampler& sampler, const LogitRows& logits, const Tokens& history, const Tokens& draft) {
              const std::vector<int32_t> d(draft.data(), draft.data() + draft.shape(0));
              if (logits.shape(0) != d.size() + 1 || logits.shape(1) != static_cast<size_t>(sampler.n_vocab()))
                  throw nb::value_error("logits must have len(draft) + 1 rows of n_vocab");
              const std::vector<int32_t> h(history.data(), history.data() + history.shape(0));
              return to_numpy(verify_draft(sampler, logits.data(), h, d));
          },
          nb::arg("sampler"), nb::arg("logits"), nb::arg("history"), nb::arg("draft"),
          "The speculative acceptance rule: the accepted prefix of draft, then one more token (row k of"
          " logits follows history + draft[:k]).");

    nb::class_<SuffixStore>(m, "SuffixStore",
                            "Earlier outputs shared by all sequences, within a byte budget (oldest dropped first).")
        .def(nb::init<size_t, int>(), nb::arg("byte_budget"), nb::arg("depth_limit"))
        .def("add", [](SuffixStore& s, const Tokens& t) { s.add(std::vector<int32_t>(t.data(), t.data() + t.shape(0))); },
             nb::arg("output"))
        .def("propose",
             [](const SuffixStore& s, const Tokens& tail, int max_depth, float max_spec_factor, float min_token_prob,
                int max_spec_tokens, int max_tokens) {
                 const auto params = make_params(max_depth, max_spec_factor, min_token_prob, max_spec_tokens, false);
                 return to_numpy(s.propose(tail.data(), static_cast<int>(tail.shape(0)), params, max_tokens).tokens);
             },
             nb::arg("tail"), GLMOE_DRAFT_KWARGS, nb::arg("max_tokens") = 1 << 30)
        .def_prop_ro("bytes", &SuffixStore::bytes)
        .def_prop_ro("n_documents", &SuffixStore::n_documents)
        .def_prop_ro("byte_budget", &SuffixStore::byte_budget)
        .def_prop_ro("depth_limit", &SuffixStore::depth_limit);

    nb::class_<StepCostModel>(m, "StepCostModel", "Step wall time by size (a Context keeps one).")
        .def(nb::init<>())
        .def("record", &StepCostModel::record, nb::arg("n_tokens"), nb::arg("seconds"))
        .def("relative", &StepCostModel::relative, nb::arg("base"), nb::arg("max_extra"));

    nb::class_<SuffixDrafter>(m, "SuffixDrafter", "One sequence's suffix-decoding drafter.")
        .def("__init__",
             [](SuffixDrafter* self, int max_depth, float max_spec_factor, float min_token_prob, int max_spec_tokens,
                bool adaptive, std::shared_ptr<SuffixStore> store) {
                 new (self) SuffixDrafter(
                     make_params(max_depth, max_spec_factor, min_token_prob, max_spec_tokens, adaptive), std::move(store));
             },
             GLMOE_DRAFT_KWARGS, nb::arg("adaptive") = true, nb::arg("store").none() = nb::none())
        .def("append", [](SuffixDrafter& d, const Tokens& t) { d.append(t.data(), t.shape(0)); }, nb::arg("tokens"))
        .def("mark_prompt_end", &SuffixDrafter::mark_prompt_end)
        .def("propose",
             [](SuffixDrafter& d, int max_tokens, const SuffixDrafter::RelativeCost& relative_cost, int sequences) {
                 return to_numpy(d.propose(max_tokens, relative_cost, sequences));
             },
             nb::arg("max_tokens") = 1 << 30, nb::arg("relative_cost").none() = nb::none(), nb::arg("sequences") = 1,
             "relative_cost(k): [a step with j draft tokens over one without, j = 0..k], called only when there"
             " is a draft to size (e.g. lambda k: ctx.relative_step_costs(1, k)); sequences: tokens the step"
             " yields without drafts.")
        .def("record", &SuffixDrafter::record, nb::arg("n_drafted"), nb::arg("n_accepted"))
        .def("finish", &SuffixDrafter::finish)
        .def_prop_ro("acceptance", &SuffixDrafter::acceptance)
        .def_prop_ro("stats", [](const SuffixDrafter& d) {
            const DraftStats& s = d.stats();
            nb::dict out;
            out["steps"] = s.steps;
            out["drafted"] = s.drafted;
            out["accepted"] = s.accepted;
            out["paused"] = s.paused;
            return out;
        });
}
