// Continuous batching, as llama-server's slots do it: one engine thread owns a Context whose KV
// cache is split into n_parallel slots (sequence id = slot index, n_ctx / n_parallel positions
// each). Every step runs one batch holding a decode token for each generating slot and prompt
// chunks of prefilling slots, so new prompts enter between decode steps without stalling the
// others. Requests beyond n_parallel wait in a FIFO queue. All public methods are thread-safe.
// A constrained request (grammar) samples each token under an allowed-token mask that its owner
// supplies (set_token_mask) while the step runs; a late mask defers only that request's sampling.
// A request may ask for the most likely tokens at each generated position (top logprobs), which
// only it pays for.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "context.h"
#include "sampling.h"
#include "suffix_draft.h"

namespace glmoe {

struct EngineParams {
    int n_ctx = 4096;     // KV cells in all
    int n_parallel = 1;   // slots: sequences decoded concurrently
    int n_threads = 0;    // 0: every hardware thread
    int n_batch = 512;    // tokens per step (decode tokens first, prompt chunks fill the rest)
    int n_gpu_layers = 0; // as ContextParams
    std::vector<TensorOverride> tensor_overrides;  // as ContextParams (-ot, --cpu-moe, --n-cpu-moe)
    int type_k = kKVTypeDefault;  // as ContextParams (-ctk)
    int type_v = kKVTypeDefault;  // as ContextParams (-ctv)
    // Suffix decoding: a generating slot with a draft verifies it in the same step, as 1 + n_draft
    // positions; requests share one SuffixStore of earlier outputs.
    bool spec_suffix = false;
    SuffixDraftParams spec;
    size_t spec_store_bytes = 64 << 20;
    // Idle slots keep the cache of their last request (llama-server's slots, which save and restore
    // act on); a request then goes to the idle slot sharing the longest prompt prefix and reuses it.
    bool keep_slot_cache = false;
    // Overlapped decoding (BatchEngine::run_overlapped) where the step allows it; false: every step
    // waits for the previous one's tokens (the same output; for measuring the difference).
    bool overlap = true;
};

// Slot actions (save_slot, restore_slot, erase_slot) on a slot that serves a request.
struct SlotBusy : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// Slot state of a placement that cannot save it (its CPU and GPU layers store different KV types).
struct SlotStateUnsupported : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// What save_slot() hands over: the slot's cached tokens, and them with their K/V cells as bytes.
struct SlotSnapshot {
    std::vector<int32_t> tokens;
    std::vector<uint8_t> bytes;
};

enum class FinishReason { none, stop, length, cancelled, error };

// The most top logprobs a request may ask for per token (OpenAI's top_logprobs limit).
constexpr int kMaxTopLogprobs = 20;

struct TokenLogprob {
    int32_t id;
    float logprob;
};
const char* finish_reason_name(FinishReason r);  // nullptr for none

// What poll() hands over: the output since the previous poll, and the request's progress.
struct RequestEvent {
    std::vector<int32_t> tokens;
    std::vector<float> logprobs;  // log-softmax of each token under the raw logits
    // Per token (for requests that asked): the top_logprobs most likely tokens under the same raw
    // logits (before logit bias, penalties and grammar masks), most likely first, ties by lower id.
    std::vector<std::vector<TokenLogprob>> top_logprobs;
    bool finished = false;
    FinishReason finish_reason = FinishReason::none;
    std::string error;            // set when finish_reason is error
    int n_prompt = 0;
    int n_cached = 0;  // prompt tokens whose K/V a kept slot cache already held (not evaluated)
    int n_generated = 0;
    double t_prompt_ms = 0;
    double t_gen_ms = 0;
    int64_t draft_n = 0;           // draft tokens verified, over the whole request
    int64_t draft_n_accepted = 0;  // of those, accepted
};

struct EngineStats {
    int n_parallel, n_ctx, n_ctx_slot;
    int requests_waiting, requests_running;
    int kv_cells_used, kv_cells_total;
    uint64_t prompt_tokens_total, generated_tokens_total, decode_steps_total;
    uint64_t overlapped_steps_total;  // steps begun before the previous step's tokens were read
    double t_busy_ms_total;
    uint64_t draft_tokens_total, draft_accepted_total;
};

enum class SlotState { idle, prefill, generating };
const char* slot_state_name(SlotState s);

struct SlotInfo {
    int id;
    SlotState state;
    int64_t request_id;  // -1 when idle
    int n_prompt, n_past, n_generated;
};

class BatchEngine {
public:
    // Throws std::invalid_argument for bad parameters.
    BatchEngine(const Model& model, const EngineParams& params);
    ~BatchEngine();  // shutdown()
    BatchEngine(const BatchEngine&) = delete;
    BatchEngine& operator=(const BatchEngine&) = delete;

