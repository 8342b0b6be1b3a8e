"""TopKConv2d: a convolution that computes only the kept taps of a Top-K mask (CPU, fp32).

Every kernel W[o, i] of a TKP model keeps at most K of its kh*kw taps; a dense convolution
(oneDNN) multiplies the zeros like any other value. TopKConv2d stores only the kept taps
(values and tap indices, (C_out, C_in, K) each) and runs tkp::topk_conv2d, the kernel of
csrc/topk_conv.cpp (built on first use by tkp_lib.kernels; AVX-512 or AVX2), registered as a
torch op with a shape function so that torch.compile and torch.export can trace it, on
torch's intra-op threads. What the convolution alone feeds (a residual add, then a ReLU,
then a 2x2 max pool) can be done in its epilogue. Where the kernel cannot be built, or for
inputs it does not take (not float32 on the CPU), the layer runs F.conv2d on the dense
weight rebuilt from its kept taps.
May import: tkp_lib.kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from tkp_lib import kernels

MAX_K = 8  # the kernel keeps at most this many taps per kernel
DEFAULT_TILE = (4, 4, 0)  # compiled in on AVX-512 and AVX2 alike


def kernel():
    """The built tkp::topk_conv2d extension, or None where it cannot be built (one line says why)."""
    return kernels.native("topk_conv", "tkp_deploy: the Top-K kernel", "Top-K layers run as dense convolutions")


def kernel_available() -> bool:
    """Whether tkp::topk_conv2d can run (built on the first call; one attempt per process)."""
    return kernel() is not None


def kernel_problem() -> str:
    """Why the kernel is unavailable ('' when it is, or before the first attempt)."""
    return kernels.problem("topk_conv")


def tile_kinds() -> list[tuple[int, int, int]]:
    """The (M output channels, S vectors of 16 positions, 8 on AVX2, columns) register tiles
    compiled in; M = 0: one output channel at a time, its sums grouped by tap at aligned
    positions. columns 0 reads the input from one zero-padded flat copy; 1, at stride 1, from
    one copy per kernel column, so that every load is 32-byte aligned (csrc/topk_conv.cpp).
    Without the kernel: DEFAULT_TILE alone."""
    if not kernel_available():
        return [DEFAULT_TILE]
    flat = list(torch.ops.tkp.tile_kinds())
    return list(zip(flat[0::3], flat[1::3], flat[2::3]))


def as_tile(tile) -> tuple[int, ...]:
    """A tile as a tuple; (M, S), as deploy.pt files written before the copies per column name them, is (M, S, 0)."""
    tile = tuple(tile)
    return tile + (0,) if len(tile) == 2 else tile


def tiles_for(conv: nn.Module, tiles=None) -> list[tuple[int, int, int]]:
    """The tiles worth timing on `conv` (default: every tile compiled in): columns = 1 only at
    stride 1; elsewhere it runs as 0, so (M, S, 1) is timed as (M, S, 0), once."""
    tiles = [as_tile(t) for t in tiles] if tiles else tile_kinds()
    if tuple(conv.stride) != (1, 1):
        tiles = [t[:2] + (0,) + t[3:] for t in tiles]
    return list(dict.fromkeys(tiles))



def topk_pattern(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(values, taps, K) of a conv weight (C_out, C_in, kh, kw) whose kernels have at most K
    non-zeros: the K largest-|w| taps of each kernel (zero-valued where a kernel has fewer),
    values (C_out, C_in, K) float32, taps (C_out, C_in, K) uint8 (tap = dy*kw + dx)."""
    c_out, c_in, kh, kw = weight.shape
    flat = weight.detach().reshape(c_out, c_in, kh * kw).float()
    k = int((flat != 0).sum(-1).max()) if flat.numel() else 0
    taps = flat.abs().topk(k, dim=-1).indices.sort(dim=-1).values
    return flat.gather(-1, taps).contiguous(), taps.to(torch.uint8).contiguous(), k


