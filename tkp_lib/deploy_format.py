"""deploy.pt: a deployed model as plain values, and the model rebuilt from them.

deploy.pt opens with `torch.load(path, weights_only=True)` and rebuilds the network without
the training scripts. A pickled nn.Module or fx.GraphModule is code; a TorchScript or .pt2
archive is not torch.load-able. So deploy.pt holds the folded model's torch.fx graph as a
list of steps in plain values, beside the modules' tensors:

    {"format": "tkp-deploy-2",
     "graph":   [{"op": "input"},                                        # the model's input
                 {"op": "call_module", "target": "features.0", "args": [{"ref": 0}], "kwargs": {}},
                 {"op": "call_function", "target": "operator.add", "args": [...], "kwargs": {}},
                 {"op": "call_method", "target": "permute", ...}, {"op": "get_attr", "target": "gamma"},
                 {"op": "output", "args": [{"ref": 5}]}],
     "modules": {path: {"type": "Conv2d" | "TopKConv2d" | ..., "config": {...}, "state": {name: tensor}}},
     "attrs":   {path: tensor},                                   # tensors the graph reads
     "input_shape": [C, H, W], "layers": [per-layer decisions], "meta": {...}}

An argument refers to an earlier step by index ({"ref": i}); constants are None, bools,
numbers, the strings of deploy_ops.STRINGS, lists and tuples of those, slices, Ellipsis and
the dtypes of deploy_ops.DTYPES. Nothing read from the file becomes code: functions, methods
and module types are keys of deploy_ops' fixed tables; the rebuilt torch.fx graph gets its
node names from torch.fx, not from the file; module and attribute paths must be identifiers
(or numbers) joined by dots, neither dunder nor a name nn.Module or GraphModule uses, and
must exist in the model rebuilt from the file's modules and tensors. Anything else is
refused with a DeployError naming the file and what was refused. tkp-deploy-1 files (whose
node names torch.fx wrote into code) are refused: re-run tkp_deploy.py on the final.pt.
May import: tkp_lib.runtime, tkp_lib.kernels, tkp_lib.deploy_ops.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import operator
import os
import re
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn

from tkp_lib import deploy_ops
from tkp_lib.deploy_ops import DTYPES, FUNCTIONS, KERNEL_LAYERS, METHODS, NN_MODULES, STRINGS
from tkp_lib.kernels import one_line
from tkp_lib.runtime import TKPError, plain

FORMAT = "tkp-deploy-2"
OLD_FORMATS = ("tkp-deploy-1",)
MAX_DEPTH = 8        # nesting of an argument (lists in tuples in ...)
MAX_ITEMS = 4096     # items of one list or tuple argument
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_RESERVED = set(dir(torch.fx.GraphModule)) | set(vars(nn.Module()))
_STEP_KEYS = {"input": {"op", "default"}, "output": {"op", "args"}, "get_attr": {"op", "target"},
              "call_module": {"op", "target", "args", "kwargs"}, "call_function": {"op", "target", "args", "kwargs"},
              "call_method": {"op", "target", "args", "kwargs"}}
_SPEC_KEYS = {"format", "graph", "modules", "attrs", "input_shape", "layers", "meta"}


class DeployError(TKPError):
    """A deployment, or a deploy.pt, that cannot go on; the message says why in one line."""


# ==== Writing: a GraphModule as plain values ================================================


def to_spec(gm: torch.fx.GraphModule, tensors: bool = True) -> dict:
    """The plain-values description of a GraphModule (graph steps, modules, attributes).
    Refuses, naming the model's module it comes from, any operation outside deploy_ops'
    tables; with `tensors=False` it only checks (tkp_lib.deploy_layers.fold_batchnorm calls
    it so, before any timing)."""
    steps, index, modules, reads = [], {}, {}, []
    for n in gm.graph.nodes:
        index[n] = len(steps)
        if n.op == "placeholder":
            step = {"op": "input", **({"default": _encode(n.args[0], index, n)} if n.args else {})}
        elif n.op == "output":
            step = {"op": "output", "args": [_encode(n.args[0], index, n)]}
        elif n.op == "get_attr":
            reads.append(_checked_path(n))
            step = {"op": "get_attr", "target": n.target}
        else:
            step = _call_step(gm, n, index, modules, tensors)
        steps.append(step)
    attrs = {}
    for n in reads:
        owner = next((p for p in modules if n.target.startswith(p + ".")), None)
        value = _get_attr(gm, n.target)
        if not isinstance(value, torch.Tensor):
            raise DeployError(f"deploy.pt cannot hold the attribute {n.target} ({type(value).__name__}) {_where(n)}")
        if owner is None or n.target[len(owner) + 1:] not in modules[owner].get("state_names", ()):
            attrs[n.target] = value.detach().clone() if tensors else None
    for spec in modules.values():
        spec.pop("state_names")
    return {"graph": steps, "modules": modules, "attrs": attrs}


def _call_step(gm, n: torch.fx.Node, index: dict, modules: dict, tensors: bool) -> dict:
    target = n.target
    if n.op == "call_module":
        _checked_path(n)
        if target not in modules:
            modules[target] = _module_spec(gm.get_submodule(target), n, tensors)
    elif n.op == "call_function":
        if target is builtins.getattr and len(n.args) == 2 and n.args[1] in deploy_ops.ATTRIBUTES:
            return {"op": "call_method", "target": deploy_ops.ATTRIBUTES[n.args[1]],
                    "args": [_encode(n.args[0], index, n)], "kwargs": {}}
        target = deploy_ops.function_name(n.target)
        if target is None:
            what = f"{getattr(n.target, '__module__', None) or ''}.{getattr(n.target, '__name__', n.target)}"
            if n.target is builtins.getattr:
                what = f"getattr(..., {n.args[1]!r})" if len(n.args) > 1 else "getattr"
            raise DeployError(f"deploy.pt cannot hold the function {what.lstrip('.')} {_where(n)}: {_HINT}")
    elif n.op == "call_method" and target not in METHODS:
        raise DeployError(f"deploy.pt cannot hold the method .{target}() {_where(n)}: {_HINT}")
    bad = [k for k in n.kwargs if not _is_keyword(k)]
    if bad:
        raise DeployError(f"deploy.pt cannot hold the keyword arguments {bad} of {n.op} {target} {_where(n)}")
    return {"op": n.op, "target": target, "args": list(_encode(tuple(n.args), index, n)),
            "kwargs": {k: _encode(v, index, n) for k, v in n.kwargs.items()}}


_HINT = ("rewrite it with the modules, functions and methods tkp_lib/deploy_ops.py lists, add it there, or open "
         "an issue")


def _checked_path(n: torch.fx.Node) -> torch.fx.Node:
    """`n`, if its target is a path `load` will take (see _path), else why not, naming it."""
    try:
        _path(n.target)
    except DeployError as e:
        raise DeployError(f"deploy.pt cannot hold the {n.op} {_where(n)}: {e}; rename that attribute") from None
    return n


def _where(n: torch.fx.Node) -> str:
    path, kind = n.meta.get("tkp_scope", ("", None))
    return f"(in the model's {path} ({kind}))" if path else f"(in the forward of {kind or 'the model'})"


def _module_spec(m: nn.Module, n: torch.fx.Node, tensors: bool) -> dict:
    kind = deploy_ops.module_type(m)
    if kind is None:
        raise DeployError(f"deploy.pt cannot hold the module {n.target} ({type(m).__name__}): {_HINT}")
    state = {k: v.detach().clone() if tensors else None for k, v in m.state_dict().items()}
    return {"type": kind, "config": _config(m, kind), "state": state, "state_names": set(state)}


def _config(m: nn.Module, kind: str) -> dict:
    """The constructor arguments of a held module, as plain values."""
    if kind in KERNEL_LAYERS:
        return plain(m.config())
    return plain({a: m.bias is not None if a == "bias" else getattr(m, a) for a in NN_MODULES[kind][1]})


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _encode(a, index: dict, n: torch.fx.Node):
    """A node argument as plain values: earlier nodes by index; slices, Ellipsis, dtypes tagged."""
    if isinstance(a, torch.fx.Node):
        return {"ref": index[a]}
    if isinstance(a, tuple):
        return tuple(_encode(v, index, n) for v in a)
    if isinstance(a, list):
        return [_encode(v, index, n) for v in a]
    if isinstance(a, dict) and all(isinstance(k, str) and _is_keyword(k) for k in a):
        return {"dict": {str(k): _encode(v, index, n) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"slice": [_encode(a.start, index, n), _encode(a.stop, index, n), _encode(a.step, index, n)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.dtype) and str(a).removeprefix("torch.") in DTYPES:
        return {"dtype": str(a).removeprefix("torch.")}
    for kind in (bool, int, float):  # subclasses (an IntEnum, numpy's float64) as the plain value
        if isinstance(a, kind):
            return kind(a)
    if a is None or (isinstance(a, str) and a in STRINGS):
        return None if a is None else str(a)
    raise DeployError(f"deploy.pt cannot hold the argument {a!r} ({type(a).__name__}) of {n.op} {n.target} "
                      f"{_where(n)}: {_HINT}")


def save(gm: torch.fx.GraphModule, path: str | Path, *, input_shape: tuple, layers: list[dict], meta: dict) -> None:
    """Write deploy.pt (through a temporary file and a rename)."""
    spec = {"format": FORMAT, **to_spec(gm), "input_shape": list(input_shape), "layers": layers, "meta": meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(spec, tmp)
    os.replace(tmp, path)


# ==== Reading: the model rebuilt from plain values, everything checked ======================


def load(path: str | Path) -> torch.fx.GraphModule:
    """The deployed model of a deploy.pt: an eval-mode nn.Module taking NCHW float32 CPU
    input. Opens the file with torch.load(weights_only=True), rebuilds the graph from
    deploy_ops' tables only (see the module docstring), runs it once on a zero input of the
    file's input shape; imports no training script. Any problem is one DeployError line
    naming the file. The Top-K layers use the kernel (building it on first use) or, where it
    cannot be built, dense convolutions (one printed line says why)."""
    try:
        spec = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DeployError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - whatever the unpickler refused, said in one line
        raise DeployError(f"{path}: not a deploy.pt: torch.load(weights_only=True) refused it "
                          f"({_unpickling_problem(e)})") from None
    fmt = spec.get("format") if isinstance(spec, dict) else None
    if fmt in OLD_FORMATS:
        raise DeployError(f"{path}: a {fmt} file, refused: files of that format run code from the file when "
                          f"loaded; re-run `python tkp_deploy.py FINAL.pt --output {path}` on the final.pt to "
                          f"write a {FORMAT} file")
    if fmt != FORMAT:
        raise DeployError(f"{path}: not a {FORMAT} file (written by tkp_deploy.py); its format is {fmt!r}")
    try:
        gm = from_spec(spec)
        shape = _input_shape(spec.get("input_shape"))
        with torch.no_grad():
            gm(torch.zeros(1, *shape))
    except DeployError as e:
        raise DeployError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a module, state or graph the file describes that torch rejects
        raise DeployError(f"{path}: the model it describes cannot be rebuilt: {one_line(e)}") from None
    return gm


def _unpickling_problem(e: Exception) -> str:
    """The line of a torch.load error that says what it refused (not its advice to load
    the file with weights_only=False)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported" in ln:
            return ln.split(". Please")[0][:300]
    return (f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)[:300]