    // Queues a request; returns its id. max_tokens <= 0: up to the slot context. Throws
    // std::invalid_argument for an empty prompt, token ids out of range, bad sampling parameters
    // or a prompt that leaves no room to generate in a slot; std::runtime_error after shutdown().
    // draft = false opts the request out of speculative drafting (when the engine has it on).
    // A non-empty token_mask makes the request constrained (grammars): it is the allowed-token
    // bitmask of its first generated token (bit t % 32 of word t / 32; mask_words() words), and
    // each later token waits for set_token_mask(). Constrained requests never draft.
    // top_logprobs in [0, kMaxTopLogprobs]: how many most likely tokens each event reports per token.
    int64_t submit(std::vector<int32_t> prompt, int max_tokens, std::vector<int32_t> eog_ids,
                   const SamplingParams& sampling, bool draft = true, std::vector<uint32_t> token_mask = {},
                   int top_logprobs = 0);

    // The allowed tokens of a constrained request's generated token number `index` (0-based),
    // which must be the next one it samples. Tokens outside the mask get logit -inf before the
    // sampler runs. Until it arrives that request's sampling is deferred (its logits kept) and
    // its slot sits out the steps; the other slots go on. False for an unknown or finished
    // request; std::invalid_argument for a wrong size or index, or an unconstrained request.
    bool set_token_mask(int64_t id, int index, std::vector<uint32_t> mask);
    int mask_words() const { return (n_vocab_ + 31) / 32; }

    // Waits up to timeout_s for new output or the end of the request, then takes what there is.
    // nullopt for an unknown id; a request is forgotten once a poll has reported it finished.
    std::optional<RequestEvent> poll(int64_t id, double timeout_s);

    // Finishes the request (reason cancelled) and frees its slot and KV cells before returning
    // (waiting out the step in flight, if any). The request is then forgotten unless a poll is
    // waiting on it, which gets the final event. Unknown ids are ignored; so are finished ones,
    // except that they are forgotten too, so that an abandoned request can always be dropped.
    void cancel(int64_t id);

    EngineStats stats() const;
    // Where the model's parts run and the buffer sizes per device (Context::placement_summary; fixed at load).
    std::string placement_summary() const { return ctx_.placement_summary(); }
    // The KV cache's types by name and its bytes (Context's; fixed at load).
    std::string kv_type_k() const { return ctx_.kv_type_k_name(); }
    std::string kv_type_v() const { return ctx_.kv_type_v_name(); }
    size_t kv_bytes() const { return ctx_.kv_bytes(); }
    std::vector<SlotInfo> slots() const;
    // The GPU backend's step counters (zero without one): what a step copies to the host and waits for.
    GpuCounters gpu_counters();

    // llama-server's slot actions, run on the engine thread between steps so that no step sees a
    // half-restored slot. std::out_of_range for a bad slot id, SlotBusy while the slot serves a
    // request, SlotStateUnsupported where the CPU's and the GPU's layers store different KV types
    // (Context::kv_state_unsupported). save_slot's bytes name the model
    // (a fingerprint of its tensors), the slot context and the KV types; restore_slot replaces the
    // slot's cache with them and returns the tokens restored, throwing std::invalid_argument (slot
    // unchanged) for bytes from another model, slot context or KV types. erase_slot empties the
    // slot's cache and returns the tokens it held.
    SlotSnapshot save_slot(int slot);
    int restore_slot(int slot, const std::vector<uint8_t>& bytes);
    int erase_slot(int slot);

