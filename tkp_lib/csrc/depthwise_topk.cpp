// Depthwise Top-K convolution for CPUs: a depthwise Conv2d (groups = channels) whose every
// kh x kw kernel keeps at most K taps, computed from the kept taps alone (fp32, NCHW in and
// out). Per channel the output is K shifted, scaled copies of its input plane plus the bias,
// then an optional ReLU or ReLU6 clamp: memory-bound work, whose floor is one read of the
// input and one write of the output.
//
// Built on first use by tkp_lib.kernels (-O3 -march=native; TKP_KERNEL_ISA=avx2 builds the
// AVX2 + FMA variant on an AVX-512 machine) and registered as the torch op
// tkp::depthwise_topk2d (with a shape function for torch.compile and torch.export); one
// at::parallel_for over the (image, channel) planes per call, none for small work.
//
// Four ways through a plane, all straight from the NCHW input to the NCHW output (no copies):
//
//   flat (stride 1 and Wo == W: every "same"-padded stride-1 layer of MobileNet and
//   ConvNeXt): vectors of 16 (AVX2: 8) run along the flattened output plane. Output q reads
//   input q + (dy-ph)*W + dx-pw for tap (dy, dx): one masked, fault-suppressing load per tap
//   and vector, whose mask drops the lanes that would read padding (a row above or below the
//   plane, or a column that wraps into the next row). The masks depend on the plane's shape,
//   the tap and the vector only; they are built once per shape and kept. Small planes (7x7,
//   4x4) fill the vectors as well as large ones: only the plane's last vector has idle lanes.
//   Planes of one vector (4x4) go four at a time, for four independent accumulators.
//
//   tiny (AVX-512; not flat, output plane <= 16 values, input <= 64: the 8x8 stride-2
//   layers): the input plane sits in four registers and each tap's 16 output lanes are
//   picked from them by two two-register permutes and a blend; four planes at a time.
//
//   pairs (stride 2 along rows of at most L/2 outputs: 16x16 -> 8x8): output rows r and r+1
//   share a vector; per tap, one masked load of each input row and one even-lane permute.
//
//   rows (the rest: stride 2 on wider rows, other paddings, even kernels): vectors run along
//   each output row; tap (dy, dx) of output columns [c, c + L) reads input row
//   sh*oh + dy - ph, columns sw*c + dx - pw + [0, sw*L): one masked load (stride 1) or two and
//   an even-lane permute (stride 2), 4 output rows per step.
//
// Each kept tap's shift and mask row are looked up once per call, not per plane. Tried and
// dropped for stride 2: gathers (vgatherdps, about 7 ns per vector of 16 on the AMD EPYC
// measured: 144x32x32/2, K=4, batch 1 took 70 us against 42 us for the rows' loads and
// permute), and a zero-padded, phase-split copy of each plane in L1 as csrc/topk_conv.cpp
// makes (2-4x slower than the above on 8x8 planes: the copies cost more than the taps).
//
// Weights arrive as values[c][k] (float) and taps[c][k] (int32, dy*kw + dx); missing taps
// have value 0.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#else  // the first line the compiler prints, and the one tkp_lib/kernels.py shows
#error "the depthwise Top-K kernel needs an x86-64 CPU with AVX-512 or AVX2 and FMA; this one is not x86"
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "outputs.h"

