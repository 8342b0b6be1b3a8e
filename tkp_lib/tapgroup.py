"""TapGroupConv2d: a convolution for tap-group masks (--tap-group G), CPU, fp32.

G consecutive output channels share, for every input channel, the same K kept tap positions,
so per output group the convolution is a dense (G x C_in*K) matrix times a gathered input
whose rows are shifted input planes. TapGroupConv2d computes it with the C++ micro-kernel
csrc/tap_group_conv.cpp (torch op tkp::tap_group_conv2d, built on first use by
tkp_lib.kernels), or where that is unavailable (no compiler / AVX-512, CUDA, bf16) with torch
ops: F.unfold, index_select of the group's kept rows, matmul. `tap_group_of(conv)` finds the
largest G in GROUP_SIZES whose groups share their positions. Its epilogue (residual add, ReLU,
2x2 max pool) is TopKConv2d's. Measured speed: RESULTS.md.
May import: tkp_lib.kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from tkp_lib import kernels

GROUP_SIZES = (64, 32, 16, 8)


def kernel():
    """The built tkp::tap_group_conv2d extension, or None where it cannot be built (one line says why)."""
    return kernels.native("tap_group_conv", "tkp_tapgroup: the tap-group kernel", "tap-group layers run with torch ops")


def kernel_available() -> bool:
    """Whether tkp::tap_group_conv2d can run (built on the first call; one attempt per process)."""
    return kernel() is not None


def tile_kinds() -> list[tuple[int, int]]:
    """The (M output channels, S vectors of 16 positions) register tiles compiled in."""
    if not kernel_available():
        return [(8, 2)]
    flat = list(torch.ops.tkp.tap_group_tile_kinds())
    return list(zip(flat[0::2], flat[1::2]))


def tap_group_of(conv: nn.Module) -> tuple[int, int] | None:
    """(G, K) for a pruned Conv2d whose every group of G consecutive outputs (a smaller last
    group allowed) keeps at most K shared tap positions per input channel, K < kh*kw taps,
    with the largest such G in GROUP_SIZES; None where no G fits or the conv is not plain."""
    if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.dilation != (1, 1) \
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.stride[0] != conv.stride[1]:
        return None
    nz = conv.weight.detach().reshape(conv.out_channels, conv.in_channels, -1) != 0
    k = int(nz.sum(-1).max()) if nz.numel() else 0
    if k == 0 or k >= nz.shape[-1]:
        return None
    for g in GROUP_SIZES:
        if g >= conv.out_channels * 2:  # one group holding every output: no real sharing test
            continue
        shared = [nz[o:o + g].any(0).sum(-1).max() for o in range(0, conv.out_channels, g)]
        if max(int(s) for s in shared) <= k:
            return g, k
    return None


class TapGroupConv2d(nn.Module):
    """A Conv2d (groups 1, dilation 1, zero padding, equal strides) whose groups of G
    consecutive output channels share K kept taps per input channel: `taps` (groups, C_in, K)
    int (dy*kw + dx) and `weights` (C_out, C_in, K). Its epilogue may add a `residual`
    (forward's second argument), then apply a ReLU (`relu`), then a 2x2 max pool (`pool` = 2),
    as TopKConv2d's (tkp_deploy.fuse_epilogues folds them in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, k: int = 1,
                 group: int = 32, bias: bool = True, tile=(8, 2), relu: bool = False, pool: int = 0):
        super().__init__()
        self.in_channels, self.out_channels, self.k, self.group = in_channels, out_channels, k, group
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.tile, self.relu, self.pool = _pair(padding), tuple(tile), relu, pool
        n_groups = -(-out_channels // group)
        self.register_buffer("taps", torch.zeros(n_groups, in_channels, k, dtype=torch.int32))
        self.register_buffer("weights", torch.zeros(out_channels, in_channels, k))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self._packed = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group: int, k: int, tile=(8, 2)) -> "TapGroupConv2d":
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, k, group,
                conv.bias is not None, tile)
        w = conv.weight.detach().float().reshape(conv.out_channels, conv.in_channels, -1)
        for gi, o in enumerate(range(0, conv.out_channels, group)):
            energy = w[o:o + group].pow(2).sum(0) + (w[o:o + group] != 0).any(0).float()  # kept taps first
            taps = energy.topk(k, dim=-1).indices.sort(dim=-1).values
            m.taps[gi] = taps.int()
            block = w[o:o + group]
            m.weights[o:o + group] = block.gather(-1, taps.unsqueeze(0).expand(block.shape[0], -1, -1))
        if conv.bias is not None:
            m.bias.copy_(conv.bias.detach())
        return m

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "k": self.k, "group": self.group, "bias": self.bias is not None, "tile": list(self.tile),
                "relu": self.relu, "pool": self.pool}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, k={self.k}, group={self.group}, tile={self.tile}, relu={self.relu}, "
                f"pool={self.pool}")

    def set_tile(self, tile) -> None:
        self.tile, self._packed = tuple(tile), None

    def _apply(self, fn, recurse=True):
        self._packed = None
        return super()._apply(fn, recurse)

    def dense_weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = torch.zeros(self.out_channels, self.in_channels, kh * kw, dtype=self.weights.dtype,
                        device=self.weights.device)
        taps = self.taps.long().repeat_interleave(self.group, 0)[:self.out_channels]
        w.scatter_(-1, taps, self.weights)
        return w.reshape(self.out_channels, self.in_channels, kh, kw)

    def packed(self):
        """(weights (T, C_in*K, M), tile_group, tile_start, tile_count): tiles of M outputs
        inside each group, padded with zero weights."""
        if self._packed is None:
            m, p = self.tile[0], self.in_channels * self.k
            w = self.weights.detach().float().cpu().reshape(self.out_channels, p)
            blocks, tg, ts, tc = [], [], [], []
            for gi, o in enumerate(range(0, self.out_channels, self.group)):
                end = min(o + self.group, self.out_channels)
                for t0 in range(o, end, m):
                    n = min(m, end - t0)
                    blk = torch.zeros(m, p)
                    blk[:n] = w[t0:t0 + n]
                    blocks.append(blk.t())
                    tg.append(gi), ts.append(t0), tc.append(n)
            i32 = dict(dtype=torch.int32)
            self._packed = (torch.stack(blocks).contiguous(), torch.tensor(tg, **i32), torch.tensor(ts, **i32),
                            torch.tensor(tc, **i32))
        return self._packed

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and kernel_available()
                and (residual is None or residual.dtype == torch.float32)):
            w, tg, ts, tc = self.packed()
            args = (w, self.taps, self.bias, tg, ts, tc, self.out_channels, *self.kernel_size, *self.stride,
                    *self.padding, self.tile[1], self.relu, residual, self.pool)
            if torch.compiler.is_compiling() or torch.compiler.is_exporting():
                return torch.ops.tkp.tap_group_conv2d(x, *args)
            return kernel().tap_group_conv2d(x, *args)
        return self.forward_torch(x, residual)

    def forward_torch(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """unfold + index_select of each group's kept rows + matmul (any device and dtype)."""
        kh, kw = self.kernel_size
        n, _, h, wd = x.shape
        oh = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        ow = (wd + 2 * self.padding[1] - kw) // self.stride[1] + 1
        cols = F.unfold(x, (kh, kw), padding=self.padding, stride=self.stride)  # (N, C_in*kh*kw, L)
        base = torch.arange(self.in_channels, device=x.device).unsqueeze(-1) * (kh * kw)
        outs = []
        for gi, o in enumerate(range(0, self.out_channels, self.group)):
            rows = (base + self.taps[gi].long()).reshape(-1)
            w = self.weights[o:o + self.group].reshape(-1, self.in_channels * self.k).to(x.dtype)
            outs.append(torch.matmul(w, cols.index_select(1, rows)))
        y = torch.cat(outs, 1).reshape(n, self.out_channels, oh, ow)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        if residual is not None:
            y = y + residual
        if self.relu:
            y = F.relu(y)
        return F.max_pool2d(y, 2) if self.pool else y
