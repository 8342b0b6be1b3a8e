// How the TKP kernels use torch's intra-op threads: one parallel region per call; each thread
// takes the units of its own share (an even split, in order) one at a time, then helps with the
// others' shares, taking their units from the same counters. The shares keep a unit's data on
// one core from call to call: the units are image-major, so in a network each thread reads the
// images it wrote in the layer before (units handed out from one shared counter instead sent
// images from core to core: deployed ResNet-56 at batch 32, 2 threads, on a 2-vCPU AMD Zen 3 VM
// ran 1.41-1.62x slower in five runs of six, equal in one, and scaled 1.32x from 1 thread). On a
// machine that other processes keep busy, the OS may stop one of the threads for milliseconds;
// with a static split the others then finish their share and wait for it at the region's end
// (with OpenMP's default wait policy, spinning on the core it needs), while here they take
// over its units.
// A region still ends only when every thread of the team has come through it, and OpenMP's
// barrier spins by default, holding the core the late thread needs: so the calling thread,
// done with the units, watches for the others for at most kSpinMicroseconds, then sleeps (a
// condition variable) until every thread has been through the units, and only then enters
// the barrier; its core is free meanwhile. Every call that is worth threads uses them. An
// earlier rule sent a kernel's next 2-64 calls to the calling thread alone after a call whose
// workers came late; timed against this code in one process (deployed ResNet-56 and VGG-8,
// tap group 32, batch 32, 2 threads, 2-vCPU AMD Zen 4 VM; RESULTS.md, the entry of 2026-12-07
// 23:25), it took 0.95-1.01x this code's time on the idle VM; with busy loops beside it, it was
// slower in 27 measurements of 32 (1.01-2.92x), equal in 2 and faster in 3 (0.75-0.95x).
// Small calls run on the calling thread alone: a fork/join costs microseconds on an idle
// machine and can cost milliseconds on a busy one.
#pragma once

#include <ATen/Parallel.h>

#include "simd.h"  // V, the floats per vector

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>

namespace tkp_parallel {

// How long the calling thread, done with the units, watches for the others before it sleeps:
// on an idle machine they finish within a unit of it (microseconds), and waking a sleeping
// thread costs tens of microseconds in a VM (7-13% of a 0.13-0.18 ms layer at batch 32, 2 threads).
constexpr int64_t kSpinMicroseconds = 50;

// Whether a call of `work` multiply-adds runs on torch's threads: not with one thread, not
// inside a parallel region, not under 256K vector multiply-adds (see above: small calls): 4M
// multiply-adds with AVX-512's 16-float vectors, 2M with AVX2's 8 (on an AMD Zen 3, layers of
// 2.6-4.1M multiply-adds ran 1.16-1.59x faster on 2 threads than on 1 at batch 1).
inline bool worth_threads(int64_t work) {
  return at::get_num_threads() > 1 && !at::in_parallel_region() && work >= (int64_t(1) << 18) * tkp_simd::V;
}

// A spin-wait hint to the core (x86's PAUSE; nothing elsewhere, where the kernels do not build).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

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
  std::unique_ptr<std::atomic<int64_t>[]> taken(new std::atomic<int64_t>[threads]);  // units of each share
  for (int64_t s = 0; s < threads; ++s) taken[s] = 0;
  auto share = [&](int64_t s) { return s * units / threads; };  // its first unit
  std::mutex mutex;
  std::condition_variable all_through;
  std::atomic<int64_t> left{threads};  // ranges of [0, threads) not yet through the units (changed under mutex)
  std::exception_ptr error;  // the first unit's exception (under mutex), rethrown by the caller
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    State state;
    try {
      for (int64_t k = 0; k < threads; ++k) {  // its own share (begin), then the others'
        const int64_t s = (begin + k) % threads, first = share(s), count = share(s + 1) - first;
        for (int64_t i = taken[s].fetch_add(1); i < count; i = taken[s].fetch_add(1)) fn(first + i, state);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
      for (int64_t s = 0; s < threads; ++s) taken[s] = units;  // the others stop after their current unit
    }
    if (begin == 0) {  // the calling thread spins a little, then waits asleep (not at the barrier)
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicroseconds);
      for (int i = 1; left.load() > end - begin; ++i) {
        cpu_relax();
        if (i % 64 == 0 && std::chrono::steady_clock::now() > until) break;
      }
    }
    std::unique_lock<std::mutex> lock(mutex);
    left -= end - begin;
    if (begin == 0) {
      all_through.wait(lock, [&] { return left == 0; });
    } else if (left == 0) {
      all_through.notify_one();
    }
  });
  if (error) std::rethrow_exception(error);
}

}  // namespace tkp_parallel
