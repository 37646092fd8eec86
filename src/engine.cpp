#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "speculative.h"

namespace glmoe {

const char* finish_reason_name(FinishReason r) {
    switch (r) {
        case FinishReason::stop: return "stop";
        case FinishReason::length: return "length";
        case FinishReason::cancelled: return "cancelled";
        case FinishReason::error: return "error";
        default: return nullptr;
    }
}

const char* slot_state_name(SlotState s) {
    switch (s) {
        case SlotState::prefill: return "prefill";
        case SlotState::generating: return "generating";
        default: return "idle";
    }
}

namespace {

double ms_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

// log softmax(logits)[token], in double so that a large vocabulary loses nothing; with n > 0 also
// the n most likely tokens into `top` (descending, ties by lower id): one pass keeping a sorted
// list of n, most tokens costing one comparison with its last.
float token_logprobs(const float* logits, int n_vocab, int32_t token, int n, std::vector<TokenLogprob>& top) {
    const float max = *std::max_element(logits, logits + n_vocab);
    double sum = 0;
    for (int i = 0; i < n_vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - max);
    const double log_norm = max + std::log(sum);
    top.clear();
    for (int i = 0; i < n_vocab && n > 0; ++i) {
        const float logit = logits[i];
        if (std::isnan(logit) || (static_cast<int>(top.size()) == n && !(logit > top.back().logprob))) continue;
        if (static_cast<int>(top.size()) == n) top.pop_back();
        auto at = top.end();
        while (at != top.begin() && (at - 1)->logprob < logit) --at;  // after equal logits: lower ids first
        top.insert(at, TokenLogprob{i, logit});
    }
    for (TokenLogprob& t : top) t.logprob = static_cast<float>(t.logprob - log_norm);
    return static_cast<float>(static_cast<double>(logits[token]) - log_norm);
}

// Tokens whose bit is clear get -inf, which every filter and the draw then skip.
void apply_token_mask(float* logits, int n_vocab, const std::vector<uint32_t>& mask) {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    for (int t = 0; t < n_vocab; ++t)
        if (!(mask[t >> 5] >> (t & 31) & 1u)) logits[t] = neg_inf;
}

// FNV-1a over every tensor's name, type, shape and first bytes: files of one shape but other
// weights differ in those bytes, and reading them costs a page per tensor, not the whole file.
uint64_t model_fingerprint(const Model& model) {
    uint64_t h = 0xcbf29ce484222325ull;
    const auto mix = [&h](const void* p, size_t n) {
        for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 0x100000001b3ull;
    };
    for (const GGUFTensorInfo& t : model.file().tensors()) {
        mix(t.name.data(), t.name.size());
        mix(&t.type, sizeof t.type);
        mix(t.ne.data(), t.ne.size() * sizeof(int64_t));
        mix(model.file().tensor_data(t), std::min<uint64_t>(t.n_bytes, 64));
    }
    return h;
}

// A saved slot: this header, its tokens, then KVCache::save_seq's bytes.
struct SlotFileHeader {
    uint32_t magic;
    uint32_t n_ctx_slot;
    uint64_t model;
    uint32_t n_tokens;
    uint32_t reserved;  // no padding: every byte of the file is written
};
constexpr uint32_t kSlotMagic = 0x54534c47;  // "GLST"

}  // namespace

BatchEngine::Request::Request(int64_t id, std::vector<int32_t> prompt, int max_tokens,
                              std::vector<int32_t> eog, const SamplingParams& sp, int n_vocab)
    : id(id), tokens(std::move(prompt)), n_prompt(static_cast<int>(tokens.size())),
      max_tokens(max_tokens), eog_ids(std::move(eog)), sampler(sp, n_vocab) {
    unpolled.n_prompt = n_prompt;
}

SlotState BatchEngine::Slot::state() const {
    if (!request) return SlotState::idle;
    return n_past < request->n_prompt ? SlotState::prefill : SlotState::generating;
}

static const EngineParams& checked(const EngineParams& p) {
    if (p.n_parallel < 1 || p.n_parallel > KVCache::kMaxSeq)
        throw std::invalid_argument("n_parallel must be in [1, " + std::to_string(KVCache::kMaxSeq) + "]");
    if (p.n_ctx < 2 * p.n_parallel)
        throw std::invalid_argument("n_ctx must give each slot at least 2 positions");
    if (p.n_batch < 1) throw std::invalid_argument("n_batch must be positive");
    if (p.spec_suffix) SuffixDrafter{p.spec};  // throws for bad drafting parameters
    return p;
}

static ContextParams context_params(const EngineParams& p) {
    ContextParams c;
    c.n_ctx = p.n_ctx;
    c.n_threads = p.n_threads;
    c.n_gpu_layers = p.n_gpu_layers;
    c.tensor_overrides = p.tensor_overrides;
    c.type_k = p.type_k;
    c.type_v = p.type_v;
    c.n_ubatch = p.n_batch;
    return c;
}

BatchEngine::BatchEngine(const Model& model, const EngineParams& params)
    : model_(model),
      params_(checked(params)),
      n_ctx_slot_(params.n_ctx / params.n_parallel),
      n_vocab_(model.hparams().n_vocab),
      ctx_(model, context_params(params)),
      spec_store_(params.spec_suffix ? std::make_shared<SuffixStore>(params.spec_store_bytes,
                                                                     params.spec.max_depth + params.spec.max_spec_tokens)
                                     : nullptr),
      model_fingerprint_(model_fingerprint(model)),
      slots_(params.n_parallel) {
    thread_ = std::thread([this] { run(); });
}

BatchEngine::~BatchEngine() { shutdown(); }

int64_t BatchEngine::submit(std::vector<int32_t> prompt, int max_tokens, std::vector<int32_t> eog_ids,
                            const SamplingParams& sampling, bool draft, std::vector<uint32_t> token_mask,
                            int top_logprobs) {
    if (prompt.empty()) throw std::invalid_argument("empty prompt");
    if (top_logprobs < 0 || top_logprobs > kMaxTopLogprobs)
        throw std::invalid_argument("top_logprobs must be in [0, " + std::to_string(kMaxTopLogprobs) + "], got " +
                                    std::to_string(top_logprobs));
    for (int32_t t : prompt)
        if (t < 0 || t >= n_vocab_)
            throw std::invalid_argument("token id " + std::to_string(t) + " out of range [0, " +
                                        std::to_string(n_vocab_) + ")");
    // The prompt and at least one generated token must fit the slot.
    if (static_cast<int64_t>(prompt.size()) + 1 > n_ctx_slot_)
        throw std::invalid_argument("prompt of " + std::to_string(prompt.size()) +
                                    " tokens does not fit the slot context of " + std::to_string(n_ctx_slot_));
    const bool constrained = !token_mask.empty();
    if (constrained && static_cast<int>(token_mask.size()) != mask_words())
        throw std::invalid_argument("token_mask must have " + std::to_string(mask_words()) + " words, got " +
                                    std::to_string(token_mask.size()));
    auto r = std::make_shared<Request>(0, std::move(prompt), max_tokens > 0 ? max_tokens : n_ctx_slot_,
                                       std::move(eog_ids), sampling, n_vocab_);
    r->n_top_logprobs = std::min(top_logprobs, n_vocab_);
    if (constrained) {
        r->constrained = true;
        r->mask = std::move(token_mask);
        r->mask_index = 0;
    }
    // Drafts would need a mask per drafted position; constrained requests decode one token a step.
    if (spec_store_ && draft && !constrained) {  // indexing the prompt here keeps it off the engine thread
        r->drafter = std::make_unique<SuffixDrafter>(params_.spec, spec_store_);
        r->drafter->append(r->tokens.data(), r->tokens.size());
        r->drafter->mark_prompt_end();
    }
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_) throw std::runtime_error("the engine is shut down");
    r->id = next_id_++;
    requests_[r->id] = r;
    waiting_.push_back(r);
    work_cv_.notify_one();
    return r->id;
}

