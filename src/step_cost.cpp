#include "step_cost.h"

#include <algorithm>

namespace glmoe {

void StepCostModel::record(int n_tokens, double seconds) {
    if (n_tokens < 1 || n_tokens > kMaxTokens || !(seconds > 0)) return;
    // A size's first step pays one-off costs (a GPU graph capture is many steps' worth): skipped.
    const int timed = seen_[n_tokens]++ - 1;
    if (timed < 0) return;
    auto& latest = latest_[n_tokens];
    latest[timed % kWindow] = seconds;
    const int n = std::min(timed + 1, kWindow);
    if (n < kMinSteps) return;
    std::array<double, kWindow> sorted = latest;
    std::sort(sorted.begin(), sorted.begin() + n);
    median_[n_tokens] = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
}

std::vector<double> StepCostModel::estimates() const {
    std::vector<double> est(kMaxTokens + 1, 0.0);
    std::vector<int> seen;  // sizes with a mean, ascending
    for (int n = 1; n <= kMaxTokens; ++n) {
        if (median_[n] == 0) continue;
        // A bigger step never costs less: noise must not make a longer draft look free.
        est[n] = seen.empty() ? median_[n] : std::max(median_[n], est[seen.back()]);
        seen.push_back(n);
    }
    if (seen.empty()) return est;
    const int first = seen.front(), last = seen.back();
    const double slope = last > first ? (est[last] - est[first]) / (last - first) : 0.0;
    size_t above = 1;  // index in `seen` of the nearest seen size above n
    for (int n = first + 1; n <= kMaxTokens; ++n) {
        if (est[n] > 0) {
            ++above;
            continue;
        }
        if (n > last) {
            est[n] = est[last] + slope * (n - last);
        } else {  // between seen[above - 1] and seen[above]
            const int lo = seen[above - 1], hi = seen[above];
            est[n] = est[lo] + (est[hi] - est[lo]) * (n - lo) / (hi - lo);
        }
    }
    return est;
}

std::vector<double> StepCostModel::relative(int base, int max_extra) const {
    std::vector<double> out(std::max(max_extra, 0) + 1, 1.0);
    if (base < 1 || base > kMaxTokens) return out;
    const std::vector<double> est = estimates();
    if (est[base] == 0) return out;
    for (int k = 1; k < static_cast<int>(out.size()); ++k) {
        const int n = std::min(base + k, kMaxTokens);
        out[k] = std::max(est[n], est[base]) / est[base];
    }
    return out;
}

}  // namespace glmoe
