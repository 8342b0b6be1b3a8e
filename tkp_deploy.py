"""Deploy a Top-K pruned CNN on the CPU: a convolution kernel that computes only the kept taps.

Every kernel W[o, i] of a TKP model keeps at most K of its kh*kw taps; dense convolution
kernels (oneDNN) multiply the zeros like any other value, so the theoretical speed-up of
the README stays on paper. This module turns it into time:

    python tkp_deploy.py runs/vgg8-.../final.pt --output runs/vgg8-.../deploy.pt
    python tkp_deploy.py final.pt --output deploy.pt --threads 1 --batch-sizes 1,32 --json deploy.json

    import tkp_deploy
    model = tkp_deploy.load("deploy.pt")      # an eval-mode nn.Module: CPU, NCHW float32 input
    logits = model(images)

What `python tkp_deploy.py` does:

1. rebuilds the trained model with the script that trained it (tkp_common.load_trained:
   --script, else the script final.pt's metrics name, else the model script next to this
   file whose model the weights fit);
2. traces it with torch.fx and folds eval-mode BatchNorm into the preceding convolution
   (torch.fx.experimental.optimization.fuse: a per-output-channel scale, so the Top-K
   pattern survives); a model torch.fx cannot trace is refused with the reason;
3. replaces every pruned Conv2d (kh*kw > K taps, at most K non-zeros per kernel, K <= 8,
   groups 1, dilation 1) by a `TopKConv2d` that stores only the kept taps (values and tap
   indices, (C_out, C_in, K) each) and runs the kernel of csrc/topk_conv.cpp; each layer is
   timed against its dense convolution (eager, NCHW as the deployed graph) at every
   --batch-sizes on this machine, with every register tile the kernel is compiled with, and
   keeps the kernel only where it is faster at every batch size (else it stays dense); what
   a Top-K convolution alone feeds (a residual add, then a ReLU, then a 2x2 max pool) is
   done in the kernel's epilogue;
4. checks the deployed model against the masked model (fp32, max |difference| / max |reference|
   <= 1e-4 and identical top-1 on a batch of 32 standard-normal inputs at the training input
   shape: the training data need not be on the deploying machine);
5. prints a per-layer and whole-model table (dense ms, deploy ms, measured and theoretical
   speed-up; dense = the same model with BatchNorm folded, eager) and saves deploy.pt.

The kernel is compiled from source on first use by torch.utils.cpp_extension (g++ -O3
-march=native, cached in torch's extension folder, TORCH_EXTENSIONS_DIR), registered as the
torch op `tkp::topk_conv2d` (with a shape function, so torch.compile and torch.export can
trace it) and runs on torch's intra-op threads. It needs AVX-512. Where it cannot be built
(no compiler, no AVX-512, or TKP_DEPLOY_NO_KERNEL=1), deployment keeps every convolution
dense and prints one line that says why; a deploy.pt loaded there runs its Top-K layers as
dense convolutions rebuilt from the kept taps.

deploy.pt: why not a pickled module, a TorchScript or a torch.export archive. It must open
with `torch.load(path, weights_only=True)` (no code runs when it is read) and rebuild the
network without the training scripts. A pickled nn.Module or fx.GraphModule is code; a
TorchScript or .pt2 archive is not torch.load-able. So deploy.pt holds the folded model's
torch.fx graph written out as plain values, beside the modules' tensors:

    {"format": "tkp-deploy-1",
     "graph":   [{"name", "op", "target", "args", "kwargs"}, ...],   # torch.fx nodes, in order
     "modules": {qualified name: {"type": "Conv2d" | "TopKConv2d" | ..., "config": {...},
                                  "state": {name: tensor}}},
     "attrs":   {qualified name: tensor},                          # get_attr constants
     "input_shape": [C, H, W], "layers": [per-layer decisions], "meta": {...}}

Node arguments refer to earlier nodes by name; functions are stored by name and resolved at
load time only from torch, torch.nn.functional, operator and math (public names), methods
only by public name, modules only from a fixed list of torch.nn types plus TopKConv2d. So
any model torch.fx traces into those deploys; the five CNN scripts do.

Measured 2026-11-28 on a 2-vCPU AVX-512 VM (Intel Xeon; other jobs kept both vCPUs busy
during every run), torch 2.14.1, fp32, with `OMP_WAIT_POLICY=PASSIVE python
benchmarks/deploy_latency.py --checkpoint FINAL --threads 1,2 --batch-sizes 1,32 --repeats 15`
on dry-run final.pt files (their masks have the trained models' shapes and K, and nothing
else matters to speed). Speed-up = the fastest dense variant (eager NCHW, channels_last, or
torch.compile with freezing) / Top-K, medians of interleaved rounds, 1 thread:

                                      batch 1        batch 32
    VGG-8 Top-1, 64/128-channel convs   2.42-2.52x     1.92-2.06x
    VGG-8 Top-1, whole model            2.02x          2.28x
    ResNet-56 Top-1, whole model        2.62x          1.74x
    VGG-8 Top-2, 64/128-channel convs   1.51-1.59x     1.30-1.61x

Against eager NCHW dense, the layer each Top-K layer replaces: VGG-8 Top-1 convs 2.8-3.1x
(batch 1) and 2.3-2.5x (batch 32), whole model 2.50x and 4.25x; ResNet-56 3.16x and 2.70x.
With 2 threads nothing ran faster than with 1 (the other jobs held both vCPUs) and the
ratios moved by -15% to +30% (ResNet-56's at batch 1 by more: its dense model ran 2.5x
slower); the 3-channel first conv of VGG-8 fell to 0.86x at batch 32 against channels_last
dense (deployment compares with NCHW, the layout of the deployed graph, and kept it).
The kernel computes at 15-25 GMAC/s where oneDNN's dense convolution reaches 80-110 on the
same core: every multiply-add loads an unaligned vector (csrc/topk_conv.cpp says more), so
K = 1 (9x fewer MACs) turns into 2-2.6x, short of our targets (4x / 2.5x per layer,
3x whole VGG-8, 2x ResNet-56 reached, 2x Top-2).
"""

