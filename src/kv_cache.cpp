#include "kv_cache.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace glmoe {

KVCache::KVCache(int n_ctx, const std::vector<int64_t>& kv_width) : cells_(n_ctx), width_(kv_width) {
    if (n_ctx <= 0) throw std::invalid_argument("n_ctx must be positive");
    for (int64_t w : width_) {
        k_.emplace_back(static_cast<size_t>(n_ctx) * w);
        v_.emplace_back(static_cast<size_t>(n_ctx) * w);
    }
}

void KVCache::check_seq(int seq) {
    if (seq < 0 || seq >= kMaxSeq)
        throw std::invalid_argument("sequence id " + std::to_string(seq) + " out of range [0, " +
                                    std::to_string(kMaxSeq) + ")");
}

int KVCache::n_used() const {
    int n = 0;
    for (const Cell& c : cells_) n += c.seqs != 0;
    return n;
}

std::vector<int32_t> KVCache::allocate(const std::vector<int32_t>& seq, const std::vector<int32_t>& pos) {
    // Reject a position a sequence already holds (in the cache or twice in this batch): it would
    // give attention two keys for one position.
    std::vector<std::vector<int32_t>> held(kMaxSeq);
    uint64_t batch_seqs = 0;
    for (size_t i = 0; i < seq.size(); ++i) {
        check_seq(seq[i]);
        if (pos[i] < 0) throw std::invalid_argument("negative position " + std::to_string(pos[i]));
        held[seq[i]].push_back(pos[i]);
        batch_seqs |= uint64_t{1} << seq[i];
    }
    for (int s = 0; s < kMaxSeq; ++s) {
        auto& v = held[s];
        std::sort(v.begin(), v.end());
        if (std::adjacent_find(v.begin(), v.end()) != v.end())
            throw std::invalid_argument("sequence " + std::to_string(s) + " has a position twice in one batch");
    }
    for (const Cell& c : cells_) {
        uint64_t common = c.seqs & batch_seqs;
        while (common) {
            const int s = __builtin_ctzll(common);
            common &= common - 1;
            if (std::binary_search(held[s].begin(), held[s].end(), c.pos))
                throw std::invalid_argument("sequence " + std::to_string(s) + " already holds position " +
                                            std::to_string(c.pos) + " in the KV cache");
        }
    }
    std::vector<int32_t> out;
    out.reserve(seq.size());
    for (int32_t i = 0; i < n_ctx() && out.size() < seq.size(); ++i)
        if (!cells_[i].seqs) out.push_back(i);
    if (out.size() < seq.size())
        throw KVCacheFull("KV cache is full: " + std::to_string(seq.size()) + " new tokens, " +
                          std::to_string(n_ctx() - n_used()) + " free cells of " + std::to_string(n_ctx()));
    for (size_t i = 0; i < seq.size(); ++i) {
        cells_[out[i]].pos = pos[i];
        cells_[out[i]].seqs = uint64_t{1} << seq[i];
    }
    return out;
}

void KVCache::cells_of(int seq, std::vector<int32_t>& out) const {
    out.clear();
    const uint64_t bit = uint64_t{1} << seq;
    for (int32_t i = 0; i < n_ctx(); ++i)
        if (cells_[i].seqs & bit) out.push_back(i);
}

void KVCache::seq_rm(int seq, int32_t p0, int32_t p1) {
    if (seq >= 0) check_seq(seq);
    if (p1 < 0) p1 = INT32_MAX;
    const uint64_t mask = seq < 0 ? ~uint64_t{0} : uint64_t{1} << seq;
    for (Cell& c : cells_) {
        if (!(c.seqs & mask) || c.pos < p0 || c.pos >= p1) continue;
        c.seqs &= ~mask;
        if (!c.seqs) c.pos = -1;
    }
}

void KVCache::seq_cp(int src, int dst, int32_t p0, int32_t p1) {
    check_seq(src);
    check_seq(dst);
    if (p1 < 0) p1 = INT32_MAX;
    const uint64_t bit = uint64_t{1} << src;
    for (Cell& c : cells_)
        if ((c.seqs & bit) && c.pos >= p0 && c.pos < p1) c.seqs |= uint64_t{1} << dst;
}

