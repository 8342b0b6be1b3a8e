"""Inference latency of a TKP model: dense vs pruned, measured vs theoretical speed-up.

Loads a run's final.pt (the model is rebuilt by the script that trained it) or builds a
model from random init with fresh masks, then times inference of

  dense   the same model, same kernels, with every weight non-zero: the weights before
          masking (fresh build) or, for a checkpoint, its pruned entries refilled with noise
          of the layer's scale;
  pruned  the same model with the pruned entries set to exactly 0.

on the CPU and the GPU (if present), at batch 1 and a large batch, eagerly and under
torch.compile, after warm-up, as the median over repeats (CUDA synchronized). It prints the
theoretical speed-up (sparsity_report: dense MACs / non-zero MACs) beside the measured
one. Dense kernels multiply zeros like any other value, so the measured speed-up is about
1.0x: the theoretical figure needs a sparse execution path. Two are measured:

  * Top-K CNNs on the CPU, deployed: the model as tkp_deploy.py deploys it (BatchNorm folded,
    pruned layers on its Top-K / tap-group kernels where those are faster), timed against the
    masked model (`--no-deploy` skips it).
  * Top-K CNNs, the "arithmetic floor": each pruned kxk conv layer timed against the same
    conv reduced to 1x1 (a kernel that keeps one tap is a 1x1 conv on a shifted input), at
    the kxk conv's output size, like with like: an ungrouped conv against a 1x1 conv with
    the same channels, a grouped one against a 1x1 conv with the same groups, a depthwise
    one (groups = channels) against what a depthwise 1x1 conv computes, a per-channel
    scale and bias (torch.addcmul: oneDNN has no fast path for depthwise 1x1 convs, which
    would make the floor look below 1x). The ratio bounds what K=1 can gain with dense
    kernels at that shape; each row names its 1x1 ("floor_op").
  * N:M ViTs (2:4), deployment: every pruned Linear the forward calls converted to a
    semi-structured sparse weight (torch.sparse.to_sparse_semi_structured: cuSPARSELt, else
    CUTLASS, whose kernels torch builds for compute capability 8.x alone, pytorch issue
    #132928; fp16/bf16; a CUDA GPU with compute capability >= 8.0), its output checked against
    the masked dense layer, both timed, and the sparse form kept only where it is faster.
    Elsewhere the section says why it was skipped and the benchmark goes on.

    python benchmarks/inference_latency.py --checkpoint runs/vgg8-.../final.pt --json lat.json
    python benchmarks/inference_latency.py --script vgg8 --topk 1
    python benchmarks/inference_latency.py --script vit --sparsity-type 2:4 --no-pretrained
    python benchmarks/inference_latency.py --script vit --no-pretrained --devices cuda --batch-sizes 1,256

Flags this benchmark does not know are passed to the model script (e.g. --topk,
--sparsity-type, --model, --img-size, --no-pretrained); with --checkpoint they come from the
checkpoint instead. Measured numbers: RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/inference_latency.py`
    sys.path.insert(0, str(ROOT))

import tkp_common as tkp  # noqa: E402
from tkp_lib import deploy_layers, kernels, topk_conv  # noqa: E402
from tkp_lib.report import sparsity_report  # noqa: E402
from tkp_lib.runs import write_text_atomic  # noqa: E402
from tkp_lib.runtime import HelpFormatter, device_name, fraction, gpu_has_bf16, int_list, nonneg_float, plain, versions  # noqa: E402
from tkp_lib.sparsity import Masker, compute_masks  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BATCHES = {"cpu": [1, 32], "cuda": [1, 256]}
SKIP_2_4 = "skipped: needs a CUDA GPU with compute capability >= 8.0"
HONEST_NOTE = ("Dense kernels (oneDNN/cuDNN convolutions, BLAS/cuBLAS matrix products) multiply the zeros "
               "like any other value, so the pruned model runs as fast as the dense one: a measured "
               "speed-up near 1.0x is the expected result. The theoretical speed-up counts non-zero MACs "
               "only; it needs a sparse execution path (see the deployed, arithmetic floor and 2:4 sections).")


# ---- arguments ---------------------------------------------------------------------------

def device_list(text: str) -> list[str]:
    names = tkp.comma_list(text)
    bad = [n for n in names if n not in ("auto", "cpu", "cuda")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose auto, or any of cpu,cuda; got {text!r}")
    return names


class HelpFormatter(HelpFormatter):
    """tkp's --help layout; on/off switches show no default."""

    def _get_help_string(self, action):
        return action.help if action.nargs == 0 else super()._get_help_string(action)


