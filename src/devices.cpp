#include "devices.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>

namespace glmoe {

namespace {

// A number from the first line of `path` starting with `prefix` (the whole file when prefix is
// empty); false when there is none ("max", missing file).
bool read_number(const char* path, const char* prefix, uint64_t& out) {
    std::FILE* f = std::fopen(path, "r");
    if (!f) return false;
    char line[256];
    bool found = false;
    const size_t n = std::strlen(prefix);
    while (!found && std::fgets(line, sizeof line, f))
        if (std::strncmp(line, prefix, n) == 0) found = std::sscanf(line + n, "%" SCNu64, &out) == 1;
    std::fclose(f);
    return found;
}

}  // namespace

uint64_t host_memory_available() {
    uint64_t avail = UINT64_MAX, kib = 0, limit = 0, used = 0;
    if (read_number("/proc/meminfo", "MemAvailable:", kib)) avail = kib << 10;
    const bool v2 = read_number("/sys/fs/cgroup/memory.max", "", limit) &&
                    read_number("/sys/fs/cgroup/memory.current", "", used);
    if (v2 || (read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes", "", limit) &&
               read_number("/sys/fs/cgroup/memory/memory.usage_in_bytes", "", used)))
        avail = std::min(avail, limit > used ? limit - used : 0);
    return avail;
}

std::string mib(uint64_t bytes) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f MiB", bytes / 1048576.0);
    return buf;
}

bool built_with_cuda() {
#ifdef GLMOE_CUDA
    return true;
#else
    return false;
#endif
}

#ifndef GLMOE_CUDA
// Without the CUDA backend (ggml-cuda/device.cu provides these otherwise).
int cuda_device_count() { return 0; }
std::string cuda_device_name() { return ""; }
std::string cuda_device_summary() { return ""; }
#endif

}  // namespace glmoe
