// The nanobind extension glmoe._core: the C++ engine as Python sees it.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstring>

#include "context.h"
#include "devices.h"
#include "ggml_types.h"
#include "gguf.h"
#include "model.h"
#include "kv_types.h"
#include "quantize_row.h"
#include "quants.h"
#include "sampling.h"
#include "thread_pool.h"

namespace nb = nanobind;
using namespace glmoe;

void bind_sampling(nb::module_& m);  // sampling_module.cpp
void bind_engine(nb::module_& m);    // engine_module.cpp
void bind_attention(nb::module_& m);  // attention_module.cpp
void bind_draft(nb::module_& m);      // draft_module.cpp
void bind_placement(nb::module_& m);  // placement_module.cpp

namespace {

nb::object gguf_value_to_python(const GGUFValue& v) {
    switch (v.type) {
        case GGUFValueType::FLOAT32:
        case GGUFValueType::FLOAT64: return nb::float_(v.f);
        case GGUFValueType::BOOL: return nb::bool_(v.i != 0);
        case GGUFValueType::STRING: return nb::bytes(v.s.data(), v.s.size());
        case GGUFValueType::UINT64: return nb::steal(PyLong_FromUnsignedLongLong(v.u));
        case GGUFValueType::ARRAY: {
            nb::list out;
            for (const auto& e : v.arr) out.append(gguf_value_to_python(e));
            return out;
        }
        default: return nb::int_(v.i);
    }
}

// Scalar metadata as strings, as llama-cpp-python's Llama.metadata holds it (arrays are left out).
nb::dict metadata_strings(const GGUFFile& f) {
    nb::dict out;
    for (const auto& [key, v] : f.metadata()) {
        std::string text;
        switch (v.type) {
            case GGUFValueType::ARRAY: continue;
            case GGUFValueType::STRING: text = v.s; break;
            case GGUFValueType::BOOL: text = v.i ? "true" : "false"; break;
            case GGUFValueType::FLOAT32:
            case GGUFValueType::FLOAT64: text = nb::cast<std::string>(nb::str(nb::float_(v.f))); break;
            case GGUFValueType::UINT64: text = std::to_string(v.u); break;
            default: text = std::to_string(v.i); break;
        }
        // A file's strings need not be valid UTF-8; they must not make loading fail.
        out[key.c_str()] = nb::steal<nb::str>(PyUnicode_DecodeUTF8(text.data(), text.size(), "replace"));
    }
    return out;
}

// Summary of a GGUF file for tests and tools: version, alignment, metadata, tensor infos.
nb::dict gguf_summary(const std::string& path, bool use_mmap) {
    auto f = GGUFFile::open(path, use_mmap);
    nb::dict meta;
    for (const auto& [key, value] : f->metadata()) meta[key.c_str()] = gguf_value_to_python(value);
    nb::list tensors;
    for (const auto& t : f->tensors()) {
        nb::list ne;
        for (int64_t n : t.ne) ne.append(n);
        tensors.append(nb::make_tuple(t.name, ne, t.type, t.offset, t.n_bytes));
    }
    nb::dict out;
    out["version"] = f->version();
    out["alignment"] = f->alignment();
    out["metadata"] = meta;
    out["tensors"] = tensors;
    return out;
}

using F32Array = nb::ndarray<float, nb::numpy, nb::c_contig>;
using ConstF32Matrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using ConstBytes = nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu>;

size_t checked_row_bytes(uint32_t type, int64_t n) {
    const TypeTraits& tr = type_traits(type);
    if (!tr.supported) throw nb::value_error(("unsupported weight type " + type_name(type)).c_str());
    if (n <= 0 || n % tr.block_size != 0)
        throw nb::value_error("row length must be a positive multiple of the type's block size");
    return row_bytes(type, n);
}

F32Array dequantize_py(uint32_t type, ConstBytes data, int64_t n_per_row) {
    const size_t rb = checked_row_bytes(type, n_per_row);
    if (data.size() % rb != 0) throw nb::value_error("data is not a whole number of rows");
    const size_t n_rows = data.size() / rb;
    float* out = new float[n_rows * n_per_row];
    nb::capsule owner(out, [](void* p) noexcept { delete[] static_cast<float*>(p); });
    for (size_t r = 0; r < n_rows; ++r)
        dequantize_row(type, data.data() + r * rb, out + r * n_per_row, n_per_row);
    return F32Array(out, {n_rows, static_cast<size_t>(n_per_row)}, owner);
}

// Each row of x in `type` (a KV cache type), as the bytes the KV cache would store.
nb::bytes quantize_py(uint32_t type, ConstF32Matrix x) {
    if (!is_kv_type(static_cast<int>(type))) throw nb::value_error(("no quantizer for " + type_name(type)).c_str());
    const int64_t n = static_cast<int64_t>(x.shape(1));
    const size_t rb = checked_row_bytes(type, n);
    std::string out(rb * x.shape(0), '\0');
    for (size_t r = 0; r < x.shape(0); ++r) quantize_row(type, x.data() + r * n, out.data() + r * rb, n);
    return nb::bytes(out.data(), out.size());
}

// y = x W^T for a weight matrix given as raw rows of `type`.
F32Array matmul_py(uint32_t type, ConstBytes weight, int64_t k, ConstF32Matrix x, int n_threads) {
    const size_t rb = checked_row_bytes(type, k);
    if (weight.size() % rb != 0) throw nb::value_error("weight is not a whole number of rows");
    if (static_cast<int64_t>(x.shape(1)) != k) throw nb::value_error("x has the wrong row length");
    const int64_t n_rows = weight.size() / rb, n_tok = x.shape(0);
    float* out = new float[n_tok * n_rows];
    nb::capsule owner(out, [](void* p) noexcept { delete[] static_cast<float*>(p); });
    {
        nb::gil_scoped_release release;
        ThreadPool pool(n_threads);
        matmul(pool, type, weight.data(), n_rows, k, x.data(), k, n_tok, out, n_rows);
    }
    return F32Array(out, {static_cast<size_t>(n_tok), static_cast<size_t>(n_rows)}, owner);
}

using I32Vector = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U8Vector = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Runs one batch; returns the logits of the flagged tokens as float32 [n_out, n_vocab].
Batch make_batch(const I32Vector& tokens, const I32Vector& pos, const I32Vector& seq, const U8Vector& want_logits) {
    Batch b;
    b.token.assign(tokens.data(), tokens.data() + tokens.shape(0));
    b.pos.assign(pos.data(), pos.data() + pos.shape(0));
    b.seq.assign(seq.data(), seq.data() + seq.shape(0));
    b.want_logits.assign(want_logits.data(), want_logits.data() + want_logits.shape(0));
    return b;
}

F32Array context_decode(Context& ctx, I32Vector tokens, I32Vector pos, I32Vector seq, U8Vector want_logits) {
    const Batch b = make_batch(tokens, pos, seq, want_logits);
    auto* logits = new std::vector<float>();
    nb::capsule owner(logits, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    {
        nb::gil_scoped_release release;
        ctx.decode(b, *logits);
    }
    const size_t width = ctx.n_outputs_per_token();
    return F32Array(logits->data(), {logits->size() / width, width}, owner);
}

std::vector<int32_t> context_decode_sample(Context& ctx, I32Vector tokens, I32Vector pos, I32Vector seq,
                                           U8Vector want_logits, float temperature, int top_k, float top_p,
                                           float min_p, std::vector<float> u) {
    const Batch b = make_batch(tokens, pos, seq, want_logits);
    std::vector<int32_t> ids;
    nb::gil_scoped_release release;
    ctx.decode_sample(b, DeviceSampling{temperature, top_k, top_p, min_p}, u, ids);
    return ids;
}

// One flagged row sampled on the device by `sampler`'s whole chain (its parameters, its next draw;
// penalties over `history`); only the id comes back. The row's sequence keeps its history on the
// device and only what changed is uploaded, so `history` is best one list growing by the tokens
// sampled, as Llama keeps it.
int32_t context_decode_sample_with(Context& ctx, I32Vector tokens, I32Vector pos, I32Vector seq, U8Vector want_logits,
                                   Sampler& sampler, I32Vector history) {
    const Batch b = make_batch(tokens, pos, seq, want_logits);
    if (std::count(b.want_logits.begin(), b.want_logits.end(), 1) != 1)
        throw nb::value_error("decode_sample_with samples one flagged row");
    if (!ctx.samples_on_gpu() || !ctx.samples_row_on_gpu(sampler.params()))
        throw nb::value_error("this context cannot sample these parameters on the device (see samples_with)");
    // Only penalties read the history: without them it is not copied (a whole context per token).
    std::vector<int32_t> hist;
    if (sampler.params().penalizes()) hist.assign(history.data(), history.data() + history.shape(0));
    RowSampling row{&sampler.params(), b.seq[std::find(b.want_logits.begin(), b.want_logits.end(), 1) -
                                             b.want_logits.begin()],
                    &hist, sampler.params().temperature > 0.0f ? sampler.uniform01() : 0.0, 0};
    Context::SampledRows out;
    {
        nb::gil_scoped_release release;
        ctx.decode_sample_rows(b, {row}, out);
    }
    if (out.ids[0] < 0) throw nb::value_error("every token has logit -inf; nothing can be sampled");
    return out.ids[0];
}

// Whether steps sampled by `sampler` can overlap (Context::begin_sampled takes no penalties).
bool context_overlaps_with(const Context& ctx, const Sampler& sampler) {
    return ctx.overlaps() && ctx.samples_row_on_gpu(sampler.params()) && !sampler.params().penalizes();
}

// Overlapped decoding of one sequence (Context::begin_sampled): one token at `pos`, its row sampled
// on the device by `sampler`'s chain and next draw. token may be sampled_token(0), the token the
// step begun just before samples.
void context_begin_sampled_with(Context& ctx, int32_t token, int32_t pos, int32_t seq, Sampler& sampler) {
    if (!context_overlaps_with(ctx, sampler))
        throw nb::value_error("this context cannot overlap these steps (see overlaps_with)");
    const Batch b{{token}, {pos}, {seq}, {1}};
    const RowSampling row{&sampler.params(), seq, nullptr,
                          sampler.params().temperature > 0.0f ? sampler.uniform01() : 0.0, 0};
    nb::gil_scoped_release release;
    ctx.begin_sampled(b, {row});
}

int32_t context_end_sampled_one(Context& ctx) {
    Context::SampledRows out;
    {
        nb::gil_scoped_release release;
        ctx.end_sampled(out);
    }
    if (out.ids.size() != 1) throw nb::value_error("end_sampled_one ended a step of several rows");
    if (out.ids[0] < 0) throw nb::value_error("every token has logit -inf; nothing can be sampled");
    return out.ids[0];
}

}  // namespace

#ifdef GLMOE_CUDA
void bind_cuda_ops(nb::module_& m);
#endif

NB_MODULE(_core, m) {
    m.doc() = "glmoe C++ engine";
    nb::exception<GGUFError>(m, "GGUFError", PyExc_ValueError);
    m.def("load_mode_maps", &load_mode_maps, nb::arg("mode"),
          "Whether llama.cpp's load mode `mode` maps the file (auto, mmap, mmap+mlock) or reads it into memory "
          "(none, mlock, dio); ValueError for another word.");
    m.def("load_mode_locks", &load_mode_locks, nb::arg("mode"),
          "Whether llama.cpp's load mode `mode` locks the file's bytes in RAM (mlock, mmap+mlock); ValueError for "
          "an unknown word.");
    m.def("gguf_summary", &gguf_summary, nb::arg("path"), nb::arg("use_mmap") = true,
          "Parse and validate a GGUF file (mapped, or read into memory); returns version, alignment, metadata and "
          "tensor infos.");
    m.def("dequantize", &dequantize_py, nb::arg("type"), nb::arg("data"), nb::arg("n_per_row"));
    m.def("quantize", &quantize_py, nb::arg("type"), nb::arg("x"),
          "Rows of a float32 matrix in `type` (a KV cache type), as bytes: what the KV cache stores.");
    m.def("kv_type_from_name", &kv_type_from_name, nb::arg("name"), nb::arg("flag"),
          "GGML id of a -ctk/-ctv name; ValueError naming `flag` and the allowed names.");
    m.def("kv_type_name", &kv_type_name, nb::arg("type"));
    m.def("kv_type_names", &kv_type_names);
    m.def("check_kv_type", &check_kv_type, nb::arg("type"), nb::arg("what"),
          "ValueError naming `what` unless `type` is -1 (the default) or a KV cache type's GGML id.");
    m.def("matmul", &matmul_py, nb::arg("type"), nb::arg("weight"), nb::arg("k"), nb::arg("x"),
          nb::arg("n_threads") = 1);
    m.def("type_name", &type_name);
    m.def("built_with_cuda", &built_with_cuda);
    m.def("sampled_token", &sampled_token, nb::arg("row"),
          "The token id placeholder for row `row` of the step begun before (begin_sampled_with).");
    m.def("cuda_device_count", &cuda_device_count);
    m.def("cuda_device_summary", &cuda_device_summary);
    bind_sampling(m);
    bind_draft(m);
    bind_attention(m);
    bind_placement(m);
#ifdef GLMOE_CUDA
    bind_cuda_ops(m);
#endif

    nb::exception<ModelError>(m, "ModelError", PyExc_ValueError);
    nb::exception<KVCacheFull>(m, "KVCacheFullError", PyExc_RuntimeError);
    nb::exception<GpuError>(m, "GpuError", PyExc_RuntimeError);

    nb::class_<Model>(m, "Model")
        .def("__init__", [](Model* self, const std::string& path, bool use_mmap, bool use_mlock) {
            std::unique_ptr<Model> loaded;
            {
                nb::gil_scoped_release release;
                loaded = Model::load(path, use_mmap, use_mlock);
            }
            new (self) Model(std::move(*loaded));
        }, nb::arg("path"), nb::arg("use_mmap") = true, nb::arg("use_mlock") = false,
        "use_mmap False: the file is read whole into the process's memory instead of mapped (--no-mmap); "
        "use_mlock True: the file's bytes, mapped or read, are locked in RAM (--mlock; a warning on stderr where "
        "mlock fails, and the model loads unlocked)")
        .def_prop_ro("mlocked", [](const Model& m) { return m.file().locked(); })
        .def_prop_ro("n_vocab", [](const Model& m) { return m.hparams().n_vocab; })
        .def_prop_ro("n_embd", [](const Model& m) { return m.hparams().n_embd; })
        .def_prop_ro("n_layer", [](const Model& m) { return m.hparams().n_layer; })
        .def_prop_ro("n_expert", [](const Model& m) { return m.hparams().n_expert; })
        .def_prop_ro("n_ctx_train", [](const Model& m) { return m.hparams().n_ctx_train; })
        .def_prop_ro("n_params", &Model::n_params)
        .def_prop_ro("n_bytes", &Model::n_bytes)
        .def_prop_ro("description", &Model::description)
        .def("metadata", [](const Model& m) { return metadata_strings(m.file()); });

    bind_engine(m);

    nb::class_<Context>(m, "Context")
        .def("__init__", [](Context* self, const Model& model, int n_ctx, int n_threads, bool embeddings,
                            bool f32_activations, int n_gpu_layers, int n_ubatch,
                            const std::vector<std::string>& tensor_overrides, int n_cpu_moe, bool cpu_moe,
                            bool cpu_as_gpu, int expert_borrow_min_tokens, double gpu_expert_share, int type_k,
                            int type_v) {
            ContextParams p;
            p.n_ctx = n_ctx;
            p.n_threads = n_threads;
            p.embeddings = embeddings;
            p.f32_activations = f32_activations;
            p.n_gpu_layers = n_gpu_layers;
            p.n_ubatch = n_ubatch;
            p.tensor_overrides = overrides_from_flags(tensor_overrides, cpu_moe, n_cpu_moe);
            p.cpu_as_gpu = cpu_as_gpu;
            p.expert_borrow_min_tokens = expert_borrow_min_tokens;
            p.gpu_expert_share = gpu_expert_share;
            p.type_k = type_k;
            p.type_v = type_v;
            nb::gil_scoped_release release;  // uploading weights takes a while
            new (self) Context(model, p);
        }, nb::arg("model"), nb::arg("n_ctx"), nb::arg("n_threads") = 0, nb::arg("embeddings") = false,
           nb::arg("f32_activations") = false, nb::arg("n_gpu_layers") = 0, nb::arg("n_ubatch") = 512,
           nb::arg("tensor_overrides") = std::vector<std::string>(), nb::arg("n_cpu_moe") = 0,
           nb::arg("cpu_moe") = false, nb::arg("cpu_as_gpu") = false,
           nb::arg("expert_borrow_min_tokens") = 0, nb::arg("gpu_expert_share") = -1.0, nb::arg("type_k") = kKVTypeDefault,
           nb::arg("type_v") = kKVTypeDefault, nb::keep_alive<1, 2>(),
           "tensor_overrides: llama.cpp -ot values (\"PATTERN=BUFFER[,...]\"); n_cpu_moe / cpu_moe: as "
           "--n-cpu-moe / --cpu-moe (placement.h); cpu_as_gpu: tests only, the GPU's share on a second CPU backend; expert_borrow_min_tokens: steps this big copy "
           "RAM-placed experts to the GPU (0: the default); gpu_expert_share: the fraction of each smaller step's routed experts "
           "in RAM the GPU runs, copied from pinned memory (< 0: the default, 0: none); type_k / type_v: KV cache types as "
           "GGML ids, as llama.cpp's -ctk/-ctv (-1: f32 on the CPU, f16 on the GPU; the GPU takes only f16).")
        .def("decode", &context_decode, nb::arg("tokens"), nb::arg("pos"), nb::arg("seq"), nb::arg("want_logits"))
        .def("decode_sample", &context_decode_sample, nb::arg("tokens"), nb::arg("pos"), nb::arg("seq"),
             nb::arg("want_logits"), nb::arg("temperature") = 0.0f, nb::arg("top_k") = 0, nb::arg("top_p") = 1.0f,
             nb::arg("min_p") = 0.0f, nb::arg("u") = std::vector<float>{})
        .def("decode_sample_with", &context_decode_sample_with, nb::arg("tokens"), nb::arg("pos"), nb::arg("seq"),
             nb::arg("want_logits"), nb::arg("sampler"), nb::arg("history"),
             "Runs the batch and samples its one flagged row on the GPU with the Sampler's chain and"
             " next draw (the token Sampler.sample would give on the same logits); returns the id.")
        .def("samples_with", [](const Context& c, const Sampler& s) {
                 return c.samples_on_gpu() && c.samples_row_on_gpu(s.params());
             }, nb::arg("sampler"), "Whether decode_sample_with takes this Sampler (the output head on the"
             " GPU; typical_p and logit_bias within the device chain's limits).")
        .def("begin_sampled_with", &context_begin_sampled_with, nb::arg("token"), nb::arg("pos"), nb::arg("seq"),
             nb::arg("sampler"),
             "Begins a step of one token (or sampled_token(0): the one the step begun before samples) whose"
             " row the device samples with the Sampler's chain and next draw; returns without waiting.")
        .def("end_sampled_one", &context_end_sampled_one,
             "Waits for the oldest step begun by begin_sampled_with and returns the token it sampled.")
        .def("overlaps_with", &context_overlaps_with, nb::arg("sampler"),
             "Whether begin_sampled_with takes this Sampler: the whole model on the GPU, parameters within"
             " the device chain, no penalties.")
        .def_prop_ro("n_pending", &Context::n_pending)
        .def_prop_ro("n_gpu_layers", &Context::n_gpu_layers)
        .def_prop_ro("kv_type_k", &Context::kv_type_k_name,
                     "The K cache's type (\"q8_0\"; \"f32/f16\" if CPU and GPU differ).")
        .def_prop_ro("kv_type_v", &Context::kv_type_v_name, "The V cache's type, as kv_type_k.")
        .def_prop_ro("kv_bytes", &Context::kv_bytes, "Bytes of the KV cache on every device together.")
        .def("placement_summary", &Context::placement_summary,
             "What went where, in llama.cpp's words: offloaded layers and buffer sizes per device.")
        .def("placement", [](const Context& c) {
            nb::list out;
            for (const auto& [name, device] : c.placement().tensors) out.append(nb::make_tuple(name, buffer_name(device)));
            return out;
        }, "Every tensor's (name, \"CPU\" | \"CUDA0\"), in file order.")
        .def_prop_ro("samples_on_gpu", &Context::samples_on_gpu)
        .def_prop_ro("invariant_batch", &Context::invariant_batch)
        .def("relative_step_costs",
             [](const Context& c, int base, int max_extra) { return c.step_costs().relative(base, max_extra); },
             nb::arg("base"), nb::arg("max_extra"),
             "[cost(base + k) / cost(base) for k in 0..max_extra]: steps by size, timed as they ran.")
        .def("gpu_counters", [](const Context& c) {
            nb::dict d;
            if (const CudaBackend* g = c.gpu()) {
                const GpuCounters& k = g->counters();
                d["steps"] = k.steps;
                d["graph_replays"] = k.graph_replays;
                d["graph_captures"] = k.graph_captures;
                d["device_to_host_copies"] = k.device_to_host_copies;
                d["host_syncs"] = k.host_syncs;
                const GpuMemory mem = g->memory();
                d["device_bytes"] = mem.weights + mem.kv + mem.compute;
                d["weight_bytes"] = mem.weights;
                d["kv_bytes"] = mem.kv;
                d["compute_bytes"] = mem.compute;
            }
            return d;
        })
        .def_prop_ro("n_ctx", [](Context& c) { return c.kv_cache().n_ctx(); })
        .def_prop_ro("n_threads", &Context::n_threads)
        .def_prop_ro("kv_used", [](Context& c) { return c.kv_cache().n_used(); })
        .def_prop_ro("n_evaluated", &Context::n_evaluated)
        .def("kv_seq_rm", [](Context& c, int seq, int p0, int p1) { c.kv_cache().seq_rm(seq, p0, p1); },
             nb::arg("seq"), nb::arg("p0"), nb::arg("p1"))
        .def("kv_seq_cp", [](Context& c, int src, int dst, int p0, int p1) { c.kv_cache().seq_cp(src, dst, p0, p1); },
             nb::arg("src"), nb::arg("dst"), nb::arg("p0"), nb::arg("p1"))
        .def("kv_seq_keep", [](Context& c, int seq) { c.kv_cache().seq_keep(seq); }, nb::arg("seq"))
        .def("kv_seq_pos_max", [](Context& c, int seq) { return c.kv_cache().seq_pos_max(seq); }, nb::arg("seq"))
        .def("kv_clear", [](Context& c) { c.kv_cache().clear(); })
        // The KV cache's per-sequence index, read-only, and its allocator without a forward: for
        // tests and benchmarks of the cache's bookkeeping (kv_allocate leaves the cells' K/V as they were).
        .def("kv_seq_cells", [](Context& c, int seq) { return c.kv_cache().seq_cells(seq); }, nb::arg("seq"))
        .def("kv_seq_epoch", [](Context& c, int seq) { return c.kv_cache().seq_epoch(seq); }, nb::arg("seq"))
        .def("kv_allocate", [](Context& c, const std::vector<int32_t>& seq, const std::vector<int32_t>& pos) {
            if (seq.size() != pos.size()) throw std::invalid_argument("seq and pos differ in length");
            return c.kv_cache().allocate(seq, pos);
        }, nb::arg("seq"), nb::arg("pos"))
        .def("kv_state", [](Context& c) {
            const std::vector<uint8_t> bytes = c.kv_save();
            return nb::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
        })
        .def("kv_load_state", [](Context& c, nb::bytes state) {
            const uint8_t* p = static_cast<const uint8_t*>(state.data());
            c.kv_load(std::vector<uint8_t>(p, p + state.size()));
        }, nb::arg("state"))
        .def("kv_seq_state", [](Context& c, int seq) {
            const std::vector<uint8_t> bytes = c.kv_seq_save(seq);
            return nb::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
        }, nb::arg("seq"), "One sequence's cells and their K/V rows (what a server slot file holds after its tokens).")
        .def("kv_seq_load_state", [](Context& c, int seq, nb::bytes state, int max_cells) {
            const uint8_t* p = static_cast<const uint8_t*>(state.data());
            return c.kv_seq_load(seq, std::vector<uint8_t>(p, p + state.size()), max_cells);
        }, nb::arg("seq"), nb::arg("state"), nb::arg("max_cells"),
             "Replaces sequence seq's cells with kv_seq_state's bytes (at most max_cells); returns the cells.");
}