    // Stops the engine thread, finishing every unfinished request as cancelled. Idempotent.
    void shutdown();

private:
    using Clock = std::chrono::steady_clock;

    struct Request {
        int64_t id;                   // set when queued
        std::vector<int32_t> tokens;  // prompt then generated: the penalty history
        int n_prompt;
        int max_tokens;
        std::vector<int32_t> eog_ids;
        Sampler sampler;
        int slot = -1;
        int n_pollers = 0;            // polls waiting on it; cancel() leaves it to them
        RequestEvent unpolled;        // tokens/logprobs not yet handed over, and the status
        Clock::time_point t_start, t_prompt_done;  // slot taken; first token sampled
        std::unique_ptr<SuffixDrafter> drafter;    // null: no drafting; holds tokens, kept in step
        std::vector<int32_t> draft;                // this step's draft, after tokens.back()
        // Constrained decoding: `mask` allows the tokens of generated token number mask_index
        // (-1: none yet). held_logits, when not empty, is the logits row of that token, whose
        // sampling waits for its mask; the slot's tokens are all in the cache meanwhile.
        bool constrained = false;
        std::vector<uint32_t> mask;
        int mask_index = -1;
        std::vector<float> held_logits;
        int n_top_logprobs = 0;
        int n_cached = 0;  // prompt tokens reused from the slot's kept cache

        bool held() const { return !held_logits.empty(); }
        bool mask_ready() const { return mask_index == n_generated(); }

        Request(int64_t id, std::vector<int32_t> prompt, int max_tokens, std::vector<int32_t> eog,
                const SamplingParams& sp, int n_vocab);
        int n_generated() const { return static_cast<int>(tokens.size()) - n_prompt; }
    };
    using RequestPtr = std::shared_ptr<Request>;

    struct Slot {
        RequestPtr request;  // null: idle
        int n_past = 0;      // positions in the KV cache
        bool cancel_pending = false;
        std::vector<int32_t> cached;  // idle: the tokens at positions 0.. whose K/V its cells hold
        SlotState state() const;
    };

    // A slot's output of a step, computed outside the lock: the accepted draft tokens, then one
    // more (just the sampled token when there was no draft).
    struct Sampled {
        int slot;
        std::vector<int32_t> tokens;
        std::vector<float> logprobs;
        std::vector<std::vector<TokenLogprob>> top;  // empty unless the request asked for top logprobs
    };

