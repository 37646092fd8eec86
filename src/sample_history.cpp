#include "sample_history.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace glmoe {

HistoryMirror::HistoryMirror(int n_seq, int capacity) : capacity_(capacity), held_(std::max(n_seq, 0)) {
    if (n_seq <= 0 || capacity <= 0) throw std::invalid_argument("HistoryMirror needs sequences and capacity");
}

void HistoryMirror::check_seq(int seq) const {
    if (seq < 0 || seq >= static_cast<int>(held_.size()))
        throw std::invalid_argument("sequence " + std::to_string(seq) + " has no device history");
}

size_t HistoryMirror::sync(int seq, const std::vector<int32_t>& history) {
    check_seq(seq);
    if (history.size() > static_cast<size_t>(capacity_))
        throw std::invalid_argument("a history of " + std::to_string(history.size()) + " tokens exceeds the " +
                                    std::to_string(capacity_) + " the device holds per sequence");
    std::vector<int32_t>& held = held_[seq];
    const size_t common = std::min(held.size(), history.size());
    const size_t first = std::mismatch(held.begin(), held.begin() + common, history.begin()).first - held.begin();
    held.resize(first);
    held.insert(held.end(), history.begin() + first, history.end());
    return first;
}

void HistoryMirror::appended(int seq, int32_t token) {
    check_seq(seq);
    if (held_[seq].size() >= static_cast<size_t>(capacity_)) throw std::logic_error("device history over capacity");
    held_[seq].push_back(token);
}

void HistoryMirror::forget(int seq) {
    check_seq(seq);
    held_[seq].clear();
}

}  // namespace glmoe
