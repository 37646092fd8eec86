#include "suffix_draft.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <stdexcept>

namespace glmoe {

// ---- SuffixTrie -----------------------------------------------------------------------------

SuffixTrie::SuffixTrie(int depth_limit) : depth_limit_(depth_limit) {
    if (depth_limit < 1) throw std::invalid_argument("suffix trie depth limit must be at least 1");
    nodes_.push_back(Node{kSeparator, 0, 0, 0, -1, -1});
}

int32_t SuffixTrie::find_child(int32_t node, int32_t token) const {
    const auto it = children_.find(key(node, token));
    return it == children_.end() ? -1 : it->second;
}

int32_t SuffixTrie::add_child(int32_t parent, int32_t token, int32_t end) {
    const auto id = static_cast<int32_t>(nodes_.size());
    nodes_.push_back(Node{token, nodes_[parent].depth + 1, 1, 0, end, -1});
    children_.emplace(key(parent, token), id);
    count_child(parent, id);
    return id;
}

// Counts only grow, so the most frequent child can only become the one just counted.
void SuffixTrie::count_child(int32_t parent, int32_t child) {
    Node& p = nodes_[parent];
    ++p.child_total;
    if (p.best_child < 0 || nodes_[child].count >= nodes_[p.best_child].count) p.best_child = child;
}

void SuffixTrie::append(int32_t token) {
    if (token < 0) throw std::invalid_argument("suffix trie tokens must be non-negative");
    text_.push_back(token);
    const auto pos = static_cast<int32_t>(text_.size() - 1);
    next_active_.clear();
    // Every suffix ending here extends a suffix that ended at pos - 1 and occurred before, or
    // starts at the root; the others already occur once only, and so do their extensions.
    for (size_t i = 0; i <= active_.size(); ++i) {
        const int32_t parent = i == 0 ? kRoot : active_[i - 1];
        int32_t child = find_child(parent, token);
        if (child < 0) {
            add_child(parent, token, pos);
            continue;
        }
        Node& c = nodes_[child];
        if (c.count == 1 && c.depth < depth_limit_) {
            // Seen a second time: its first occurrence's continuation becomes a stored child.
            // That occurrence ended before pos, so its next token is in the text already.
            const int32_t next = c.end + 1;
            if (text_[next] != kSeparator) add_child(child, text_[next], next);
        }
        ++nodes_[child].count;
        nodes_[child].end = pos;
        count_child(parent, child);
        if (nodes_[child].depth < depth_limit_) next_active_.push_back(child);
    }
    active_.swap(next_active_);
}

void SuffixTrie::end_document() {
    if (!text_.empty() && text_.back() != kSeparator) text_.push_back(kSeparator);
    active_.clear();
}

SuffixTrie::Cursor SuffixTrie::step(Cursor c, int32_t token) const {
    if (c.depth >= depth_limit_) return {};
    if (c.depth == nodes_[c.node].depth && children_stored(c.node)) {
        const int32_t child = find_child(c.node, token);
        if (child < 0) return {};
        return {child, c.depth + 1, nodes_[child].end};
    }
    const size_t next = static_cast<size_t>(c.end) + 1;
    if (next >= text_.size() || text_[next] != token) return {};
    return {c.node, c.depth + 1, c.end + 1};
}

bool SuffixTrie::has_continuation(Cursor c) const {
    if (!c.valid() || c.depth >= depth_limit_) return false;
    if (c.depth == nodes_[c.node].depth && children_stored(c.node)) return nodes_[c.node].child_total > 0;
    const size_t next = static_cast<size_t>(c.end) + 1;
    return next < text_.size() && text_[next] != kSeparator;
}

SuffixTrie::Cursor SuffixTrie::longest_repeated_suffix(int max_depth) const {
    for (auto it = active_.rbegin(); it != active_.rend(); ++it) {
        const Cursor c{*it, nodes_[*it].depth, nodes_[*it].end};
        if (c.depth <= max_depth && has_continuation(c)) return c;
    }
    return {};
}

SuffixTrie::Cursor SuffixTrie::longest_match(const int32_t* tail, int n, int max_depth) const {
    // If a string occurs followed by a token, so does each of its suffixes: the lengths that
    // match are 1..m. Doubling from 1 and then halving finds m in O(m log m) lookups, so text
    // that does not repeat (m of 0 or 1, every step of a sequence without drafts) costs a few.
    auto walk = [&](int length) {
        Cursor c{kRoot, 0, -1};
        for (int i = n - length; i < n && c.valid(); ++i) c = step(c, tail[i]);
        return has_continuation(c) ? c : Cursor{};
    };
    Cursor best;
    const int longest = std::min({n, max_depth, depth_limit_ - 1});
    int lo = 1, length = 1;
    for (; length <= longest; length *= 2) {
        const Cursor c = walk(length);
        if (!c.valid()) break;
        best = c;
        lo = length + 1;
    }
    int hi = std::min(length - 1, longest);
    while (lo <= hi) {
        const int mid = (lo + hi) / 2;
        const Cursor c = walk(mid);
        if (c.valid()) {
            best = c;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return best;
}

Draft SuffixTrie::continuation(Cursor at, int max_tokens, float min_prob) const {
    Draft d;
    if (!at.valid()) return d;
    d.match_length = at.depth;
    double prob = 1.0;
    while (static_cast<int>(d.tokens.size()) < max_tokens && has_continuation(at)) {
        const Node& n = nodes_[at.node];
        int32_t token;
        if (at.depth == n.depth && children_stored(at.node)) {
            const Node& best = nodes_[n.best_child];
            prob *= static_cast<double>(best.count) / n.child_total;
            if (prob < min_prob) break;
            token = best.token;
        } else {
            token = text_[at.end + 1];  // the single occurrence: probability 1
        }
        d.tokens.push_back(token);
        d.score += prob;
        at = step(at, token);
    }
    return d;
}

size_t SuffixTrie::bytes() const {
    // unordered_map: a node per entry (key, value, next pointer, cached hash) plus a bucket.
    constexpr size_t kMapEntry = sizeof(uint64_t) + sizeof(int32_t) + 2 * sizeof(void*) + sizeof(size_t);
    return sizeof(*this) + text_.capacity() * sizeof(int32_t) + nodes_.capacity() * sizeof(Node) +
           children_.size() * kMapEntry + children_.bucket_count() * sizeof(void*) +
           (active_.capacity() + next_active_.capacity()) * sizeof(int32_t);
}

// ---- SuffixStore ----------------------------------------------------------------------------

SuffixStore::SuffixStore(size_t byte_budget, int depth_limit)
    : byte_budget_(byte_budget), depth_limit_(depth_limit), trie_(depth_limit) {}

void SuffixStore::add(const std::vector<int32_t>& output) {
    if (output.empty()) return;
    std::unique_lock lock(mutex_);
    for (int32_t t : output) trie_.append(t);
    trie_.end_document();
    documents_.push_back(output);
    if (trie_.bytes() <= byte_budget_) return;
    // Drop the oldest outputs until the estimate for the rest is within 3/4 of the budget.
    const double bytes_per_token = static_cast<double>(trie_.bytes()) / trie_.n_tokens();
    size_t kept = trie_.n_tokens();
    while (!documents_.empty() && kept * bytes_per_token > 0.75 * byte_budget_) {
        kept -= documents_.front().size() + 1;
        documents_.pop_front();
    }
    rebuild();
    while (!documents_.empty() && trie_.bytes() > byte_budget_) {  // the estimate was too low
        documents_.pop_front();
        rebuild();
    }
}

void SuffixStore::rebuild() {
    trie_ = SuffixTrie(depth_limit_);
    for (const auto& doc : documents_) {
        for (int32_t t : doc) trie_.append(t);
        trie_.end_document();
    }
}

Draft SuffixStore::propose(const int32_t* tail, int n, const SuffixDraftParams& params, int max_tokens) const {
    std::shared_lock lock(mutex_);
    const auto at = trie_.longest_match(tail, n, params.max_depth);
    if (!at.valid()) return {};
    return trie_.continuation(at, draft_budget(params, at.depth, max_tokens), params.min_token_prob);
}

void SuffixStore::record(int n_drafted, int n_accepted) {
    std::lock_guard lock(acceptance_mutex_);
    acceptance_.add(n_drafted, n_accepted);
}

AcceptanceEstimate SuffixStore::acceptance() const {
    std::lock_guard lock(acceptance_mutex_);
    return acceptance_;
}

size_t SuffixStore::bytes() const {
    std::shared_lock lock(mutex_);
    return trie_.bytes();
}

size_t SuffixStore::n_documents() const {
    std::shared_lock lock(mutex_);
    return documents_.size();
}

// ---- AdaptiveDraftControl -------------------------------------------------------------------

void AcceptanceEstimate::add(int n_drafted, int n_accepted) {
    if (n_drafted <= 0) return;
    accepted = kDecay * accepted + n_accepted;
    tested = kDecay * tested + n_accepted + (n_accepted < n_drafted ? 1 : 0);
}

bool AdaptiveDraftControl::paused() {
    if (pause_left_ == 0) return false;
    if (--pause_left_ == 0) probe_ = true;
    return true;
}

int AdaptiveDraftControl::length(int available, const std::vector<double>& relative_cost, int sequences) {
    if (available <= 0) return 0;
    if (probe_) {
        probe_ = false;
        return 1;
    }
    const auto cost = [&](int k) {
        const double given = relative_cost.empty() ? 1.0 : relative_cost[std::min<size_t>(k, relative_cost.size() - 1)];
        return std::max(given, 1.0 + kMinCostPerToken * k);
    };
    const double a = acceptance(), base = std::max(sequences, 1);
    double yield = base, a_pow = 1.0, best_gain = 1.0;
    int best = 0;
    for (int k = 1; k <= available; ++k) {
        a_pow *= a;
        yield += a_pow;
        const double gain = yield / (base * cost(k));
        if (gain > best_gain) {
            best_gain = gain;
            best = k;
        }
    }
    if (best == 0) {
        // A failed one-token probe costs cost(1) - 1 steps: one per this many steps stays within kProbeShare.
        const int pause = std::max(next_pause_, static_cast<int>(std::ceil((cost(1) - 1.0) / kProbeShare)));
        pause_left_ = std::min(pause, kLongestPause);
        next_pause_ = std::min(2 * pause, kLongestPause);
    }
    return best;
}

void AdaptiveDraftControl::record(int n_drafted, int n_accepted) {
    acceptance_.add(n_drafted, n_accepted);
    if (n_accepted > 0) next_pause_ = kFirstPause;
}

// ---- SuffixDrafter --------------------------------------------------------------------------

int draft_budget(const SuffixDraftParams& params, int match_length, int max_tokens) {
    const int by_factor = static_cast<int>(std::floor(params.max_spec_factor * match_length));
    return std::max(0, std::min({by_factor, params.max_spec_tokens, max_tokens}));
}

SuffixDrafter::SuffixDrafter(const SuffixDraftParams& params, std::shared_ptr<SuffixStore> store)
    : params_(params),
      store_(std::move(store)),
      trie_(params.max_depth + params.max_spec_tokens),
      control_(store_ ? store_->acceptance().as_prior() : AcceptanceEstimate{}) {
    if (params.max_depth < 1) throw std::invalid_argument("max_depth must be at least 1");
    if (params.max_spec_tokens < 0) throw std::invalid_argument("max_spec_tokens must be non-negative");
    if (!(params.max_spec_factor >= 0)) throw std::invalid_argument("max_spec_factor must be non-negative");
    if (!(params.min_token_prob >= 0 && params.min_token_prob <= 1))
        throw std::invalid_argument("min_token_prob must be in [0, 1]");
}

void SuffixDrafter::append(const int32_t* tokens, size_t n) {
    history_.insert(history_.end(), tokens, tokens + n);
}

void SuffixDrafter::mark_prompt_end() { prompt_end_ = history_.size(); }

Draft SuffixDrafter::local_draft(int max_tokens) {
    // The index catches up here rather than token by token in append(): while drafting is paused
    // (most steps of text that does not repeat) a step only stores its token, and the catch-up
    // runs the index's updates together, with its data in cache.
    for (; n_indexed_ < history_.size(); ++n_indexed_) trie_.append(history_[n_indexed_]);
    const auto at = trie_.longest_repeated_suffix(params_.max_depth);
    if (!at.valid()) return {};
    return trie_.continuation(at, draft_budget(params_, at.depth, max_tokens), params_.min_token_prob);
}

std::vector<int32_t> SuffixDrafter::propose(int max_tokens, const RelativeCost& relative_cost, int sequences) {
    if (params_.adaptive && control_.paused()) {
        ++stats_.paused;
        return {};
    }
    Draft best = local_draft(max_tokens);
    if (store_) {
        const int n = static_cast<int>(std::min<size_t>(history_.size(), params_.max_depth));
        Draft shared = store_->propose(history_.data() + history_.size() - n, n, params_, max_tokens);
        if (shared.score > best.score) best = std::move(shared);
    }
    if (params_.adaptive && !best.tokens.empty()) {
        const int available = static_cast<int>(best.tokens.size());
        const int k = control_.length(available, relative_cost ? relative_cost(available) : std::vector<double>{},
                                      sequences);
        if (k == 0) ++stats_.paused;
        best.tokens.resize(k);
    }
    return std::move(best.tokens);
}

void SuffixDrafter::record(int n_drafted, int n_accepted) {
    ++stats_.steps;
    stats_.drafted += n_drafted;
    stats_.accepted += n_accepted;
    control_.record(n_drafted, n_accepted);
    if (store_) store_->record(n_drafted, n_accepted);
}

void SuffixDrafter::finish() {
    if (finished_) return;
    finished_ = true;
    if (store_ && history_.size() > prompt_end_)
        store_->add(std::vector<int32_t>(history_.begin() + prompt_end_, history_.end()));
}

}  // namespace glmoe
