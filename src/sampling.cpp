#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace glmoe {

namespace {

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

// Written as !(in range) so that NaN fails too.
void require_unit_interval(float value, const char* name) {
    require(value >= 0.0f && value <= 1.0f, std::string(name) + " must lie in [0, 1], got " +
                                                std::to_string(value));
}

}  // namespace

Sampler::Sampler(const SamplingParams& params, int n_vocab) : params_(params), n_vocab_(n_vocab) {
    check(params, n_vocab);
    work_.resize(n_vocab);
    counts_.assign(n_vocab, 0);
    cands_.reserve(n_vocab);
    probs_.reserve(n_vocab);
    reseed(params.seed);
}

void Sampler::check(const SamplingParams& params, int n_vocab) {
    require(n_vocab > 0, "n_vocab must be positive");
    require(std::isfinite(params.temperature), "temperature must be finite");
    require_unit_interval(params.top_p, "top_p");
    require_unit_interval(params.min_p, "min_p");
    require_unit_interval(params.typical_p, "typical_p");
    require(std::isfinite(params.repeat_penalty) && params.repeat_penalty > 0.0f,
            "repeat_penalty must be positive, got " + std::to_string(params.repeat_penalty));
    require(params.repeat_last_n >= -1,
            "repeat_last_n must be -1 (all history), 0 (off) or positive, got " +
                std::to_string(params.repeat_last_n));
    require(std::isfinite(params.presence_penalty), "presence_penalty must be finite");
    require(std::isfinite(params.frequency_penalty), "frequency_penalty must be finite");
    for (const auto& [token, bias] : params.logit_bias) {
        require(token >= 0 && token < n_vocab,
                "logit_bias token " + std::to_string(token) + " is outside the vocabulary");
        // +inf would make the softmax inf/inf; -inf is the usual way to ban a token.
        require(!std::isnan(bias) && bias != std::numeric_limits<float>::infinity(),
                "logit_bias for token " + std::to_string(token) + " must be a number below +inf");
    }
}

void Sampler::reseed(uint32_t seed) {
    rng_.seed(seed == kRandomSeed ? std::random_device{}() : seed);
}

// Uniform in [0, 1) with 53 random bits (genrand_res53). std::mt19937's output sequence is fixed
// by the standard, unlike std::uniform_real_distribution, so draws are portable for a seed.
double Sampler::uniform01() {
    const uint32_t a = rng_() >> 5, b = rng_() >> 6;
    return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0);
}

void Sampler::apply_bias_and_penalties(const float* logits, const std::vector<int32_t>& history) {
    std::copy(logits, logits + n_vocab_, work_.begin());
    for (const auto& [token, bias] : params_.logit_bias) work_[token] += bias;

    const SamplingParams& p = params_;
    if (!p.penalizes()) return;
    const size_t window = p.repeat_last_n < 0 ? history.size()
                                              : std::min<size_t>(history.size(), p.repeat_last_n);
    const auto begin = history.end() - window;
    for (auto it = begin; it != history.end(); ++it)
        require(*it >= 0 && *it < n_vocab_,
                "history token " + std::to_string(*it) + " is outside the vocabulary");
    for (auto it = begin; it != history.end(); ++it) ++counts_[*it];
    // Each distinct token is penalised once, on its first visit, which also clears its count.
    for (auto it = begin; it != history.end(); ++it) {
        const int32_t count = counts_[*it];
        if (count == 0) continue;
        counts_[*it] = 0;
        float& logit = work_[*it];
        // Dividing a negative logit would raise it, so those are multiplied (as llama.cpp does).
        logit = logit <= 0.0f ? logit * p.repeat_penalty : logit / p.repeat_penalty;
        logit -= float(count) * p.frequency_penalty + p.presence_penalty;
    }
}

