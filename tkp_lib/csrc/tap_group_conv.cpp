// Tap-group convolution for CPUs (tkp::tap_group_conv2d): a Conv2d (fp32, groups 1) whose G
// consecutive output channels share, for every input channel, the same K kept tap positions
// (TKP's --tap-group G). Built on first use by tkp_lib/kernels.py (torch.utils.cpp_extension,
// -O3 -march=native, -fopenmp where torch uses OpenMP so that at::parallel_for runs on
// torch's own thread pool); AVX-512 or AVX2 + FMA (simd.h), chosen at build time.
//
// Layout: NHWC (channels_last), in and out. The output channels are cut into blocks of B
// (16, 32 or 64 on AVX-512; 8, 16 or 32 on AVX2): the B outputs of a block share their kept (input channel, tap)
// entries, E of them (C_in*K when B divides G; the union of the groups' entries otherwise,
// with zero weights where a group lacks one). Per block the convolution is then
//     y[p][0..B) = bias + sum over entries e of x[p + offset(e)][channel(e)] * w[e][0..B),
// vectorised over the B output channels: a register tile of RB output positions x B/V
// vectors (V = 16 floats on AVX-512, 8 on AVX2); per entry, B/V weight vectors are loaded
// once and each of the RB positions broadcasts one input scalar into B/V multiply-adds. The arithmetic per loaded byte is
// that of a dense convolution's inner loop, so the kernel runs near oneDNN's rate on the
// kept taps alone.
//
// To make every entry one constant offset, each image is first copied into a zero-padded
// buffer: stride 1 pads rows and columns; stride s splits the padded image into its sh*sw
// phases (rows a, a + sh, ...; columns b, b + sw, ...), so that tap (dy, dx) reads phase
// (dy % sh, dx % sw) at pixel (dy / sh) * Wq + dx / sw past the output position. A tile's RB
// positions are consecutive pixels of the padded buffer, or two half rows, in one of three
// walks, whichever computes fewest positions: across rows (tiles run on over the Wq - OW
// padding columns, whose sums are dropped: few wasted for wide rows), row by row (each row's
// OW outputs in ceil(OW / RB) tiles: none wasted where RB divides OW, as 14 does the 14x14
// layers; or exactly, in tiles of RB and RB - 1: 16 columns in 6 + 5 + 5, 1.04-1.09x against
// paired at 32 and 128 channels), or by pairs of rows (RB / 2 columns of two neighbouring rows
// per tile: a 7x7 layer in 4 tiles of 2 x 7, each weight vector loaded once per 14 positions
// instead of 7; an odd last row computes one row it drops). At stride 1 the row walks' inner
// tiles, all of whose reads lie inside the image, read the image itself, and only the border
// the other tiles read is copied (see Inner: 1.00-1.03x at 64 channels, 32x32 and 56x56, batch 1, and
// 1.10-1.25x at 2 threads, where both threads pad the one image; 0.92-1.08x at batch 32). The
// epilogue (residual add, ReLU) is applied to the tile's registers as they are stored to the
// output (against a pass through a buffer, on an AMD Zen 3: up to 1.30x at 64 channels,
// 0.94-1.04x at 128-512); a 2x2 max pool reads them back from a per-thread buffer of the
// unit's rows.
//
// Threads: one parallel region per call (parallel.h), over whole images where there are at
// least 4 per thread, else over (image, block, rows) units sized so that every thread gets
// several; each thread's own share first (parallel.h). Each thread pads the images it needs into its own buffer
// (a copy of a few percent of the work, and no second fork/join): whole images pad each image
// once (units per block padded most images twice at 2 threads: 64 channels, 8x8, batch 32
// ran 1.18-1.33x slower). Small calls run on the calling thread alone.
//
// Arguments: weights[b][e][j] (float, output b*B + j, zero past out_channels), channels[b][e]
// and taps[b][e] (int32: input channel, dy*kw + dx) of block b's entries.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "simd.h"  // first: its #error is the line a CPU it cannot build for sees
#include "parallel.h"
#include "outputs.h"