bool BatchEngine::set_token_mask(int64_t id, int index, std::vector<uint32_t> mask) {
    if (static_cast<int>(mask.size()) != mask_words())
        throw std::invalid_argument("token_mask must have " + std::to_string(mask_words()) + " words, got " +
                                    std::to_string(mask.size()));
    std::lock_guard<std::mutex> lk(mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) return false;
    Request& r = *it->second;
    if (!r.constrained)
        throw std::invalid_argument("request " + std::to_string(id) + " was submitted without a token_mask");
    if (r.unpolled.finished) return false;
    // Masks come one token at a time: the engine cannot have sampled past a token without its mask.
    if (index != r.n_generated())
        throw std::invalid_argument("token mask for generated token " + std::to_string(index) +
                                    ", but the request's next token is number " + std::to_string(r.n_generated()));
    r.mask = std::move(mask);
    r.mask_index = index;
    if (r.held()) work_cv_.notify_one();
    return true;
}

std::optional<RequestEvent> BatchEngine::poll(int64_t id, double timeout_s) {
    std::unique_lock<std::mutex> lk(mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) return std::nullopt;
    RequestPtr r = it->second;
    const auto ready = [&] { return !r->unpolled.tokens.empty() || r->unpolled.finished; };
    ++r->n_pollers;
    if (timeout_s > 1e7)  // beyond what wait_for's clock arithmetic takes safely: no limit
        events_cv_.wait(lk, ready);
    else if (timeout_s > 0)
        events_cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), ready);
    --r->n_pollers;

    RequestEvent ev = r->unpolled;
    r->unpolled.tokens.clear();
    r->unpolled.logprobs.clear();
    r->unpolled.top_logprobs.clear();
    ev.n_generated = r->n_generated();
    if (ev.finished) requests_.erase(id);
    return ev;
}

void BatchEngine::cancel(int64_t id) {
    std::unique_lock<std::mutex> lk(mu_);
    auto it = requests_.find(id);
    if (it == requests_.end()) return;
    RequestPtr r = it->second;
    if (!r->unpolled.finished) {
        if (r->slot < 0) {
            waiting_.erase(std::find(waiting_.begin(), waiting_.end(), r));
            finish(*r, FinishReason::cancelled);
        } else if (!step_in_flight_) {
            release_slot(r->slot, FinishReason::cancelled);
        } else {
            // The cache is the engine thread's until the step ends; it frees the slot then.
            slots_[r->slot].cancel_pending = true;
            events_cv_.wait(lk, [&] { return r->unpolled.finished; });
        }
    }
    if (r->n_pollers == 0) requests_.erase(id);
}