namespace {

// ---- the vector instructions, one set per instruction set ---------------------------------

#if defined(__AVX512F__)
constexpr int L = 16;  // floats per vector
using Vec = __m512;
using LaneMask = uint16_t;
constexpr const char* kIsa = "avx512";
inline Vec vset1(float v) { return _mm512_set1_ps(v); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload_masked(const float* p, LaneMask m) { return _mm512_maskz_loadu_ps(m, p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline LaneMask first_lanes(int64_t n) { return LaneMask((1u << std::min<int64_t>(std::max<int64_t>(n, 0), L)) - 1); }
inline void vstore_first(float* p, int64_t n, Vec v) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }  // lanes [0, n)
inline Vec vload_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
inline void vstore_lanes(float* p, int64_t a, int64_t b, Vec v) {  // lanes [a, b) of v to p[a, b)
  _mm512_mask_storeu_ps(p, LaneMask(first_lanes(b) & ~first_lanes(a)), v);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int L = 8;
using Vec = __m256;
using LaneMask = uint8_t;
constexpr const char* kIsa = "avx2";
// lane mask -> the vector mask vmaskmovps takes (the sign bit of each 32-bit lane)
struct MaskTable {
  alignas(32) int32_t m[256][8];
  MaskTable() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) m[b][i] = (b >> i) & 1 ? -1 : 0;
  }
};
const MaskTable kMasks;
inline __m256i vmask(unsigned b) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(kMasks.m[b])); }
inline Vec vset1(float v) { return _mm256_set1_ps(v); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload_masked(const float* p, LaneMask m) { return _mm256_maskload_ps(p, vmask(m)); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline unsigned first_lanes(int64_t n) { return (1u << std::min<int64_t>(std::max<int64_t>(n, 0), L)) - 1; }
inline void vstore_first(float* p, int64_t n, Vec v) { _mm256_maskstore_ps(p, vmask(first_lanes(n)), v); }
inline Vec vload_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, vmask(first_lanes(n))); }
inline void vstore_lanes(float* p, int64_t a, int64_t b, Vec v) {
  _mm256_maskstore_ps(p, vmask(first_lanes(b) & ~first_lanes(a)), v);
}
#else
#error "the depthwise Top-K kernel needs AVX-512 or AVX2 with FMA (built with -march=native); this CPU has neither"
#endif

enum Act : int64_t { kNone = 0, kRelu = 1, kRelu6 = 2 };

template <int64_t A>
inline Vec activate(Vec v) {
  if (A == kNone) return v;
  v = vmax(v, vset1(0.f));
  return A == kRelu6 ? vmin(v, vset1(6.f)) : v;
}

// ---- the geometry of a call ---------------------------------------------------------------

struct Geometry {
  int64_t H, W, Ho, Wo, sh, sw;
  bool flat;                    // stride 1 and Wo == W
  bool tiny;                    // not flat; the output plane fits one vector, the input four (AVX-512 only)
  int64_t nvec, nvec_pad;       // flat: vectors per plane, and rounded up to the unroll
  std::vector<LaneMask> mask;   // flat: [tap][nvec_pad] the lanes whose read of tap's shift lies inside the plane
  std::vector<int32_t> index;   // tiny: [tap][L] the input element each output lane reads (0 where outside)
  std::vector<LaneMask> inside; // tiny: [tap] the lanes whose read lies inside the plane
};

constexpr int U = 4;  // the most vectors, rows, row pairs or planes per step, each its own accumulator

std::shared_ptr<const Geometry> make_geometry(const std::array<int64_t, 8>& key) {
  const auto [H, W, kh, kw, sh, sw, ph, pw] = key;
  auto g = std::make_shared<Geometry>();
  g->H = H, g->W = W, g->sh = sh, g->sw = sw;
  g->Ho = (H + 2 * ph - kh) / sh + 1;
  g->Wo = (W + 2 * pw - kw) / sw + 1;
  g->flat = sh == 1 && sw == 1 && g->Wo == W;
  g->nvec = (g->Ho * g->Wo + L - 1) / L;
  g->nvec_pad = (g->nvec + U - 1) / U * U;
  g->tiny = L == 16 && !g->flat && g->Ho * g->Wo <= L && H * W <= 4 * L;
  if (g->tiny) {
    g->index.assign(kh * kw * L, 0);
    g->inside.assign(kh * kw, 0);
    for (int64_t t = 0; t < kh * kw; ++t)
      for (int64_t q = 0; q < g->Ho * g->Wo; ++q) {
        const int64_t ih = sh * (q / g->Wo) + t / kw - ph, iw = sw * (q % g->Wo) + t % kw - pw;
        if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
        g->index[t * L + q] = int32_t(ih * W + iw);
        g->inside[t] |= LaneMask(1u << q);
      }
  }
  if (!g->flat) return g;
  g->mask.assign(kh * kw * g->nvec_pad, 0);
  for (int64_t t = 0; t < kh * kw; ++t) {
    const int64_t dy = t / kw, dx = t % kw;
    LaneMask* m = g->mask.data() + t * g->nvec_pad;
    // output (h, w) reads (h + dy - ph, w + dx - pw): inside for h in [h0, h1), w in [w0, w1)
    const int64_t h0 = std::max<int64_t>(0, ph - dy), h1 = std::min(g->Ho, H + ph - dy);
    const int64_t w0 = std::max<int64_t>(0, pw - dx), w1 = std::min(W, W + pw - dx);
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t q = h * W + w0; q < h * W + w1; ++q) m[q / L] |= LaneMask(1u << (q % L));
  }
  return g;
}

