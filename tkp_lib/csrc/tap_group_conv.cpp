// Tap-group convolution for CPUs (tkp::tap_group_conv2d): a Conv2d (fp32, NCHW, groups 1)
// whose G consecutive output channels share, for every input channel, the same K kept tap
// positions (TKP's --tap-group G). Per output group the convolution is a dense
// (G x C_in*K) matrix times a gathered input whose rows are shifted input planes.
//
// Built on first use by tkp_tapgroup.py through torch.utils.cpp_extension (-O3
// -march=native). Layout: the input of one image is copied into zero-padded phase planes
// (stride s: s*s phases of the padded image, each Hq x Wq) so that tap (dy, dx) of input
// channel c is one constant offset: plane (c, dy % s, dx % s) at (dy/s)*Wq + dx/s. Output
// position q = oh*Wq + ow then reads input (offset + q); columns ow >= OW are computed and
// dropped when the sums are copied out. A register tile holds M output channels x S vectors
// of 16 positions: per (input channel, tap) pair the S shifted input vectors are loaded
// once and feed M*S multiply-adds with broadcast weights.
//
// Arguments: weights[t][p][m] (float, tiles of M output channels inside one group, zero
// padded), taps[g][c][k] (int32 dy*kw + dx, shared by the group), tile_group[t] and
// tile_start[t], tile_count[t] (int32: the group, first output channel and number of real
// output channels of tile t).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <immintrin.h>

#ifndef __AVX512F__
#error "the tap-group kernel needs a CPU with AVX-512 (built with -march=native); this one has none"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

struct Geo {
  int64_t C, H, W, kh, kw, s, ph, pw, OH, OW, Hq, Wq, plane, L, Lpad, O, P, M;
};

// one image's phase planes: buf[c][py][px][i][j] = padded[c][i*s + py][j*s + px]
void build_phases(const float* x, float* buf, const Geo& g) {
  for (int64_t c = 0; c < g.C; ++c) {
    const float* src = x + c * g.H * g.W;
    for (int64_t py = 0; py < g.s; ++py)
      for (int64_t px = 0; px < g.s; ++px) {
        float* dst = buf + ((c * g.s + py) * g.s + px) * g.plane;
        for (int64_t i = 0; i < g.Hq; ++i) {
          float* row = dst + i * g.Wq;
          int64_t r = i * g.s + py - g.ph;
          if (r < 0 || r >= g.H) { std::memset(row, 0, g.Wq * sizeof(float)); continue; }
          const float* srow = src + r * g.W;
          if (g.s == 1) {
            int64_t j0 = std::max<int64_t>(0, g.pw), j1 = std::min<int64_t>(g.Wq, g.W + g.pw);
            std::memset(row, 0, g.Wq * sizeof(float));
            if (j1 > j0) std::memcpy(row + j0, srow + (j0 - g.pw), (j1 - j0) * sizeof(float));
          } else {
            for (int64_t j = 0; j < g.Wq; ++j) {
              int64_t col = j * g.s + px - g.pw;
              row[j] = (col >= 0 && col < g.W) ? srow[col] : 0.f;
            }
          }
        }
      }
  }
}

