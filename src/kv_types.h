// The element types the KV cache can store, as llama.cpp's -ctk/-ctv (--cache-type-k/-v) name
// them and llama-cpp-python's type_k/type_v number them (GGML type ids).
#pragma once
#include <cstdint>
#include <string>

#include "ggml_types.h"

namespace glmoe {

// ContextParams::type_k / type_v when the user gives none: each device keeps its own type
// (f32 on the CPU, f16 on the GPU).
constexpr int kKVTypeDefault = -1;

struct KVTypes {
    uint32_t k = GGML_TYPE_F32;
    uint32_t v = GGML_TYPE_F32;
};

bool is_kv_type(int type);
// "q8_0"; for a type that is not a KV type, type_name()'s spelling.
std::string kv_type_name(uint32_t type);
// "f32, f16, bf16, q8_0, q4_0"
std::string kv_type_names();
// The id of a -ctk/-ctv name (as llama.cpp, case-sensitive); std::invalid_argument, naming `flag`
// and the allowed names, for any other.
uint32_t kv_type_from_name(const std::string& name, const std::string& flag);
// std::invalid_argument naming `what` (e.g. "type_k") unless `type` is kKVTypeDefault or a KV type.
void check_kv_type(int type, const std::string& what);

}  // namespace glmoe