// Built once per shape (a handful per model) and kept.
std::shared_ptr<const Geometry> geometry(const std::array<int64_t, 8>& key) {
  static std::mutex lock;
  static std::map<std::array<int64_t, 8>, std::shared_ptr<const Geometry>> cache;
  std::lock_guard<std::mutex> guard(lock);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() >= 256) cache.clear();
  return cache[key] = make_geometry(key);
}

// ---- the ways through a plane --------------------------------------------------------------

#define TKP_INLINE inline __attribute__((always_inline))  // (into the loop over planes)

// flat: y = act(bias + sum_k w[k] * x shifted by tap[k]), U vectors at a time.
template <int64_t A, int U>
TKP_INLINE void flat_plane(const float* x, float* y, const float* w, const int32_t* ref, int64_t K, float bias,
                           const Geometry& g) {
  const int64_t n = g.Ho * g.Wo;
  for (int64_t v = 0; v < g.nvec; v += U) {
    Vec acc[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[u] = vset1(bias);
    for (int64_t k = 0; k < K; ++k) {
      const Vec wk = vset1(w[k]);
      const float* p = x + v * L + ref[2 * k];
      const LaneMask* m = g.mask.data() + ref[2 * k + 1] + v;
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[u] = vfma(wk, vload_masked(p + u * L, m[u]), acc[u]);
    }
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {  // (no early exit: acc stays in registers)
      const int64_t q = (v + u) * L;
      if (q + L <= n) vstore(y + q, activate<A>(acc[u]));
      else if (q < n) vstore_first(y + q, n - q, activate<A>(acc[u]));
    }
  }
}

// The lanes [lo, hi) of 2L, as a bit mask (empty where hi <= lo).
inline uint32_t lane_range(int64_t lo, int64_t hi) {
  lo = std::max<int64_t>(lo, 0), hi = std::min<int64_t>(hi, 2 * L);
  return hi <= lo ? 0u : uint32_t((uint64_t(1) << hi) - (uint64_t(1) << lo));
}

// The even elements of a[0, L) (lanes [0, L/2)) and of b[0, L) (lanes [L/2, L)), each loaded under its lane mask.
inline Vec load_evens(const float* a, LaneMask ma, const float* b, LaneMask mb) {
#if defined(__AVX512F__)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return _mm512_permutex2var_ps(vload_masked(a, ma), even, vload_masked(b, mb));
#else  // even lanes within each 128-bit half, then the 64-bit pairs in order
  const __m256 e = _mm256_shuffle_ps(vload_masked(a, ma), vload_masked(b, mb), 0x88);
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8));
#endif
}

// x[0, SW*L) under the lane mask m (2L bits), then every SW-th element: L values.
template <int SW>
inline Vec load_strided(const float* x, uint32_t m) {
  if (SW == 1) return vload_masked(x, LaneMask(m));
  return load_evens(x, LaneMask(m), x + L, LaneMask(m >> L));
}

