// Suffix decoding (SuffixDecoding, arXiv 2411.04975): model-free speculative drafts taken from
// text the sequence has already seen. A per-sequence SuffixDrafter indexes its own prompt and
// output; a SuffixStore shared by all sequences indexes earlier requests' outputs. Each step the
// longest suffix of the context found in an index is extended by its most frequent continuation,
// and the target model verifies the draft in one batched forward.
#pragma once
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

namespace glmoe {

struct SuffixDraftParams {
    int max_depth = 64;            // longest context suffix matched
    float max_spec_factor = 1.0f;  // draft at most this many tokens per matched token
    float min_token_prob = 0.1f;   // stop where the continuation's path probability falls below
    int max_spec_tokens = 32;      // hard cap on a draft's length
    bool adaptive = true;          // verify only what pays for its step; pause while nothing does
};

// A draft and how much it is expected to gain: the sum of its prefixes' path probabilities
// (the expected number of accepted tokens, were the index's statistics the target's).
struct Draft {
    std::vector<int32_t> tokens;
    double score = 0.0;
    int match_length = 0;
};

// A trie of every substring of length <= depth_limit of the indexed text, with occurrence counts.
// Substrings that occur once are not stored: a node seen once stands for its whole subtree, read
// off the text at its one occurrence, so random text costs O(n) nodes rather than O(n * depth).
// Appending a token updates only the suffixes that occurred before ("active"), O(depth) lookups.
class SuffixTrie {
public:
    // Where a walk from the root ended: at `node`, or below it (depth > node's) on the single
    // occurrence of a node seen once, whose last token is text[end].
    struct Cursor {
        int32_t node = -1;
        int32_t depth = 0;
        int32_t end = -1;
        bool valid() const { return node >= 0; }
    };

    explicit SuffixTrie(int depth_limit);

    void append(int32_t token);
    // The next append starts a new document: no match spans the boundary.
    void end_document();

    // The longest suffix (<= max_depth) of the indexed text that occurred earlier: O(1).
    Cursor longest_repeated_suffix(int max_depth) const;
    // The longest suffix (<= max_depth) of tail[0, n) that occurs in the text followed by a token.
    Cursor longest_match(const int32_t* tail, int n, int max_depth) const;
    // The most frequent continuation of the matched string, greedily token by token, while the
    // path probability stays >= min_prob; ties go to the continuation seen most recently.
    Draft continuation(Cursor at, int max_tokens, float min_prob) const;

    size_t n_tokens() const { return text_.size(); }  // including document separators
    size_t n_nodes() const { return nodes_.size(); }
    size_t bytes() const;  // memory held, approximately
    int depth_limit() const { return depth_limit_; }

private:
    struct Node {
        int32_t token;
        int32_t depth;
        int32_t count;        // occurrences of this node's string
        int32_t child_total;  // occurrences followed by a token (within the depth limit)
        int32_t end;          // text index of the last token of the latest occurrence
        int32_t best_child;   // most frequent child, latest on ties; -1 if none
    };
    static constexpr int32_t kRoot = 0;
    static constexpr int32_t kSeparator = -1;

    // Nodes seen once have no stored children; the root and nodes seen more often have them all.
    bool children_stored(int32_t node) const { return node == kRoot || nodes_[node].count >= 2; }
    int32_t find_child(int32_t node, int32_t token) const;
    int32_t add_child(int32_t parent, int32_t token, int32_t end);
    void count_child(int32_t parent, int32_t child);
    Cursor step(Cursor c, int32_t token) const;
    bool has_continuation(Cursor c) const;
    static uint64_t key(int32_t node, int32_t token) {
        return (static_cast<uint64_t>(node) << 32) | static_cast<uint32_t>(token);
    }

    int depth_limit_;
    std::vector<int32_t> text_;
    std::vector<Node> nodes_;
    std::unordered_map<uint64_t, int32_t> children_;
    std::vector<int32_t> active_, next_active_;  // nodes of the repeated suffixes, by depth
};

// The chance that a draft token is accepted given that the ones before it were, from decaying
// counts of verifications: each accepted token, and the first rejected one, was tested (the
// tokens after a rejection were never reached).
struct AcceptanceEstimate {
    static constexpr double kDecay = 0.75;  // weight left to earlier verifications, each time
    static constexpr double kWeight = 1.5;  // of a starting estimate: the first verifications outweigh it
    double accepted = 1.0, tested = kWeight;  // with nothing known: 2/3

    void add(int n_drafted, int n_accepted);
    double rate() const { return accepted / tested; }
    AcceptanceEstimate as_prior() const { return {rate() * kWeight, kWeight}; }
};

// Earlier requests' outputs, shared by all sequences; thread-safe. When the index outgrows
// byte_budget the oldest outputs are dropped (down to 3/4 of the budget, so that rebuilding
// the index is amortised) and the index is rebuilt from the rest.
class SuffixStore {
public:
    SuffixStore(size_t byte_budget, int depth_limit);

