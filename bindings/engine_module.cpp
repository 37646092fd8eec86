// glmoe._core.BatchEngine: the continuous-batching engine that the HTTP server stands on.
// Every method that may wait releases the GIL, so that a server's thread pool can call them at once.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <limits>

#include "engine.h"
#include "placement.h"
#include "sampling_args.h"

namespace nb = nanobind;
using namespace glmoe;

namespace {

using I32Tokens = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using TokenMask = nb::ndarray<const uint32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

std::vector<uint32_t> mask_vector(const TokenMask& mask) {
    return std::vector<uint32_t>(mask.data(), mask.data() + mask.shape(0));
}

// A list of ints or an int32 array. Ids beyond int32 are reported like any out-of-range id.
std::vector<int32_t> token_vector(nb::handle tokens) {
    I32Tokens array;
    if (nb::try_cast(tokens, array, /*convert=*/false))
        return std::vector<int32_t>(array.data(), array.data() + array.shape(0));
    std::vector<int32_t> out;
    for (nb::handle t : nb::iter(tokens)) {
        const int64_t id = nb::cast<int64_t>(t);
        out.push_back(id < 0 || id > std::numeric_limits<int32_t>::max() ? -1 : static_cast<int32_t>(id));
        if (out.back() < 0 && id >= 0)
            throw nb::value_error(("token id " + std::to_string(id) + " out of range").c_str());
    }
    return out;
}

nb::object optional_str(const char* s) { return s ? nb::object(nb::str(s)) : nb::none(); }

nb::dict event_dict(const RequestEvent& ev) {
    nb::dict d;
    nb::list tokens, logprobs;
    for (int32_t t : ev.tokens) tokens.append(t);
    for (float p : ev.logprobs) logprobs.append(static_cast<double>(p));
    d["tokens"] = tokens;
    d["logprobs"] = logprobs;
    if (!ev.top_logprobs.empty()) {  // only requests that asked for them have any
        nb::list top;
        for (const std::vector<TokenLogprob>& candidates : ev.top_logprobs) {
            nb::list row;
            for (const TokenLogprob& t : candidates) row.append(nb::make_tuple(t.id, static_cast<double>(t.logprob)));
            top.append(row);
        }
        d["top_logprobs"] = top;
    }
    d["finished"] = ev.finished;
    d["finish_reason"] = optional_str(finish_reason_name(ev.finish_reason));
    d["error"] = ev.finish_reason == FinishReason::error ? nb::object(nb::str(ev.error.c_str())) : nb::none();
    d["n_prompt"] = ev.n_prompt;
    d["n_cached"] = ev.n_cached;
    d["n_generated"] = ev.n_generated;
    d["t_prompt_ms"] = ev.t_prompt_ms;
    d["t_gen_ms"] = ev.t_gen_ms;
    d["draft_n"] = ev.draft_n;
    d["draft_n_accepted"] = ev.draft_n_accepted;
    return d;
}

}  // namespace