// rows: U output rows at a time, L output columns at a time; SW = the stride along a row.
template <int64_t A, int U, int SW>
TKP_INLINE void rows_plane(const float* x, float* y, const float* w, const int32_t* ref, int64_t K, float bias,
                           const Geometry& g) {
  const int64_t H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo, sh = g.sh;  // (no reloads)
  for (int64_t oh = 0; oh < Ho; oh += U) {
    for (int64_t c = 0; c < Wo; c += L) {
      Vec acc[U];
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[u] = vset1(bias);
      for (int64_t k = 0; k < K; ++k) {
        const Vec wk = vset1(w[k]);
        const int64_t row = sh * oh + ref[2 * k], col = SW * c + ref[2 * k + 1];
        const uint32_t cols = lane_range(-col, W - col);  // the input columns inside the plane
        const float* p = x + row * W + col;
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          const uint32_t m = uint64_t(row + sh * u) < uint64_t(H) ? cols : 0;  // and the rows
          acc[u] = vfma(wk, load_strided<SW>(p + sh * u * W, m), acc[u]);
        }
      }
      const int64_t n = std::min<int64_t>(L, Wo - c);
      float* dst = y + oh * Wo + c;
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        if (oh + u < Ho) {
          if (n == L) vstore(dst + u * Wo, activate<A>(acc[u]));
          else vstore_first(dst + u * Wo, n, activate<A>(acc[u]));
        }
      }
    }
  }
}

// tiny: the input plane (at most 4L values) held in four registers, each tap's L output lanes
// picked from them by two two-register permutes and a blend: no loads but the plane's own.
template <int64_t A>
TKP_INLINE void tiny_plane(const float* x, float* y, const float* w, const int32_t* ref, int64_t K, float bias,
                           const Geometry& g) {
#if defined(__AVX512F__)
  const int64_t n = g.H * g.W;
  const __m512 in0 = vload_first(x, n), in1 = vload_first(x + L, n - L), in2 = vload_first(x + 2 * L, n - 2 * L),
               in3 = vload_first(x + 3 * L, n - 3 * L);
  __m512 acc = vset1(bias);
  for (int64_t k = 0; k < K; ++k) {
    const int32_t t = ref[2 * k];
    const __m512i idx = _mm512_loadu_si512(g.index.data() + t * L);
    const __m512 lo = _mm512_permutex2var_ps(in0, idx, in1), hi = _mm512_permutex2var_ps(in2, idx, in3);
    const __m512 v = _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(2 * L)), lo, hi);
    acc = _mm512_mask3_fmadd_ps(vset1(w[k]), v, acc, g.inside[t]);  // lanes outside the plane keep acc
  }
  vstore_first(y, g.Ho * g.Wo, activate<A>(acc));
#endif
}