class TopKConv2d(nn.Module):
    """A Conv2d (groups 1, dilation 1, zero padding) whose kernels keep at most K taps,
    stored as `values` and `taps` (C_out, C_in, K), computed by tkp::topk_conv2d from the
    kept taps alone. Its epilogue may add a `residual` (forward's second argument, shaped
    like the convolution's output), then apply a ReLU (`relu`), then a 2x2 max pool of
    stride 2 (`pool` = 2). Where the kernel is unavailable (or for inputs it does not take:
    not float32 on the CPU) it runs F.conv2d on the dense weight rebuilt from the kept taps.
    Its packed weights and call arguments are built on the first call and again after `.to()`
    and the like or `set_tile`: change `values`, `taps` and `bias` in place (as
    `load_state_dict` does) or through those, not by assigning new tensors."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, k: int = 1,
                 bias: bool = True, tile=DEFAULT_TILE, relu: bool = False, pool: int = 0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.k, self.relu, self.pool = k, relu, pool
        self.register_buffer("values", torch.zeros(out_channels, in_channels, k))
        self.register_buffer("taps", torch.zeros(out_channels, in_channels, k, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.tile = tuple(tile)  # (M, S) or (M, S, columns): kernel_tile() reads both
        self._packed = None  # (values, taps) in the kernel's tile order, built on first use
        self._tile = None    # the tile the kernel runs (kernel_tile), found on first use
        self._dense = None   # the dense weight, built on first use where the kernel cannot run

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, tile=DEFAULT_TILE) -> "TopKConv2d":
        why = kernels.unsupported_conv(conv)
        if why:
            raise ValueError(f"TopKConv2d cannot compute this Conv2d: {why}")
        values, taps, k = topk_pattern(conv.weight)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, k,
                conv.bias is not None, tile)
        m.values.copy_(values)
        m.taps.copy_(taps)
        if conv.bias is not None:
            m.bias.copy_(conv.bias.detach())
        return m

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "k": self.k, "bias": self.bias is not None, "tile": list(self.tile), "relu": self.relu,
                "pool": self.pool}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, k={self.k}, tile={self.tile}, relu={self.relu}, pool={self.pool}")

    def set_tile(self, tile) -> None:
        self.tile, self._packed, self._tile = tuple(tile), None, None

    def _apply(self, fn, recurse=True):  # .to() / .float() etc.: repack from the new buffers
        self._packed = self._dense = None
        return super()._apply(fn, recurse)

    def dense_weight(self) -> torch.Tensor:
        """The (C_out, C_in, kh, kw) weight the kept taps describe, zeros elsewhere."""
        kh, kw = self.kernel_size
        w = torch.zeros(self.out_channels, self.in_channels, kh * kw, dtype=self.values.dtype,
                        device=self.values.device)
        w.scatter_(-1, self.taps.long(), self.values)
        return w.reshape(self.out_channels, self.in_channels, kh, kw)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """values and taps as the kernel reads them: (tiles, C_in, K, M), output channels
        padded with zero weights to a multiple of M. The aligned tiles (0, S) take one output
        at a time (M = 1), its entries sorted by tap, taps as channel * 256 + tap, the zero
        weights last."""
        if self._packed is None:
            kh, kw = self.kernel_size
            tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()  # no int() of data there
            if self.taps.numel() and not tracing and int(self.taps.max()) >= kh * kw:
                raise ValueError(f"TopKConv2d: a tap index outside the {kh}x{kw} kernel")
            if self.kernel_tile()[0] == 0:
                self._packed = self._packed_aligned()
            else:
                m = self.kernel_tile()[0]
                tiles = -(-self.out_channels // m)
                v = torch.zeros(tiles * m, self.in_channels, self.k)
                t = torch.zeros(tiles * m, self.in_channels, self.k, dtype=torch.int32)
                v[:self.out_channels] = self.values.float()
                t[:self.out_channels] = self.taps.int()
                self._packed = (v.reshape(tiles, m, self.in_channels, self.k).permute(0, 2, 3, 1).contiguous(),
                                t.reshape(tiles, m, self.in_channels, self.k).permute(0, 2, 3, 1).contiguous())
            # the kernel's arguments between x and relu, for every call (as TapGroupConv2d's); columns last
            self._args = (*self._packed, self.bias, self.out_channels, *self.kernel_size, *self.stride,
                          *self.padding, *self.kernel_tile()[:2], 0)
            self._columns = self.kernel_tile()[2]
        return self._packed

    def _packed_aligned(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.out_channels, self.in_channels, self.k, 1)
        v = self.values.detach().float().cpu().reshape(self.out_channels, -1)
        t = self.taps.long().cpu().reshape(self.out_channels, -1)
        code = torch.arange(self.in_channels).repeat_interleave(self.k) * 256 + t
        # zero weights read channel 0 at the last group's tap (a layer without kept taps: none)
        last = t.max(1, keepdim=True).values if t.shape[1] else t.new_zeros(self.out_channels, 1)
        code = torch.where(v != 0, code, last)
        order = torch.argsort((v == 0).long() * (1 << 40) + code % 256 * (1 << 20) + code // 256, dim=1)
        return (v.gather(1, order).reshape(shape).contiguous(), code.gather(1, order).int().reshape(shape).contiguous())

    def kernel_tile(self) -> tuple[int, int, int]:
        """self.tile (M, S, columns; an (M, S) as (M, S, 0)) where this build compiles it in,
        else DEFAULT_TILE: a deploy.pt tuned on a CPU with other vector instructions (AVX-512
        or AVX2) may name a tile this one lacks."""
        if self._tile is None:
            tile = as_tile(self.tile)
            self._tile = tile if kernel_available() and tile in tile_kinds() else DEFAULT_TILE
        return self._tile

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (x.is_cpu and x.dtype == torch.float32 and x.dim() == 4  # the cheap tests first (TapGroupConv2d)
                and (residual is None or residual.dtype == torch.float32) and kernel_available()):
            if self._packed is None:
                self.packed()
            if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # the registered op, which they trace
                return torch.ops.tkp.topk_conv2d(x, *self._args, self.relu, residual, self.pool, self._columns)
            # without torch.ops' parsing
            return kernel().topk_conv2d(x, *self._args, self.relu, residual, self.pool, self._columns)
        if self._dense is None or self._dense.dtype != x.dtype:
            self._dense = self.dense_weight().to(x.dtype)
        y = F.conv2d(x, self._dense, None if self.bias is None else self.bias.to(x.dtype), self.stride, self.padding)
        if residual is not None:
            y = y + residual
        if self.relu:
            y = F.relu(y)
        return F.max_pool2d(y, 2) if self.pool else y



def kernel_takes(conv: nn.Module) -> str | None:
    """None if `conv` is a Conv2d the kernel computes from its kept taps, else why not."""
    if type(conv) is not nn.Conv2d:
        return "not a Conv2d"
    kh, kw = conv.kernel_size
    if kernels.unsupported_conv(conv):
        return "groups, dilation or padding the kernel does not take"
    k = int((conv.weight.detach().reshape(conv.out_channels, conv.in_channels, -1) != 0).sum(-1).max())
    if k >= kh * kw:
        return "dense"
    if kh * kw > 256:
        return "more than 256 taps per kernel"
    if k > MAX_K:
        return f"K={k} > {MAX_K}"
    return None

