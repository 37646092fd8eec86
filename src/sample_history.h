// What a device's per-sequence token histories hold (the penalties' input when sampling there), so
// that a step uploads only what changed: usually nothing, since the sampling kernel appends each
// sampled token itself. A slot reused by another request, or a history that the host changed
// (a rejected token, a truncation), is detected by comparing with the host's copy.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace glmoe {

class HistoryMirror {
public:
    // n_seq sequences of up to `capacity` tokens each.
    HistoryMirror(int n_seq, int capacity);

    // Makes the record of seq equal `history` and returns the first position at which the device
    // differed: tokens [returned, history.size()) must be uploaded. Throws std::invalid_argument
    // for a bad seq or a history over capacity.
    size_t sync(int seq, const std::vector<int32_t>& history);
    // The device appended `token` to seq's history (which it may only do below capacity).
    void appended(int seq, int32_t token);
    // Forgets what seq holds (its next sync uploads everything).
    void forget(int seq);

    const std::vector<int32_t>& held(int seq) const { return held_.at(seq); }
    int capacity() const { return capacity_; }

private:
    void check_seq(int seq) const;

    int capacity_;
    std::vector<std::vector<int32_t>> held_;
};

}  // namespace glmoe