def get_args_parser() -> tkp.ArgumentParser:
    p = tkp.ArgumentParser(description="TKP inference latency: dense vs pruned, measured vs theoretical",
                           formatter_class=HelpFormatter, allow_abbrev=False,
                           epilog="Other flags go to the model script (e.g. --topk 2, --sparsity-type 2:4, "
                                  "--model, --img-size, --no-pretrained).")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a TKP final.pt; the model is rebuilt by the script that trained it")
    g.add_argument("--script", default=None,
                   help="the model script: a file such as vgg8_optimized.py, or its short name (vgg8, vit, "
                        "resnet56, ...); needed without --checkpoint, inferred from one")
    g.add_argument("--seed", type=tkp.int_range(0), default=0, help="seed of the random init and inputs")
    g = p.add_argument_group("measurement")
    g.add_argument("--devices", type=device_list, default="auto",
                   help="'auto' (cpu, and cuda when present), or a list such as cpu,cuda")
    g.add_argument("--batch-sizes", type=int_list(), default=None,
                   help="batch sizes to time (default: 1,32 on cpu; 1,256 on cuda)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="inference precision; auto = fp32 on cpu, bf16 on GPUs that support it (else fp16)")
    g.add_argument("--no-compile", dest="compile", action="store_false", help="time eager mode only")
    g.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode")
    g.add_argument("--threads", type=tkp.int_range(1), default=None,
                   help="CPU threads (torch.set_num_threads; default: torch's choice)")
    g.add_argument("--channels-last", action="store_true", help="CNNs: channels-last memory format")
    g.add_argument("--warmup", type=tkp.int_range(0), default=5, help="untimed calls before timing")
    g.add_argument("--repeats", type=tkp.int_range(1), default=20, help="timed repeats (the median is reported)")
    g.add_argument("--min-repeat-ms", type=nonneg_float, default=2.0,
                   help="back-to-back calls per repeat are raised until one repeat lasts this long")
    g.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the per-layer kxk vs 1x1 arithmetic floor (Top-K CNNs)")
    g.add_argument("--no-deploy", dest="deploy", action="store_false",
                   help="skip the deployed column (Top-K CNNs on the CPU: tkp_deploy's kernels)")
    g.add_argument("--no-2-4", dest="semi_structured", action="store_false",
                   help="skip the 2:4 semi-structured deployment (N:M models)")
    g.add_argument("--sparse-margin", type=fraction, default=0.02,
                   help="keep a layer's 2:4 sparse form only when it is at least this fraction faster")
    g.add_argument("--json", default=None, metavar="PATH", help="write every measurement to this JSON file")
    return p


# ---- the model: from a checkpoint, or fresh masks on random init -------------------------

@dataclass
class Bench:
    """A model with its masks, and the two sets of values of its masked weights."""
    script: str                  # the Script's name
    script_args: argparse.Namespace
    model: nn.Module             # fp32, CPU, eval mode, pruned weights loaded
    plan: tkp.Plan
    masks: dict
    dense: dict                  # {param name: weight with no zeros}  (the "dense" model)
    pruned: dict                 # {param name: weight with zeros where pruned}
    input_shape: tuple
    source: str
    by_parts: bool = False       # the script counts MACs by parts (CLIP: image and text encoders)


def load_checkpoint(path: str, script: str | None) -> Bench:
    """A final.pt's model, rebuilt by the script that trained it (tkp.load_trained); its
    "dense" twin has the pruned entries refilled with noise of the kept weights' scale."""
    t = tkp.load_trained(path, script, "--checkpoint")
    pruned = {n: p.detach().clone() for n, p in t.model.named_parameters() if n in t.masks}
    gen = torch.Generator().manual_seed(0)
    dense = {}
    for n, w in pruned.items():
        kept = w[t.masks[n]]
        std = float(kept.float().std()) if kept.numel() > 1 else 1e-2
        noise = torch.randn(w.shape, generator=gen, dtype=w.dtype) * (std or 1e-2)
        dense[n] = torch.where(t.masks[n], w, noise)
    return Bench(t.script.name, t.args, t.model, t.plan, t.masks, dense, pruned,
                 tuple(t.script.input_shape(t.args)), f"checkpoint {path}", t.script.mac_parts is not None)


def build_fresh(name: str, extra: list[str], seed: int) -> Bench:
    """A model of script `name` from random init, with masks computed from those weights."""
    module = tkp.import_script(name)
    args = module.get_args_parser().parse_args(extra)
    torch.manual_seed(seed)
    model = module.build_model(args).eval()
    plan = module.SCRIPT.build_plan(model, args)
    masks = compute_masks(model, plan)
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if n in masks}
    Masker(model, masks).apply_()
    pruned = {n: p.detach().clone() for n, p in model.named_parameters() if n in masks}
    return Bench(module.SCRIPT.name, args, model, plan, masks, dense, pruned,
                 tuple(module.SCRIPT.input_shape(args)), f"random init (seed {seed}), fresh masks",
                 module.SCRIPT.mac_parts is not None)


@torch.no_grad()
def load_values(model: nn.Module, values: dict) -> None:
    """Copy `values` into the model's parameters in place (compiled graphs stay valid)."""
    params = dict(model.named_parameters())
    for name, v in values.items():
        params[name].copy_(v)


# ---- timing ------------------------------------------------------------------------------

@dataclass
class Timing:
    warmup: int
    repeats: int
    min_repeat_s: float


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure(fn: Callable[[], object], device: torch.device, timing: Timing) -> dict:
    """Milliseconds per call of `fn`: see measure_interleaved."""
    return measure_interleaved({"fn": (None, fn)}, device, timing)["fn"]


def measure_interleaved(variants: dict, device: torch.device, timing: Timing) -> dict:
    """{name: {"median_ms", "min_ms", "max_ms", "first_call_s", "calls", "rounds"}} for variants
    {name: (prepare or None, fn)}: kernels.measure_interleaved, between device synchronizations;
    each variant's `prepare` (e.g. copying its weights in) runs untimed before each round."""
    t = kernels.measure_interleaved({n: fn for n, (_, fn) in variants.items()}, repeats=timing.repeats,
                                    min_round_s=timing.min_repeat_s, warmup=timing.warmup, sync=_synchronizer(device),
                                    prepare={n: p for n, (p, _) in variants.items() if p is not None})
    return {name: dataclasses.asdict(v) for name, v in t.items()}