namespace {

using namespace tkp_simd;

thread_local Scratch scratch_image, scratch_pool;

struct Geo {
  int64_t N, C, H, W, O, kh, kw, sh, sw, ph, pw, OH, OW, YH, YW;
  int64_t Wq, Hq, phase_px, phases;  // pixels per row and rows of one phase plane, pixels per phase, sh*sw
  int64_t Cp;                        // floats per pixel in the padded buffer (C, or more: see pixel_stride)
  int64_t pool;
  bool relu;
};

// Floats per pixel of the padded buffer. A tile broadcasts the same channel of some 30 pixels
// (its positions times the kernel's rows and columns); with C a multiple of 256 floats those
// sit a multiple of 1 KiB apart and fall into 4 or fewer of L1's 64 sets, which then evict one
// another (512 channels: 2 sets, 16 lines). One cache line more per pixel spreads them over
// every set.
int64_t pixel_stride(int64_t C) {
  const int64_t lines = (C + 15) / 16;
  return C % 256 == 0 ? (lines + 1) * 16 : C;
}

Geo make_geo(const at::Tensor& x, int64_t O, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
             int64_t pool, bool relu, int64_t rb) {
  Geo g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3), g.O = O;
  g.kh = kh, g.kw = kw, g.sh = sh, g.sw = sw, g.ph = ph, g.pw = pw, g.pool = pool, g.relu = relu;
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0,
              "tkp::tap_group_conv2d: bad kernel size, stride or padding");
  TORCH_CHECK(g.H + 2 * ph >= kh && g.W + 2 * pw >= kw, "tkp::tap_group_conv2d: the input (", g.H, "x", g.W,
              ", padding ", ph, ",", pw, ") is smaller than the kernel (", kh, "x", kw, ")");
  g.OH = (g.H + 2 * ph - kh) / sh + 1, g.OW = (g.W + 2 * pw - kw) / sw + 1;
  g.YH = pool ? g.OH / 2 : g.OH, g.YW = pool ? g.OW / 2 : g.OW;
  g.phases = sh * sw;
  g.Wq = std::max((g.W + 2 * pw + sw - 1) / sw, g.OW + (kw - 1) / sw);
  // rows enough for every read of every tile: positions up to (OH + 1)*Wq + rb (a paired
  // tile on an odd last row reads the row below it), plus the largest shift
  const int64_t reach = (g.OH + 1) * g.Wq + rb + ((kh - 1) / sh) * g.Wq + (kw - 1) / sw;
  g.Hq = std::max((g.H + 2 * ph + sh - 1) / sh, (reach + g.Wq - 1) / g.Wq);
  g.phase_px = g.Hq * g.Wq;
  g.Cp = pixel_stride(g.C);
  TORCH_CHECK(g.phases * g.phase_px * g.Cp < (int64_t(1) << 31), "tkp::tap_group_conv2d: input too large");
  return g;
}

// The tiles that read the image itself rather than the padded buffer (stride 1, pixels of C
// floats, a walk by rows; none otherwise): those of the groups of output rows starting at h in
// [row_lo, row_hi) and columns starting at w in [col_lo, col_hi), every read of which lies
// inside the image. Their reads need no copy; the padded buffer then holds what the tiles
// around them read: its first row_lo + kh - 1 and its rows from row_hi whole, the rows between
// only in their first col_lo + kw - 1 and their columns from col_hi.
struct Inner {
  bool on = false;
  int64_t row_lo = 0, row_hi = 0, col_lo = 0, col_hi = 0;
};

// image n of x (NHWC) -> buf: its sh*sw zero-padded phase planes, each Hq x Wq pixels of Cp
// floats (channels C..Cp are never read); with `inner`, only what the other tiles read
void pad_image(const float* x, int64_t n, float* buf, const Geo& g, const Inner& inner) {
  const int64_t C = g.C, Cp = g.Cp;
  const float* img = x + n * g.H * g.W * C;
  for (int64_t a = 0; a < g.sh; ++a)
    for (int64_t b = 0; b < g.sw; ++b) {
      float* plane = buf + (a * g.sw + b) * g.phase_px * Cp;
      for (int64_t i = 0; i < g.Hq; ++i) {
        float* row = plane + i * g.Wq * Cp;
        const int64_t h = i * g.sh + a - g.ph;
        if (h < 0 || h >= g.H) {
          std::memset(row, 0, sizeof(float) * g.Wq * Cp);
          continue;
        }
        const float* src = img + h * g.W * C;
        if (g.sw == 1 && Cp == C) {  // padded columns [j0, j1): one copy between zeros
          auto fill = [&](int64_t j0, int64_t j1) {
            const int64_t lo = std::clamp(g.pw, j0, j1), hi = std::clamp(g.pw + g.W, lo, j1);
            std::memset(row + j0 * C, 0, sizeof(float) * (lo - j0) * C);
            std::memcpy(row + lo * C, src + (lo - g.pw) * C, sizeof(float) * (hi - lo) * C);
            std::memset(row + hi * C, 0, sizeof(float) * (j1 - hi) * C);
          };
          if (inner.on && i >= inner.row_lo + g.kh - 1 && i < inner.row_hi) {
            fill(0, std::min(inner.col_lo + g.kw - 1, inner.col_hi));
            fill(inner.col_hi, g.Wq);
          } else {
            fill(0, g.Wq);
          }
          continue;
        }
        for (int64_t j = 0; j < g.Wq; ++j) {
          const int64_t w = j * g.sw + b - g.pw;
          if (w >= 0 && w < g.W) std::memcpy(row + j * Cp, src + w * C, sizeof(float) * C);
          else std::memset(row + j * Cp, 0, sizeof(float) * C);
        }
      }
    }
}