// pairs (stride 2 along rows of at most L/2 outputs): output rows r and r+1 in one vector, the
// even elements of input rows sh*r + dy - ph and sh*(r+1) + dy - ph; U pairs at a time.
template <int64_t A, int U>
TKP_INLINE void pairs_plane(const float* x, float* y, const float* w, const int32_t* ref, int64_t K, float bias,
                            const Geometry& g) {
  const int64_t H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo, sh = g.sh;
  for (int64_t oh = 0; oh < Ho; oh += 2 * U) {
    Vec acc[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[u] = vset1(bias);
    for (int64_t k = 0; k < K; ++k) {
      const Vec wk = vset1(w[k]);
      const int64_t row = sh * oh + ref[2 * k], col = ref[2 * k + 1];
      const LaneMask cols = LaneMask(lane_range(-col, W - col));
      const float* p = x + row * W + col;
#pragma GCC unroll 4
      for (int u = 0; u < 2 * U; u += 2) {
        const LaneMask ma = uint64_t(row + sh * u) < uint64_t(H) ? cols : 0;
        const LaneMask mb = uint64_t(row + sh * (u + 1)) < uint64_t(H) ? cols : 0;
        acc[u / 2] = vfma(wk, load_evens(p + sh * u * W, ma, p + sh * (u + 1) * W, mb), acc[u / 2]);
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < 2 * U; u += 2) {
      const Vec v = activate<A>(acc[u / 2]);
      if (oh + u < Ho) vstore_first(y + (oh + u) * Wo, Wo, v);
      if (oh + u + 1 < Ho) vstore_lanes(y + (oh + u + 1) * Wo - L / 2, L / 2, L / 2 + Wo, v);
    }
  }
}

// What every plane of a call shares: plane p is image p / C, channel p % C.
struct Planes {
  const float* x;
  float* y;
  const float* w;        // [C][K]
  const int32_t* refs;   // [C][K][2] per tap: flat (shift, mask row offset), rows (dy - ph, dx - pw), tiny (tap, -)
  const float* bias;     // [C] or null
  int64_t C, K, in_plane, out_plane;
};

// Planes [p0, p1) the one way: Way 0 = flat, 1 = rows of stride 1, 2 = rows of stride 2, 3 = tiny, 4 = pairs.
template <int64_t A, int U, int Way>
void run(const Planes& P, const Geometry& g, int64_t p0, int64_t p1) {
  for (int64_t p = p0, c = p0 % P.C; p < p1; ++p, c = c + 1 == P.C ? 0 : c + 1) {
    const float* x = P.x + p * P.in_plane;
    float* y = P.y + p * P.out_plane;
    const float b = P.bias ? P.bias[c] : 0.f;
    const float* w = P.w + c * P.K;
    const int32_t* ref = P.refs + 2 * c * P.K;
    if constexpr (Way == 0) flat_plane<A, U>(x, y, w, ref, P.K, b, g);
    else if constexpr (Way == 3) tiny_plane<A>(x, y, w, ref, P.K, b, g);
    else if constexpr (Way == 4) pairs_plane<A, U>(x, y, w, ref, P.K, b, g);
    else rows_plane<A, U, Way>(x, y, w, ref, P.K, b, g);
  }
}

// flat planes of one vector each, four planes at a time (four independent accumulators)
template <int64_t A>
void run_single(const Planes& P, const Geometry& g, int64_t p0, int64_t p1) {
  const int64_t n = g.Ho * g.Wo, K = P.K;
  int64_t p = p0, c = p0 % P.C;
  for (; p + 4 <= p1; p += 4) {
    int64_t cs[4];
    Vec acc[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      cs[u] = c, c = c + 1 == P.C ? 0 : c + 1;
      acc[u] = vset1(P.bias ? P.bias[cs[u]] : 0.f);
    }
    const float* x = P.x + p * P.in_plane;
    for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const int32_t* r = P.refs + 2 * (cs[u] * K + k);
        acc[u] = vfma(vset1(P.w[cs[u] * K + k]), vload_masked(x + u * P.in_plane + r[0], g.mask[r[1]]), acc[u]);
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) vstore_first(P.y + (p + u) * P.out_plane, n, activate<A>(acc[u]));
  }
  run<A, 1, 0>(P, g, p, p1);
}

// tiny planes, four at a time
template <int64_t A>
void run_tiny4(const Planes& P, const Geometry& g, int64_t p0, int64_t p1) {
#if defined(__AVX512F__)
  const int64_t n = g.H * g.W, K = P.K;
  int64_t p = p0, c = p0 % P.C;
  for (; p + 4 <= p1; p += 4) {
    int64_t cs[4];
    __m512 in[4][4], acc[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      cs[u] = c, c = c + 1 == P.C ? 0 : c + 1;
      acc[u] = vset1(P.bias ? P.bias[cs[u]] : 0.f);
      const float* x = P.x + (p + u) * P.in_plane;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) in[u][j] = vload_first(x + j * L, n - j * L);
    }
    for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const int32_t t = P.refs[2 * (cs[u] * K + k)];
        const __m512i idx = _mm512_loadu_si512(g.index.data() + t * L);
        const __m512 lo = _mm512_permutex2var_ps(in[u][0], idx, in[u][1]);
        const __m512 hi = _mm512_permutex2var_ps(in[u][2], idx, in[u][3]);
        const __m512 v = _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(2 * L)), lo, hi);
        acc[u] = _mm512_mask3_fmadd_ps(vset1(P.w[cs[u] * K + k]), v, acc[u], g.inside[t]);
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) vstore_first(P.y + (p + u) * P.out_plane, g.Ho * g.Wo, activate<A>(acc[u]));
  }
  run<A, 1, 3>(P, g, p, p1);
