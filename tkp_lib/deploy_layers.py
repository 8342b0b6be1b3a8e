"""Deployment, layer by layer: trace and fold, choose a kernel per convolution, fuse, check.

Owns the steps of `python tkp_deploy.py` between the rebuilt model and deploy.pt: `trace`
(torch.fx, with the module types deploy.pt holds as leaves and every other module traced
through; what deploy.pt could not hold is refused here, before any timing), `fold_batchnorm`
(eval-mode BatchNorm folded into the preceding conv: a per-output-channel scale, so the
Top-K pattern survives), `choose_layers` (each pruned conv timed against its dense self on
this machine, every register tile, every batch size; the kernel kept only where it is
faster at every batch size; `_candidates` alone decides which kernel may replace a conv),
`apply_layers` and `fuse_epilogues` (a residual add, ReLU and 2x2 max pool that a kernel
layer alone feeds run in its epilogue; a depthwise layer also a ReLU6), `to_channels_last`, `verify` (deployed vs masked
outputs), `summary` and `time_models`.

Memory layout: the tap-group kernel works in NHWC (channels_last) and returns channels_last;
the Top-K and depthwise kernels work in NCHW. A deployed network with tap-group layers therefore converts
its input to channels_last once, at the top of the graph (`to_channels_last`: a permute,
contiguous, permute, which deploy.pt holds as plain values), and stays there: torch's
ReLU, add, pooling and dense convolutions keep channels_last (the dense convolutions'
weights are made channels_last too, where oneDNN runs fastest), and an op that needs
another order (flatten before a Linear) reorders as it copies. Each candidate is timed
per layer in the layout it will run in, against the faster dense layout.
May import: tkp_lib.kernels, tkp_lib.topk_conv, tkp_lib.tapgroup, tkp_lib.depthwise, tkp_lib.deploy_ops,
tkp_lib.deploy_format.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from typing import Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from tkp_lib import deploy_format, deploy_ops, depthwise, kernels, tapgroup, topk_conv
from tkp_lib.deploy_format import DeployError
from tkp_lib.depthwise import DepthwiseTopKConv2d
from tkp_lib.tapgroup import TapGroupConv2d
from tkp_lib.topk_conv import TopKConv2d

REL_TOLERANCE = 1e-4  # deployed vs masked: max |difference| / max |reference|
KERNEL_LAYERS = tuple(deploy_ops.KERNEL_LAYERS.values())
# choose_layers' "deploy" kinds, as the summary names them
KIND_NAMES = {"topk": "Top-K", "tapgroup": "tap-group", "depthwise": "depthwise"}
GROUPED = "grouped/depthwise: dense"
NHWC_LAYERS = (TapGroupConv2d,)  # kernel layers that work in channels_last


# ==== Tracing and BatchNorm folding ==========================================================


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with the module types deploy.pt holds (tkp_lib.deploy_ops) as the
    only leaves: every other module, a user's LayerNorm or block included, is traced through
    into functions and methods. Each node records the module it came from; a failure, the
    innermost module it happened in."""

    def __init__(self):
        super().__init__()
        self.failed_in = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return deploy_ops.module_type(m) is not None or _computes_as_conv2d(m)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["tkp_scope"] = (self.scope.module_path, getattr(self.scope.module_type, "__name__", None))
        return node

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = (self.path_of_module(m), type(m).__name__)
                except Exception:  # noqa: BLE001 - a module outside the model's tree: name its type only
                    self.failed_in = ("", type(m).__name__)
            raise


def _computes_as_conv2d(m: nn.Module) -> bool:
    """A subclass of nn.Conv2d that computes what nn.Conv2d does (`class MyConv(nn.Conv2d):
    pass`): forward and _conv_forward inherited, parameters weight and bias alone, no
    buffers, submodules (a parametrization) or hooks."""
    t = type(m)
    return isinstance(m, nn.Conv2d) and t is not nn.Conv2d and t.forward is nn.Conv2d.forward \
        and t._conv_forward is nn.Conv2d._conv_forward \
        and {n for n, _ in m.named_parameters(recurse=False)} <= {"weight", "bias"} \
        and not list(m.buffers(recurse=False)) and not list(m.children()) \
        and not (m._forward_hooks or m._forward_pre_hooks)


