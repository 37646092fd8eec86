// GGUF reader. The whole file is mapped read-only and parsed through a bounds-checked cursor;
// every count read from the file is checked against the bytes left before anything is
// allocated for it, and array elements are capped in total, so a hostile file cannot cause a
// huge allocation.
#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <system_error>

#include "ggml_types.h"

namespace glmoe {

namespace {

constexpr uint32_t kMaxDims = 4;           // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;          // arrays of arrays nest at most this deep
// Each array element becomes a GGUFValue (~100 bytes) however small it is in the file, so the
// total is capped to keep a hostile file from turning a large byte array into a huge
// allocation. Real vocabularies (tokens + scores + types + merges) are around 1M elements.
constexpr uint64_t kMaxArrayElements = uint64_t(1) << 23;
constexpr uint64_t kDefaultAlignment = 32;

std::string quoted(const std::string& s) {
    // Names come from the file: keep messages printable and short.
    std::string out = "'";
    for (size_t i = 0; i < s.size() && i < 80; ++i) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        out += (c >= 0x20 && c < 0x7f) ? static_cast<char>(c) : '?';
    }
    if (s.size() > 80) out += "...";
    return out + "'";
}

const char* value_type_name(uint32_t t) {
    static const char* const kNames[] = {"uint8", "int8", "uint16", "int16", "uint32",
                                         "int32", "float32", "bool", "string", "array",
                                         "uint64", "int64", "float64"};
    return t < sizeof(kNames) / sizeof(kNames[0]) ? kNames[t] : nullptr;
}

// Bytes a scalar of this type occupies; 0 for string and array (variable length).
uint64_t scalar_size(GGUFValueType t) {
    switch (t) {
        case GGUFValueType::UINT8: case GGUFValueType::INT8: case GGUFValueType::BOOL: return 1;
        case GGUFValueType::UINT16: case GGUFValueType::INT16: return 2;
        case GGUFValueType::UINT32: case GGUFValueType::INT32: case GGUFValueType::FLOAT32: return 4;
        case GGUFValueType::UINT64: case GGUFValueType::INT64: case GGUFValueType::FLOAT64: return 8;
        default: return 0;
    }
}

// Fewest bytes any value of this type can occupy in the file.
uint64_t min_encoded_size(GGUFValueType t) {
    if (t == GGUFValueType::STRING) return 8;              // length
    if (t == GGUFValueType::ARRAY) return 4 + 8;           // element type + count
    return scalar_size(t);
}

// Valid UTF-8 with no NUL: keys and tensor names reach Python as str and C strings.
bool is_clean_utf8(const std::string& s) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const auto* end = p + s.size();
    while (p < end) {
        unsigned c = *p++;
        if (c == 0) return false;
        if (c < 0x80) continue;
        int extra;
        uint32_t cp;
        if ((c & 0xe0) == 0xc0) { extra = 1; cp = c & 0x1f; }
        else if ((c & 0xf0) == 0xe0) { extra = 2; cp = c & 0x0f; }
        else if ((c & 0xf8) == 0xf0) { extra = 3; cp = c & 0x07; }
        else return false;
        if (end - p < extra) return false;
        for (int k = 0; k < extra; ++k) {
            if ((p[k] & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (p[k] & 0x3f);
        }
        p += extra;
        static const uint32_t kMinForLength[] = {0, 0x80, 0x800, 0x10000};
        if (cp < kMinForLength[extra] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    }
    return true;
}

// Bounds-checked little-endian reader over the mapped file.
class Cursor {
public:
    Cursor(const uint8_t* base, uint64_t size) : base_(base), size_(size) {}

    uint64_t pos() const { return pos_; }
    uint64_t remaining() const { return size_ - pos_; }

    // `describe` names what is being read; it is only called to build an error message, so the
    // hot loops over vocabulary arrays build no strings.
    template <typename Describe>
    void need(uint64_t n, Describe describe) const {
        if (n > remaining())
            throw GGUFError("truncated file: " + describe() + " at offset " + std::to_string(pos_) +
                            " needs " + std::to_string(n) + " bytes but only " +
                            std::to_string(remaining()) + " remain");
    }

    template <typename T, typename Describe>
    T read(Describe describe) {
        need(sizeof(T), describe);
        T v;
        std::memcpy(&v, base_ + pos_, sizeof(T));  // unaligned-safe; host is little-endian
        pos_ += sizeof(T);
        return v;
    }

    template <typename Describe>
    std::string read_string(Describe describe) {
        uint64_t len = read<uint64_t>([&] { return describe() + " length"; });
        if (len > remaining())
            throw GGUFError("string length " + std::to_string(len) + " of " + describe() +
                            " at offset " + std::to_string(pos_ - 8) + " exceeds the " +
                            std::to_string(remaining()) + " bytes left in the file");
        std::string s(reinterpret_cast<const char*>(base_ + pos_), len);
        pos_ += len;
        return s;
    }

    const uint8_t* here() const { return base_ + pos_; }
    void skip(uint64_t n) { pos_ += n; }

private:
    const uint8_t* base_;
    uint64_t size_;
    uint64_t pos_ = 0;
};

class MetadataParser {
public:
    explicit MetadataParser(Cursor& cur) : cur_(cur) {}

    void read_value(GGUFValue& v, GGUFValueType type, const std::string& key, int depth) {
        v.type = type;
        auto at_key = [&] { return where(key); };
        switch (type) {
            case GGUFValueType::UINT8: set_int(v, cur_.read<uint8_t>(at_key)); break;
            case GGUFValueType::INT8: set_int(v, cur_.read<int8_t>(at_key)); break;
            case GGUFValueType::UINT16: set_int(v, cur_.read<uint16_t>(at_key)); break;
            case GGUFValueType::INT16: set_int(v, cur_.read<int16_t>(at_key)); break;
            case GGUFValueType::UINT32: set_int(v, cur_.read<uint32_t>(at_key)); break;
            case GGUFValueType::INT32: set_int(v, cur_.read<int32_t>(at_key)); break;
            case GGUFValueType::INT64: set_int(v, cur_.read<int64_t>(at_key)); break;
            case GGUFValueType::UINT64: {
                uint64_t u = cur_.read<uint64_t>(at_key);
                v.u = u;
                v.i = static_cast<int64_t>(u);  // bit pattern; readers of uint64 use `u`
                break;
            }
            case GGUFValueType::FLOAT32: v.f = cur_.read<float>(at_key); break;
            case GGUFValueType::FLOAT64: v.f = cur_.read<double>(at_key); break;
            case GGUFValueType::BOOL: {
                uint64_t at = cur_.pos();
                uint8_t b = cur_.read<uint8_t>(at_key);
                if (b > 1)
                    throw GGUFError("invalid bool byte " + std::to_string(b) + " in " + where(key) +
                                    " at offset " + std::to_string(at));
                v.i = b;
                v.u = b;
                break;
            }
            case GGUFValueType::STRING: v.s = cur_.read_string(at_key); break;
            case GGUFValueType::ARRAY: read_array(v, key, depth); break;
        }
    }

    GGUFValueType read_type(const std::string& key, const char* role) {
        uint64_t at = cur_.pos();
        uint32_t t = cur_.read<uint32_t>([&] { return std::string(role) + " of " + where(key); });
        if (!value_type_name(t))
            throw GGUFError("unknown " + std::string(role) + " " + std::to_string(t) + " for " +
                            where(key) + " at offset " + std::to_string(at));
        return static_cast<GGUFValueType>(t);
    }

private:
    static std::string where(const std::string& key) { return "metadata key " + quoted(key); }

    template <typename T>
    static void set_int(GGUFValue& v, T x) {
        v.i = static_cast<int64_t>(x);
        v.u = static_cast<uint64_t>(v.i);
    }

    void read_array(GGUFValue& v, const std::string& key, int depth) {
        if (depth >= kMaxArrayDepth)
            throw GGUFError("arrays nested more than " + std::to_string(kMaxArrayDepth) +
                            " deep in " + where(key) + " at offset " + std::to_string(cur_.pos()));
        GGUFValueType elem = read_type(key, "array element type");
        uint64_t count_at = cur_.pos();
        uint64_t count = cur_.read<uint64_t>([&] { return "array length of " + where(key); });
        uint64_t min_size = min_encoded_size(elem);
        if (count > cur_.remaining() / min_size)
            throw GGUFError("array length " + std::to_string(count) + " of " + where(key) +
                            " at offset " + std::to_string(count_at) + " is more than the " +
                            std::to_string(cur_.remaining()) + " bytes left in the file could hold");
        total_elements_ += count;
        if (total_elements_ > kMaxArrayElements)
            throw GGUFError("metadata arrays hold more than " + std::to_string(kMaxArrayElements) +
                            " elements in total (at " + where(key) + ")");
        v.elem_type = elem;
        v.arr.resize(count);
        uint64_t size = scalar_size(elem);
        if (size != 0 && elem != GGUFValueType::BOOL) {
            // Fast path for numeric arrays (token types, scores): bounds were checked above.
            for (GGUFValue& e : v.arr) read_scalar_unchecked(e, elem);
            return;
        }
        for (GGUFValue& e : v.arr) read_value(e, elem, key, depth + 1);
    }

    void read_scalar_unchecked(GGUFValue& e, GGUFValueType t) {
        e.type = t;
        const uint8_t* p = cur_.here();
        switch (t) {
            case GGUFValueType::UINT8: set_int(e, load<uint8_t>(p)); break;
            case GGUFValueType::INT8: set_int(e, load<int8_t>(p)); break;
            case GGUFValueType::UINT16: set_int(e, load<uint16_t>(p)); break;
            case GGUFValueType::INT16: set_int(e, load<int16_t>(p)); break;
            case GGUFValueType::UINT32: set_int(e, load<uint32_t>(p)); break;
            case GGUFValueType::INT32: set_int(e, load<int32_t>(p)); break;
            case GGUFValueType::INT64: set_int(e, load<int64_t>(p)); break;
            case GGUFValueType::UINT64: e.u = load<uint64_t>(p); e.i = static_cast<int64_t>(e.u); break;
            case GGUFValueType::FLOAT32: e.f = load<float>(p); break;
            case GGUFValueType::FLOAT64: e.f = load<double>(p); break;
            default: break;  // only fixed-size non-bool types get here
        }
        cur_.skip(scalar_size(t));
    }

    template <typename T>
    static T load(const uint8_t* p) {
        T v;
        std::memcpy(&v, p, sizeof(T));
        return v;
    }

    Cursor& cur_;
    uint64_t total_elements_ = 0;
};

uint64_t alignment_from(const GGUFValue& v) {
    bool negative = v.is_integer() && v.type != GGUFValueType::UINT64 && v.i < 0;
    if (!v.is_integer() || negative || v.u == 0 || (v.u & (v.u - 1)) != 0 || v.u > UINT32_MAX) {
        std::string shown = v.is_integer() ? (v.type == GGUFValueType::UINT64 ? std::to_string(v.u)
                                                                              : std::to_string(v.i))
                                           : std::string("a ") + value_type_name(uint32_t(v.type));
        throw GGUFError("invalid general.alignment " + shown +
                        ": must be a nonzero power-of-two integer that fits in uint32");
    }
    return v.u;
}

void read_tensor_info(Cursor& cur, GGUFTensorInfo& t) {
    uint64_t start = cur.pos();
    t.name = cur.read_string([] { return std::string("tensor name"); });
    if (!is_clean_utf8(t.name))
        throw GGUFError("tensor name " + quoted(t.name) + " at offset " + std::to_string(start) +
                        " is not valid UTF-8 or contains a NUL byte");
    const std::string what = "tensor " + quoted(t.name);
    uint64_t dims_at = cur.pos();
    uint32_t n_dims = cur.read<uint32_t>([&] { return "n_dims of " + what; });
    if (n_dims == 0 || n_dims > kMaxDims)
        throw GGUFError(what + " has n_dims " + std::to_string(n_dims) + " at offset " +
                        std::to_string(dims_at) + " (must be 1.." + std::to_string(kMaxDims) + ")");
    t.ne.resize(n_dims);
    for (uint32_t d = 0; d < n_dims; ++d) {
        t.ne[d] = cur.read<int64_t>([&] { return "dimension " + std::to_string(d) + " of " + what; });
        if (t.ne[d] < 1)
            throw GGUFError(what + " has dimension " + std::to_string(d) + " = " +
                            std::to_string(t.ne[d]) + " (must be >= 1)");
    }
    uint64_t type_at = cur.pos();
    t.type = cur.read<uint32_t>([&] { return "type of " + what; });
    const TypeTraits& tr = type_traits(t.type);
    if (!tr.name)
        throw GGUFError(what + " has unknown type id " + std::to_string(t.type) + " at offset " +
                        std::to_string(type_at));
    t.offset = cur.read<uint64_t>([&] { return "data offset of " + what; });

    if (t.ne[0] % tr.block_size != 0)
        throw GGUFError(what + " of type " + tr.name + " has first dimension " +
                        std::to_string(t.ne[0]) + ", not a multiple of the block size " +
                        std::to_string(tr.block_size));
    // Dimensions are >= 1, so "product > limit" is "x > limit / y" for each step.
    uint64_t n_elements = 1;
    const uint64_t blocks_per_row = static_cast<uint64_t>(t.ne[0] / tr.block_size);
    if (blocks_per_row > uint64_t(INT64_MAX) / tr.type_size)
        throw GGUFError(what + " has a byte size that overflows");
    uint64_t n_bytes = blocks_per_row * tr.type_size;
    for (uint32_t d = 0; d < n_dims; ++d) {
        uint64_t n = static_cast<uint64_t>(t.ne[d]);
        if (n_elements > uint64_t(INT64_MAX) / n)
            throw GGUFError(what + " has an element count that overflows int64");
        n_elements *= n;
        if (d > 0) {
            if (n_bytes > uint64_t(INT64_MAX) / n)
                throw GGUFError(what + " has a byte size that overflows");
            n_bytes *= n;
        }
    }
    t.n_elements = n_elements;
    t.n_bytes = n_bytes;
}

}  // namespace

bool GGUFValue::is_integer() const {
    switch (type) {
        case GGUFValueType::UINT8: case GGUFValueType::INT8: case GGUFValueType::UINT16:
        case GGUFValueType::INT16: case GGUFValueType::UINT32: case GGUFValueType::INT32:
        case GGUFValueType::UINT64: case GGUFValueType::INT64: return true;
        default: return false;
    }
}

bool load_mode_maps(const std::string& mode) {
    if (mode == "auto" || mode == "mmap" || mode == "mmap+mlock") return true;
    if (mode == "none" || mode == "mlock" || mode == "dio") return false;
    throw std::invalid_argument("unknown load mode '" + mode + "' (auto, none, mmap, mlock, mmap+mlock, dio)");
}

bool load_mode_locks(const std::string& mode) {
    load_mode_maps(mode);  // the same error for an unknown word
    return mode == "mlock" || mode == "mmap+mlock";
}

namespace {

// The whole of fd (size bytes) in anonymous memory, read-only once filled.
const uint8_t* read_whole(int fd, uint64_t size, const std::string& path) {
    void* mem = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        throw std::system_error(errno, std::generic_category(),
                                "cannot allocate " + std::to_string(size) + " bytes to read " + path + " into");
    uint8_t* dst = static_cast<uint8_t*>(mem);
    for (uint64_t done = 0; done < size;) {
        const ssize_t n = ::pread(fd, dst + done, std::min<uint64_t>(size - done, uint64_t{1} << 30),
                                  static_cast<off_t>(done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            const int err = n < 0 ? errno : EIO;  // 0: the file shrank while being read
            ::munmap(mem, size);
            throw std::system_error(err, std::generic_category(), "cannot read " + path);
        }
        done += static_cast<uint64_t>(n);
    }
    ::mprotect(mem, size, PROT_READ);
    return dst;
}

}  // namespace

std::unique_ptr<GGUFFile> GGUFFile::open(const std::string& path, bool mapped) {
    std::unique_ptr<GGUFFile> f(new GGUFFile());
    f->path_ = path;

    // O_NONBLOCK: opening a FIFO (or a device) for reading would otherwise wait for a writer;
    // fstat below refuses anything that is not a regular file. It changes nothing for mmap.
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) throw std::system_error(errno, std::generic_category(), "cannot open " + path);
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        int err = errno;
        ::close(fd);
        throw std::system_error(err, std::generic_category(), "cannot stat " + path);
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw GGUFError(path + " is not a regular file");
    }
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    if (size == 0) {  // nothing to map
        ::close(fd);
        throw GGUFError(path + ": file is too small to be GGUF (0 bytes)");
    }
    if (!mapped) {
        try {
            f->map_ = read_whole(fd, size, path);
        } catch (...) {
            ::close(fd);
            throw;
        }
        ::close(fd);
    } else {
        void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
        int map_err = errno;
        ::close(fd);  // the mapping keeps the file alive
        if (map == MAP_FAILED) throw std::system_error(map_err, std::generic_category(), "cannot mmap " + path);
        f->map_ = static_cast<const uint8_t*>(map);
    }
    f->size_ = size;
    f->mapped_ = mapped;

    try {
        f->parse();
    } catch (const GGUFError& e) {
        throw GGUFError(path + ": " + e.what());
    }
    return f;
}

void GGUFFile::lock() {
    void* addr = const_cast<uint8_t*>(map_);
    if (::mlock(addr, size_) == 0) {
        locked_ = true;
        return;
    }
    const int err = errno;
    ::munlock(addr, size_);  // a failure part way through can leave some pages locked
    std::fprintf(stderr,
                 "warning: failed to mlock %llu-byte buffer: %s; try increasing RLIMIT_MEMLOCK ('ulimit -l' as root)\n",
                 static_cast<unsigned long long>(size_), std::strerror(err));
}

void GGUFFile::parse() {
    Cursor cur(map_, size_);

    if (size_ < 4) throw GGUFError("file is too small to be GGUF (" + std::to_string(size_) + " bytes)");
    // The magic is checked before the header size so a short non-GGUF file is called what it is.
    if (std::memcmp(map_, "GGUF", 4) != 0) {
        std::string found;
        for (int i = 0; i < 4; ++i) {
            char c = static_cast<char>(map_[i]);
            found += (c >= 0x20 && c < 0x7f) ? c : '?';
        }
        throw GGUFError("wrong magic '" + found + "': not a GGUF file");
    }
    constexpr uint64_t kHeaderSize = 4 + 4 + 8 + 8;  // magic, version, n_tensors, n_kv
    if (size_ < kHeaderSize)
        throw GGUFError("file is too small to be GGUF (" + std::to_string(size_) +
                        " bytes, the header alone is " + std::to_string(kHeaderSize) + ")");
    cur.skip(4);
    version_ = cur.read<uint32_t>([] { return std::string("version"); });
    if (version_ != 2 && version_ != 3) {
        // A big-endian file's small version number lands in the high bytes.
        std::string hint = version_ != 0 && (version_ & 0xffff) == 0 ? " (big-endian file?)" : "";
        throw GGUFError("unsupported GGUF version " + std::to_string(version_) + hint +
                        "; only versions 2 and 3 are supported");
    }
    const uint64_t n_tensors = cur.read<uint64_t>([] { return std::string("tensor count"); });
    const uint64_t n_kv = cur.read<uint64_t>([] { return std::string("metadata count"); });

    // Smallest possible entries: a key-value pair is an empty key (8) + type (4) + 1-byte value;
    // a tensor info is an empty name (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
    constexpr uint64_t kMinKV = 8 + 4 + 1;
    constexpr uint64_t kMinTensorInfo = 8 + 4 + 8 + 4 + 8;
    if (n_kv > cur.remaining() / kMinKV)
        throw GGUFError("metadata count " + std::to_string(n_kv) + " is more than the " +
                        std::to_string(cur.remaining()) + " bytes left in the file could hold");
    if (n_tensors > cur.remaining() / kMinTensorInfo)
        throw GGUFError("tensor count " + std::to_string(n_tensors) + " is more than the " +
                        std::to_string(cur.remaining()) + " bytes left in the file could hold");

    MetadataParser meta(cur);
    kv_.reserve(n_kv);
    kv_index_.reserve(n_kv);
    for (uint64_t k = 0; k < n_kv; ++k) {
        uint64_t key_at = cur.pos();
        std::string key = cur.read_string([&] { return "key of metadata entry " + std::to_string(k); });
        if (!is_clean_utf8(key))
            throw GGUFError("metadata key " + quoted(key) + " at offset " + std::to_string(key_at) +
                            " is not valid UTF-8 or contains a NUL byte");
        if (kv_index_.count(key))
            throw GGUFError("duplicate metadata key " + quoted(key) + " at offset " +
                            std::to_string(key_at));
        GGUFValueType type = meta.read_type(key, "value type");
        GGUFValue value;
        meta.read_value(value, type, key, 0);
        kv_index_.emplace(key, kv_.size());
        kv_.emplace_back(std::move(key), std::move(value));
    }

    alignment_ = kDefaultAlignment;
    if (const GGUFValue* a = find("general.alignment")) alignment_ = alignment_from(*a);

    // Recheck against what is left now that the metadata has been consumed.
    if (n_tensors > cur.remaining() / kMinTensorInfo)
        throw GGUFError("tensor count " + std::to_string(n_tensors) + " is more than the " +
                        std::to_string(cur.remaining()) + " bytes left after the metadata could hold");
    tensors_.resize(n_tensors);
    tensor_index_.reserve(n_tensors);
    for (uint64_t i = 0; i < n_tensors; ++i) {
        GGUFTensorInfo& t = tensors_[i];
        uint64_t info_at = cur.pos();
        read_tensor_info(cur, t);
        if (!tensor_index_.emplace(t.name, i).second)
            throw GGUFError("duplicate tensor name " + quoted(t.name) + " at offset " +
                            std::to_string(info_at));
        if (t.offset % alignment_ != 0)
            throw GGUFError("tensor " + quoted(t.name) + " data offset " + std::to_string(t.offset) +
                            " is not a multiple of the alignment " + std::to_string(alignment_));
    }

    // The data section begins at the first aligned offset after the tensor infos.
    const uint64_t infos_end = cur.pos();
    const uint64_t pad = (alignment_ - infos_end % alignment_) % alignment_;
    const uint64_t data_start = infos_end + pad;  // no overflow: infos_end <= size, pad < 2^32
    if (n_tensors > 0 && data_start > size_)
        throw GGUFError("data section would start at offset " + std::to_string(data_start) +
                        ", past the end of the " + std::to_string(size_) + "-byte file");
    // With no tensors the file may end before the padding; the data section is then empty.
    const uint64_t data_offset = std::min(data_start, size_);
    data_ = map_ + data_offset;
    const uint64_t data_size = size_ - data_offset;

    for (const GGUFTensorInfo& t : tensors_) {
        if (t.offset > data_size || t.n_bytes > data_size - t.offset)
            throw GGUFError("tensor " + quoted(t.name) + " data [" + std::to_string(t.offset) + ", +" +
                            std::to_string(t.n_bytes) + ") relative to the data section at offset " +
                            std::to_string(data_offset) + " extends past the end of the file (" +
                            std::to_string(data_size) + " data bytes)");
    }
    std::vector<size_t> by_offset(tensors_.size());
    std::iota(by_offset.begin(), by_offset.end(), size_t(0));
    std::sort(by_offset.begin(), by_offset.end(),
              [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
    for (size_t k = 1; k < by_offset.size(); ++k) {
        const GGUFTensorInfo& prev = tensors_[by_offset[k - 1]];
        const GGUFTensorInfo& next = tensors_[by_offset[k]];
        if (prev.offset + prev.n_bytes > next.offset)
            throw GGUFError("tensors " + quoted(prev.name) + " and " + quoted(next.name) +
                            " overlap: data at offsets " + std::to_string(prev.offset) + " (+" +
                            std::to_string(prev.n_bytes) + ") and " + std::to_string(next.offset));
    }
}

GGUFFile::~GGUFFile() {
    if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);  // also releases an mlock
}

const GGUFValue* GGUFFile::find(const std::string& key) const {
    auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GGUFTensorInfo* GGUFFile::find_tensor(const std::string& name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace glmoe
