// Speculative verification: which tokens of a draft the target model keeps. One rule for every
// caller (the single-sequence Llama path and the batching engine), so that both give the output
// distribution of plain sampling, and greedy output identical to it.
#pragma once
#include <cstdint>
#include <vector>

#include "sampling.h"

namespace glmoe {

// logits holds draft.size() + 1 rows of sampler.n_vocab(): row i follows history + draft[0, i).
// Returns the accepted prefix of the draft followed by one more token, so that token k was drawn
// from row k and the number accepted is size() - 1. Draft token d is kept with probability p(d)
// under the sampler's distribution (Sampler::probabilities), else the token is drawn from p with
// d removed; after a fully accepted draft the last row is sampled as usual. Greedy: kept iff d is
// the argmax. Random draws come from the sampler's own stream, so a seed reproduces the output.
std::vector<int32_t> verify_draft(Sampler& sampler, const float* logits, const std::vector<int32_t>& history,
                                  const std::vector<int32_t>& draft);

}  // namespace glmoe
