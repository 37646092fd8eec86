#include "thread_pool.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GLMOE_CPU_RELAX() _mm_pause()
#else
#define GLMOE_CPU_RELAX() std::this_thread::yield()
#endif

namespace glmoe {

namespace {
// How long an idle worker keeps spinning for the next loop before it sleeps.
constexpr auto kSpinTime = std::chrono::microseconds(200);
// About 20-50 us of pause instructions.
constexpr int kSpinsBeforeYield = 1000;
}  // namespace

namespace {
int checked_threads(int n) {
    if (n < 0 || n > kMaxThreads)
        throw std::invalid_argument("n_threads " + std::to_string(n) + " is out of range [0, " +
                                    std::to_string(kMaxThreads) + "]");
    return std::max(1, n);
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(checked_threads(n_threads)) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    start_cv_.notify_all();
    for (auto& t : workers_) t.join();
}

void ThreadPool::worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
        const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
        int spins = 0;
        while (generation_.load(std::memory_order_acquire) == seen && !stopping_.load(std::memory_order_relaxed)) {
            GLMOE_CPU_RELAX();
            if (++spins % 64 != 0) continue;
            std::this_thread::yield();  // let a preempted thread of this loop have the core
            if (std::chrono::steady_clock::now() <= spin_until) continue;
            std::unique_lock<std::mutex> lock(mutex_);
            start_cv_.wait(lock, [&] { return stopping_ || generation_.load() != seen; });
            break;
        }
        if (stopping_) return;
        seen = generation_.load(std::memory_order_acquire);
        (*job_)(index);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

void ThreadPool::run(const std::function<void(int)>& fn, const std::function<void()>* caller_first) {
    if (n_threads_ == 1 || running_) {
        // (Nested in caller_first of a loop that is running: the workers are busy, so this
        // thread runs every part itself.)
        if (caller_first) (*caller_first)();
        for (int t = 0; t < (running_ ? n_threads_ : 1); ++t) fn(t);
        return;
    }
    running_ = true;
    struct Done {
        bool& flag;
        ~Done() { flag = false; }
    } done{running_};
    job_ = &fn;
    pending_.store(n_threads_ - 1, std::memory_order_relaxed);
    {
        // Under the lock so a worker between its last check and its wait cannot miss the bump.
        std::lock_guard<std::mutex> lock(mutex_);
        generation_.fetch_add(1, std::memory_order_release);
    }
    start_cv_.notify_all();
    // A failure of the caller's side work is rethrown once the workers are done with fn.
    std::exception_ptr caller_error;
    if (caller_first) try {
            (*caller_first)();
        } catch (...) {
            caller_error = std::current_exception();
        }
    fn(0);
    // Spin for the workers to finish, but yield the core after a while: on a machine with more
    // runnable threads than cores a worker may have been preempted, and spinning here would keep
    // it off the core it needs.
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
        if (spins < kSpinsBeforeYield)
            GLMOE_CPU_RELAX();
        else
            std::this_thread::yield();
    }
    if (caller_error) std::rethrow_exception(caller_error);
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn) {
    if (n <= 0) return;
    const int64_t parts = std::min<int64_t>(n, n_threads_);
    if (parts == 1) {
        fn(0, n, 0);
        return;
    }
    run([&](int t) {
        if (t >= parts) return;
        const int64_t begin = n * t / parts, end = n * (t + 1) / parts;
        fn(begin, end, t);
    });
}

}  // namespace glmoe
