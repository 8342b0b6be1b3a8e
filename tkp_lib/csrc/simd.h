// The vector instructions the TKP kernels use, for the instruction set chosen at build time:
// AVX-512 (16 floats per vector, 32 registers) where the compiler targets it, else AVX2 + FMA
// (8 floats, 16 registers); a CPU with neither, or not x86, gets a clear #error (kernels.py prints
// it and deployment falls back to torch). tkp_lib/kernels.py builds with -march=native, or
// with -mno-avx512f for the AVX2 variant (TKP_KERNEL_ISA=avx2), from the same sources.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#else  // the first line the compiler prints, and the one tkp_lib/kernels.py shows
#error "the TKP kernels need an x86-64 CPU with AVX-512 or AVX2 and FMA; this one is not x86"
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace tkp_simd {

#if defined(__AVX512F__)

constexpr int V = 16;   // floats per vector
constexpr int REGS = 32;  // vector registers
constexpr const char* ISA = "avx512";
using vec = __m512;

inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset1(float v) { return _mm512_set1_ps(v); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline __mmask16 first_lanes(int64_t n) {
  return n >= V ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(n, 0)) - 1);
}
// the first n lanes of p (n may exceed V), zeros after; and their store
inline vec vload_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
inline void vstore_first(float* p, vec v, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
// lo holds columns 0..V-1 and hi columns V..2V-1 of a row: the even and the odd columns
inline void deinterleave(vec lo, vec hi, vec& even, vec& odd) {
  const __m512i e = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i o = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  even = _mm512_permutex2var_ps(lo, e, hi);
  odd = _mm512_permutex2var_ps(lo, o, hi);
}
// lanes k .. k+V-1 of the 2V lanes lo | hi (0 <= k < V)
inline vec vshift(vec lo, vec hi, int k) {
  const __m512i i = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32(k));
  return _mm512_permutex2var_ps(lo, i, hi);
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr int V = 8;
constexpr int REGS = 16;
constexpr const char* ISA = "avx2";
using vec = __m256;

inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset1(float v) { return _mm256_set1_ps(v); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline __m256i first_lanes(int64_t n) {
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t k = std::min<int64_t>(std::max<int64_t>(n, 0), V);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + V - k));
}
inline vec vload_first(const float* p, int64_t n) {
  return n >= V ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes(n));
}
inline void vstore_first(float* p, vec v, int64_t n) {
  if (n >= V) _mm256_storeu_ps(p, v);
  else if (n > 0) _mm256_maskstore_ps(p, first_lanes(n), v);
}
inline void deinterleave(vec lo, vec hi, vec& even, vec& odd) {
  // per 128-bit half: [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6], then the 64-bit pairs put in order
  const vec e = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
  const vec o = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
}
inline vec vshift(vec lo, vec hi, int k) {
  const __m256i i = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(k));
  const __m256i lane = _mm256_and_si256(i, _mm256_set1_epi32(7));
  const vec a = _mm256_permutevar8x32_ps(lo, lane), b = _mm256_permutevar8x32_ps(hi, lane);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7))));
}

#else
#error "the TKP kernels need a CPU with AVX-512 or AVX2 and FMA (built with -march=native); this one has neither"
#endif

// the max of each pair of neighbouring columns of the 2V columns lo | hi
inline vec pair_max(vec lo, vec hi) {
  vec even, odd;
  deinterleave(lo, hi, even, odd);
  return vmax(even, odd);
}

// Scratch memory kept per calling thread and reused across calls: fresh pages cost a page
// fault each (about 30 us per 256 KiB on the VMs measured), as much as a small layer's work.
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~Scratch() { std::free(ptr); }
  template <typename T>
  T* get(size_t n) {
    const size_t want = (n * sizeof(T) + 63) / 64 * 64;
    if (want > bytes) {
      std::free(ptr);
      ptr = std::aligned_alloc(64, want);
      if (ptr == nullptr) bytes = 0;
      else bytes = want;
    }
    return static_cast<T*>(ptr);
  }
};

}  // namespace tkp_simd
