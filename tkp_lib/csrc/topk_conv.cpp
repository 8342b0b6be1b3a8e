// Top-K convolution for CPUs: a Conv2d whose every kernel W[o, i] keeps at most K of its
// kh*kw taps, computed from the kept taps alone (fp32, NCHW in and out, groups = 1).
//
// Built on first use by tkp_lib/kernels.py through torch.utils.cpp_extension (-O3
// -march=native, -fopenmp where torch uses OpenMP, so that at::parallel_for runs on torch's
// own thread pool) and registered as the torch op tkp::topk_conv2d (with a shape function for
// torch.compile and torch.export). AVX-512 or AVX2 + FMA (simd.h), chosen at build time;
// V below is the vector width in floats (16 or 8).
//
// How it is fast. The input is first copied into a zero-padded "flat" layout in which every
// tap (dy, dx) of the kernel is one constant offset: stride 1 puts the images of a group one
// below the other with the padding rows and columns shared by neighbours, so that output
// position q reads input q + dy*Wr + dx; stride s splits the padded input into its s*s
// phases, and tap (dy, dx) reads phase (dy % s, dx % s) at offset (dy/s)*Wr + dx/s. The
// output is then, per output channel o, a sum over the kept (input channel, offset, weight)
// entries of weight * (input plane shifted by the offset): one vector multiply-add per V
// output positions and entry, with no index arithmetic in the loop. A register tile holds
// M output channels x S vectors of V positions; each entry's weight is broadcast once and
// feeds S multiply-adds whose input operand comes straight from L1: input channels are
// blocked so that their shifted windows stay there while every tile of output channels
// passes over them, and the next windows are prefetched meanwhile. Output positions that
// fall on padding are computed and dropped when the sums are copied out to NCHW, where the
// epilogue also adds a residual, applies ReLU and a 2x2 max pool when asked. M and S are
// template parameters, columns (below) a run-time argument; tkp_deploy.py picks the fastest
// (M, S, columns) tile per layer by measuring it. The
// batch goes through in groups of images whose planes fit in L2; threads: see run_groups.
//
// What bounds it: each multiply-add loads one unaligned 64-byte vector, which mostly spans
// two cache lines, so the loop runs at about one multiply-add per cycle, where a dense
// kernel reuses every loaded vector many times. At stride 1 the tiles can instead read one
// copy of the input per kernel column (columns = 1, Geometry::columns): rows of Wo rounded up
// to 8 floats, no padding columns, so that every load starts on a 32-byte boundary. An AMD
// Zen 4 loads those as fast as aligned ones (2.4-2.7 against 1.66 G multiply-adds/s for
// arbitrary offsets, RESULTS.md 2026-12-07), and rows of 8 or 16 floats also drop the
// padding column's positions (8x8: 64 positions, not 71); the copies cost kw times the
// input's L1 and L2 room. Best tile with copies against best without, 1 thread: 1.21x at
// 128 @ 16 and 1.26x at 256 @ 8, batch 1, 1.07-1.19x at batch 32, 0.95-0.96x at 64 @ 56; so
// both are compiled in and deployment times both. Four other variants that make the loads
// aligned were measured and dropped: shifted copies of the input per offset residue (the
// windows no longer fit L1); the same with 8-float vectors, whose residues are fewer (3 copies at 7x7:
// 0.66 against 0.71 ms at 512 channels, 7x7, batch 1, single runs; even at 8x8: not worth a
// second tile family); sums grouped by tap at aligned positions, shifted into place in
// memory once per tap (the extra read-modify-write per tap cost what the aligned loads
// saved; shifted in registers instead, they are the (0, S) tiles below, kept where faster);
// and aligned loads shifted in registers per multiply-add (a two-source permute each: 0.85-0.90
// against 0.68-0.72 ms at 512 channels, 7x7, batch 1; 1.17x slower at 8x8). Nor did 8-float
// vectors with all 32 registers help, though a 7x7 plane then computes 56 positions, not 64
// (even at 7x7, 0.91x at 8x8, 0.94-1.02x at 16x16 and 32x32).
//
// Weights arrive packed per tile of M output channels: values[t][i][k][m] (float) and
// taps[t][i][k][m] (int32, dy*kw + dx), missing taps and padded channels with value 0.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "simd.h"  // first: its #error is the line a CPU it cannot build for sees
#include "parallel.h"
#include "outputs.h"

