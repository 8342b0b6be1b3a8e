// How the TKP kernels use torch's intra-op threads: one parallel region per call, units of
// work handed out one at a time from a shared counter. On a machine that other processes
// keep busy, the OS may stop one of the threads for milliseconds; with a static split the
// others then finish their share and wait for it at the region's end (with OpenMP's default
// wait policy, spinning), while here they take over its units, and the region waits at most
// for the unit the stopped thread is on. Small calls run on the calling thread alone: a
// fork/join costs microseconds on an idle machine and can cost milliseconds on a busy one.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace tkp_parallel {

// fn(u, state) for every u in [0, units), on torch's threads unless `serial`; each thread
// passes its own State (default-constructed; e.g. which image its buffer holds) to its units.
template <class State, class F>
void for_units(int64_t units, bool serial, const F& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), units);
  if (serial || threads <= 1 || at::in_parallel_region()) {
    State state;
    for (int64_t u = 0; u < units; ++u) fn(u, state);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    State state;
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) fn(u, state);
  });
}

}  // namespace tkp_parallel
