"""deploy.pt is data: crafted files that try to run code, reach attributes or name what the
tables do not hold are refused by tkp_deploy.load in one line naming the file, and nothing
they carry runs; a legitimate file still loads and matches."""

import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tkp_deploy as D
from tkp_lib import deploy_format, deploy_layers, deploy_ops


class Small(nn.Module):
    """Conv-BN-ReLU (a Top-K layer), a depthwise conv scaled by a layer-scale gamma and
    added back, mean pooling, Linear-GELU-Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.fc = nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 4))

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = y + self.gamma[:, None, None] * self.dw(y)
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def legit(tmp_path_factory):
    """(path of a deploy.pt written by deploy_format.save, its spec, the model, an input)."""
    torch.manual_seed(0)
    model = Small().eval()
    with torch.no_grad():  # Top-1 kernels, as after training
        w = model.conv.weight.flatten(2)
        model.conv.weight.copy_((w * (w.abs() >= w.abs().amax(-1, keepdim=True))).view_as(model.conv.weight))
        model.bn.running_var.uniform_(0.5, 2.0)
    gm = deploy_layers.fold_batchnorm(model)
    gm = deploy_layers.apply_layers(gm, [{"name": "conv", "deploy": "topk", "tile": [4, 4]}], (3, 8, 8))
    path = tmp_path_factory.mktemp("legit") / "deploy.pt"
    deploy_format.save(gm, path, input_shape=(3, 8, 8), layers=[], meta={"note": "legit"})
    return path, torch.load(path, weights_only=True), model, torch.randn(2, 3, 8, 8)


def step_index(spec, op, target=None):
    return next(i for i, s in enumerate(spec["graph"]) if s["op"] == op and target in (None, s.get("target")))


def refused(tmp_path, spec, match: str):
    """Write `spec`, load it: one DeployError line naming the file and containing `match`;
    no file appears beside it (the payloads below would touch `PWNED`)."""
    path = tmp_path / "crafted.pt"
    torch.save(spec, path)
    before = set(tmp_path.iterdir())
    with pytest.raises(D.DeployError) as info:
        D.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert match in message, message
    assert set(tmp_path.iterdir()) == before, "loading created a file"
    return message


def payload(tmp_path) -> str:
    return f"__import__('pathlib').Path({str(tmp_path / 'PWNED')!r}).touch()"


# ---- a legitimate file ----------------------------------------------------------------------------

def test_a_legitimate_file_loads_and_matches(legit):
    path, spec, model, x = legit
    assert spec["format"] == "tkp-deploy-2" and deploy_format.FORMAT == "tkp-deploy-2"
    assert {m["type"] for m in spec["modules"].values()} == {"TopKConv2d", "Conv2d", "Linear", "GELU"}
    assert list(spec["attrs"]) == ["gamma"] and all("name" not in s for s in spec["graph"])
    gm = D.load(path)
    assert not gm.training
    with torch.no_grad():
        y, ref = gm(x), model(x)
    assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert [n.name for n in gm.graph.nodes][0] == "x"  # node names are torch.fx's, not the file's


# ---- code in names, old files ---------------------------------------------------------------------

def test_old_format_files_are_refused_before_anything_is_read(legit, tmp_path):
    _, spec, _, _ = legit
    evil = [{"name": "x", "op": "placeholder", "target": f"pw={payload(tmp_path)}", "args": (), "kwargs": {}},
            {"name": "output", "op": "output", "target": "output", "args": ({"node": "x"},), "kwargs": {}}]
    message = refused(tmp_path, {**spec, "format": "tkp-deploy-1", "graph": evil}, "tkp-deploy-1")
    assert "re-run" in message and "tkp_deploy.py" in message
    refused(tmp_path, {**spec, "format": "tkp-deploy-9"}, "not a tkp-deploy-2 file")
    refused(tmp_path, [1, 2, 3], "not a tkp-deploy-2 file")


def test_names_with_code_are_refused(legit, tmp_path):
    _, spec, _, _ = legit
    graph = spec["graph"]
    for bad in ({"op": "input", "target": f"pw={payload(tmp_path)}"}, {"op": "input", "name": payload(tmp_path)},
                {"op": "input", "name": "x\nimport os\n'\""}):
        refused(tmp_path, {**spec, "graph": [bad, *graph[1:]]}, "unexpected fields")
    i = step_index(spec, "call_module", "dw")
    for bad in (f"dw\n{payload(tmp_path)}", 'dw"); ' + payload(tmp_path) + "; (\"", "dw x", "dw.", ".dw", ""):
        g = copy.deepcopy(graph)
        g[i]["target"] = bad
        refused(tmp_path, {**spec, "graph": g}, "refused")
    g = copy.deepcopy(graph)
    g[i]["name"] = payload(tmp_path)
    refused(tmp_path, {**spec, "graph": g}, "unexpected fields ['name']")
    assert not (tmp_path / "PWNED").exists()


def test_the_getattr_chain_to_os_system_is_refused(legit, tmp_path):
    """x.__reduce_ex__.__func__.__globals__['__builtins__']['__import__']('os').system(...):
    what the old allow-list let through at forward time."""
    _, spec, _, _ = legit

    def call(target, *args):
        return {"op": "call_function", "target": target, "args": list(args), "kwargs": {}}

    chain = [{"op": "input"}, call("builtins.getattr", {"ref": 0}, "__reduce_ex__"),
             call("builtins.getattr", {"ref": 1}, "__func__"), call("builtins.getattr", {"ref": 2}, "__globals__"),
             call("operator.getitem", {"ref": 3}, "__builtins__"), call("operator.getitem", {"ref": 4}, "__import__"),
             call("operator.call", {"ref": 5}, "os"), call("builtins.getattr", {"ref": 6}, "system"),
             call("operator.call", {"ref": 7}, f"touch {tmp_path / 'PWNED'}"), {"op": "output", "args": [{"ref": 8}]}]
    refused(tmp_path, {**spec, "graph": chain}, "graph step 1: function 'builtins.getattr' is not one")
    chain[1] = call("operator.getitem", {"ref": 0}, 0)  # past the first: the strings are refused too
    refused(tmp_path, {**spec, "graph": chain}, "graph step 2:")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("target", ["builtins.eval", "builtins.exec", "os.system", "subprocess.run", "operator.call",
                                    "builtins.getattr", "getattr", "eval", "torch._C._nn.pad", "torch.load",
                                    "torch.nn.functional.__builtins__", "torch.nn.functional.relu", "F.__dict__",
                                    "operator.attrgetter", "operator.methodcaller", "torch.ops.tkp.topk_conv2d"])
def test_functions_outside_the_table_are_refused(legit, tmp_path, target):
    _, spec, _, _ = legit
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "call_function", "operator.add")]["target"] = target
    refused(tmp_path, {**spec, "graph": g}, f"function {target!r} is not one deploy.pt may call")


def test_function_targets_that_are_not_strings_and_getitem_by_value_are_refused(legit, tmp_path):
    _, spec, _, _ = legit
    i = step_index(spec, "call_function", "operator.add")
    for target in (["operator.add"], None, 3, {"ref": 0}):
        g = copy.deepcopy(spec["graph"])
        g[i]["target"] = target
        refused(tmp_path, {**spec, "graph": g}, "is not one deploy.pt may call")
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "call_function", "operator.getitem")]["args"][1] = {"ref": 1}
    refused(tmp_path, {**spec, "graph": g}, "getitem with an index that is not a constant")


@pytest.mark.parametrize("method", ["__reduce__", "__class__", "__getattribute__", "register_forward_hook",
                                    "apply", "numpy", "tolist", "__setattr__", "to", "storage", "_version"])
def test_methods_outside_the_table_are_refused(legit, tmp_path, method):
    _, spec, _, _ = legit
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "call_method", "mean")]["target"] = method
    refused(tmp_path, {**spec, "graph": g}, f"method {method!r} is not one deploy.pt may call")


def test_a_method_on_a_constant_is_refused(legit, tmp_path):
    _, spec, _, _ = legit
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "call_method", "mean")]["args"][0] = (2, 3)
    refused(tmp_path, {**spec, "graph": g}, "called on a constant")


# ---- paths: modules and attributes --------------------------------------------------------------

@pytest.mark.parametrize("path", ["missing", "conv.__class__", "__class__", "conv.weight.__class__", "training",
                                  "forward", "graph", "code", "_modules", "fc.0.__dict__", "fc.9", "gamma",
                                  "dw.weight"])
def test_call_module_paths_that_are_not_held_modules_are_refused(legit, tmp_path, path):
    _, spec, _, _ = legit
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "call_module", "dw")]["target"] = path
    refused(tmp_path, {**spec, "graph": g}, "refused" if "__" in path or path in (
        "training", "forward", "graph", "code", "_modules") else "not a module deploy.pt holds")


@pytest.mark.parametrize("path", ["missing", "gamma.__class__", "__dict__", "conv", "fc.0", "dw.weight.data",
                                  "training", "_parameters", "fc.0.weight.grad", "dw.__dict__"])
def test_get_attr_paths_that_are_not_tensors_of_the_model_are_refused(legit, tmp_path, path):
    _, spec, _, _ = legit
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "get_attr")]["target"] = path
    refused(tmp_path, {**spec, "graph": g}, "refused" if "__" in path or path in ("training", "_parameters")
            else "no tensor of the rebuilt model")


def test_get_attr_may_read_a_held_modules_own_tensors(legit, tmp_path):
    _, spec, _, _ = legit
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "get_attr")]["target"] = "dw.bias"  # a (8,) tensor, as gamma
    path = tmp_path / "ok.pt"
    torch.save({**spec, "graph": g}, path)
    gm = D.load(path)
    assert torch.equal(gm.dw.bias, spec["modules"]["dw"]["state"]["bias"])


@pytest.mark.parametrize("name", ["__class__", "a.__init__", "forward", "x y", "dw\n", "", "conv..bn", 'a"b'])
def test_module_and_attr_names_are_paths(legit, tmp_path, name):
    _, spec, _, _ = legit
    modules = {**spec["modules"], name: spec["modules"]["dw"]}
    refused(tmp_path, {**spec, "modules": modules}, "refused")
    refused(tmp_path, {**spec, "attrs": {**spec["attrs"], name: torch.zeros(3)}}, "refused")


def test_overlapping_paths_are_refused(legit, tmp_path):
    _, spec, _, _ = legit
    refused(tmp_path, {**spec, "attrs": {**spec["attrs"], "dw.weight": torch.zeros(3)}}, "inside the held module")
    refused(tmp_path, {**spec, "attrs": {**spec["attrs"], "dw": torch.zeros(3)}}, "given twice")


# ---- modules: types, configs, state ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Evil", "Module", "Sequential", "ScriptModule", "GraphModule", "LSTM",
                                  "MultiheadAttention", "torch.nn.Conv2d", "__builtins__", "deploy_ops"])
def test_module_types_outside_the_registry_are_refused(legit, tmp_path, kind):
    _, spec, _, _ = legit
    modules = copy.deepcopy(spec["modules"])
    modules["dw"]["type"] = kind
    refused(tmp_path, {**spec, "modules": modules}, f"type {kind!r} is not one deploy.pt may hold")


@pytest.mark.parametrize("module, key, value, match", [
    ("dw", "foo", 1, "unexpected arguments ['foo']"),
    ("dw", "__init__", 1, "unexpected arguments"),
    ("conv", "device", "cpu", "unexpected arguments ['device']"),
    ("dw", "in_channels", "8", "in_channels='8' refused"),
    ("dw", "in_channels", 8.0, "its arguments are refused"),
    ("dw", "groups", True, "groups=True refused"),
    ("conv", "bias", 1, "bias=1 refused"),
    ("dw", "padding", 1, "['padding'] of the wrong type or value"),
    ("dw", "kernel_size", {"ref": 0}, "refused"),
    ("dw", "kernel_size", [[[[3]]]], "refused"),
    ("dw", "padding_mode", "__import__('os')", "refused"),
    ("fc.1", "approximate", "gelu; rm -rf", "refused"),
    ("conv", "k", "1", "refused"),
    ("conv", "k", -1, "argument k=-1 refused (below 0)"),
    ("conv", "in_channels", 10 ** 12, "its arguments are refused"),
])
def test_configs_with_unexpected_keys_or_wrong_types_are_refused(legit, tmp_path, module, key, value, match):
    _, spec, _, _ = legit
    modules = copy.deepcopy(spec["modules"])
    modules[module]["config"][key] = value
    refused(tmp_path, {**spec, "modules": modules}, match)


def test_state_that_is_not_plain_tensors_is_refused(legit, tmp_path):
    _, spec, _, _ = legit
    weight = spec["modules"]["dw"]["state"]["weight"]
    for value, match in ((weight.tolist(), "list refused"), ("weight", "str refused"),
                         (weight.to_sparse(), "refused"), (weight.to(torch.complex64), "refused"),
                         (torch.zeros(3), "its state does not fit (Error(s) in loading state_dict for Conv2d: size "
                                          "mismatch for weight")):
        modules = copy.deepcopy(spec["modules"])
        modules["dw"]["state"]["weight"] = value
        refused(tmp_path, {**spec, "modules": modules}, match)
    modules = copy.deepcopy(spec["modules"])
    modules["dw"]["state"]["extra"] = weight
    refused(tmp_path, {**spec, "modules": modules}, 'Unexpected key(s) in state_dict: "extra"')
    refused(tmp_path, {**spec, "attrs": {"gamma": "0.5"}}, "attribute gamma: str refused")


class Sub(torch.Tensor):
    """A tensor subclass: torch.load(weights_only=True) refuses to build it."""


def test_a_tensor_subclass_is_refused_by_the_unpickler(legit, tmp_path):
    _, spec, _, _ = legit
    message = refused(tmp_path, {**spec, "attrs": {"gamma": torch.zeros(8).as_subclass(Sub)}},
                      "torch.load(weights_only=True) refused it")
    assert "Unsupported global" in message and "weights_only=False" not in message


def test_kernel_taps_outside_the_kernel_are_refused(legit, tmp_path):
    """The C++ kernels read the input at the tap indices: out of range would read out of bounds."""
    _, spec, _, _ = legit
    for bad in (9, 255):
        modules = copy.deepcopy(spec["modules"])
        modules["conv"]["state"]["taps"][0, 0, 0] = bad
        refused(tmp_path, {**spec, "modules": modules}, "tap indices 0..")
    assert "TapGroupConv2d" in deploy_ops.KERNEL_LAYERS
    from tkp_lib.tapgroup import TapGroupConv2d
    layer = TapGroupConv2d(3, 8, 3, padding=1, k=1, group=4)
    layer.taps.fill_(-1)
    modules = {**spec["modules"], "conv": {"type": "TapGroupConv2d", "config": layer.config(),
                                           "state": layer.state_dict()}}
    refused(tmp_path, {**spec, "modules": modules}, "tap indices -1..-1 outside its 3x3 kernel")


def test_kernel_sizes_the_kernels_divide_by_are_refused_when_not_positive(legit, tmp_path):
    _, spec, _, _ = legit
    for key, value in (("stride", [0, 0]), ("padding", [-1, 1]), ("tile", [4, 0]), ("kernel_size", [0, 3]),
                       ("tile", [4, 4, 1.0]), ("tile", [4, 4, True]), ("tile", [4.0, 4]),  # 1.0 == True == 1
                       ("tile", [4, 4, 2])):  # columns 0 or 1
        modules = copy.deepcopy(spec["modules"])
        modules["conv"]["config"][key] = value
        refused(tmp_path, {**spec, "modules": modules}, f"argument {key}=")


EXAMPLES = [nn.Conv2d(3, 4, 3, padding="same", groups=1, bias=False), nn.Conv2d(4, 4, (1, 3), 2, (0, 1), groups=2),
            nn.Linear(4, 5), nn.BatchNorm2d(4, momentum=None), nn.BatchNorm1d(4, affine=False), nn.LayerNorm(8),
            nn.LayerNorm([4, 8], eps=1e-6, elementwise_affine=False), nn.GroupNorm(2, 4), nn.ReLU(inplace=True),
            nn.ReLU6(), nn.SiLU(), nn.Hardswish(), nn.Hardsigmoid(), nn.Mish(), nn.GELU(approximate="tanh"),
            nn.ELU(0.5), nn.LeakyReLU(0.2), nn.Sigmoid(), nn.Tanh(), nn.Softmax(dim=1), nn.LogSoftmax(dim=-1),
            nn.Identity(), nn.Dropout(0.3), nn.Dropout1d(), nn.Dropout2d(), nn.AlphaDropout(0.1), nn.Flatten(2),
            nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(2, count_include_pad=False, divisor_override=3),
            nn.AdaptiveAvgPool2d((2, 1)), nn.AdaptiveMaxPool2d(1)]


def test_every_registered_module_round_trips():
    from tkp_lib.depthwise import DepthwiseTopKConv2d
    from tkp_lib.tapgroup import TapGroupConv2d
    from tkp_lib.topk_conv import TopKConv2d
    kernels = [TopKConv2d(3, 8, (3, 5), 2, (1, 2), k=2, bias=False, relu=True, pool=2),
               TapGroupConv2d(4, 8, 3, padding=1, k=1, group=4), DepthwiseTopKConv2d(6, 7, 2, 3, k=4)]
    assert {type(m).__name__ for m in EXAMPLES} == set(deploy_ops.NN_MODULES)
    assert {type(m).__name__ for m in kernels} == set(deploy_ops.KERNEL_LAYERS)
    for m in EXAMPLES + kernels:
        kind = deploy_ops.module_type(m)
        spec = {"type": kind, "config": deploy_format._config(m, kind), "state": m.state_dict()}
        back = deploy_format._module_from_spec("m", copy.deepcopy(spec))
        assert type(back) is type(m) and deploy_format._config(back, kind) == spec["config"], kind
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())


# ---- arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, match", [
    ({"eval": "1+1"}, "the argument"), ({"node": "x"}, "the argument"), ({"ref": "0"}, "not an earlier step"),
    ({"ref": 99}, "not an earlier step"), ({"ref": True}, "not an earlier step"), ({"ref": -1}, "not an earlier step"),
    ({"ref": 0, "x": 1}, "the argument"), ({"slice": "::2"}, "the argument"), ({"dtype": "object"}, "the argument"),
    ({"dict": {"__class__": 1}}, "keyword argument name"), ("os.system", "the string constant"),
    (b"bytes", "the argument"), (1j, "the argument"), ({"ellipsis": 1}, "the argument"),
])
def test_arguments_with_unknown_tags_or_values_are_refused(legit, tmp_path, arg, match):
    _, spec, _, _ = legit
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "call_function", "operator.add")]["args"][1] = arg
    refused(tmp_path, {**spec, "graph": g}, match)


def test_deeply_nested_or_huge_arguments_are_refused(legit, tmp_path):
    _, spec, _, _ = legit
    deep = 1
    for _ in range(30):
        deep = [deep]
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "call_function", "operator.add")]["args"][1] = deep
    refused(tmp_path, {**spec, "graph": g}, "nested deeper than")
    g[step_index(spec, "call_function", "operator.add")]["args"][1] = list(range(5000))
    refused(tmp_path, {**spec, "graph": g}, "more than 4096 items")


def test_keyword_names_with_code_are_refused(legit, tmp_path):
    _, spec, _, _ = legit
    g = copy.deepcopy(spec["graph"])
    g[step_index(spec, "call_method", "mean")]["kwargs"] = {f"keepdim=({payload(tmp_path)}),x": True}
    refused(tmp_path, {**spec, "graph": g}, "keyword argument name")
    g[step_index(spec, "call_method", "mean")]["kwargs"] = {"__class__": True}
    refused(tmp_path, {**spec, "graph": g}, "keyword argument name")
    assert not (tmp_path / "PWNED").exists()


def test_malformed_graphs_are_refused(legit, tmp_path):
    _, spec, _, _ = legit
    g = spec["graph"]
    refused(tmp_path, {**spec, "graph": g[:-1]}, "does not end in an output step")
    refused(tmp_path, {**spec, "graph": [*g, g[1]]}, "a step after the output")
    refused(tmp_path, {**spec, "graph": [g[0], g[1], g[0], *g[2:]]}, "an input after other steps")
    refused(tmp_path, {**spec, "graph": [*g[:3], {"op": "exec", "target": "x"}, *g[3:]]}, "unknown step")
    refused(tmp_path, {**spec, "graph": [*g[:3], {"op": ["call_function"]}, *g[3:]]}, "unknown step")
    refused(tmp_path, {**spec, "graph": [*g[:3], "import os", *g[3:]]}, "unknown step 'import os'")
    refused(tmp_path, {**spec, "graph": "x = 1"}, "not a list of steps")
    refused(tmp_path, {**spec, "code": "import os"}, "unexpected entries ['code']")
    refused(tmp_path, {**spec, "input_shape": [3, 10 ** 9, 1]}, "input_shape refused")
    assert operator.getitem in deploy_ops.FUNCTIONS.values()


def test_unreadable_files_end_in_one_line(tmp_path):
    for content in (b"", b"not a zip file", b"\x80\x04K\x01."):
        path = tmp_path / "garbage.pt"
        path.write_bytes(content)
        with pytest.raises(D.DeployError) as info:
            D.load(path)
        assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}: not a deploy.pt")
    with pytest.raises(D.DeployError, match="no such file"):
        D.load(tmp_path / "missing.pt")


# ---- what deployment refuses, before any timing ----------------------------------------------------

class Odd(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


class DtypeUser(nn.Module):
    def forward(self, x):
        return x + torch.ones(1, dtype=x.dtype)


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("block, match", [
    (Odd(), "cannot hold the function torch.cumsum (in the model's body.1 (Odd))"),
    (DtypeUser(), "cannot hold the function getattr(..., 'dtype') (in the model's body.1 (DtypeUser))"),
    (Branchy(), "torch.fx cannot trace the model's body.1 (Branchy)"),
])
def test_deployment_refuses_what_deploy_pt_cannot_hold_naming_the_module(block, match):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), block)

        def forward(self, x):
            return self.body(x)

    with pytest.raises(D.DeployError) as info:
        deploy_layers.fold_batchnorm(Net())
    assert match in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_deployment_refuses_a_module_name_load_would_refuse():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"conv-1": nn.Conv2d(3, 4, 3)})

        def forward(self, x):
            return self.blocks["conv-1"](x)

    with pytest.raises(D.DeployError, match=r"cannot hold the call_module \(in the model's blocks.conv-1 \(Conv2d\)\): "
                                            r"path 'blocks.conv-1' refused .* rename that attribute"):
        deploy_layers.fold_batchnorm(Net())


def test_dropout_and_identity_leave_the_graph():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Identity(), nn.Dropout1d(0.1), nn.AlphaDropout(0.1),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    gm = deploy_layers.fold_batchnorm(model)
    assert [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"] == \
        ["Conv2d", "Flatten", "Linear"]


def test_tkp_deploy_never_writes_over_the_checkpoint_or_into_a_bad_path(tmp_path):
    """--output may not be the checkpoint it deploys (by any name) or a run file, nor a folder
    or in one that does not exist, nor may --json: refused before the checkpoint is read, the
    files untouched; bad counts are refused by the parser; from the shell, one line, exit 2."""
    import os
    import subprocess
    import sys
    run = tmp_path / "run"
    run.mkdir()
    final = run / "final.pt"
    final.write_bytes(b"a trained model")
    (run / "alias.pt").symlink_to(final)
    cases = {(str(final), "--output", str(run / "alias.pt")): "would replace the checkpoint it deploys",
             (str(final), "--output", str(final)): "would replace the checkpoint it deploys",
             (str(run / "alias.pt"), "--output", str(run / "checkpoint_last.pt")): "would replace a run file",
             (str(final), "--output", str(run)): "is a folder",
             (str(final), "--output", str(final / "deploy.pt")): "is not a folder that exists",
             (str(final), "--output", str(tmp_path / "no" / "deploy.pt")): "is not a folder that exists",
             (str(final), "--output", str(run / "deploy.pt"), "--json", str(run)): "--json .* is a folder"}
    for argv, why in cases.items():
        with pytest.raises(D.DeployError, match=why):
            D.main(list(argv))
    assert final.read_bytes() == b"a trained model" and sorted(os.listdir(run)) == ["alias.pt", "final.pt"]
    for flag in ("--threads", "--repeats", "--verify-batch"):
        with pytest.raises(SystemExit) as e:
            D.get_args_parser().parse_args([str(final), "--output", "d.pt", flag, "0"])
        assert e.value.code == 2
    proc = subprocess.run([sys.executable, "tkp_deploy.py", str(final), "--output", str(final)],
                          cwd=D.__file__.rsplit("/", 1)[0], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("tkp_deploy: --output")
    assert len([ln for ln in proc.stderr.splitlines() if not ln.startswith("W")]) == 1, proc.stderr