#endif
}

using RunFn = void (*)(const Planes&, const Geometry&, int64_t, int64_t);

template <int Way>
RunFn pick_unroll(int64_t act, int64_t n) {  // n: vectors (flat) or rows per plane
  static constexpr RunFn table[3][3] = {{run<kNone, 1, Way>, run<kNone, 2, Way>, run<kNone, 4, Way>},
                                        {run<kRelu, 1, Way>, run<kRelu, 2, Way>, run<kRelu, 4, Way>},
                                        {run<kRelu6, 1, Way>, run<kRelu6, 2, Way>, run<kRelu6, 4, Way>}};
  return table[act][n >= 4 ? 2 : n >= 2 ? 1 : 0];
}

RunFn pick_run(const Geometry& g, int64_t act) {
  if (g.flat && g.nvec == 1) return act == kRelu ? run_single<kRelu> : act == kRelu6 ? run_single<kRelu6>
                                                                                       : run_single<kNone>;
  if (g.flat) return pick_unroll<0>(act, g.nvec);
  if (g.tiny) return act == kRelu ? run_tiny4<kRelu> : act == kRelu6 ? run_tiny4<kRelu6> : run_tiny4<kNone>;
  if (g.sw == 2 && 2 * g.Wo <= L) return pick_unroll<4>(act, g.Ho / 2);
  return g.sw == 1 ? pick_unroll<1>(act, g.Ho) : pick_unroll<2>(act, g.Ho);
}

// ---- the op ------------------------------------------------------------------------------