def _as_conv2d(m: nn.Conv2d) -> nn.Conv2d:
    """A plain nn.Conv2d holding `m`'s parameters (the same tensors)."""
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                     m.bias is not None, m.padding_mode, device="meta")
    conv.weight, conv.bias = m.weight, m.bias
    return conv.train(m.training)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """`model` as a torch.fx GraphModule (see _Tracer); refuses, naming the module, a model
    torch.fx cannot trace. A Conv2d subclass that computes as nn.Conv2d does becomes one, so
    that it is deployed as every other convolution (other subclasses are traced through and
    stay dense)."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        path, kind = tracer.failed_in or ("", type(model).__name__)
        where = f"the model's {path} ({kind})" if path else kind
        raise DeployError(f"torch.fx cannot trace {where} ({kernels.one_line(e)}); deployment needs a model "
                          f"torch.fx can trace: rewrite that forward without data-dependent Python control flow, "
                          f"or open an issue") from e
    for node in graph.nodes:
        if node.meta.get("tkp_scope", ("", None))[0] == "":
            node.meta["tkp_scope"] = ("", type(model).__name__)
    gm = torch.fx.GraphModule(tracer.root, graph)
    for name, m in list(gm.named_modules()):
        if _computes_as_conv2d(m):
            _set_module(gm, name, _as_conv2d(m))
    return gm


_NO_OPS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)  # in eval mode


def _passes_input_on(node: torch.fx.Node, modules: dict) -> bool:
    """An Identity or Dropout module, or F.dropout with training=False: no-ops in eval mode."""
    if node.op == "call_module":
        return type(modules[node.target]) in _NO_OPS and len(node.args) == 1 and not node.kwargs
    if node.op != "call_function" or node.target is not F.dropout:
        return False
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    return training is False and (len(node.args) < 4 or node.args[3] is False)


def fold_batchnorm(model: nn.Module) -> torch.fx.GraphModule:
    """The model traced (`trace`, eval mode) with every BatchNorm2d that directly follows a
    Conv2d (its only consumer) folded into the Conv2d's weight and bias, and the Identity and
    Dropout modules (no-ops in eval mode) taken out of the graph. Refuses, in one line naming
    the module, a model deploy.pt could not hold (tkp_lib.deploy_format.to_spec)."""
    from torch.fx.experimental.optimization import fuse
    model = copy.deepcopy(model).eval()
    gm = fuse(trace(model), inplace=True, no_trace=True).eval()
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if _passes_input_on(node, modules):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    deploy_format.to_spec(gm, tensors=False)
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
    summary.json's speedup_theoretical."""
    dense = sum(m for m, _ in macs.values())
    nonzero = sum(m * d for m, d in macs.values())
    return dense / nonzero if nonzero else float("inf")


# ==== Choosing a kernel per layer ============================================================


