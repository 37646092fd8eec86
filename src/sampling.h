// Token sampling from a row of logits: greedy, or a filter chain then a seeded draw.
//
// Parameter names and defaults follow llama-cpp-python's create_completion; the chain follows
// its _init_sampler (which builds llama.cpp samplers):
//   logit bias -> penalties -> top_k -> typical_p -> top_p -> min_p -> temperature -> draw
// Every filter keeps at least one token (llama.cpp's min_keep = 1). The filters see the
// untempered distribution; temperature only reshapes what survives them.
#pragma once
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace glmoe {

// llama.cpp's LLAMA_DEFAULT_SEED: a fresh seed from std::random_device.
constexpr uint32_t kRandomSeed = 0xFFFFFFFFu;

struct SamplingParams {
    float temperature = 0.8f;        // <= 0: greedy
    int top_k = 40;                  // <= 0: whole vocabulary
    float top_p = 0.95f;             // in [0, 1]; 1: off
    float min_p = 0.05f;             // in [0, 1]; 0: off
    float typical_p = 1.0f;          // in [0, 1]; 1: off
    float repeat_penalty = 1.0f;     // > 0; 1: off
    int repeat_last_n = 64;          // window of history for penalties; 0: off; -1: all of it
    float presence_penalty = 0.0f;
    float frequency_penalty = 0.0f;
    std::vector<std::pair<int32_t, float>> logit_bias;  // added to the logits; -inf bans a token
    uint32_t seed = kRandomSeed;

    // Whether the penalties change any logit, so that sampling reads the history.
    bool penalizes() const {
        return repeat_last_n != 0 && !(repeat_penalty == 1.0f && presence_penalty == 0.0f && frequency_penalty == 0.0f);
    }
};

class Sampler {
public:
    // Throws std::invalid_argument for parameters outside the ranges above.
    Sampler(const SamplingParams& params, int n_vocab);
    // The constructor's checks alone (no buffers, no seeding): for samplers that run elsewhere.
    static void check(const SamplingParams& params, int n_vocab);

    // Picks a token from logits[n_vocab]; history is the tokens so far, oldest first.
    // The draw is u = genrand_res53() of std::mt19937 (as Python's random.random()), and the
    // token is the first in ascending id order whose cumulative probability exceeds u.
    int32_t sample(const float* logits, const std::vector<int32_t>& history);

    // The distribution sample() draws from for these inputs: token ids and probabilities
    // (summing to 1), in no particular order. Greedy gives the argmax with probability 1.
    std::vector<std::pair<int32_t, double>> probabilities(const float* logits,
                                                          const std::vector<int32_t>& history);

    void reseed(uint32_t seed);

    // The next draw of sample()'s random stream, uniform in [0, 1); speculative verification
    // draws from it too, so that one seed reproduces a drafted run.
    double uniform01();

    const SamplingParams& params() const { return params_; }
    int n_vocab() const { return n_vocab_; }

private:
    struct Candidate {
        float logit;
        int32_t id;
    };

    // Runs the chain up to the draw, leaving the survivors in cands_ and their final
    // probabilities in probs_.
    void build_distribution(const float* logits, const std::vector<int32_t>& history);
    void apply_bias_and_penalties(const float* logits, const std::vector<int32_t>& history);
    int32_t argmax() const;
    float best_logit() const;  // the largest logit among cands_
    void collect_candidates();
    void apply_typical();
    void apply_top_p_and_min_p();
    double softmax_into_probs(double temperature);  // returns the sum before normalising

    SamplingParams params_;
    int n_vocab_;
    std::mt19937 rng_;

    // Buffers reused across calls so that sampling does not allocate.
    std::vector<float> work_;       // logits after bias and penalties
    std::vector<int32_t> counts_;   // occurrences in the penalty window; all zero between calls
    std::vector<Candidate> cands_;
    std::vector<double> probs_;
    std::vector<double> scores_;
    std::vector<int32_t> order_;
    std::vector<Candidate> scratch_;
};

}  // namespace glmoe