EngineStats BatchEngine::stats() const {
    std::lock_guard<std::mutex> lk(mu_);
    EngineStats s{};
    s.n_parallel = params_.n_parallel;
    s.n_ctx = params_.n_ctx;
    s.n_ctx_slot = n_ctx_slot_;
    s.requests_waiting = static_cast<int>(waiting_.size());
    s.requests_running = static_cast<int>(
        std::count_if(slots_.begin(), slots_.end(), [](const Slot& sl) { return sl.request != nullptr; }));
    s.kv_cells_used = kv_cells_used_;
    s.kv_cells_total = params_.n_ctx;
    s.prompt_tokens_total = prompt_tokens_total_;
    s.generated_tokens_total = generated_tokens_total_;
    s.decode_steps_total = decode_steps_total_;
    s.overlapped_steps_total = overlapped_steps_total_;
    s.t_busy_ms_total = t_busy_ms_total_;
    s.draft_tokens_total = draft_tokens_total_;
    s.draft_accepted_total = draft_accepted_total_;
    return s;
}

std::vector<SlotInfo> BatchEngine::slots() const {
    std::lock_guard<std::mutex> lk(mu_);
    std::vector<SlotInfo> out;
    for (int i = 0; i < params_.n_parallel; ++i) {
        const Slot& s = slots_[i];
        const Request* r = s.request.get();
        out.push_back({i, s.state(), r ? r->id : -1, r ? r->n_prompt : 0, s.n_past, r ? r->n_generated() : 0});
    }
    return out;
}

GpuCounters BatchEngine::gpu_counters() {
    std::unique_lock<std::mutex> lk(mu_);
    ++between_steps_wanted_;
    events_cv_.wait(lk, [this] { return !step_in_flight_; });  // the engine thread counts during a step
    --between_steps_wanted_;
    return ctx_.gpu() ? ctx_.gpu()->counters() : GpuCounters{};
}

void BatchEngine::shutdown() {
    std::call_once(shutdown_once_, [this] {
        {
            std::lock_guard<std::mutex> lk(mu_);
            stopping_ = true;
        }
        work_cv_.notify_all();
        thread_.join();
        std::lock_guard<std::mutex> lk(mu_);
        for (int i = 0; i < params_.n_parallel; ++i)
            if (slots_[i].request) release_slot(i, FinishReason::cancelled);
        for (const RequestPtr& r : waiting_) finish(*r, FinishReason::cancelled);
        waiting_.clear();
        for (const auto& t : slot_tasks_) {
            t->error = std::make_exception_ptr(std::runtime_error("the engine is shut down"));
            t->done = true;
        }
        slot_tasks_.clear();
        events_cv_.notify_all();
    });
}

// ---- engine thread ------------------------------------------------------------------------------

void BatchEngine::run() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
        work_cv_.wait(lk, [this] { return stopping_ || has_work(); });
        if (stopping_) return;
        run_slot_tasks();
        sample_held();
        start_waiting_requests();
        build_batch();
        if (batch_.size() == 0) {  // every active slot waits for a token mask, or just finished
            events_cv_.notify_all();
            continue;
        }

        step_in_flight_ = true;
        lk.unlock();
        const auto t0 = Clock::now();
        step_errors_.assign(params_.n_parallel, {});
        plan_gpu_sampling();
        if (overlappable() && run_overlapped(lk, t0)) continue;
        std::vector<Sampled> sampled;
        decode_step();
        sample_outputs(sampled);
        lk.lock();
        step_in_flight_ = false;
        end_step(sampled, t0);
    }
}

void BatchEngine::end_step(const std::vector<Sampled>& sampled, Clock::time_point t0) {
    t_busy_ms_total_ += ms_between(t0, Clock::now());
    ++decode_steps_total_;
    for (int i = 0; i < params_.n_parallel; ++i)
        if (slots_[i].cancel_pending) release_slot(i, FinishReason::cancelled);
    apply_step(sampled);
    kv_cells_used_ = ctx_.kv_cache().n_used();
    events_cv_.notify_all();
}

bool BatchEngine::overlappable() const {
    if (!params_.overlap || !ctx_.overlaps() || row_sampling_.size() != batch_.size()) return false;
    for (size_t i = 0; i < batch_.size(); ++i) {
        const RowSampling& rs = row_sampling_[i];
        // One token per slot (plan_gpu_sampling gives params only to a slot's only row).
        if (!rs.params || rs.params->penalizes() || slots_[batch_.seq[i]].request->drafter) return false;
    }
    return true;
}

