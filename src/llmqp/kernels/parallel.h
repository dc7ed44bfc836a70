// Splitting a kernel's work over XLA's own intra-op thread pool (shared by cpu_gemm.cc and cpu_attention.cc).
//
// The caller and up to threads - 1 pool tasks take chunk indices from an atomic counter until none is left, and
// the caller spins until every chunk is done. A pool task that starts after the caller has taken every chunk
// does nothing, so the caller never waits for a task the pool has not started (it may be running on that pool).
// No second pool competes for the cores: one with threads spinning between products was measured 1.2-1.3x
// slower end to end on 2 cores.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace llmqp {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Runs fn(c) once for every c in [0, chunks), on the calling thread and on up to `threads` - 1 pool tasks.
// fn is copied into state shared with the tasks, so it may capture only what outlives a late task's no-op
// (capture shared_ptrs or values).
template <typename Fn>
void ParallelChunks(xla::ffi::ThreadPool& pool, int64_t chunks, int64_t threads, Fn fn) {
  struct State {
    explicit State(int64_t n, Fn f) : chunks(n), fn(std::move(f)) {}
    const int64_t chunks;
    const Fn fn;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Drain() {
      for (;;) {
        const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
        if (c >= chunks) return;
        fn(c);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (chunks <= 0) return;
  auto state = std::make_shared<State>(chunks, std::move(fn));
  for (int64_t t = 1; t < threads && t < chunks; ++t) pool.Schedule([state] { state->Drain(); });
  state->Drain();
  while (state->done.load(std::memory_order_acquire) < chunks) CpuRelax();
}

}  // namespace llmqp
