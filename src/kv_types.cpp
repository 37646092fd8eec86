#include "kv_types.h"

#include <stdexcept>

namespace glmoe {

namespace {

struct KVTypeName {
    uint32_t type;
    const char* name;
};
constexpr KVTypeName kKVTypes[] = {
    {GGML_TYPE_F32, "f32"}, {GGML_TYPE_F16, "f16"}, {GGML_TYPE_BF16, "bf16"},
    {GGML_TYPE_Q8_0, "q8_0"}, {GGML_TYPE_Q4_0, "q4_0"},
};

}  // namespace

bool is_kv_type(int type) {
    for (const KVTypeName& t : kKVTypes)
        if (static_cast<int>(t.type) == type) return true;
    return false;
}

std::string kv_type_name(uint32_t type) {
    for (const KVTypeName& t : kKVTypes)
        if (t.type == type) return t.name;
    return type_name(type);
}

std::string kv_type_names() {
    std::string out;
    for (const KVTypeName& t : kKVTypes) out += (out.empty() ? "" : ", ") + std::string(t.name);
    return out;
}

uint32_t kv_type_from_name(const std::string& name, const std::string& flag) {
    for (const KVTypeName& t : kKVTypes)
        if (name == t.name) return t.type;
    throw std::invalid_argument(flag + ": unsupported KV cache type '" + name + "' (glmoe has " + kv_type_names() +
                                ")");
}

void check_kv_type(int type, const std::string& what) {
    if (type == kKVTypeDefault || is_kv_type(type)) return;
    std::string ids;
    for (const KVTypeName& t : kKVTypes)
        ids += (ids.empty() ? "" : ", ") + std::to_string(t.type) + " (" + t.name + ")";
    throw std::invalid_argument(what + "=" + std::to_string(type) +
                                " is not a KV cache type glmoe has: GGML type ids " + ids +
                                " (or unset, for the default)");
}

}  // namespace glmoe