namespace {

using namespace tkp_simd;

thread_local Scratch scratch_input, scratch_output;


// ---- the register tile ------------------------------------------------------------------

template <int M, int S>
void tile(const float* x, int64_t plane, int64_t c0, int64_t c1, int64_t K, const float* w, const int32_t* tap,
          const int32_t* tap_off, const float* bias, float* y, int64_t ystride, const int64_t* prefetch,
          int64_t n_prefetch) {
  // y[m][0 .. V*S) (+)= sum over channels c in [c0, c1), k < K of w[c][k][m] * x[c][tap_off[tap[c][k][m]] + ...];
  // and the n_prefetch lines at xc + prefetch[j] of each channel (its next tile) into L1 meanwhile
  // loops unrolled whole, so that g++ keeps acc in registers rather than a copy on the stack
  // (AVX-512, batch 1 and 32: Intel Xeon 0.99-1.05x, above 1.00x in 35 of 40 cases; AMD Zen 4
  // 1.02-1.17x on the 4x4, 4x6, 5x5 and 7x4 tiles)
  vec acc[M][S];
#pragma GCC unroll 32
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) acc[m][s] = bias ? vset1(bias[m]) : vload(y + m * ystride + s * V);
  w += c0 * K * M;
  tap += c0 * K * M;
  const float* xc = x + c0 * plane;
  for (int64_t c = c0; c < c1; ++c, xc += plane) {
    for (int64_t j = 0; j < n_prefetch; ++j) _mm_prefetch(reinterpret_cast<const char*>(xc + prefetch[j]), _MM_HINT_T0);
    for (int64_t k = 0; k < K; ++k, w += M, tap += M) {
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const vec wv = vset1(w[m]);
        const float* p = xc + tap_off[tap[m]];
#pragma GCC unroll 16
        for (int s = 0; s < S; ++s) acc[m][s] = vfmadd(wv, vload(p + s * V), acc[m][s]);
      }
    }
  }
#pragma GCC unroll 32
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) vstore(y + m * ystride + s * V, acc[m][s]);
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*,
                        const int32_t*, const float*, float*, int64_t, const int64_t*, int64_t);

struct TileKind {
  int m, s;
  TileFn fn;
};

// The (M, S) register tiles compiled in: M*S accumulators plus one broadcast weight fit the
// vector registers (32 on AVX-512; 16 on AVX2, where 4x4 and 2x8 spill one). Small S suits
// small planes (batch 1 at 8x8), large S large ones. On AVX2 (an AMD Zen 3) one output channel
// with 7-14 vectors was the fastest tile on most layers: each (channel, tap) entry's broadcast
// weight and tap lookups then feed S multiply-adds (256 @ 8, batch 1: 1.16-1.43x over the best
// tile compiled before). An 8x8 image is 71 flat positions: one tile of 9 vectors computes 72
// (256 @ 8, batch 1: 1.17x over 11 vectors; at Top-2 1.07x over 10, the best there before);
// 16 x 16 is 271, three tiles of 12.
#if defined(__AVX512F__)
const TileKind kTiles[] = {
    {1, 8, tile<1, 8>},   {2, 4, tile<2, 4>},  {2, 8, tile<2, 8>},  {2, 12, tile<2, 12>}, {3, 5, tile<3, 5>},
    {3, 8, tile<3, 8>},   {4, 2, tile<4, 2>},  {4, 4, tile<4, 4>},  {4, 5, tile<4, 5>},   {4, 6, tile<4, 6>},
    {4, 7, tile<4, 7>},   {5, 5, tile<5, 5>},  {6, 4, tile<6, 4>},  {6, 5, tile<6, 5>},
    {7, 4, tile<7, 4>},   {8, 1, tile<8, 1>},  {8, 2, tile<8, 2>},  {8, 3, tile<8, 3>},   {12, 2, tile<12, 2>},
    {14, 2, tile<14, 2>}, {16, 1, tile<16, 1>}, {24, 1, tile<24, 1>},
};
#else
const TileKind kTiles[] = {
    {1, 7, tile<1, 7>},   {1, 8, tile<1, 8>},   {1, 9, tile<1, 9>}, {1, 10, tile<1, 10>}, {1, 11, tile<1, 11>},
    {1, 12, tile<1, 12>}, {1, 13, tile<1, 13>}, {1, 14, tile<1, 14>}, {2, 4, tile<2, 4>}, {2, 6, tile<2, 6>},
    {2, 7, tile<2, 7>},   {2, 8, tile<2, 8>},
    {3, 4, tile<3, 4>},   {4, 2, tile<4, 2>}, {4, 3, tile<4, 3>},   {4, 4, tile<4, 4>},   {5, 3, tile<5, 3>},
    {7, 2, tile<7, 2>},   {8, 1, tile<8, 1>}, {14, 1, tile<14, 1>},
};
#endif

TileFn find_tile(int64_t m, int64_t s) {
  for (const auto& t : kTiles)
    if (t.m == m && t.s == s) return t.fn;
  return nullptr;
}