at::Tensor depthwise_topk2d(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& taps,
                            const c10::optional<at::Tensor>& bias_in, int64_t kh, int64_t kw, int64_t stride_h,
                            int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t act) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 4,
              "tkp::depthwise_topk2d: x must be a float32 CPU tensor (N, C, H, W)");
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.dim() == 2 && values.is_contiguous(),
              "tkp::depthwise_topk2d: values must be contiguous float32 (C, K)");
  TORCH_CHECK(taps.scalar_type() == at::kInt && taps.sizes() == values.sizes() && taps.is_contiguous(),
              "tkp::depthwise_topk2d: taps must be contiguous int32 shaped like values");
  const int64_t C = values.size(0), K = values.size(1);
  TORCH_CHECK(x_in.size(1) == C, "tkp::depthwise_topk2d: x has ", x_in.size(1), " channels, the weights ", C);
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh * kw <= 256 && stride_h >= 1 && stride_h <= 2 && stride_w >= 1 &&
                  stride_w <= 2 && pad_h >= 0 && pad_w >= 0,
              "tkp::depthwise_topk2d: bad kernel size, stride (1 or 2) or padding");
  TORCH_CHECK(act >= kNone && act <= kRelu6, "tkp::depthwise_topk2d: act must be 0 (none), 1 (ReLU) or 2 (ReLU6)");
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H + 2 * pad_h >= kh && W + 2 * pad_w >= kw, "tkp::depthwise_topk2d: input smaller than the kernel");
  TORCH_CHECK(H * W < (int64_t(1) << 24), "tkp::depthwise_topk2d: planes of more than 2^24 values");
  const int64_t Ho = (H + 2 * pad_h - kh) / stride_h + 1, Wo = (W + 2 * pad_w - kw) / stride_w + 1;
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == C, "tkp::depthwise_topk2d: bad bias");
  }
  const int32_t* tp = taps.data_ptr<int32_t>();
  uint32_t bad = 0;  // a loop the compiler vectorises
  for (int64_t j = 0; j < taps.numel(); ++j) bad |= uint32_t(uint32_t(tp[j]) >= uint32_t(kh * kw));
  TORCH_CHECK(bad == 0, "tkp::depthwise_topk2d: tap index out of range");
  at::Tensor out = tkp_outputs::empty({N, C, Ho, Wo});
  if (out.numel() == 0) return out;

  const auto g = geometry({H, W, kh, kw, stride_h, stride_w, pad_h, pad_w});
  // what each kept tap reads, once per call rather than per plane: per tap of the kernel, then
  // per (channel, kept tap) from that table (no division per entry)
  std::vector<int32_t> tap_refs(2 * kh * kw), refs(2 * taps.numel());
  for (int64_t t = 0; t < kh * kw; ++t) {
    const int64_t dy = t / kw - pad_h, dx = t % kw - pad_w;
    tap_refs[2 * t] = int32_t(g->flat ? dy * W + dx : g->tiny ? t : dy);
    tap_refs[2 * t + 1] = int32_t(g->flat ? t * g->nvec_pad : dx);
  }
  for (int64_t j = 0; j < taps.numel(); ++j)
    refs[2 * j] = tap_refs[2 * tp[j]], refs[2 * j + 1] = tap_refs[2 * tp[j] + 1];
  const Planes P{x.data_ptr<float>(), out.data_ptr<float>(), values.data_ptr<float>(), refs.data(),
                 bias.defined() ? bias.data_ptr<float>() : nullptr, C, K, H * W, Ho * Wo};
  // planes per task: at least 64 Ki multiply-adds' worth, so that small layers run on the calling thread alone
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (Ho * Wo * std::max<int64_t>(K, 1)));
  const RunFn fn = pick_run(*g, act);
  at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) { fn(P, *g, p0, p1); });
  return out;
}

// Shapes only, for torch.compile / torch.export tracing (FakeTensor).
at::Tensor depthwise_topk2d_meta(const at::Tensor& x, const at::Tensor& values, const at::Tensor&,
                                 const c10::optional<at::Tensor>&, int64_t kh, int64_t kw, int64_t stride_h,
                                 int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t) {
  auto ho = (x.sym_size(2) + 2 * pad_h - kh) / stride_h + 1;
  auto wo = (x.sym_size(3) + 2 * pad_w - kw) / stride_w + 1;
  return at::empty_symint({x.sym_size(0), values.sym_size(0), ho, wo}, x.options());
}

std::string isa() { return kIsa; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(tkp, m) {
  m.def("depthwise_topk2d(Tensor x, Tensor values, Tensor taps, Tensor? bias, int kh, int kw, int stride_h, "
        "int stride_w, int pad_h, int pad_w, int act=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(tkp, CPU, m) { m.impl("depthwise_topk2d", &depthwise_topk2d); }

TORCH_LIBRARY_IMPL(tkp, Meta, m) { m.impl("depthwise_topk2d", &depthwise_topk2d_meta); }

#ifdef TORCH_EXTENSION_NAME
// The same function as a plain Python binding: eager calls skip torch.ops' argument parsing
// (about 10 us a call, as much as a small layer's work); torch.compile uses the op.
#include <torch/csrc/utils/pybind.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("depthwise_topk2d", &depthwise_topk2d, "tkp::depthwise_topk2d without the dispatcher");
  m.def("isa", &isa, "the instruction set this build uses: avx512 or avx2");
  m.def("output_cache", &tkp_outputs::stats, "[freed outputs kept, their bytes] of this kernel's cache (outputs.h)");
  m.def("release_outputs", &tkp_outputs::release, "frees the outputs this kernel keeps; the bytes freed");
}
#endif