def choose_layers(gm: torch.fx.GraphModule, input_shape: tuple, batch_sizes: list[int], *, repeats: int = 7,
                  tiles: list[tuple[int, ...]] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Decide per Conv2d whether a kernel replaces it: TapGroupConv2d for a tap-group mask,
    else TopKConv2d. Every register tile is timed against the dense convolution at every
    batch size (interleaved, medians); the fastest tile (least mean time relative to dense)
    is kept if it beats dense at every batch size. Layers of the same shape, K (and G) share
    one measurement. `tiles` restricts the Top-K kernel's tiles. One record per Conv2d.
    Where the network has tap-group masks, it will run channels_last (`to_channels_last`),
    so an NCHW kernel (Top-K) is timed as it would run there: channels_last in, its output
    converted back to channels_last, the conversions in its time."""
    shapes = conv_input_shapes(gm, torch.zeros(1, *input_shape))
    modules = dict(gm.named_modules())
    channels_last = any(isinstance(m, nn.Conv2d) and tapgroup.tap_group_of(m) is not None
                        for m in modules.values()) and tapgroup.kernel_available()
    records, measured = [], {}
    for name, in_shape in shapes.items():
        conv = modules[name]
        kh, kw = conv.kernel_size
        nnz = (conv.weight.detach().reshape(conv.out_channels, conv.in_channels // conv.groups, -1) != 0).sum(-1)
        rec = {"name": name, "in_channels": conv.in_channels, "out_channels": conv.out_channels,
               "groups": conv.groups, "kernel_size": [kh, kw], "stride": list(conv.stride),
               "input_hw": list(in_shape[2:]), "k": int(nnz.max()),
               "theoretical": kh * kw * nnz.numel() / max(int(nnz.sum()), 1),
               "deploy": "dense", "why": None, "tile": None, "timings": {}}
        records.append(rec)
        candidates = _candidates(conv, tiles)
        if isinstance(candidates, str):
            rec["why"] = candidates
            continue
        for kind, make, kind_tiles, extra in candidates:
            key = (kind, conv.in_channels, conv.out_channels, kh, kw, conv.stride, conv.padding,
                   tuple(in_shape[1:]), rec["k"], tuple(extra.items()))
            if key not in measured:
                measured[key] = time_layer(conv, make, in_shape, batch_sizes, repeats, kind_tiles, channels_last)
                log(f"  timed {name} ({kind}): {_timing_line(measured[key])}")
            tile, timings = measured[key]
            faster = all(t["kernel_ms"] < t["dense_ms"] for t in timings.values())
            rec.update(timings=timings, tile=None if tile is None else list(tile), deploy=kind if faster else "dense",
                       why=None if faster else "not faster than dense here", **(extra if faster else {}))
            if faster:
                break
    return records


def _candidates(conv: nn.Conv2d, tiles) -> list[tuple] | str:
    """[(kind, make(tile) -> module, tiles, record fields)] of the kernels that may replace
    `conv`, in order of preference, or why none may: a pruned depthwise conv has the
    depthwise kernel, other grouped convs stay dense."""
    if conv.groups != 1:
        taps = conv.weight.detach().flatten(2)  # (C_out, C_in / groups, kh * kw)
        if int((taps != 0).sum(-1).max()) >= taps.shape[-1]:
            return "dense"
        why = depthwise.kernel_takes(conv)
        if why is None and not depthwise.kernel_available():
            return "kernel unavailable"
        if why is not None:  # a depthwise conv the kernel cannot compute says why
            return f"depthwise: {why}" if conv.groups == conv.in_channels == conv.out_channels else GROUPED
        return [("depthwise", lambda t: DepthwiseTopKConv2d.from_conv(conv), [None], {})]  # one variant, no tiles
    out = []
    gk = tapgroup.tap_group_of(conv)
    if gk is not None and tapgroup.kernel_available():
        group, k = gk
        out.append(("tapgroup", lambda t: TapGroupConv2d.from_conv(conv, group, k, t),
                    [t for t in tapgroup.tile_kinds() if t[0] <= max(group, 16)], {"group": group, "group_k": k}))
    why = topk_conv.kernel_takes(conv)
    if why is None and not topk_conv.kernel_available():
        why = "kernel unavailable"
    if why is None:
        out.append(("topk", lambda t: TopKConv2d.from_conv(conv, t), topk_conv.tiles_for(conv, tiles), {}))
    return out or why


def time_layer(conv: nn.Conv2d, make: Callable, in_shape: tuple, batch_sizes: list[int], repeats: int,
               tiles: list, channels_last: bool = False) -> tuple[tuple, dict]:
    """(best tile, {batch: {"dense_ms", "kernel_ms"}}) of the module `make(tile)` builds from
    `conv` against `conv`: every tile timed interleaved with dense at every batch size, then
    a second, longer measurement of the best tile alone. `channels_last`: the layer sits in a
    channels_last network, so an NCHW kernel's time includes converting its output back."""
    candidates = {t: make(t) for t in tiles}
    nhwc = isinstance(next(iter(candidates.values())), NHWC_LAYERS)
    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)

    def run(m, x):
        return m(x) if nhwc or not channels_last else m(x).contiguous(memory_format=torch.channels_last)

    def timed(b: int, kernel_fns: dict, repeats: int) -> dict:  # dense = the faster of NCHW and channels_last
        x = torch.randn(b, *in_shape[1:])
        x_cl = x.contiguous(memory_format=torch.channels_last)
        x_kernel = x_cl if nhwc or channels_last else x
        r = kernels.median_ms({"nchw": lambda: conv(x), "nhwc": lambda: conv_cl(x_cl),
                               **{k: (lambda m=m: run(m, x_kernel)) for k, m in kernel_fns.items()}}, repeats=repeats)
        return {"dense": min(r.pop("nchw"), r.pop("nhwc")), **r}

    per_batch = {b: timed(b, candidates, max(3, repeats // 2)) for b in batch_sizes}
    best = min(tiles, key=lambda t: sum(per_batch[b][t] / per_batch[b]["dense"] for b in batch_sizes))
    timings = {}
    for b in batch_sizes:
        r = timed(b, {"kernel": candidates[best]}, repeats)
        timings[b] = {"dense_ms": r["dense"], "kernel_ms": r["kernel"]}
    return best, timings


def tile_name(tile) -> str:
    """'4x4' for the tile (4, 4) or (4, 4, 0), '4x4x1' for (4, 4, 1): as tkp_deploy's --tiles takes them."""
    tile = list(tile)
    return "x".join(str(v) for v in (tile[:2] if tile[2:] == [0] else tile))


def _timing_line(measured) -> str:
    tile, timings = measured
    return ("" if tile is None else f"tile {tile_name(tile)}, ") + ", ".join(
        f"batch {b}: {t['dense_ms']:.3f} ms dense, {t['kernel_ms']:.3f} ms kernel "
        f"({t['dense_ms'] / t['kernel_ms']:.2f}x)"
        for b, t in timings.items())


def apply_layers(gm: torch.fx.GraphModule, records: list[dict], input_shape: tuple) -> torch.fx.GraphModule:
    """Replace the convolutions `records` marks "topk" or "tapgroup" by their kernel modules
    (in place), then fold into each the residual add, ReLU and 2x2 max pool it alone feeds."""
    for rec in records:
        if rec["deploy"] == "topk":
            _set_module(gm, rec["name"], TopKConv2d.from_conv(gm.get_submodule(rec["name"]), rec["tile"]))
        elif rec["deploy"] == "tapgroup":
            _set_module(gm, rec["name"], TapGroupConv2d.from_conv(
                gm.get_submodule(rec["name"]), rec["group"], rec["group_k"], rec["tile"]))
        elif rec["deploy"] == "depthwise":
            _set_module(gm, rec["name"], DepthwiseTopKConv2d.from_conv(gm.get_submodule(rec["name"])))
    fuse_epilogues(gm, input_shape)
    depthwise.fuse_activations(gm)  # a ReLU6
    if any(isinstance(m, NHWC_LAYERS) for m in gm.modules()):
        to_channels_last(gm)
    return gm


def to_channels_last(gm: torch.fx.GraphModule) -> None:
    """Run the network in channels_last from its input on (in place): the input converted
    once at the top of the graph, the dense convolutions' weights in channels_last."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return
    x = inputs[0]
    with gm.graph.inserting_after(x):  # x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2): NHWC memory
        nhwc = gm.graph.call_method("permute", (x, 0, 2, 3, 1))
    with gm.graph.inserting_after(nhwc):
        dense = gm.graph.call_method("contiguous", (nhwc,))
    with gm.graph.inserting_after(dense):
        nchw_view = gm.graph.call_method("permute", (dense, 0, 3, 1, 2))
    x.replace_all_uses_with(nchw_view, delete_user_cb=lambda user: user is not nhwc)
    for m in gm.modules():
        if type(m) is nn.Conv2d:
            m.to(memory_format=torch.channels_last)
    gm.graph.lint()
    gm.recompile()


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


_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _may_write(node: torch.fx.Node, modules: dict) -> bool:
    """Whether `node` may write into a tensor it is given: an in-place method or function
    (`relu_`, `add_`), a module built with inplace=True, a call with out=, or one passing True
    (inplace=True, F.relu(x, True); a keepdim=True is counted too: the answer errs towards yes)."""
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        return node.target in _IN_PLACE_OPERATORS or getattr(node.target, "__name__", "").endswith("_") \
            or any(a is True for a in node.args[1:]) or node.kwargs.get("inplace") is True or "out" in node.kwargs
    return False


class _Shapes(torch.fx.Interpreter):
    """Runs a graph, keeping {node: (shape, dtype)} of every node that returns a tensor."""

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = (tuple(out.shape), out.dtype)
        return out


def _output_shapes(gm: torch.fx.GraphModule, example: torch.Tensor) -> dict | None:
    """{node: (shape, dtype)} of every node that returns a tensor, for one run on `example`;
    None where the network does not run on it (e.g. a Linear fixes the input size)."""
    interpreter = _Shapes(gm)
    interpreter.shapes = {}
    try:
        with torch.no_grad():
            interpreter.run(example)
    except Exception:
        return None
    return interpreter.shapes


def _is_pool2(node: torch.fx.Node, modules: dict) -> bool:
    """A 2x2 max pool of stride 2 without padding (VGG's nn.MaxPool2d(2))."""
    m = modules.get(node.target) if node.op == "call_module" else None
    return type(m) is nn.MaxPool2d and not m.return_indices and not m.ceil_mode and \
        _pair(m.kernel_size) == (2, 2) and _pair(m.stride or m.kernel_size) == (2, 2) and \
        _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1)


def fuse_epilogues(gm: torch.fx.GraphModule, input_shape: tuple) -> int:
    """Fold into each kernel layer what follows it when it is the only consumer: a residual
    add, then a ReLU, then a 2x2 max pool. Returns how many operations were folded.

    The kernel takes the residual as an argument, so the layer's call moves down to the add.
    An add is folded only where that changes nothing: its other operand has the shape of the
    convolution's output (for 2 images at `input_shape`, and at twice its height and width
    where the network runs there: an operand broadcast over the batch or over a 1x1 output
    stays out); no node between the two may write into a tensor it is given (the layer would
    read its input after the write); and an in-place add must write into the layer's output,
    not into the other operand."""
    shapes = [_output_shapes(gm, torch.zeros(2, *input_shape))]
    shapes.append(_output_shapes(gm, torch.zeros(2, input_shape[0], *(2 * v for v in input_shape[1:]))))
    kernels.free_cached_outputs()  # that run's large outputs, which the network's own sizes will not reuse
    shapes = [sh for sh in shapes if sh is not None]
    modules = dict(gm.named_modules())
    fused = 0

    def shaped_alike(node, other):
        return isinstance(other, torch.fx.Node) and bool(shapes) and all(
            node in sh and sh.get(other) == sh[node] for sh in shapes)

    def writes_between(node, user):
        n = node.next
        while n is not user:
            if _may_write(n, modules):
                return True
            n = n.next
        return False

    def only_user(node):
        return next(iter(node.users)) if len(node.users) == 1 else None

    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, KERNEL_LAYERS) or conv.relu or conv.pool:
            continue
        user = only_user(node)
        if user is not None and _is_add(user) and len(node.args) == 1:
            other = user.args[1] if user.args[0] is node else user.args[0]
            in_place = user.target in (operator.iadd, "add_")
            if other is not node and shaped_alike(node, other) and not (in_place and user.args[0] is not node) \
                    and not writes_between(node, user):
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
    the top-1 classes agree on every input; a deployed model that fails says how ("error")."""
    with torch.no_grad():
        ref = reference(x)
        try:
            y = deployed(x)
        except Exception as e:  # a deployment fault: reported in one line, nothing written
            return {"max_rel_error": float("inf"), "top1_identical": False, "batch": x.shape[0], "ok": False,
                    "error": kernels.one_line(e)}
    rel = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    same = bool((y.argmax(-1) == ref.argmax(-1)).all())
    return {"max_rel_error": rel, "top1_identical": same, "batch": x.shape[0],
            "ok": rel <= REL_TOLERANCE and same}


def summary(records: list[dict]) -> str:
    """"N of M convolutions on kernels: a Top-K, b tap-group, c kept dense (why, ...)" of
    choose_layers' records: every kind of layer counted ("not pruned": every tap kept)."""
    kinds = Counter(r["deploy"] for r in records if r["deploy"] != "dense")
    parts = [f"{kinds.pop(k, 0)} {name}" for k, name in KIND_NAMES.items()] + [f"{n} {k}" for k, n in kinds.items()]
    dense = Counter("not pruned" if r["why"] == "dense" else r["why"] for r in records if r["deploy"] == "dense")
    text = f"{len(records) - sum(dense.values())} of {len(records)} convolutions on kernels: {', '.join(parts)}, " \
           f"{sum(dense.values())} kept dense"
    return text + (f" ({', '.join(f'{n} {why}' for why, n in dense.most_common())})" if dense else "")


def time_models(models: dict[str, nn.Module], input_shape: tuple, batch_sizes: list[int], repeats: int = 9) -> dict:
    """{batch: {name: median ms}}, the models timed interleaved at each batch size."""
    out = {}
    for b in batch_sizes:
        x = torch.randn(b, *input_shape)
        out[b] = kernels.median_ms({n: (lambda m=m: m(x)) for n, m in models.items()}, repeats=repeats)
    return out