// ---- the aligned variant: one output channel at a time, its sums grouped by tap -----------
//
// Tile kind (0, S). Output o's kept entries are grouped by tap; per group, the products are
// summed at aligned positions (one aligned load per multiply-add: no load spans two cache
// lines) over S + 1 vectors, and the group's sum is then shifted into place in registers
// (one permute per vector and group, at most kh*kw groups per output and tile). The entries
// come packed per output, sorted by tap: code[e] = channel * 256 + tap, w[e] its weight,
// the zero weights last.
template <int S>
void tile_aligned(const float* x, int64_t plane, int64_t E, const float* w, const int32_t* code,
                  const int32_t* tap_off, float bias, float* y) {
  vec acc[S], u[S + 1];
  for (int s = 0; s < S; ++s) acc[s] = vset1(bias);
  int32_t tap = -1;
  for (int64_t e = 0; e <= E; ++e) {
    if (e == E || (code[e] & 255) != tap) {  // a new group: the last one's sums shifted into place
      if (tap >= 0)
        for (int s = 0; s < S; ++s) acc[s] = vadd(acc[s], vshift(u[s], u[s + 1], tap_off[tap] % V));
      if (e == E) break;
      tap = code[e] & 255;
      for (int s = 0; s <= S; ++s) u[s] = vzero();
    }
    if (w[e] == 0.f) {  // the zero weights come last (packed so): the last group closes
      e = E - 1;
      continue;
    }
    const vec wv = vset1(w[e]);
    const float* p = x + (code[e] >> 8) * plane + tap_off[tap] / V * V;
#pragma GCC unroll 16
    for (int s = 0; s <= S; ++s) u[s] = vfmadd(wv, vload(p + s * V), u[s]);
  }
  for (int s = 0; s < S; ++s) vstore(y + s * V, acc[s]);
}

using AlignedFn = void (*)(const float*, int64_t, int64_t, const float*, const int32_t*, const int32_t*, float,
                          float*);

struct AlignedKind {
  int s;
  AlignedFn fn;
};

// 2S + 2 vectors (sums, group sums, weight) in the registers
#if defined(__AVX512F__)
const AlignedKind kAligned[] = {{4, tile_aligned<4>}, {6, tile_aligned<6>}, {8, tile_aligned<8>},
                                {12, tile_aligned<12>}, {14, tile_aligned<14>}};
#else
const AlignedKind kAligned[] = {{3, tile_aligned<3>}, {4, tile_aligned<4>}, {6, tile_aligned<6>}};
#endif

AlignedFn find_aligned(int64_t s) {
  for (const auto& t : kAligned)
    if (t.s == s) return t.fn;
  return nullptr;
}

// ---- geometry of the flat layout ----------------------------------------------------------

// The layout of one group of G images (the batch is processed G images at a time, so that a
// group's input and output stay in L2).
struct Geometry {
  int64_t C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, G;
  int64_t phases;               // 1 for stride 1 (shared padding), else sh * sw; kw with columns
  int64_t Hr, Wr;               // rows per image and row stride of one (phase) plane
  int64_t phase_size;           // floats per phase (all G images)
  int64_t tile_q, q_pad;        // output positions per tile; computed positions, rounded to tiles
  int64_t plane;                // floats per input channel, slack included
  std::vector<int64_t> tap_off;  // tap dy*kw + dx -> offset of its input from the output position
  int64_t max_off = 0;           // the largest offset
  int64_t max_shift = 0;         // the largest offset within a phase
  bool columns = false;          // at stride 1 when asked: one copy of the input per kernel column (below)

  // the flat positions up to the last that holds an output: output (n, oh, ow) is position
  // n * Hr * Wr + oh * Wr + ow; those after the last image's last output are not computed
  int64_t q_total(int64_t images) const { return (images - 1) * Hr * Wr + (Ho - 1) * Wr + Wo; }
};

Geometry make_geometry(int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw, int64_t G, int64_t tile_q, int64_t columns) {
  Geometry g;
  g.C = C, g.H = H, g.W = W, g.kh = kh, g.kw = kw, g.sh = sh, g.sw = sw, g.ph = ph, g.pw = pw, g.G = G;
  g.Ho = (H + 2 * ph - kh) / sh + 1;
  g.Wo = (W + 2 * pw - kw) / sw + 1;
  g.columns = columns == 1 && sh == 1 && sw == 1;
  if (g.columns) {
    // copy dx (one per kernel column, each a "phase") holds in its row slot r, column j the
    // padded input's row r, column j + dx: row slots as below, rows of Wr = Wo rounded up to
    // 8 floats with no padding columns (copy dx has its zeros where j + dx falls on padding),
    // so that tap (dy, dx) reads copy dx at offset dy * Wr: a multiple of 8 floats, 32 bytes
    g.phases = kw;
    g.Hr = std::max(H + ph, g.Ho);
    g.Wr = (g.Wo + 7) / 8 * 8;
    g.phase_size = (G * g.Hr * g.Wr + ph * g.Wr + 15) / 16 * 16;  // each copy starts on a cache line
  } else if (sh == 1 && sw == 1) {
    // image n's row slot r holds padded row r: ph zero rows, then the data rows (each ph
    // zeros, then W values, then zeros up to Wr); the zeros right of a row are the left
    // padding of the next one, the zero rows below an image the top padding of the next.
    g.phases = 1;
    g.Hr = std::max(H + ph, g.Ho);
    g.Wr = std::max(W + pw, g.Wo);
    g.phase_size = G * g.Hr * g.Wr + ph * g.Wr;  // zero rows below the last image
  } else {
    // phase (a, b) holds the padded input's rows a, a + sh, ... and columns b, b + sw, ...
    g.phases = sh * sw;
    g.Hr = (H + 2 * ph + sh - 1) / sh;
    g.Wr = (W + 2 * pw + sw - 1) / sw;
    g.phase_size = G * g.Hr * g.Wr;
  }
  for (int64_t dy = 0; dy < kh; ++dy)
    for (int64_t dx = 0; dx < kw; ++dx) {
      const int64_t shift = g.columns ? dy * g.Wr : (dy / sh) * g.Wr + dx / sw;
      g.tap_off.push_back((g.columns ? dx : (dy % sh) * sw + dx % sw) * g.phase_size + shift);
      g.max_off = std::max(g.max_off, g.tap_off.back());
      g.max_shift = std::max(g.max_shift, shift);
    }
  g.tile_q = tile_q;
  g.q_pad = (g.q_total(G) + tile_q - 1) / tile_q * tile_q;
  // every read of every tile stays inside the channel's plane; an odd number of cache lines
  // per plane spreads the channels' windows over the L1 sets
  const int64_t lines = (std::max(g.phases * g.phase_size, g.q_pad + g.max_off) + V + 15) / 16;
  g.plane = (lines | 1) * 16;
  return g;
}