// ---- the register tile ---------------------------------------------------------------------

// Where a tile's RB sums go: output pixel r's first channel of the block at dst[r] (or its
// slot in the pool buffer; null: a position the walk computes and drops), its residual at
// res[r] (or no residual: res null), n of the block's B channels kept (the last block may
// hold fewer), ReLU or not.
struct Out {
  float* const* dst;
  const float* const* res;
  int64_t n;
  bool relu;
};

// the sums of position r = bias + sum over e < E of x[pixel(r)*C + off[e]] * w[e][0..OCB*V),
// where pixel(r) = r for a tile of consecutive pixels (HALF = RB) and, for a tile of two
// half rows (HALF = RB / 2), r % HALF in the first row and r % HALF + jump / C in the next
// (jump = the row's pixels * C; C here is the padded buffer's pixel stride); stored through
// the epilogue straight from the registers
template <int OCB, int RB, int HALF>
void tile(const float* x, int64_t C, const int32_t* off, int64_t E, const float* w, const float* bias,
          const Out& out, int64_t jump) {
  static_assert(HALF == RB || 2 * HALF == RB, "a tile is one run of pixels or two half rows");
  constexpr int B = OCB * V;
  // each accumulator loads the bias itself, in a loop unrolled whole: with one splat per block,
  // g++ 12 built tiles of 12 and 14 positions through the stack (half-width stores read back
  // whole, which store forwarding cannot serve). Loading per accumulator made 32x14 1.03-1.10x
  // faster at batch 1 and 1.05-1.20x at 32 on an Intel Xeon with AVX-512; 32x6 and the AVX2
  // tiles ran as before, as did every tile on an AMD Zen 4 (0.95-1.06x)
  vec acc[RB][OCB];
#pragma GCC unroll 32
  for (int r = 0; r < RB; ++r)
    for (int b = 0; b < OCB; ++b) acc[r][b] = vload(bias + b * V);
  for (int64_t e = 0; e < E; ++e, w += B) {
    const float* xe = x + off[e];
    const float* xe2 = xe + jump;
    vec wv[OCB];
    for (int b = 0; b < OCB; ++b) wv[b] = vload(w + b * V);
#pragma GCC unroll 32
    for (int r = 0; r < RB; ++r) {
      const vec xv = vset1(r < HALF ? xe[r * C] : xe2[(r - HALF) * C]);
      for (int b = 0; b < OCB; ++b) acc[r][b] = vfmadd(xv, wv[b], acc[r][b]);
    }
  }
  // the epilogue, with out's fields in locals (the vector stores may alias anything, so each
  // field would be read again after each) and whole blocks in loops of their own (16 @ 32,
  // batch 1 and 32, on an AMD Zen 3: 1.07-1.13x, with a residual 1.04-1.07x; 1.00-1.04x at
  // 64 @ 8; less where more entries share the tile's epilogue)
  float* const* dst = out.dst;
  const float* const* resv = out.res;
  const int64_t n = out.n;
  const bool relu = out.relu;
  if (n >= B && resv) {
#pragma GCC unroll 32
    for (int r = 0; r < RB; ++r) {
      float* d = dst[r];
      if (!d) continue;
      for (int b = 0; b < OCB; ++b) {
        const vec a = vadd(acc[r][b], vload(resv[r] + b * V));
        vstore(d + b * V, relu ? vmax(a, vzero()) : a);
      }
    }
  } else if (n >= B) {
#pragma GCC unroll 32
    for (int r = 0; r < RB; ++r) {
      float* d = dst[r];
      if (!d) continue;
      for (int b = 0; b < OCB; ++b) vstore(d + b * V, relu ? vmax(acc[r][b], vzero()) : acc[r][b]);
    }
  } else {  // the last block, of fewer than B outputs
#pragma GCC unroll 32
    for (int r = 0; r < RB; ++r) {
      float* d = dst[r];
      if (!d) continue;
      for (int b = 0; b < OCB; ++b) {
        vec a = acc[r][b];
        if (resv) a = vadd(a, vload_first(resv[r] + b * V, n - b * V));
        if (relu) a = vmax(a, vzero());
        vstore_first(d + b * V, a, n - b * V);
      }
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const int32_t*, int64_t, const float*, const float*, const Out&, int64_t);

struct Kind {
  int B, RB;       // output channels per block, positions per tile
  TileFn fn;       // RB consecutive pixels
  TileFn paired;   // RB / 2 pixels of two neighbouring rows (even RB), else null
  TileFn shorter;  // RB - 1 consecutive pixels (RB >= 4), else null
};

constexpr int kMaxRB = 24;  // the largest RB (run_unit's pointer arrays)

template <int OCB, int RB>
constexpr Kind kind() {
  static_assert(RB <= kMaxRB, "a tile of more positions than run_unit holds pointers for");
  TileFn shorter = nullptr;
  if constexpr (RB >= 4) shorter = tile<OCB, RB - 1, RB - 1>;
  if constexpr (RB % 2 == 0) return {OCB * V, RB, tile<OCB, RB, RB>, tile<OCB, RB, RB / 2>, shorter};
  else return {OCB * V, RB, tile<OCB, RB, RB>, nullptr, shorter};
}

// The compiled (B, RB) tiles: RB*B/V accumulators, B/V weights and one broadcast in the
// registers. AVX2's 16x7 is one register short: g++ leaves one of its two weight vectors in
// memory, read by its multiply-adds; a 7x7 plane then runs row by row in 7 tiles of 7, none
// wasted (1.14-1.16x over 16x6 at 512 @ 7, batch 1, on an AMD Zen 3). AVX-512's 32x8 loads
// less per multiply-add than 32x6 and its 8 divides 8, 16, 32 and 56 columns: on an Intel Xeon,
// batch 1, against the best tile before it (32x6), 64 @ 56 0.201 / 0.210 ms, 64 @ 32 0.061 /
// 0.065, 128 @ 16 0.061 / 0.064 (32x14 stays the faster at 256 @ 14; at 7 and 14 columns 32x8
// runs 32x7's short tile; a 32x10 was slower everywhere). On an AMD Zen 4 it is the fastest at
// 64 @ 32 and 64 @ 8 (batch 32: 0.191 / 0.230 ms against 32x6), slower at batch 32 at 64 @ 56
// and 256 @ 14; deployment times the tiles and keeps the fastest per layer.
#if defined(__AVX512F__)
const Kind kKinds[] = {kind<1, 8>(), kind<1, 16>(), kind<1, 24>(), kind<2, 6>(), kind<2, 7>(), kind<2, 8>(),
                       kind<2, 12>(), kind<2, 14>(), kind<4, 3>(), kind<4, 6>()};
#else
const Kind kKinds[] = {kind<1, 6>(), kind<1, 7>(), kind<1, 12>(), kind<1, 14>(),
                       kind<2, 3>(), kind<2, 6>(), kind<2, 7>(), kind<4, 2>()};
#endif
const Kind& find_kind(int64_t B, int64_t RB) {
  for (const Kind& k : kKinds)
    if (k.B == B && k.RB == RB) return k;
  TORCH_CHECK(false, "tkp::tap_group_conv2d: register tile ", B, "x", RB, " is not compiled in");
  return kKinds[0];
}

// ---- the op ----------------------------------------------------------------------------------

// How a unit's tiles cover its output rows (see the top of the file).
enum class Walk { across, by_row, paired };

// The tiles of RB - 1 that end each row in the walk by rows: where RB does not divide OW, the
// RB - OW % RB that make the row exact, if there are tiles enough (16 columns of 6: 6 + 5 + 5
// instead of 6 + 6 + 6 with 2 dropped); else none, and the row's last tile drops the positions
// past OW.
int64_t short_tiles(int64_t OW, const Kind& k) {
  const int64_t RB = k.RB, rest = OW % RB;
  return rest && k.shorter && RB - rest <= OW / RB + 1 ? RB - rest : 0;
}

// The walk that computes the fewest positions per image: across rows rounds OH*Wq up to
// tiles; by row computes each row's OW, exactly with short tiles; paired rounds each pair of
// rows' OW to half tiles (and an odd last row computes a second row it drops). Short tiles
// cost more than their positions: a walk by rows with them counts a quarter position more per
// short tile, and 17/16 of it all (on an AMD Zen 3, 16x6 tiles at batch 1 and 32, against
// paired: 1.05-1.09x at 16 columns, 32 and 128 channels; 0.97-0.99x at 28, 0.93-0.96x at 32).
// Of equals, where inner tiles can read the image itself, paired, then by row (128 @ 16, batch
// 32: 1.04-1.05x paired against across); elsewhere across rows first.
Walk choose_walk(const Geo& g, const Kind& k) {
  const int64_t RB = k.RB, shorts = short_tiles(g.OW, k);  // costs in 64ths of a position
  const int64_t across = 64 * ((g.OH * g.Wq + RB - 1) / RB * RB);
  const int64_t by_row = shorts ? g.OH * (4 * g.OW + shorts) * 17 : 64 * g.OH * ((g.OW + RB - 1) / RB * RB);
  const int64_t paired = k.paired ? 64 * ((g.OH + 1) / 2 * ((g.OW + RB / 2 - 1) / (RB / 2) * RB)) : across + by_row;
  if (g.phases == 1 && g.Cp == g.C) {  // inner tiles possible (see Inner)
    if (paired <= by_row && paired <= across) return Walk::paired;
    return by_row <= across ? Walk::by_row : Walk::across;
  }
  if (across <= by_row && across <= paired) return Walk::across;
  return by_row <= paired ? Walk::by_row : Walk::paired;
}

// One tile of a row walk: its first output column, its columns (in each of its rows), its function.
struct RowTile {
  int64_t w0, cols;
  TileFn fn;
};

// The tiles across an output row (by row: RB columns, then the short tiles) or a pair of rows
// (paired: RB / 2 columns of each); none across rows.
std::vector<RowTile> row_plan(const Geo& g, const Kind& k, Walk walk) {
  std::vector<RowTile> plan;
  if (walk == Walk::paired)
    for (int64_t w0 = 0; w0 < g.OW; w0 += k.RB / 2) plan.push_back({w0, k.RB / 2, k.paired});
  if (walk != Walk::by_row) return plan;
  const int64_t shorts = short_tiles(g.OW, k), full = shorts ? (g.OW - shorts * (k.RB - 1)) / k.RB : 0;
  for (int64_t w0 = 0; w0 < g.OW; w0 += plan.back().cols) {
    if (shorts && int64_t(plan.size()) >= full) plan.push_back({w0, k.RB - 1, k.shorter});
    else plan.push_back({w0, k.RB, k.fn});
  }
  return plan;
}

// The inner tiles (see Inner) of a row walk: groups of rows (1, or 2 paired) start at multiples
// of their rows; inner where the rows h - ph .. h + rows - 2 - ph + kh and the columns w0 - pw
// .. w0 + cols - 2 - pw + kw of the image exist (cols of a row's last tile counted whole).
Inner inner_tiles(const Geo& g, const std::vector<RowTile>& plan, Walk walk) {
  Inner in;
  if (walk == Walk::across || g.phases != 1 || g.Cp != g.C) return in;
  const int64_t rows = walk == Walk::paired ? 2 : 1, h_max = g.H - rows - g.kh + 1 + g.ph;  // the last start
  in.row_lo = (g.ph + rows - 1) / rows * rows, in.row_hi = h_max / rows * rows + rows;
  in.col_lo = -1;
  for (const RowTile& t : plan)
    if (t.w0 >= g.pw && t.w0 + t.cols + g.kw - 2 - g.pw < g.W) {  // contiguous: w0 + cols grows
      if (in.col_lo < 0) in.col_lo = t.w0;
      in.col_hi = t.w0 + t.cols;
    }
  in.on = h_max >= in.row_lo && in.col_lo >= 0;
  return in;
}

struct Call {
  Geo g;
  const Kind* kind;
  int64_t NB, E, chunks, rows_per_chunk;
  Walk walk;
  std::vector<RowTile> plan;  // the row walks' tiles across a row (row_plan)
  Inner inner;
  at::Tensor x, res, y;
  std::vector<int32_t> off;     // [NB][E] offsets of the entries into the padded buffer
  std::vector<int32_t> off_in;  // [NB][E] and into an image of x (with inner tiles)
  std::vector<float> bias;   // [NB*B]
  const float* w;
};

// Block b of image n, output rows [r0, r1): tiles of RB positions, the epilogue on the way out.
void run_unit(const Call& c, const float* buf, int64_t n, int64_t b, int64_t r0, int64_t r1) {
  const Geo& g = c.g;
  const Inner& in = c.inner;
  const float* img = c.x.data_ptr<float>() + n * g.H * g.W * g.C;
  const int64_t B = c.kind->B, RB = c.kind->RB, o0 = b * B, nb = std::min(B, g.O - o0);
  const float* resp = c.res.defined() ? c.res.data_ptr<float>() + o0 : nullptr;
  float* yp = c.y.data_ptr<float>() + o0;
  float* pooled = g.pool ? scratch_pool.get<float>((r1 - r0) * g.OW * B) : nullptr;
  TORCH_CHECK(!g.pool || pooled, "tkp::tap_group_conv2d: out of memory");
  float* dst[kMaxRB];
  const float* res[kMaxRB];
  const Out out{dst, resp ? res : nullptr, nb, g.relu};
  const int64_t step = g.pool ? B : g.O;  // from one output pixel's sums to the next's
  // positions [r, r + count) of the next tile are output row h's pixels w0, w0 + 1, ...; those
  // past the row's OW outputs or the unit's rows are dropped (pointers stepped along the row:
  // against a division per position, 1.02-1.04x at 64-256 channels, batch 1, on an AMD Zen 3)
  auto row_run = [&](int64_t r, int64_t count, int64_t h, int64_t w0) {
    const int64_t valid = h < r1 ? std::max<int64_t>(0, std::min(count, g.OW - w0)) : 0;
    const int64_t pix = (n * g.OH + h) * g.OW + w0;
    float* d = valid == 0 ? nullptr : g.pool ? pooled + ((h - r0) * g.OW + w0) * B : yp + pix * g.O;
    int64_t i = 0;
    for (; i < valid; ++i, d += step) dst[r + i] = d;
    for (; i < count; ++i) dst[r + i] = nullptr;
    if (resp)
      for (i = 0; i < valid; ++i) res[r + i] = resp + (pix + i) * g.O;
  };
  const float* wb = c.w + b * c.E * B;
  // the tile of a row walk at output row h, column w0: from the image where it is inner
  auto row_tile = [&](TileFn fn, int64_t h, int64_t w0) {
    if (in.on && h >= in.row_lo && h < in.row_hi && w0 >= in.col_lo && w0 < in.col_hi)
      fn(img + ((h - g.ph) * g.W + w0 - g.pw) * g.C, g.C, c.off_in.data() + b * c.E, c.E, wb, c.bias.data() + o0, out,
         g.W * g.C);
    else
      fn(buf + (h * g.Wq + w0) * g.Cp, g.Cp, c.off.data() + b * c.E, c.E, wb, c.bias.data() + o0, out, g.Wq * g.Cp);
  };
  if (c.walk == Walk::paired) {  // rows h and h + 1, RB / 2 columns of each (rows_per_chunk is even)
    const int64_t half = RB / 2;
    for (int64_t h = r0; h < r1; h += 2)
      for (int64_t w0 = 0; w0 < g.OW; w0 += half) {
        row_run(0, half, h, w0), row_run(half, half, h + 1, w0);
        row_tile(c.kind->paired, h, w0);
      }
  } else if (c.walk == Walk::by_row) {  // the row's tiles (row_plan)
    for (int64_t h = r0; h < r1; ++h)
      for (const RowTile& t : c.plan) {
        row_run(0, t.cols, h, t.w0);
        row_tile(t.fn, h, t.w0);
      }
  } else {  // across rows: a tile's RB padded pixels run on from one row (Wq pixels) to the next
    for (int64_t p0 = r0 * g.Wq; p0 < r1 * g.Wq; p0 += RB) {
      for (int64_t r = 0, h = p0 / g.Wq, w = p0 % g.Wq; r < RB; r += g.Wq - w, w = 0, ++h)
        row_run(r, std::min(RB - r, g.Wq - w), h, w);
      c.kind->fn(buf + p0 * g.Cp, g.Cp, c.off.data() + b * c.E, c.E, wb, c.bias.data() + o0, out, g.Wq * g.Cp);
    }
  }
  if (!g.pool) return;
  for (int64_t pr = r0 / 2; pr < std::min(r1 / 2, g.YH); ++pr)  // 2x2 max pool of the stored rows
    for (int64_t pc = 0; pc < g.YW; ++pc) {
      const float* s = pooled + ((2 * pr - r0) * g.OW + 2 * pc) * B;
      float* d = yp + ((n * g.YH + pr) * g.YW + pc) * g.O;
      for (int64_t j = 0; j < nb; j += V) {
        const vec m = vmax(vmax(vload(s + j), vload(s + B + j)),
                           vmax(vload(s + g.OW * B + j), vload(s + (g.OW + 1) * B + j)));
        vstore_first(d + j, m, nb - j);
      }
    }
}

at::Tensor tap_group_conv2d(const at::Tensor& x_in, const at::Tensor& weights, const at::Tensor& channels,
                            const at::Tensor& taps, const c10::optional<at::Tensor>& bias_in, int64_t out_channels,
                            int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t tile_rb,
                            bool relu, const c10::optional<at::Tensor>& residual_in, int64_t pool) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "tkp::tap_group_conv2d: x must be a float32 CPU tensor (N, C, H, W)");
  TORCH_CHECK(weights.dim() == 3 && weights.scalar_type() == at::kFloat && weights.is_contiguous(),
              "tkp::tap_group_conv2d: weights must be contiguous float32 (blocks, entries, B)");
  TORCH_CHECK(channels.scalar_type() == at::kInt && taps.scalar_type() == at::kInt && channels.is_contiguous() &&
                  taps.is_contiguous() && channels.sizes() == weights.sizes().slice(0, 2) &&
                  taps.sizes() == channels.sizes(),
              "tkp::tap_group_conv2d: channels and taps must be contiguous int32 (blocks, entries)");
  TORCH_CHECK(pool == 0 || pool == 2, "tkp::tap_group_conv2d: pool must be 0 or 2 (2x2 max pool, stride 2)");
  Call c;
  c.kind = &find_kind(weights.size(2), tile_rb);
  const int64_t B = c.kind->B;
  c.NB = weights.size(0), c.E = weights.size(1);
  TORCH_CHECK(out_channels > 0 && c.NB == (out_channels + B - 1) / B,
              "tkp::tap_group_conv2d: ", c.NB, " blocks of ", B, " do not hold ", out_channels, " outputs");
  c.x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  c.g = make_geo(c.x, out_channels, kh, kw, sh, sw, ph, pw, pool, relu, tile_rb);
  const Geo& g = c.g;
  c.walk = choose_walk(g, *c.kind);
  c.plan = row_plan(g, *c.kind, c.walk);
  c.inner = inner_tiles(g, c.plan, c.walk);
  c.bias.assign(c.NB * B, 0.f);
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->scalar_type() == at::kFloat && bias_in->numel() == out_channels,
                "tkp::tap_group_conv2d: the bias has ", bias_in->numel(), " values for ", out_channels, " outputs");
    const at::Tensor bc = bias_in->contiguous();
    std::copy(bc.data_ptr<float>(), bc.data_ptr<float>() + out_channels, c.bias.begin());
  }
  if (residual_in.has_value() && residual_in->defined()) {
    c.res = residual_in->contiguous(at::MemoryFormat::ChannelsLast);
    TORCH_CHECK(c.res.scalar_type() == at::kFloat && c.res.device().is_cpu() &&
                    c.res.sizes() == at::IntArrayRef({g.N, g.O, g.OH, g.OW}),
                "tkp::tap_group_conv2d: the residual must be a float32 CPU tensor shaped like the convolution's output");
  }
  // every entry's channel and tap in range (a loop the compiler vectorises), then its offset:
  // the tap's, from a table of kh*kw, plus the channel (against divisions per entry, at batch 1
  // on an AMD Zen 3: 1.23-1.27x at 512 @ 7, 32 blocks of 512 entries; 1.06-1.10x at 256 @ 14)
  const int64_t n_entries = c.NB * c.E, n_taps = kh * kw;
  const int32_t* chp = channels.data_ptr<int32_t>();
  const int32_t* tp = taps.data_ptr<int32_t>();
  uint32_t bad = 0;
  for (int64_t i = 0; i < n_entries; ++i)
    bad |= uint32_t(uint32_t(chp[i]) >= uint32_t(g.C)) | uint32_t(uint32_t(tp[i]) >= uint32_t(n_taps));
  for (int64_t i = 0; bad && i < n_entries; ++i) {  // which entry, for the message
    TORCH_CHECK(chp[i] >= 0 && chp[i] < g.C, "tkp::tap_group_conv2d: entry ", i, ": input channel ", chp[i],
                " out of range (0..", g.C - 1, ")");
    TORCH_CHECK(tp[i] >= 0 && tp[i] < n_taps, "tkp::tap_group_conv2d: entry ", i, ": tap index ", tp[i],
                " out of range (0..", n_taps - 1, " of the ", kh, "x", kw, " kernel)");
  }
  std::vector<int32_t> tap_off(n_taps);
  for (int64_t t = 0; t < n_taps; ++t) {
    const int64_t dy = t / kw, dx = t % kw;
    tap_off[t] = int32_t((((dy % sh) * sw + dx % sw) * g.phase_px + (dy / sh) * g.Wq + dx / sw) * g.Cp);
  }
  c.off.resize(n_entries);
  for (int64_t i = 0; i < n_entries; ++i) c.off[i] = tap_off[tp[i]] + chp[i];
  if (c.inner.on) {  // stride 1: tap (dy, dx) is dy rows and dx pixels on in the image
    for (int64_t t = 0; t < n_taps; ++t) tap_off[t] = int32_t((t / kw * g.W + t % kw) * g.C);
    c.off_in.resize(n_entries);
    for (int64_t i = 0; i < n_entries; ++i) c.off_in[i] = tap_off[tp[i]] + chp[i];
  }
  c.w = weights.data_ptr<float>();
  c.y = tkp_outputs::empty({g.N, g.O, g.YH, g.YW}, at::MemoryFormat::ChannelsLast);

  // units: whole images where there are several per thread, else (image, block, chunk of output
  // rows), so that every thread gets several
  const int64_t threads = at::get_num_threads(), per_image = c.NB * g.OH * g.Wq * B * std::max<int64_t>(c.E, 1);
  const bool serial = !tkp_parallel::worth_threads(g.N * per_image);
  const bool whole = serial || g.N >= 4 * threads;  // else each block of an image a unit of its own
  const int64_t blocks = whole ? 1 : c.NB;           // units per (image, row chunk): 1 holds all blocks
  c.chunks = whole ? 1 : std::min((g.OH + 1) / 2, std::max<int64_t>(1, (4 * threads + g.N * c.NB - 1) / (g.N * c.NB)));
  c.rows_per_chunk = ((g.OH + c.chunks - 1) / c.chunks + 1) / 2 * 2;
  c.chunks = (g.OH + c.rows_per_chunk - 1) / c.rows_per_chunk;
  const float* xp = c.x.data_ptr<float>();
  struct Padded {
    int64_t image = -1;  // the image this thread's buffer holds
  };
  tkp_parallel::for_units<Padded>(g.N * blocks * c.chunks, serial, [&](int64_t u, Padded& padded) {
    float* buf = scratch_image.get<float>(g.phases * g.phase_px * g.Cp);
    TORCH_CHECK(buf, "tkp::tap_group_conv2d: out of memory");
    const int64_t n = u / (blocks * c.chunks), b = u / c.chunks % blocks, k = u % c.chunks;
    if (n != padded.image) pad_image(xp, n, buf, g, c.inner), padded.image = n;
    for (int64_t bb = whole ? 0 : b; bb < (whole ? c.NB : b + 1); ++bb)
      run_unit(c, buf, n, bb, k * c.rows_per_chunk, std::min(g.OH, (k + 1) * c.rows_per_chunk));
  });
  return c.y;
}