    void add(const std::vector<int32_t>& output);
    // A draft of at most max_tokens tokens to follow tail[0, n).
    Draft propose(const int32_t* tail, int n, const SuffixDraftParams& params, int max_tokens) const;

    // Acceptance over all sequences' verifications: where a new sequence's estimate starts, so
    // that a server whose traffic does not repeat stops paying for each request's first drafts.
    void record(int n_drafted, int n_accepted);
    AcceptanceEstimate acceptance() const;

    size_t bytes() const;
    size_t n_documents() const;
    size_t byte_budget() const { return byte_budget_; }
    int depth_limit() const { return depth_limit_; }

private:
    void rebuild();

    size_t byte_budget_;
    int depth_limit_;
    mutable std::shared_mutex mutex_;
    std::deque<std::vector<int32_t>> documents_;  // oldest first
    SuffixTrie trie_;
    mutable std::mutex acceptance_mutex_;
    AcceptanceEstimate acceptance_;
};

// Decides how much of a draft to verify. With a the sequence's AcceptanceEstimate, a draft of k
// tokens yields 1 + a + ... + a^k tokens, expected, from a step that costs relative_cost[k] plain
// steps; the length with the best yield per cost is verified if it beats a plain step. When none
// does, drafting pauses; after the pause a one-token draft probes, and the pause doubles while
// probes fail. Pauses are long enough that probes take about 1% of the time at most, so text with
// no repetition pays for almost no drafts, however dear verification is on the model.
class AdaptiveDraftControl {
public:
    explicit AdaptiveDraftControl(AcceptanceEstimate prior = {}) : acceptance_(prior) {}
    bool paused();  // counts a step
    // How many of `available` draft tokens to verify (0: none). relative_cost[k]: the step with k
    // draft tokens over the step without (entries past the end: as the last one); sequences: the
    // tokens the step yields without drafts (one per generating sequence).
    int length(int available, const std::vector<double>& relative_cost, int sequences);
    void record(int n_drafted, int n_accepted);
    double acceptance() const { return acceptance_.rate(); }

    static constexpr double kMinCostPerToken = 0.02;  // verifying a token is never free
    static constexpr double kProbeShare = 0.01;       // of the time, spent on probes at most
    static constexpr int kFirstPause = 8;
    static constexpr int kLongestPause = 256;

private:
    AcceptanceEstimate acceptance_;
    int pause_left_ = 0;
    int next_pause_ = kFirstPause;
    bool probe_ = false;
};

struct DraftStats {
    int64_t steps = 0;      // verification forwards
    int64_t drafted = 0;    // draft tokens verified
    int64_t accepted = 0;   // draft tokens the target agreed with
    int64_t paused = 0;     // steps the adaptive control skipped drafting
};

// One sequence's drafter: feed it the prompt, then each step's new tokens; propose() before
// each verification forward, record() after it. finish() gives the output to the store.
class SuffixDrafter {
public:
    SuffixDrafter(const SuffixDraftParams& params, std::shared_ptr<SuffixStore> store = nullptr);

    void append(const int32_t* tokens, size_t n);
    void mark_prompt_end();  // the tokens appended from here on are output
    // relative_cost(k): the costs AdaptiveDraftControl::length takes, for drafts of up to k
    // tokens; asked only when there is a draft to size (not on paused steps).
    using RelativeCost = std::function<std::vector<double>(int max_extra)>;
    // A draft of at most max_tokens tokens to follow the text so far (empty: do not draft); when
    // adaptive, cut to the length that pays for its step (AdaptiveDraftControl::length).
    std::vector<int32_t> propose(int max_tokens, const RelativeCost& relative_cost = {}, int sequences = 1);
    void record(int n_drafted, int n_accepted);
    void finish();  // idempotent

    const DraftStats& stats() const { return stats_; }
    const SuffixDraftParams& params() const { return params_; }
    double acceptance() const { return control_.acceptance(); }

private:
    Draft local_draft(int max_tokens);

    SuffixDraftParams params_;
    std::shared_ptr<SuffixStore> store_;
    SuffixTrie trie_;
    std::vector<int32_t> history_;
    size_t n_indexed_ = 0;  // tokens of history_ in trie_
    size_t prompt_end_ = 0;
    bool finished_ = false;
    AdaptiveDraftControl control_;
    DraftStats stats_;
};

// How many tokens a match of match_length may draft.
int draft_budget(const SuffixDraftParams& params, int match_length, int max_tokens);

}  // namespace glmoe