// Channel c of images [n0, n0 + count) -> dst, one copy per kernel column (Geometry::columns).
void prepare_columns(const float* x, int64_t n0, int64_t count, int64_t c, float* dst, const Geometry& g) {
  const int64_t Hr = g.Hr, Wr = g.Wr, W = g.W;
  for (int64_t dx = 0; dx < g.kw; ++dx) {
    float* copy = dst + dx * g.phase_size;
    // column j holds input column j + dx - pw: zeros left of lo and from hi on
    const int64_t lo = std::min(Wr, std::max<int64_t>(0, g.pw - dx));
    const int64_t hi = std::max(lo, std::min(Wr, W + g.pw - dx));
    for (int64_t n = 0; n < count; ++n) {
      const float* src = x + ((n0 + n) * g.C + c) * g.H * W;
      float* img = copy + n * Hr * Wr;
      std::memset(img, 0, sizeof(float) * g.ph * Wr);
      float* row = img + g.ph * Wr;
      for (int64_t h = 0; h < g.H; ++h, row += Wr, src += W) {
        std::memset(row, 0, sizeof(float) * lo);
        if (hi > lo) std::memcpy(row + lo, src + lo + dx - g.pw, sizeof(float) * (hi - lo));
        std::memset(row + hi, 0, sizeof(float) * (Wr - hi));
      }
      std::memset(row, 0, sizeof(float) * (img + Hr * Wr - row));  // row slots below the data
    }
    std::memset(copy + count * Hr * Wr, 0, sizeof(float) * (g.phase_size - count * Hr * Wr));
  }
  std::memset(dst + g.kw * g.phase_size, 0, sizeof(float) * (g.plane - g.kw * g.phase_size));
}

// images [n0, n0 + count) of x (N, C, H, W) -> buf (C, plane) in the flat layout, zeros around.
void prepare_input(const float* x, int64_t n0, int64_t count, float* buf, const Geometry& g) {
  {
    for (int64_t c = 0; c < g.C; ++c) {
      float* dst = buf + c * g.plane;
      if (g.columns) {
        prepare_columns(x, n0, count, c, dst, g);
      } else if (g.phases == 1) {
        const int64_t Hr = g.Hr, Wr = g.Wr, W = g.W;
        for (int64_t n = 0; n < count; ++n) {
          const float* src = x + ((n0 + n) * g.C + c) * g.H * W;
          float* img = dst + n * Hr * Wr;
          std::memset(img, 0, sizeof(float) * (g.ph * Wr + g.pw));
          float* row = img + g.ph * Wr + g.pw;
          for (int64_t h = 0; h < g.H; ++h, row += Wr, src += W) {
            std::memcpy(row, src, sizeof(float) * W);
            std::memset(row + W, 0, sizeof(float) * (Wr - W));  // up to the next row's first value
          }
          float* end = img + Hr * Wr;
          float* tail = row - g.pw;  // after the last data row's zeros
          if (end > tail) std::memset(tail, 0, sizeof(float) * (end - tail));
        }
        std::memset(dst + count * Hr * Wr, 0, sizeof(float) * (g.plane - count * Hr * Wr));
      } else {
        std::memset(dst, 0, sizeof(float) * g.plane);
        for (int64_t n = 0; n < count; ++n) {
          const float* src = x + ((n0 + n) * g.C + c) * g.H * g.W;
          // padded (r, col) = (h + ph, w + pw) goes to phase (r % sh, col % sw) at (r / sh, col / sw)
          for (int64_t h = 0; h < g.H; ++h) {
            const int64_t r = h + g.ph;
            const float* row = src + h * g.W;
            float* prow0 = dst + (r % g.sh) * g.sw * g.phase_size + n * g.Hr * g.Wr + (r / g.sh) * g.Wr;
            if (g.sw == 2) {  // 32 columns at a time: the even ones to one phase, the odd ones to the other
              for (int64_t w0 = 0; w0 < g.W; w0 += 2 * V) {
                const int64_t n_all = std::min<int64_t>(2 * V, g.W - w0);
                const vec a = vload_first(row + w0, n_all), b = vload_first(row + w0 + V, n_all - V);
                vec parts[2];
                deinterleave(a, b, parts[0], parts[1]);
                for (int64_t parity = 0; parity < 2; ++parity) {  // columns w0 + parity + 2i
                  const int64_t w = w0 + parity;
                  float* d = prow0 + ((w + g.pw) % 2) * g.phase_size + (w + g.pw) / 2;
                  vstore_first(d, parts[parity], (n_all - parity + 1) / 2);
                }
              }
              continue;
            }
            for (int64_t b = 0; b < g.sw; ++b) {
              float* prow = prow0 + b * g.phase_size;
              int64_t w = ((b - g.pw) % g.sw + g.sw) % g.sw;  // first column with (w + pw) % sw == b
              for (; w < g.W; w += g.sw) prow[(w + g.pw) / g.sw] = row[w];
            }
          }
        }
      }
    }
  }
}