from __future__ import annotations

import argparse
import builtins
import copy
import json
import math
import operator
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
KERNEL_SOURCE = ROOT / "csrc" / "topk_conv.cpp"
FORMAT = "tkp-deploy-1"
MAX_K = 8
REL_TOLERANCE = 1e-4


class DeployError(Exception):
    """A deployment that cannot go on; the message says why."""


# ==== The kernel: compiled on first use ====================================================

_kernel: dict = {}  # {"ok": bool, "why": str, "module": the built extension}: the one build attempt


def kernel_available(announce: bool = True) -> bool:
    """Whether tkp::topk_conv2d can run: builds and loads csrc/topk_conv.cpp on the first
    call (seconds; cached by torch across processes). On failure prints one line that says
    why (when `announce`), and every later call answers False without retrying."""
    if not _kernel:
        try:
            _build_kernel()
            _kernel.update(ok=True, why="")
        except Exception as e:  # no compiler, no AVX-512, a broken toolchain: deploy dense
            _kernel.update(ok=False, why=_one_line(e))
            if announce:
                print(f"tkp_deploy: the Top-K kernel is unavailable ({_kernel['why']}); "
                      f"Top-K layers run as dense convolutions", flush=True)
    return _kernel["ok"]


def kernel_problem() -> str:
    """Why the kernel is unavailable ('' when it is, or before the first attempt)."""
    return _kernel.get("why", "")


def _build_kernel() -> None:
    if os.environ.get("TKP_DEPLOY_NO_KERNEL", "") not in ("", "0"):
        raise RuntimeError("TKP_DEPLOY_NO_KERNEL is set")
    from torch.utils import cpp_extension
    # -march=native: one build per kind of CPU, should the extension folder be shared by several
    _kernel["module"] = cpp_extension.load(name=f"tkp_topk_conv_{_cpu_tag()}", sources=[str(KERNEL_SOURCE)],
                                           extra_cflags=["-O3", "-march=native"], verbose=False)


def _cpu_tag() -> str:
    """A short name for this CPU's model and instruction set (from /proc/cpuinfo on Linux)."""
    import hashlib
    import platform
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return f"{platform.machine()}_{hashlib.sha1(chr(10).join(lines).encode()).hexdigest()[:8]}"


