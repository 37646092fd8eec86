// The KV cache: n_ctx cells shared by up to kMaxSeq sequences. A cell holds one position's K and
// V for every layer and belongs to a set of sequences, so a forked sequence shares its prefix
// cells with its parent instead of copying them.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace glmoe {

struct KVCacheFull : std::runtime_error {
    using std::runtime_error::runtime_error;
};

class KVCache {
public:
    static constexpr int kMaxSeq = 64;

    // kv_width[il] = n_head_kv * head_dim of layer il.
    KVCache(int n_ctx, const std::vector<int64_t>& kv_width);

    int n_ctx() const { return static_cast<int>(cells_.size()); }
    int n_used() const;

    // Takes a free cell for each (seq, pos) pair; all or nothing. Throws KVCacheFull when there
    // are not enough free cells and std::invalid_argument when a sequence already holds a position.
    std::vector<int32_t> allocate(const std::vector<int32_t>& seq, const std::vector<int32_t>& pos);

    // Cells of `seq`, for attention. Sorted by cell index.
    void cells_of(int seq, std::vector<int32_t>& out) const;
    int32_t cell_pos(int32_t cell) const { return cells_[cell].pos; }

    // Removes positions [p0, p1) of seq (p1 < 0: to the end); seq < 0: of every sequence.
    void seq_rm(int seq, int32_t p0, int32_t p1);
    // Makes dst share src's positions [p0, p1) (p1 < 0: to the end).
    void seq_cp(int src, int dst, int32_t p0, int32_t p1);
    // Drops every sequence but seq.
    void seq_keep(int seq);
    void clear();
    // Highest position of seq, or -1.
    int32_t seq_pos_max(int seq) const;

    float* k(int layer, int32_t cell) { return k_[layer].data() + cell * width_[layer]; }
    float* v(int layer, int32_t cell) { return v_[layer].data() + cell * width_[layer]; }
    const float* k(int layer, int32_t cell) const { return k_[layer].data() + cell * width_[layer]; }
    const float* v(int layer, int32_t cell) const { return v_[layer].data() + cell * width_[layer]; }

    static void check_seq(int seq);

    // The cache's contents (cells in use and their K/V) as bytes, and back. load() throws
    // std::invalid_argument, leaving the cache unchanged, for bytes from a cache of another shape.
    std::vector<uint8_t> save() const;
    void load(const std::vector<uint8_t>& bytes);

private:
    struct Cell {
        int32_t pos = -1;
        uint64_t seqs = 0;  // bit s: the cell belongs to sequence s
    };
    std::vector<Cell> cells_;
    std::vector<int64_t> width_;
    std::vector<std::vector<float>> k_, v_;
};

}  // namespace glmoe
