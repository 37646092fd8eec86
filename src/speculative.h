// Speculative verification: which tokens of a draft the target model keeps. One rule for every
// caller (the single-sequence Llama path and the batching engine), so that both give the output
// of plain sampling: greedy, and sampled for a seed.
#pragma once
#include <cstdint>
#include <vector>

#include "sampling.h"

namespace glmoe {

// logits holds draft.size() + 1 rows of sampler.n_vocab(): row i follows history + draft[0, i).
// Returns the accepted prefix of the draft followed by one more token, so that token k was drawn
// from row k and the number accepted is size() - 1. Each row is sampled exactly as plain decoding
// samples it (one draw of the sampler's stream per token, in order) and the draft is kept while
// it agrees. For a draft that is one token with certainty this is the speculative-sampling rule
// (keep d with probability p(d), else draw from p without d), and it gives more than the same
// distribution: for a seed, the same tokens as plain sampling, whatever was drafted.
std::vector<int32_t> verify_draft(Sampler& sampler, const float* logits, const std::vector<int32_t>& history,
                                  const std::vector<int32_t>& draft);

}  // namespace glmoe