def _one_line(e: BaseException) -> str:
    """The telling line of an exception (a compiler's '#error' or 'error:' line when there
    is one, not ninja's whole log)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "#error" in ln or " error:" in ln or ln.startswith("error:"):
            return ln[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


def tile_kinds() -> list[tuple[int, int]]:
    """The (M output channels, S vectors of 16 positions) register tiles compiled in."""
    flat = list(torch.ops.tkp.tile_kinds())
    return list(zip(flat[0::2], flat[1::2]))


# ==== The Top-K convolution module ==========================================================


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
    not float32 on the CPU) it runs F.conv2d on the dense weight rebuilt from the kept taps."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, k: int = 1,
                 bias: bool = True, tile=(4, 4), relu: bool = False, pool: int = 0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.k, self.relu, self.pool = k, relu, pool
        self.register_buffer("values", torch.zeros(out_channels, in_channels, k))
        self.register_buffer("taps", torch.zeros(out_channels, in_channels, k, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.tile = tuple(tile)
        self._packed = None  # (values, taps) in the kernel's tile order, built on first use
        self._dense = None   # the dense weight, built on first use where the kernel cannot run

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, tile=(4, 4)) -> "TopKConv2d":
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
        self.tile, self._packed = tuple(tile), None

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
        padded with zero weights to a multiple of M."""
        if self._packed is None:
            m = self.tile[0]
            tiles = -(-self.out_channels // m)
            v = torch.zeros(tiles * m, self.in_channels, self.k)
            t = torch.zeros(tiles * m, self.in_channels, self.k, dtype=torch.int32)
            v[:self.out_channels] = self.values.float()
            t[:self.out_channels] = self.taps.int()
            self._packed = (v.reshape(tiles, m, self.in_channels, self.k).permute(0, 2, 3, 1).contiguous(),
                            t.reshape(tiles, m, self.in_channels, self.k).permute(0, 2, 3, 1).contiguous())
        return self._packed

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and kernel_available()
                and (residual is None or residual.dtype == torch.float32)):
            values, taps = self.packed()
            args = (values, taps, self.bias, self.out_channels, *self.kernel_size, *self.stride, *self.padding,
                    self.tile[0], self.tile[1], 0, self.relu, residual, self.pool)
            if torch.compiler.is_compiling() or torch.compiler.is_exporting():
                return torch.ops.tkp.topk_conv2d(x, *args)  # the registered op, which they can trace
            return _kernel["module"].topk_conv2d(x, *args)  # the same function without torch.ops' parsing
        if self._dense is None or self._dense.dtype != x.dtype:
            self._dense = self.dense_weight().to(x.dtype)
        y = F.conv2d(x, self._dense, None if self.bias is None else self.bias.to(x.dtype), self.stride, self.padding)
        if residual is not None:
            y = y + residual
        if self.relu:
            y = F.relu(y)
        return F.max_pool2d(y, 2) if self.pool else y


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def kernel_takes(conv: nn.Module) -> str | None:
    """None if `conv` is a Conv2d the kernel computes from its kept taps, else why not."""
    if type(conv) is not nn.Conv2d:
        return "not a Conv2d"
    kh, kw = conv.kernel_size
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return "groups, dilation or padding the kernel does not take"
    k = int((conv.weight.detach().reshape(conv.out_channels, conv.in_channels, -1) != 0).sum(-1).max())
    if k >= kh * kw:
        return "dense"
    if kh * kw > 256:
        return "more than 256 taps per kernel"
    if k > MAX_K:
        return f"K={k} > {MAX_K}"
    return None


# ==== The trained model, rebuilt by the script that trained it ==============================
# (small copies of the engine's: tkp_deploy imports no training code until it deploys)

# flags of a run that do not describe the model (as the engine's OPERATIONAL_FLAGS)
def rebuild_model(final_path: str, script: str | None = None) -> tuple[nn.Module, tuple, str]:
    """(model in eval mode with final.pt's weights loaded strictly, input shape (C, H, W),
    script file name), by tkp_common.load_trained: the script `script` names, else the one
    final.pt's metrics name, else the first model script whose model the weights fit; its
    defaults overlaid with final.pt's flags, no pretrained weights loaded, masks checked.
    (Only deployment needs the training scripts; `load` does not.)"""
    import tkp_common as tkp
    try:
        trained = tkp.load_trained(final_path, script, "final.pt")
    except tkp.TKPError as e:
        raise DeployError(str(e)) from None
    return trained.model, tuple(trained.script.input_shape(trained.args)), trained.script.file


# ==== Tracing and BatchNorm folding ==========================================================


