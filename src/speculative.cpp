#include "speculative.h"

namespace glmoe {

namespace {

int32_t accept_or_resample(Sampler& sampler, const float* logits, const std::vector<int32_t>& history,
                           int32_t drafted) {
    const auto probs = sampler.probabilities(logits, history);
    double p = 0.0, rest = 0.0;
    int n_rest = 0;
    int32_t last = drafted;
    for (const auto& [id, q] : probs) {
        if (id == drafted) {
            p += q;
        } else if (q > 0.0) {
            rest += q;
            ++n_rest;
            last = id;
        }
    }
    if (n_rest == 0 || (p > 0.0 && sampler.uniform01() < p)) return drafted;
    // Only one token left to draw (always so under greedy): no draw, as greedy sample() takes none.
    if (n_rest == 1) return last;
    // The residual max(0, p - q) of speculative sampling, for a draft q that is one token.
    const double target = sampler.uniform01() * rest;
    double cumulative = 0.0;
    for (const auto& [id, q] : probs) {
        if (id == drafted || q <= 0.0) continue;
        cumulative += q;
        if (target < cumulative) return id;
    }
    return last;  // rounding in target put it past the end
}

}  // namespace

std::vector<int32_t> verify_draft(Sampler& sampler, const float* logits, const std::vector<int32_t>& history,
                                  const std::vector<int32_t>& draft) {
    const size_t n_vocab = static_cast<size_t>(sampler.n_vocab());
    std::vector<int32_t> out;
    if (draft.empty()) {  // the common case: no copy of the history
        out.push_back(sampler.sample(logits, history));
        return out;
    }
    std::vector<int32_t> seen = history;  // grows with the accepted tokens: penalties must see them
    for (size_t i = 0; i < draft.size(); ++i) {
        const int32_t t = accept_or_resample(sampler, logits + i * n_vocab, seen, draft[i]);
        out.push_back(t);
        if (t != draft[i]) return out;
        seen.push_back(t);
    }
    out.push_back(sampler.sample(logits + draft.size() * n_vocab, seen));
    return out;
}

}  // namespace glmoe
