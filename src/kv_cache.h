// The KV cache's bookkeeping: n_ctx cells shared by up to kMaxSeq sequences. A cell stands for one
// position's K and V in every layer (stored by the backends, KVRows) and belongs to a set of
// sequences, so a forked sequence shares its prefix cells with its parent instead of copying them.
//
// Besides the cell table the cache keeps, so that a decode step costs O(batch log n_ctx) of host
// time rather than O(n_ctx): each sequence's cells sorted by position, a bitmap tree of free cells
// and a count of used cells.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace glmoe {

struct KVCacheFull : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The K/V rows of each layer, kept by the backend that runs that layer's attention; what a
// saved state holds besides the cell table. A row holds width(il) values of type_k() (K) or
// type_v() (V), GGML ids, as row_bytes (quants.h) of them; width(il) == 0: the layer's rows are
// not on the host.
class KVRows {
public:
    virtual ~KVRows() = default;
    virtual int n_layers() const = 0;
    virtual int64_t width(int il) const = 0;
    virtual uint32_t type_k() const = 0;
    virtual uint32_t type_v() const = 0;
    virtual uint8_t* k(int il, int32_t cell) = 0;
    virtual uint8_t* v(int il, int32_t cell) = 0;
    // Layer il's rows of `cells`, K rows back to back in k_out and V rows in v_out (write_rows: the
    // other way). Through k() and v() here; rows kept off the host (the GPU's) override both.
    virtual void read_rows(int il, const std::vector<int32_t>& cells, uint8_t* k_out, uint8_t* v_out);
    virtual void write_rows(int il, const std::vector<int32_t>& cells, const uint8_t* k_in, const uint8_t* v_in);
};

class KVCache {
public:
    static constexpr int kMaxSeq = 64;

    explicit KVCache(int n_ctx);

    int n_ctx() const { return static_cast<int>(cells_.size()); }
    int n_used() const { return n_used_; }

    // Takes a free cell for each (seq, pos) pair; all or nothing. Throws KVCacheFull when there
    // are not enough free cells and std::invalid_argument when a sequence already holds a position.
    std::vector<int32_t> allocate(const std::vector<int32_t>& seq, const std::vector<int32_t>& pos);

    // Cells of `seq`, for attention, in the order of seq_cells(seq).
    void cells_of(int seq, std::vector<int32_t>& out) const;
    // Cells of `seq` sorted by (position, cell). A sequence holds each position once, except that
    // seq_cp into a sequence that already holds a copied position gives it two cells there (as
    // the unindexed cache always did); those are then ordered by cell index.
    const std::vector<int32_t>& seq_cells(int seq) const;
    // Changes whenever seq_cells(seq) changes other than by cells appended at its end, so a mirror
    // of the list with the same epoch and a shorter length need only copy the new tail.
    uint64_t seq_epoch(int seq) const;
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

    static void check_seq(int seq);

    // The cache's contents (cells in use, the K/V types and rows) as bytes, and back. load() throws
    // std::invalid_argument, leaving the cache and rows unchanged, for bytes from a cache of another
    // shape or KV types.
    std::vector<uint8_t> save(KVRows& rows) const;
    void load(const std::vector<uint8_t>& bytes, KVRows& rows);
    // One sequence's cells (by position) and their K/V rows as bytes, and back: load_seq() replaces
    // seq's cells with the saved ones and returns how many. It throws std::invalid_argument for bytes
    // from another model shape or KV types, or with more than max_cells cells, and KVCacheFull when
    // the free cells cannot take them; in both cases the cache and rows are unchanged.
    std::vector<uint8_t> save_seq(int seq, KVRows& rows) const;
    int load_seq(int seq, const std::vector<uint8_t>& bytes, KVRows& rows, int max_cells);

private:
    struct Cell {
        int32_t pos = -1;
        uint64_t seqs = 0;  // bit s: the cell belongs to sequence s
    };
    // Cell indices with one bit each at level 0 (1: free); a bit of level l + 1 says whether word
    // i of level l has a bit set. The top level is one word, so the lowest free cell is found in
    // O(log64 n_ctx).
    class FreeCells {
    public:
        void reset(int n);  // all n free
        void set_free(int32_t i);
        void set_used(int32_t i);
        int32_t lowest() const;  // -1: none
    private:
        std::vector<std::vector<uint64_t>> level_;
    };

    // (position, cell) order of the per-sequence lists.
    bool before(int32_t a, int32_t b) const {
        return cells_[a].pos != cells_[b].pos ? cells_[a].pos < cells_[b].pos : a < b;
    }
    // First entry of the sorted list `v` at a position >= p.
    std::vector<int32_t>::const_iterator lower_pos(const std::vector<int32_t>& v, int32_t p) const;
    // Adds sorted cells `add` (not yet in seq's list) to seq's list.
    void merge_into(int seq, const std::vector<int32_t>& add);
    // Takes seq's bit off cell c, freeing it when no sequence is left.
    void drop(int seq, int32_t c);
    void rebuild_index();

    std::vector<Cell> cells_;
    std::vector<std::vector<int32_t>> seq_cells_;  // [kMaxSeq], sorted by before()
    std::vector<uint64_t> seq_epoch_;              // [kMaxSeq]
    FreeCells free_;
    int n_used_ = 0;
};

}  // namespace glmoe