def _input_shape(shape) -> list[int]:
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 4 \
            or not all(type(v) is int and 1 <= v <= 4096 for v in shape):
        raise DeployError(f"input_shape refused: {_short(shape)} (1 to 4 sizes of 1 to 4096)")
    return list(shape)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def from_spec(spec: dict) -> torch.fx.GraphModule:
    """The GraphModule that `to_spec` described; refuses anything outside deploy_ops' tables."""
    if set(spec) - _SPEC_KEYS:
        raise DeployError(f"unexpected entries {sorted(map(str, set(spec) - _SPEC_KEYS))}")
    root, held = _build_root(spec.get("modules"), spec.get("attrs", {}))
    steps = spec.get("graph")
    if not isinstance(steps, list) or not steps:
        raise DeployError("its graph is not a list of steps")
    graph, nodes = torch.fx.Graph(), []
    for i, step in enumerate(steps):
        try:
            nodes.append(_add_step(graph, step, nodes, root, held))
        except DeployError as e:
            raise DeployError(f"graph step {i}: {e}") from None
    if not nodes or nodes[-1].op != "output":
        raise DeployError("its graph does not end in an output step")
    graph.lint()
    return torch.fx.GraphModule(root, graph).eval()


def _add_step(graph: torch.fx.Graph, step, nodes: list, root: nn.Module, held: set) -> torch.fx.Node:
    op = step.get("op") if isinstance(step, dict) else None
    if not isinstance(op, str) or op not in _STEP_KEYS:
        raise DeployError(f"unknown step {_short(op if isinstance(step, dict) else step)}")
    if set(step) - _STEP_KEYS[op]:
        raise DeployError(f"{op} step with unexpected fields {sorted(map(str, set(step) - _STEP_KEYS[op]))}")
    if nodes and nodes[-1].op == "output":
        raise DeployError("a step after the output")
    if op == "input":
        if any(n.op != "placeholder" for n in nodes):
            raise DeployError("an input after other steps")
        default = _decode(step["default"], [], 0) if "default" in step else inspect.Signature.empty
        return graph.placeholder(f"x{len(nodes)}" if nodes else "x", default_value=default)
    if op == "output":
        args = step.get("args")
        if not isinstance(args, list) or len(args) != 1:
            raise DeployError(f"output with args {_short(args)}")
        return graph.output(_decode(args[0], nodes, 0))
    target = step.get("target")
    if op == "get_attr":
        if not isinstance(_resolve(root, _path(target)), torch.Tensor):
            raise DeployError(f"get_attr of {_short(target)}: no tensor of the rebuilt model")
        return graph.get_attr(target)
    return _add_call(graph, op, target, step, nodes, held)