int32_t Sampler::argmax() const {
    int32_t best = -1;
    float best_logit = -std::numeric_limits<float>::infinity();
    for (int32_t i = 0; i < n_vocab_; ++i) {
        if (work_[i] > best_logit) {  // strict: ties go to the lowest id; NaN never wins
            best = i;
            best_logit = work_[i];
        }
    }
    require(best >= 0, "every token has logit -inf; nothing can be sampled");
    return best;
}

namespace {
// Descending logit, ties by ascending id: a total order, so every cut is deterministic.
struct Better {
    template <class C>
    bool operator()(const C& a, const C& b) const {
        return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
    }
};
}  // namespace

float Sampler::best_logit() const {
    return std::min_element(cands_.begin(), cands_.end(), Better())->logit;  // Better = first
}

// Gathers the tokens that can still be drawn, applying top_k on the way: a heap whose front is
// the worst of the best k so far costs most tokens a single comparison, and no full sort.
void Sampler::collect_candidates() {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const size_t k = params_.top_k > 0 ? std::min(params_.top_k, n_vocab_) : n_vocab_;
    cands_.clear();
    for (int32_t i = 0; i < n_vocab_; ++i) {
        // Tokens at -inf (banned by a bias) can never be drawn; dropping them now also keeps
        // 0 * log 0 out of the typical_p entropy.
        if (!(work_[i] > neg_inf)) continue;
        const Candidate c{work_[i], i};
        if (cands_.size() < k) {
            cands_.push_back(c);
            if (k < static_cast<size_t>(n_vocab_)) std::push_heap(cands_.begin(), cands_.end(), Better());
        } else if (Better()(c, cands_.front())) {
            std::pop_heap(cands_.begin(), cands_.end(), Better());
            cands_.back() = c;
            std::push_heap(cands_.begin(), cands_.end(), Better());
        }
    }
    require(!cands_.empty(), "every token has logit -inf; nothing can be sampled");
}

// Locally typical sampling: rank tokens by |-log p - entropy| and keep the smallest prefix of
// that ranking whose mass exceeds typical_p (strictly, as llama.cpp).
void Sampler::apply_typical() {
    const double max_logit = best_logit();
    probs_.resize(cands_.size());
    double total = 0.0;
    for (size_t i = 0; i < cands_.size(); ++i) total += probs_[i] = std::exp(cands_[i].logit - max_logit);
    double entropy = 0.0;
    for (double& prob : probs_) {
        prob /= total;
        if (prob > 0.0) entropy -= prob * std::log(prob);
    }
    scores_.resize(cands_.size());
    for (size_t i = 0; i < cands_.size(); ++i)
        scores_[i] = probs_[i] > 0.0 ? std::fabs(-std::log(probs_[i]) - entropy)
                                     : std::numeric_limits<double>::infinity();
    order_.resize(cands_.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<int32_t>(i);
    std::sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) {
        if (scores_[a] != scores_[b]) return scores_[a] < scores_[b];
        return Better()(cands_[a], cands_[b]);
    });
    size_t keep = order_.size();
    double cumulative = 0.0;
    for (size_t i = 0; i < order_.size(); ++i) {
        cumulative += probs_[order_[i]];
        if (cumulative > params_.typical_p) {
            keep = i + 1;
            break;
        }
    }
    scratch_.clear();
    for (size_t i = 0; i < keep; ++i) scratch_.push_back(cands_[order_[i]]);
    cands_.swap(scratch_);
}