// sums of one tile of M outputs over all positions into out[m][q] (q < Lpad)
template <int M, int S, int PF = 2>
void tile_sums(const float* buf, const int32_t* offs, const float* w, const float* bias, int64_t nout,
               float* out, const Geo& g) {
  for (int64_t q = 0; q < g.Lpad; q += 16 * S) {
    __m512 acc[M][S];
    for (int m = 0; m < M; ++m) {
      __m512 b = _mm512_set1_ps(bias && m < nout ? bias[m] : 0.f);
      for (int v = 0; v < S; ++v) acc[m][v] = b;
    }
    const float* base = buf + q;
    for (int64_t p = 0; p < g.P; ++p) {
      const float* src = base + offs[p];
      __m512 xv[S];
      for (int v = 0; v < S; ++v) xv[v] = _mm512_loadu_ps(src + 16 * v);
      if (PF) for (int v = 0; v < S; ++v) _mm_prefetch((const char*)(src + PF * 16 * S + 16 * v), _MM_HINT_T0);
      const float* wp = w + p * M;
      for (int m = 0; m < M; ++m) {
        __m512 wb = _mm512_set1_ps(wp[m]);
        for (int v = 0; v < S; ++v) acc[m][v] = _mm512_fmadd_ps(wb, xv[v], acc[m][v]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int v = 0; v < S; ++v) _mm512_storeu_ps(out + m * g.Lpad + q + 16 * v, acc[m][v]);
  }
}

// one output channel's sums (OH rows of Wq) to NCHW: + residual, ReLU, 2x2 max pool (pool = 2)
void copy_out(const float* src, const float* res, float* dst, const Geo& g, bool relu, int64_t pool) {
  if (pool == 2) {  // rows 2r, 2r+1: vertical max of 32 columns, then the max of lane pairs
    const int64_t PH = g.OH / 2, PW = g.OW / 2;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t r = 0; r < PH; ++r) {
      const float* s0 = src + 2 * r * g.Wq;
      const float* r0 = res ? res + 2 * r * g.OW : nullptr;
      for (int64_t j0 = 0; j0 < 2 * PW; j0 += 32) {
        int64_t n = std::min<int64_t>(32, 2 * PW - j0);
        __mmask16 lo = (__mmask16)((1u << std::min<int64_t>(16, n)) - 1);
        __mmask16 hi = n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
        __m512 v[2];
        for (int h = 0; h < 2; ++h) {
          __mmask16 mk = h ? hi : lo;
          __m512 a = _mm512_maskz_loadu_ps(mk, s0 + j0 + 16 * h), b = _mm512_maskz_loadu_ps(mk, s0 + g.Wq + j0 + 16 * h);
          if (r0) {
            a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(mk, r0 + j0 + 16 * h));
            b = _mm512_add_ps(b, _mm512_maskz_loadu_ps(mk, r0 + g.OW + j0 + 16 * h));
          }
          v[h] = _mm512_max_ps(a, b);
        }
        __m512 out = _mm512_max_ps(_mm512_permutex2var_ps(v[0], even, v[1]), _mm512_permutex2var_ps(v[0], odd, v[1]));
        if (relu) out = _mm512_max_ps(out, _mm512_setzero_ps());
        _mm512_mask_storeu_ps(dst + r * PW + j0 / 2, (__mmask16)((1u << (n / 2)) - 1), out);
      }
    }
    return;
  }
  for (int64_t r = 0; r < g.OH; ++r) {
    if (!relu && !res) { std::memcpy(dst + r * g.OW, src + r * g.Wq, g.OW * sizeof(float)); continue; }
    for (int64_t j = 0; j < g.OW; ++j) {
      float v = src[r * g.Wq + j] + (res ? res[r * g.OW + j] : 0.f);
      dst[r * g.OW + j] = relu ? std::max(v, 0.f) : v;
    }
  }
}

using TileFn = void (*)(const float*, const int32_t*, const float*, const float*, int64_t, float*, const Geo&);

struct Kind { int M, S; TileFn fn; };
const Kind kKinds[] = {{4, 4, tile_sums<4, 4>}, {8, 2, tile_sums<8, 2>}, {8, 3, tile_sums<8, 3>},
                       {12, 2, tile_sums<12, 2>}, {16, 1, tile_sums<16, 1>}};

TileFn find_kind(int64_t M, int64_t S) {
  for (const Kind& k : kKinds)
    if (k.M == M && k.S == S) return k.fn;
  TORCH_CHECK(false, "tap_group_conv2d: register tile ", M, "x", S, " is not compiled in");
}

