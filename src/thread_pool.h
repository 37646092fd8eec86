// A fixed pool of worker threads for data-parallel loops. The calling thread takes part in
// every loop, so a pool of n threads starts n-1 workers. Workers spin briefly between loops
// before sleeping: a forward pass runs hundreds of short loops back to back, and a condition
// variable wake-up per loop would cost more than the loop itself on small models.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace glmoe {

// More threads than any machine glmoe runs on has: a larger count is a mistake, refused.
constexpr int kMaxThreads = 4096;

class ThreadPool {
public:
    // n_threads 0 means 1; negative or above kMaxThreads throws std::invalid_argument.
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }

    // Runs fn(thread_index) once on every thread (0..size()-1) and returns when all are done.
    // caller_first: run on the calling thread after the workers are started and before its own
    // fn(0), to overlap other work (e.g. enqueueing GPU work) with the loop; fn must then share its
    // work out dynamically, as the caller joins late.
    void run(const std::function<void(int)>& fn, const std::function<void()>* caller_first = nullptr);

    // Splits [0, n) into contiguous chunks, at most one per thread; fn(begin, end, thread_index).
    void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn);

private:
    void worker_loop(int index);

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable start_cv_;
    const std::function<void(int)>* job_ = nullptr;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stopping_{false};
    bool running_ = false;  // a run() is under way (touched by the calling thread only)
};

}  // namespace glmoe