def _add_call(graph: torch.fx.Graph, op: str, target, step: dict, nodes: list, held: set) -> torch.fx.Node:
    """A call_module, call_method or call_function step: its target checked first, then its arguments."""
    if op == "call_module" and _path(target) not in held:
        raise DeployError(f"call_module of {_short(target)}: not a module deploy.pt holds")
    if op == "call_method" and (not isinstance(target, str) or target not in METHODS):
        raise DeployError(f"method {_short(target)} is not one deploy.pt may call (tkp_lib/deploy_ops.py METHODS)")
    fn = FUNCTIONS.get(target) if isinstance(target, str) else None
    if op == "call_function" and fn is None:
        raise DeployError(f"function {_short(target)} is not one deploy.pt may call (tkp_lib/deploy_ops.py "
                          f"FUNCTIONS)")
    args, kwargs = step.get("args", []), step.get("kwargs", {})
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise DeployError(f"{op} with args {_short(args)} and kwargs {_short(kwargs)}")
    args, kwargs = _decode(tuple(args), nodes, 0), {_keyword(k): _decode(v, nodes, 0) for k, v in kwargs.items()}
    if op == "call_module":
        return graph.call_module(target, args, kwargs)
    if op == "call_method":
        if not args or not isinstance(args[0], torch.fx.Node):
            raise DeployError(f"method {target} called on a constant")
        return graph.call_method(target, args, kwargs)
    if fn is operator.getitem and (len(args) != 2 or _holds_node(args[1])):
        raise DeployError("getitem with an index that is not a constant")
    return graph.call_function(fn, args, kwargs)


