"""TapGroupConv2d: a convolution for tap-group masks (--tap-group G), CPU, fp32.

G consecutive output channels share, for every input channel, the same K kept tap positions,
so per block of output channels that share their taps the convolution is a dense (entries x
block) matrix applied to gathered input scalars. TapGroupConv2d computes it with the C++
kernel csrc/tap_group_conv.cpp (torch op tkp::tap_group_conv2d, built on first use by
tkp_lib.kernels; AVX-512 or AVX2): NHWC (channels_last) in and out, vectorised over blocks of
B output channels (16, 32 or 64): per kept (input channel, tap) entry one broadcast input
scalar feeds B/16 multiply-adds with preloaded weights, for a register tile of RB output
positions; `tile` is (B, RB). Its input may come in either memory format (an NCHW input is
converted on the way in: deployment converts the network's input once, see
tkp_lib.deploy_layers); its output is channels_last. Where the kernel is unavailable (no
compiler, CUDA, bf16) it runs with torch ops: F.unfold, index_select of the group's kept
rows, matmul. `tap_group_of(conv)` finds the largest G in GROUP_SIZES whose groups share
their positions. Its epilogue (residual add, ReLU, 2x2 max pool) is TopKConv2d's. Measured
speed: RESULTS.md.
May import: tkp_lib.kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from tkp_lib import kernels

GROUP_SIZES = (64, 32, 16, 8)
DEFAULT_TILE = (32, 8)  # (B, RB) where nothing else is known (AVX-512; other builds: default_tile)


def kernel():
    """The built tkp::tap_group_conv2d extension, or None where it cannot be built (one line says why)."""
    return kernels.native("tap_group_conv", "tkp_deploy: the tap-group kernel", "tap-group layers run with torch ops")


def kernel_available() -> bool:
    """Whether tkp::tap_group_conv2d can run (built on the first call; one attempt per process)."""
    return kernel() is not None


def tile_kinds() -> list[tuple[int, int]]:
    """The (B output channels, RB positions) register tiles compiled in."""
    if not kernel_available():
        return [DEFAULT_TILE]
    flat = list(torch.ops.tkp.tap_group_tile_kinds())
    return list(zip(flat[0::2], flat[1::2]))


def default_tile(group: int) -> tuple[int, int]:
    """A compiled tile for groups of `group` outputs before any measurement: the widest
    block that does not mix groups (or the narrowest), with its middle RB."""
    kinds = tile_kinds()
    widths = sorted({b for b, _ in kinds})
    width = max([b for b in widths if b <= group] or widths[:1])
    rbs = sorted(rb for b, rb in kinds if b == width)
    return width, rbs[len(rbs) // 2]


def tap_group_of(conv: nn.Module) -> tuple[int, int] | None:
    """(G, K) for a pruned Conv2d whose every group of G consecutive outputs (a smaller last
    group allowed) keeps at most K shared tap positions per input channel, K < kh*kw taps,
    with the largest such G in GROUP_SIZES; None where no G fits or the conv is not plain."""
    if type(conv) is not nn.Conv2d or kernels.unsupported_conv(conv):
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
    """A Conv2d (groups 1, dilation 1, zero padding) whose groups of G consecutive output
    channels share K kept taps per input channel: `taps` (groups, C_in, K) int (dy*kw + dx)
    and `weights` (C_out, C_in, K). Its epilogue may add a `residual` (forward's second
    argument), then apply a ReLU (`relu`), then a 2x2 max pool (`pool` = 2), as TopKConv2d's
    (deploy_layers.fuse_epilogues folds them in). The kernel's output is channels_last.
    Its packed weights and call arguments are built on the first call and again after
    `.to()` and the like or `set_tile`: change `weights`, `taps` and `bias` in place (as
    `load_state_dict` does) or through those, not by assigning new tensors."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, k: int = 1,
                 group: int = 32, bias: bool = True, tile=DEFAULT_TILE, relu: bool = False, pool: int = 0):
        super().__init__()
        self.in_channels, self.out_channels, self.k, self.group = in_channels, out_channels, k, group
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.tile, self.relu, self.pool = _pair(padding), tuple(tile), relu, pool
        n_groups = -(-out_channels // group)
        self.register_buffer("taps", torch.zeros(n_groups, in_channels, k, dtype=torch.int32))
        self.register_buffer("weights", torch.zeros(out_channels, in_channels, k))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self._packed = self._checked = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group: int, k: int, tile=None) -> "TapGroupConv2d":
        why = kernels.unsupported_conv(conv)
        if why:
            raise ValueError(f"TapGroupConv2d cannot compute this Conv2d: {why}")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, k, group,
                conv.bias is not None, tile or default_tile(group))
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
        self._packed = self._checked = None
        return super()._apply(fn, recurse)

    def dense_weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = torch.zeros(self.out_channels, self.in_channels, kh * kw, dtype=self.weights.dtype,
                        device=self.weights.device)
        taps = self.taps.long().repeat_interleave(self.group, 0)[:self.out_channels]
        w.scatter_(-1, taps, self.weights)
        return w.reshape(self.out_channels, self.in_channels, kh, kw)

    def check(self) -> None:
        """ValueError where the buffers describe no convolution this layer computes. Checked
        again only when the taps or bias change (their tensor or its in-place version; a write
        through .data is not seen), or always for tensors made under inference_mode, which keep
        no version: on a GPU, reading the taps' range back waits for every queued kernel."""
        # the tensors themselves are held (an id could be reused by a new tensor), with the version
        state = None if self.taps.is_inference() else (self.taps, self.taps._version, self.bias)
        done = self._checked
        if state is not None and done is not None and done[0] is state[0] and done[1] == state[1] \
                and done[2] is state[2]:
            return
        kh, kw = self.kernel_size
        if self.taps.numel() and not 0 <= int(self.taps.min()) <= int(self.taps.max()) < kh * kw:
            raise ValueError(f"TapGroupConv2d: a tap index outside the {kh}x{kw} kernel (taps must be in "
                             f"0..{kh * kw - 1})")
        if self.bias is not None and self.bias.numel() != self.out_channels:
            raise ValueError(f"TapGroupConv2d: the bias has {self.bias.numel()} values for {self.out_channels} outputs")
        self._checked = state

    def packed(self):
        """(weights (blocks, E, B), channels (blocks, E), taps (blocks, E), RB): the kernel's
        blocks of B outputs with their E shared (input channel, tap) entries, the union of
        the entries of the groups a block spans, zero weights where a group lacks one."""
        if self._packed is None:
            self.check()
            kh, kw = self.kernel_size
            (width, rb), c_in, t = self.kernel_tile(), self.in_channels, kh * kw
            dense = self.dense_weight().detach().float().cpu().reshape(self.out_channels, c_in * t)
            group_of = torch.arange(self.out_channels) // self.group
            kept = torch.zeros(self.taps.shape[0], c_in * t, dtype=torch.bool)
            kept.scatter_(1, (torch.arange(c_in).unsqueeze(-1) * t + self.taps.long().cpu()).reshape(
                self.taps.shape[0], -1), True)
            blocks = []
            for o in range(0, self.out_channels, width):
                rows = kept[group_of[o:o + width].unique()].any(0).nonzero().squeeze(1)  # sorted (channel, tap)
                w = torch.zeros(len(rows), width)
                w[:, :min(width, self.out_channels - o)] = dense[o:o + width, rows].t()
                blocks.append((w, rows))
            e = max(len(rows) for _, rows in blocks)
            weights = torch.zeros(len(blocks), e, width)
            entries = torch.zeros(len(blocks), e, dtype=torch.long)
            for i, (w, rows) in enumerate(blocks):  # shorter blocks padded with zero-weight entries
                weights[i, :len(rows)], entries[i, :len(rows)] = w, rows
            self._packed = (weights.contiguous(), (entries // t).int().contiguous(), (entries % t).int().contiguous(),
                            rb)
            # the kernel's arguments between x and relu, for every call (against building them per
            # call: deployed ResNet-56, batch 1, 1.08x)
            self._args = (*self._packed[:3], self.bias, self.out_channels, *self.kernel_size, *self.stride,
                          *self.padding, rb)
        return self._packed

    def kernel_tile(self) -> tuple[int, int]:
        """self.tile where it is compiled in (a deploy.pt written by another build may name
        one that is not), else the default for the group."""
        return tuple(self.tile) if tuple(self.tile) in tile_kinds() else default_tile(self.group)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # x.is_cpu, not x.device.type, and no tuple built per call: a 16 @ 32 layer at batch 1
        # spends 11 us in the kernel, and these took 1.8 us more (AMD Zen 3)
        if (x.is_cpu and x.dtype == torch.float32 and x.dim() == 4
                and (residual is None or residual.dtype == torch.float32) and kernel_available()):
            if self._packed is None:
                self.packed()
            if torch.compiler.is_compiling() or torch.compiler.is_exporting():
                return torch.ops.tkp.tap_group_conv2d(x, *self._args, self.relu, residual, self.pool)
            return kernel().tap_group_conv2d(x, *self._args, self.relu, residual, self.pool)
        return self.forward_torch(x, residual)

    def forward_torch(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """unfold + index_select of each group's kept rows + matmul (any device and dtype)."""
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):  # not while traced: no
            self.check()  # value read back there (a deploy.pt's taps are checked when it is loaded)
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