// Shapes only, for torch.compile / torch.export tracing (FakeTensor): channels_last like the op.
at::Tensor tap_group_conv2d_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const c10::optional<at::Tensor>&, int64_t out_channels, int64_t kh, int64_t kw,
                                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t, bool,
                                 const c10::optional<at::Tensor>&, int64_t pool) {
  auto oh = (x.sym_size(2) + 2 * ph - kh) / sh + 1;
  auto ow = (x.sym_size(3) + 2 * pw - kw) / sw + 1;
  if (pool) oh = oh / 2, ow = ow / 2;
  return at::empty_symint({x.sym_size(0), c10::SymInt(out_channels), oh, ow},
                          x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// The walk (0 across rows, 1 by row, 2 paired) and the columns of the tiles across a row (pair)
// that tap_group_conv2d takes for a c x h x w input and tile B x RB (for tests).
std::vector<int64_t> tap_group_walk(int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                    int64_t ph, int64_t pw, int64_t B, int64_t RB) {
  const Kind& k = find_kind(B, RB);
  const Geo g = make_geo(at::empty({1, c, h, w}), B, kh, kw, sh, sw, ph, pw, 0, false, RB);
  const Walk walk = choose_walk(g, k);
  std::vector<int64_t> out{int64_t(walk)};
  for (const RowTile& t : row_plan(g, k, walk)) out.push_back(t.cols);
  return out;
}

std::vector<int64_t> tap_group_tile_kinds() {
  std::vector<int64_t> out;
  for (const Kind& k : kKinds) out.push_back(k.B), out.push_back(k.RB);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tkp, m) {
  m.def("tap_group_conv2d(Tensor x, Tensor weights, Tensor channels, Tensor taps, Tensor? bias, int out_channels, "
        "int kh, int kw, int sh, int sw, int ph, int pw, int tile_rb, bool relu=False, Tensor? residual=None, "
        "int pool=0) -> Tensor");
  m.def("tap_group_tile_kinds() -> int[]", &tap_group_tile_kinds);
}

TORCH_LIBRARY_IMPL(tkp, CPU, m) { m.impl("tap_group_conv2d", &tap_group_conv2d); }

TORCH_LIBRARY_IMPL(tkp, Meta, m) { m.impl("tap_group_conv2d", &tap_group_conv2d_meta); }

#include <torch/csrc/utils/pybind.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tap_group_conv2d", &tap_group_conv2d, "tkp::tap_group_conv2d without the dispatcher");
  m.def("isa", [] { return std::string(ISA); }, "the instruction set this build uses");
  m.def("walk", &tap_group_walk, "[walk (0 across rows, 1 by row, 2 paired), the columns of a row's tiles...]");
  m.def("output_cache", &tkp_outputs::stats, "[freed outputs kept, their bytes] of this kernel's cache (outputs.h)");
  m.def("release_outputs", &tkp_outputs::release, "frees the outputs this kernel keeps; the bytes freed");
}