def fold_batchnorm(model: nn.Module) -> torch.fx.GraphModule:
    """The model as a torch.fx GraphModule (eval mode) with every BatchNorm2d that directly
    follows a Conv2d (its only consumer) folded into the Conv2d's weight and bias, and the
    Identity and Dropout modules (no-ops in eval mode) taken out of the graph."""
    from torch.fx.experimental.optimization import fuse
    model = copy.deepcopy(model).eval()
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as e:
        raise DeployError(f"torch.fx cannot trace {type(model).__name__} ({_one_line(e)}); deployment needs a "
                          f"traceable model") from e
    gm = fuse(traced, inplace=True, no_trace=True).eval()
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):  # in eval mode an Identity or a Dropout passes its input on
        if node.op == "call_module" and type(modules[node.target]) in (nn.Identity, nn.Dropout, nn.Dropout2d) \
                and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def conv_input_shapes(gm: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """{module name: input shape} of every Conv2d for input `x`."""
    shapes, hooks = {}, []

    def record(name):
        def hook(module, inputs):  # returns None: the input is left alone
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    for name, m in gm.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def layer_macs(gm: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, float]]:
    """{name: (dense MACs per image, fraction of non-zero weights)} of every Conv2d and Linear."""
    out, hooks = {}, []

    def record(name):
        def hook(m, inputs, y):
            w = m.weight
            if isinstance(m, nn.Linear):
                macs = m.in_features * m.out_features * (y.numel() // y.shape[-1]) // y.shape[0]
            else:
                macs = y[0].numel() * w[0].numel()
            out[name] = (macs, float((w != 0).float().mean()))
        return hook

    for name, m in gm.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def theoretical_speedup(macs: dict) -> float:
    """Dense MACs / non-zero MACs (each layer's MACs scaled by its weight density), as the
    README's speedup_theoretical."""
    dense = sum(m for m, _ in macs.values())
    nonzero = sum(m * d for m, d in macs.values())
    return dense / nonzero if nonzero else float("inf")


# ==== Timing =================================================================================


def measure_interleaved(fns: dict[str, Callable], repeats: int = 7, min_round_s: float = 0.004) -> dict[str, float]:
    """{name: median ms per call}: each function warmed up, then `repeats` rounds in which
    every function runs back-to-back calls lasting about `min_round_s`, in turn, so that
    drift and other processes hit them alike."""
    calls = {}
    with torch.no_grad():
        for name, fn in fns.items():
            fn()
            n, t = 1, 0.0
            while True:
                tic = time.perf_counter()
                for _ in range(n):
                    fn()
                t = time.perf_counter() - tic
                if t >= min_round_s or n >= 1 << 14:
                    break
                n = min(1 << 14, n * max(2, math.ceil(min_round_s / max(t, 1e-7))))
            calls[name] = n
        rounds = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                tic = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                rounds[name].append((time.perf_counter() - tic) / calls[name] * 1e3)
    return {name: statistics.median(v) for name, v in rounds.items()}


# ==== Deployment ==============================================================================


def choose_layers(gm: torch.fx.GraphModule, input_shape: tuple, batch_sizes: list[int], *, repeats: int = 7,
                  tiles: list[tuple[int, int]] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Decide per Conv2d whether the Top-K kernel replaces it: every register tile is timed
    against the dense convolution at every batch size (interleaved, medians); the fastest
    tile (least mean time relative to dense) is kept if it beats dense at every batch size.
    Layers of the same shape and K share one measurement. Returns one record per Conv2d."""
    shapes = conv_input_shapes(gm, torch.zeros(1, *input_shape))
    modules = dict(gm.named_modules())
    records, measured = [], {}
    use_kernel = kernel_available()
    for name, in_shape in shapes.items():
        conv = modules[name]
        kh, kw = conv.kernel_size
        nnz = (conv.weight.detach().reshape(conv.out_channels, conv.in_channels, -1) != 0).sum(-1)
        rec = {"name": name, "in_channels": conv.in_channels, "out_channels": conv.out_channels,
               "kernel_size": [kh, kw], "stride": list(conv.stride), "input_hw": list(in_shape[2:]),
               "k": int(nnz.max()), "theoretical": kh * kw * nnz.numel() / max(int(nnz.sum()), 1),
               "deploy": "dense", "why": None, "tile": None, "timings": {}}
        records.append(rec)
        rec["why"] = kernel_takes(conv)
        if _tapgroup().choose(conv, rec, in_shape, batch_sizes, repeats, measured, log):
            continue  # a tap-group mask, computed faster by TapGroupConv2d (tkp_tapgroup.py)
        if rec["why"] is None and not use_kernel:
            rec["why"] = "kernel unavailable"
        if rec["why"] is not None:
            continue
        key = (conv.in_channels, conv.out_channels, kh, kw, conv.stride, conv.padding, tuple(in_shape[1:]), rec["k"])
        if key not in measured:
            measured[key] = _time_layer(conv, in_shape, batch_sizes, repeats, tiles or tile_kinds())
            log(f"  timed {name}: {_timing_line(measured[key])}")
        best_tile, timings = measured[key]
        rec["timings"] = timings
        rec["tile"] = list(best_tile)
        faster = all(t["kernel_ms"] < t["dense_ms"] for t in timings.values())
        rec["deploy"] = "topk" if faster else "dense"
        rec["why"] = None if faster else "not faster than dense here"
    return records


def _time_layer(conv: nn.Conv2d, in_shape: tuple, batch_sizes: list[int], repeats: int, tiles: list):
    """(best tile, {batch: {"dense_ms", "kernel_ms"}}) for one layer."""
    kernels = {t: TopKConv2d.from_conv(conv, t) for t in tiles}
    per_batch = {}
    for b in batch_sizes:
        x = torch.randn(b, *in_shape[1:])
        fns = {"dense": lambda: conv(x)}
        fns.update({t: (lambda m=m: m(x)) for t, m in kernels.items()})
        per_batch[b] = measure_interleaved(fns, repeats=max(3, repeats // 2))
    best = min(tiles, key=lambda t: sum(per_batch[b][t] / per_batch[b]["dense"] for b in batch_sizes))
    timings = {}
    for b in batch_sizes:  # a second, longer interleaved measurement of the chosen tile alone
        x = torch.randn(b, *in_shape[1:])
        r = measure_interleaved({"dense": lambda: conv(x), "kernel": lambda: kernels[best](x)}, repeats=repeats)
        timings[b] = {"dense_ms": r["dense"], "kernel_ms": r["kernel"]}
    return best, timings


def _timing_line(measured) -> str:
    tile, timings = measured
    return f"tile {tile[0]}x{tile[1]}, " + ", ".join(
        f"batch {b}: {t['dense_ms']:.3f} ms dense, {t['kernel_ms']:.3f} ms Top-K "
        f"({t['dense_ms'] / t['kernel_ms']:.2f}x)"
        for b, t in timings.items())


def apply_layers(gm: torch.fx.GraphModule, records: list[dict], input_shape: tuple) -> torch.fx.GraphModule:
    """Replace the convolutions `records` marks "topk" by TopKConv2d (in place), then fold
    into each the residual add, ReLU and 2x2 max pool it alone feeds (fuse_epilogues)."""
    for rec in records:
        if rec["deploy"] == "topk":
            _set_module(gm, rec["name"], TopKConv2d.from_conv(gm.get_submodule(rec["name"]), rec["tile"]))
        elif rec["deploy"] == "tapgroup":
            _set_module(gm, rec["name"], _tapgroup().TapGroupConv2d.from_conv(
                gm.get_submodule(rec["name"]), rec["group"], rec["group_k"], rec["tile"]))
    fuse_epilogues(gm, torch.zeros(1, *input_shape))
    return gm


def _tapgroup():
    """tkp_tapgroup (TapGroupConv2d for tap-group masks), imported on first use."""
    import tkp_tapgroup
    return tkp_tapgroup


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_) and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _is_add(node: torch.fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd))
            or (node.op == "call_method" and node.target in ("add", "add_"))) and len(node.args) == 2 \
        and not node.kwargs


def _is_pool2(node: torch.fx.Node, modules: dict) -> bool:
    """A 2x2 max pool of stride 2 without padding (VGG's nn.MaxPool2d(2))."""
    m = modules.get(node.target) if node.op == "call_module" else None
    return type(m) is nn.MaxPool2d and not m.return_indices and not m.ceil_mode and \
        _pair(m.kernel_size) == (2, 2) and _pair(m.stride or m.kernel_size) == (2, 2) and \
        _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1)


def fuse_epilogues(gm: torch.fx.GraphModule, example: torch.Tensor) -> int:
    """Fold into each TopKConv2d (or TapGroupConv2d) what follows it when it is the only consumer: a residual
    add (the other operand shaped like the convolution's output), then a ReLU, then a 2x2 max
    pool. Returns how many operations were folded."""
    from torch.fx.passes.shape_prop import ShapeProp
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    fused = 0

    def only_user(node):
        return next(iter(node.users)) if len(node.users) == 1 else None

    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, (TopKConv2d, _tapgroup().TapGroupConv2d)) or conv.relu or conv.pool:
            continue
        user = only_user(node)
        if user is not None and _is_add(user) and len(node.args) == 1:
            other = user.args[1] if user.args[0] is node else user.args[0]
            shape = node.meta.get("tensor_meta")
            other_shape = other.meta.get("tensor_meta") if isinstance(other, torch.fx.Node) else None
            if other is not node and shape is not None and other_shape is not None \
                    and tuple(other_shape.shape) == tuple(shape.shape) and other_shape.dtype == shape.dtype:
                user.prepend(node)  # after every input, including the residual's producer
                node.args = (node.args[0], other)
                user.replace_all_uses_with(node)
                gm.graph.erase_node(user)
                fused += 1
        user = only_user(node)
        if user is not None and _is_relu(user, modules) and user.args[0] is node:
            conv.relu = True
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            fused += 1
        user = only_user(node)
        if user is not None and _is_pool2(user, modules) and user.args[0] is node and len(user.args) == 1:
            conv.pool = 2
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            fused += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return fused


def verify(deployed: nn.Module, reference: nn.Module, x: torch.Tensor) -> dict:
    """Deployed vs reference outputs on `x`: max |difference| / max |reference| and whether
    the top-1 classes agree on every input."""
    with torch.no_grad():
        y, ref = deployed(x), reference(x)
    rel = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    same = bool((y.argmax(-1) == ref.argmax(-1)).all())
    return {"max_rel_error": rel, "top1_identical": same, "batch": x.shape[0],
            "ok": rel <= REL_TOLERANCE and same}


def time_models(models: dict[str, nn.Module], input_shape: tuple, batch_sizes: list[int], repeats: int = 9) -> dict:
    """{batch: {name: median ms}}, the models timed interleaved at each batch size."""
    out = {}
    for b in batch_sizes:
        x = torch.randn(b, *input_shape)
        out[b] = measure_interleaved({n: (lambda m=m: m(x)) for n, m in models.items()}, repeats=repeats)
    return out


# ==== deploy.pt: the graph as plain values, the modules as tensors ============================

# torch.nn modules a deploy.pt may hold, with the constructor arguments read back from them
_MODULE_CONFIG = {
    "Conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
               "padding_mode"),
    "Linear": ("in_features", "out_features", "bias"),
    "BatchNorm2d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "BatchNorm1d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "ReLU": ("inplace",), "ReLU6": ("inplace",), "SiLU": ("inplace",), "Hardswish": ("inplace",),
    "GELU": ("approximate",), "Sigmoid": (), "Tanh": (), "Identity": (), "Softmax": ("dim",),
    "LeakyReLU": ("negative_slope", "inplace"),
    "Dropout": ("p", "inplace"), "Dropout2d": ("p", "inplace"),
    "Flatten": ("start_dim", "end_dim"),
    "MaxPool2d": ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    "AvgPool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "AdaptiveAvgPool2d": ("output_size",), "AdaptiveMaxPool2d": ("output_size", "return_indices"),
}
_FUNCTION_NAMESPACES = {"torch.nn.functional": F, "torch": torch, "operator": operator, "math": math}
_BUILTINS = {"getattr", "len", "int", "float", "min", "max", "abs"}


