"""deploy.pt: a deployed model as plain values, and the model rebuilt from them.

deploy.pt must open with `torch.load(path, weights_only=True)` (no code runs when it is
read) and rebuild the network without the training scripts. A pickled nn.Module or
fx.GraphModule is code; a TorchScript or .pt2 archive is not torch.load-able. So deploy.pt
holds the folded model's torch.fx graph written out as plain values, beside the modules'
tensors:

    {"format": "tkp-deploy-1",
     "graph":   [{"name", "op", "target", "args", "kwargs"}, ...],   # torch.fx nodes, in order
     "modules": {qualified name: {"type": "Conv2d" | "TopKConv2d" | ..., "config": {...},
                                  "state": {name: tensor}}},
     "attrs":   {qualified name: tensor},                          # get_attr constants
     "input_shape": [C, H, W], "layers": [per-layer decisions], "meta": {...}}

Node arguments refer to earlier nodes by name; functions are stored by name and resolved at
load time only from torch, torch.nn.functional, operator and math (public names), methods
only by public name, modules only from a fixed list of torch.nn types plus the kernel layers.
May import: tkp_lib.runtime, tkp_lib.topk_conv, tkp_lib.tapgroup, tkp_lib.depthwise.
"""

from __future__ import annotations

import builtins
import math
import operator
import os
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from tkp_lib import topk_conv
from tkp_lib.depthwise import DepthwiseTopKConv2d
from tkp_lib.runtime import TKPError, plain
from tkp_lib.tapgroup import TapGroupConv2d
from tkp_lib.topk_conv import TopKConv2d

FORMAT = "tkp-deploy-1"


class DeployError(TKPError):
    """A deployment, or a deploy.pt, that cannot go on; the message says why in one line."""


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
    if isinstance(m, (TopKConv2d, TapGroupConv2d, DepthwiseTopKConv2d)):
        config = m.config()
    elif kind in _MODULE_CONFIG and type(m) is getattr(nn, kind):
        config = {a: m.bias is not None if a == "bias" else plain(getattr(m, a)) for a in _MODULE_CONFIG[kind]}
    else:
        raise DeployError(f"deploy.pt cannot hold a {kind} module (known: TopKConv2d, {', '.join(_MODULE_CONFIG)})")
    return {"type": kind, "config": config, "state": {k: v.detach().clone() for k, v in m.state_dict().items()}}


def _module_from_spec(spec: dict) -> nn.Module:
    kind, config = spec["type"], dict(spec["config"])
    if kind == "TopKConv2d":
        m = TopKConv2d(**config)
    elif kind == "TapGroupConv2d":
        m = TapGroupConv2d(**config)
    elif kind == "DepthwiseTopKConv2d":
        m = DepthwiseTopKConv2d(**config)
    elif kind in _MODULE_CONFIG:
        if set(config) - set(_MODULE_CONFIG[kind]):
            unexpected = sorted(set(config) - set(_MODULE_CONFIG[kind]))
            raise DeployError(f"deploy.pt: unexpected {kind} arguments {unexpected}")
        m = getattr(nn, kind)(**config)
    else:
        raise DeployError(f"deploy.pt holds an unknown module type {kind!r}")
    m.load_state_dict(spec["state"], strict=True)
    return m


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
        topk_conv.kernel_available()
    return gm