def _refuse(what: str, value):
    raise DeployError(f"{what} refused: {_short(value)}")


def _holds_node(a) -> bool:
    if isinstance(a, torch.fx.Node):
        return True
    if isinstance(a, (list, tuple)):
        return any(_holds_node(v) for v in a)
    if isinstance(a, slice):
        return any(_holds_node(v) for v in (a.start, a.stop, a.step))
    return isinstance(a, dict) and any(_holds_node(v) for v in a.values())


def _is_keyword(k) -> bool:
    return isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k) and not k.startswith("__")


def _keyword(k) -> str:
    if not _is_keyword(k):
        raise DeployError(f"keyword argument name {_short(k)} refused")
    return k


def _decode(a, nodes: list, depth: int):
    """A plain-values argument back as what torch.fx takes: refs to earlier nodes, constants."""
    if depth > MAX_DEPTH:
        raise DeployError(f"an argument nested deeper than {MAX_DEPTH}")
    if a is None or type(a) in (bool, int, float):
        return a
    if type(a) is str:
        return a if a in STRINGS else _refuse("the string constant", a)
    if type(a) in (list, tuple):
        if len(a) > MAX_ITEMS:
            raise DeployError(f"an argument of more than {MAX_ITEMS} items")
        return type(a)(_decode(v, nodes, depth + 1) for v in a)
    if type(a) is not dict or len(a) != 1:
        return _refuse("the argument", a)
    (tag, v), = a.items()
    if tag == "ref":
        if type(v) is not int or not 0 <= v < len(nodes) or nodes[v].op == "output":
            raise DeployError(f"a reference to {_short(v)}, not an earlier step")
        return nodes[v]
    if tag == "slice" and type(v) in (list, tuple) and len(v) == 3:
        parts = [_decode(x, nodes, depth + 1) for x in v]
        if not all(p is None or type(p) is int or isinstance(p, torch.fx.Node) for p in parts):
            raise DeployError(f"slice {_short(v)} refused")
        return slice(*parts)
    if tag == "ellipsis" and v is True:
        return Ellipsis
    if tag == "dtype" and isinstance(v, str) and v in DTYPES:
        return DTYPES[v]
    if tag == "dict" and type(v) is dict:
        return {_keyword(k): _decode(x, nodes, depth + 1) for k, x in v.items()}
    return _refuse("the argument", a)