bool BatchEngine::next_overlapped(Batch& next, std::vector<int>& next_slots) const {
    next = Batch{};
    next_slots.clear();
    if (stopping_ || !slot_tasks_.empty() || between_steps_wanted_ > 0) return false;
    int n_busy = 0;
    for (const Slot& s : slots_) {
        if (s.cancel_pending) return false;
        n_busy += s.request != nullptr;
    }
    // A request waiting for an idle slot, or a busy slot outside this step (a prompt, a held
    // constrained request), goes first: the overlapped run ends.
    if (n_busy != static_cast<int>(batch_.size()) || (!waiting_.empty() && n_busy < params_.n_parallel)) return false;
    for (size_t i = 0; i < batch_.size(); ++i) {
        const int slot = batch_.seq[i];
        const Request& r = *slots_[slot].request;
        // After this step's token (not known yet) the request needs more.
        if (r.n_generated() + 1 >= r.max_tokens || static_cast<int>(r.tokens.size()) + 1 >= n_ctx_slot_) continue;
        next.token.push_back(sampled_token(static_cast<int>(i)));
        next.pos.push_back(batch_.pos[i] + 1);
        next.seq.push_back(slot);
        next.want_logits.push_back(1);
        next_slots.push_back(slot);
    }
    return next.size() > 0;
}

bool BatchEngine::run_overlapped(std::unique_lock<std::mutex>& lk, Clock::time_point t0) {
    try {
        ctx_.begin_sampled(batch_, row_sampling_);
    } catch (const std::exception&) {
        return false;  // the plain path runs the step and reports what fails, per slot
    }
    Batch next;
    std::vector<int> next_slots;
    std::vector<RowSampling> next_rows;
    for (;;) {
        lk.lock();
        bool begun = next_overlapped(next, next_slots);
        lk.unlock();
        if (begun) {
            next_rows.clear();
            for (int slot : next_slots) next_rows.push_back(row_sampling_of(slot));
            try {
                ctx_.begin_sampled(next, next_rows);
            } catch (const std::exception&) {
                begun = false;  // e.g. a full cache: the plain path takes the next step
            }
        }
        std::vector<Sampled> sampled;
        try {
            ctx_.end_sampled(gpu_rows_);
            step_rows_.ids = gpu_rows_.ids;
            step_rows_.logprobs = gpu_rows_.logprobs;
            step_rows_.top = gpu_rows_.top;
            sample_outputs(sampled);
        } catch (const std::exception& e) {
            for (int32_t slot : batch_.seq) step_errors_[slot] = *e.what() ? e.what() : "decode failed";
        }
        lk.lock();
        const auto t_end = Clock::now();
        end_step(sampled, t0);
        if (!begun) {
            step_in_flight_ = false;
            return true;
        }
        // The begun step becomes this one; rows of slots that end_step just freed are dropped
        // when its output comes (their cells are gone already).
        ++overlapped_steps_total_;
        std::swap(batch_, next);
        logit_slots_ = next_slots;
        std::swap(row_sampling_, next_rows);
        step_errors_.assign(params_.n_parallel, {});
        t0 = t_end;
        lk.unlock();
    }
}

bool BatchEngine::has_work() const {
    if (!slot_tasks_.empty()) return true;
    bool any_idle = false;
    for (const Slot& s : slots_) {
        if (s.request && (!s.request->held() || s.request->mask_ready())) return true;
        if (!s.request) any_idle = true;
    }
    return any_idle && !waiting_.empty();
}

void BatchEngine::sample_held() {
    for (int i = 0; i < params_.n_parallel; ++i) {
        const RequestPtr& r = slots_[i].request;
        if (!r || !r->held() || !r->mask_ready()) continue;
        float logprob = 0;
        std::vector<TokenLogprob> top;
        int32_t token;
        try {
            r->mask_index = -1;
            token = sample_masked(*r, r->held_logits.data(), r->mask, logprob, top);
        } catch (const std::exception& e) {
            release_slot(i, FinishReason::error, *e.what() ? e.what() : "sampling failed");
            continue;
        }
        r->held_logits.clear();
        accept_token(i, token, logprob, std::move(top));
    }
}

int BatchEngine::pick_slot(const std::vector<int32_t>& prompt) const {
    int best = -1;
    size_t best_shared = 0;
    for (int i = 0; i < params_.n_parallel; ++i) {
        const Slot& s = slots_[i];
        if (s.request) continue;
        const size_t n = std::min(s.cached.size(), prompt.size());
        const size_t shared = std::mismatch(s.cached.begin(), s.cached.begin() + n, prompt.begin()).first -
                              s.cached.begin();
        if (best < 0 || shared > best_shared ||
            (shared == best_shared && s.cached.size() < slots_[best].cached.size())) {
            best = i;
            best_shared = shared;
        }
    }
    return best;
}

void BatchEngine::start_waiting_requests() {
    while (!waiting_.empty()) {
        const int i = pick_slot(waiting_.front()->tokens);
        if (i < 0) return;
        Slot& s = slots_[i];
        s.request = waiting_.front();
        waiting_.pop_front();
        Request& r = *s.request;
        // The cached prefix stays; at least the prompt's last token runs again, for its logits.
        const size_t n = std::min(s.cached.size(), static_cast<size_t>(r.n_prompt - 1));
        const int shared = static_cast<int>(
            std::mismatch(s.cached.begin(), s.cached.begin() + n, r.tokens.begin()).first - s.cached.begin());
        ctx_.kv_cache().seq_rm(i, shared, -1);
        s.cached.clear();
        s.n_past = shared;
        r.n_cached = r.unpolled.n_cached = shared;
        r.slot = i;
        r.t_start = Clock::now();
    }
    kv_cells_used_ = ctx_.kv_cache().n_used();
}

