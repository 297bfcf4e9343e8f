// A parallel loop for the mspec XLA:CPU kernels, on XLA's own intra-op thread pool (the FFI
// ThreadPool context): the threads that also run XLA's GEMMs and fusions, so the kernels never
// oversubscribe the cores. Header-only; each kernel source includes it.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace mspec_kernels {

inline std::unique_ptr<float[]> scratch(int64_t n) {
  return std::unique_ptr<float[]>(new float[n]);
}

// ---------------------------------------------------------------------------------------------
// A parallel loop on XLA's thread pool. Items [0, n) are claimed in chunks of `grain` from a
// shared counter (dynamic scheduling: the first items go first); each worker gets its own
// scratch of `scratch_floats` floats. The calling thread works too, then waits for the chunks
// other workers have claimed and not yet finished. Helpers that start after the loop has run
// out of items return at once without touching the body, so the loop state they share is
// reference counted.

using LoopBody = std::function<void(int64_t lo, int64_t hi, float* scratch)>;

struct LoopState {
  std::atomic<int64_t> next{0}, done{0};
  int64_t n = 0, grain = 1, scratch_floats = 0;
  const LoopBody* body = nullptr;  // valid while done < n
  std::mutex mu;
  std::condition_variable finished;
};

inline void run_worker(LoopState& s) {
  std::unique_ptr<float[]> buf;
  for (;;) {
    const int64_t lo = s.next.fetch_add(s.grain);
    if (lo >= s.n) return;
    const int64_t hi = std::min(lo + s.grain, s.n);
    if (!buf && s.scratch_floats > 0) buf = scratch(s.scratch_floats);
    (*s.body)(lo, hi, buf.get());
    if (s.done.fetch_add(hi - lo) + (hi - lo) == s.n) {
      // Under the lock: the waiter is either before its check (and will see done == n) or
      // already waiting (and gets the notification).
      std::lock_guard<std::mutex> lock(s.mu);
      s.finished.notify_all();
    }
  }
}

inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain,
                         int64_t scratch_floats, const LoopBody& body) {
  if (n <= 0) return;
  auto state = std::make_shared<LoopState>();
  state->n = n;
  state->grain = grain;
  state->scratch_floats = scratch_floats;
  state->body = &body;
  const int64_t chunks = (n + grain - 1) / grain;
  // num_threads() is 0 when XLA provides no pool: then the caller does everything.
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { run_worker(*state); });
  run_worker(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->finished.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace mspec_kernels
