#include "speculative.h"

namespace glmoe {

std::vector<int32_t> verify_draft(Sampler& sampler, const float* logits, const std::vector<int32_t>& history,
                                  const std::vector<int32_t>& draft) {
    const size_t n_vocab = static_cast<size_t>(sampler.n_vocab());
    std::vector<int32_t> out;
    std::vector<int32_t> seen;  // history and the accepted tokens: penalties must see them
    const std::vector<int32_t>* context = &history;  // no copy while nothing is accepted (the common case)
    for (size_t i = 0; i <= draft.size(); ++i) {
        const int32_t t = sampler.sample(logits + i * n_vocab, *context);
        out.push_back(t);
        if (i == draft.size() || t != draft[i]) break;
        if (context == &history) {
            seen = history;
            context = &seen;
        }
        seen.push_back(t);
    }
    return out;
}

}  // namespace glmoe