    void run();
    // Runs fn on the engine thread between steps (under mu_) and waits for it; rethrows its exception.
    void on_engine_thread(std::function<void()> fn);
    void run_slot_tasks();
    // Throws std::out_of_range, SlotBusy, and for saves_state SlotStateUnsupported.
    Slot& idle_slot(int slot, bool saves_state);
    // The idle slot for a request with this prompt: the longest shared prefix, then the least cached.
    int pick_slot(const std::vector<int32_t>& prompt) const;
    bool has_work() const;
    void start_waiting_requests();
    // Fills batch_ and logit_slots_ (the slot of each logits row; a slot's rows are adjacent).
    void build_batch();
    // Runs batch_. A failed decode leaves the cache unchanged, so a failed batch of several
    // sequences is retried one sequence at a time: only those whose own tokens fail get an error.
    void decode_step();
    // A step's results per logits row: logits for the rows sampled here, the token, its logprob
    // and top logprobs for the rows the GPU sampled.
    struct StepRows {
        std::vector<float> logits;      // rows x n_vocab (GPU-sampled rows: unset)
        std::vector<int32_t> ids;
        std::vector<float> logprobs;
        std::vector<SampledTop> top;    // rows x kMaxSampledTop
    };
    // Which rows the GPU samples (row_sampling_; empty when the context cannot), drawing their u.
    void plan_gpu_sampling();
    // The sampling of the slot's next token on the GPU (draws its u).
    RowSampling row_sampling_of(int slot);
    // Overlapped decoding (Context::begin_sampled): a step of one GPU-sampled token per slot, no
    // penalties or drafts, is followed by the next one (each slot a token further, its token the
    // one this step samples) before this step's tokens reach the host, as long as nothing else
    // waits for the engine (a new request, a slot action, a cancel, shutdown, gpu_counters).
    bool overlappable() const;
    // The step to begin after batch_ (under mu_); false when the overlapped run should end.
    bool next_overlapped(Batch& next, std::vector<int>& next_slots) const;
    // Runs batch_ and the steps begun after it, each step's tokens applied while the next one
    // runs; returns with mu_ held and no step in flight, or false (mu_ not held, nothing run)
    // when batch_ could not begin so.
    bool run_overlapped(std::unique_lock<std::mutex>& lk, Clock::time_point t0);
    // A step's bookkeeping once its tokens are known (under mu_): timing, cancels, apply_step.
    void end_step(const std::vector<Sampled>& sampled, Clock::time_point t0);
    bool try_decode(const Batch& batch, const std::vector<RowSampling>& rows, StepRows& out, std::string& error);
    // The rows [first, first + n) of `from` into `to` at row `at`.
    void copy_rows(const StepRows& from, size_t first, size_t n, StepRows& to, size_t at) const;
    void sample_outputs(std::vector<Sampled>& out);
    // A constrained request's token from `logits` with the tokens outside `mask` at -inf; its
    // logprob and top logprobs (if asked) under the unmasked logits.
    int32_t sample_masked(Request& r, const float* logits, const std::vector<uint32_t>& mask, float& logprob,
                          std::vector<TokenLogprob>& top);
    // Samples the held rows whose masks have arrived (under mu_: one row each, O(n_vocab)).
    void sample_held();
    void apply_step(const std::vector<Sampled>& sampled);
    // False when the token finished the request (and freed its slot).
    bool accept_token(int slot_id, int32_t token, float logprob, std::vector<TokenLogprob> top = {});
    // Finishes the slot's request, frees the slot and its KV cells, wakes pollers.
    void release_slot(int slot_id, FinishReason reason, const std::string& error = {});
    void finish(Request& r, FinishReason reason, const std::string& error = {});

    const Model& model_;
    const EngineParams params_;
    const int n_ctx_slot_;
    const int n_vocab_;
    Context ctx_;  // touched only by the engine thread, or under mu_ while no step is in flight
    const std::shared_ptr<SuffixStore> spec_store_;  // null: no drafting
    const uint64_t model_fingerprint_;  // what a saved slot names its model by

    struct SlotTask {
        std::function<void()> fn;
        bool done = false;
        std::exception_ptr error;
    };
    std::deque<std::shared_ptr<SlotTask>> slot_tasks_;  // under mu_

    mutable std::mutex mu_;
    std::condition_variable work_cv_;    // engine thread: new request, cancel, shutdown
    std::condition_variable events_cv_;  // pollers and cancel(): output, finished requests, step end
    std::unordered_map<int64_t, RequestPtr> requests_;
    std::deque<RequestPtr> waiting_;
    std::vector<Slot> slots_;
    int64_t next_id_ = 1;
    bool stopping_ = false;
    bool step_in_flight_ = false;  // the engine thread is decoding or sampling without mu_
    int between_steps_wanted_ = 0; // callers waiting for no step in flight: overlapped runs end
    int kv_cells_used_ = 0;        // cached so stats() does not read the cache during a step
    int prefill_cursor_ = 0;       // slot where the next step's prompt chunks start

    uint64_t prompt_tokens_total_ = 0, generated_tokens_total_ = 0, decode_steps_total_ = 0;
    uint64_t overlapped_steps_total_ = 0;
    uint64_t draft_tokens_total_ = 0, draft_accepted_total_ = 0;
    double t_busy_ms_total_ = 0;

    // Step scratch, engine thread only.
    Batch batch_;
    std::vector<int> logit_slots_;
    std::vector<std::string> step_errors_;  // per slot; empty: no error
    std::vector<RowSampling> row_sampling_;  // per logits row; params null: sampled on the host
    StepRows step_rows_;
    Context::SampledRows gpu_rows_;
    std::vector<float> masked_;        // a constrained slot's logits row with its mask applied
    std::vector<uint32_t> step_mask_;  // its mask, taken from the request under mu_

    std::once_flag shutdown_once_;
    std::thread thread_;
};

}  // namespace glmoe