void BatchEngine::build_batch() {
    batch_ = Batch{};
    logit_slots_.clear();
    const auto add = [this](int32_t token, int pos, int slot, bool want) {
        batch_.token.push_back(token);
        batch_.pos.push_back(pos);
        batch_.seq.push_back(slot);
        batch_.want_logits.push_back(want);
        if (want) logit_slots_.push_back(slot);
    };

    // A generating slot's newest token is the one not yet in the cache. Drafts to follow it get
    // what n_batch leaves after every generating slot's token.
    const int n_generating = static_cast<int>(std::count_if(
        slots_.begin(), slots_.end(),
        [](const Slot& s) { return s.state() == SlotState::generating && !s.request->held(); }));
    // Drafts stay within the step size whose per-token results match a plain decode step, so
    // greedy output is the same with and without them (on the GPU: 8 tokens).
    int draft_room = std::min(params_.n_batch, ctx_.invariant_batch()) - n_generating;
    int n_generating_added = 0;
    for (int i = 0; i < params_.n_parallel; ++i) {
        const Slot& s = slots_[i];
        if (s.state() != SlotState::generating || s.request->held()) continue;
        Request& r = *s.request;
        add(r.tokens[s.n_past], s.n_past, i, true);
        ++n_generating_added;
        r.draft.clear();
        if (!r.drafter) continue;
        // Draft tokens beyond max_tokens or the slot context could never be kept.
        const int room = std::min({draft_room, r.max_tokens - r.n_generated() - 1, n_ctx_slot_ - s.n_past - 2});
        if (room <= 0) continue;
        // The step so far holds every generating slot's token and the drafts before this one.
        const int step_tokens = static_cast<int>(batch_.size()) + n_generating - n_generating_added;
        r.draft = r.drafter->propose(
            room, [&](int max_extra) { return ctx_.step_costs().relative(step_tokens, max_extra); }, n_generating);
        for (size_t j = 0; j < r.draft.size(); ++j) add(r.draft[j], s.n_past + 1 + static_cast<int>(j), i, true);
        draft_room -= static_cast<int>(r.draft.size());
    }

    // Prompt chunks fill the rest, round-robin from where the last step stopped. At least one
    // prompt token per step even when decode tokens fill n_batch, so that a prompt cannot starve.
    const int budget = std::max(params_.n_batch - static_cast<int>(batch_.size()), 1);
    int taken = 0;
    const int first = prefill_cursor_;
    for (int k = 0; k < params_.n_parallel && taken < budget; ++k) {
        const int i = (first + k) % params_.n_parallel;
        const Slot& s = slots_[i];
        if (s.state() != SlotState::prefill) continue;
        const int n = std::min(s.request->n_prompt - s.n_past, budget - taken);
        for (int j = 0; j < n; ++j) {
            const int pos = s.n_past + j;
            add(s.request->tokens[pos], pos, i, pos == s.request->n_prompt - 1);
        }
        taken += n;
        prefill_cursor_ = (i + 1) % params_.n_parallel;
    }
}

// The GPU path has no token masks: constrained (grammar) requests keep the host path, whose Sampler
// runs under the mask. So do drafted slots (verify_draft walks their rows on the host) and
// parameters the GPU's chain does not take (Context::samples_row_on_gpu). A step may mix both.
void BatchEngine::plan_gpu_sampling() {
    row_sampling_.clear();
    if (!ctx_.samples_on_gpu()) return;
    const size_t n_rows = logit_slots_.size();
    row_sampling_.resize(n_rows);
    for (size_t row = 0; row < n_rows; ++row) {
        const int slot = logit_slots_[row];
        const bool one_row = (row == 0 || logit_slots_[row - 1] != slot) &&
                             (row + 1 == n_rows || logit_slots_[row + 1] != slot);
        const Request& r = *slots_[slot].request;
        if (!one_row || r.constrained || !r.draft.empty() || !ctx_.samples_row_on_gpu(r.sampler.params())) continue;
        row_sampling_[row] = row_sampling_of(slot);
    }
}

RowSampling BatchEngine::row_sampling_of(int slot) {
    Request& r = *slots_[slot].request;
    RowSampling rs;
    rs.params = &r.sampler.params();
    rs.seq = slot;
    rs.history = &r.tokens;
    rs.n_top = r.n_top_logprobs;
    // The draw the host Sampler would make for this token: one seed, one stream on either path.
    rs.u = r.sampler.params().temperature > 0.0f ? r.sampler.uniform01() : 0.0;
    return rs;
}

bool BatchEngine::try_decode(const Batch& batch, const std::vector<RowSampling>& rows, StepRows& out,
                             std::string& error) {
    try {
        if (rows.empty()) {
            ctx_.decode(batch, out.logits);
            return true;
        }
        ctx_.decode_sample_rows(batch, rows, gpu_rows_);
        const size_t V = n_vocab_;
        out.logits.resize(rows.size() * V);
        size_t host = 0;
        for (size_t i = 0; i < rows.size(); ++i)
            if (!rows[i].params) {
                std::copy(gpu_rows_.host_logits.begin() + host * V, gpu_rows_.host_logits.begin() + (host + 1) * V,
                          out.logits.begin() + i * V);
                ++host;
            }
        out.ids = gpu_rows_.ids;
        out.logprobs = gpu_rows_.logprobs;
        out.top = gpu_rows_.top;
        return true;
    } catch (const std::exception& e) {
        error = *e.what() ? e.what() : "decode failed";
    } catch (...) {
        error = "decode failed";
    }
    return false;
}