void KVCache::seq_keep(int seq) {
    check_seq(seq);
    const uint64_t bit = uint64_t{1} << seq;
    for (Cell& c : cells_) {
        c.seqs &= bit;
        if (!c.seqs) c.pos = -1;
    }
}

void KVCache::clear() {
    for (Cell& c : cells_) c = Cell{};
}

int32_t KVCache::seq_pos_max(int seq) const {
    check_seq(seq);
    int32_t m = -1;
    const uint64_t bit = uint64_t{1} << seq;
    for (const Cell& c : cells_)
        if ((c.seqs & bit) && c.pos > m) m = c.pos;
    return m;
}

namespace {

constexpr uint32_t kStateMagic = 0x4b564731;  // "KVG1"

template <class T>
void put(std::vector<uint8_t>& out, const T* v, size_t n = 1) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(v);
    out.insert(out.end(), p, p + n * sizeof(T));
}

// Reads n values, throwing instead of reading past the end.
template <class T>
void take(const std::vector<uint8_t>& in, size_t& at, T* v, size_t n = 1) {
    if (n * sizeof(T) > in.size() - at) throw std::invalid_argument("KV cache state is truncated");
    std::memcpy(v, in.data() + at, n * sizeof(T));
    at += n * sizeof(T);
}

}  // namespace

std::vector<uint8_t> KVCache::save() const {
    std::vector<uint8_t> out;
    const uint32_t header[3] = {kStateMagic, static_cast<uint32_t>(n_ctx()), static_cast<uint32_t>(width_.size())};
    put(out, header, 3);
    put(out, width_.data(), width_.size());
    std::vector<int32_t> used;
    for (int32_t i = 0; i < n_ctx(); ++i)
        if (cells_[i].seqs) used.push_back(i);
    const uint32_t n_used_cells = static_cast<uint32_t>(used.size());
    put(out, &n_used_cells);
    for (int32_t c : used) {
        put(out, &c);
        put(out, &cells_[c].pos);
        put(out, &cells_[c].seqs);
    }
    for (size_t il = 0; il < width_.size(); ++il)
        for (int32_t c : used) {
            put(out, k(static_cast<int>(il), c), width_[il]);
            put(out, v(static_cast<int>(il), c), width_[il]);
        }
    return out;
}

void KVCache::load(const std::vector<uint8_t>& in) {
    size_t at = 0;
    uint32_t header[3];
    take(in, at, header, 3);
    if (header[0] != kStateMagic) throw std::invalid_argument("not a glmoe KV cache state");
    std::vector<int64_t> widths(header[2] <= width_.size() ? header[2] : 0);
    take(in, at, widths.data(), widths.size());
    if (header[1] != static_cast<uint32_t>(n_ctx()) || widths != width_)
        throw std::invalid_argument("KV cache state is from a context of another size or model");
    uint32_t n_used_cells;
    take(in, at, &n_used_cells);
    if (n_used_cells > static_cast<uint32_t>(n_ctx())) throw std::invalid_argument("KV cache state is corrupt");
    std::vector<int32_t> used(n_used_cells);
    std::vector<Cell> cells(n_ctx());
    for (uint32_t i = 0; i < n_used_cells; ++i) {
        take(in, at, &used[i]);
        if (used[i] < 0 || used[i] >= n_ctx() || cells[used[i]].seqs) throw std::invalid_argument("KV cache state is corrupt");
        take(in, at, &cells[used[i]].pos);
        take(in, at, &cells[used[i]].seqs);
        if (!cells[used[i]].seqs) throw std::invalid_argument("KV cache state is corrupt");
    }
    size_t payload = 0;
    for (int64_t w : width_) payload += 2 * sizeof(float) * w * n_used_cells;
    if (in.size() - at != payload) throw std::invalid_argument("KV cache state has the wrong size");
    cells_ = std::move(cells);
    for (size_t il = 0; il < width_.size(); ++il)
        for (int32_t c : used) {
            take(in, at, k(static_cast<int>(il), c), width_[il]);
            take(in, at, v(static_cast<int>(il), c), width_[il]);
        }
}

}  // namespace glmoe
