// Tasks of one custom call shared by the calling thread and XLA's intra-op thread pool
// (the pool XLA:CPU gives an FFI handler: our kernels start no threads of their own).
//
// For few rows (memory-bound) helpers are at most the pool's size less one: the calling
// thread works too, and one thread more than cores made a chain of batch-1 float32
// matmuls 1.3x slower (and the int8 kernel's batch-1 decode 1.22x faster with one fewer);
// compute-bound calls (`every_thread`: more than 4 rows) keep the whole pool. The caller
// takes tasks from the front and helpers from the back, so each thread's tasks are
// neighbours: a kernel's tasks are consecutive spans of its weight, and a thread going on
// to the next span keeps its memory stream going (a 1 MB matmul: 49 -> 39 us).
// (Helpers that spin between calls instead of sleeping, as llama.cpp's threads do, were
// tried: no gain measured here, so they sleep.)
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace flaxserve {

// One call's tasks; whoever claims one runs it. A helper that starts late finds none left
// and leaves, touching only this (kept alive by its own reference), so the caller waits
// for finished tasks, not for threads.
struct Job {
  std::function<void(int64_t)> fn;
  int64_t tasks = 0;
  std::atomic<int64_t> claimed{0};   // tasks taken, from either end
  std::atomic<int64_t> front{0};     // the caller's: 0, 1, 2, ...
  std::atomic<int64_t> back{0};      // the helpers': tasks - 1, tasks - 2, ...
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Work(bool helper) {
    for (;;) {
      if (claimed.fetch_add(1) >= tasks) return;
      fn(helper ? tasks - 1 - back.fetch_add(1) : front.fetch_add(1));
      if (done.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// Runs fn(t) for every t in [0, tasks) on the calling thread and up to min(pool threads -
// 1, tasks - 1) helpers (pool threads, with `every_thread`: compute-bound work, where the
// int8 kernel's 32-row products measured faster so), and returns when all have run.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, F fn, bool every_thread = false) {
  if (tasks <= 0) return;
  auto job = std::make_shared<Job>();
  job->fn = fn;
  job->tasks = tasks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - (every_thread ? 0 : 1), tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(true); });
  job->Work(false);
  // the helpers' last tasks end microseconds after ours: spin a little before sleeping
  for (int spin = 0; spin < 20000 && job->done.load() != tasks; ++spin) {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == tasks; });
}

}  // namespace flaxserve