void BatchEngine::copy_rows(const StepRows& from, size_t first, size_t n, StepRows& to, size_t at) const {
    const size_t V = n_vocab_;
    if (from.logits.size() >= (first + n) * V)
        std::copy(from.logits.begin() + first * V, from.logits.begin() + (first + n) * V, to.logits.begin() + at * V);
    if (from.ids.empty()) return;
    std::copy(from.ids.begin() + first, from.ids.begin() + first + n, to.ids.begin() + at);
    std::copy(from.logprobs.begin() + first, from.logprobs.begin() + first + n, to.logprobs.begin() + at);
    std::copy(from.top.begin() + first * kMaxSampledTop, from.top.begin() + (first + n) * kMaxSampledTop,
              to.top.begin() + at * kMaxSampledTop);
}

void BatchEngine::decode_step() {
    std::string error;
    if (try_decode(batch_, row_sampling_, step_rows_, error)) return;

    std::vector<int> batch_slots;
    for (int32_t s : batch_.seq)
        if (std::find(batch_slots.begin(), batch_slots.end(), s) == batch_slots.end()) batch_slots.push_back(s);
    if (batch_slots.size() == 1) {
        step_errors_[batch_slots[0]] = error;
        return;
    }
    const size_t n_rows = logit_slots_.size();
    step_rows_.logits.assign(n_rows * n_vocab_, 0.0f);
    step_rows_.ids.assign(row_sampling_.empty() ? 0 : n_rows, -1);
    step_rows_.logprobs.assign(step_rows_.ids.size(), 0.0f);
    step_rows_.top.assign(step_rows_.ids.size() * kMaxSampledTop, SampledTop{-1, 0.0f});
    Batch one;
    StepRows one_rows;
    std::vector<RowSampling> one_sampling;
    for (int slot : batch_slots) {
        one = Batch{};
        for (size_t t = 0; t < batch_.size(); ++t)
            if (batch_.seq[t] == slot) {
                one.token.push_back(batch_.token[t]);
                one.pos.push_back(batch_.pos[t]);
                one.seq.push_back(slot);
                one.want_logits.push_back(batch_.want_logits[t]);
            }
        // A slot's logits rows are adjacent, in batch order.
        const size_t first = std::find(logit_slots_.begin(), logit_slots_.end(), slot) - logit_slots_.begin();
        const size_t n = std::count(logit_slots_.begin(), logit_slots_.end(), slot);
        one_sampling.clear();
        if (!row_sampling_.empty())
            one_sampling.assign(row_sampling_.begin() + first, row_sampling_.begin() + first + n);
        // A slot with no logits row still runs through the plain path (it only fills the cache).
        const std::vector<RowSampling> none;
        if (!try_decode(one, n ? one_sampling : none, one_rows, step_errors_[slot])) continue;
        if (n) copy_rows(one_rows, 0, n, step_rows_, first);
    }
}

void BatchEngine::sample_outputs(std::vector<Sampled>& out) {
    for (size_t row = 0, n_rows; row < logit_slots_.size(); row += n_rows) {
        const int slot = logit_slots_[row];
        for (n_rows = 1; row + n_rows < logit_slots_.size() && logit_slots_[row + n_rows] == slot;) ++n_rows;
        // No request: an overlapped step's row of a slot that finished meanwhile.
        if (!step_errors_[slot].empty() || !slots_[slot].request) continue;
        Request& r = *slots_[slot].request;
        const float* logits = step_rows_.logits.data() + row * n_vocab_;
        try {
            if (!row_sampling_.empty() && row_sampling_[row].params) {  // sampled on the GPU
                const int32_t id = step_rows_.ids[row];
                if (id < 0) throw std::invalid_argument("every token has logit -inf; nothing can be sampled");
                Sampled s{slot, {id}, {step_rows_.logprobs[row]}, {}};
                if (r.n_top_logprobs > 0) {
                    std::vector<TokenLogprob> top;
                    for (int k = 0; k < r.n_top_logprobs; ++k) {
                        const SampledTop& e = step_rows_.top[row * kMaxSampledTop + k];
                        if (e.id < 0) break;
                        top.push_back(TokenLogprob{e.id, e.logprob});
                    }
                    s.top.push_back(std::move(top));
                }
                out.push_back(std::move(s));
                continue;
            }
            if (r.constrained) {
                {
                    std::lock_guard<std::mutex> lk(mu_);  // set_token_mask() writes the mask under it
                    step_mask_.clear();
                    if (r.mask_ready()) {
                        step_mask_.swap(r.mask);
                        r.mask_index = -1;  // used up: the next token waits for its own
                    }
                }
                if (step_mask_.empty()) {  // sampled once the mask arrives (sample_held); the slot sits out
                    r.held_logits.assign(logits, logits + n_vocab_);
                    continue;
                }
                Sampled s{slot, {0}, {0}, {}};
                std::vector<TokenLogprob> top;
                s.tokens[0] = sample_masked(r, logits, step_mask_, s.logprobs[0], top);
                if (r.n_top_logprobs > 0) s.top.push_back(std::move(top));
                out.push_back(std::move(s));
                continue;
            }
            Sampled s{slot, verify_draft(r.sampler, logits, r.tokens, r.draft), {}, {}};
            std::vector<TokenLogprob> top;
            for (size_t k = 0; k < s.tokens.size(); ++k) {
                s.logprobs.push_back(
                    token_logprobs(logits + k * n_vocab_, n_vocab_, s.tokens[k], r.n_top_logprobs, top));
                if (r.n_top_logprobs > 0) s.top.push_back(top);
            }
            out.push_back(std::move(s));
        } catch (const std::exception& e) {
            step_errors_[slot] = *e.what() ? e.what() : "sampling failed";
        }
    }
}

