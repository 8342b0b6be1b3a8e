"""DepthwiseTopKConv2d: a depthwise convolution that computes only the kept taps (CPU, fp32).

A depthwise kh x kw convolution (groups = in_channels = out_channels, as in MobileNet's 3x3
and ConvNeXt's 7x7 layers) whose kernels keep at most K taps is, per channel, K shifted and
scaled copies of its input plane. DepthwiseTopKConv2d stores the kept taps (values and tap
indices, (C, K) each) and runs tkp::depthwise_topk2d, the kernel of csrc/depthwise_topk.cpp
(built on first use by tkp_lib.kernels: AVX-512, or AVX2 + FMA), registered as a torch op with
a shape function so that torch.compile and torch.export can trace it. A ReLU or ReLU6 that
the convolution alone feeds runs in the kernel's epilogue (`fuse_activations`, and
tkp_lib.deploy_layers.fuse_epilogues for a ReLU); a residual add or 2x2 max pool that
fuse_epilogues folds in, as into the other kernel layers, runs after it as torch ops. Where
the kernel cannot be built, or for inputs it does not take (not float32 on the CPU), the layer
runs F.conv2d(groups=C) on the dense weight rebuilt from its kept taps: the same numbers.
Measured speed against oneDNN's depthwise convolution: RESULTS.md.
May import: tkp_lib.kernels.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from tkp_lib import kernels

MAX_K = 16  # the kernel keeps at most this many taps per channel
STRIDES = (1, 2)


def kernel():
    """The built tkp::depthwise_topk2d extension, or None where it cannot be built (one line says why)."""
    return kernels.native("depthwise_topk", "tkp_deploy: the depthwise Top-K kernel",
                          "depthwise layers run as dense convolutions")


def kernel_available() -> bool:
    """Whether tkp::depthwise_topk2d can run (built on the first call; one attempt per process)."""
    return kernel() is not None


def kernel_problem() -> str:
    """Why the kernel is unavailable ('' when it is, or before the first attempt)."""
    return kernels.problem("depthwise_topk")


def kept_taps(conv: nn.Conv2d) -> int:
    """The most non-zero taps any kernel of `conv` keeps."""
    nz = conv.weight.detach().reshape(conv.out_channels, -1) != 0
    return int(nz.sum(-1).max()) if nz.numel() else 0


def cannot_compute(conv: nn.Module) -> str | None:
    """None if DepthwiseTopKConv2d computes `conv` (a depthwise Conv2d, zero padding, dilation 1,
    stride 1 or 2, at most MAX_K taps per kernel), else why not."""
    if not isinstance(conv, nn.Conv2d):
        return "not a Conv2d"
    if not (conv.groups == conv.in_channels == conv.out_channels):
        return "not depthwise (groups == in_channels == out_channels)"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} ({conv.padding_mode}): only explicit zero padding"
    if any(s not in STRIDES for s in conv.stride):
        return f"stride {conv.stride}: only 1 or 2"
    kh, kw = conv.kernel_size
    if kh * kw > 256:
        return "more than 256 taps per kernel"
    k = kept_taps(conv)
    if k > MAX_K:
        return f"K={k} > {MAX_K} kept taps"
    return None


def kernel_takes(conv: nn.Module) -> str | None:
    """None if `conv` is a pruned depthwise Conv2d worth the kernel (K < kh*kw kept taps, and
    computable), else why not ("dense" for a kernel with every tap)."""
    why = cannot_compute(conv)
    if why is None and kept_taps(conv) >= conv.kernel_size[0] * conv.kernel_size[1]:
        return "dense"
    return why


class DepthwiseTopKConv2d(nn.Module):
    """A depthwise Conv2d (groups = channels, dilation 1, zero padding, stride 1 or 2) whose
    kernels keep at most K taps, stored as `values` (C, K) and `taps` (C, K, uint8, dy*kw + dx),
    computed by tkp::depthwise_topk2d from the kept taps alone. As the other kernel layers, it
    may add a `residual` (forward's second argument), then apply a ReLU (`relu`; or ReLU6,
    `relu6`), then a 2x2 max pool (`pool` = 2); the activation runs in the kernel when nothing
    comes between. Where the kernel is unavailable (or for inputs it does not take: not float32
    on the CPU) it runs F.conv2d(groups=C) on the dense weight. Its packed weights and call
    arguments are built on the first call and again after `.to()` and the like: change `values`,
    `taps` and `bias` in place (as `load_state_dict` does), not by assigning new tensors."""

    def __init__(self, channels: int, kernel_size, stride=1, padding=0, k: int = 1, bias: bool = True,
                 relu: bool = False, relu6: bool = False, pool: int = 0):
        super().__init__()
        self.channels, self.k, self.relu, self.relu6, self.pool = channels, k, relu, relu6, pool
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.register_buffer("values", torch.zeros(channels, k))
        self.register_buffer("taps", torch.zeros(channels, k, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(channels) if bias else None)
        self._packed = None  # (values float32, taps int32) as the kernel reads them, built on first use
        self._dense = None   # the dense weight, built on first use where the kernel cannot run

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseTopKConv2d":
        """The kept taps of a depthwise Conv2d; ValueError, saying why, for one it cannot compute."""
        why = cannot_compute(conv)
        if why is not None:
            raise ValueError(f"DepthwiseTopKConv2d cannot compute this {type(conv).__name__}: {why}")
        k = kept_taps(conv)
        flat = conv.weight.detach().reshape(conv.out_channels, -1).float()
        taps = flat.abs().topk(k, dim=-1).indices.sort(dim=-1).values
        m = cls(conv.out_channels, conv.kernel_size, conv.stride, conv.padding, k, conv.bias is not None)
        m.values.copy_(flat.gather(-1, taps))
        m.taps.copy_(taps.to(torch.uint8))
        if conv.bias is not None:
            m.bias.copy_(conv.bias.detach())
        return m

    def config(self) -> dict:
        return {"channels": self.channels, "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "k": self.k, "bias": self.bias is not None, "relu": self.relu,
                "relu6": self.relu6, "pool": self.pool}

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"k={self.k}, relu={self.relu}, relu6={self.relu6}, pool={self.pool}")

    def _apply(self, fn, recurse=True):  # .to() / .float() etc.: repack from the new buffers
        self._packed = self._dense = None
        return super()._apply(fn, recurse)

    def dense_weight(self) -> torch.Tensor:
        """The (C, 1, kh, kw) weight the kept taps describe, zeros elsewhere."""
        kh, kw = self.kernel_size
        w = torch.zeros(self.channels, kh * kw, dtype=self.values.dtype, device=self.values.device)
        w.scatter_(-1, self.taps.long(), self.values)
        return w.reshape(self.channels, 1, kh, kw)

    def act(self) -> int:
        """The epilogue as the op takes it: 0 none, 1 ReLU, 2 ReLU6."""
        return 2 if self.relu6 else 1 if self.relu else 0

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        fused = residual is None  # the activation in the kernel: nothing comes between
        if x.is_cpu and x.dtype == torch.float32 and x.dim() == 4 and kernel_available():  # (TapGroupConv2d)
            if self._packed is None:  # and the kernel's arguments between x and the activation
                self._packed = (self.values.float().contiguous(), self.taps.int().contiguous())
                self._args = (*self._packed, self.bias, *self.kernel_size, *self.stride, *self.padding)
            if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # the registered op, which they trace
                y = torch.ops.tkp.depthwise_topk2d(x, *self._args, self.act() if fused else 0)
            else:  # the same function without torch.ops' parsing
                y = kernel().depthwise_topk2d(x, *self._args, self.act() if fused else 0)
        else:
            if self._dense is None or self._dense.dtype != x.dtype:
                self._dense = self.dense_weight().to(x.dtype)
            y = F.conv2d(x, self._dense, None if self.bias is None else self.bias.to(x.dtype), self.stride,
                         self.padding, groups=self.channels)
            fused = False
        if residual is not None:
            y = y + residual
        if not fused:
            y = F.relu6(y) if self.relu6 else F.relu(y) if self.relu else y
        return F.max_pool2d(y, 2) if self.pool else y


def _activation(node: torch.fx.Node, modules: dict) -> str | None:
    """"relu" or "relu6" if `node` applies one of them to its only argument, else None."""
    if node.op == "call_module":
        return {nn.ReLU: "relu", nn.ReLU6: "relu6"}.get(type(modules.get(node.target)))
    if len(node.args) != 1 or node.kwargs.keys() - {"inplace"}:
        return None
    if node.op == "call_function":
        return {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}.get(node.target)
    if node.op == "call_method":
        return {"relu": "relu", "relu_": "relu"}.get(node.target)
    return None


def fuse_activations(gm: torch.fx.GraphModule) -> int:
    """Fold into each DepthwiseTopKConv2d the ReLU or ReLU6 it alone feeds (in place; after
    fuse_epilogues, which folds ReLUs but not ReLU6); returns how many were folded."""
    modules = dict(gm.named_modules())
    fused = 0
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, DepthwiseTopKConv2d) or conv.relu or conv.relu6 or conv.pool or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        kind = _activation(user, modules)
        if kind is not None and user.args[0] is node:
            conv.relu, conv.relu6 = kind == "relu", kind == "relu6"
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            fused += 1
    if fused:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return fused