def resolve_devices(names: list[str]) -> list[torch.device]:
    if "auto" in names:
        names = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in names and not torch.cuda.is_available():
        raise tkp.TKPError("--devices cuda was asked for but torch sees no GPU; use --devices cpu")
    return [torch.device("cuda", torch.cuda.current_device()) if n == "cuda" else torch.device(n)
            for n in dict.fromkeys(names)]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if gpu_has_bf16(device) else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclass
class DeviceSetup:
    """One device's copy of the model and its inputs."""
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    dense: dict
    pruned: dict
    memory_format: torch.memory_format

    def inputs(self, batch: int, shape: tuple, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *shape, generator=gen).to(self.device, self.dtype)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x


def setup_device(bench: Bench, device: torch.device, dtype: torch.dtype, channels_last: bool) -> DeviceSetup:
    # (not preserve_format: older torch refuses it in Tensor.contiguous)
    fmt = torch.channels_last if channels_last and len(bench.input_shape) == 3 else torch.contiguous_format
    model = copy.deepcopy(bench.model).to(device=device, dtype=dtype)
    if fmt is torch.channels_last:
        model = model.to(memory_format=fmt)
    params = dict(model.named_parameters())

    def placed(values):  # each weight in its parameter's device, dtype and layout
        return {n: torch.empty_like(params[n]).copy_(v) for n, v in values.items()}
    return DeviceSetup(device, dtype, model, placed(bench.dense), placed(bench.pruned), fmt)


# ---- dense vs pruned ---------------------------------------------------------------------

def time_dense_vs_pruned(bench: Bench, setup: DeviceSetup, batches: list[int], modes: list[str],
                         timing: Timing, compile_mode: str, seed: int) -> tuple[list[dict], nn.Module | None]:
    """Rows of (device, batch, mode) with dense and pruned times. Returns the rows and the
    compiled model (pruned weights loaded, compiled for every batch), for the 2:4 section."""
    rows, compiled = [], None
    for mode in modes:
        runner = setup.model
        if mode == "compile":
            try:
                compiled = runner = torch.compile(setup.model, dynamic=False, mode=compile_mode)
            except Exception as e:  # noqa: BLE001 - a missing compiler must not end the benchmark
                rows.append({"device": str(setup.device), "mode": mode, "error": kernels.one_line(e)})
                continue
        for batch in batches:
            x = setup.inputs(batch, bench.input_shape, seed)
            row = {"device": str(setup.device), "dtype": dtype_name(setup.dtype), "batch": batch, "mode": mode}
            try:
                row.update(measure_interleaved(
                    {v: (lambda v=v: load_values(setup.model, getattr(setup, v)), lambda: runner(x))
                     for v in ("dense", "pruned")}, setup.device, timing))
                load_values(setup.model, setup.pruned)
                row["speedup_measured"] = row["dense"]["median_ms"] / row["pruned"]["median_ms"]
                row["speedup_measured_min"] = row["dense"]["min_ms"] / row["pruned"]["min_ms"]  # a noise check
                if mode == "compile":  # the compiled graph must follow the weights swapped in place
                    row["compiled_vs_eager_rel_error"] = _relative_error(runner(x), setup.model(x))
            except Exception as e:  # noqa: BLE001 - e.g. a compile failure on first call, or OOM
                row["error"] = kernels.one_line(e)
                _free(setup.device)
            rows.append(row)
    load_values(setup.model, setup.pruned)
    return rows, compiled


# ---- the arithmetic floor of Top-K: kxk conv vs 1x1 conv at the same shapes --------------

