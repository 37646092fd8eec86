#include "expert_split.h"

#include <algorithm>
#include <cmath>

namespace glmoe {

std::vector<int> gpu_step_experts(const int32_t* ids, int64_t n_tokens, int k, int n_expert, int fetchable,
                                  double share) {
    std::vector<int> tokens(std::max(n_expert, 0), 0);
    int distinct = 0;
    for (int64_t i = 0; i < n_tokens * k; ++i)
        if (ids[i] >= 0 && ids[i] < n_expert && tokens[ids[i]]++ == 0) ++distinct;
    std::vector<int> chosen;
    for (int e = 0; e < std::min(fetchable, n_expert); ++e)
        if (tokens[e] > 0) chosen.push_back(e);
    const size_t quota = std::min<size_t>(chosen.size(), static_cast<size_t>(std::lround(share * distinct)));
    std::partial_sort(chosen.begin(), chosen.begin() + quota, chosen.end(),
                      [&](int a, int b) { return tokens[a] != tokens[b] ? tokens[a] > tokens[b] : a < b; });
    chosen.resize(quota);
    return chosen;
}

}  // namespace glmoe
