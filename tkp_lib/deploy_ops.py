"""What a deploy.pt may name: the fixed tables of modules, functions, methods and constants.

A deploy.pt names the operations of its graph by the keys of these tables; a key is looked
up here and nowhere else (never imported, never resolved with getattr), so these tables are
all the code a file can reach. Deployment traces a model with the module types below as
leaves and every other module traced through into the functions and methods below
(tkp_lib.deploy_layers.trace); what falls outside them is refused right after tracing.

To let deploy.pt hold a new kernel layer, add it to KERNEL_LAYERS (one line, plus its
import). A kernel layer is rebuilt as `cls(**config)` from its `config()` (plain values),
then `load_state_dict`; its integer buffers named `taps` are checked to lie inside
`kernel_size` when a deploy.pt is loaded.
May import: tkp_lib.topk_conv, tkp_lib.tapgroup, tkp_lib.depthwise.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from tkp_lib.depthwise import DepthwiseTopKConv2d
from tkp_lib.tapgroup import TapGroupConv2d
from tkp_lib.topk_conv import TopKConv2d

# the layers that compute only the kept taps: {type name: class}
KERNEL_LAYERS: dict[str, type[nn.Module]] = {
    "TopKConv2d": TopKConv2d,
    "TapGroupConv2d": TapGroupConv2d,
    "DepthwiseTopKConv2d": DepthwiseTopKConv2d,
}

# torch.nn modules deploy.pt holds as modules, with the constructor arguments read back from them
_NN = {
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
                "padding_mode"),
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine", "bias"),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.SiLU: ("inplace",), nn.Hardswish: ("inplace",),
    nn.Hardsigmoid: ("inplace",), nn.Mish: ("inplace",), nn.GELU: ("approximate",), nn.ELU: ("alpha", "inplace"),
    nn.LeakyReLU: ("negative_slope", "inplace"), nn.Sigmoid: (), nn.Tanh: (), nn.Softmax: ("dim",),
    nn.LogSoftmax: ("dim",),
    nn.Identity: (), nn.Dropout: ("p", "inplace"), nn.Dropout1d: ("p", "inplace"), nn.Dropout2d: ("p", "inplace"),
    nn.AlphaDropout: ("p", "inplace"), nn.Flatten: ("start_dim", "end_dim"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool2d: ("output_size",), nn.AdaptiveMaxPool2d: ("output_size", "return_indices"),
}
NN_MODULES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {c.__name__: (c, a) for c, a in _NN.items()}

# functions a graph may call: {stable name: callable}. The names are keys, not import paths.
FUNCTIONS = {
    **{f"operator.{f.__name__}": f for f in (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.neg,
        operator.matmul, operator.getitem, operator.iadd, operator.isub, operator.imul, operator.itruediv)},
    **{f"torch.{f.__name__}": f for f in (
        torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.cat, torch.stack, torch.flatten,
        torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
        torch.mean, torch.sum, torch.amax, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.sqrt,
        torch.rsqrt, torch.pow, torch.exp, torch.erf, torch.abs, torch.neg, torch.clamp, torch.softmax)},
    **{f"F.{f.__name__}": f for f in (
        F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.leaky_relu,
        F.elu, F.mish, F.prelu, F.softplus, F.softmax, F.log_softmax, F.layer_norm, F.group_norm, F.batch_norm,
        F.linear, F.conv2d, F.conv_transpose2d, F.pad, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d,
        F.max_pool2d, F.dropout, F.interpolate, F.normalize)},
}
_FUNCTION_NAMES = {id(f): name for name, f in reversed(FUNCTIONS.items())}

# tensor methods a graph may call (on the result of an earlier step, never on a constant)
METHODS = frozenset((
    "size", "dim", "numel", "view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose",
    "contiguous", "unsqueeze", "squeeze", "expand", "expand_as", "chunk", "split", "mean", "sum", "amax", "add",
    "add_", "sub", "mul", "mul_", "div", "pow", "sqrt", "rsqrt", "exp", "neg", "abs", "relu", "relu_", "sigmoid",
    "tanh", "softmax", "clamp", "clamp_min", "float", "type_as", "matmul"))

# `getattr(x, name)` in a traced graph, recorded as the method that returns the same value
ATTRIBUTES = {"shape": "size", "ndim": "dim"}

# the only strings a constant may be (the modes of gelu, pad, interpolate, conv padding, div)
STRINGS = frozenset(("none", "tanh", "constant", "reflect", "replicate", "circular", "zeros", "same", "valid",
                     "nearest", "bilinear", "bicubic", "area", "floor", "trunc"))

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8,
    torch.bool)}


def module_type(m: nn.Module) -> str | None:
    """The name under which deploy.pt holds `m` (its exact type registered here), or None."""
    name = type(m).__name__
    if KERNEL_LAYERS.get(name) is type(m) or (name in NN_MODULES and NN_MODULES[name][0] is type(m)):
        return name
    return None


def function_name(fn) -> str | None:
    """The key of `fn` in FUNCTIONS, or None."""
    return _FUNCTION_NAMES.get(id(fn)) if FUNCTIONS.get(_FUNCTION_NAMES.get(id(fn), "")) is fn else None