// ---- the epilogue: flat rows -> NCHW, + residual, ReLU, 2x2 max pool --------------------------

// One output plane: src rows (stride Wr, Ho x Wo valid) -> dst (Ho x Wo, or Ho/2 x Wo/2 with
// pool == 2), adding res (Ho x Wo) first and applying ReLU when asked.
void epilogue(const float* src, int64_t Wr, int64_t Ho, int64_t Wo, const float* res, bool relu, int64_t pool,
              float* dst) {
  auto value = [&](const float* row, const float* res_row, int64_t w, int64_t n) {
    vec v = vload_first(row + w, n);
    if (res_row) v = vadd(v, vload_first(res_row + w, n));
    return v;
  };
  if (pool == 0) {
    for (int64_t h = 0; h < Ho; ++h, src += Wr, dst += Wo) {
      const float* res_row = res ? res + h * Wo : nullptr;
      for (int64_t w = 0; w < Wo; w += V) {
        vec v = value(src, res_row, w, Wo - w);
        if (relu) v = vmax(v, vzero());
        vstore_first(dst + w, v, Wo - w);
      }
    }
    return;
  }
  // 2x2 max pool, stride 2: the max of two rows, then of each pair of neighbouring lanes
  const int64_t Hp = Ho / 2, Wp = Wo / 2;
  for (int64_t ph = 0; ph < Hp; ++ph, dst += Wp) {
    const float* r0 = src + 2 * ph * Wr;
    const float* r1 = r0 + Wr;
    const float* s0 = res ? res + 2 * ph * Wo : nullptr;
    const float* s1 = res ? s0 + Wo : nullptr;
    for (int64_t pw = 0; pw < Wp; pw += V) {
      const int64_t c = 2 * pw, n0 = 2 * Wp - c, n1 = 2 * Wp - c - V;
      const vec lo = vmax(value(r0, s0, c, n0), value(r1, s1, c, n0));
      const vec hi = vmax(value(r0, s0, c + V, n1), value(r1, s1, c + V, n1));
      vec v = pair_max(lo, hi);
      if (relu) v = vmax(v, vzero());
      vstore_first(dst + pw, v, Wp - pw);
    }
  }
}

// ---- the op ------------------------------------------------------------------------------

// What every call shares, whichever kernel computes the sums.
struct Call {
  at::Tensor x, bias, residual, out;
  int64_t N, C, H, W, O, kh, kw, sh, sw, ph, pw, pool, out_h, out_w;
  bool relu;
};

Call check_call(const at::Tensor& x_in, int64_t c_in, const c10::optional<at::Tensor>& bias_in, int64_t out_channels,
                int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool relu,
                const c10::optional<at::Tensor>& residual_in, int64_t pool) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 4,
              "tkp::topk_conv2d: x must be a float32 CPU tensor (N, C, H, W)");
  TORCH_CHECK(x_in.size(1) == c_in, "tkp::topk_conv2d: x has ", x_in.size(1), " channels, the weights ", c_in);
  TORCH_CHECK(sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0 && kh >= 1 && kw >= 1 && kh * kw <= 256,
              "tkp::topk_conv2d: bad stride, padding or kernel size");
  TORCH_CHECK(x_in.size(2) + 2 * ph >= kh && x_in.size(3) + 2 * pw >= kw,
              "tkp::topk_conv2d: input smaller than the kernel");
  TORCH_CHECK(pool == 0 || pool == 2, "tkp::topk_conv2d: pool must be 0 or 2 (2x2 max pool, stride 2)");
  Call c;
  c.x = x_in.contiguous();
  c.N = c.x.size(0), c.C = c_in, c.H = c.x.size(2), c.W = c.x.size(3), c.O = out_channels;
  c.kh = kh, c.kw = kw, c.sh = sh, c.sw = sw, c.ph = ph, c.pw = pw, c.relu = relu, c.pool = pool;
  if (bias_in.has_value() && bias_in->defined()) {
    c.bias = bias_in->contiguous();
    TORCH_CHECK(c.bias.scalar_type() == at::kFloat && c.bias.numel() == out_channels, "tkp::topk_conv2d: bad bias");
  }
  const int64_t Ho = (c.H + 2 * ph - kh) / sh + 1, Wo = (c.W + 2 * pw - kw) / sw + 1;
  if (residual_in.has_value() && residual_in->defined()) {
    c.residual = residual_in->contiguous();
    TORCH_CHECK(c.residual.scalar_type() == at::kFloat && c.residual.device().is_cpu() &&
                    c.residual.sizes() == at::IntArrayRef({c.N, c.O, Ho, Wo}),
                "tkp::topk_conv2d: residual must be a float32 CPU tensor shaped like the convolution's output");
  }
  c.out_h = pool ? Ho / 2 : Ho, c.out_w = pool ? Wo / 2 : Wo;
  c.out = tkp_outputs::empty({c.N, c.O, c.out_h, c.out_w});
  return c;
}