at::Tensor tap_group_conv2d(const at::Tensor& x_in, const at::Tensor& weights, const at::Tensor& taps,
                            const c10::optional<at::Tensor>& bias_in, const at::Tensor& tile_group,
                            const at::Tensor& tile_start, const at::Tensor& tile_count, int64_t out_channels, int64_t kh, int64_t kw,
                            int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t S, bool relu, const c10::optional<at::Tensor>& residual_in,
                            int64_t pool) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "tap_group_conv2d: x must be a float32 NCHW CPU tensor");
  TORCH_CHECK(sh == sw, "tap_group_conv2d: equal strides only");
  at::Tensor x = x_in.contiguous();
  Geo g;
  g.C = x.size(1); g.H = x.size(2); g.W = x.size(3); g.kh = kh; g.kw = kw; g.s = sh; g.ph = ph; g.pw = pw;
  g.OH = (g.H + 2 * ph - kh) / sh + 1; g.OW = (g.W + 2 * pw - kw) / sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "tap_group_conv2d: empty output");
  g.Wq = std::max(g.OW + (kw - 1) / g.s, (g.W + 2 * pw + g.s - 1) / g.s);
  g.M = weights.size(2); g.P = weights.size(1); g.O = out_channels;
  TORCH_CHECK(taps.size(1) == g.C && g.P == g.C * taps.size(2), "tap_group_conv2d: taps/weights shape");
  g.L = g.OH * g.Wq;
  g.Lpad = (g.L + 16 * S - 1) / (16 * S) * (16 * S);
  // rows enough for every read q + offset with q < Lpad
  int64_t max_off = ((kh - 1) / g.s) * g.Wq + (kw - 1) / g.s;
  g.Hq = (g.Lpad + max_off + g.Wq - 1) / g.Wq + 1;
  g.plane = g.Hq * g.Wq;
  TileFn fn = find_kind(g.M, S);
  const int64_t N = x.size(0), T = weights.size(0), K = taps.size(2), NG = taps.size(0);
  // per group: offsets of its (channel, tap) pairs into the phase planes
  at::Tensor taps_c = taps.to(at::kInt).contiguous();
  std::vector<int32_t> offs(NG * g.P);
  const int32_t* tp = taps_c.data_ptr<int32_t>();
  for (int64_t i = 0; i < NG * g.P; ++i) {
    int64_t c = (i % g.P) / K, t = tp[i], dy = t / kw, dx = t % kw;
    offs[i] = (int32_t)(((c * g.s + dy % g.s) * g.s + dx % g.s) * g.plane + (dy / g.s) * g.Wq + dx / g.s);
  }
  at::Tensor w = weights.contiguous(), tg = tile_group.to(at::kInt).contiguous(),
             ts = tile_start.to(at::kInt).contiguous(), tc = tile_count.to(at::kInt).contiguous();
  at::Tensor bias_t = bias_in.has_value() && bias_in->defined() ? bias_in->contiguous() : at::Tensor();
  TORCH_CHECK(pool == 0 || pool == 2, "tap_group_conv2d: pool must be 0 or 2");
  at::Tensor res_t;
  if (residual_in.has_value() && residual_in->defined()) {
    res_t = residual_in->contiguous();
    TORCH_CHECK(res_t.scalar_type() == at::kFloat && res_t.sizes() == at::IntArrayRef({N, g.O, g.OH, g.OW}),
                "tap_group_conv2d: the residual must be float32 shaped like the convolution's output");
  }
  const float* resp = res_t.defined() ? res_t.data_ptr<float>() : nullptr;
  const int64_t YH = pool ? g.OH / 2 : g.OH, YW = pool ? g.OW / 2 : g.OW;
  at::Tensor y = at::empty({N, g.O, YH, YW}, x.options());
  const int64_t img = g.C * g.s * g.s * g.plane;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* biasp = bias_t.defined() ? bias_t.data_ptr<float>() : nullptr;
  const int32_t* tgp = tg.data_ptr<int32_t>();
  const int32_t* tsp = ts.data_ptr<int32_t>();
  const int32_t* tcp = tc.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  auto run_tile = [&](const float* buf, int64_t n, int64_t t, float* tmp) {
    int64_t o0 = tsp[t], nout = tcp[t];
    fn(buf, offs.data() + tgp[t] * g.P, wp + t * g.P * g.M, biasp ? biasp + o0 : nullptr, nout, tmp, g);
    for (int64_t m = 0; m < nout; ++m)
      copy_out(tmp + m * g.Lpad, resp ? resp + (n * g.O + o0 + m) * g.OH * g.OW : nullptr,
               yp + (n * g.O + o0 + m) * YH * YW, g, relu, pool);
  };
  if (N >= at::get_num_threads()) {  // images over threads, one reused phase buffer per thread
    at::parallel_for(0, N, 1, [&](int64_t a, int64_t b) {
      std::vector<float> buf(img), tmp(g.M * g.Lpad);
      for (int64_t n = a; n < b; ++n) {
        build_phases(xp + n * g.C * g.H * g.W, buf.data(), g);
        for (int64_t t = 0; t < T; ++t) run_tile(buf.data(), n, t, tmp.data());
      }
    });
    return y;
  }
  at::Tensor bufs = at::empty({N, img}, x.options());
  float* bp = bufs.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) build_phases(xp + n * g.C * g.H * g.W, bp + n * img, g);
  });
  at::parallel_for(0, N * T, 1, [&](int64_t a, int64_t b) {
    std::vector<float> tmp(g.M * g.Lpad);
    for (int64_t u = a; u < b; ++u) run_tile(bp + (u / T) * img, u / T, u % T, tmp.data());
  });
  return y;
}

std::vector<int64_t> tap_group_tile_kinds() {
  std::vector<int64_t> out;
  for (const Kind& k : kKinds) { out.push_back(k.M); out.push_back(k.S); }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tkp, m) {
  m.def("tap_group_conv2d(Tensor x, Tensor weights, Tensor taps, Tensor? bias, Tensor tile_group, "
        "Tensor tile_start, Tensor tile_count, int out_channels, int kh, int kw, int sh, int sw, int ph, int pw, int S, "
        "bool relu, Tensor? residual, int pool) -> Tensor");
  m.def("tap_group_tile_kinds() -> int[]", &tap_group_tile_kinds);
}

TORCH_LIBRARY_IMPL(tkp, CPU, m) { m.impl("tap_group_conv2d", &tap_group_conv2d); }

#include <torch/csrc/utils/pybind.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tap_group_conv2d", &tap_group_conv2d, "tkp::tap_group_conv2d without the dispatcher");
}
