// How fast this host's threads read memory: the ceiling of CPU expert offload, whose generation
// streams every routed expert of a token from RAM. Reads (sums) a buffer with 1..N threads, each
// its own contiguous slice, three ways: anonymous memory with 4 KiB pages, anonymous memory asking
// for transparent huge pages, and a file mapped as the runtime maps a GGUF (page cache; read once
// before timing so that it is resident). GB/s = bytes read / wall time, best of the repeats.
// Development only.
// usage: bench_ram [threads, comma list] [GiB] [file to map]
#include <sys/mman.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

uint64_t sum_slice(const uint64_t* p, size_t n) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a += p[i];
        b += p[i + 1];
        c += p[i + 2];
        d += p[i + 3];
    }
    for (; i < n; ++i) a += p[i];
    return a + b + c + d;
}

// Best GB/s of `repeats` passes of `threads` threads over [p, p + bytes).
double read_gbs(const uint8_t* p, size_t bytes, int threads, int repeats) {
    const size_t words = bytes / 8;
    double best = 0.0;
    volatile uint64_t sink = 0;
    for (int r = 0; r < repeats; ++r) {
        std::vector<std::thread> pool;
        std::vector<uint64_t> out(threads);
        const auto t0 = std::chrono::steady_clock::now();
        for (int t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
                const size_t lo = words * t / threads, hi = words * (t + 1) / threads;
                out[t] = sum_slice(reinterpret_cast<const uint64_t*>(p) + lo, hi - lo);
            });
        for (auto& th : pool) th.join();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        for (uint64_t v : out) sink = sink + v;
        best = std::max(best, static_cast<double>(words * 8) / s / 1e9);
    }
    return best;
}

uint8_t* anonymous(size_t bytes, bool huge) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("mmap");
        std::exit(1);
    }
#ifdef MADV_HUGEPAGE  // Linux
    madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#else
    (void)huge;
#endif
    std::memset(p, 1, bytes);  // fault every page in before timing
    return static_cast<uint8_t*>(p);
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<int> threads = {1, 4, 8, 16};
    if (argc > 1) {
        threads.clear();
        std::stringstream ss(argv[1]);
        for (std::string t; std::getline(ss, t, ',');) threads.push_back(std::atoi(t.c_str()));
    }
    const size_t bytes = static_cast<size_t>((argc > 2 ? std::atof(argv[2]) : 4.0) * (1u << 30)) / 64 * 64;
    const char* file = argc > 3 ? argv[3] : nullptr;

    std::printf("| memory | threads | GB/s |\n|---|---:|---:|\n");
    for (bool huge : {false, true}) {
        uint8_t* p = anonymous(bytes, huge);
        for (int t : threads)
            std::printf("| anonymous, %s | %d | %.1f |\n", huge ? "huge pages asked" : "4 KiB pages", t, read_gbs(p, bytes, t, 3));
        munmap(p, bytes);
    }
    if (file) {
        const int fd = open(file, O_RDONLY);
        struct stat st {};
        if (fd < 0 || fstat(fd, &st) != 0) {
            std::perror(file);
            return 1;
        }
        const size_t n = std::min(bytes, static_cast<size_t>(st.st_size)) / 64 * 64;
        void* m = mmap(nullptr, n, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            std::perror("mmap file");
            return 1;
        }
        const uint8_t* p = static_cast<const uint8_t*>(m);
        read_gbs(p, n, threads.back(), 1);  // into the page cache and the page tables
        for (int t : threads) std::printf("| file mapped (page cache) | %d | %.1f |\n", t, read_gbs(p, n, t, 3));
        munmap(m, n);
        close(fd);
    }
    return 0;
}