// How the batch is cut into groups of images: a group's input planes and sums fit in about 1 MiB
// of L2; on threads, a multiple of the thread count of groups (3 groups on 2 threads kept one
// idle a third of the time), the images shared out evenly.
struct Groups {
  int64_t count, size;  // groups, images in the largest
};

Groups plan_groups(const Call& c, const Geometry& g1, int64_t sum_rows, bool on_threads) {
  const int64_t per_image = (c.C * g1.phases + sum_rows) * g1.Hr * g1.Wr * int64_t(sizeof(float));
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(c.N, (int64_t(1) << 20) / std::max<int64_t>(per_image, 1)));
  const int64_t count = (c.N + most - 1) / most, t = at::get_num_threads();
  if (!on_threads || count == 1) return {count, most};
  const int64_t shared = std::min(c.N, (count + t - 1) / t * t);
  return {shared, (c.N + shared - 1) / shared};
}

// Runs the batch group by group: input -> flat layout, compute(xb, yv, images, t0, t1) fills
// the sums of output-channel tiles [t0, t1) (row o at yv + o * y_stride, flat positions),
// then the epilogue writes those channels in NCHW. One parallel region per call (parallel.h):
// over groups of images where there are enough, else over (group, range of channel tiles),
// each thread flattening the group's input into its own buffer (a small copy, no second
// fork/join); small calls run on the calling thread alone.
template <class Compute>
void run_groups(const Call& c, const Geometry& g, int64_t groups, int64_t T, int64_t M, int64_t y_stride,
                bool on_threads, Compute compute) {
  const int64_t threads = at::get_num_threads(), O = c.O;
  const float* xp = c.x.data_ptr<float>();
  const float* rp = c.residual.defined() ? c.residual.data_ptr<float>() : nullptr;
  float* outp = c.out.data_ptr<float>();
  const bool serial = !on_threads;
  // on threads the images shared out evenly; else groups of g.G, the last one what is left
  // (fewer positions rounded up to whole tiles)
  auto first_image = [&](int64_t grp) { return serial ? std::min(c.N, grp * g.G) : c.N * grp / groups; };
  const int64_t parts = serial || groups >= threads ? 1 : std::min(T, (4 * threads + groups - 1) / groups);
  struct Prepared {
    int64_t group = -1;  // the group of images this thread's buffer holds
  };
  tkp_parallel::for_units<Prepared>(groups * parts, serial, [&](int64_t u, Prepared& prepared) {
    float* xb = scratch_input.get<float>(c.C * g.plane);
    float* yv = scratch_output.get<float>(T * M * y_stride);
    TORCH_CHECK(xb && yv, "tkp::topk_conv2d: out of memory");
    const int64_t grp = u / parts, part = u % parts, t0 = T * part / parts, t1 = T * (part + 1) / parts;
    const int64_t n0 = first_image(grp), count = first_image(grp + 1) - n0;
    if (prepared.group != grp) prepare_input(xp, n0, count, xb, g), prepared.group = grp;
    compute(xb, yv, count, t0, t1);
    // flat -> NCHW: output (n, o, oh, ow) is row o at n*Hr*Wr + oh*Wr + ow, then the epilogue
    for (int64_t n = 0; n < count; ++n)
      for (int64_t o = t0 * M; o < std::min(O, t1 * M); ++o) {
        const int64_t plane = (n0 + n) * O + o;
        epilogue(yv + o * y_stride + n * g.Hr * g.Wr, g.Wr, g.Ho, g.Wo, rp ? rp + plane * g.Ho * g.Wo : nullptr,
                 c.relu, c.pool, outp + plane * c.out_h * c.out_w);
      }
  });
}

std::vector<float> padded_bias(const Call& c, int64_t rows) {
  std::vector<float> b(rows, 0.f);
  if (c.bias.defined()) std::copy(c.bias.data_ptr<float>(), c.bias.data_ptr<float>() + c.O, b.begin());
  return b;
}

