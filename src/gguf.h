// GGUF reader: parses and validates a whole file up front (versions 2 and 3), then serves
// metadata and mmap'd tensor data. Nothing in the file is trusted: every count, length, offset
// and size is checked against the file before use, and a bad file throws GGUFError naming the
// problem.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace glmoe {

struct GGUFError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

enum class GGUFValueType : uint32_t {
    UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
    STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};

struct GGUFValue {
    GGUFValueType type = GGUFValueType::UINT8;
    // Scalars: integer types in `i` (uint64 values above INT64_MAX are kept bit-for-bit in `u`),
    // floats in `f`, bool in `i` (0/1), strings in `s`.
    int64_t i = 0;
    uint64_t u = 0;
    double f = 0.0;
    std::string s;
    // Arrays: element type and elements (which may themselves be arrays).
    GGUFValueType elem_type = GGUFValueType::UINT8;
    std::vector<GGUFValue> arr;

    bool is_integer() const;  // any of the integer types (not bool)
};

struct GGUFTensorInfo {
    std::string name;
    std::vector<int64_t> ne;  // ne[0] is the contiguous dimension
    uint32_t type = 0;        // GGMLType id
    uint64_t offset = 0;      // from the start of the data section
    uint64_t n_elements = 0;
    uint64_t n_bytes = 0;
};

// llama.cpp's load modes (-lm): whether `mode` maps the file (auto, mmap, mmap+mlock) or reads it
// into memory (none, mlock, dio), and whether it locks those bytes in RAM (mlock, mmap+mlock).
// std::invalid_argument for another word.
bool load_mode_maps(const std::string& mode);
bool load_mode_locks(const std::string& mode);

class GGUFFile {
public:
    // Throws GGUFError (bad file) or std::system_error (cannot open/map/read). mapped: the file is
    // mapped (pages read on first use, shared with the page cache); otherwise it is read whole into
    // memory of the process's own (llama.cpp's --no-mmap), which its threads read faster (tools/
    // bench_ram: 104 against 92 GB/s on the device host) at the cost of the file's size in RAM.
    static std::unique_ptr<GGUFFile> open(const std::string& path, bool mapped = true);
    // llama.cpp's --mlock: mlocks the whole file, so the kernel neither pages it out nor drops it
    // from the page cache (a mapped file is read whole here). Where mlock fails (RLIMIT_MEMLOCK) a
    // warning is printed on stderr and the file stays unlocked, as in llama.cpp.
    void lock();
    ~GGUFFile();
    GGUFFile(const GGUFFile&) = delete;
    GGUFFile& operator=(const GGUFFile&) = delete;

    uint32_t version() const { return version_; }
    uint64_t alignment() const { return alignment_; }
    const std::string& path() const { return path_; }

    // Metadata in file order.
    const std::vector<std::pair<std::string, GGUFValue>>& metadata() const { return kv_; }
    const GGUFValue* find(const std::string& key) const;  // nullptr if absent

    const std::vector<GGUFTensorInfo>& tensors() const { return tensors_; }
    const GGUFTensorInfo* find_tensor(const std::string& name) const;  // nullptr if absent
    const uint8_t* tensor_data(const GGUFTensorInfo& t) const { return data_ + t.offset; }
    uint64_t file_size() const { return size_; }
    bool mapped() const { return mapped_; }  // false: read into memory (open's `mapped`)
    bool locked() const { return locked_; }  // lock() was called and mlock succeeded

private:
    GGUFFile() = default;
    void parse();  // fills everything below from map_/size_
    std::string path_;
    uint32_t version_ = 0;
    uint64_t alignment_ = 32;
    std::vector<std::pair<std::string, GGUFValue>> kv_;
    std::unordered_map<std::string, size_t> kv_index_;
    std::vector<GGUFTensorInfo> tensors_;
    std::unordered_map<std::string, size_t> tensor_index_;
    bool mapped_ = true;
    bool locked_ = false;
    const uint8_t* map_ = nullptr;   // whole file
    uint64_t size_ = 0;
    const uint8_t* data_ = nullptr;  // start of the tensor data section
};

}  // namespace glmoe
