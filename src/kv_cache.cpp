#include "kv_cache.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "kv_types.h"
#include "quants.h"

namespace glmoe {

void KVRows::read_rows(int il, const std::vector<int32_t>& cells, uint8_t* k_out, uint8_t* v_out) {
    const size_t kb = row_bytes(type_k(), width(il)), vb = row_bytes(type_v(), width(il));
    for (size_t i = 0; i < cells.size(); ++i) {
        std::memcpy(k_out + i * kb, k(il, cells[i]), kb);
        std::memcpy(v_out + i * vb, v(il, cells[i]), vb);
    }
}

void KVRows::write_rows(int il, const std::vector<int32_t>& cells, const uint8_t* k_in, const uint8_t* v_in) {
    const size_t kb = row_bytes(type_k(), width(il)), vb = row_bytes(type_v(), width(il));
    for (size_t i = 0; i < cells.size(); ++i) {
        std::memcpy(k(il, cells[i]), k_in + i * kb, kb);
        std::memcpy(v(il, cells[i]), v_in + i * vb, vb);
    }
}

KVCache::KVCache(int n_ctx) : cells_(n_ctx > 0 ? n_ctx : 0), seq_cells_(kMaxSeq), seq_epoch_(kMaxSeq, 0) {
    if (n_ctx <= 0) throw std::invalid_argument("n_ctx must be positive");
    free_.reset(n_ctx);
}

void KVCache::FreeCells::reset(int n) {
    level_.clear();
    // Level 0: bits [0, n) set; each level above summarizes the one below until one word is left.
    size_t bits = static_cast<size_t>(n);
    do {
        std::vector<uint64_t> words((bits + 63) / 64, ~uint64_t{0});
        if (bits % 64) words.back() = (uint64_t{1} << (bits % 64)) - 1;
        bits = words.size();
        level_.push_back(std::move(words));
    } while (bits > 1);
}

void KVCache::FreeCells::set_free(int32_t i) {
    size_t at = static_cast<size_t>(i);
    for (auto& words : level_) {
        uint64_t& w = words[at / 64];
        const bool was_empty = w == 0;
        w |= uint64_t{1} << (at % 64);
        if (!was_empty) break;  // the levels above already say this word has a free cell
        at /= 64;
    }
}

void KVCache::FreeCells::set_used(int32_t i) {
    size_t at = static_cast<size_t>(i);
    for (auto& words : level_) {
        uint64_t& w = words[at / 64];
        w &= ~(uint64_t{1} << (at % 64));
        if (w != 0) break;  // the word still has a free cell: the levels above stay as they are
        at /= 64;
    }
}

int32_t KVCache::FreeCells::lowest() const {
    if (level_.back()[0] == 0) return -1;
    size_t at = 0;
    for (size_t l = level_.size(); l-- > 0;) at = at * 64 + __builtin_ctzll(level_[l][at]);
    return static_cast<int32_t>(at);
}

void KVCache::check_seq(int seq) {
    if (seq < 0 || seq >= kMaxSeq)
        throw std::invalid_argument("sequence id " + std::to_string(seq) + " out of range [0, " +
                                    std::to_string(kMaxSeq) + ")");
}

std::vector<int32_t>::const_iterator KVCache::lower_pos(const std::vector<int32_t>& v, int32_t p) const {
    return std::partition_point(v.begin(), v.end(), [&](int32_t c) { return cells_[c].pos < p; });
}

void KVCache::merge_into(int seq, const std::vector<int32_t>& add) {
    if (add.empty()) return;
    std::vector<int32_t>& v = seq_cells_[seq];
    const bool append = v.empty() || before(v.back(), add.front());
    const size_t mid = v.size();
    v.insert(v.end(), add.begin(), add.end());
    if (append) return;  // a mirror's copy of the list stays a valid prefix
    std::inplace_merge(v.begin(), v.begin() + mid, v.end(), [this](int32_t a, int32_t b) { return before(a, b); });
    ++seq_epoch_[seq];
}

void KVCache::drop(int seq, int32_t c) {
    Cell& cell = cells_[c];
    cell.seqs &= ~(uint64_t{1} << seq);
    if (cell.seqs) return;
    cell.pos = -1;
    free_.set_free(c);
    --n_used_;
}

std::vector<int32_t> KVCache::allocate(const std::vector<int32_t>& seq, const std::vector<int32_t>& pos) {
    // Reject a position a sequence already holds (in the cache or twice in this batch): it would
    // give attention two keys for one position.
    struct Entry {
        int32_t seq, pos;
        size_t i;  // index in the batch
    };
    std::vector<Entry> by_seq(seq.size());
    for (size_t i = 0; i < seq.size(); ++i) {
        check_seq(seq[i]);
        if (pos[i] < 0) throw std::invalid_argument("negative position " + std::to_string(pos[i]));
        by_seq[i] = {seq[i], pos[i], i};
    }
    std::sort(by_seq.begin(), by_seq.end(),
              [](const Entry& a, const Entry& b) { return a.seq != b.seq ? a.seq < b.seq : a.pos < b.pos; });
    for (size_t j = 1; j < by_seq.size(); ++j)
        if (by_seq[j].seq == by_seq[j - 1].seq && by_seq[j].pos == by_seq[j - 1].pos)
            throw std::invalid_argument("sequence " + std::to_string(by_seq[j].seq) + " has a position twice in one batch");
    for (const Entry& e : by_seq) {
        const std::vector<int32_t>& v = seq_cells_[e.seq];
        const auto it = lower_pos(v, e.pos);
        if (it != v.end() && cells_[*it].pos == e.pos)
            throw std::invalid_argument("sequence " + std::to_string(e.seq) + " already holds position " +
                                        std::to_string(e.pos) + " in the KV cache");
    }
    if (seq.size() > static_cast<size_t>(n_ctx() - n_used_))
        throw KVCacheFull("KV cache is full: " + std::to_string(seq.size()) + " new tokens, " +
                          std::to_string(n_ctx() - n_used_) + " free cells of " + std::to_string(n_ctx()));

    // Nothing can fail from here on. Lowest free cells first, in batch order.
    std::vector<int32_t> out(seq.size());
    for (size_t i = 0; i < seq.size(); ++i) {
        const int32_t c = free_.lowest();
        free_.set_used(c);
        cells_[c].pos = pos[i];
        cells_[c].seqs = uint64_t{1} << seq[i];
        out[i] = c;
    }
    n_used_ += static_cast<int>(seq.size());
    std::vector<int32_t> add;
    for (size_t j = 0; j < by_seq.size();) {
        const int32_t s = by_seq[j].seq;
        add.clear();
        for (; j < by_seq.size() && by_seq[j].seq == s; ++j) add.push_back(out[by_seq[j].i]);
        merge_into(s, add);
    }
    return out;
}

void KVCache::cells_of(int seq, std::vector<int32_t>& out) const {
    out = seq_cells(seq);
}

const std::vector<int32_t>& KVCache::seq_cells(int seq) const {
    check_seq(seq);
    return seq_cells_[seq];
}

uint64_t KVCache::seq_epoch(int seq) const {
    check_seq(seq);
    return seq_epoch_[seq];
}

void KVCache::seq_rm(int seq, int32_t p0, int32_t p1) {
    if (seq >= 0) check_seq(seq);
    if (p1 < 0) p1 = INT32_MAX;
    for (int s = seq < 0 ? 0 : seq; s < (seq < 0 ? kMaxSeq : seq + 1); ++s) {
        std::vector<int32_t>& v = seq_cells_[s];
        const auto lo = lower_pos(v, p0), hi = lower_pos(v, p1);
        if (lo >= hi) continue;
        for (auto it = lo; it != hi; ++it) drop(s, *it);
        v.erase(lo, hi);
        ++seq_epoch_[s];
    }
}

void KVCache::seq_cp(int src, int dst, int32_t p0, int32_t p1) {
    check_seq(src);
    check_seq(dst);
    if (p1 < 0) p1 = INT32_MAX;
    const std::vector<int32_t>& v = seq_cells_[src];
    const uint64_t bit = uint64_t{1} << dst;
    std::vector<int32_t> add;  // src's cells in range that dst does not share yet, sorted
    for (auto it = lower_pos(v, p0), hi = lower_pos(v, p1); it < hi; ++it)
        if (!(cells_[*it].seqs & bit)) {
            cells_[*it].seqs |= bit;
            add.push_back(*it);
        }
    merge_into(dst, add);
}

void KVCache::seq_keep(int seq) {
    check_seq(seq);
    for (int s = 0; s < kMaxSeq; ++s) {
        if (s == seq || seq_cells_[s].empty()) continue;
        for (int32_t c : seq_cells_[s]) drop(s, c);
        seq_cells_[s].clear();
        ++seq_epoch_[s];
    }
}

void KVCache::clear() {
    for (Cell& c : cells_) c = Cell{};
    free_.reset(n_ctx());
    n_used_ = 0;
    for (int s = 0; s < kMaxSeq; ++s)
        if (!seq_cells_[s].empty()) {
            seq_cells_[s].clear();
            ++seq_epoch_[s];
        }
}

int32_t KVCache::seq_pos_max(int seq) const {
    check_seq(seq);
    const std::vector<int32_t>& v = seq_cells_[seq];
    return v.empty() ? -1 : cells_[v.back()].pos;
}

void KVCache::rebuild_index() {
    free_.reset(n_ctx());
    n_used_ = 0;
    for (auto& v : seq_cells_) v.clear();
    for (int32_t i = 0; i < n_ctx(); ++i) {
        uint64_t m = cells_[i].seqs;
        if (!m) continue;
        free_.set_used(i);
        ++n_used_;
        for (; m; m &= m - 1) seq_cells_[__builtin_ctzll(m)].push_back(i);
    }
    for (int s = 0; s < kMaxSeq; ++s) {
        std::sort(seq_cells_[s].begin(), seq_cells_[s].end(), [this](int32_t a, int32_t b) { return before(a, b); });
        ++seq_epoch_[s];  // every list may have changed
    }
}

namespace {

// "KVG2": the header names the K and V types. "KVG1" states, from before there were KV types, hold f32 rows.
constexpr uint32_t kStateMagicF32 = 0x4b564731, kStateMagic = 0x4b564732;

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

std::vector<int64_t> widths_of(KVRows& rows) {
    std::vector<int64_t> w;
    for (int il = 0; il < rows.n_layers(); ++il) w.push_back(rows.width(il));
    return w;
}

// The K and V rows of `cells`, layer by layer (each cell's K row, then its V row): what a state
// holds after its cell table.
size_t rows_bytes(KVRows& rows, const std::vector<int64_t>& width, size_t n_cells) {
    size_t bytes = 0;
    for (int64_t w : width) bytes += (row_bytes(rows.type_k(), w) + row_bytes(rows.type_v(), w)) * n_cells;
    return bytes;
}

void put_rows(std::vector<uint8_t>& out, KVRows& rows, const std::vector<int64_t>& width,
              const std::vector<int32_t>& cells) {
    std::vector<uint8_t> k_rows, v_rows;
    for (size_t il = 0; il < width.size(); ++il) {
        const size_t k_bytes = row_bytes(rows.type_k(), width[il]), v_bytes = row_bytes(rows.type_v(), width[il]);
        k_rows.resize(k_bytes * cells.size());
        v_rows.resize(v_bytes * cells.size());
        rows.read_rows(static_cast<int>(il), cells, k_rows.data(), v_rows.data());
        for (size_t i = 0; i < cells.size(); ++i) {  // each cell's K row, then its V row
            put(out, k_rows.data() + i * k_bytes, k_bytes);
            put(out, v_rows.data() + i * v_bytes, v_bytes);
        }
    }
}

void take_rows(const std::vector<uint8_t>& in, size_t& at, KVRows& rows, const std::vector<int64_t>& width,
               const std::vector<int32_t>& cells) {
    std::vector<uint8_t> k_rows, v_rows;
    for (size_t il = 0; il < width.size(); ++il) {
        const size_t k_bytes = row_bytes(rows.type_k(), width[il]), v_bytes = row_bytes(rows.type_v(), width[il]);
        k_rows.resize(k_bytes * cells.size());
        v_rows.resize(v_bytes * cells.size());
        for (size_t i = 0; i < cells.size(); ++i) {
            take(in, at, k_rows.data() + i * k_bytes, k_bytes);
            take(in, at, v_rows.data() + i * v_bytes, v_bytes);
        }
        rows.write_rows(static_cast<int>(il), cells, k_rows.data(), v_rows.data());
    }
}

std::string kv_types_text(uint32_t type_k, uint32_t type_v) {
    return "K " + kv_type_name(type_k) + ", V " + kv_type_name(type_v);
}

void check_types(uint32_t type_k, uint32_t type_v, KVRows& rows) {
    if (type_k != rows.type_k() || type_v != rows.type_v())
        throw std::invalid_argument("KV cache state was saved with KV types " + kv_types_text(type_k, type_v) +
                                    ", but this context stores " + kv_types_text(rows.type_k(), rows.type_v()) +
                                    " (-ctk/-ctv, type_k/type_v): load it into a context with the same types");
}

// "KVS1": one sequence's state (save_seq).
constexpr uint32_t kSeqStateMagic = 0x4b565331;

}  // namespace

std::vector<uint8_t> KVCache::save(KVRows& rows) const {
    std::vector<uint8_t> out;
    const std::vector<int64_t> width = widths_of(rows);
    const uint32_t header[5] = {kStateMagic, static_cast<uint32_t>(n_ctx()), static_cast<uint32_t>(width.size()),
                                rows.type_k(), rows.type_v()};
    put(out, header, 5);
    put(out, width.data(), width.size());
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
    put_rows(out, rows, width, used);
    return out;
}

void KVCache::load(const std::vector<uint8_t>& in, KVRows& rows) {
    const std::vector<int64_t> width = widths_of(rows);
    size_t at = 0;
    uint32_t header[5];
    take(in, at, header, 3);
    if (header[0] == kStateMagic) {
        take(in, at, header + 3, 2);
    } else if (header[0] == kStateMagicF32) {
        header[3] = header[4] = GGML_TYPE_F32;
    } else {
        throw std::invalid_argument("not a glmoe KV cache state");
    }
    std::vector<int64_t> widths(header[2] <= width.size() ? header[2] : 0);
    take(in, at, widths.data(), widths.size());
    if (header[1] != static_cast<uint32_t>(n_ctx()) || widths != width)
        throw std::invalid_argument("KV cache state is from a context of another size or model");
    check_types(header[3], header[4], rows);
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
    const size_t payload = rows_bytes(rows, width, n_used_cells);
    if (in.size() - at != payload) throw std::invalid_argument("KV cache state has the wrong size");
    cells_ = std::move(cells);
    rebuild_index();
    take_rows(in, at, rows, width, used);
}

std::vector<uint8_t> KVCache::save_seq(int seq, KVRows& rows) const {
    const std::vector<int32_t>& cells = seq_cells(seq);
    const std::vector<int64_t> width = widths_of(rows);
    std::vector<uint8_t> out;
    const uint32_t header[5] = {kSeqStateMagic, static_cast<uint32_t>(width.size()), rows.type_k(), rows.type_v(),
                                static_cast<uint32_t>(cells.size())};
    put(out, header, 5);
    put(out, width.data(), width.size());
    for (int32_t c : cells) put(out, &cells_[c].pos);
    put_rows(out, rows, width, cells);
    return out;
}

int KVCache::load_seq(int seq, const std::vector<uint8_t>& in, KVRows& rows, int max_cells) {
    check_seq(seq);
    const std::vector<int64_t> width = widths_of(rows);
    size_t at = 0;
    uint32_t header[5];
    take(in, at, header, 1);
    if (header[0] != kSeqStateMagic) throw std::invalid_argument("not a glmoe sequence KV state");
    take(in, at, header + 1, 4);
    std::vector<int64_t> widths(header[1] == width.size() ? header[1] : 0);
    take(in, at, widths.data(), widths.size());
    if (widths != width) throw std::invalid_argument("KV state is from a model of another shape");
    check_types(header[2], header[3], rows);
    const uint32_t n = header[4];
    if (n > static_cast<uint32_t>(std::max(max_cells, 0)))
        throw std::invalid_argument("KV state holds " + std::to_string(n) + " cells, more than the " +
                                    std::to_string(max_cells) + " a sequence may have here");
    std::vector<int32_t> pos(n);
    take(in, at, pos.data(), n);
    for (uint32_t i = 0; i < n; ++i)  // each position once, in order: what seq_cells() lists
        if (pos[i] < 0 || (i > 0 && pos[i] <= pos[i - 1])) throw std::invalid_argument("KV state is corrupt");
    const size_t payload = rows_bytes(rows, width, n);
    if (in.size() - at != payload) throw std::invalid_argument("KV state has the wrong size");
    // Cells only seq holds come free when it is cleared; a shared one stays with its other sequences.
    int freed = 0;
    for (int32_t c : seq_cells_[seq]) freed += cells_[c].seqs == (uint64_t{1} << seq);
    if (static_cast<int64_t>(n) > n_ctx() - n_used_ + freed)
        throw KVCacheFull("KV cache is full: restoring " + std::to_string(n) + " cells, " +
                          std::to_string(n_ctx() - n_used_ + freed) + " free");
    seq_rm(seq, 0, -1);
    const std::vector<int32_t> cells = allocate(std::vector<int32_t>(n, seq), pos);
    take_rows(in, at, rows, width, cells);
    return static_cast<int>(n);
}

}  // namespace glmoe