def input_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict:
    """{module name: the shape of its first input} for one forward pass of `model` on `x`."""
    shapes, handles = {}, []
    modules = dict(model.named_modules())

    def hook(name):
        def record(module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input is left alone
        return record

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def one_by_one(conv: nn.Conv2d, memory_format: torch.memory_format) -> tuple[Callable, str]:
    """(fn, name): what `conv` computes for one kept tap, like with like: a 1x1 Conv2d with
    its channels and groups; for a depthwise conv (groups = in = out channels), the
    per-channel scale and bias a depthwise 1x1 conv computes, as one torch.addcmul."""
    device, dtype = conv.weight.device, conv.weight.dtype
    if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        scale = torch.randn(1, conv.out_channels, 1, 1, device=device, dtype=dtype)
        bias = torch.zeros(1, conv.out_channels, 1, 1, device=device, dtype=dtype) if conv.bias is None \
            else conv.bias.detach().reshape(1, -1, 1, 1)
        return (lambda x: torch.addcmul(bias, x, scale)), "depthwise 1x1 (per-channel scale)"
    one = nn.Conv2d(conv.in_channels, conv.out_channels, 1, groups=conv.groups,
                    bias=conv.bias is not None).to(device, dtype, memory_format=memory_format)
    return one, "1x1 conv" if conv.groups == 1 else f"1x1 conv, groups {conv.groups}"


def arithmetic_floor(bench: Bench, setup: DeviceSetup, batch: int, timing: Timing, seed: int) -> dict:
    """Each pruned kxk Conv2d timed against its 1x1 (`one_by_one`: the same channels and
    groups; a per-channel scale for a depthwise conv), applied to an input of the kxk conv's
    output size (stride and padding done by the shift). A kernel keeping K taps costs at
    best K such 1x1s; the kxk/1x1 ratio is the speed-up K=1 could reach with dense kernels at
    that shape (kh*kw in arithmetic)."""
    modules = dict(setup.model.named_modules())
    keep = {t.name.removesuffix(".weight"): t.keep for t in bench.plan.targets}
    convs = [n for n in keep if isinstance(modules[n], nn.Conv2d)]
    shapes = input_shapes(setup.model, convs, setup.inputs(batch, bench.input_shape, seed))
    rows = []
    for name in convs:
        conv = modules[name]
        if name not in shapes:  # not on the forward path (e.g. GoogLeNet's unused auxiliary heads)
            continue
        x = torch.randn(shapes[name], device=setup.device, dtype=setup.dtype)
        x = x.contiguous(memory_format=setup.memory_format)
        y = conv(x)
        one, floor_op = one_by_one(conv, setup.memory_format)
        x1 = torch.randn(x.shape[0], x.shape[1], *y.shape[2:], device=setup.device, dtype=setup.dtype)
        x1 = x1.contiguous(memory_format=setup.memory_format)
        times = measure_interleaved({"kxk": (None, lambda: conv(x)), "1x1": (None, lambda: one(x1))},
                                    setup.device, timing)
        t_k, t_1 = times["kxk"]["median_ms"], times["1x1"]["median_ms"]
        kh, kw = conv.kernel_size
        rows.append({"layer": name, "in": conv.in_channels, "out": conv.out_channels,
                     "input_hw": list(x.shape[2:]), "output_hw": list(y.shape[2:]), "kernel": [kh, kw],
                     "stride": list(conv.stride), "groups": conv.groups, "floor_op": floor_op,
                     "keep": keep[name], "kxk_ms": t_k, "1x1_ms": t_1,
                     "ratio": t_k / t_1, "theoretical": kh * kw / keep[name],
                     "floor_speedup": t_k / (keep[name] * t_1)})
    total_k = sum(r["kxk_ms"] for r in rows)
    total_floor = sum(r["keep"] * r["1x1_ms"] for r in rows)
    return {"device": str(setup.device), "dtype": dtype_name(setup.dtype), "batch": batch, "layers": rows,
            "total": {"kxk_ms": total_k, "floor_ms": total_floor,
                      "floor_speedup": total_k / total_floor if total_floor else None}}


# ---- 2:4 semi-structured deployment (N:M Linears on CUDA GPUs) ---------------------------

def semi_structured_unsupported(device: torch.device, pattern: str) -> str | None:
    """Why 2:4 semi-structured kernels cannot run here, or None if they may."""
    if ":" not in pattern:
        return (f"not applicable: a {pattern} model has no N:M Linears (semi-structured kernels need "
                f"2 of every 4 consecutive inputs of a Linear)")
    n, m = (int(v) for v in pattern.split(":"))
    if m != 4 or n > 2:
        return f"not applicable: {pattern} is not a 2:4 pattern (semi-structured kernels need at most 2 of 4)"
    if device.type != "cuda":
        return f"{SKIP_2_4} (this device is {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"{SKIP_2_4} (this GPU has {major}.{minor})"
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
        del SparseSemiStructuredTensor, to_sparse_semi_structured  # only their presence matters here
    except ImportError as e:
        return f"skipped: this torch has no semi-structured sparse tensors ({kernels.one_line(e)})"
    return None


@contextlib.contextmanager
def _force_cutlass(value: bool):
    from torch.sparse import SparseSemiStructuredTensor
    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = value
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old


def cusparselt_info() -> dict:
    try:
        import torch.backends.cusparselt as cslt
        return {"cusparselt_available": bool(cslt.is_available()), "cusparselt_version": cslt.version()}
    except Exception as e:  # noqa: BLE001
        return {"cusparselt_available": False, "cusparselt_error": kernels.one_line(e)}


def pick_backend(device: torch.device, dtype: torch.dtype) -> tuple[str | None, list[str]]:
    """The first backend (cuSPARSELt, then CUTLASS) that converts and multiplies a small 2:4
    matrix correctly on this GPU, and what went wrong with the others."""
    from torch.sparse import to_sparse_semi_structured
    gen = torch.Generator().manual_seed(0)
    w = (torch.tensor([0.0, 0.0, 1.0, 1.0]).tile(128, 32) * torch.randn(128, 128, generator=gen)).to(device, dtype)
    x = torch.randn(64, 128, generator=gen).to(device, dtype)
    ref = F.linear(x, w)
    problems = []
    for backend in ("cusparselt", "cutlass"):
        if backend == "cusparselt" and not cusparselt_info()["cusparselt_available"]:
            problems.append("cusparselt: not built into this torch")
            continue
        try:
            with _force_cutlass(backend == "cutlass"):
                sparse = to_sparse_semi_structured(w)
            err = float((F.linear(x, sparse) - ref).abs().max() / ref.abs().max())
            if err <= 2e-2:
                return backend, problems
            problems.append(f"{backend}: wrong result (relative error {err:.2e})")
        except Exception as e:  # noqa: BLE001 - e.g. "architecture mismatch", "not supported"
            problems.append(f"{backend}: {kernels.one_line(e)}")
    return None, problems


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def deploy_semi_structured(bench: Bench, setup: DeviceSetup, batches: list[int], timing: Timing, seed: int,
                           compiled_dense: nn.Module | None = None, compile_mode: str | None = None,
                           margin: float = 0.02, convert: Callable | None = None,
                           progress: Callable[[dict], None] | None = None) -> dict:
    """Convert each pruned Linear to a 2:4 semi-structured sparse weight where that is faster.

    Per layer and per batch size: the layer's input shape is taken from one forward pass, the
    masked dense Linear and its sparse twin are timed (interleaved) on one random input, the
    sparse output is checked against the dense one (relative error <= 2e-2), and the sparse
    form is kept only if it is correct and at least `margin` faster at that batch. Then each
    batch's deployed model is checked against the masked dense model and both are timed (eager
    at every batch; compiled at the largest). The per-layer table is the largest batch's.
    `convert` replaces torch.sparse.to_sparse_semi_structured (the tests pass a stand-in to run
    this bookkeeping on a CPU); `progress(result so far)` is called after the per-layer
    decisions and after the eager timings, so that a run stopped during a compile keeps them.
    Never raises: a failure is reported in the result."""
    out = {"device": str(setup.device), "pattern": bench.plan.pattern, **cusparselt_info()}
    if convert is None:
        reason = semi_structured_unsupported(setup.device, bench.plan.pattern)
        if reason:
            return {**out, "status": "skipped" if reason.startswith("skipped") else "not applicable",
                    "reason": reason}
    try:
        return {**out, **_deploy(bench, setup, batches, timing, seed, compiled_dense, compile_mode, margin, convert,
                                 lambda part: progress and progress({**out, **part}))}
    except Exception as e:  # noqa: BLE001 - the deployment is an experiment; the benchmark goes on
        _free(setup.device)
        return {**out, "status": "failed", "reason": f"failed: {kernels.one_line(e)}"}


def _decide_layer(lin: nn.Linear, name: str, shape, convert, setup, dtype, timing, margin) -> dict:
    """One Linear's row: its sparse twin checked and timed against it on a random input of the
    layer's own input shape, and put in its place where it is correct and faster."""
    if shape is None:  # e.g. CLIP's text tower, or a MultiheadAttention's out_proj (whose weight
        # the attention multiplies by itself): their weights stay dense
        return {"layer": name, "weight": list(lin.weight.shape), "kept_sparse": False,
                "note": "dense: not called as a module by the timed forward"}
    row = {"layer": name, "weight": list(lin.weight.shape), "input": list(shape), "kept_sparse": False}
    x = torch.randn(shape, device=setup.device, dtype=dtype)
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    ref = F.linear(x, w, b)  # what nn.Linear.forward computes
    try:
        sparse = convert(w.contiguous())
        row["rel_error"] = _relative_error(F.linear(x, sparse, b), ref)
        t = measure_interleaved({"dense": (None, lambda: F.linear(x, w, b)),
                                 "sparse": (None, lambda: F.linear(x, sparse, b))}, setup.device, timing)
        row["dense_ms"], row["sparse_ms"] = t["dense"]["median_ms"], t["sparse"]["median_ms"]
        row["speedup"] = row["dense_ms"] / row["sparse_ms"]
        row["kept_sparse"] = row["rel_error"] <= 2e-2 and row["speedup"] >= 1 + margin
        row["note"] = ("sparse: faster" if row["kept_sparse"] else
                       "dense: sparse output differs" if row["rel_error"] > 2e-2 else "dense: sparse not faster")
        if row["kept_sparse"]:
            lin.weight = nn.Parameter(sparse, requires_grad=False)
    except Exception as e:  # noqa: BLE001 - e.g. a shape the kernels do not take
        row["note"] = f"dense: {kernels.one_line(e)}"
        row["dense_ms"] = measure(lambda: F.linear(x, w, b), setup.device, timing)["median_ms"]
    return row


def _deployed_at(dense: nn.Module, linears: list[str], x: torch.Tensor, convert, setup, dtype, timing,
                 margin) -> tuple[nn.Module, list[dict], float]:
    """A copy of `dense` with each Linear decided at the batch of `x` (_decide_layer), its rows,
    and its output's relative error against the dense model's on `x`."""
    deployed = copy.deepcopy(dense)
    modules = dict(deployed.named_modules())
    shapes = input_shapes(deployed, linears, x)
    layers = [_decide_layer(modules[name], name, shapes.get(name), convert, setup, dtype, timing, margin)
              for name in linears]
    return deployed, layers, _relative_error(deployed(x), dense(x))


def _deploy(bench, setup, batches, timing, seed, compiled_dense, compile_mode, margin, convert, progress) -> dict:
    dtype = setup.dtype if setup.dtype in (torch.float16, torch.bfloat16) else (
        torch.bfloat16 if setup.device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16)
    backend, problems = "stand-in", []
    if convert is None:
        backend, problems = pick_backend(setup.device, dtype)
        if backend is None:
            return {"status": "skipped", "reason": "skipped: no semi-structured backend works on this GPU ("
                    + "; ".join(problems) + ")"}

        def convert(w):
            from torch.sparse import to_sparse_semi_structured
            with _force_cutlass(backend == "cutlass"):
                return to_sparse_semi_structured(w)

    dense = setup.model if dtype == setup.dtype else copy.deepcopy(setup.model).to(dtype)
    if dense is not setup.model:
        compiled_dense = None  # the compiled model runs another dtype
    modules = dict(dense.named_modules())
    linears = [n.removesuffix(".weight") for n in bench.masks
               if isinstance(modules.get(n.removesuffix(".weight")), nn.Linear)]
    big = max(batches)
    # decided per batch size: a sparse kernel faster at 256 rows may be slower at one image
    decided = {b: _deployed_at(dense, linears, setup.inputs(b, bench.input_shape, seed).to(dtype), convert, setup,
                               dtype, timing, margin) for b in sorted(batches, reverse=True)}
    deployed, layers, rel_error = decided[big]
    kept = sum(r["kept_sparse"] for r in layers)
    result = {"status": "done", "backend": backend, "backend_problems": problems, "dtype": dtype_name(dtype),
              "decided_at_batch": big, "margin": margin, "layers": layers, "layers_sparse": kept,
              "layers_total": len(layers), "model_rel_error": rel_error, "model_matches": rel_error <= 5e-2,
              "smaller_batches": [{"batch": b, "layers_sparse": sum(r["kept_sparse"] for r in decided[b][1]),
                                   "model_rel_error": decided[b][2]} for b in batches if b != big]}
    rows = result["model"] = []
    progress(result)
    for batch in batches:  # with no sparse layer the deployed model is the dense one: not timed
        model, chosen, err = decided[batch]
        if not any(r["kept_sparse"] for r in chosen) or err > 5e-2:
            continue
        x = setup.inputs(batch, bench.input_shape, seed).to(dtype)
        t = measure_interleaved({"dense": (None, lambda: dense(x)), "deployed": (None, lambda: model(x))},
                                setup.device, timing)
        d, s = t["dense"]["median_ms"], t["deployed"]["median_ms"]
        rows.append({"batch": batch, "mode": "eager", "dense_ms": d, "deployed_ms": s, "speedup": d / s})
    timed = kept and result["model_matches"]
    progress(result)
    if compile_mode and timed:
        try:
            x = setup.inputs(big, bench.input_shape, seed).to(dtype)
            d_model = (compiled_dense if compiled_dense is not None
                       else torch.compile(dense, dynamic=False, mode=compile_mode))
            s_model = torch.compile(deployed, dynamic=False, mode=compile_mode)
            t = measure_interleaved({"dense": (None, lambda: d_model(x)), "deployed": (None, lambda: s_model(x))},
                                    setup.device, timing)
            d, s = t["dense"]["median_ms"], t["deployed"]["median_ms"]
            rows.append({"batch": big, "mode": "compile", "dense_ms": d, "deployed_ms": s, "speedup": d / s})
        except Exception as e:  # noqa: BLE001 - the sparse subclass under torch.compile is prototype
            rows.append({"batch": big, "mode": "compile", "error": kernels.one_line(e)})
    return result


# ---- report ------------------------------------------------------------------------------

def _format_semi_structured(s: dict, label: str) -> list[str]:
    if s["status"] != "done":
        return [f"2:4 deployment ({label}): {s['reason']}"]
    lines = [f"2:4 deployment ({label}, {s['dtype']}, backend {s['backend']}): {s['layers_sparse']} of "
             f"{s['layers_total']} Linears kept sparse (decided at batch {s['decided_at_batch']}, "
             f"sparse kept only if >= {s['margin']:.0%} faster and correct)",
             f"{'layer':<24} {'weight':>11} {'dense ms':>9} {'sparse ms':>9} {'speed-up':>8} {'rel err':>8}  "
             f"decision"]
    for x in s["layers"]:
        dm = f"{x['dense_ms']:>9.4f}" if "dense_ms" in x else f"{'-':>9}"
        sp = f"{x['sparse_ms']:>9.4f}" if "sparse_ms" in x else f"{'-':>9}"
        su = f"{x['speedup']:>7.2f}x" if "speedup" in x else f"{'-':>8}"
        er = f"{x['rel_error']:>8.1e}" if "rel_error" in x else f"{'-':>8}"
        lines.append(f"{x['layer'][:24]:<24} {'x'.join(map(str, x['weight'])):>11} {dm} {sp} {su} {er}  {x['note']}")
    lines.append(f"whole model: output vs masked dense model, relative error {s['model_rel_error']:.1e} "
                 f"({'ok' if s['model_matches'] else 'MISMATCH'})"
                 + ("" if s["layers_sparse"] else "; no layer kept sparse, so it is the masked dense model")
                 + ("" if s["model_matches"] or not s["layers_sparse"] else "; not timed"))
    lines += [f"decided again at batch {x['batch']}: {x['layers_sparse']} of {s['layers_total']} Linears kept "
              f"sparse (relative error {x['model_rel_error']:.1e})" for x in s.get("smaller_batches", [])]
    for m in s["model"]:
        if "error" in m:
            lines.append(f"  batch {m['batch']:>4} {m['mode']:<8} failed: {m['error']}")
        else:
            lines.append(f"  batch {m['batch']:>4} {m['mode']:<8} masked dense {m['dense_ms']:.3f} ms, "
                         f"deployed {m['deployed_ms']:.3f} ms: {m['speedup']:.2f}x")
    return lines


def format_report(r: dict) -> str:
    th = r["theoretical"]
    lines = [f"{r['script']} {r['pattern']} | {r['source']} | input {'x'.join(map(str, r['input_shape']))} | "
             f"torch {r['versions']['torch']}",
             f"theoretical speed-up {th['speedup_theoretical']:.2f}x (MACs {th['macs_dense'] / 1e6:,.1f}M dense -> "
             f"{th['macs_nonzero'] / 1e6:,.1f}M non-zero; pruned layers alone "
             f"{th['speedup_pruned_layers']:.2f}x)",
             *([f"pruned layers the timed forward does not run (not in these figures): {len(th['not_run'])}, "
                f"e.g. {th['not_run'][0]}"] if th.get("not_run") else []),
             "dense = the same model and kernels with every weight non-zero; pruned = zeros where masked; "
             "times are medians over rounds alternating dense and pruned ((fastest): the ratio of the fastest "
             "rounds, a check on noise)", "",
             f"{'device':<28} {'dtype':<5} {'batch':>5} {'mode':<8} {'dense ms':>9} {'pruned ms':>9} "
             f"{'dense img/s':>11} {'pruned img/s':>12} {'measured':>8} {'(fastest)':>9} {'theoretical':>11}"]
    for row in r["latency"]:
        label = r["device_names"].get(row["device"], row["device"])[:28]
        if "error" in row:
            lines.append(f"{label:<28} {row.get('dtype', ''):<5} {row.get('batch', ''):>5} {row['mode']:<8} "
                         f"failed: {row['error']}")
            continue
        d, p = row["dense"]["median_ms"], row["pruned"]["median_ms"]
        lines.append(f"{label:<28} {row['dtype']:<5} {row['batch']:>5} {row['mode']:<8} {d:>9.3f} {p:>9.3f} "
                     f"{row['batch'] * 1e3 / d:>11,.0f} {row['batch'] * 1e3 / p:>12,.0f} "
                     f"{row['speedup_measured']:>7.2f}x {row['speedup_measured_min']:>8.2f}x "
                     f"{th['speedup_theoretical']:>10.2f}x")
    for err in r.get("errors", []):
        lines.append(f"{r['device_names'].get(err['device'], err['device'])}: failed: {err['error']}")
    lines += ["", "note: " + HONEST_NOTE]
    for d in r.get("deployed", []):
        if "rows" not in d:
            lines += ["", f"deployed ({d['device']}): {d.get('skipped') or 'failed: ' + d.get('error', '')}"]
            continue
        lines += ["", f"deployed with tkp_deploy ({d['summary']}) against the masked model, {d['device']}:"]
        lines += [f"  batch {x['batch']:>4}: masked {x['masked_ms']:.3f} ms, deployed {x['deployed_ms']:.3f} ms: "
                  f"{x['speedup']:.2f}x measured ({th['speedup_theoretical']:.2f}x theoretical; rel. error "
                  f"{x['rel_error']:.1e})" for x in d["rows"]]
    for floor in r["arithmetic_floor"]:
        if "error" in floor:
            lines += ["", f"arithmetic floor ({floor['device']}, batch {floor['batch']}) failed: {floor['error']}"]
            continue
        lines += ["", f"arithmetic floor ({r['device_names'].get(floor['device'], floor['device'])}, "
                      f"{floor['dtype']}, batch {floor['batch']}): each kxk conv vs its 1x1 (same channels, "
                      f"groups and output size; depthwise: a per-channel scale)",
                  f"{'layer':<28} {'in->out':>11} {'out HxW':>9} {'kernel':>6} {'kxk ms':>9} {'1x1 ms':>9} "
                  f"{'kxk/1x1':>8} {'K':>2} {'floor':>7} {'theory':>7}  1x1"]
        for x in floor["layers"]:
            lines.append(f"{x['layer'][:28]:<28} {x['in']:>5}->{x['out']:<5} {'x'.join(map(str, x['output_hw'])):>9} "
                         f"{'x'.join(map(str, x['kernel'])):>6} {x['kxk_ms']:>9.4f} {x['1x1_ms']:>9.4f} "
                         f"{x['ratio']:>7.2f}x {x['keep']:>2} {x['floor_speedup']:>6.2f}x {x['theoretical']:>6.2f}x  "
                         f"{x['floor_op']}")
        t = floor["total"]
        if t["floor_speedup"]:
            lines.append(f"{'all pruned convs':<28} {'':>11} {'':>9} {'':>6} {t['kxk_ms']:>9.4f} {t['floor_ms']:>9.4f} "
                         f"{'':>8} {'':>2} {t['floor_speedup']:>6.2f}x")
        lines.append("floor = kxk time / (K x 1x1 time): the best dense kernels can do for K taps at these shapes "
                     "(gathering the shifted inputs not counted)")
    for s in r["semi_structured"]:
        lines += ["", *_format_semi_structured(s, r["device_names"].get(s["device"], s["device"]))]
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------

def _free(device: torch.device) -> None:
    if device.type == "cuda":
        with contextlib.suppress(Exception):  # after a CUDA error even this may fail
            torch.cuda.empty_cache()


def time_deployed(bench: Bench, setup: DeviceSetup, batches: list[int], timing: Timing, seed: int) -> dict:
    """Top-K CNNs on the CPU in fp32: the model as tkp_deploy deploys it (BatchNorm folded,
    each pruned layer on the Top-K or tap-group kernel where that measures faster) against
    the masked model as it trains (eager, every weight in place), timed interleaved."""
    conv_masks = any(m.dim() == 4 for m in bench.masks.values())
    if setup.device.type != "cpu" or setup.dtype != torch.float32 or not conv_masks:
        return {"device": str(setup.device), "skipped": "Top-K CNNs on the CPU in fp32 only"}
    load_values(setup.model, setup.pruned)
    model = copy.deepcopy(setup.model).to(memory_format=torch.contiguous_format).eval()
    folded = deploy_layers.fold_batchnorm(model)
    records = deploy_layers.choose_layers(folded, bench.input_shape, batches, repeats=max(3, timing.repeats // 4))
    deployed = deploy_layers.apply_layers(folded, records, bench.input_shape)
    rows = []
    for batch in batches:
        x = setup.inputs(batch, bench.input_shape, seed).contiguous()
        t = measure_interleaved({"masked": (None, lambda: setup.model(x)), "deployed": (None, lambda: deployed(x))},
                                setup.device, timing)
        rows.append({"batch": batch, "masked_ms": t["masked"]["median_ms"], "deployed_ms": t["deployed"]["median_ms"],
                     "speedup": t["masked"]["median_ms"] / t["deployed"]["median_ms"],
                     "rel_error": _relative_error(deployed(x), setup.model(x))})
    pruned = [r for r in records if r["why"] != "dense"]  # "dense": every tap kept
    return {"device": str(setup.device), "kernel": topk_conv.kernel_available(),
            "layers_on_kernel": sum(r["deploy"] != "dense" for r in records), "pruned_layers": len(pruned),
            "convolutions": len(records), "summary": deploy_layers.summary(records), "rows": rows}


def bench_device(bench: Bench, device: torch.device, args, timing: Timing, modes: list[str], result: dict,
                 saved: Callable[[], None]) -> None:
    """Every measurement on one device, appended to `result` (and `saved()` after each part):
    dense vs pruned, the Top-K arithmetic floor, then the 2:4 deployment (last: a CUDA error
    there spoils nothing else)."""
    dtype = resolve_dtype(args.dtype, device)
    batches = args.batch_sizes or DEFAULT_BATCHES[device.type]
    setup = setup_device(bench, device, dtype, args.channels_last)
    rows, compiled = time_dense_vs_pruned(bench, setup, batches, modes, timing, args.compile_mode, args.seed)
    result["latency"] += rows
    saved()
    if args.floor and any(m.dim() == 4 for m in bench.masks.values()):
        for batch in batches:
            try:
                result["arithmetic_floor"].append(arithmetic_floor(bench, setup, batch, timing, args.seed))
            except Exception as e:  # noqa: BLE001
                result["arithmetic_floor"].append({"device": str(device), "batch": batch, "error": kernels.one_line(e)})
                _free(device)
        saved()
    if args.deploy:
        try:
            result["deployed"].append(time_deployed(bench, setup, batches, timing, args.seed))
        except Exception as e:  # noqa: BLE001 - e.g. a model torch.fx cannot trace
            result["deployed"].append({"device": str(device), "error": kernels.one_line(e)})
        saved()
    if args.semi_structured:
        entry = {"device": str(device), "status": "failed", "reason": "failed: stopped before it finished"}
        result["semi_structured"].append(entry)

        def progress(part: dict) -> None:  # what is measured so far replaces the entry, and is saved
            entry.clear()
            entry.update(part)
            saved()

        progress(deploy_semi_structured(
            bench, setup, batches, timing, args.seed, compiled_dense=compiled,
            compile_mode=args.compile_mode if args.compile else None, margin=args.sparse_margin, progress=progress))


def main(argv=None) -> dict:
    args, extra = get_args_parser().parse_known_args(argv)
    extra = [a for a in extra if a != "--"]  # `-- FLAGS` (as benchmarks/train_throughput.py takes them) works too
    if args.checkpoint:
        if extra:
            raise tkp.TKPError(f"with --checkpoint the model flags come from the checkpoint; unknown flags: "
                               f"{' '.join(extra)}")
        bench = load_checkpoint(args.checkpoint, args.script)
    elif args.script:
        bench = build_fresh(args.script, extra, args.seed)
    else:
        raise tkp.TKPError("pass --checkpoint PATH (a final.pt) or --script NAME (a fresh model)")

    # the MACs of the forward pass that is timed; for a model counted by parts, such as CLIP's
    # image encoder timed alone (its text encoder runs once per set of class names), the pruned
    # layers that forward does not run are listed as not run
    report = sparsity_report(bench.model, bench.plan, bench.masks, bench.input_shape, torch.device("cpu"),
                             strict=not bench.by_parts)
    pruned_dense = sum(x["macs_dense"] for x in report["layers"])
    pruned_nonzero = sum(x["macs_nonzero"] for x in report["layers"])
    theoretical = {**{k: v for k, v in report.items() if k != "layers"},
                   "speedup_pruned_layers": pruned_dense / pruned_nonzero if pruned_nonzero else 1.0}
    timing = Timing(args.warmup, args.repeats, args.min_repeat_ms / 1e3)
    devices = resolve_devices(args.devices)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None and any(d.type == "cpu" for d in devices) and load > (os.cpu_count() or 1) - 0.5:
        print(f"warning: the load average is {load:.1f} on {os.cpu_count()} CPUs: if other processes are "
              f"running, the CPU timings are unreliable (--threads 1 suffers least)", flush=True)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)  # restored at the end (main() is also called in-process)
    modes = ["eager"] + (["compile"] if args.compile else [])
    gpu = next((d for d in devices if d.type == "cuda"), None)  # the GPU whose versions the figures depend on
    result = {"benchmark": "inference_latency", "script": bench.script, "pattern": bench.plan.pattern,
              "source": bench.source, "input_shape": list(bench.input_shape), "versions": versions(gpu),
              "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
              "load_average_at_start": load, "dense_means": "same model, same kernels, every weight non-zero "
              "(the weights before masking; for a checkpoint its pruned entries refilled with noise of the "
              "layer's scale)", "pruned_means": "the same model with the masked weights exactly zero",
              "theoretical": theoretical, "timing": vars(timing), "compile_mode": args.compile_mode if args.compile
              else None, "channels_last": args.channels_last, "note": HONEST_NOTE,
              "device_names": {}, "latency": [], "arithmetic_floor": [], "deployed": [], "semi_structured": [],
              "errors": [],
              "complete": False}
    path = Path(args.json) if args.json else None

    def save() -> None:  # after each part, so a run cut short by a time limit keeps what it measured
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(plain(result), indent=2) + "\n")

    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True  # every conv (kxk and 1x1 alike) gets its fastest algorithm
        with torch.inference_mode():
            for device in devices:
                result["device_names"][str(device)] = device_name(device)
                try:
                    bench_device(bench, device, args, timing, modes, result, save)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: the other devices still count
                    result["errors"].append({"device": str(device), "error": kernels.one_line(e)})
                _free(device)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.set_num_threads(threads_before)
    result["complete"] = True
    save()
    print(format_report(result), flush=True)
    if path:
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    tkp.cli(main)