int32_t BatchEngine::sample_masked(Request& r, const float* logits, const std::vector<uint32_t>& mask,
                                   float& logprob, std::vector<TokenLogprob>& top) {
    masked_.assign(logits, logits + n_vocab_);
    apply_token_mask(masked_.data(), n_vocab_, mask);
    const int32_t token = r.sampler.sample(masked_.data(), r.tokens);
    // Under the raw logits, as unconstrained tokens: the model's own distribution.
    logprob = token_logprobs(logits, n_vocab_, token, r.n_top_logprobs, top);
    return token;
}

void BatchEngine::apply_step(const std::vector<Sampled>& sampled) {
    for (size_t t = 0; t < batch_.size(); ++t) {
        Slot& s = slots_[batch_.seq[t]];
        if (!s.request || !step_errors_[batch_.seq[t]].empty()) continue;
        if (batch_.pos[t] < s.request->n_prompt) ++prompt_tokens_total_;
        ++s.n_past;
    }
    for (int i = 0; i < params_.n_parallel; ++i)
        if (slots_[i].request && !step_errors_[i].empty()) release_slot(i, FinishReason::error, step_errors_[i]);
    for (const Sampled& s : sampled) {
        Slot& slot = slots_[s.slot];
        if (!slot.request) continue;
        Request& r = *slot.request;
        const int n_drafted = static_cast<int>(r.draft.size());
        const int n_accepted = static_cast<int>(s.tokens.size()) - 1;
        if (n_drafted > 0) {
            if (n_accepted < n_drafted) {  // the rejected draft positions leave the cache
                slot.n_past -= n_drafted - n_accepted;
                ctx_.kv_cache().seq_rm(s.slot, slot.n_past, -1);
            }
            r.drafter->record(n_drafted, n_accepted);
            r.unpolled.draft_n += n_drafted;
            r.unpolled.draft_n_accepted += n_accepted;
            draft_tokens_total_ += n_drafted;
            draft_accepted_total_ += n_accepted;
        }
        for (size_t k = 0; k < s.tokens.size(); ++k)
            if (!accept_token(s.slot, s.tokens[k], s.logprobs[k], s.top.empty() ? std::vector<TokenLogprob>()
                                                                                 : s.top[k]))
                break;
    }
}

bool BatchEngine::accept_token(int slot_id, int32_t token, float logprob, std::vector<TokenLogprob> top) {
    Request& r = *slots_[slot_id].request;
    const auto now = Clock::now();
    if (r.n_generated() == 0) r.t_prompt_done = now;
    r.unpolled.t_prompt_ms = ms_between(r.t_start, r.t_prompt_done);
    r.unpolled.t_gen_ms = ms_between(r.t_prompt_done, now);
    if (std::find(r.eog_ids.begin(), r.eog_ids.end(), token) != r.eog_ids.end()) {
        release_slot(slot_id, FinishReason::stop);
        return false;
    }
    r.tokens.push_back(token);
    if (r.drafter) r.drafter->append(&token, 1);
    r.unpolled.tokens.push_back(token);
    r.unpolled.logprobs.push_back(logprob);
    if (r.n_top_logprobs > 0) r.unpolled.top_logprobs.push_back(std::move(top));
    ++generated_tokens_total_;
    if (r.n_generated() >= r.max_tokens || static_cast<int>(r.tokens.size()) >= n_ctx_slot_) {
        release_slot(slot_id, FinishReason::length);
        return false;
    }
    return true;
}

void BatchEngine::release_slot(int slot_id, FinishReason reason, const std::string& error) {
    Slot& s = slots_[slot_id];
    const Request& r = *s.request;
    // What the cache holds of the request's tokens: cells past them (a cancelled step's, rejected
    // drafts after an end of generation) go; after an error nothing is trusted.
    const int keep = params_.keep_slot_cache && reason != FinishReason::error
                         ? std::min(s.n_past, static_cast<int>(r.tokens.size())) : 0;
    s.cached.assign(r.tokens.begin(), r.tokens.begin() + keep);
    finish(*s.request, reason, error);
    s.request.reset();
    s.n_past = keep;
    s.cancel_pending = false;
    ctx_.kv_cache().seq_rm(slot_id, keep, -1);
    kv_cells_used_ = ctx_.kv_cache().n_used();
}

void BatchEngine::finish(Request& r, FinishReason reason, const std::string& error) {
    if (r.drafter) {  // its output joins the store; the index itself is no longer needed
        r.drafter->finish();
        r.drafter.reset();
    }
    r.slot = -1;
    r.unpolled.finished = true;
    r.unpolled.finish_reason = reason;
    r.unpolled.error = error;
    events_cv_.notify_all();
}