def _module_spec(m: nn.Module) -> dict:
    kind = type(m).__name__
    if isinstance(m, (TopKConv2d, _tapgroup().TapGroupConv2d)):
        config = m.config()
    elif kind in _MODULE_CONFIG and type(m) is getattr(nn, kind):
        config = {a: _plain(getattr(m, a)) for a in _MODULE_CONFIG[kind]}
        if "bias" in config:
            config["bias"] = m.bias is not None
    else:
        raise DeployError(f"deploy.pt cannot hold a {kind} module (known: TopKConv2d, {', '.join(_MODULE_CONFIG)})")
    return {"type": kind, "config": config, "state": {k: v.detach().clone() for k, v in m.state_dict().items()}}


def _module_from_spec(spec: dict) -> nn.Module:
    kind, config = spec["type"], dict(spec["config"])
    if kind == "TopKConv2d":
        m = TopKConv2d(**config)
    elif kind == "TapGroupConv2d":
        m = _tapgroup().TapGroupConv2d(**config)
    elif kind in _MODULE_CONFIG:
        if set(config) - set(_MODULE_CONFIG[kind]):
            unexpected = sorted(set(config) - set(_MODULE_CONFIG[kind]))
            raise DeployError(f"deploy.pt: unexpected {kind} arguments {unexpected}")
        m = getattr(nn, kind)(**config)
    else:
        raise DeployError(f"deploy.pt holds an unknown module type {kind!r}")
    m.load_state_dict(spec["state"], strict=True)
    return m


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _function_name(fn) -> str:
    for prefix, ns in _FUNCTION_NAMESPACES.items():
        name = getattr(fn, "__name__", None)
        if name and not name.startswith("_") and getattr(ns, name, None) is fn:
            return f"{prefix}.{name}"
    if getattr(builtins, getattr(fn, "__name__", ""), None) is fn and fn.__name__ in _BUILTINS:
        return f"builtins.{fn.__name__}"
    raise DeployError(f"deploy.pt cannot name the function {fn!r} (only public torch, torch.nn.functional, "
                      f"operator and math functions)")