def _path(target) -> tuple[str, ...]:
    """A module or attribute path as its segments: identifiers or numbers, neither dunder
    nor a name nn.Module or GraphModule uses (they become attribute names of the model)."""
    parts = tuple(target.split(".")) if isinstance(target, str) and len(target) <= 300 else ()
    if not parts or not all(_SEGMENT.fullmatch(p) and not p.startswith("__") and p not in _RESERVED for p in parts):
        raise DeployError(f"path {_short(target)} refused (identifiers or numbers joined by dots, neither dunder "
                          f"nor a name nn.Module or GraphModule uses)")
    return parts


def _resolve(root: nn.Module, parts: tuple[str, ...]):
    """The module, parameter or buffer at `parts` under `root`, by dictionary lookups (no getattr)."""
    obj = root
    for i, p in enumerate(parts):
        if p in obj._modules:
            obj = obj._modules[p]
        elif i == len(parts) - 1 and p in obj._parameters:
            return obj._parameters[p]
        elif i == len(parts) - 1 and p in obj._buffers:
            return obj._buffers[p]
        else:
            return None
    return obj


def _build_root(modules, attrs) -> tuple[nn.Module, set]:
    """The module tree the graph runs on: the held modules and attribute tensors at their
    paths, in plain nn.Module containers; and the paths of the held modules."""
    if not isinstance(modules, dict) or not isinstance(attrs, dict):
        raise DeployError("its modules and attrs are not dictionaries")
    root, containers, held = nn.Module(), set(), set()

    def parent(parts):
        obj = root
        for p in parts[:-1]:
            if p not in obj._modules:
                obj.add_module(p, nn.Module())
                containers.add(id(obj._modules[p]))
            obj = obj._modules[p]
            if id(obj) not in containers:
                raise DeployError(f"the path {'.'.join(parts)} lies inside the held module {p}")
        if parts[-1] in obj._modules or parts[-1] in obj._buffers:
            raise DeployError(f"the path {'.'.join(parts)} is given twice")
        return obj

    for name, spec in modules.items():
        parts = _path(name)
        module = _module_from_spec(name, spec)
        parent(parts).add_module(parts[-1], module)
        held.add(parts)
    for name, value in attrs.items():
        parts = _path(name)
        parent(parts).register_buffer(parts[-1], _tensor(value, f"attribute {name}"))
    return root, held


def _tensor(v, what: str) -> torch.Tensor:
    """`v` if it is a plain dense CPU tensor of one of deploy_ops.DTYPES."""
    if type(v) not in (torch.Tensor, nn.Parameter) or v.layout != torch.strided or v.is_quantized \
            or v.device.type != "cpu" or v.dtype not in DTYPES.values():
        raise DeployError(f"{what}: {type(v).__name__} refused (dense CPU tensors of {', '.join(DTYPES)} only)")
    return v.detach()