// ---- slot actions -------------------------------------------------------------------------------

void BatchEngine::on_engine_thread(std::function<void()> fn) {
    auto task = std::make_shared<SlotTask>();
    task->fn = std::move(fn);
    std::unique_lock<std::mutex> lk(mu_);
    if (stopping_) throw std::runtime_error("the engine is shut down");
    slot_tasks_.push_back(task);
    work_cv_.notify_one();
    events_cv_.wait(lk, [&] { return task->done; });
    if (task->error) std::rethrow_exception(task->error);
}

void BatchEngine::run_slot_tasks() {
    for (; !slot_tasks_.empty(); slot_tasks_.pop_front()) {
        SlotTask& t = *slot_tasks_.front();
        try {
            t.fn();
        } catch (...) {
            t.error = std::current_exception();
        }
        t.done = true;
    }
    kv_cells_used_ = ctx_.kv_cache().n_used();
    events_cv_.notify_all();
}

BatchEngine::Slot& BatchEngine::idle_slot(int slot, bool saves_state) {
    if (slot < 0 || slot >= params_.n_parallel)
        throw std::out_of_range("slot " + std::to_string(slot) + " does not exist (there are " +
                                std::to_string(params_.n_parallel) + ")");
    const std::string why = saves_state ? ctx_.kv_state_unsupported() : "";
    if (!why.empty()) throw SlotStateUnsupported(why);
    if (slots_[slot].request) throw SlotBusy("slot " + std::to_string(slot) + " is processing a request");
    return slots_[slot];
}

SlotSnapshot BatchEngine::save_slot(int slot) {
    SlotSnapshot out;
    on_engine_thread([&] {
        const Slot& s = idle_slot(slot, true);
        out.tokens = s.cached;
        const SlotFileHeader h{kSlotMagic, static_cast<uint32_t>(n_ctx_slot_), model_fingerprint_,
                               static_cast<uint32_t>(s.cached.size()), 0};
        const std::vector<uint8_t> kv = ctx_.kv_seq_save(slot);
        out.bytes.resize(sizeof h + s.cached.size() * sizeof(int32_t));
        std::memcpy(out.bytes.data(), &h, sizeof h);
        std::memcpy(out.bytes.data() + sizeof h, s.cached.data(), s.cached.size() * sizeof(int32_t));
        out.bytes.insert(out.bytes.end(), kv.begin(), kv.end());
    });
    return out;
}

int BatchEngine::restore_slot(int slot, const std::vector<uint8_t>& bytes) {
    int n_restored = 0;
    on_engine_thread([&] {
        Slot& s = idle_slot(slot, true);
        SlotFileHeader h{};
        if (bytes.size() < sizeof h) throw std::invalid_argument("not a glmoe slot file (too short)");
        std::memcpy(&h, bytes.data(), sizeof h);
        if (h.magic != kSlotMagic) throw std::invalid_argument("not a glmoe slot file");
        if (h.model != model_fingerprint_)
            throw std::invalid_argument("the slot file was saved with another model");
        if (h.n_ctx_slot != static_cast<uint32_t>(n_ctx_slot_))
            throw std::invalid_argument("the slot file was saved with a slot context of " +
                                        std::to_string(h.n_ctx_slot) + " tokens; this server's slots hold " +
                                        std::to_string(n_ctx_slot_) + " (-c / -np)");
        if (h.n_tokens > static_cast<uint32_t>(n_ctx_slot_) ||
            bytes.size() - sizeof h < h.n_tokens * sizeof(int32_t))
            throw std::invalid_argument("the slot file is corrupt");
        std::vector<int32_t> tokens(h.n_tokens);
        std::memcpy(tokens.data(), bytes.data() + sizeof h, h.n_tokens * sizeof(int32_t));
        for (int32_t t : tokens)
            if (t < 0 || t >= n_vocab_)
                throw std::invalid_argument("the slot file is corrupt (token id out of range)");
        const size_t kv_at = sizeof h + h.n_tokens * sizeof(int32_t);
        const std::vector<uint8_t> kv(bytes.begin() + kv_at, bytes.end());
        const int n = ctx_.kv_seq_load(slot, kv, n_ctx_slot_);
        // The cells must be the tokens' positions 0..n-1 (they are strictly increasing).
        if (n != static_cast<int>(h.n_tokens) || ctx_.kv_cache().seq_pos_max(slot) != n - 1) {
            ctx_.kv_cache().seq_rm(slot, 0, -1);
            s.cached.clear();
            s.n_past = 0;
            throw std::invalid_argument("the slot file is corrupt (its cells are not its tokens' positions)");
        }
        s.cached = std::move(tokens);
        s.n_past = n;
        n_restored = n;
    });
    return n_restored;
}

int BatchEngine::erase_slot(int slot) {
    int n_erased = 0;
    on_engine_thread([&] {
        Slot& s = idle_slot(slot, false);
        n_erased = static_cast<int>(s.cached.size());
        s.cached.clear();
        s.n_past = 0;
        ctx_.kv_cache().seq_rm(slot, 0, -1);
    });
    return n_erased;
}

}  // namespace glmoe
