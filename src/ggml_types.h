// The ggml tensor element types as GGUF files number them, with their block geometry.
// Every id llama.cpp has assigned is known here (so a file's sizes can be checked), but only
// the types with `supported = true` can be computed with.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace glmoe {

enum GGMLType : uint32_t {
    GGML_TYPE_F32 = 0,
    GGML_TYPE_F16 = 1,
    GGML_TYPE_Q4_0 = 2,
    GGML_TYPE_Q5_0 = 6,
    GGML_TYPE_Q8_0 = 8,
    GGML_TYPE_Q4_K = 12,
    GGML_TYPE_Q5_K = 13,
    GGML_TYPE_Q6_K = 14,
    GGML_TYPE_BF16 = 30,
};

struct TypeTraits {
    const char* name;     // nullptr: the id is not a ggml type
    int64_t block_size;   // elements per block
    size_t type_size;     // bytes per block
    bool supported;       // glmoe has kernels for it
};

// Traits of any id; an unknown id gives {nullptr, 0, 0, false}.
const TypeTraits& type_traits(uint32_t type);
std::string type_name(uint32_t type);  // "Q4_K", or "unknown type 123"

}  // namespace glmoe