// Whether every tap is in [0, n_taps), or with channels > 0 every code channel * 256 + tap has
// tap < n_taps and channel < channels. Unsigned compares in branch-free loops that the compiler
// vectorises: it reads every entry on every call (a deploy.pt is not trusted), and a scalar
// loop cost a quarter of the multiply-adds' time at 512 channels, 7x7, batch 1.
bool taps_in_range(const int32_t* tp, int64_t n, int64_t n_taps, int64_t channels) {
  uint32_t bad = 0;
  if (channels > 0) {
    for (int64_t j = 0; j < n; ++j)
      bad |= uint32_t(uint32_t(tp[j] & 255) >= uint32_t(n_taps)) | uint32_t(uint32_t(tp[j] >> 8) >= uint32_t(channels));
  } else {
    for (int64_t j = 0; j < n; ++j) bad |= uint32_t(uint32_t(tp[j]) >= uint32_t(n_taps));
  }
  return bad == 0;
}

// The register-tile kernel: values/taps packed per tile of M output channels,
// values[t][i][k][m] (float) and taps[t][i][k][m] (int32, dy*kw + dx). columns 0: the padded
// flat layout; 1: at stride 1 one input copy per kernel column (Geometry::columns), at other
// strides the same as 0.
at::Tensor topk_conv2d(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& taps,
                       const c10::optional<at::Tensor>& bias_in, int64_t out_channels, int64_t kh, int64_t kw,
                       int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t tile_m,
                       int64_t tile_s, int64_t channel_block, bool relu, const c10::optional<at::Tensor>& residual_in,
                       int64_t pool, int64_t columns) {
  TORCH_CHECK(columns == 0 || columns == 1, "tkp::topk_conv2d: columns must be 0 or 1");
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.dim() == 4 && values.is_contiguous(),
              "tkp::topk_conv2d: values must be contiguous float32 (tiles, C_in, K, M)");
  TORCH_CHECK(taps.scalar_type() == at::kInt && taps.sizes() == values.sizes() && taps.is_contiguous(),
              "tkp::topk_conv2d: taps must be contiguous int32 shaped like values");
  const int64_t T = values.size(0), C = values.size(1), K = values.size(2), M = values.size(3);
  TORCH_CHECK(M == std::max<int64_t>(tile_m, 1) && T * M >= out_channels && (T - 1) * M < out_channels,
              "tkp::topk_conv2d: values do not match tile_m / out_channels");
  TileFn fn = find_tile(tile_m, tile_s);
  AlignedFn afn = tile_m == 0 ? find_aligned(tile_s) : nullptr;
  TORCH_CHECK(fn != nullptr || afn != nullptr, "tkp::topk_conv2d: no compiled register tile M=", tile_m, " S=", tile_s);
  const Call c = check_call(x_in, C, bias_in, out_channels, kh, kw, stride_h, stride_w, pad_h, pad_w, relu,
                            residual_in, pool);
  const int64_t OP = T * M, tile_q = V * tile_s;
  const Geometry g1 = make_geometry(C, c.H, c.W, kh, kw, stride_h, stride_w, pad_h, pad_w, 1, tile_q, columns);
  const bool on_threads = tkp_parallel::worth_threads(c.N * g1.Hr * g1.Wr * OP * C * std::max<int64_t>(K, 1));
  const Groups groups = plan_groups(c, g1, OP, on_threads);
  const Geometry g = make_geometry(C, c.H, c.W, kh, kw, stride_h, stride_w, pad_h, pad_w, groups.size, tile_q, columns);
  TORCH_CHECK(g.plane * C < (int64_t(1) << 40) && g.max_off < (int64_t(1) << 31), "tkp::topk_conv2d: input too large");

  // the taps (or for the aligned tiles channel * 256 + tap) in range; per-call tables: offset
  // of each tap, bias padded to the tiles
  const int32_t* tp = taps.data_ptr<int32_t>();
  TORCH_CHECK(taps_in_range(tp, taps.numel(), kh * kw, afn ? C : 0), "tkp::topk_conv2d: tap index out of range");
  std::vector<int32_t> tap_off(g.tap_off.begin(), g.tap_off.end());
  const std::vector<float> bias = padded_bias(c, OP);
  // input channels per block: the shifted windows of one block (one per phase) stay in L1
  // (about 24 KiB); while the first tile of a (q tile, channel block) runs, the next q tile's
  // windows are fetched
  const int64_t window = g.phases * (tile_q + g.max_shift + V);
  const int64_t cb = std::min(std::max<int64_t>(C, 1),
                              channel_block > 0 ? channel_block : std::max<int64_t>(1, 6144 / window));
  std::vector<int64_t> prefetch;
  for (int64_t p = 0; p < g.phases; ++p)
    for (int64_t j = 0; j < (tile_q + g.max_shift + 2 * V - 1) / V; ++j)
      prefetch.push_back(p * g.phase_size + tile_q + V * j);
  const float* wv = values.data_ptr<float>();
  const int32_t* to = tap_off.data();
  const float* bv = bias.data();

  run_groups(c, g, groups.count, T, M, g.q_pad, on_threads, [&](const float* xb, float* yv, int64_t images, int64_t t0, int64_t t1) {
    const int64_t QT = (g.q_total(images) + tile_q - 1) / tile_q;
    for (int64_t qt = 0; qt < QT; ++qt) {
      const int64_t q0 = qt * tile_q;
      if (K == 0) {
        for (int64_t o = t0 * M; o < t1 * M; ++o)
          std::fill(yv + o * g.q_pad + q0, yv + o * g.q_pad + q0 + tile_q, bv[o]);
        continue;
      }
      if (afn) {
        for (int64_t o = t0; o < t1; ++o)
          afn(xb + q0, g.plane, C * K, wv + o * C * K, tp + o * C * K, to, bv[o], yv + o * g.q_pad + q0);
        continue;
      }
      for (int64_t c0 = 0; c0 < C; c0 += cb) {
        const int64_t c1 = std::min(C, c0 + cb);
        for (int64_t t = t0; t < t1; ++t)
          fn(xb + q0, g.plane, c0, c1, K, wv + t * C * K * M, tp + t * C * K * M, to, c0 == 0 ? bv + t * M : nullptr,
             yv + t * M * g.q_pad + q0, g.q_pad, prefetch.data(),
             t == t0 && qt + 1 < QT ? int64_t(prefetch.size()) : 0);
      }
    }
  });
  return c.out;
}