def _function(name: str):
    prefix, _, attr = name.rpartition(".")
    if prefix == "builtins" and attr in _BUILTINS:
        return getattr(builtins, attr)
    if prefix in _FUNCTION_NAMESPACES and not attr.startswith("_") and hasattr(_FUNCTION_NAMESPACES[prefix], attr):
        return getattr(_FUNCTION_NAMESPACES[prefix], attr)
    raise DeployError(f"deploy.pt names a function it may not call: {name!r}")


def _encode(a):
    """A node argument as plain values: nodes by name, slices and dtypes tagged."""
    if isinstance(a, torch.fx.Node):
        return {"node": a.name}
    if isinstance(a, tuple):
        return tuple(_encode(v) for v in a)
    if isinstance(a, list):
        return [_encode(v) for v in a]
    if isinstance(a, dict):
        return {"dict": {str(k): _encode(v) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"slice": [_encode(a.start), _encode(a.stop), _encode(a.step)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise DeployError(f"deploy.pt cannot hold the graph argument {a!r} ({type(a).__name__})")


def _decode(a, nodes: dict):
    if isinstance(a, tuple):
        return tuple(_decode(v, nodes) for v in a)
    if isinstance(a, list):
        return [_decode(v, nodes) for v in a]
    if isinstance(a, dict):
        (tag, v), = a.items()
        if tag == "node":
            return nodes[v]
        if tag == "dict":
            return {k: _decode(x, nodes) for k, x in v.items()}
        if tag == "slice":
            return slice(*(_decode(x, nodes) for x in v))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "dtype" and isinstance(getattr(torch, v, None), torch.dtype):
            return getattr(torch, v)
        if tag == "device":
            return torch.device(v)
        raise DeployError(f"deploy.pt: unknown argument tag {tag!r}")
    return a


def to_spec(gm: torch.fx.GraphModule) -> dict:
    """The plain-values description of a GraphModule (graph, modules, attributes)."""
    graph, modules, attrs = [], {}, {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            modules.setdefault(n.target, _module_spec(gm.get_submodule(n.target)))
            target = n.target
        elif n.op == "call_function":
            target = _function_name(n.target)
        elif n.op == "get_attr":
            value = _get_attr(gm, n.target)
            if not isinstance(value, torch.Tensor):
                raise DeployError(f"deploy.pt cannot hold the attribute {n.target} ({type(value).__name__})")
            attrs[n.target] = value.detach().clone()
            target = n.target
        else:  # placeholder, call_method, output
            target = n.target
        graph.append({"name": n.name, "op": n.op, "target": target, "args": _encode(n.args),
                      "kwargs": _encode(n.kwargs)})
    return {"graph": graph, "modules": modules, "attrs": attrs}


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def from_spec(spec: dict) -> torch.fx.GraphModule:
    """The GraphModule that `to_spec` described; refuses anything outside its allow-lists."""
    root: dict = {name: _module_from_spec(m) for name, m in spec["modules"].items()}
    root.update(spec.get("attrs", {}))
    graph, nodes = torch.fx.Graph(), {}
    for n in spec["graph"]:
        op, target = n["op"], n["target"]
        args, kwargs = _decode(n["args"], nodes), _decode(n["kwargs"], nodes)
        if op == "placeholder":
            node = graph.placeholder(target)
        elif op == "get_attr":
            node = graph.get_attr(target)
        elif op == "call_module":
            if target not in root:
                raise DeployError(f"deploy.pt calls a module it does not hold: {target!r}")
            node = graph.call_module(target, args, kwargs)
        elif op == "call_function":
            node = graph.call_function(_function(target), args, kwargs)
        elif op == "call_method":
            if not isinstance(target, str) or target.startswith("_"):
                raise DeployError(f"deploy.pt calls a method it may not call: {target!r}")
            node = graph.call_method(target, args, kwargs)
        elif op == "output":
            node = graph.output(args[0])
        else:
            raise DeployError(f"deploy.pt: unknown node kind {op!r}")
        nodes[n["name"]] = node
    graph.lint()
    return torch.fx.GraphModule(root, graph).eval()


def save(gm: torch.fx.GraphModule, path: str | Path, *, input_shape: tuple, layers: list[dict], meta: dict) -> None:
    """Write deploy.pt (through a temporary file and a rename)."""
    spec = {"format": FORMAT, **to_spec(gm), "input_shape": list(input_shape), "layers": layers, "meta": meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(spec, tmp)
    os.replace(tmp, path)


def load(path: str | Path) -> torch.fx.GraphModule:
    """The deployed model of a deploy.pt: an eval-mode nn.Module taking NCHW float32 CPU
    input. Opens the file with torch.load(weights_only=True); imports no training script.
    The Top-K layers use the kernel (building it on first use) or, where it cannot be built,
    dense convolutions (one printed line says why)."""
    spec = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise DeployError(f"{path} is not a {FORMAT} file (written by tkp_deploy.py)")
    gm = from_spec(spec)
    if any(isinstance(m, TopKConv2d) for m in gm.modules()):
        kernel_available()
    return gm


# ==== Command line ===========================================================================


def batch_list(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes like 1,32, got {text!r}")
    return sizes


def tile_list(text: str) -> list[tuple[int, int]]:
    try:
        tiles = [tuple(int(v) for v in t.lower().split("x")) for t in text.split(",") if t.strip()]
    except ValueError:
        tiles = []
    if not tiles or any(len(t) != 2 for t in tiles):
        raise argparse.ArgumentTypeError(f"expected tiles like 4x4,2x8 (M output channels x S vectors), got {text!r}")
    return tiles


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Deploy a Top-K pruned CNN (final.pt) with the Top-K CPU kernel",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a run's final.pt")
    p.add_argument("--output", required=True, help="where to write deploy.pt")
    p.add_argument("--script", default=None,
                   help="the model script (file or short name, e.g. vgg8) when final.pt does not record it")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--batch-sizes", type=batch_list, default=[1, 32], help="batch sizes timed per layer and whole")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds (medians)")
    p.add_argument("--verify-batch", type=int, default=32, help="inputs in the deployed-vs-masked check")
    p.add_argument("--tiles", type=tile_list, default=None,
                   help="register tiles to try per layer, e.g. 4x4,2x8 (default: every tile compiled in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    return p


def format_report(report: dict) -> str:
    batches = report["batch_sizes"]
    head = f"{'layer':<28} {'shape':<22} {'K':>2} {'theory':>7}  " + "  ".join(
        f"{'b' + str(b) + ' dense':>10} {'deploy':>8} {'speed-up':>8}" for b in batches) + "  decision"
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        shape = f"{r['in_channels']}->{r['out_channels']} {r['kernel_size'][0]}x{r['kernel_size'][1]}" \
                f"/{r['stride'][0]} @{r['input_hw'][0]}"
        cells = []
        for b in batches:
            t = r["timings"].get(b) or r["timings"].get(str(b))
            if t:
                ms = t["kernel_ms"] if r["deploy"] in ("topk", "tapgroup") else t["dense_ms"]
                cells.append(f"{t['dense_ms']:>10.3f} {ms:>8.3f} {t['dense_ms'] / ms:>7.2f}x")
            else:
                cells.append(f"{'-':>10} {'-':>8} {'-':>8}")
        decision = f"Top-K tile {r['tile'][0]}x{r['tile'][1]}" if r["deploy"] == "topk" else f"dense ({r['why']})"
        if r["deploy"] == "tapgroup":
            decision = f"tap group {r['group']}, tile {r['tile'][0]}x{r['tile'][1]}"
        lines.append(f"{r['name']:<28} {shape:<22} {r['k']:>2} {r['theoretical']:>6.2f}x  " + "  ".join(cells)
                     + f"  {decision}")
    w = report["whole_model"]
    lines.append("-" * len(head))
    cells = [f"{w[str(b)]['dense_ms']:>10.3f} {w[str(b)]['deploy_ms']:>8.3f} {w[str(b)]['speedup']:>7.2f}x"
             for b in batches]
    lines.append(f"{'whole model':<28} {'':<22} {'':>2} {report['theoretical']:>6.2f}x  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, input_shape, script = rebuild_model(args.checkpoint, args.script)
    print(f"tkp_deploy: {args.checkpoint} ({script}, input {tuple(input_shape)}), {torch.get_num_threads()} "
          f"thread(s), batch sizes {args.batch_sizes}", flush=True)
    folded = fold_batchnorm(model)
    dense = copy.deepcopy(folded)
    if args.tiles and kernel_available():
        unknown = [t for t in args.tiles if t not in tile_kinds()]
        if unknown:
            raise DeployError(f"--tiles {unknown} not compiled in; choose from {tile_kinds()}")
    records = choose_layers(folded, input_shape, args.batch_sizes, repeats=args.repeats, tiles=args.tiles)
    deployed = apply_layers(folded, records, input_shape)

    x = torch.randn(args.verify_batch, *input_shape)
    check = verify(deployed, model, x)
    print(f"check against the masked model ({check['batch']} inputs): max relative error "
          f"{check['max_rel_error']:.2e} (<= {REL_TOLERANCE:g}), top-1 identical: {check['top1_identical']}")
    if not check["ok"]:
        raise DeployError("the deployed model does not match the masked model; deploy.pt not written")

    whole = time_models({"dense": dense, "deploy": deployed}, input_shape, args.batch_sizes, repeats=args.repeats)
    macs = layer_macs(dense, torch.zeros(1, *input_shape))
    report = {
        "checkpoint": str(args.checkpoint), "script": script, "input_shape": list(input_shape),
        "threads": torch.get_num_threads(), "batch_sizes": args.batch_sizes, "torch": str(torch.__version__),
        "kernel": "available" if kernel_available(announce=False) else f"unavailable: {kernel_problem()}",
        "layers": records, "check": check, "theoretical": theoretical_speedup(macs),
        "whole_model": {str(b): {"dense_ms": t["dense"], "deploy_ms": t["deploy"], "speedup": t["dense"] / t["deploy"]}
                        for b, t in whole.items()},
    }
    print(format_report(report))
    print("dense = the same model with BatchNorm folded, eager; medians of interleaved rounds; theory = dense MACs /"
          " non-zero MACs")
    meta = {k: report[k] for k in ("checkpoint", "script", "threads", "batch_sizes", "torch", "kernel", "theoretical")}
    meta["check"] = check
    save(deployed, args.output, input_shape=input_shape, layers=plain(records), meta=plain(meta))
    print(f"wrote {args.output} ({sum(r['deploy'] == 'topk' for r in records)} of {len(records)} convolutions Top-K)")
    if args.json:
        Path(args.json).write_text(json.dumps(plain(report), indent=1))
    return report


def plain(obj):
    """`obj` as plain Python values (str keys, lists for tuples, str for str subclasses such as
    torch's version), as torch.load(weights_only=True) and json accept."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    return str(obj)


if __name__ == "__main__":
    try:
        main()
    except DeployError as e:
        sys.exit(f"tkp_deploy: {e}")
