// What a forward costs by its number of tokens, learnt from the steps a context runs. A
// speculative draft of k tokens makes the step k tokens bigger; whether that pays depends on how
// much bigger steps cost on this model and machine (on an MoE model every extra token reads the
// experts it routes to), so the drafting control asks this model rather than assuming.
#pragma once
#include <array>
#include <vector>

namespace glmoe {

class StepCostModel {
public:
    static constexpr int kMaxTokens = 64;  // bigger steps are prompt chunks: not tracked
    static constexpr int kWindow = 8;      // a size's cost: the median of its latest steps
    static constexpr int kMinSteps = 3;    // fewer, and the size counts as not seen

    void record(int n_tokens, double seconds);
    // cost(base + k) / cost(base) for k = 0..max_extra. Sizes not seen yet are interpolated
    // linearly between the seen ones, and past the largest extrapolated on the line through the
    // smallest and largest; 1.0 throughout while `base` is unknown.
    std::vector<double> relative(int base, int max_extra) const;

private:
    std::vector<double> estimates() const;  // [0, kMaxTokens]; 0 = unknown

    // A median, because a step is sometimes much slower than its size (the host thread was
    // descheduled, a page fault): one slow step must not make a size look dear, as a size that
    // looks dear is not drafted, so not timed again.
    std::array<std::array<double, kWindow>, kMaxTokens + 1> latest_{};
    std::array<int, kMaxTokens + 1> seen_{};
    std::array<double, kMaxTokens + 1> median_{};  // 0 until kMinSteps were timed
};

}  // namespace glmoe
