// A SamplingParams (the host Sampler's chain) as the device chain takes it (kernels.h's
// RowSampleParams); the caller fills in where the row's history and logit-bias entries lie.
#pragma once
#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "sampling.h"

namespace glmoe::cuda {

inline RowSampleParams row_sample_params(const SamplingParams& sp, double u, int n_top) {
    RowSampleParams q;
    q.u = u;
    q.temperature = sp.temperature;
    q.top_p = sp.top_p;
    q.min_p = sp.min_p;
    q.log_min_p = sp.min_p > 0.0f ? std::log(static_cast<double>(sp.min_p)) : 0.0;
    q.typical_p = sp.typical_p;
    q.repeat_penalty = sp.repeat_penalty;
    q.presence_penalty = sp.presence_penalty;
    q.frequency_penalty = sp.frequency_penalty;
    q.top_k = sp.top_k;
    q.repeat_last_n = sp.repeat_last_n;
    q.n_top = std::clamp(n_top, 0, kRowSampleMaxTop);
    q.bias_count = static_cast<int32_t>(sp.logit_bias.size());
    return q;
}

}  // namespace glmoe::cuda