def _module_from_spec(name: str, spec) -> nn.Module:
    if not isinstance(spec, dict) or set(spec) != {"type", "config", "state"} \
            or not isinstance(spec["config"], dict) or not isinstance(spec["state"], dict):
        raise DeployError(f"module {_short(name)}: not a {{type, config, state}} entry")
    kind, config = spec["type"], spec["config"]
    if not isinstance(kind, str) or (kind not in KERNEL_LAYERS and kind not in NN_MODULES):
        raise DeployError(f"module {name}: type {_short(kind)} is not one deploy.pt may hold "
                          f"(tkp_lib/deploy_ops.py: KERNEL_LAYERS, NN_MODULES)")
    cls = KERNEL_LAYERS[kind] if kind in KERNEL_LAYERS else NN_MODULES[kind][0]
    known = set(inspect.signature(cls).parameters) if kind in KERNEL_LAYERS else set(NN_MODULES[kind][1])
    unexpected = sorted(map(str, set(config) - known))
    if unexpected:
        raise DeployError(f"module {name} ({kind}): unexpected arguments {unexpected}")
    defaults = {k: v.default for k, v in inspect.signature(cls).parameters.items()}
    for k, v in config.items():
        if not _plain_config(v) or (type(v) is bool) != (type(defaults.get(k)) is bool):  # flags are bools, only
            raise DeployError(f"module {name} ({kind}): argument {k}={_short(v)} refused")
    if kind in KERNEL_LAYERS:
        _check_kernel_config(config, name, kind)
    try:
        m = cls(**config)
    except Exception as e:  # noqa: BLE001 - a config its constructor rejects
        raise DeployError(f"module {name} ({kind}): its arguments are refused ({one_line(e)})") from None
    back = {k: v for k, v in _config(m, kind).items() if k in config}
    if _typed(back) != _typed(plain(config)):
        wrong = sorted(k for k in config if _typed(back.get(k)) != _typed(plain(config[k])))
        raise DeployError(f"module {name} ({kind}): arguments {wrong} of the wrong type or value")
    state = {k: _tensor(v, f"module {name} ({kind}) state {_short(k)}") for k, v in spec["state"].items()}
    try:
        m.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing, unexpected or misshapen tensors: torch's message, on one line
        raise DeployError(f"module {name} ({kind}): its state does not fit ({' '.join(str(e).split())[:300]})") \
            from None
    if kind in KERNEL_LAYERS:
        _check_taps(m, name)
    return m.eval()


def _plain_config(v, depth: int = 0) -> bool:
    if v is None or type(v) in (bool, int, float):
        return True
    if type(v) is str:
        return v in STRINGS
    return type(v) in (list, tuple) and depth < 2 and len(v) <= 8 and all(_plain_config(x, depth + 1) for x in v)


def _typed(v):
    """`v` with every scalar paired with its type (True and 1 differ), lists and tuples alike."""
    if isinstance(v, (list, tuple)):
        return ("seq", tuple(_typed(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _typed(x)) for k, x in v.items())))
    return (type(v).__name__, v)


_AT_LEAST_ONE = ("kernel_size", "stride", "group", "tile")  # kernel-layer arguments the C++ kernels divide by


def _check_kernel_config(config: dict, name: str, kind: str) -> None:
    """A kernel layer's sizes are non-negative, its kernel, stride, group and tile positive
    (but the Top-K kernel's aligned tiles, M = 0, and its columns flag): the C++ kernels index and
    divide with them."""
    for k, v in config.items():
        values = v if isinstance(v, (list, tuple)) else [v]
        low = [1 if k in _AT_LEAST_ONE else 0] * len(values)
        if kind == "TopKConv2d" and k == "tile" and low:
            low[0] = 0  # (0, S): the Top-K kernel's aligned tiles, one output channel at a time
            low[2:] = [0] * len(low[2:])  # (M, S, columns): columns 0 or 1
        if any(type(x) is int and x < lo for x, lo in zip(values, low)):
            raise DeployError(f"module {name} ({kind}): argument {k}={_short(v)} refused (below {min(low)})")
        if k == "tile" and any(type(x) is not int for x in values):  # 1.0 and True equal 1 in tile_kinds()
            raise DeployError(f"module {name} ({kind}): argument tile={_short(v)} refused (integers only)")
        if kind == "TopKConv2d" and k == "tile" and len(values) > 2 and values[2] > 1:
            raise DeployError(f"module {name} ({kind}): argument tile={_short(v)} refused (columns 0 or 1)")


def _check_taps(m: nn.Module, name: str) -> None:
    """A kernel layer's tap indices must lie inside its kernel: the C++ kernels read the
    input at them."""
    kh, kw = getattr(m, "kernel_size", (0, 0))
    for buf_name, buf in m.named_buffers():
        if buf_name.rpartition(".")[2] == "taps" and buf.numel() and not buf.dtype.is_floating_point:
            low, high = int(buf.min()), int(buf.max())
            if low < 0 or high >= kh * kw:
                raise DeployError(f"module {name}: tap indices {low}..{high} outside its {kh}x{kw} kernel")