// top_p keeps the shortest prefix (by descending probability) with mass >= top_p; min_p then
// keeps the tokens with p >= min_p * p_max, also a prefix of that order and unaffected by
// top_p's cut (p_max survives it). So the result is the shorter of the two prefixes, and
// counting min_p's first bounds how much must be sorted.
void Sampler::apply_top_p_and_min_p() {
    const bool use_top_p = params_.top_p < 1.0f, use_min_p = params_.min_p > 0.0f;
    if (!use_top_p && !use_min_p) return;
    const double max_logit = best_logit();

    size_t n_min_p = cands_.size();
    if (use_min_p) {
        const double log_min_p = std::log(static_cast<double>(params_.min_p));
        const auto passes = [&](const Candidate& c) { return c.logit - max_logit >= log_min_p; };
        if (!use_top_p) {
            cands_.erase(std::remove_if(cands_.begin(), cands_.end(),
                                        [&](const Candidate& c) { return !passes(c); }),
                         cands_.end());
            return;
        }
        n_min_p = std::count_if(cands_.begin(), cands_.end(), passes);
    }

    double total = 0.0;
    for (const Candidate& c : cands_) total += std::exp(c.logit - max_logit);
    // Sort lazily in doubling chunks: the top_p prefix is usually short even over a full vocab.
    size_t sorted = 0, chunk_end = std::min<size_t>(n_min_p, 256);
    double cumulative = 0.0;
    while (true) {
        std::partial_sort(cands_.begin() + sorted, cands_.begin() + chunk_end, cands_.end(),
                          Better());
        for (; sorted < chunk_end; ++sorted) {
            cumulative += std::exp(cands_[sorted].logit - max_logit) / total;
            if (cumulative >= params_.top_p) {
                cands_.resize(sorted + 1);
                return;
            }
        }
        if (chunk_end == n_min_p) break;
        chunk_end = std::min(n_min_p, 2 * chunk_end);
    }
    cands_.resize(n_min_p);
}

double Sampler::softmax_into_probs(double temperature) {
    const double max_logit = best_logit();
    probs_.resize(cands_.size());
    double total = 0.0;
    for (size_t i = 0; i < cands_.size(); ++i)
        total += probs_[i] = std::exp((cands_[i].logit - max_logit) / temperature);
    return total;
}

void Sampler::build_distribution(const float* logits, const std::vector<int32_t>& history) {
    apply_bias_and_penalties(logits, history);
    collect_candidates();
    if (params_.typical_p < 1.0f) apply_typical();
    apply_top_p_and_min_p();
    // The draw walks the survivors in id order, so a seed's tokens are a function of the final
    // distribution alone, not of how the filters happened to leave the buffer.
    const auto by_id = [](const Candidate& a, const Candidate& b) { return a.id < b.id; };
    if (!std::is_sorted(cands_.begin(), cands_.end(), by_id))
        std::sort(cands_.begin(), cands_.end(), by_id);
}

int32_t Sampler::sample(const float* logits, const std::vector<int32_t>& history) {
    if (params_.temperature <= 0.0f) {
        apply_bias_and_penalties(logits, history);
        return argmax();
    }
    build_distribution(logits, history);
    const double total = softmax_into_probs(params_.temperature);
    // Inverse CDF over ascending ids. The running sum repeats the additions that made `total`,
    // so it ends exactly there; only rounding in u * total can overshoot, and then the last
    // possible token is taken.
    const double target = uniform01() * total;
    double cumulative = 0.0;
    size_t last_positive = 0;
    for (size_t i = 0; i < cands_.size(); ++i) {
        if (probs_[i] <= 0.0) continue;
        cumulative += probs_[i];
        last_positive = i;
        if (target < cumulative) return cands_[i].id;
    }
    return cands_[last_positive].id;
}

std::vector<std::pair<int32_t, double>> Sampler::probabilities(
    const float* logits, const std::vector<int32_t>& history) {
    if (params_.temperature <= 0.0f) {
        apply_bias_and_penalties(logits, history);
        return {{argmax(), 1.0}};
    }
    build_distribution(logits, history);
    const double total = softmax_into_probs(params_.temperature);
    std::vector<std::pair<int32_t, double>> out;
    out.reserve(cands_.size());
    for (size_t i = 0; i < cands_.size(); ++i) out.emplace_back(cands_[i].id, probs_[i] / total);
    return out;
}

}  // namespace glmoe