void bind_engine(nb::module_& m) {
    nb::exception<SlotBusy>(m, "SlotBusyError", PyExc_RuntimeError);
    nb::exception<SlotStateUnsupported>(m, "SlotStateUnsupportedError", PyExc_NotImplementedError);
    nb::class_<BatchEngine>(m, "BatchEngine",
                            "Continuous batching over n_parallel slots of n_ctx // n_parallel positions"
                            " each, run by a C++ thread; requests beyond n_parallel queue in FIFO order.")
        .def("__init__",
             [](BatchEngine* self, const Model& model, int n_ctx, int n_parallel, int n_threads, int n_batch,
                bool spec_suffix, int spec_max_depth, float spec_max_spec_factor, float spec_min_token_prob,
                bool spec_adaptive, int n_gpu_layers, const std::vector<std::string>& tensor_overrides,
                int n_cpu_moe, bool cpu_moe, int type_k, int type_v, bool keep_slot_cache, bool overlap) {
                 EngineParams p{n_ctx, n_parallel, n_threads, n_batch};
                 p.type_k = type_k;
                 p.type_v = type_v;
                 p.keep_slot_cache = keep_slot_cache;
                 p.overlap = overlap;
                 p.n_gpu_layers = n_gpu_layers;
                 p.tensor_overrides = overrides_from_flags(tensor_overrides, cpu_moe, n_cpu_moe);
                 p.spec_suffix = spec_suffix;
                 p.spec.max_depth = spec_max_depth;
                 p.spec.max_spec_factor = spec_max_spec_factor;
                 p.spec.min_token_prob = spec_min_token_prob;
                 p.spec.adaptive = spec_adaptive;
                 new (self) BatchEngine(model, p);
             },
             nb::arg("model"), nb::arg("n_ctx"), nb::arg("n_parallel") = 1, nb::arg("n_threads") = 0,
             nb::arg("n_batch") = 512, nb::arg("spec_suffix") = false, nb::arg("spec_max_depth") = 64,
             nb::arg("spec_max_spec_factor") = 1.0f, nb::arg("spec_min_token_prob") = 0.1f,
             nb::arg("spec_adaptive") = true, nb::arg("n_gpu_layers") = 0,
             nb::arg("tensor_overrides") = std::vector<std::string>(), nb::arg("n_cpu_moe") = 0,
             nb::arg("cpu_moe") = false, nb::arg("type_k") = kKVTypeDefault, nb::arg("type_v") = kKVTypeDefault,
             nb::arg("keep_slot_cache") = false, nb::arg("overlap") = true, nb::keep_alive<1, 2>(),
             "type_k / type_v: KV cache types as GGML ids (-1: f32 on the CPU, f16 on the GPU); "
             "spec_suffix: suffix decoding, each generating slot verifying its draft within the step;"
             " spec_adaptive=False verifies every draft whole (SuffixDecoding's adaptive)."
             " tensor_overrides: -ot values (\"PATTERN=BUFFER[,...]\"), n_cpu_moe / cpu_moe: --n-cpu-moe /"
             " --cpu-moe; a bad one raises PlacementError (a ValueError). keep_slot_cache: idle slots keep"
             " their last request's cache, reused by a request sharing its prompt prefix (slot save/restore)."
             " overlap=False: never begin a step before the previous one's tokens are read (the same output;"
             " for measuring what overlapping gains).")
        .def("submit",
             [](BatchEngine& e, nb::handle tokens, int max_tokens, std::vector<int32_t> eog_ids,
                float temperature, int top_k, float top_p, float min_p, float typical_p,
                float repeat_penalty, int repeat_last_n, float presence_penalty, float frequency_penalty,
                std::optional<std::map<int32_t, float>> logit_bias, std::optional<int64_t> seed, bool draft,
                std::optional<TokenMask> token_mask, int top_logprobs) {
                 const SamplingParams sp = make_sampling_params(
                     temperature, top_k, top_p, min_p, typical_p, repeat_penalty, repeat_last_n,
                     presence_penalty, frequency_penalty, logit_bias, seed);
                 std::vector<int32_t> prompt = token_vector(tokens);
                 std::vector<uint32_t> mask = token_mask ? mask_vector(*token_mask) : std::vector<uint32_t>();
                 if (token_mask && mask.empty()) throw nb::value_error("token_mask is empty");
                 nb::gil_scoped_release release;
                 return e.submit(std::move(prompt), max_tokens, std::move(eog_ids), sp, draft, std::move(mask),
                                 top_logprobs);
             },
             nb::arg("tokens"), nb::arg("max_tokens") = 0, nb::arg("eog_ids") = std::vector<int32_t>(),
             GLMOE_SAMPLING_KWARGS, nb::arg("draft") = true, nb::arg("token_mask") = nb::none(),
             nb::arg("top_logprobs") = 0,
             "Queues a request; returns its id. max_tokens <= 0: up to the slot context. draft=False: no"
             " speculative drafts for this request. token_mask (uint32 array of mask_words, bit t % 32 of"
             " word t // 32 allows token t): a constrained request, this being its first token's mask; each"
             " later token waits for set_token_mask. top_logprobs=N (0..20): each event also has"
             " \"top_logprobs\", per token its N most likely (id, logprob) under the raw logits, most likely first.")
        .def("set_token_mask",
             [](BatchEngine& e, int64_t id, int index, const TokenMask& mask) {
                 std::vector<uint32_t> words = mask_vector(mask);
                 nb::gil_scoped_release release;
                 return e.set_token_mask(id, index, std::move(words));
             },
             nb::arg("request_id"), nb::arg("index"), nb::arg("token_mask"),
             "The allowed tokens of a constrained request's generated token number index (its next one);"
             " False when the request is unknown or finished. Until it is set, that request alone waits.")
        .def_prop_ro("mask_words", &BatchEngine::mask_words, "uint32 words in a token mask: ceil(n_vocab / 32).")
        .def("poll",
             [](BatchEngine& e, int64_t id, double timeout) {
                 std::optional<RequestEvent> ev;
                 {
                     nb::gil_scoped_release release;
                     ev = e.poll(id, timeout);
                 }
                 if (!ev) throw nb::key_error(("unknown request " + std::to_string(id)).c_str());
                 return event_dict(*ev);
             },
             nb::arg("request_id"), nb::arg("timeout") = 0.0,
             "Waits up to timeout seconds for new tokens or the end; a finished request is then forgotten.")
        .def("cancel", &BatchEngine::cancel, nb::arg("request_id"), nb::call_guard<nb::gil_scoped_release>(),
             "Finishes the request and frees its slot and KV cells before returning; unknown ids are ignored.")
        .def("placement_summary", &BatchEngine::placement_summary,
             "Where the model's parts run and the buffer sizes per device, in llama.cpp's words.")
        .def_prop_ro("kv_type_k", &BatchEngine::kv_type_k,
                     "The K cache's type (\"q8_0\"; \"f32/f16\" if CPU and GPU differ).")
        .def_prop_ro("kv_type_v", &BatchEngine::kv_type_v, "The V cache's type, as kv_type_k.")
        .def_prop_ro("kv_bytes", &BatchEngine::kv_bytes, "Bytes of the KV cache on every device together.")
        .def("gpu_counters",
             [](BatchEngine& e) {
                 GpuCounters k;
                 {
                     nb::gil_scoped_release release;
                     k = e.gpu_counters();
                 }
                 nb::dict d;
                 d["steps"] = k.steps;
                 d["device_to_host_copies"] = k.device_to_host_copies;
                 d["host_syncs"] = k.host_syncs;
                 return d;
             },
             "The GPU backend's step counters (zeros without a GPU); read them while no request runs.")
        .def("stats",
             [](const BatchEngine& e) {
                 const EngineStats s = e.stats();
                 nb::dict d;
                 d["n_parallel"] = s.n_parallel;
                 d["n_ctx"] = s.n_ctx;
                 d["n_ctx_slot"] = s.n_ctx_slot;
                 d["requests_waiting"] = s.requests_waiting;
                 d["requests_running"] = s.requests_running;
                 d["kv_cells_used"] = s.kv_cells_used;
                 d["kv_cells_total"] = s.kv_cells_total;
                 d["prompt_tokens_total"] = s.prompt_tokens_total;
                 d["generated_tokens_total"] = s.generated_tokens_total;
                 d["decode_steps_total"] = s.decode_steps_total;
                 d["overlapped_steps_total"] = s.overlapped_steps_total;
                 d["t_busy_ms_total"] = s.t_busy_ms_total;
                 d["draft_tokens_total"] = s.draft_tokens_total;
                 d["draft_accepted_total"] = s.draft_accepted_total;
                 return d;
             })
        .def("slots",
             [](const BatchEngine& e) {
                 nb::list out;
                 for (const SlotInfo& s : e.slots()) {
                     nb::dict d;
                     d["id"] = s.id;
                     d["state"] = slot_state_name(s.state);
                     d["request_id"] = s.request_id >= 0 ? nb::object(nb::int_(s.request_id)) : nb::none();
                     d["n_prompt"] = s.n_prompt;
                     d["n_past"] = s.n_past;
                     d["n_generated"] = s.n_generated;
                     out.append(d);
                 }
                 return out;
             })
        .def("save_slot",
             [](BatchEngine& e, int slot) {
                 SlotSnapshot snap;
                 {
                     nb::gil_scoped_release release;
                     snap = e.save_slot(slot);
                 }
                 nb::list tokens;
                 for (int32_t t : snap.tokens) tokens.append(t);
                 return nb::make_tuple(tokens, nb::bytes(reinterpret_cast<const char*>(snap.bytes.data()),
                                                         snap.bytes.size()));
             },
             nb::arg("slot"),
             "(tokens, state bytes) of an idle slot's cache, taken between steps. IndexError: no such slot;"
             " SlotBusyError: it serves a request; SlotStateUnsupportedError: CPU and GPU layers"
             " storing different KV types (-ctk/-ctv give both one type).")
        .def("restore_slot",
             [](BatchEngine& e, int slot, nb::bytes state) {
                 const auto* p = static_cast<const uint8_t*>(state.data());
                 std::vector<uint8_t> bytes(p, p + state.size());
                 nb::gil_scoped_release release;
                 return e.restore_slot(slot, bytes);
             },
             nb::arg("slot"), nb::arg("state"),
             "Replaces an idle slot's cache with save_slot's bytes; returns the tokens restored. ValueError"
             " (slot unchanged) for bytes of another model, slot context or KV types; else as save_slot.")
        .def("erase_slot", &BatchEngine::erase_slot, nb::arg("slot"), nb::call_guard<nb::gil_scoped_release>(),
             "Empties an idle slot's cache; returns the tokens it held. IndexError, SlotBusyError as save_slot.")
        .def("shutdown", &BatchEngine::shutdown, nb::call_guard<nb::gil_scoped_release>(),
             "Stops the engine thread; unfinished requests finish as cancelled.");
}