// Shapes only, for torch.compile / torch.export tracing (FakeTensor).
at::Tensor output_like(const at::Tensor& x, int64_t out_channels, int64_t kh, int64_t kw, int64_t stride_h,
                       int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t pool) {
  auto ho = (x.sym_size(2) + 2 * pad_h - kh) / stride_h + 1;
  auto wo = (x.sym_size(3) + 2 * pad_w - kw) / stride_w + 1;
  if (pool) ho = ho / 2, wo = wo / 2;
  return at::empty_symint({x.sym_size(0), c10::SymInt(out_channels), ho, wo}, x.options());
}

at::Tensor topk_conv2d_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            int64_t out_channels, int64_t kh, int64_t kw, int64_t stride_h, int64_t stride_w,
                            int64_t pad_h, int64_t pad_w, int64_t, int64_t, int64_t, bool,
                            const c10::optional<at::Tensor>&, int64_t pool, int64_t) {
  return output_like(x, out_channels, kh, kw, stride_h, stride_w, pad_h, pad_w, pool);
}

// (M, S, columns) triples: every register tile with and without the copies per kernel column,
// the aligned tiles without
std::vector<int64_t> tile_kinds() {
  std::vector<int64_t> r;
  for (int64_t columns = 0; columns < 2; ++columns)
    for (const auto& t : kTiles) r.push_back(t.m), r.push_back(t.s), r.push_back(columns);
  for (const auto& t : kAligned) r.push_back(0), r.push_back(t.s), r.push_back(0);
  return r;
}

}  // namespace

TORCH_LIBRARY(tkp, m) {
  m.def("topk_conv2d(Tensor x, Tensor values, Tensor taps, Tensor? bias, int out_channels, int kh, int kw, "
        "int stride_h, int stride_w, int pad_h, int pad_w, int tile_m, int tile_s, int channel_block=0, "
        "bool relu=False, Tensor? residual=None, int pool=0, int columns=0) -> Tensor");
  m.def("tile_kinds() -> int[]", &tile_kinds);
}

TORCH_LIBRARY_IMPL(tkp, CPU, m) {
  m.impl("topk_conv2d", &topk_conv2d);
}

TORCH_LIBRARY_IMPL(tkp, Meta, m) { m.impl("topk_conv2d", &topk_conv2d_meta); }

#ifdef TORCH_EXTENSION_NAME
// The same function as a plain Python binding: eager calls skip torch.ops' argument parsing
// (about 10 us a call, as much as a small layer's work); torch.compile uses the op.
#include <torch/csrc/utils/pybind.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_conv2d", &topk_conv2d, "tkp::topk_conv2d without the dispatcher");
  m.def("isa", [] { return std::string(ISA); }, "the instruction set this build uses");
  m.def(
      "geometry",
      [](int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
         int64_t tile_q, int64_t columns) {
        const Geometry g = make_geometry(C, H, W, kh, kw, sh, sw, ph, pw, 1, tile_q, columns);
        return std::vector<int64_t>{int64_t(g.columns), g.phases, g.Wr};
      },
      "[copies per kernel column (0/1), planes per channel, row stride] of the layout a call reads (tests)");
  m.def("output_cache", &tkp_outputs::stats, "[freed outputs kept, their bytes] of this kernel's cache (outputs.h)");
  m.def("release_outputs", &tkp_outputs::release, "frees the outputs this kernel keeps; the bytes freed");
}
#endif
